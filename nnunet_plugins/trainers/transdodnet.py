"""TransDoDNetTrainer: TransDoDNet (Xie et al., TPAMI 2023) trained by nnU-Net v2 on a universal dataset.

Channels, loss, prediction and network handling are those of
:class:`~nnunet_plugins.trainers.binary_channel.BinaryChannelMultiTaskTrainer`; the network is
:class:`~nnunet_plugins.architectures.transdodnet.TransDoDNet` (3-D only; official widths unless the
plans name TransDoDNet; patch axes multiples of (16, 32, 32) for the ResNet-50 backbone, with more than
one voxel at the deepest level).

Optimisation (official ``TransDoD/train.py``): AdamW lr 2e-4, weight decay 1e-4, gradient clipping at
0.1, per-epoch schedule: linear warm-up from 1 % of the lr over the first 10 epochs
(``lr * (0.01 + 0.99 * e / 10)``), then poly 0.9 of the absolute epoch (``lr * (1 - e / E) ** 0.9``),
E = 1000 epochs x 250 iterations as nnU-Net (:class:`~nnunet_plugins.training.lr_schedulers.
WarmupPolyLRScheduler`). (The official optimiser has two parameter groups, transformer and the rest,
with the same lr, ``lr_tr_mult`` = 1: one group here.) A run shortened with ``NNUNET_PLUGINS_EPOCHS``
keeps at most a tenth of its epochs for warm-up (``warmup_epochs_for``: 10 epochs from 100 epochs on,
5 of 50, none below 10 epochs), so a short run still trains mostly near the paper's learning rate.
"""
from __future__ import annotations

import torch

from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.training.lr_schedulers import WarmupPolyLRScheduler, warmup_epochs_for
from nnunet_plugins.trainers.binary_channel import BinaryChannelMultiTaskTrainer


class TransDoDNetTrainer(BinaryChannelMultiTaskTrainer):
    """TransDoDNet (see the module docstring): AdamW 2e-4 / wd 1e-4, warm-up + poly, clip 0.1; 3-D only."""

    network_class = TransDoDNet
    grad_clip_norm = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 2e-4
        self.weight_decay = 1e-4
        self.warmup_epochs = warmup_epochs_for(self.num_epochs)

    def configure_optimizers(self):
        self.warmup_epochs = warmup_epochs_for(self.num_epochs)
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        self.print_to_log_file(f"TransDoDNet schedule: AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, "
                               f"{self.warmup_epochs} warm-up epochs of {self.num_epochs}, then poly 0.9",
                               also_print_to_console=False)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
