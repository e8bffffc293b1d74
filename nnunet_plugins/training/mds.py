"""MDS (Maximum Data Similarity) selection: the buffer of samples that MedSeqFT keeps from every stage.

MedSeqFT (Ye, Wu, Luo et al., 2025; no official code): every training sample of the new dataset D_t is run
through the INITIAL model M_0 and its self-supervised pre-training objective several times with
different random masks; the K samples with the lowest mean loss, the ones most like the pre-training
distribution, form the buffer B_t that later stages distil on.

* Scoring (:func:`mds_scores`): a case is scored on PATCHES at the plans' patch size, as the network
  sees data in training:

  - ``patches="centre"`` (default): one patch at the centre of the preprocessed case. Cost: ``R``
    forward passes per case whatever the case's size (a 3d_fullres CT holds tens of patches); the
    centre of nnU-Net's preprocessed case (cropped to the non-zero region) lies in the body, whose
    appearance is what sets datasets apart.
  - ``patches="sliding"``: tiles covering the whole case at ``step`` (a fraction of the patch, as
    nnU-Net's ``tile_step_size``; default 1.0: non-overlapping tiles, the last one shifted to end at the
    border, nnU-Net's ``compute_steps_for_sliding_window``). The whole case counts, at ``tiles x R``
    forward passes.

  A case smaller than the patch is zero-padded (centred); padded voxels are never scored. A 2-D patch on
  a 3-D case (nnU-Net's ``2d`` configuration) scores axial slices: the centre slice (``"centre"``) or
  every slice (``"sliding"``).
* Score: run ``r`` masks every patch of the case with a fresh random cube mask (:class:`~nnunet_plugins.
  training.masked_reconstruction.MaskedReconstruction`); its loss is the mean error over the masked
  voxels of all the case's patches; the case's score is the mean of the ``R`` runs' losses.
* Reproducibility: each case draws its masks from a generator seeded with ``crc32("{seed}:{case id}")``,
  so a case's score depends on the seed and the case only, not on the order of the cases, on the other
  cases, or on ``batch_size`` (every patch's mask is drawn on its own; only float rounding of batched
  convolutions may differ). The model runs in eval mode under ``torch.no_grad`` (its mode is restored).
* Selection (:func:`select_lowest`): the K lowest scores, ties broken by case id (string order). K
  larger than the number of cases keeps ALL cases (a small dataset in the stream must not stop the
  sequence; the record keeps the K asked for, so the shortfall is visible). K < 1 is an error. A
  non-finite score is an error naming the case (a broken case or model, never a "best" sample).
* Buffer record (:func:`buffer_record`, :func:`write_buffer`, :func:`read_buffer`): JSON with the
  stage, the selected case ids (lowest score first), all scores, R, K, the seed and the objective's
  settings, written atomically (:mod:`nnunet_plugins.atomic`).
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import asdict
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from nnunet_plugins.atomic import write_json
from nnunet_plugins.training.masked_reconstruction import MaskedReconstruction, masked_error_sums

__all__ = ["case_patches", "mds_scores", "select_lowest", "buffer_record", "write_buffer", "read_buffer",
           "preprocessed_images", "PATCH_MODES"]

PATCH_MODES = ("centre", "sliding")
_RECORD_KEYS = ("stage", "case_ids", "scores", "repeats", "k", "seed")


def _starts(size: int, tile: int, step: float, mode: str) -> List[int]:
    if mode == "centre":
        return [(size - tile) // 2]
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    return compute_steps_for_sliding_window((size,), (tile,), step)[0]


def case_patches(image, patch_size: Sequence[int], mode: str = "centre", step: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Patches of a preprocessed case ``image`` ``(C, *spatial)`` (array or tensor) at ``patch_size``:
    ``(patches (N, C, *patch), valid (N, 1, *patch) bool)``; ``valid`` is False on padding.
    See the module docstring for the modes."""
    if mode not in PATCH_MODES:
        raise ValueError(f"patches must be one of {PATCH_MODES}, got {mode!r}")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image).float()
    patch = tuple(int(p) for p in patch_size)
    if x.dim() == len(patch) + 2:            # 2-D configuration on a 3-D case: slices are the images
        x = x.movedim(1, 0)                   # (Z, C, Y, X)
        x = x[x.shape[0] // 2:x.shape[0] // 2 + 1] if mode == "centre" else x
    elif x.dim() == len(patch) + 1:
        x = x[None]
    else:
        raise ValueError(f"image of shape {tuple(x.shape)} does not fit a {len(patch)}-D patch {patch}")
    spatial = x.shape[2:]
    # zero-pad (centred) to at least the patch; remember which voxels are real
    pads = [max(p - s, 0) for s, p in zip(spatial, patch)]
    valid = torch.ones((x.shape[0], 1, *spatial), dtype=torch.bool)
    if any(pads):
        pad_arg = [v for d in reversed(pads) for v in (d // 2, d - d // 2)]
        x = torch.nn.functional.pad(x, pad_arg)
        valid = torch.nn.functional.pad(valid, pad_arg, value=False)
    starts = [_starts(s, p, step, mode) for s, p in zip(x.shape[2:], patch)]
    grids = torch.meshgrid(*[torch.tensor(s) for s in starts], indexing="ij")
    corners = torch.stack([g.flatten() for g in grids], 1).tolist()
    out_x, out_v = [], []
    for corner in corners:
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
        out_x.append(x[(slice(None), slice(None)) + window])
        out_v.append(valid[(slice(None), slice(None)) + window])
    return torch.cat(out_x), torch.cat(out_v)


def _case_generator(seed: int, case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{int(seed)}:{case_id}".encode()))


@torch.no_grad()
def _score_case(model: nn.Module, objective: MaskedReconstruction, case_id: str, patches: Tensor, valid: Tensor,
                repeats: int, seed: int, batch_size: int, device: torch.device) -> float:
    gen = _case_generator(seed, case_id)
    n = patches.shape[0]
    run_losses = []
    for r in range(repeats):
        sums, counts = 0.0, 0.0
        for start in range(0, n, batch_size):
            x = patches[start:start + batch_size]
            # one mask (and noise fill) per patch, drawn in order: scores do not depend on batch_size
            pairs = [objective.mask_input(x[i:i + 1], gen) for i in range(x.shape[0])]
            masked = torch.cat([p[0] for p in pairs]).to(device)
            mask = torch.cat([p[1] for p in pairs]).to(device) & valid[start:start + batch_size].to(device)
            s, c = masked_error_sums(model(masked), x.to(device), mask, objective.loss)
            sums, counts = sums + float(s.sum()), counts + float(c.sum())
        if counts == 0:
            raise ValueError(f"case {case_id!r}: run {r} masked no voxel inside the image (the case is much smaller "
                             f"than the patch); use smaller cubes")
        run_losses.append(sums / counts)
    score = float(np.mean(run_losses))
    if not math.isfinite(score):
        raise ValueError(f"case {case_id!r}: the reconstruction loss is {score} (check the case's intensities "
                         f"and the model)")
    return score


def mds_scores(model: nn.Module, cases: Iterable[Tuple[str, object]], patch_size: Sequence[int],
               objective: MaskedReconstruction | None = None, repeats: int = 5, seed: int = 0,
               patches: str = "centre", step: float = 1.0, batch_size: int = 2) -> Dict[str, float]:
    """Mean masked-reconstruction loss of every case under ``model`` (M_0 with its reconstruction head, e.g.
    a :class:`~nnunet_plugins.training.masked_reconstruction.ReconstructionNetwork`), over ``repeats``
    random masks. ``cases``: ``(case id, image (C, *spatial))`` pairs, e.g. :func:`preprocessed_images`.
    Returns ``{case id: score}`` in the order of ``cases``."""
    objective = objective or MaskedReconstruction()
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats (R) must be an int >= 1, got {repeats!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    scores: Dict[str, float] = {}
    try:
        for case_id, image in cases:
            case_id = str(case_id)
            if case_id in scores:
                raise ValueError(f"case {case_id!r} appears twice")
            x, valid = case_patches(image, patch_size, patches, step)
            scores[case_id] = _score_case(model, objective, case_id, x, valid, repeats, seed, batch_size, device)
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("mds_scores got no case")
    return scores


def select_lowest(scores: Mapping[str, float], k: int) -> List[str]:
    """The ``k`` case ids with the lowest scores, lowest first, ties broken by case id; all cases when
    ``k`` exceeds their number."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"K (buffer size) must be an int >= 1, got {k!r}")
    bad = [c for c, s in scores.items() if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"non-finite MDS score for case(s) {bad}")
    return sorted(scores, key=lambda c: (float(scores[c]), c))[:k]


def buffer_record(stage: int, scores: Mapping[str, float], k: int, repeats: int, seed: int,
                  objective: MaskedReconstruction | None = None, **settings) -> dict:
    """The JSON-ready buffer of a stage: selected ``case_ids`` (lowest score first) and all ``scores``,
    with ``stage``, ``repeats`` (R), ``k`` (as asked), ``seed``, the objective's settings and any extra
    ``settings`` (dataset name, patch mode ...)."""
    record = {"stage": int(stage), "case_ids": select_lowest(scores, k),
              "scores": {c: float(s) for c, s in scores.items()}, "repeats": int(repeats), "k": int(k),
              "seed": int(seed)}
    if objective is not None:
        record["objective"] = {key: (list(v) if isinstance(v, tuple) else v) for key, v in asdict(objective).items()}
    record.update(settings)
    return record


def write_buffer(path: str, record: dict) -> None:
    """Write a buffer record atomically (complete or absent after a kill)."""
    missing = [key for key in _RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"buffer record for {path} lacks {missing}")
    write_json(record, path)


def read_buffer(path: str) -> dict:
    """Read and check a buffer record; errors name the file."""
    import json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"MDS buffer {path} does not exist")
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"MDS buffer {path} is not valid JSON: {e}") from None
    missing = [key for key in _RECORD_KEYS if key not in record]
    if missing:
        raise ValueError(f"MDS buffer {path} lacks {missing}")
    unknown = [c for c in record["case_ids"] if c not in record["scores"]]
    if unknown:
        raise ValueError(f"MDS buffer {path}: selected case(s) {unknown} have no score")
    return record


def preprocessed_images(folder: str, identifiers: Sequence[str] | None = None) -> Iterable[Tuple[str, np.ndarray]]:
    """``(case id, image (C, *spatial))`` for the cases of an nnU-Net preprocessed configuration folder
    (``nnUNet_preprocessed/DatasetXXX/nnUNetPlans_3d_fullres``; either storage format), one at a time."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"preprocessed folder {folder} does not exist")
    cls = infer_dataset_class(folder)
    if identifiers is not None:
        missing = sorted(set(identifiers) - set(cls.get_identifiers(folder)))
        if missing:
            raise ValueError(f"preprocessed folder {folder} has no case(s) {missing}")
    dataset = cls(folder, None if identifiers is None else list(identifiers))
    for case_id in dataset.identifiers:
        data = dataset.load_case(case_id)[0]
        yield case_id, np.asarray(data[:])
