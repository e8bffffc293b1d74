"""CoTrTrainer: CoTr (Xie et al., MICCAI 2021) trained by nnU-Net v2.

What CoTr changes relative to ``nnUNetTrainer`` and nothing else:

* the network (``nnunet_plugins.architectures.cotr.CoTr``): built from the plans' architecture entry
  when the plans name CoTr (``nnunet-plugins plan -m CoTr`` writes such plans, possibly with
  narrower stages), otherwise with the official configuration;
* the patch: CoTr needs every axis divisible by its total stride (8, 16, 16). On plans whose patch
  does not fit (e.g. nnU-Net's stock ``nnUNetPlans``) the trainer rounds the patch to the nearest
  multiple and records it in the plans it copies into the model folder, so ``nnUNetv2_predict``
  slides the same window;
* deep supervision: CoTr predicts at its own scales, (1,1,1), (1,1/2,1/2), (1/2,1/4,1/4) and
  (1/4,1/8,1/8), not at nnU-Net's pooling scales; targets are downsampled to exactly these. The loss
  weights follow the official trainer (1, 1/2, 1/4, 1/8, normalised; with the BCV plans the official
  code masks only a fifth, non-existent output, so all four CoTr outputs count);

Optimiser and schedule are the paper's and nnU-Net's defaults alike: SGD lr 1e-2, momentum 0.99
(Nesterov), weight decay 3e-5, poly decay 0.9 over 1000 epochs x 250 iterations, gradient clipping
at 12, AMP on CUDA, Dice + CE.
"""
from __future__ import annotations

import numpy as np

from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.trainers.base import PluginTrainer

# loss weights of CoTr's outputs [full, ds0, ds1, ds2] (official trainer, see the module docstring)
COTR_DS_WEIGHTS = (1.0, 0.5, 0.25, 0.125)


class CoTrTrainer(PluginTrainer):
    network_class = CoTr   # network, patch divisor and deep-supervision scales come from CoTr

    def _build_loss(self):
        loss = super()._build_loss()
        if self.enable_deep_supervision:
            weights = np.asarray(COTR_DS_WEIGHTS)
            loss.weight_factors = tuple(weights / weights.sum())
        return loss
