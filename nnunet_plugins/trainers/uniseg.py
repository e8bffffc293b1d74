"""UniSegTrainer: UniSeg (Ye et al., MICCAI 2023) trained by nnU-Net v2 on a universal dataset.

What UniSeg changes relative to ``MultiTaskTrainer`` (task-balanced loader, per-task Dice + CE on the
task's own classes, per-task prediction) and nothing else:

* the network: ``nnunet_plugins.architectures.uniseg.UniSeg`` built from the plans' U-Net (stages,
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

import pydoc

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunet_plugins.trainers.multitask import MultiTaskTrainer

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
UNISEG_NETWORK = "nnunet_plugins.architectures.uniseg.UniSeg"
# PlainConvUNet constructor arguments that UniSeg takes under the same name
UNET_KWARGS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder",
               "conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
               "nonlin_kwargs")


def uniseg_kwargs_from_plans(configuration_manager: ConfigurationManager) -> dict:
    """UniSeg constructor arguments for the U-Net of a plans configuration."""
    name = configuration_manager.network_arch_class_name
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    if name == UNISEG_NETWORK:
        return kwargs
    if name != PLAIN_UNET:
        raise ValueError(f"UniSeg builds on nnU-Net's plain U-Net ({PLAIN_UNET}), but the plans name {name}; "
                         f"use plans from nnU-Net's default planner (nnUNetPlans)")
    return {k: kwargs[k] for k in UNET_KWARGS if k in kwargs}


class UniSegTrainer(MultiTaskTrainer):
    batches_per_task_per_round = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # one sampling round per epoch, as the official trainer (50 batches per task)
        self.num_iterations_per_epoch = self.batches_per_task_per_round * self.task_spec.num_tasks
        self.apply_run_length_overrides()

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        from nnunet_plugins.architectures.uniseg import UniSeg

        spec = MultiTaskTrainer.task_spec_from_plans(plans_manager)
        kwargs = uniseg_kwargs_from_plans(configuration_manager)
        kwargs.setdefault("official_generic_unet", False)
        kwargs.update(input_channels=num_input_channels, num_classes=spec.max_num_classes, num_tasks=spec.num_tasks,
                      patch_size=tuple(configuration_manager.patch_size),
                      task_input_channels=spec.task_input_channels, deep_supervision=enable_deep_supervision)
        return UniSeg(**kwargs)
