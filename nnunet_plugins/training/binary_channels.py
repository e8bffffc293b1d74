"""Binary (sigmoid) output channels of a task, from its nnU-Net ``labels`` entry, and back to labels.

DoDNet and TransDoDNet predict, for the requested task, independent sigmoid channels (MOTS: organ and
tumour, the organ channel including the tumour). Which label values make each channel foreground is
DATA, read from the task's dataset.json ``labels`` (no task list in code):

* a region-based dataset (some entry is a list; nnU-Net's region convention) gives one channel per
  non-background entry, in the dict's order, foreground = the entry's values, and each channel
  paints its ``regions_class_order`` value at prediction time (later channels overwrite earlier
  ones, as nnU-Net does). MOTS' "organ includes tumour" is the region dataset
  ``{"background": 0, "liver": [1, 2], "tumour": 2}`` with ``regions_class_order`` ``[1, 2]``;
* a plain dataset gives one channel per foreground label (foreground = that value, painted back as
  that value). Note: the official MOTS loader nests organ and tumour for plain liver/kidney/pancreas
  label maps by hard-coded task id; here nesting is declared by regions, as nnU-Net users do.

Channel ``k`` of a task is the network's output channel ``k``; the dynamic head is generated for the
task, so the same output channel may mean different structures for different tasks, and a task with
fewer channels than the network leaves the others unannotated (excluded from the loss).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_plugins.multitask.metadata import MultiTaskSpec
from nnunet_plugins.training.partial_label_loss import TaskChannelTargets

__all__ = ["BinaryChannel", "binary_channels_from_labels", "BinaryChannelLabelManager", "task_binary_channels",
           "max_binary_channels", "channel_targets_for"]


@dataclass(frozen=True)
class BinaryChannel:
    name: str
    values: tuple[int, ...]   # label values that are foreground for this channel
    paint_value: int          # value written where the channel's probability exceeds 0.5


def binary_channels_from_labels(labels: dict, regions_class_order: Sequence[int] | None = None,
                                where: str = "dataset.json") -> list[BinaryChannel]:
    """The binary channels of one task (see the module docstring). ``where`` names the source in errors."""
    if labels.get("background") != 0:
        raise ValueError(f"{where}: labels must declare 'background': 0, got {labels.get('background')!r}")
    if "ignore" in labels:
        raise ValueError(f"{where}: an 'ignore' label is not supported by binary-channel (DoDNet) training")
    entries = [(name, value) for name, value in labels.items() if name != "background"]
    if not entries:
        raise ValueError(f"{where}: no foreground label in {labels}")
    region_based = any(isinstance(v, (list, tuple)) for _, v in entries)
    channels = []
    if region_based:
        if regions_class_order is None or len(regions_class_order) != len(entries):
            raise ValueError(f"{where}: region-based labels need a regions_class_order with one value per region "
                             f"({len(entries)}), got {regions_class_order!r}")
        for (name, value), paint in zip(entries, regions_class_order):
            values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
            channels.append(BinaryChannel(str(name), values, int(paint)))
    else:
        for name, value in entries:
            try:
                v = int(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: label {name!r} has a non-integer value {value!r}") from e
            channels.append(BinaryChannel(str(name), (v,), v))
    bad = [c.name for c in channels if any(v <= 0 for v in c.values) or c.paint_value <= 0]
    if bad:
        raise ValueError(f"{where}: foreground labels/regions must use positive values, not {bad}")
    return channels


class BinaryChannelLabelManager(LabelManager):
    """nnU-Net ``LabelManager`` for independent sigmoid channels: sigmoid, then each channel paints its
    value where its probability exceeds 0.5, in channel order (nnU-Net's region inference).

    nnU-Net treats a dataset as region-based only when some region has more than one value; here
    region mode is forced, so one-value channels (plain label datasets) are handled the same way.
    """

    def __init__(self, channels: Sequence[BinaryChannel]):
        if not channels:
            raise ValueError("BinaryChannelLabelManager needs at least one channel")
        label_dict = {"background": 0}
        for c in channels:
            key = c.name if c.name not in label_dict else f"{c.name}_{len(label_dict)}"
            label_dict[key] = list(c.values)
        super().__init__(label_dict, [c.paint_value for c in channels], inference_nonlin=torch.sigmoid)
        self._has_regions = True
        self._regions = self._get_regions()
        self.channels = tuple(channels)


# ---------------------------------------------------------------------------------------------------
# binary channels of the tasks of a multi-task dataset
# ---------------------------------------------------------------------------------------------------
def _task_name(spec: MultiTaskSpec, t: int) -> str:
    task = spec.tasks[t]
    return f"task {task.tag or t!r} ({task.source_dataset or 'no source name'})"


def task_binary_channels(spec: MultiTaskSpec) -> list[list[BinaryChannel]]:
    """Per task, its binary channels with values and paint values in the task's LOCAL class indices.

    Read from each task's source ``labels`` and ``regions_class_order`` (the combined dataset's
    metadata keeps them verbatim); raises ValueError naming the task when they are missing or name
    values the task does not have.
    """
    out = []
    for t, task in enumerate(spec.tasks):
        where = f"{_task_name(spec, t)} labels"
        if not task.source_labels:
            raise ValueError(f"{where}: the task metadata has no source 'labels'; binary-channel training needs "
                             f"them (datasets combined with `nnunet-plugins combine` carry them)")
        channels = binary_channels_from_labels(task.source_labels, task.source_regions_class_order, where=where)
        local = {int(v): i for i, v in enumerate(task.label_values)}
        converted = []
        for c in channels:
            missing = sorted({v for v in (*c.values, c.paint_value) if v not in local})
            if missing:
                raise ValueError(f"{where}: channel {c.name!r} uses label values {missing} that the task does not "
                                 f"have (its values: {list(task.label_values)})")
            converted.append(BinaryChannel(c.name, tuple(local[v] for v in c.values), local[c.paint_value]))
        out.append(converted)
    return out


def max_binary_channels(spec: MultiTaskSpec) -> int:
    """Output channels of the network: the largest channel count of any task (official MOTS: 2)."""
    return max(len(c) for c in task_binary_channels(spec))


def channel_targets_for(spec: MultiTaskSpec, channels: Sequence[Sequence[BinaryChannel]] | None = None
                        ) -> TaskChannelTargets:
    """``TaskChannelTargets`` over COMBINED label values (what the batches hold): channel ``k`` of task
    ``t`` is foreground on the combined values of its local classes; channels past a task's own are
    unannotated for it."""
    channels = task_binary_channels(spec) if channels is None else channels
    width = max(len(c) for c in channels)
    table = []
    for task, chans in zip(spec.tasks, channels):
        row = [[int(task.combined_labels[i]) for i in c.values] for c in chans]
        table.append(row + [None] * (width - len(row)))
    return TaskChannelTargets(table)
