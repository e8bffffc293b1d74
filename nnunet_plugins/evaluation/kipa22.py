"""KiPA22 evaluation: DSC, HD and AVD of renal vein, kidney, renal artery and tumour.

As the official ``EVALUATION/evaluation.py``:

* DSC on the original grid, ``2|A and B| / (|A| + |B|)`` (both empty gives 0/0 = nan there, and here);
* HD and AVD (average Hausdorff distance: mean of the two directed mean distances) between the contour voxels
  (foreground voxels with a background voxel among their 26 neighbours) after nearest-neighbour resampling of
  both label maps to 1 mm voxels: grid size ``round(size * spacing)``, origin and direction of the image;
* a structure missing from the prediction (empty contour) is scored with the six faces of the resampled image
  as its contour, i.e. a large penalty.

Where the official code is wrong we differ by default and reproduce it with ``official_spacing_bug=True``:

* it overwrites the prediction's spacing with ``(sx, sx, sx)`` (the first spacing value on all three axes)
  before resampling it, so for anisotropic images the prediction is resampled from a wrongly scaled grid and no
  longer overlays the reference; we resample the prediction on the reference's grid.
* a structure missing from the reference makes the official script crash (a string is stored into a float
  array); we report nan for its HD and AVD.
"""
from __future__ import annotations

import os

import numpy as np

from nnunet_plugins.dataset_conversion.common import CaseError, Geometry, list_images, read_sitk, size_message
from nnunet_plugins.dataset_conversion.kipa22 import STRUCTURES as STRUCTURE_NAMES
from nnunet_plugins.dataset_conversion.kipa22 import original_name
from nnunet_plugins.evaluation.common import check_prediction_geometry, match_cases, output_folder, run_evaluation
from nnunet_plugins.evaluation.surface import contour_voxels, hausdorff_and_average

METRICS = ("DSC", "HD", "AVD")
STRUCTURES = tuple(STRUCTURE_NAMES.values())
LABEL_VALUES = tuple(STRUCTURE_NAMES)


def official_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    a = int(np.logical_and(pred, ref).sum())
    total = int(pred.sum()) + int(ref.sum())
    return 2.0 * a / total if total else float("nan")


def resample_to_1mm(image, reference=None):
    """Nearest-neighbour resampling to 1 mm voxels on ``reference``'s (default: the image's own) origin and
    direction, grid size ``round(size * spacing)`` of ``reference`` (the official grid)."""
    import SimpleITK as sitk
    reference = reference if reference is not None else image
    size = [int(round(n * s)) for n, s in zip(reference.GetSize(), reference.GetSpacing())]
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(reference)
    f.SetSize(size)
    f.SetOutputSpacing([1.0, 1.0, 1.0])
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    return f.Execute(image)


def image_border(shape) -> np.ndarray:
    border = np.zeros(shape, dtype=bool)
    for axis in range(len(shape)):
        index = [slice(None)] * len(shape)
        for end in (0, -1):
            index[axis] = end
            border[tuple(index)] = True
    return border


def distance_metrics(pred_1mm: np.ndarray, ref_1mm: np.ndarray) -> dict:
    """{HD_<s>, AVD_<s>} from label maps on the 1 mm grid (official missing-structure rule)."""
    out = {}
    border = None
    for value, name in zip(LABEL_VALUES, STRUCTURES):
        pred_contour = contour_voxels(pred_1mm == value)
        ref_contour = contour_voxels(ref_1mm == value)
        if not ref_contour.any():
            hd = avd = float("nan")   # the official script crashes here
        else:
            if not pred_contour.any():
                border = image_border(pred_1mm.shape) if border is None else border
                pred_contour = border
            hd, avd = hausdorff_and_average(pred_contour, ref_contour)
        out[f"HD_{name}"], out[f"AVD_{name}"] = hd, avd
    return out


