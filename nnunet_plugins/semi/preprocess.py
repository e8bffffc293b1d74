"""Preprocessing of unlabeled images (``imagesUn/``) with the dataset's own nnU-Net plans.

A raw dataset may carry unlabeled images beside ``imagesTr/``::

    nnUNet_raw/DatasetXXX_Name/imagesUn/<case>_<cccc><file_ending>     (same channels and reader as imagesTr)

``nnunet-plugins semi preprocess -d XXX [-p PLANS] [-c CONFIG ...] [-np N]`` runs the configuration's own
nnU-Net preprocessor (``configuration_manager.preprocessor_class``, normally ``DefaultPreprocessor``) on each
case with NO segmentation, exactly as nnU-Net does for a case without labels: transpose, crop to the nonzero
region, normalise with the plans' schemes and intensity properties, resample to the configuration's spacing.
Its ``run_case_save`` writes the case in the format nnU-Net uses for that configuration (nnU-Net 2.8.1:
``<case>.b2nd``, ``<case>_seg.b2nd``, ``<case>.pkl``) into::

    nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/

The ``seg`` of such a case is nnU-Net's dummy segmentation of a case without labels: -1 outside the
nonzero region, 0 inside (it carries no label information), and its properties have no
``class_locations``. A training case preprocessed this way gives bitwise the data of nnU-Net's own
preprocessing of that case.

Each case is written in a hidden temporary subfolder and its files are moved into place with the
``.pkl`` last, so a case is finished exactly when its ``.pkl`` exists; a rerun skips finished cases and
removes leftovers of an interrupted run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Dict, List, Optional, Sequence

UNLABELED_FOLDER = "imagesUn"
#: appended to a configuration's data_identifier for the preprocessed unlabeled folder
UNLABELED_SUFFIX = "_unlabeled"
_TMP_PREFIX = ".tmp-"


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    return os.path.join(preprocessed_dataset_folder, data_identifier + UNLABELED_SUFFIX)


def list_unlabeled_cases(raw_dataset_folder: str, dataset_json: Optional[dict] = None) -> Dict[str, List[str]]:
    """{case: [channel files]} of ``imagesUn/`` ({} if the folder does not exist). A file that does not
    follow ``<case>_<cccc><file_ending>`` or a case with missing/extra channels is an error naming it."""
    from nnunet_plugins.multitask.combine import list_cases

    if dataset_json is None:
        with open(os.path.join(raw_dataset_folder, "dataset.json")) as f:
            dataset_json = json.load(f)
    folder = os.path.join(raw_dataset_folder, UNLABELED_FOLDER)
    if not os.path.isdir(folder):
        return {}
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    pattern = re.compile(r"^.+_\d{4}" + re.escape(ending) + r"$")
    for f in sorted(os.listdir(folder)):
        if not f.startswith(".") and not pattern.match(f):
            raise ValueError(f"{os.path.join(folder, f)}: not an nnU-Net image file name <case>_<cccc>{ending}")
    return list_cases(folder, ending, len(channels), folder)


def preprocess_unlabeled_case(case: str, image_files: List[str], output_folder: str, plans_file: str,
                              configuration: str, dataset_json_file: str) -> str:
    """Preprocess one unlabeled case with nnU-Net's preprocessor of ``configuration`` (see module docstring)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(plans_file) as f:
        plans_manager = PlansManager(json.load(f))
    configuration_manager = plans_manager.get_configuration(configuration)
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    check_case_geometry(case, image_files, plans_manager)
    tmp = os.path.join(output_folder, f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        try:
            preprocessor.run_case_save(os.path.join(tmp, case), image_files, None, plans_manager,
                                       configuration_manager, dataset_json)
        except Exception as e:  # nnU-Net's messages rarely name the file
            raise ValueError(f"{case} ({', '.join(image_files)}): nnU-Net preprocessing failed: "
                             f"{type(e).__name__}: {e}") from e
        files = sorted(os.listdir(tmp), key=lambda f: f.endswith(".pkl"))  # the .pkl marks completion: last
        for f in files:
            os.replace(os.path.join(tmp, f), os.path.join(output_folder, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return case


def check_case_geometry(case: str, image_files: Sequence[str], plans_manager) -> None:
    """All channels readable by the plans' reader and of one geometry; errors name the files."""
    import numpy as np

    reader = plans_manager.image_reader_writer_class()
    shapes, spacings = [], []
    for f in image_files:
        try:
            data, props = reader.read_images([f])
        except Exception as e:
            raise ValueError(f"{case}: cannot read {f} with {type(reader).__name__}: {e}") from e
        shapes.append(data.shape[1:])
        spacings.append(tuple(props["spacing"]))
    for f, shape, spacing in zip(image_files[1:], shapes[1:], spacings[1:]):
        if shape != shapes[0]:
            raise ValueError(f"{case}: {f} has shape {shape}, {image_files[0]} has {shapes[0]}")
        if not np.allclose(spacing, spacings[0], rtol=1e-4):
            raise ValueError(f"{case}: {f} has spacing {spacing}, {image_files[0]} has {spacings[0]}")


def finished_cases(output_folder: str) -> set:
    if not os.path.isdir(output_folder):
        return set()
    return {f[:-4] for f in os.listdir(output_folder) if f.endswith(".pkl") and not f.startswith(".")}


def preprocess_unlabeled(dataset: str | int, plans_identifier: str = "nnUNetPlans",
                         configurations: Optional[Sequence[str]] = None, num_processes: int = 1,
                         raw_root: Optional[str] = None, preprocessed_root: Optional[str] = None,
                         progress: bool = True) -> Dict[str, dict]:
    """Preprocess every case of ``imagesUn/`` for each configuration (default: the configurations of the
    plans already preprocessed for the labeled cases, else ``3d_fullres``). Returns
    {configuration: {"folder", "done", "skipped"}}."""
    from nnunet_plugins.dataset_conversion.common import run_parallel
    from nnunet_plugins.multitask.combine import resolve_dataset_folder
    from nnunet_plugins.semi.split import training_identifiers

    raw_root = raw_root or os.environ.get("nnUNet_raw")
    preprocessed_root = preprocessed_root or os.environ.get("nnUNet_preprocessed")
    if not raw_root or not preprocessed_root:
        raise ValueError("nnUNet_raw and nnUNet_preprocessed must be set")
    raw_folder = resolve_dataset_folder(raw_root, dataset)
    name = os.path.basename(raw_folder)
    pre_folder = os.path.join(preprocessed_root, name)
    plans_file = os.path.join(pre_folder, plans_identifier + ".json")
    dataset_json_file = os.path.join(pre_folder, "dataset.json")
    for f in (plans_file, dataset_json_file):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f} not found: plan and preprocess the dataset with nnU-Net first "
                                    f"(nnUNetv2_plan_and_preprocess -d {name[7:10]})")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    cases = list_unlabeled_cases(raw_folder, dataset_json)
    if not cases:
        raise FileNotFoundError(f"no unlabeled images in {os.path.join(raw_folder, UNLABELED_FOLDER)}")
    overlap = sorted(set(cases) & set(training_identifiers(raw_folder)))
    if overlap:
        raise ValueError(f"{UNLABELED_FOLDER} cases also in imagesTr (names must be unique): {', '.join(overlap[:5])}")

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pm = PlansManager(plans)
    if configurations is None:
        configurations = [c for c in plans["configurations"]
                          if os.path.isdir(os.path.join(pre_folder, pm.get_configuration(c).data_identifier))] \
            or ["3d_fullres"]
    report = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise ValueError(f"configuration {configuration!r} not in {plans_file} "
                             f"(has {', '.join(plans['configurations'])})")
        out = unlabeled_preprocessed_folder(pre_folder, pm.get_configuration(configuration).data_identifier)
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):  # leftovers of an interrupted run
            if f.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(out, f), ignore_errors=True)
        done = finished_cases(out)
        todo = [(c, dict(case=c, image_files=files, output_folder=out, plans_file=plans_file,
                         configuration=configuration, dataset_json_file=dataset_json_file))
                for c, files in sorted(cases.items()) if c not in done]
        if todo:
            run_parallel(preprocess_unlabeled_case, todo, num_processes,
                         desc=f"unlabeled {configuration}", progress=progress)
        report[configuration] = {"folder": out, "done": [c for c, _ in todo], "skipped": sorted(done & set(cases))}
    return report
