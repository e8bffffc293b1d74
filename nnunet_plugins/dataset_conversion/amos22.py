"""AMOS22 (Abdominal Multi-Organ Segmentation, amos22.grand-challenge.org; post-challenge release).

Release layout::

    amos22/dataset.json                 lists "training", "validation", "test" and the label names
    amos22/imagesTr/amos_XXXX.nii.gz    labelsTr/amos_XXXX.nii.gz
    amos22/imagesVa/amos_XXXX.nii.gz    labelsVa/amos_XXXX.nii.gz
    amos22/imagesTs/amos_XXXX.nii.gz

The case number is the only way to tell the modality: <= 500 is CT, above is MRI (the rule of nnU-Net's
Dataset218/219 converters; the release's MRI cases are numbered from 501 up). Labels 0-15 (names from the
shipped dataset.json). Task 1 uses the CT cases with channel ``CT`` (nnU-Net's CT normalisation); task 2
uses all cases with channel ``zscore`` (per-image z-score, since CT and MRI intensities share no scale).
As nnU-Net's converters do, the validation cases (whose labels the post-challenge release includes) are
merged into training by default (5-fold cross-validation instead of an arbitrary split); otherwise they go
to ``imagesVal``/``labelsVal``, which nnU-Net ignores. MRI orientations vary and some are oblique, so the
files are copied unchanged and read with ``NibabelIOWithReorient`` (predictions come back in the input
geometry).

Submissions: validation phase = a zip of ``amos_XXXX.nii.gz`` (one per validation image of the task, labels
0-15, input geometry); test phase = a container reading ``/input/*.nii.gz`` and writing same-named files to
``/output``.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .common import (CaseError, CaseJob, Challenge, ChallengeError, DEFAULT_GEOMETRY_TOLERANCE, Option,
                     ReleaseLayoutError, archive_options, build_dataset, check_affine, check_complete, check_extra,
                     check_label_values, list_images, load_file, nifti_array, open_nifti, place_nifti_file,
                     prepare_output_folder, run_parallel, write_like, write_zip)

CHALLENGE = "amos22"
DEFAULT_DATASET_IDS = {1: 218, 2: 219}
DEFAULT_NAMES = {1: "AMOS2022_task1", 2: "AMOS2022_task2"}
LAST_CT_ID = 500
LABELS = {0: "background", 1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gall bladder", 5: "esophagus",
          6: "liver", 7: "stomach", 8: "aorta", 9: "postcava", 10: "pancreas", 11: "right adrenal gland",
          12: "left adrenal gland", 13: "duodenum", 14: "bladder", 15: "prostate/uterus"}
CHANNEL_NAMES = {1: "CT", 2: "zscore"}
CASE_PATTERN = re.compile(r"^amos_(\d{4})$")
SPLITS = {"training": ("imagesTr", "labelsTr"), "validation": ("imagesVa", "labelsVa"), "test": ("imagesTs", None)}


def case_number(case: str) -> int:
    m = CASE_PATTERN.match(case)
    if not m:
        raise ChallengeError(f"{case!r} is not an AMOS case name (amos_XXXX)")
    return int(m.group(1))


def is_ct(case: str) -> bool:
    return case_number(case) <= LAST_CT_ID


def in_task(case: str, task: int) -> bool:
    return task == 2 or is_ct(case)


def check_task(task: int) -> None:
    if task not in (1, 2):
        raise ChallengeError(f"AMOS22 task must be 1 (CT) or 2 (CT and MRI), got {task}")


def read_release(release_dir: str) -> tuple[dict, dict]:
    """(shipped dataset.json, {split: [case ids]}) of an AMOS22 release folder."""
    path = os.path.join(release_dir, "dataset.json")
    if not os.path.isdir(release_dir) or not os.path.isfile(path):
        raise ReleaseLayoutError(f"{release_dir} is not an AMOS22 release: expected dataset.json with imagesTr, "
                                 "labelsTr, imagesVa, labelsVa, imagesTs next to it")
    try:
        with open(path) as f:
            shipped = json.load(f)
    except Exception as e:
        raise ReleaseLayoutError(f"cannot read {path}: {e}") from None
    splits = {}
    for split in SPLITS:
        entries = shipped.get(split, [])
        ids = []
        for e in entries:
            image = e["image"] if isinstance(e, dict) else e
            stem = os.path.basename(image)
            if not stem.endswith(".nii.gz"):
                raise ReleaseLayoutError(f"{path}: unexpected {split} entry {image!r}")
            ids.append(stem[:-7])
        splits[split] = ids
    if not splits["training"]:
        raise ReleaseLayoutError(f"{path} lists no training cases")
    return shipped, splits


def label_names(shipped: dict) -> dict:
    """{name: value} from the shipped dataset.json (validated against the AMOS label values 0-15)."""
    raw = shipped.get("labels")
    if not isinstance(raw, dict):
        return {v: k for k, v in LABELS.items()}
    names = {}
    for value, name in raw.items():
        value = int(value)
        if value not in LABELS:
            raise ReleaseLayoutError(f"dataset.json of the release lists label {value}, not an AMOS22 label (0-15)")
        names[str(name)] = value
    if sorted(names.values()) != sorted(LABELS):
        raise ReleaseLayoutError(f"dataset.json of the release lists labels {sorted(names.values())}, expected 0-15")
    return dict(sorted(names.items(), key=lambda kv: kv[1]))


def convert_case(dataset_dir: str, case: str, image: str, label: str | None, image_out: str,
                 label_out: str | None, tolerance: float) -> None:
    img = load_file(case, image, "image")
    if label is not None:
        seg = load_file(case, label, "label")
        check_affine(case, image, img.nifti, label, seg.nifti, tolerance)
        check_label_values(case, label, seg.array(), LABELS)
        place_nifti_file(case, label, os.path.join(dataset_dir, label_out), img.nifti, tolerance, image, loaded=seg,
                         what="label")
    place_nifti_file(case, image, os.path.join(dataset_dir, image_out), loaded=img)


def convert(release_dir: str, task: int = 2, raw: str | None = None, dataset_id: int | None = None,
            name: str | None = None, merge_validation: bool = True, num_processes: int = 1,
            overwrite: bool = False, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True) -> str:
    """Convert the AMOS22 release for task 1 (CT) or 2 (CT + MRI); see the module docstring."""
    check_task(task)
    shipped, splits = read_release(release_dir)
    names = label_names(shipped)
    jobs, num_training = [], 0
    for split, cases in splits.items():
        image_folder, label_folder = SPLITS[split]
        for case in cases:
            if not in_task(case, task):
                continue
            image = os.path.join(release_dir, image_folder, f"{case}.nii.gz")
            label = os.path.join(release_dir, label_folder, f"{case}.nii.gz") if label_folder else None
            if not os.path.isfile(image):
                raise CaseError(case, image, f"missing image listed in the release's dataset.json ({split})")
            if label is not None and not os.path.isfile(label):
                raise CaseError(case, label, f"missing label listed in the release's dataset.json ({split})")
            if split == "test":
                image_out, label_out = os.path.join("imagesTs", f"{case}_0000.nii.gz"), None
            elif split == "training" or merge_validation:
                image_out = os.path.join("imagesTr", f"{case}_0000.nii.gz")
                label_out = os.path.join("labelsTr", f"{case}.nii.gz")
                num_training += 1
            else:
                image_out = os.path.join("imagesVal", f"{case}_0000.nii.gz")
                label_out = os.path.join("labelsVal", f"{case}.nii.gz")
            jobs.append(CaseJob(case, convert_case,
                                {"case": case, "image": image, "label": label, "image_out": image_out,
                                 "label_out": label_out, "tolerance": tolerance},
                                [o for o in (image_out, label_out) if o], [p for p in (image, label) if p]))
    dj = {
        "channel_names": {"0": CHANNEL_NAMES[task]},
        "labels": names,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "name": DEFAULT_NAMES[task],
        "reference": "https://amos22.grand-challenge.org/",
        "description": f"AMOS22 task {task} ({'CT' if task == 1 else 'CT and MRI'}) converted by nnunet-plugins"
                       + ("; validation cases merged into training" if merge_validation else ""),
        "conversion": {"tool": "nnunet-plugins", "challenge": CHALLENGE, "task": task,
                       "merge_validation": merge_validation},
    }
    return build_dataset(raw, dataset_id or DEFAULT_DATASET_IDS[task], name or DEFAULT_NAMES[task], jobs, dj,
                         release_dir, num_processes=num_processes, overwrite=overwrite, progress=progress)


# ------------------------------------------------------------------------------------------- export

def reference_images(images: str, task: int) -> dict:
    """{case: image} of the task's cases in a folder of AMOS images (e.g. the release's imagesVa, /input, or
    nnU-Net's imagesTs with _0000 names)."""
    refs = {}
    for stem, path in list_images(images, (".nii.gz",)).items():
        case = stem[:-5] if stem.endswith("_0000") else stem
        if CASE_PATTERN.match(case) and in_task(case, task):
            refs[case] = path
    if not refs:
        raise ReleaseLayoutError(f"no AMOS22 task {task} images (amos_XXXX.nii.gz) in {images}")
    return refs


