"""DoDNetTrainer: DoDNet (Zhang et al., CVPR 2021) trained by nnU-Net v2 on a universal (multi-task) dataset.

Channels, loss, prediction and network handling are those of
:class:`~nnunet_plugins.trainers.binary_channel.BinaryChannelMultiTaskTrainer`; the network is
:class:`~nnunet_plugins.architectures.dodnet.DoDNet` (official widths unless the plans name DoDNet, then
its ``arch_kwargs``; patch axes multiples of the product of its strides: 16 per axis with the official
strides; plans naming DoDNet may set ``strides`` per axis, e.g. ``[1, [1, 2, 2], 2, 2, 2]``, for
anisotropic data). 3-D as the paper; a 2-D configuration builds the same network with ``nn.Conv2d``.

Optimisation (official ``a_DynConv/train.py``): SGD lr 1e-2, momentum 0.99, Nesterov, poly 0.9 over the
epochs (nnU-Net's ``PolyLRScheduler``), gradient clipping at 12 (nnU-Net's), AMP on CUDA. Weight decay
0: the official optimiser is built without one (its ``--weight_decay`` argument is never passed to
SGD); nnU-Net's default would be 3e-5. Epochs and iterations are nnU-Net's (1000 x 250; official
500 x 250).
"""
from __future__ import annotations

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.trainers.binary_channel import BinaryChannelMultiTaskTrainer


class DoDNetTrainer(BinaryChannelMultiTaskTrainer):
    """DoDNet (see the module docstring): SGD 1e-2 / 0.99 Nesterov, poly, clip 12, no weight decay."""

    network_class = DoDNet

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-2
        self.weight_decay = 0.0   # official: SGD without weight decay (module docstring)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
