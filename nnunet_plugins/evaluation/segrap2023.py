"""SegRap2023 evaluation: DSC and NSD per organ (task 1, 45 OARs) or per GTV (task 2).

As the official ``Eval/SegRap_Task00{1,2}_DSC_NSD_Eval.py``: every structure is a binary mask (``> 0``);
reference empty and prediction empty -> DSC 1, NSD 1; reference empty, prediction not -> 0, 0; otherwise DSC
and the surface Dice (surfel definition) at the structure's tolerance (1 mm; Larynx 2 mm; OralCavity 3 mm),
spacing from the reference; per-case values rounded to 4 decimals as the official script writes them
(``round_decimals=None`` keeps full precision).

Predictions may be the validation layout (``<case>/<Organ>.nii.gz``, a folder or its zip), label maps (nnU-Net's
output: the 54-class map of task 1 is decoded with the organisers' table), or the test-phase 4-D .mha files.
References: the release (``segrap_XXXX/<Organ>.nii.gz``), the same per-case layout, or label maps.
"""
from __future__ import annotations

import os

import numpy as np

from nnunet_plugins.dataset_conversion.common import (CaseError, ChallengeError, Geometry, list_images, read_sitk,
                                                      size_message)
from nnunet_plugins.dataset_conversion.segrap2023 import (GC_OUTPUTS, NSD_TOLERANCE_MM, STRUCTURES, TRAINING_FOLDER,
                                                          _check_task, iter_decoded)
from nnunet_plugins.evaluation.common import (check_prediction_geometry, dice, match_cases, opened_predictions,
                                              output_folder, run_evaluation, unwrap)
from nnunet_plugins.evaluation.surface import compute_surface_distances, surface_dice_from_distances

METRICS = ("DSC", "NSD")


def structure_metrics(pred: np.ndarray, ref: np.ndarray, spacing, tolerance_mm: float) -> tuple[float, float]:
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    r_sum, p_sum = int(r.sum()), int(p.sum())
    if r_sum == 0 and p_sum == 0:
        return 1.0, 1.0
    if r_sum == 0:
        return 0.0, 0.0
    d = dice(p, r)
    nsd = surface_dice_from_distances(compute_surface_distances(r, p, spacing), tolerance_mm)
    return d, (0.0 if np.isnan(nsd) else nsd)


class Source:
    """Where the structures of one case come from: per-structure files, a label map, or a 4-D image."""

    def __init__(self, kind: str, path: str):
        self.kind, self.path = kind, path

    def structures(self, case: str, task: int, what: str):
        """Yield (structure, mask array, spacing in array order, file, 3-D geometry)."""
        import SimpleITK as sitk
        names = STRUCTURES[task]
        if self.kind == "files":
            for s in names:
                f = os.path.join(self.path, f"{s}.nii.gz")
                if not os.path.isfile(f):
                    raise CaseError(case, f, f"missing {what} mask of {s}")
                img = read_sitk(case, f, what)
                yield s, sitk.GetArrayFromImage(img), tuple(img.GetSpacing()[::-1]), f, Geometry.of(img)
        elif self.kind == "map":
            img = read_sitk(case, self.path, what)
            spacing, geometry = tuple(img.GetSpacing()[::-1]), Geometry.of(img)
            try:
                for s, m in iter_decoded(sitk.GetArrayFromImage(img), task):
                    yield s, m, spacing, self.path, geometry
            except ValueError as e:
                raise CaseError(case, self.path, str(e)) from None
        else:
            img = read_sitk(case, self.path, what)
            arr = sitk.GetArrayFromImage(img)
            if arr.ndim != 4 or arr.shape[0] != len(names):
                raise CaseError(case, self.path, f"expected a 4-D image with {len(names)} channels, got array "
                                                 f"shape {arr.shape}")
            spacing, geometry = tuple(img.GetSpacing()[:3][::-1]), Geometry.of(img).three_d()
            for i, s in enumerate(names):
                yield s, arr[i], spacing, self.path, geometry