def export_case(case: str, prediction: str, reference: str, out_path: str, tolerance: float) -> str:
    ref = open_nifti(case, reference)
    pred = load_file(case, prediction, "prediction").nifti
    check_affine(case, reference, ref, prediction, pred, tolerance, "prediction", "input image")
    array = np.asarray(nifti_array(case, prediction, pred))
    check_label_values(case, prediction, array, LABELS, "prediction")
    return write_like(case, reference, array, out_path, order="nibabel")


def export(pred_dir: str, out_dir: str, images: str, task: int = 2, archive: str | None = "auto",
           num_processes: int = 1, tolerance: float = DEFAULT_GEOMETRY_TOLERANCE, progress: bool = True,
           allow_extra: bool = False) -> dict:
    """nnU-Net predictions -> AMOS22 submission: ``out_dir/amos_XXXX.nii.gz`` for every image of the task in
    ``images`` (labels 0-15, uint8, the image's exact affine) and, unless ``archive`` is None, the zip the
    validation phase takes (``auto``: ``out_dir/amos22_task{task}_submission.zip``). Predictions of cases that are
    not part of the task (MRI cases for task 1) are left out with a note; any other prediction that matches no
    input image is an error unless ``allow_extra``."""
    check_task(task)
    refs = reference_images(images, task)
    preds = list_images(pred_dir, (".nii.gz",))
    other_task = sorted(c for c in preds if CASE_PATTERN.match(c) and not in_task(c, task))
    if other_task:
        print(f"note: {len(other_task)} prediction(s) of MRI cases are not part of task {task} and are left out")
        preds = {c: p for c, p in preds.items() if c not in other_task}
    check_complete(refs, preds, f"AMOS22 task {task} predictions", pred_dir)
    check_extra(preds, refs, "input image", pred_dir, allow_extra)
    prepare_output_folder(out_dir)
    items = [(c, {"case": c, "prediction": preds[c], "reference": r, "out_path": os.path.join(out_dir, f"{c}.nii.gz"),
                  "tolerance": tolerance}) for c, r in refs.items()]
    written = run_parallel(export_case, items, num_processes, desc="exporting AMOS22", progress=progress)
    result = {"files": [written[c] for c in refs]}
    if archive:
        zip_path = os.path.join(out_dir, f"amos22_task{task}_submission.zip") if archive == "auto" else archive
        result["archive"] = write_zip([(os.path.basename(p), p) for p in result["files"]], zip_path)
    return result


