"""Partial labels: each task is supervised on its own structures only (torch side of the label tables).

A case of task ``t`` annotates only ``t``'s structures; a structure of another task that is visible in
the image is labelled 0 there. Training must therefore never treat the other tasks' structures as
background. The rule used by every multi-task trainer of this package:

* the network output for a sample of task ``t`` is restricted to ``t``'s own output channels
  (``channels``: background + ``t``'s structures, in local order) BEFORE the loss, and
* the target is converted from combined values to ``t``'s local indices.

Channels of structures ``t`` does not annotate therefore receive no loss and no gradient from ``t``'s
samples: predicting them as foreground anywhere costs nothing (tests check this). Within ``t``'s own
classes the usual softmax Dice + CE applies; for task-conditioned networks (UniSeg, DoDNet) "background
of task t" is exactly the right target there, since the network is asked for t's structures only.

A batch may mix tasks (the task-balanced sampler never does, but validation code or other samplers
might): samples are grouped by task and the per-group losses are averaged weighted by group size.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from nnunet_plugins.multitask.metadata import MultiTaskSpec


class TaskLabelMapper:
    """Vectorised conversions between combined label values and task-local indices (torch)."""

    def __init__(self, spec: MultiTaskSpec):
        self.spec = spec
        self._c2l = torch.as_tensor(spec.combined_to_local_lut(), dtype=torch.long)
        self._l2c = torch.as_tensor(spec.local_to_combined_lut(), dtype=torch.long)
        self._cache: dict = {}

    def _lut(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def to_local(self, target: torch.Tensor, task: int) -> torch.Tensor:
        """Combined label values -> local indices of ``task`` (values of other tasks -> 0).

        Negative values (nnU-Net's padding marker, normally removed by its transforms) count as 0.
        """
        lut = self._lut("_c2l", target.device)[task]
        return lut[target.long().clamp_min(0)]

    def to_local_per_sample(self, target: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """``to_local`` with one task per sample: ``target`` (B, ...), ``task_id`` LongTensor (B,)."""
        lut = self._lut("_c2l", target.device)
        tasks = task_id.to(target.device).long().view(-1, *([1] * (target.dim() - 1)))
        return lut[tasks, target.long().clamp_min(0)]

    def to_combined(self, local: torch.Tensor, task: int) -> torch.Tensor:
        return self._lut("_l2c", local.device)[task][local.long()]


def select_channels(output: torch.Tensor, channels: Sequence[int]) -> torch.Tensor:
    """``output[:, channels]`` (a narrow view when ``channels`` is 0..K-1)."""
    channels = list(channels)
    if channels == list(range(len(channels))):
        return output[:, :len(channels)]
    return output.index_select(1, torch.as_tensor(channels, device=output.device))


def group_by_task(task_id: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """[(task, sample indices or None when the whole batch is that task)] for a (B,) task id tensor."""
    ids = task_id.detach().cpu()
    tasks = torch.unique(ids).tolist()
    if len(tasks) == 1:
        return [(int(tasks[0]), None)]
    return [(int(t), torch.nonzero(ids == t).squeeze(1)) for t in tasks]


def task_grouped_loss(loss_fn: Callable, output, target, task_id: torch.Tensor,
                      channels_of: Callable[[int], Sequence[int]], mapper: TaskLabelMapper) -> torch.Tensor:
    """Loss of a multi-task batch with partial labels (see the module docstring).

    ``output``/``target``: a tensor each, or lists (deep supervision, highest resolution first) as
    nnU-Net's ``DeepSupervisionWrapper`` takes them; ``target`` holds combined label values (B, 1, ...).
    ``loss_fn`` receives task-local logits and targets in the same structure.
    """
    is_list = isinstance(output, (list, tuple))
    outputs = list(output) if is_list else [output]
    targets = list(target) if is_list else [target]
    batch = outputs[0].shape[0]
    total = None
    for task, idx in group_by_task(task_id):
        channels = channels_of(task)
        outs, tgts = [], []
        for o, g in zip(outputs, targets):
            if idx is not None:
                o, g = o[idx.to(o.device)], g[idx.to(g.device)]
            outs.append(select_channels(o, channels))
            tgts.append(mapper.to_local(g, task))
        loss = loss_fn(outs if is_list else outs[0], tgts if is_list else tgts[0])
        n = batch if idx is None else len(idx)
        total = loss * (n / batch) if total is None else total + loss * (n / batch)
    return total
