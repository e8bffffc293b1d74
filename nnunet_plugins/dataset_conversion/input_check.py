"""Check prediction inputs before a long prediction: channel count and naming, complete decoding, geometry between
the channels of a case.

Stock ``nnUNetv2_predict`` does none of this up front: a case with an extra channel file fails inside nnU-Net's
preprocessing worker with ``IndexError: list index out of range`` followed by "Background workers died. ... your RAM
was full ..." (exit 1, no file name); a case with a missing channel file fails in the network's first convolution
("expected input ... to have 2 channels, but got 1 channels instead"); a truncated ``.nii.gz`` is read by SimpleITK
as zeros without a word, so a prediction of a partly blank image is written. The
commands that predict here (``challenge-infer``, ``predict-multitask``) call :func:`check_cases` /
:func:`check_model_inputs` first, and ``nnunet-plugins check-input`` runs the same checks on a folder for a trained
model or a raw dataset.
"""
from __future__ import annotations

import json
import os
import re

from .common import (DEFAULT_GEOMETRY_TOLERANCE, ChallengeError, Geometry, check_geometry, is_temporary, load_file,
                     run_parallel)


def check_case_files(case: str, files: list, nibabel_geometry: bool = False,
                     tolerance: float = DEFAULT_GEOMETRY_TOLERANCE) -> str:
    """Decode every channel file of ``case`` completely and compare each channel's geometry with channel 0's;
    CaseError naming the file otherwise. ``nibabel_geometry``: NIfTI geometry from the affine as nnU-Net's nibabel
    readers see it (oblique files that SimpleITK refuses). Returns ``case``."""
    reference = None
    for i, path in enumerate(files):
        what = f"channel {i:04d} image"
        loaded = load_file(case, path, what)
        geometry = Geometry.from_nifti(loaded.nifti) if nibabel_geometry and loaded.nifti is not None \
            else Geometry.read(case, path, what)
        if reference is None:
            reference = geometry
        else:
            check_geometry(case, files[0], reference, path, geometry, tolerance, what, "channel 0000 image")
    return case


def check_cases(cases: dict, num_channels: int, where: str, nibabel_geometry: bool = False,
                num_processes: int = 1, progress: bool = False) -> dict:
    """Check {case: [channel files]} against a model taking ``num_channels`` channels (count, complete decoding,
    geometry between channels); ChallengeError listing every failing case. Returns ``cases``."""
    wrong = [f"case {c}: {len(f)} channel file(s), the model takes {num_channels}" for c, f in cases.items()
             if len(f) != num_channels]
    if wrong:
        raise ChallengeError(f"{len(wrong)} case(s) in {where} do not fit the model:\n  " + "\n  ".join(wrong))
    items = [(c, {"case": c, "files": list(f), "nibabel_geometry": nibabel_geometry}) for c, f in cases.items()]
    run_parallel(check_case_files, items, num_processes, desc="checking inputs", progress=progress)
    return cases


def group_channel_files(folder: str, file_ending: str, num_channels: int) -> dict:
    """{case: [channel files]} of a folder in nnU-Net's ``<case>_<XXXX><file_ending>`` naming; ChallengeError
    naming every misnamed file and every case whose channels are not exactly 0000 .. num_channels - 1."""
    if not os.path.isdir(folder):
        raise ChallengeError(f"input folder not found: {folder}")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    found: dict = {}
    problems = []
    for f in sorted(os.listdir(folder)):
        if f.startswith(".") or is_temporary(f) or not f.endswith(file_ending):
            continue
        m = pattern.match(f)
        if not m:
            problems.append(f"file {os.path.join(folder, f)}: not named <case>_<XXXX>{file_ending} (nnU-Net's "
                            "naming: case identifier, channel number)")
            continue
        found.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    expected = list(range(num_channels))
    for case, channels in found.items():
        if sorted(channels) != expected:
            missing = [f"{case}_{c:04d}{file_ending}" for c in expected if c not in channels]
            extra = [os.path.basename(channels[c]) for c in sorted(channels) if c not in expected]
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unexpected {', '.join(extra)}"] if extra else [])
            takes = "0000" if num_channels == 1 else f"0000 .. {num_channels - 1:04d}"
            problems.append(f"case {case}: channels {', '.join(f'{c:04d}' for c in sorted(channels))} found, the "
                            f"model takes {num_channels} ({takes}): " + "; ".join(parts))
    if problems:
        raise ChallengeError(f"{len(problems)} problem(s) with the inputs in {folder}:\n  " + "\n  ".join(problems))
    if not found:
        raise ChallengeError(f"no images <case>_0000{file_ending} in {folder}")
    return {case: [channels[c] for c in expected] for case, channels in sorted(found.items())}


def reader_name(dataset_json: dict, example_file: str) -> str:
    """The image reader nnU-Net will use for these files (ChallengeError if none can read them)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    try:
        return determine_reader_writer_from_dataset_json(dataset_json, example_file, verbose=False).__name__
    except Exception as e:
        raise ChallengeError(f"no nnU-Net image reader for {example_file}: {e}") from None


def check_input_folder(folder: str, dataset_json: dict, num_channels: int | None = None,
                       file_ending: str | None = None, num_processes: int = 1, progress: bool = True) -> dict:
    """Every check of this module on a prediction input folder for a model/dataset described by ``dataset_json``
    (channels and file ending from it unless given). Returns {"cases": {case: files}, "reader": name,
    "num_channels": n, "file_ending": ending}."""
    num_channels = num_channels or len(dataset_json["channel_names"])
    file_ending = file_ending or dataset_json["file_ending"]
    cases = group_channel_files(folder, file_ending, num_channels)
    nibabel_reader = "Nibabel" in str(dataset_json.get("overwrite_image_reader_writer", ""))
    check_cases(cases, num_channels, folder, nibabel_geometry=nibabel_reader, num_processes=num_processes,
                progress=progress)
    reader = reader_name(dataset_json, next(iter(cases.values()))[0])   # after the decoding check: it reads
    return {"cases": cases, "reader": reader, "num_channels": num_channels, "file_ending": file_ending}


def _json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ChallengeError(f"cannot read {path}: {e}") from None


def check_model_inputs(model_folder: str, input_folder: str, task=None, num_processes: int = 1,
                       progress: bool = False) -> dict:
    """:func:`check_input_folder` for the trained model in ``model_folder`` (its dataset.json and plans.json). For a
    multi-task model with ``task``, raw images of that source task in its own channels and file ending."""
    from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec

    dataset_json = _json(os.path.join(model_folder, "dataset.json"))
    plans_file = os.path.join(model_folder, "plans.json")
    plans = _json(plans_file) if os.path.isfile(plans_file) else {}
    num_channels = file_ending = None
    if task is not None and (METADATA_KEY in plans or METADATA_KEY in dataset_json):
        spec = MultiTaskSpec.from_plans(plans) if METADATA_KEY in plans else MultiTaskSpec.from_dataset_json(
            dataset_json)
        if not spec.implicit:
            t = spec.tasks[spec.resolve_task(task)]
            num_channels, file_ending = t.num_input_channels, t.source_file_ending
    elif METADATA_KEY in plans or METADATA_KEY in dataset_json:
        spec = MultiTaskSpec.from_plans(plans) if METADATA_KEY in plans else MultiTaskSpec.from_dataset_json(
            dataset_json)
        num_channels = spec.num_input_channels
    return check_input_folder(input_folder, dataset_json, num_channels, file_ending, num_processes, progress)
