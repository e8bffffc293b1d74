"""Partial-label loss of DoDNet / TransDoDNet: binary Dice + BCE per output channel, unannotated channels excluded.

DoDNet (CVPR 2021) and TransDoDNet (TPAMI 2023) predict, for the requested task, a few SIGMOID channels
(MOTS: organ, tumour; the organ channel includes the tumour). Each source dataset annotates only some
of them (MOTS: the colon and lung tasks label tumours only, the spleen task the organ only). A channel
that a sample's task does not annotate must not be trained at all: treating it as background would
teach the network that, e.g., every spleen task image contains no tumour, which is unknown, not true.

Loss, as the official ``DiceLoss4MOTS`` + ``CELoss4MOTS`` (``loss_functions/loss.py``), for logits
``z`` and binary targets ``t`` of shape ``(B, C, *spatial)``:

* per sample b and channel c: ``p = sigmoid(z)``,
  ``dice[b, c] = 1 - 2 * sum(p t) / (sum(p) + sum(t) + smooth)`` (``smooth`` = 1, in the denominator
  only, as the official code) and ``bce[b, c] = mean over voxels of BCEWithLogits(z, t)``;
* per channel: the mean over the samples that ANNOTATE it; a channel that no sample of the batch
  annotates is left out (the official code marks unannotated channels with target -1, averages
  over the remaining samples and drops the channel's NaN);
* total: the mean over the remaining channels of Dice plus the same mean of BCE.

An unannotated channel therefore contributes neither value nor gradient, whatever is predicted there.
:class:`TaskChannelTargets` turns label maps into these binary channels and the annotation mask.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PartialLabelDiceBCELoss", "TaskChannelTargets", "per_sample_dice_bce"]


def per_sample_dice_bce(logits: Tensor, target: Tensor, smooth: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) soft Dice loss and mean BCE, each ``(B, C)`` (float32)."""
    z = logits.float().flatten(2)
    t = target.float().flatten(2)
    p = torch.sigmoid(z)
    dice = 1.0 - 2.0 * (p * t).sum(-1) / (p.sum(-1) + t.sum(-1) + smooth)
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none").mean(-1)
    return dice, bce


class PartialLabelDiceBCELoss(nn.Module):
    """Binary Dice + BCE per channel with unannotated channels excluded (see the module docstring).

    Args:
        smooth: added to the Dice denominator (official 1).
        dice_weight, bce_weight: weights of the two terms (official 1 and 1).

    ``forward(logits, target, annotated=None)``: ``logits`` and ``target`` ``(B, C, *spatial)``
    (target values 0/1), ``annotated`` bool ``(B, C)`` (True: the sample's task annotates the channel;
    None: everything annotated). Also accepts lists (deep supervision): the loss of the first entry
    is returned (DoDNet has no auxiliary outputs). Returns a scalar; zero (still differentiable) when
    nothing in the batch is annotated.
    """

    def __init__(self, smooth: float = 1.0, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        self.smooth, self.dice_weight, self.bce_weight = float(smooth), float(dice_weight), float(bce_weight)

    def terms(self, logits: Tensor, target: Tensor, annotated: Tensor | None = None) -> dict[str, Tensor]:
        """``{"dice": ..., "bce": ..., "channels": number of channels that count}`` (scalars)."""
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape "
                             f"(B, C, *spatial)")
        if logits.dim() < 3:
            raise ValueError(f"logits must be (B, C, *spatial), got {tuple(logits.shape)}")
        b, c = logits.shape[:2]
        if annotated is None:
            annotated = torch.ones((b, c), dtype=torch.bool, device=logits.device)
        elif tuple(annotated.shape) != (b, c):
            raise ValueError(f"annotated must be a (B, C) = {(b, c)} mask, got {tuple(annotated.shape)}")
        mask = annotated.to(device=logits.device, dtype=torch.bool)
        # unannotated targets are never read (they may hold anything, e.g. the official -1 marker)
        target = torch.where(mask.view(b, c, *([1] * (logits.dim() - 2))), target.to(logits.device), 0)
        dice, bce = per_sample_dice_bce(logits, target, self.smooth)
        w = mask.float()
        count = w.sum(0)                                    # annotated samples per channel
        used = count > 0
        denom = count.clamp_min(1.0)
        dice_c = (dice * w).sum(0) / denom                  # mean over annotated samples, per channel
        bce_c = (bce * w).sum(0) / denom
        n_used = used.sum()
        if int(n_used) == 0:
            zero = logits.float().sum() * 0.0
            return {"dice": zero, "bce": zero, "channels": n_used}
        return {"dice": dice_c[used].mean(), "bce": bce_c[used].mean(), "channels": n_used}

    def forward(self, logits, target, annotated: Tensor | None = None) -> Tensor:
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        if isinstance(target, (list, tuple)):
            target = target[0]
        t = self.terms(logits, target, annotated)
        return self.dice_weight * t["dice"] + self.bce_weight * t["bce"]


