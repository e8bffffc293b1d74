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

from nnunet_plugins.dataset_conversion.common import CaseError, ChallengeError, list_images, read_sitk
from nnunet_plugins.dataset_conversion.kits21 import (HEC_LABELS, LABEL_FILES, SAMPLES_FOLDER, TOLERANCE_REVISIONS,
                                                      find_case_folders)
from nnunet_plugins.evaluation.common import dice, format_summary, run_cases, summarize, write_results
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


def _array(case, path):
    import SimpleITK as sitk
    img = read_sitk(case, path)
    return sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[::-1])


def evaluate_case(case: str, prediction: str, majority: str | None, samples: list, tolerances: dict) -> list:
    pred, spacing = _array(case, prediction)
    rows = []
    refs = []
    if majority:
        refs.append(("majority", [majority]))
    if samples:
        refs.append(("samples", samples))
    for kind, files in refs:
        per_file = []
        for f in files:
            ref, _ = _array(case, f)
            if ref.shape != pred.shape:
                raise CaseError(case, prediction, f"shape {pred.shape} differs from the reference {f} {ref.shape}")
            per_file.append(hec_metrics(pred, ref, spacing, tolerances))
        row = {"case": case, "reference": kind, "num_references": len(files)}
        for key in per_file[0]:
            row[key] = float(np.mean([m[key] for m in per_file]))
        rows.append(row)
    return rows


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
             out_dir: str | None = None, num_processes: int = 1, progress: bool = True, verbose: bool = True) -> dict:
    """Evaluate KiTS21 predictions (``case_XXXXX.nii.gz``, labels 1-3) against ``gt_dir``.

    ``reference``: ``majority``, ``samples`` or ``both`` (majority vote, plus the samples where present).
    """
    if reference not in ("majority", "samples", "both"):
        raise ChallengeError(f"reference must be majority, samples or both, got {reference!r}")
    if tolerances not in TOLERANCE_REVISIONS:
        raise ChallengeError(f"tolerances must be one of {sorted(TOLERANCE_REVISIONS)}, got {tolerances!r}")
    revision, tol = TOLERANCE_REVISIONS[tolerances]
    preds = list_images(pred_dir, (".nii.gz", ".mha"))
    if not preds:
        raise ChallengeError(f"no predictions (case_XXXXX.nii.gz) in {pred_dir}")
    items = []
    for case, path in preds.items():
        majority, samples = references(gt_dir, case, reference)
        items.append((case, {"case": case, "prediction": path, "majority": majority, "samples": samples,
                             "tolerances": tol}))
    rows = run_cases(f"{__name__}:evaluate_case", items, num_processes, "evaluating KiTS21", progress)
    summary = summarize(rows, METRICS, STRUCTURES, group_by="reference")
    meta = {"tolerance_revision": revision, "tolerances_mm": tol, "reference": reference,
            "predictions": os.path.abspath(pred_dir), "ground_truth": os.path.abspath(gt_dir)}
    paths = write_results("kits21", rows, summary, out_dir or pred_dir, meta)
    if verbose:
        print(format_summary("KiTS21", summary, METRICS, STRUCTURES))
        print(f"tolerances: {revision}")
        print(f"tables: {paths['per_case_csv']}, {paths['summary_csv']}, {paths['json']}")
    return {"rows": rows, "summary": summary, "files": paths, **meta}
