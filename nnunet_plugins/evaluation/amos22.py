"""AMOS22 evaluation: DSC and NSD of each of the 15 organs, averaged over organs and cases.

The AMOS22 evaluation page names the two metrics (DSC and normalised surface Dice) and the averaging (per label
and case, then over labels); its code was not available to us. We use the surface Dice of the DeepMind
definition (:mod:`nnunet_plugins.evaluation.surface`, the implementation the organisers' sister challenges
FLARE, KiTS21 and SegRap2023 call) with a default tolerance of 1 mm (``tolerance_mm``), and the empty-mask rules
of those evaluations: both empty -> DSC 1 and NSD 1, exactly one empty -> 0 and 0.
"""
from __future__ import annotations

import os

import numpy as np

from nnunet_plugins.dataset_conversion.amos22 import CASE_PATTERN, LABELS, check_task, in_task, is_ct
from nnunet_plugins.dataset_conversion.common import ChallengeError, Geometry, list_images, load_file, nifti_array
from nnunet_plugins.evaluation.common import (check_prediction_geometry, dice, match_cases, opened_predictions,
                                              output_folder, run_evaluation, unwrap)
from nnunet_plugins.evaluation.surface import compute_surface_distances, surface_dice_from_distances

METRICS = ("DSC", "NSD")
STRUCTURES = tuple(LABELS[k].replace(" ", "_").replace("/", "_") for k in range(1, 16))
DEFAULT_TOLERANCE_MM = 1.0


def organ_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> dict:
    out = {}
    for k, name in zip(range(1, 16), STRUCTURES):
        p, r = pred == k, ref == k
        p_empty, r_empty = not p.any(), not r.any()
        if p_empty and r_empty:
            d, nsd = 1.0, 1.0
        elif p_empty or r_empty:
            d, nsd = 0.0, 0.0
        else:
            d = dice(p, r)
            nsd = surface_dice_from_distances(compute_surface_distances(r, p, spacing), tolerance_mm)
        out[f"DSC_{name}"], out[f"NSD_{name}"] = d, nsd
    return out


def evaluate_case(case: str, prediction: str | None, reference: str, tolerance_mm: float) -> list:
    """Metrics of one case; ``prediction=None`` scores an empty prediction."""
    ref_img = load_file(case, reference, "reference label").nifti
    ref = np.asarray(nifti_array(case, reference, ref_img))
    if prediction is None:
        pred = np.zeros_like(ref)
    else:
        pred_img = load_file(case, prediction, "prediction").nifti
        check_prediction_geometry(case, reference, Geometry.from_nifti(ref_img), prediction,
                                  Geometry.from_nifti(pred_img))
        pred = np.asarray(nifti_array(case, prediction, pred_img))
    spacing = tuple(float(z) for z in ref_img.header.get_zooms()[:3])   # nibabel array axes (x, y, z)
    return [{"case": case, "modality": "CT" if in_task(case, 1) else "MRI",
             **organ_metrics(pred, ref, spacing, tolerance_mm)}]


def reference_labels(gt_dir: str) -> dict:
    """{case: label file} from a labels folder or an AMOS release (labelsVa, then labelsTr)."""
    refs = {}
    folders = [os.path.join(gt_dir, "labelsTr"), os.path.join(gt_dir, "labelsVa"), gt_dir]
    for folder in folders:
        if os.path.isdir(folder):
            for stem, path in list_images(folder, (".nii.gz",)).items():
                if CASE_PATTERN.match(stem):
                    refs[stem] = path
    if not refs:
        raise ChallengeError(f"no AMOS22 reference labels (amos_XXXX.nii.gz) in {gt_dir}")
    return refs


def reference_set(gt_dir: str, refs: dict, preds: dict, task: int | None = None) -> tuple[dict, int]:
    """(the reference cases the predictions are scored against, the task).

    A release holds training (labelsTr) and validation (labelsVa) labels: the reference set is the split(s) that hold
    predicted cases, and ``task=None`` takes the task of the predictions (2 when any MRI case is predicted, else 1;
    a task-2 submission that lacks every MRI case is only caught with ``task=2``: its MRI cases are then missing).
    A labels folder is the reference set as given (``task=None``: every case in it). Task 1 scores the CT cases,
    task 2 the CT and MRI cases; the choice is printed."""
    splits = [os.path.join(gt_dir, f) for f in ("labelsTr", "labelsVa") if os.path.isdir(os.path.join(gt_dir, f))]
    chosen, names = {}, []
    for folder in splits:
        cases = {c: p for c, p in refs.items() if os.path.dirname(p) == folder}
        if set(cases) & set(preds):
            chosen.update(cases)
            names.append(os.path.basename(folder))
    # a release: the task of the predictions; a labels folder (or no split with a predicted case): every reference
    inferred_from = "the predictions" if chosen else "the references"
    if not chosen:
        chosen, names = refs, [os.path.basename(os.path.normpath(gt_dir))]
    if task is None:
        has_mri = any(not is_ct(c) for c in (preds if inferred_from == "the predictions" else chosen))
        task = 2 if has_mri else 1
        how = f"task {task} inferred from {inferred_from}"
        if task == 1 and inferred_from == "the predictions":
            how += " (no MRI case predicted; pass --task 2 to score them as a task-2 submission)"
    else:
        check_task(task)
        how = f"task {task}"
    chosen = {c: p for c, p in chosen.items() if in_task(c, task)}
    if not chosen:
        raise ChallengeError(f"no AMOS22 reference label of task {task} in {gt_dir}")
    modalities = "CT cases" if task == 1 else "CT and MRI cases"
    print(f"reference: {', '.join(names)} of {gt_dir}, {len(chosen)} {modalities}: {how}")
    return chosen, task


def evaluate(pred: str, gt_dir: str, tolerance_mm: float = DEFAULT_TOLERANCE_MM, out_dir: str | None = None,
             num_processes: int = 1, progress: bool = True, verbose: bool = True, missing: str = "error",
             allow_extra: bool = False, task: int | None = None) -> dict:
    """Evaluate AMOS22 predictions (a folder or the submission zip of ``amos_XXXX.nii.gz``) against labels.

    ``task``: 1 (CT cases) or 2 (CT and MRI cases) of the reference split(s); None infers it (see
    :func:`reference_set`).

    ``missing`` / ``allow_extra``: see :func:`nnunet_plugins.evaluation.common.match_cases`. The prediction's
    geometry must be the reference's (the organisers' code was not available, so there is no official behaviour to
    follow here)."""
    refs = reference_labels(gt_dir)
    out_dir = output_folder(out_dir, pred)
    with opened_predictions(pred) as folder:
        folder = unwrap(folder, lambda f: any(CASE_PATTERN.match(s) for s in list_images(f, (".nii.gz",))))
        preds = {s: p for s, p in list_images(folder, (".nii.gz",)).items() if CASE_PATTERN.match(s)}
        if not preds:
            raise ChallengeError(f"no AMOS22 predictions (amos_XXXX.nii.gz) in {pred}")
        refs, task = reference_set(gt_dir, refs, preds, task)
        pairs, notes = match_cases(refs, preds, pred, missing, allow_extra)
        items = [(c, {"case": c, "prediction": p, "reference": refs[c], "tolerance_mm": tolerance_mm})
                 for c, p in pairs]
        meta = {"task": task, "tolerance_mm": tolerance_mm, "predictions": os.path.abspath(pred),
                "ground_truth": os.path.abspath(gt_dir), **notes}
        return run_evaluation("amos22", "AMOS22", evaluate_case, items, METRICS, STRUCTURES, out_dir, meta,
                              num_processes, progress, verbose)
