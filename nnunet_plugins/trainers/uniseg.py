"""UniSegTrainer: UniSeg (Ye et al., MICCAI 2023) trained by nnU-Net v2 on a universal dataset.

What UniSeg changes relative to ``MultiTaskTrainer`` (task-balanced loader, per-task Dice + CE on the
task's own classes, per-task prediction) and nothing else:

* the network: ``nnunet_plugins.architectures.uniseg.UniSeg.from_plans``: the plans' U-Net (stages,
  features, kernels, strides, convs per stage, norm, nonlinearity) plus the task metadata (number of
  tasks, output channels = the largest class count of any task, channel count per task for the
  stems), with nnU-Net v2's U-Net conventions (``official_generic_unet=False``: see the network);
* the epoch: ``batches_per_task_per_round`` = 50 batches per task and one round per epoch, i.e.
  50 x T iterations per epoch (official: 550 for 11 tasks); ``NNUNET_PLUGINS_ITERS`` still overrides.

Optimiser and schedule are the paper's and nnU-Net's defaults alike: SGD lr 1e-2, momentum 0.99
(Nesterov), weight decay 3e-5, poly 0.9 over 1000 epochs, gradient clipping 12, AMP on CUDA, deep
supervision with nnU-Net's weights.

Downstream use (prompt dropped, backbone fine-tuned): ``nnunet-plugins uniseg-backbone`` converts a
UniSeg checkpoint into nnU-Net ``PlainConvUNet`` weights plus matching plans for the target dataset;
train them with nnU-Net's own ``-pretrained_weights`` (see ``nnunet_plugins.commands.uniseg``).
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.trainers.multitask import MultiTaskTrainer


class UniSegTrainer(MultiTaskTrainer):
    network_class = UniSeg
    batches_per_task_per_round = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # one sampling round per epoch, as the official trainer (50 batches per task)
        self.num_iterations_per_epoch = self.batches_per_task_per_round * self.task_spec.num_tasks
        self.apply_run_length_overrides()

    @classmethod
    def network_context(cls, plans_manager: PlansManager) -> dict:
        # each task's channel count picks its stem
        spec = cls.task_spec_from_plans(plans_manager)
        return {**super().network_context(plans_manager), "task_input_channels": spec.task_input_channels}