# ------------------------------------------------------------------------------------------- the table entry

def evaluate(pred: str, gt_dir: str, **options) -> dict:
    """:func:`nnunet_plugins.evaluation.amos22.evaluate` (imported on use: it needs scipy)."""
    from nnunet_plugins.evaluation import amos22 as evaluation
    return evaluation.evaluate(pred, gt_dir, **options)


_TASK = "1 = CT, 2 = CT and MRI (default 2)"
SPEC = Challenge(
    name=CHALLENGE, title="AMOS22", convert=convert, export=export, evaluate=evaluate,
    default_dataset="218 (task 1) / 219 (task 2)",
    convert_options=(
        Option(("--task",), "task", _TASK, default=2, type=int, choices=(1, 2)),
        Option(("--no-merge-validation",), "merge_validation", "keep the validation cases out of training (written "
               "to imagesVal/labelsVal)", flag=True, to_param=lambda v: not v)),
    export_options=(
        Option(("--task",), "task", _TASK, default=2, type=int, choices=(1, 2)),
        *archive_options("amos22_task<T>_submission.zip")),
    evaluate_options=(
        Option(("--tolerance-mm",), "tolerance_mm", "NSD tolerance in mm (default 1)", default=1.0, type=float),
        Option(("--task",), "task", "1 = the CT cases, 2 = the CT and MRI cases of the reference (default: a labels "
               "folder as given; for a release 2 when any MRI case is predicted, else 1: give 2 so that missing MRI "
               "predictions count)",
               type=int, choices=(1, 2))),
)
