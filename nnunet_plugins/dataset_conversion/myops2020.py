"""MyoPS2020 (myocardial pathology segmentation from multi-sequence cardiac MR, zmiclab).

Release layout::

    train25/myops_training_{101..125}_{C0,DE,T2}.nii.gz       C0 bSSFP cine, DE LGE, T2 T2-weighted (aligned)
    train25_myops_gd/myops_training_XXX_gd.nii.gz
    test20/myops_test_{201..220}_{C0,DE,T2}.nii.gz

The volumes have few, thick slices. Labels are 200 LV normal myocardium, 500 LV blood pool, 600 RV blood
pool, 1220 LV myocardial edema, 2221 LV myocardial scar. As nnU-Net v1's converter (Task159_MyoPS2020):
channels C0 -> 0000, DE -> 0001, T2 -> 0002 (names C0/DE/T2 give per-image z-score), labels
500 -> 1, 600 -> 2, 200 -> 3, 1220 -> 4, 2221 -> 5 (written in C0's geometry).

Submission: one NIfTI per test case with the ORIGINAL label values in C0's geometry. The values do not fit
in 8 bits (nnU-Net v1's back-conversion used uint8 and wrapped 1220 and 2221), so the export writes uint16.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .common import (DEFAULT_GEOMETRY_TOLERANCE, CaseError, CaseJob, Challenge, Geometry, Option, ReleaseLayoutError,
                     build_dataset, check_complete, check_extra, check_geometry, check_label_values, list_images,
                     load_file, place_sitk_file, prepare_output_folder, read_sitk, run_parallel, write_like,
                     write_sitk)

CHALLENGE = "myops2020"
DEFAULT_DATASET_ID = 159
DEFAULT_NAME = "MyoPS2020"
SEQUENCES = ("C0", "DE", "T2")
TRAIN_FOLDER, LABEL_FOLDER, TEST_FOLDER = "train25", "train25_myops_gd", "test20"
# original value -> nnU-Net label
TO_NNUNET = {0: 0, 500: 1, 600: 2, 200: 3, 1220: 4, 2221: 5}
FROM_NNUNET = {v: k for k, v in TO_NNUNET.items()}
LABEL_NAMES = {0: "background", 1: "LV blood pool", 2: "RV blood pool", 3: "LV normal myocardium",
               4: "LV myocardial edema", 5: "LV myocardial scar"}
SCAR, EDEMA = 2221, 1220
FILE_PATTERN = re.compile(r"^(myops_(?:training|test)_\d+)_(C0|DE|T2)\.nii\.gz$")
DEFAULT_SUBMISSION_SUFFIX = "_seg"


def remap(array: np.ndarray, mapping: dict, dtype) -> np.ndarray:
    lut_size = max(mapping) + 1
    lut = np.zeros(lut_size, dtype=dtype)
    for k, v in mapping.items():
        lut[k] = v
    return lut[np.asarray(array).astype(np.intp)]


def _cases(folder: str) -> dict:
    """{case: {sequence: path}} of a train25/test20 folder."""
    cases: dict = {}
    for f in sorted(os.listdir(folder)):
        m = FILE_PATTERN.match(f)
        if m:
            cases.setdefault(m.group(1), {})[m.group(2)] = os.path.join(folder, f)
    return cases


def _channels(case: str, files: dict, folder: str) -> list:
    out = []
    for seq in SEQUENCES:
        if seq not in files:
            raise CaseError(case, os.path.join(folder, f"{case}_{seq}.nii.gz"), f"missing {seq} channel")
        out.append(files[seq])
    return out


def convert_case(dataset_dir: str, case: str, images: list, label: str | None, image_out: list,
                 label_out: str | None, tolerance: float) -> None:
    import SimpleITK as sitk
    reference = Geometry.read(case, images[0], "C0 image")
    if label is not None:
        seg = load_file(case, label, "label")
        check_geometry(case, images[0], reference, label, Geometry.read(case, label, "label"), tolerance,
                       "label", "C0 image")
        arr = seg.sitk_array()
        check_label_values(case, label, arr, TO_NNUNET)
        out = reference.apply(sitk.GetImageFromArray(np.ascontiguousarray(remap(arr, TO_NNUNET, np.uint8))))
        write_sitk(out, os.path.join(dataset_dir, label_out))
    for i, (src, dst) in enumerate(zip(images, image_out)):
        place_sitk_file(case, src, os.path.join(dataset_dir, dst), reference if i else None, tolerance, images[0],
                        what=f"{SEQUENCES[i]} image", reference_what="C0 image")


def convert(release_dir: str, raw: str | None = None, dataset_id: int = DEFAULT_DATASET_ID, name: str = DEFAULT_NAME,
            num_processes: int = 1, overwrite: bool = False, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE,
            progress: bool = True) -> str:
    train, labels, test = (os.path.join(release_dir, f) for f in (TRAIN_FOLDER, LABEL_FOLDER, TEST_FOLDER))
    if not os.path.isdir(train) or not os.path.isdir(labels):
        raise ReleaseLayoutError(f"{release_dir} is not a MyoPS2020 release: expected {TRAIN_FOLDER}/ with "
                                 f"myops_training_XXX_{{C0,DE,T2}}.nii.gz and {LABEL_FOLDER}/ with "
                                 "myops_training_XXX_gd.nii.gz (and optionally test20/)")
    train_cases = _cases(train)
    if not train_cases:
        raise ReleaseLayoutError(f"no myops_training_XXX_{{C0,DE,T2}}.nii.gz files in {train}")
    jobs = []
    for case, files in train_cases.items():
        images = _channels(case, files, train)
        label = os.path.join(labels, f"{case}_gd.nii.gz")
        if not os.path.isfile(label):
            raise CaseError(case, label, "missing label")
        image_out = [os.path.join("imagesTr", f"{case}_{c:04d}.nii.gz") for c in range(3)]
        label_out = os.path.join("labelsTr", f"{case}.nii.gz")
        jobs.append(CaseJob(case, convert_case,
                            {"case": case, "images": images, "label": label, "image_out": image_out,
                             "label_out": label_out, "tolerance": tolerance}, image_out + [label_out],
                            images + [label]))
    if os.path.isdir(test):
        for case, files in _cases(test).items():
            images = _channels(case, files, test)
            image_out = [os.path.join("imagesTs", f"{case}_{c:04d}.nii.gz") for c in range(3)]
            jobs.append(CaseJob(case, convert_case,
                                {"case": case, "images": images, "label": None, "image_out": image_out,
                                 "label_out": None, "tolerance": tolerance}, image_out, images))
    dj = {
        "channel_names": {str(i): s for i, s in enumerate(SEQUENCES)},
        "labels": {n: v for v, n in LABEL_NAMES.items()},
        "numTraining": len(train_cases),
        "file_ending": ".nii.gz",
        "name": DEFAULT_NAME,
        "reference": "https://zmiclab.github.io/zxh/0/myops20/",
        "description": "MyoPS2020 converted by nnunet-plugins; labels 500->1, 600->2, 200->3, 1220->4, 2221->5",
        "conversion": {"tool": "nnunet-plugins", "challenge": CHALLENGE},
    }
    return build_dataset(raw, dataset_id, name, jobs, dj, release_dir, num_processes=num_processes,
                         overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------- export

def reference_images(images: str) -> dict:
    """{case: C0 image} from a release folder (test20/ or train25/ inside it, or such a folder itself) or an
    nnU-Net image folder (``case_0000.nii.gz``)."""
    for folder in (os.path.join(images, TEST_FOLDER), images):
        if os.path.isdir(folder):
            found = {c: f["C0"] for c, f in _cases(folder).items() if "C0" in f}
            if found:
                return found
    refs = {stem[:-5]: path for stem, path in list_images(images, (".nii.gz",)).items() if stem.endswith("_0000")}
    if not refs:
        raise ReleaseLayoutError(f"no MyoPS2020 images in {images}: expected myops_test_XXX_C0.nii.gz files or "
                                 "nnU-Net's case_0000.nii.gz")
    return refs


def export_case(case: str, prediction: str, reference: str, out_path: str, tolerance: float) -> str:
    import SimpleITK as sitk
    ref = Geometry.read(case, reference)
    pred = read_sitk(case, prediction, "prediction")
    check_geometry(case, reference, ref, prediction, Geometry.of(pred), tolerance, "prediction", "input C0 image")
    arr = sitk.GetArrayFromImage(pred)
    check_label_values(case, prediction, arr, FROM_NNUNET, "prediction")
    return write_like(case, reference, remap(arr, FROM_NNUNET, np.uint16), out_path, dtype=np.uint16)


def export(pred_dir: str, out_dir: str, images: str, suffix: str = DEFAULT_SUBMISSION_SUFFIX,
           num_processes: int = 1, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True,
           allow_extra: bool = False) -> list:
    """nnU-Net predictions (labels 0-5) -> ``out_dir/<case><suffix>.nii.gz`` with the original MyoPS values
    (uint16) in the C0 image's geometry, for every case of ``images``."""
    refs = reference_images(images)
    preds = list_images(pred_dir, (".nii.gz",))
    check_complete(refs, preds, "MyoPS2020 predictions", pred_dir)
    check_extra(preds, refs, "input image", pred_dir, allow_extra)
    prepare_output_folder(out_dir)
    items = [(c, {"case": c, "prediction": preds[c], "reference": r,
                  "out_path": os.path.join(out_dir, f"{c}{suffix}.nii.gz"), "tolerance": tolerance})
             for c, r in refs.items()]
    written = run_parallel(export_case, items, num_processes, desc="exporting MyoPS2020",
                           progress=progress)
    return [written[c] for c in refs]


# ------------------------------------------------------------------------------------------- the table entry

def evaluate(pred_dir: str, gt_dir: str, **options) -> dict:
    """:func:`nnunet_plugins.evaluation.myops2020.evaluate` (imported on use)."""
    from nnunet_plugins.evaluation import myops2020 as evaluation
    return evaluation.evaluate(pred_dir, gt_dir, **options)


SPEC = Challenge(
    name=CHALLENGE, title="MyoPS2020", convert=convert, export=export, evaluate=evaluate,
    default_dataset=str(DEFAULT_DATASET_ID),
    export_options=(
        Option(("--suffix",), "suffix", f"file name suffix (default {DEFAULT_SUBMISSION_SUFFIX})",
               default=DEFAULT_SUBMISSION_SUFFIX),),
    evaluate_options=(
        Option(("--labels",), "labels", "label values of the files: original (200, ...), nnU-Net's 0-5, or auto "
               "(default)", default="auto", choices=("auto", "original", "nnunet")),),
)
