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

from nnunet_plugins.dataset_conversion.amos22 import CASE_PATTERN, LABELS, in_task
from nnunet_plugins.dataset_conversion.common import CaseError, ChallengeError, list_images, nifti_array, read_nifti
from nnunet_plugins.evaluation.common import (dice, format_summary, opened_predictions, run_cases, summarize, unwrap,
                                              write_results)
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


def evaluate_case(case: str, prediction: str, reference: str, tolerance_mm: float) -> list:
    ref_img = read_nifti(case, reference)
    pred_img = read_nifti(case, prediction)
    if tuple(ref_img.shape) != tuple(pred_img.shape):
        raise CaseError(case, prediction, f"shape {pred_img.shape} differs from the reference {ref_img.shape}")
    ref = np.asarray(nifti_array(case, reference, ref_img))
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


def evaluate(pred: str, gt_dir: str, tolerance_mm: float = DEFAULT_TOLERANCE_MM, out_dir: str | None = None,
             num_processes: int = 1, progress: bool = True, verbose: bool = True) -> dict:
    """Evaluate AMOS22 predictions (a folder or the submission zip of ``amos_XXXX.nii.gz``) against labels."""
    refs = reference_labels(gt_dir)
    with opened_predictions(pred) as folder:
        folder = unwrap(folder, lambda f: any(CASE_PATTERN.match(s) for s in list_images(f, (".nii.gz",))))
        preds = {s: p for s, p in list_images(folder, (".nii.gz",)).items() if CASE_PATTERN.match(s)}
        if not preds:
            raise ChallengeError(f"no AMOS22 predictions (amos_XXXX.nii.gz) in {pred}")
        missing = sorted(set(preds) - set(refs))
        if missing:
            raise ChallengeError(f"no reference label for {len(missing)} predicted case(s): {', '.join(missing)}")
        items = [(c, {"case": c, "prediction": p, "reference": refs[c], "tolerance_mm": tolerance_mm})
                 for c, p in preds.items()]
        rows = run_cases(f"{__name__}:evaluate_case", items, num_processes, "evaluating AMOS22", progress)
    summary = summarize(rows, METRICS, STRUCTURES)
    meta = {"tolerance_mm": tolerance_mm, "predictions": os.path.abspath(pred), "ground_truth": os.path.abspath(gt_dir)}
    default_out = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    paths = write_results("amos22", rows, summary, out_dir or default_out, meta)
    if verbose:
        print(format_summary("AMOS22", summary, METRICS, STRUCTURES))
        print(f"tables: {paths['per_case_csv']}, {paths['summary_csv']}, {paths['json']}")
    return {"rows": rows, "summary": summary, "files": paths, **meta}
