"""The semi-supervised papers' protocol metrics for any prediction folder: Dice, Jaccard, HD95 and ASD (mm).

LeFeD, VerSemi and the MC-Net / UA-MT line of work report, per case and averaged over cases, the four
metrics of ``medpy.metric.binary`` (``dc``, ``jc``, ``hd95``, ``asd``) called as ``metric(pred, gt)``. They
are reproduced here, vectorised and without medpy (a test-only dependency that checks them):

* surface (border) voxels of a mask: foreground voxels with a background voxel among their 6 face
  neighbours, voxels outside the image counting as background (medpy: ``mask ^ binary_erosion(mask,
  connectivity 1)``);
* distances in mm from the border voxels of one mask to the nearest border voxel of the other (exact
  Euclidean distance transform with the voxel spacing, :func:`nnunet_plugins.evaluation.surface.directed_contour_distances`);
* **HD95**: the 95th percentile (NumPy's linear interpolation) of both directed distance sets together;
* **ASD**: the mean distance from the PREDICTION's border to the reference's border (medpy's ``asd(pred, gt)``
  is directed; ``assd`` would be symmetric). This is what the papers' ``test_util.py`` computes.

Empty masks (medpy raises an error; the papers' scripts score a case with an empty prediction 0 on all four
metrics, which rewards empty predictions on HD95/ASD). Here, per label:

* reference and prediction both empty: Dice = Jaccard = 1, HD95 = ASD = 0 (a perfect answer);
* exactly one empty: Dice = Jaccard = 0, HD95 = ASD = nan (undefined); nan values are left out of the means
  and counted in the summary's ``nan_cases``.

Labels are evaluated one at a time (``label == value``); with ``--labels`` a region may also be a union
(``1,2``). Without ``--labels`` every non-zero value found in any reference or prediction is evaluated, and a
case where a label appears in neither file scores as "both empty".
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from nnunet_plugins.atomic import write_json
from nnunet_plugins.evaluation.common import format_summary, run_cases, summarize
from nnunet_plugins.evaluation.surface import directed_contour_distances

METRICS = ("dice", "jaccard", "hd95", "asd")
Region = Tuple[int, ...]


def border_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour (outside the image counts as background)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop(pred: np.ndarray, gt: np.ndarray):
    """Both masks cut to the bounding box of their union grown by one voxel (clamped to the image): the
    border voxels and distances are those of the full image, at a fraction of the cost."""
    union = pred | gt
    slices = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        slices.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, union.shape[axis])))
    return pred[tuple(slices)], gt[tuple(slices)]


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """Dice, Jaccard, HD95 (mm) and ASD (mm, prediction -> reference) of two boolean masks of one shape;
    ``spacing`` in the arrays' axis order. Empty-mask conventions: see the module docstring."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"masks differ in shape: prediction {pred.shape}, reference {gt.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not fit {pred.ndim}-D masks")
    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    inter = int(np.logical_and(pred, gt).sum())
    out = {"dice": 2.0 * inter / (n_pred + n_gt), "jaccard": inter / (n_pred + n_gt - inter)}
    if n_pred == 0 or n_gt == 0:
        return {**out, "hd95": float("nan"), "asd": float("nan")}
    p, g = _crop(pred, gt)
    bp, bg = border_voxels(p), border_voxels(g)
    d_pg = directed_contour_distances(bp, bg, spacing)
    d_gp = directed_contour_distances(bg, bp, spacing)
    out["hd95"] = float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    out["asd"] = float(d_pg.mean())
    return out


def region_name(region: Region) -> str:
    return "+".join(str(v) for v in region)


def parse_regions(text: Optional[Sequence[str]]) -> Optional[List[Region]]:
    """``["1", "2", "1,2"]`` -> [(1,), (2,), (1, 2)]; None stays None (all labels found)."""
    if not text:
        return None
    regions = []
    for item in text:
        try:
            region = tuple(int(v) for v in str(item).split(","))
        except ValueError:
            raise ValueError(f"--labels takes label values or comma-joined unions (e.g. 1 2 1,2), got {item!r}")
        if any(v <= 0 for v in region):
            raise ValueError(f"label values must be positive (0 is background), got {item!r}")
        regions.append(region)
    return regions


def _read_seg(path: str, reader_class) -> Tuple[np.ndarray, Tuple[float, ...]]:
    seg, props = reader_class().read_seg(path)
    return np.asarray(seg[0]), tuple(float(s) for s in props["spacing"])