class TaskChannelTargets:
    """Binary per-channel targets and annotation masks from integer label maps, per task.

    ``channel_labels[t][c]`` lists the label values that make channel ``c`` foreground for task ``t``,
    or is ``None`` when task ``t`` does not annotate channel ``c``. Example (MOTS liver task, labels
    1 = liver, 2 = tumour; organ channel includes the tumour): ``[[1, 2], [2]]``; spleen task (label
    1 = spleen, no tumour annotated): ``[[1], None]``.

    ``__call__(seg, task_id)`` with ``seg`` ``(B, 1, *spatial)`` (or ``(B, *spatial)``) integer labels
    and ``task_id`` LongTensor ``(B,)`` returns ``target`` float ``(B, C, *spatial)`` and ``annotated``
    bool ``(B, C)``; a batch may mix tasks. Label values outside ``[0, max label]`` (e.g. nnU-Net's -1
    padding marker) count as background. One gather, no loop over samples or voxels.
    """

    def __init__(self, channel_labels: Sequence[Sequence[Sequence[int] | None]]):
        tasks = [list(ch) for ch in channel_labels]
        if not tasks or len({len(ch) for ch in tasks}) != 1 or len(tasks[0]) == 0:
            raise ValueError("channel_labels needs one entry per task, each with the same (positive) number of channels")
        values = [int(v) for ch in tasks for vals in ch if vals is not None for v in vals]
        if any(v < 0 for v in values):
            raise ValueError(f"label values must be non-negative, got {sorted(set(values))}")
        self.num_tasks, self.num_channels = len(tasks), len(tasks[0])
        self.max_label = max(values, default=0)
        lut = torch.zeros((self.num_tasks, self.num_channels, self.max_label + 2), dtype=torch.float32)
        annotated = torch.zeros((self.num_tasks, self.num_channels), dtype=torch.bool)
        for t, channels in enumerate(tasks):
            for c, vals in enumerate(channels):
                if vals is None:
                    continue
                annotated[t, c] = True
                for v in vals:
                    lut[t, c, int(v)] = 1.0
        self.lut, self.annotated_table = lut, annotated   # last LUT column: "any other value" -> 0
        self._cache: dict = {}

    def _on(self, device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (self.lut.to(device), self.annotated_table.to(device))
        return self._cache[key]

    def __call__(self, seg: Tensor, task_id: Tensor) -> tuple[Tensor, Tensor]:
        if seg.dim() >= 3 and seg.shape[1] == 1:
            seg = seg[:, 0]
        b = seg.shape[0]
        if task_id.dim() != 1 or task_id.shape[0] != b:
            raise ValueError(f"task_id must be (B,) = ({b},), got {tuple(task_id.shape)}")
        lut, table = self._on(seg.device)
        task_id = task_id.to(seg.device, torch.long)
        if bool(((task_id < 0) | (task_id >= self.num_tasks)).any()):
            raise ValueError(f"task ids must be in 0..{self.num_tasks - 1}, got {task_id.tolist()}")
        spatial = seg.shape[1:]
        idx = seg.long().reshape(b, 1, -1)
        idx = torch.where((idx < 0) | (idx > self.max_label), self.max_label + 1, idx)
        per_sample = lut[task_id]                                                  # (B, C, V)
        target = torch.gather(per_sample, 2, idx.expand(b, self.num_channels, idx.shape[2]))
        return target.view(b, self.num_channels, *spatial), table[task_id]