def _is_four_d(path: str) -> bool:
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetDimension() == 4


def discover(folder: str, task: int) -> dict:
    """{case: Source} for a folder of per-case structure folders, label maps or 4-D images (or a release)."""
    first = STRUCTURES[task][0]
    sub = os.path.join(folder, TRAINING_FOLDER)
    if os.path.isdir(sub):
        folder = sub
    gc = os.path.join(folder, GC_OUTPUTS[task])
    if os.path.isdir(gc):
        folder = gc
    out = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            continue
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, f"{first}.nii.gz")):
            out[entry] = Source("files", path)
    if out:
        return out
    for stem, path in list_images(folder).items():
        out[stem] = Source("4d" if path.endswith(".mha") and _is_four_d(path) else "map", path)
    return out


def evaluate_case(case: str, prediction: Source | None, reference: Source, task: int, round_decimals: int | None,
                  ignore_geometry: bool = False) -> list:
    """Metrics of one case; ``prediction=None`` scores an empty prediction."""
    row = {"case": case}
    refs = reference.structures(case, task, "reference")
    preds = prediction.structures(case, task, "prediction") if prediction is not None else None
    for s, ref, spacing, ref_file, ref_geometry in refs:
        if preds is None:
            pred = np.zeros_like(ref)
        else:
            _, pred, _, pred_file, pred_geometry = next(preds)
            check_prediction_geometry(case, ref_file, ref_geometry, pred_file, pred_geometry, ignore_geometry)
        if ref.shape != pred.shape:
            raise CaseError(case, prediction.path,
                            f"{s}: " + size_message("prediction", pred.shape, "reference", ref.shape))
        d, nsd = structure_metrics(pred, ref, spacing, NSD_TOLERANCE_MM[s])
        if round_decimals is not None:
            d, nsd = round(d, round_decimals), round(nsd, round_decimals)
        row[f"DSC_{s}"], row[f"NSD_{s}"] = float(d), float(nsd)
    return [row]


def evaluate(pred: str, gt: str, task: int = 1, round_decimals: int | None = 4, out_dir: str | None = None,
             num_processes: int = 1, progress: bool = True, verbose: bool = True, missing: str = "error",
             allow_extra: bool = False, ignore_geometry: bool = False) -> dict:
    """Evaluate SegRap2023 predictions of ``task`` against references (see the module docstring). ``missing`` /
    ``allow_extra``: see :func:`nnunet_plugins.evaluation.common.match_cases`; ``ignore_geometry``: score
    predictions whose geometry differs from the reference's, as the official scripts do (they compare arrays and
    take the spacing of the reference)."""
    _check_task(task)
    refs = discover(gt, task)
    if not refs:
        raise ChallengeError(f"no SegRap2023 references in {gt}")
    out_dir = output_folder(out_dir, pred)
    with opened_predictions(pred) as folder:
        folder = unwrap(folder, lambda f: bool(discover(f, task)))
        preds = discover(folder, task)
        if not preds:
            raise ChallengeError(f"no SegRap2023 task {task} predictions in {pred}")
        pairs, notes = match_cases(refs, preds, pred, missing, allow_extra)
        items = [(c, {"case": c, "prediction": p, "reference": refs[c], "task": task,
                      "round_decimals": round_decimals, "ignore_geometry": ignore_geometry}) for c, p in pairs]
        structures = STRUCTURES[task]
        meta = {"task": task, "tolerances_mm": {s: NSD_TOLERANCE_MM[s] for s in structures},
                "round_decimals": round_decimals, "predictions": os.path.abspath(pred),
                "ground_truth": os.path.abspath(gt), "ignore_geometry": ignore_geometry, **notes}
        return run_evaluation(f"segrap2023_task{task}", f"SegRap2023 task {task}", evaluate_case, items, METRICS,
                              structures, out_dir, meta, num_processes, progress, verbose)
