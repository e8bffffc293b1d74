"""BinaryChannelMultiTaskTrainer: multi-task training of a dynamic-head network with per-task binary
SIGMOID channels, the common base of DoDNetTrainer and TransDoDNetTrainer.

Both methods predict, for the requested task, a few independent sigmoid channels from a dynamic head
generated for that task (MOTS: organ, tumour; the organ channel includes the tumour). What this base
changes relative to ``MultiTaskTrainer`` (task-balanced loader, per-task prediction and export) and
nothing else:

* channels: the binary channels of each task come from that task's source ``labels``
  (``nnunet_plugins.training.binary_channels.task_binary_channels``): a region-based source gives one
  channel per region (nested organ / tumour as nnU-Net regions, painted in ``regions_class_order``), a
  plain source one channel per label. Channel ``k`` of a task is network output ``k``; the network has
  as many outputs as the task with the most channels (official 2);
* loss: :class:`~nnunet_plugins.training.partial_label_loss.PartialLabelDiceBCELoss` (binary Dice + BCE
  per channel, official ``DiceLoss4MOTS`` + ``CELoss4MOTS``) on each sample's own channels; outputs a
  sample's task does not annotate (a task with fewer channels than the network) are masked, never
  trained as background;
* prediction: the task's channels become a segmentation through
  :class:`~nnunet_plugins.training.binary_channels.BinaryChannelLabelManager` (sigmoid, > 0.5, painted
  in channel order) in the task's local classes (``task_label_manager``), so the final validation,
  ``nnunet-plugins predict-multitask`` and ``export-multitask`` write each source's labels;
* the network (the subclass's ``network_class``): built by its ``from_plans`` with the task metadata
  (number of tasks, output channels); the networks have no auxiliary heads, so their
  ``plans_deep_supervision_scales`` is None and ``PluginTrainer`` switches deep supervision off (one
  logits tensor, no deep-supervision targets); the patch is fitted to the network's divisor and recorded
  in the plans the trainer copies into the model folder, so prediction slides the same window.
  ``predict-multitask`` rebuilds exactly the trained network from the plans in the model folder; the
  stock ``nnUNetv2_predict`` fails with a message naming ``predict-multitask`` (the networks need a task).

Sampling is the package's task-balanced sampler (one task per batch); the official DoDNet/TransDoDNet
loaders draw cases uniformly from the pooled list.
"""
from __future__ import annotations

import torch

from nnunet_plugins.multitask.metadata import MultiTaskSpec
from nnunet_plugins.training.binary_channels import (
    BinaryChannelLabelManager, channel_targets_for, max_binary_channels, task_binary_channels,
)
from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss
from nnunet_plugins.trainers.multitask import MultiTaskTrainer


class BinaryChannelMultiTaskTrainer(MultiTaskTrainer):
    """See the module docstring. Subclasses set ``network_class`` and their optimiser."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.binary_channels = task_binary_channels(self.task_spec)
        self.channel_targets = channel_targets_for(self.task_spec, self.binary_channels)
        self._paint_values = [[c.paint_value for c in chans] for chans in self.binary_channels]
        self.print_to_log_file("binary channels per task: " + "; ".join(
            f"{t.tag or i}: " + ", ".join(f"{c.name}={list(t.combined_labels[v] for v in c.values)}" for c in chans)
            for i, (t, chans) in enumerate(zip(self.task_spec.tasks, self.binary_channels))), also_print_to_console=False)

    # ---- channels, label managers --------------------------------------------------------------------
    @classmethod
    def num_network_outputs(cls, spec: MultiTaskSpec) -> int:
        return max_binary_channels(spec)

    @classmethod
    def task_output_channels(cls, spec: MultiTaskSpec, task: int) -> list:
        return list(range(len(task_binary_channels(spec)[task])))

    @classmethod
    def task_label_manager(cls, spec: MultiTaskSpec, task: int) -> BinaryChannelLabelManager:
        # local class indices out; the predictor's value table turns them into combined / source labels
        return BinaryChannelLabelManager(task_binary_channels(spec)[task])

    def logits_to_local_segmentation(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        """Sigmoid > 0.5 (logit > 0) per channel, painted in channel order, as the label manager does."""
        seg = torch.zeros((logits.shape[0], 1, *logits.shape[2:]), dtype=torch.long, device=logits.device)
        for k, value in enumerate(self._paint_values[task]):   # a loop over (few) channels, not voxels
            seg = torch.where(logits[:, k:k + 1] > 0, value, seg)
        return seg

    # ---- loss ------------------------------------------------------------------------------------------
    def _build_loss(self):
        return PartialLabelDiceBCELoss()

    def compute_loss(self, output, batch: dict):
        """Binary Dice + BCE on each sample's own channels; channels its task lacks are masked."""
        output = output[0] if isinstance(output, (list, tuple)) else output
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        channel_target, annotated = self.channel_targets(target, batch["task_id"])
        return self.loss(output, channel_target, annotated), {}