def evaluate_case(case: str, pred_path: str, gt_path: str, regions: Optional[List[Region]], reader) \
        -> List[dict]:
    """One case's row: ``{"case", "dice_<label>", ..., "labels_found"}`` (geometry errors name the files);
    ``reader`` is an nnU-Net reader/writer class."""
    gt, spacing = _read_seg(gt_path, reader)
    pred, pred_spacing = _read_seg(pred_path, reader)
    if pred.shape != gt.shape:
        raise ValueError(f"{case}: prediction {pred_path} has shape {pred.shape}, reference {gt_path} {gt.shape}")
    if not np.allclose(pred_spacing, spacing, rtol=1e-3, atol=1e-5):
        raise ValueError(f"{case}: prediction {pred_path} has spacing {pred_spacing}, reference {gt_path} {spacing}")
    found = sorted(int(v) for v in np.union1d(np.unique(gt), np.unique(pred)) if v != 0)
    row = {"case": case, "labels_found": found}
    for region in regions if regions is not None else [(v,) for v in found]:
        values = binary_metrics(np.isin(pred, region), np.isin(gt, region), spacing)
        row.update({f"{m}_{region_name(region)}": v for m, v in values.items()})
    return [row]


def _list_segmentations(folder: str, file_ending: str) -> Dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"not a folder: {folder}")
    return {f[: -len(file_ending)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(file_ending) and not f.startswith(".")}


def _guess_file_ending(folder: str) -> str:
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd", ".mhd", ".tif", ".tiff", ".png", ".bmp"):
        if any(f.endswith(ending) and not f.startswith(".") for f in os.listdir(folder)):
            return ending
    raise ValueError(f"no segmentation files found in {folder}")


def evaluate_folder(pred_dir: str, gt_dir: str, output: Optional[str] = None,
                    labels: Optional[Sequence[Union[str, int]]] = None, file_ending: Optional[str] = None,
                    num_processes: int = 1, progress: bool = True) -> dict:
    """Protocol metrics of every prediction in ``pred_dir`` against ``gt_dir`` (same file names; every
    reference must have a prediction). Writes ``output`` (default ``pred_dir/protocol_metrics.json``) with
    per-case rows and the summary (means per label and over labels). Returns that dict."""
    if not os.path.isdir(gt_dir):
        raise FileNotFoundError(f"reference folder not found: {gt_dir}")
    file_ending = file_ending or _guess_file_ending(gt_dir)
    gts = _list_segmentations(gt_dir, file_ending)
    preds = _list_segmentations(pred_dir, file_ending)
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise ValueError(f"{len(missing)} reference case(s) have no prediction in {pred_dir}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if not gts:
        raise ValueError(f"no reference segmentations ({file_ending}) in {gt_dir}")
    regions = parse_regions([str(v) for v in labels] if labels else None)
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    first = next(iter(gts.values()))
    reader = determine_reader_writer_from_file_ending(file_ending, first, allow_nonmatching_filename=True,
                                                      verbose=False)
    items = [(case, dict(case=case, pred_path=preds[case], gt_path=gts[case], regions=regions, reader=reader))
             for case in gts]
    rows = run_cases(evaluate_case, items, num_processes,
                     desc="protocol metrics", progress=progress)
    if regions is None:
        # a label found in some case only: the other cases had it in neither file ("both empty")
        regions = [(v,) for v in sorted({v for r in rows for v in r["labels_found"]})]
        empty = {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
        for r in rows:
            for region in regions:
                for m in METRICS:
                    r.setdefault(f"{m}_{region_name(region)}", empty[m])
    for r in rows:
        del r["labels_found"]
    names = [region_name(r) for r in regions]
    summary = summarize(rows, METRICS, names)["all"] if rows else {}
    result = {"metrics": list(METRICS), "labels": names, "prediction_folder": os.path.abspath(pred_dir),
              "reference_folder": os.path.abspath(gt_dir), "units": {"hd95": "mm", "asd": "mm"},
              "summary": summary, "per_case": rows}
    output = output or os.path.join(pred_dir, "protocol_metrics.json")
    write_json(_json_safe(result), output)
    result["output"] = output
    result["text"] = format_summary("protocol metrics", {"all": summary}, METRICS, names)
    return result


def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
