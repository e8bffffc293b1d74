"""MyoPS2020 evaluation: Dice of the scar (2221) and of edema + scar (1220 or 2221), per case (3-D).

The challenge's metric definitions; its evaluation code was not available to us, so where both masks are empty
we score 1 (the convention of the other evaluations here) and note it; one empty -> 0.

Predictions: the exported submission (original values, ``<case>_seg.nii.gz``) or nnU-Net's predictions (0-5);
references: ``train25_myops_gd`` (``<case>_gd.nii.gz``, original values) or nnU-Net labels. ``labels='auto'``
recognises the value convention of each file by its values.
"""
from __future__ import annotations

import os
import re

import numpy as np

from nnunet_plugins.dataset_conversion.common import (CaseError, ChallengeError, Geometry, list_images, read_sitk,
                                                      size_message)
from nnunet_plugins.dataset_conversion.myops2020 import EDEMA, FROM_NNUNET, LABEL_FOLDER, SCAR, TO_NNUNET, remap
from nnunet_plugins.evaluation.common import check_prediction_geometry, dice, match_cases, output_folder, run_evaluation

METRICS = ("Dice",)
STRUCTURES = ("scar", "edema_scar")
_SUFFIX = re.compile(r"_(seg|gd|pred|label)$")


def to_original(case: str, path: str, arr: np.ndarray, labels: str) -> np.ndarray:
    values = set(np.unique(arr).tolist())
    if labels == "auto":
        labels = "original" if values & (set(TO_NNUNET) - {0}) else "nnunet"
    allowed = set(TO_NNUNET) if labels == "original" else set(FROM_NNUNET)
    bad = sorted(values - allowed)
    if bad:
        raise CaseError(case, path, f"label values {bad} are not MyoPS {labels} values {sorted(allowed)}")
    return arr if labels == "original" else remap(arr, FROM_NNUNET, np.uint16)


def evaluate_case(case: str, prediction: str | None, reference: str, labels: str) -> list:
    """Metrics of one case; ``prediction=None`` scores an empty prediction."""
    import SimpleITK as sitk
    ref_img = read_sitk(case, reference, "reference label")
    ref = to_original(case, reference, sitk.GetArrayFromImage(ref_img), labels)
    if prediction is None:
        pred = np.zeros_like(ref)
    else:
        pred_img = read_sitk(case, prediction, "prediction")
        check_prediction_geometry(case, reference, Geometry.of(ref_img), prediction, Geometry.of(pred_img))
        pred = to_original(case, prediction, sitk.GetArrayFromImage(pred_img), labels)
    if pred.shape != ref.shape:
        raise CaseError(case, prediction, size_message("prediction", pred.shape, "reference", ref.shape))
    return [{"case": case,
             "Dice_scar": dice(pred == SCAR, ref == SCAR),
             "Dice_edema_scar": dice(np.isin(pred, (EDEMA, SCAR)), np.isin(ref, (EDEMA, SCAR))),
             "scar_empty_in_both": bool(not (pred == SCAR).any() and not (ref == SCAR).any())}]


def _by_case(folder: str) -> dict:
    return {_SUFFIX.sub("", stem): path for stem, path in list_images(folder, (".nii.gz",)).items()}


def evaluate(pred_dir: str, gt_dir: str, labels: str = "auto", out_dir: str | None = None, num_processes: int = 1,
             progress: bool = True, verbose: bool = True, missing: str = "error", allow_extra: bool = False) -> dict:
    """Evaluate MyoPS2020 predictions against ``gt_dir`` (``missing`` / ``allow_extra``: see
    :func:`nnunet_plugins.evaluation.common.match_cases`; the prediction's geometry must be the reference's: the
    organisers' code was not available, so there is no official behaviour to follow)."""
    if labels not in ("auto", "original", "nnunet"):
        raise ChallengeError(f"labels must be auto, original or nnunet, got {labels!r}")
    gt_folder = os.path.join(gt_dir, LABEL_FOLDER) if os.path.isdir(os.path.join(gt_dir, LABEL_FOLDER)) else gt_dir
    out_dir = output_folder(out_dir, pred_dir)
    refs = _by_case(gt_folder)
    pairs, notes = match_cases(refs, _by_case(pred_dir), pred_dir, missing, allow_extra)
    items = [(c, {"case": c, "prediction": p, "reference": refs[c], "labels": labels}) for c, p in pairs]
    meta = {"predictions": os.path.abspath(pred_dir), "ground_truth": os.path.abspath(gt_dir),
            "empty_rule": "both masks empty -> Dice 1", **notes}
    return run_evaluation("myops2020", "MyoPS2020", evaluate_case, items, METRICS, STRUCTURES, out_dir, meta,
                          num_processes, progress, verbose)
