"""VerSemi's loss terms (stage 1 and stage 2) on task-prompted logits, as functions of one output scale.

Paper: Q. Zeng, Y. Xie, Z. Lu et al. "Segment Together: A Versatile Paradigm for Semi-Supervised
Medical Image Segmentation". IEEE TMI 2025. Official code: maxwell0027/VerSemi ``train.py``
(``pretrain`` = stage 1, ``train`` = stage 2); our own implementation. CutMix geometry, the union and
per-source targets, the consistency target and the official Dice are in :mod:`nnunet_plugins.training.cutmix`.

The official tasks are binary (background / one structure, a 2-way softmax, Dice on channel 1). Here a
task may have several structures (a combined dataset's source with K labels): task ``t``'s prediction
is the softmax over its own first ``C_t`` output channels (the multi-task trainers' channel convention),
its FOREGROUND probability is ``1 - p_background``, and a Dice "on the task's labels" is the mean over its
foreground classes of the official Dice of that class channel; with one structure per task every term
below is exactly the official one. The synthetic task is binary (channels 0 and 1).

Stage 1 (labeled only; mixes A = first half of the batch, B = second half; official ``pretrain``)::

    (Dice + CE)(task-prompted p, y)                            # nnU-Net's loss, in the trainer
    + Dice(p_synthetic(mix), union(y_A outside, y_B inside))   # synthetic_union_loss
    + 0.5 [Dice(p_taskA(mix), y_A outside) + Dice(p_taskB(mix), y_B inside)]   # source_terms_loss

Stage 2 (official ``train``; labeled-labeled mix of the two halves, unlabeled-labeled mix U outside / L inside)::

    (Dice + CE)(task-prompted p, y)
    + Dice(p_synthetic(LL mix), union target)                  # synthetic_union_loss
    + Dice(p_synthetic(UL mix), clip(max_k p_k(UL mix), 0, 1)) # consistency_loss, k over the T real tasks
    + Dice(p_synthetic(UL mix) * inside, fg(y_L) * inside)     # labeled_cube_loss

All weights are 1, as official (its ramp-up weights are computed and never used).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from nnunet_plugins.training.cutmix import consistency_target, soft_dice_loss, union_target

__all__ = ["task_probabilities", "foreground_probability", "task_dice_loss", "synthetic_union_loss",
           "source_terms_loss", "consistency_loss", "labeled_cube_loss"]

#: output channels of the synthetic (union) task: background, union foreground
SYNTHETIC_CLASSES = 2


def task_probabilities(logits: Tensor, num_classes: Tensor | int) -> Tensor:
    """Softmax over each sample's first ``num_classes`` channels; the other channels get probability 0.

    ``logits`` ``(B, C, *spatial)``; ``num_classes`` an int or a LongTensor ``(B,)`` (per-sample class counts).
    """
    c = logits.shape[1]
    k = torch.as_tensor(num_classes, device=logits.device).reshape(-1, 1)
    if bool((k < 2).any()) or bool((k > c).any()):
        raise ValueError(f"class counts must be in 2..{c}, got {k.flatten().tolist()}")
    keep = (torch.arange(c, device=logits.device)[None] < k).view(k.shape[0], c, *([1] * (logits.dim() - 2)))
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=1)


def foreground_probability(logits: Tensor, num_classes: Tensor | int) -> Tensor:
    """``1 - p_background`` of each sample's task (``(B, *spatial)``)."""
    return 1.0 - task_probabilities(logits, num_classes)[:, 0]


def _squeeze_target(target: Tensor, like: Tensor) -> Tensor:
    """nnU-Net's ``(B, 1, *spatial)`` target as ``(B, *spatial)``."""
    if target.dim() == like.dim():
        return target[:, 0]
    return target


def task_dice_loss(logits: Tensor, local_target: Tensor, num_classes: Tensor | int) -> Tensor:
    """Official Dice of each sample's task on its local labels: mean over foreground classes ``c`` of
    ``soft_dice_loss(p_c, target == c)`` summed over the samples whose task has class ``c``.

    ``local_target`` ``(B, 1, *spatial)`` or ``(B, *spatial)`` in task-local indices. One structure per task:
    exactly the official ``dice_loss(softmax(out)[:, 1], lab == 1)``.
    """
    probs = task_probabilities(logits, num_classes)
    target = _squeeze_target(local_target, logits)
    k = torch.as_tensor(num_classes, device=logits.device).reshape(-1).expand(logits.shape[0])
    losses = []
    for c in range(1, int(k.max())):   # a loop over classes, each term vectorised over samples and voxels
        has = (k > c).view(-1, *([1] * (target.dim() - 1))).expand_as(target)
        losses.append(soft_dice_loss(probs[:, c], target == c, region=has))
    return torch.stack(losses).mean()


def synthetic_union_loss(synthetic_logits: Tensor, seg_a: Tensor, seg_b: Tensor, inside: Tensor) -> Tensor:
    """``Dice(p_synthetic(mix), union target)``: the synthetic task segments every foreground (label > 0) of
    A outside the box and of B inside. ``seg_*`` combined label maps ``(B, 1, *spatial)``."""
    target = _squeeze_target(union_target(seg_a, seg_b, inside), synthetic_logits)
    return soft_dice_loss(foreground_probability(synthetic_logits, SYNTHETIC_CLASSES), target)


def source_terms_loss(logits_a: Tensor, logits_b: Tensor, local_a: Tensor, local_b: Tensor,
                      num_classes_a: Tensor | int, num_classes_b: Tensor | int) -> Tensor:
    """Stage 1's ``0.5 [Dice(p_taskA(mix), y_A outside) + Dice(p_taskB(mix), y_B inside)]``.

    ``logits_a`` / ``logits_b``: the mix under task A's / B's prompt; ``local_a`` / ``local_b``: the targets of
    :func:`~nnunet_plugins.training.cutmix.source_targets` in each task's local indices.
    """
    return 0.5 * (task_dice_loss(logits_a, local_a, num_classes_a) + task_dice_loss(logits_b, local_b, num_classes_b))


def consistency_loss(synthetic_logits: Tensor, task_logits: Sequence[Tensor], task_num_classes: Sequence[int],
                     detach_target: bool = False) -> Tensor:
    """Stage 2's ``Dice(p_synthetic, clip(max_k p_k, 0, 1))`` over the T real task prompts of one mix.

    ``task_logits[k]``: the mix under task ``k``'s prompt; ``task_num_classes[k]``: its class count. The target
    is not detached (official: the Dice back-propagates into both sides) unless ``detach_target``.
    """
    if len(task_logits) != len(task_num_classes) or not task_logits:
        raise ValueError("give the logits and class count of each of the T real tasks")
    probs = [foreground_probability(lg, k) for lg, k in zip(task_logits, task_num_classes)]
    target = consistency_target(probs)
    if detach_target:
        target = target.detach()
    return soft_dice_loss(foreground_probability(synthetic_logits, SYNTHETIC_CLASSES), target)


def labeled_cube_loss(synthetic_logits: Tensor, labeled_seg: Tensor, inside: Tensor) -> Tensor:
    """Stage 2's ``Dice(p_synthetic(mix) * inside, fg(y_labeled) * inside)``: inside the box the mix shows the
    labeled image, whose foreground the synthetic task must segment. ``labeled_seg`` combined labels."""
    target = _squeeze_target(labeled_seg, synthetic_logits) > 0
    return soft_dice_loss(foreground_probability(synthetic_logits, SYNTHETIC_CLASSES), target, region=inside)

