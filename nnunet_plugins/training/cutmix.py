"""CutMix for VerSemi's synthetic task: cubes, mixed images and targets, the stage-2 consistency term.

Paper: Q. Zeng, Y. Xie, Z. Lu et al. "Segment Together: A Versatile Paradigm for Semi-Supervised
Medical Image Segmentation". IEEE TMI 2025. Official code: maxwell0027/VerSemi (``train.py``,
``utils1/statistic.py::context_mask``, ``utils1/losses.py::dice_loss``); our own implementation.

VerSemi adds a SYNTHETIC task (id T, after the T real tasks) whose input is a CutMix of two images and
whose target is the union of their foregrounds. Everything here is batched and vectorised (no loop
over samples or voxels) and works for 2-D and 3-D (any number of spatial axes).

Convention (as official): a box ("cube") of side ``floor(r * patch_axis)`` on every axis; INSIDE the
box the mix shows image B, OUTSIDE image A. ``inside`` masks are bool ``(B, *spatial)``.

* :func:`draw_cubes` -> :class:`Cubes` (start, side per sample and axis); :func:`cube_mask` rasterises
  them (a box reaching past the border is clipped, as numpy slicing in the official code clips it).
* :func:`mask_at_scale` gives the mask at a deep-supervision scale, sampled as nnU-Net samples its
  downsampled targets, so mixing nnU-Net's per-scale targets equals downsampling the mixed target.
* :func:`cutmix` mixes images or label maps; :func:`union_target` is the synthetic task's target
  (A's foreground outside, B's inside); :func:`source_targets` are the per-source targets of the
  stage-1 term 0.5 [Dice(p_taskA(mix), y_A outside) + Dice(p_taskB(mix), y_B inside)].
* :func:`consistency_target` = ``clip(max_k p_k, 0, 1)`` over the T task prompts (stage 2) and
  :func:`soft_dice_loss`, the official Dice loss, with an optional region (the labeled cube term).

Ratio ``r``: a float (stage 1: 2/3) or a range ``(lo, hi)`` drawn uniformly (stage 2: (0.3, 0.6)).
The official code draws ONE r per batch (``random.uniform`` once per iteration); ``per_sample_ratio``
draws one per sample instead.

Official deviations (``official_placement``): the official ``context_mask`` draws each start with
``np.random.randint(0, 96 - side)``: numpy's upper bound is exclusive, so the box never touches the
last voxel of an axis, and 96 is hard-coded (the official patch size; smaller inputs get the box
clipped by slicing). By default a start is uniform over every position that keeps the box inside the
patch, ``0 .. size - side`` inclusive; ``official_placement=True`` uses ``0 .. size - side - 1``
(``size`` the actual patch axis; a box as large as the axis then starts at 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Cubes", "draw_cubes", "cube_mask", "mask_at_scale", "cutmix", "union_target", "source_targets",
           "consistency_target", "soft_dice_loss"]


@dataclass(frozen=True)
class Cubes:
    """Boxes of one batch: ``start`` and ``side`` LongTensors ``(B, n_axes)`` in voxels."""
    start: Tensor
    side: Tensor

    def mask(self, spatial_shape: Sequence[int]) -> Tensor:
        """The bool ``(B, *spatial_shape)`` inside mask (see :func:`cube_mask`)."""
        return cube_mask(spatial_shape, self.start, self.side)


def _ratios(ratio, n: int, generator, per_sample: bool) -> Tensor:
    """``(n,)`` float64 ratios: fixed, or uniform in ``[lo, hi)`` (one per batch or per sample)."""
    if isinstance(ratio, (tuple, list)):
        if len(ratio) != 2 or not 0 < float(ratio[0]) <= float(ratio[1]) <= 1:
            raise ValueError(f"ratio range must be (lo, hi) with 0 < lo <= hi <= 1, got {ratio!r}")
        lo, hi = float(ratio[0]), float(ratio[1])
        u = torch.rand(n if per_sample else 1, generator=generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).expand(n)
    r = float(ratio)
    if not 0 < r <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return torch.full((n,), r, dtype=torch.float64)


def draw_cubes(batch_size: int, spatial_shape: Sequence[int], ratio, *, generator: torch.Generator | None = None,
               per_sample_ratio: bool = False, official_placement: bool = False,
               device: torch.device | str | None = None) -> Cubes:
    """Draw one box per sample: side ``floor(r * size)`` per axis (at least 1), start uniform.

    Args:
        batch_size: number of boxes.
        spatial_shape: the patch's spatial size, e.g. ``(D, H, W)``.
        ratio: r (float in (0, 1]) or ``(lo, hi)`` to draw r uniformly.
        generator: a CPU ``torch.Generator`` for reproducible draws (None: the global RNG).
        per_sample_ratio: one r per sample instead of one per batch (official: per batch).
        official_placement: the official start range ``0 .. size - side - 1`` (module docstring).
        device: where the returned tensors live.
    """
    if batch_size < 1 or not spatial_shape or min(int(s) for s in spatial_shape) < 1:
        raise ValueError(f"draw_cubes needs batch_size >= 1 and a non-empty positive spatial shape, got "
                         f"{batch_size}, {tuple(spatial_shape)}")
    size = torch.tensor([int(s) for s in spatial_shape], dtype=torch.float64)
    r = _ratios(ratio, batch_size, generator, per_sample_ratio)
    # float64 like the official int(img_x * mask_ratio), e.g. int(96 * 2/3) = 64
    side = torch.floor(r[:, None] * size[None]).long().clamp(min=1)
    positions = size.long()[None] - side + 1                    # starts keeping the box inside
    if official_placement:
        positions = (positions - 1).clamp(min=1)
    u = torch.rand(batch_size, len(spatial_shape), generator=generator, dtype=torch.float64)
    start = torch.floor(u * positions).long()
    return Cubes(start.to(device), side.to(device))


def cube_mask(spatial_shape: Sequence[int], start: Tensor, side: Tensor) -> Tensor:
    """Bool ``(B, *spatial_shape)``, True inside each sample's box ``[start, start + side)`` per axis.

    A box reaching past the far border is clipped (slicing semantics of the official code); starts
    must be >= 0.
    """
    if start.shape != side.shape or start.dim() != 2 or start.shape[1] != len(spatial_shape):
        raise ValueError(f"start and side must both be (B, {len(spatial_shape)}), got {tuple(start.shape)} and "
                         f"{tuple(side.shape)}")
    if bool((start < 0).any()) or bool((side < 0).any()):
        raise ValueError("cube starts and sides must be >= 0")
    n_axes = len(spatial_shape)
    inside = None
    for axis, size in enumerate(spatial_shape):   # a loop over the 2-3 axes, each a broadcast compare
        coord = torch.arange(int(size), device=start.device).view(*([1] * (axis + 1)), -1, *([1] * (n_axes - axis - 1)))
        lo = start[:, axis].view(-1, *([1] * n_axes))
        hi = lo + side[:, axis].view(-1, *([1] * n_axes))
        axis_inside = (coord >= lo) & (coord < hi)
        inside = axis_inside if inside is None else inside & axis_inside
    return inside


def mask_at_scale(inside: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """``inside`` ``(B, *spatial)`` resampled to ``spatial_shape`` with ``nearest-exact`` interpolation.

    nnU-Net (batchgeneratorsv2 ``DownsampleSegForDSTransform``) builds the deep-supervision targets with
    the same interpolation; nearest sampling picks one source voxel per target voxel, so
    ``cutmix(down(a), down(b), mask_at_scale(inside))`` equals ``down(cutmix(a, b, inside))`` exactly.
    """
    if tuple(inside.shape[1:]) == tuple(int(s) for s in spatial_shape):
        return inside
    resized = torch.nn.functional.interpolate(inside[:, None].float(), size=[int(s) for s in spatial_shape],
                                              mode="nearest-exact")
    return resized[:, 0] > 0.5


def _broadcast(inside: Tensor, like: Tensor) -> Tensor:
    if like.dim() == inside.dim() + 1:      # a channel axis: (B, C, *spatial)
        return inside.unsqueeze(1)
    if like.dim() == inside.dim():
        return inside
    raise ValueError(f"tensor {tuple(like.shape)} does not match the inside mask {tuple(inside.shape)}: expected "
                     f"(B, *spatial) or (B, C, *spatial)")


def cutmix(a: Tensor, b: Tensor, inside: Tensor) -> Tensor:
    """Mix: ``b`` inside the box, ``a`` outside. ``a``, ``b``: ``(B, C, *spatial)`` images or label maps
    (``(B, 1, *spatial)`` as nnU-Net's targets, or ``(B, *spatial)``); ``inside`` bool ``(B, *spatial)``."""
    if a.shape != b.shape:
        raise ValueError(f"cutmix needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.where(_broadcast(inside, a), b, a)


def union_target(seg_a: Tensor, seg_b: Tensor, inside: Tensor) -> Tensor:
    """The synthetic task's target: foreground (label > 0) of A outside the box, of B inside; long 0/1.

    Every structure of either source counts as foreground: the synthetic task segments the union of
    the tasks' foregrounds ("segment together").
    """
    return cutmix(seg_a > 0, seg_b > 0, inside).long()


def source_targets(seg_a: Tensor, seg_b: Tensor, inside: Tensor, task_a: Tensor | None = None,
                   task_b: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-source targets of the mix for the stage-1 term: ``(y_A outside the box, y_B inside)``.

    ``y_A`` keeps A's labels outside the box and is background inside; ``y_B`` keeps B's labels inside
    and is background outside (official ``lab_a * mask``, ``lab_b * (1 - mask)``). Where the two samples
    belong to the SAME task (``task_a == task_b``, LongTensors ``(B,)``), the task's head sees its own
    structures on both sides of the border, so both targets are the whole mixed label map, as the
    official code does ("check label for task-specific head").
    """
    if seg_a.shape != seg_b.shape:
        raise ValueError(f"source_targets needs two label maps of one shape, got {tuple(seg_a.shape)} and "
                         f"{tuple(seg_b.shape)}")
    m = _broadcast(inside, seg_a)
    zero = torch.zeros((), dtype=seg_a.dtype, device=seg_a.device)
    y_a, y_b = torch.where(m, zero, seg_a), torch.where(m, seg_b, zero)
    if (task_a is None) != (task_b is None):
        raise ValueError("give both task_a and task_b or neither")
    if task_a is not None:
        same = (task_a.to(seg_a.device) == task_b.to(seg_a.device)).view(-1, *([1] * (seg_a.dim() - 1)))
        mixed = torch.where(m, seg_b, seg_a)
        y_a, y_b = torch.where(same, mixed, y_a), torch.where(same, mixed, y_b)
    return y_a, y_b


def consistency_target(task_probs: Tensor | Sequence[Tensor]) -> Tensor:
    """Stage-2 target of the synthetic prediction: ``clip(max_k p_k, 0, 1)`` over the T task prompts.

    ``task_probs``: the foreground probabilities of the mix under every real task's prompt, a tensor
    ``(K, B, *spatial)`` or a sequence of K tensors ``(B, *spatial)``. Not detached: the official code
    back-propagates the consistency Dice into both sides; detach it for a stop-gradient target.
    """
    probs = torch.stack(list(task_probs)) if not isinstance(task_probs, Tensor) else task_probs
    if probs.dim() < 2 or probs.shape[0] < 1:
        raise ValueError(f"task_probs must be (K, B, *spatial) with K >= 1, got {tuple(probs.shape)}")
    return probs.amax(dim=0).clamp(0.0, 1.0)


def soft_dice_loss(prob: Tensor, target: Tensor, region: Tensor | None = None, smooth: float = 1e-5) -> Tensor:
    """The official VerSemi Dice loss ``1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s)`` over the batch.

    Sums run over every sample and voxel together (official ``dice_loss``; squared denominators,
    ``s`` = 1e-5). ``prob`` and ``target`` ``(B, *spatial)`` (soft targets allowed, e.g. the
    consistency target); ``region`` (bool, same shape) restricts both to a region, e.g. the box for
    the stage-2 labeled cube term ``Dice(p_synthetic * inside, y_labeled * inside)``.
    """
    if prob.shape != target.shape:
        raise ValueError(f"prob {tuple(prob.shape)} and target {tuple(target.shape)} must have one shape")
    t = target.to(prob.dtype)
    if region is not None:
        if region.shape != prob.shape:
            raise ValueError(f"region {tuple(region.shape)} must have the shape of prob {tuple(prob.shape)}")
        region = region.to(prob.dtype)
        prob, t = prob * region, t * region
    intersect = (prob * t).sum()
    return 1.0 - (2.0 * intersect + smooth) / ((prob * prob).sum() + (t * t).sum() + smooth)