def evaluate_case(case: str, prediction: str | None, reference: str, official_spacing_bug: bool,
                  ignore_geometry: bool = False) -> list:
    """Metrics of one case; ``prediction=None`` scores an empty prediction."""
    import SimpleITK as sitk
    ref_img = read_sitk(case, reference, "reference label")
    if prediction is None:
        pred_img = sitk.Image(ref_img.GetSize(), ref_img.GetPixelID())
        pred_img.CopyInformation(ref_img)
    else:
        pred_img = read_sitk(case, prediction, "prediction")
        check_prediction_geometry(case, reference, Geometry.of(ref_img), prediction, Geometry.of(pred_img),
                                  ignore_geometry)
    ref = sitk.GetArrayFromImage(ref_img)
    pred = sitk.GetArrayFromImage(pred_img)
    if ref.shape != pred.shape:
        raise CaseError(case, prediction, size_message("prediction", pred.shape, "reference", ref.shape))
    row = {"case": case}
    for value, name in zip(LABEL_VALUES, STRUCTURES):
        row[f"DSC_{name}"] = official_dice(pred == value, ref == value)
    ref_1mm = sitk.GetArrayFromImage(resample_to_1mm(ref_img))
    if official_spacing_bug:
        s = ref_img.GetSpacing()[0]
        pred_img.SetSpacing([s, s, s])
        pred_1mm = sitk.GetArrayFromImage(resample_to_1mm(pred_img, _with_size(pred_img, ref_img)))
    else:
        if ignore_geometry:
            # The official script resamples each image with its own geometry onto a grid of that same geometry,
            # so only the prediction's voxel array counts: score that array on the reference's grid.
            pred_img.CopyInformation(ref_img)
        pred_1mm = sitk.GetArrayFromImage(resample_to_1mm(pred_img, ref_img))
    row.update(distance_metrics(pred_1mm, ref_1mm))
    return [{k: row[k] for k in ["case"] + [f"{m}_{s}" for m in METRICS for s in STRUCTURES]}]


def _with_size(image, size_from):
    """``image``'s geometry with the size and spacing that set the official output grid (those of the
    reference): the official script resamples the prediction with its own origin and direction but the
    reference's grid size."""
    import SimpleITK as sitk
    proxy = sitk.Image(list(size_from.GetSize()), sitk.sitkUInt8)
    proxy.SetSpacing(size_from.GetSpacing())
    proxy.SetOrigin(image.GetOrigin())
    proxy.SetDirection(image.GetDirection())
    return proxy


def evaluate(pred_dir: str, gt_dir: str, official_spacing_bug: bool = False, out_dir: str | None = None,
             num_processes: int = 1, progress: bool = True, verbose: bool = True, missing: str = "error",
             allow_extra: bool = False, ignore_geometry: bool = False) -> dict:
    """Evaluate KiPA22 predictions (``N.nii.gz`` or nnU-Net's ``KiPA_N.nii.gz``) against ``gt_dir`` (e.g. the
    release's train/label folder, or the release itself). ``missing`` / ``allow_extra``: see
    :func:`nnunet_plugins.evaluation.common.match_cases`; ``ignore_geometry``: score predictions whose geometry
    differs from the reference's, as the official script does (it resamples each image with its own geometry, so
    the prediction's voxel array is scored as if it had the reference's geometry: DSC, HD and AVD alike)."""
    gt_folder = os.path.join(gt_dir, "train", "label") if os.path.isdir(os.path.join(gt_dir, "train", "label")) \
        else gt_dir
    out_dir = output_folder(out_dir, pred_dir)
    refs = {original_name(k): v for k, v in list_images(gt_folder, (".nii.gz",)).items()}
    preds = {original_name(k): v for k, v in list_images(pred_dir, (".nii.gz",)).items()}
    pairs, notes = match_cases(refs, preds, pred_dir, missing, allow_extra)
    items = [(c, {"case": c, "prediction": p, "reference": refs[c], "official_spacing_bug": official_spacing_bug,
                  "ignore_geometry": ignore_geometry}) for c, p in pairs]
    meta = {"official_spacing_bug": official_spacing_bug, "predictions": os.path.abspath(pred_dir),
            "ground_truth": os.path.abspath(gt_dir), "ignore_geometry": ignore_geometry, **notes}
    return run_evaluation("kipa22", "KiPA22", evaluate_case, items, METRICS, STRUCTURES, out_dir, meta,
                          num_processes, progress, verbose)
