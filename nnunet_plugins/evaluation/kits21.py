"""KiTS21 evaluation: Dice and Surface Dice of the hierarchical evaluation classes (HECs).

As the official ``kits21/evaluation/metrics.py``: the HECs kidney_and_mass (1, 2, 3), mass (2, 3) and tumor (2);
Dice; Surface Dice (surfel definition, :mod:`nnunet_plugins.evaluation.surface`) with the HEC's tolerance
(:data:`nnunet_plugins.dataset_conversion.kits21.SD_TOLERANCES_MM`, or the older revision's with
``tolerances="older"``); both masks empty -> 1 and 1, exactly one empty -> 0 and 0; spacing from the prediction.

References: against the majority vote (``aggregated_MAJ_seg.nii.gz``; or a flat folder of label files), and
against the annotation samples (``segmentation_samples/group_*/*.nii.gz``; the metrics are averaged over all
samples of all groups, the official test-set procedure) when they are present.

Differences from the official code, all where it cannot run: a shape mismatch between prediction and reference
raises an error naming the case (the official shape assertion never fails and numpy then errors), and the
samples reference is skipped with a note for cases without samples instead of aborting the whole run.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from nnunet_plugins.dataset_conversion.common import (CaseError, ChallengeError, Geometry, list_images, read_sitk,
                                                      size_message)
from nnunet_plugins.dataset_conversion.kits21 import (HEC_LABELS, LABEL_FILES, SAMPLES_FOLDER, TOLERANCE_REVISIONS,
                                                      find_case_folders)
from nnunet_plugins.evaluation.common import check_prediction_geometry, dice, match_cases, output_folder, run_evaluation
from nnunet_plugins.evaluation.surface import compute_surface_distances, surface_dice_from_distances

METRICS = ("Dice", "SD")
STRUCTURES = tuple(HEC_LABELS)


def hec_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerances: dict) -> dict:
    """{Dice_<hec>, SD_<hec>} of one prediction against one reference label array."""
    out = {}
    for hec, labels in HEC_LABELS.items():
        p = np.isin(pred, labels)
        r = np.isin(ref, labels)
        p_empty, r_empty = not p.any(), not r.any()
        if p_empty and r_empty:
            d, sd = 1.0, 1.0
        elif p_empty or r_empty:
            d, sd = 0.0, 0.0
        else:
            d = dice(p, r)
            sd = surface_dice_from_distances(compute_surface_distances(r, p, spacing), tolerances[hec])
        out[f"Dice_{hec}"], out[f"SD_{hec}"] = d, sd
    return out


def _array(case, path, what):
    import SimpleITK as sitk
    img = read_sitk(case, path, what)
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[::-1]), Geometry.of(img)


def evaluate_case(case: str, prediction: str | None, majority: str | None, samples: list, tolerances: dict,
                  ignore_geometry: bool = False) -> list:
    """Metrics of one case against its references; ``prediction=None`` scores an empty prediction."""
    pred = spacing = geometry = None
    if prediction is not None:
        pred, spacing, geometry = _array(case, prediction, "prediction")
    rows = []
    refs = []
    if majority:
        refs.append(("majority", [majority]))
    if samples:
        refs.append(("samples", samples))
    for kind, files in refs:
        per_file = []
        for f in files:
            ref, ref_spacing, ref_geometry = _array(case, f, "reference label")
            if pred is None:
                pred, spacing = np.zeros_like(ref), ref_spacing
            elif geometry is not None:
                check_prediction_geometry(case, f, ref_geometry, prediction, geometry, ignore_geometry)
            if ref.shape != pred.shape:
                raise CaseError(case, prediction,
                                size_message("prediction", pred.shape, f"reference {f}", ref.shape))
            per_file.append(hec_metrics(pred, ref, spacing, tolerances))
        row = {"case": case, "reference": kind, "num_references": len(files)}
        for key in per_file[0]:
            row[key] = float(np.mean([m[key] for m in per_file]))
        rows.append(row)
    return rows


def reference_cases(gt_dir: str) -> list:
    """The case ids of a KiTS21 release or a flat folder of ``case_XXXXX`` label files."""
    try:
        return find_case_folders(gt_dir)[1]
    except ChallengeError:
        cases = sorted(list_images(gt_dir))
    if not cases:
        raise ChallengeError(f"no KiTS21 references in {gt_dir}: expected case_XXXXX folders or label files")
    return cases


def references(gt_dir: str, case: str, reference: str) -> tuple[str | None, list]:
    """(majority-vote file or None, sample files) of ``case`` in a KiTS21 release or a flat label folder."""
    try:
        data_dir, _ = find_case_folders(gt_dir)
    except ChallengeError:
        data_dir = None
    if data_dir is not None:
        cdir = os.path.join(data_dir, case)
        if not os.path.isdir(cdir):
            raise CaseError(case, cdir, "no such case in the reference release")
        majority = os.path.join(cdir, LABEL_FILES["majority"])
        samples = sorted(glob.glob(os.path.join(cdir, SAMPLES_FOLDER, "group*", "*.nii.gz")))
    else:
        flat = list_images(gt_dir)
        if case not in flat:
            raise CaseError(case, os.path.join(gt_dir, f"{case}.nii.gz"), "missing reference segmentation")
        majority, samples = flat[case], []
    if reference == "majority":
        samples = []
    if reference == "samples":
        if not samples:
            raise CaseError(case, os.path.join(gt_dir, case, SAMPLES_FOLDER),
                            "no segmentation samples (run the challenge's sample_segmentations.py)")
        majority = None
    if majority is not None and not os.path.isfile(majority):
        raise CaseError(case, majority, "missing majority-vote segmentation")
    return majority, samples


def evaluate(pred_dir: str, gt_dir: str, reference: str = "both", tolerances: str = "final",
             out_dir: str | None = None, num_processes: int = 1, progress: bool = True, verbose: bool = True,
             missing: str = "error", allow_extra: bool = False, ignore_geometry: bool = False) -> dict:
    """Evaluate KiTS21 predictions (``case_XXXXX.nii.gz``, labels 1-3) against ``gt_dir``.

    ``reference``: ``majority``, ``samples`` or ``both`` (majority vote, plus the samples where present).
    ``missing`` / ``allow_extra``: see :func:`nnunet_plugins.evaluation.common.match_cases`. ``ignore_geometry``:
    score predictions whose geometry differs from the reference's, as the official code does (it uses the
    prediction's spacing and never compares the geometry).
    """
    if reference not in ("majority", "samples", "both"):
        raise ChallengeError(f"reference must be majority, samples or both, got {reference!r}")
    if tolerances not in TOLERANCE_REVISIONS:
        raise ChallengeError(f"tolerances must be one of {sorted(TOLERANCE_REVISIONS)}, got {tolerances!r}")
    revision, tol = TOLERANCE_REVISIONS[tolerances]
    out_dir = output_folder(out_dir, pred_dir)
    preds = list_images(pred_dir, (".nii.gz", ".mha"))
    pairs, notes = match_cases({c: c for c in reference_cases(gt_dir)}, preds, pred_dir, missing, allow_extra)
    items = []
    for case, path in pairs:
        majority, samples = references(gt_dir, case, reference)
        items.append((case, {"case": case, "prediction": path, "majority": majority, "samples": samples,
                             "tolerances": tol, "ignore_geometry": ignore_geometry}))
    meta = {"tolerance_revision": revision, "tolerances_mm": tol, "reference": reference,
            "predictions": os.path.abspath(pred_dir), "ground_truth": os.path.abspath(gt_dir),
            "ignore_geometry": ignore_geometry, **notes}
    return run_evaluation("kits21", "KiTS21", evaluate_case, items, METRICS, STRUCTURES, out_dir, meta,
                          num_processes, progress, verbose, group_by="reference",
                          extra_lines=[f"tolerances: {revision}"])
