"""LeFeDTrainer: LeFeD (Zeng, Xie, Lu et al., "Discrepancy Matters", IEEE TMI 2025) as an nnU-Net trainer.

A :class:`~nnunet_plugins.trainers.semi.SemiSupervisedTrainer` (L labeled + U unlabeled patches per batch,
default 2 + 2 as the paper) training :class:`~nnunet_plugins.architectures.lefed.LeFeDUNet` (the plans'
U-Net with a second, different decoder; plans naming ``LeFeDUNet`` or ``PlainConvUNet`` build it).

Per batch, ``num_passes`` (K = 3) forward/backward passes, each followed by an optimiser step (the base's
``passes_per_iteration`` / ``next_pass`` hooks): pass 1 without feedback, pass k+1 with the discrepancy
``e = feedback_scale * (F2 - F1)`` of pass k's decoder stage features (detached) added to the encoder's stage
outputs. Loss per pass:

* labeled samples: decoder 1's deep-supervised loss (nnU-Net's ``self.loss`` on ``[seg1, *side1]``: Dice + CE
  per output with nnU-Net's weights, or with ``ds_weights = "paper"`` weight 1 for ``seg1`` and LeFeD's 0.8,
  0.6, 0.4, 0.2, 0.1 by decoder level for the side outputs) + ``decoder2_weight`` x the same Dice + CE of
  decoder 2's output. ``dice_only = True``: Dice alone, as the paper (nnU-Net's CE term switched off);
* all samples (labeled and unlabeled): ``consistency_weight`` x MSE(softmax p1, softmax p2) (sigmoid for
  region-based datasets), the base's unlabeled loss.

Schedule: nnU-Net's (SGD 0.01, Nesterov, poly) by default; ``paper_schedule = True``: the official SGD 0.01,
momentum 0.9, weight decay 1e-4, x0.1 every 2500 iterations (batches).

Validation, checkpoints, ``--c``, ``--val``, DDP and ``nnUNetv2_predict -tr LeFeDTrainer`` are nnU-Net's: the
predictor builds the network without deep supervision, which is LeFeD's inference network (encoder + decoder
1, ``PlainConvUNet``'s tensors), and it loads the training checkpoint (decoder 2 dropped, strict otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_plugins.architectures.lefed import (FEEDBACK_SCALE, PAPER_DS_WEIGHTS, LeFeDOutput, LeFeDUNet,
                                                discrepancy_feedback)
from nnunet_plugins.trainers.semi import SemiSupervisedTrainer
from nnunet_plugins.training.lr_schedulers import IterationStepLRScheduler


def paper_ds_weights(num_outputs: int, first_side_level: int = 1, ddp: bool = False) -> list:
    """Weights of ``[seg1, side_1, ...]``: 1 for ``seg1``, LeFeD's 0.8 .. 0.1 (decoder level 0 = full resolution
    .. 4) for the side outputs, 0 deeper (1e-6 under DDP, as nnU-Net, so every output keeps a gradient)."""
    sides = [PAPER_DS_WEIGHTS[level] if level < len(PAPER_DS_WEIGHTS) else (1e-6 if ddp else 0.0)
             for level in range(first_side_level, first_side_level + num_outputs - 1)]
    return [1.0] + sides


class LeFeDTrainer(SemiSupervisedTrainer):
    """See the module docstring."""

    network_class = LeFeDUNet
    #: K, forward/backward passes (each with an optimiser step) per batch
    num_passes: int = 3
    #: scale of the discrepancy feedback e = scale * (F2 - F1)
    feedback_scale: float = FEEDBACK_SCALE
    #: weight of decoder 2's segmentation loss
    decoder2_weight: float = 1.0
    #: weight of MSE(softmax p1, softmax p2) on all samples
    consistency_weight: float = 1.0
    #: "nnunet" (nnU-Net's deep-supervision weights) or "paper" (LeFeD's, see paper_ds_weights)
    ds_weights: str = "nnunet"
    #: Dice only per output (the paper) instead of nnU-Net's Dice + CE
    dice_only: bool = False
    #: the official schedule (SGD 0.01, momentum 0.9, wd 1e-4, x0.1 every 2500 iterations)
    paper_schedule: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if int(self.num_passes) < 1:
            raise ValueError(f"LeFeDTrainer needs num_passes >= 1, got {self.num_passes}")
        if self.ds_weights not in ("nnunet", "paper"):
            raise ValueError(f"LeFeDTrainer.ds_weights must be 'nnunet' or 'paper', got {self.ds_weights!r}")
        self.unlabeled_loss_weight = self.consistency_weight
        if self.paper_schedule:
            self.initial_lr, self.weight_decay = 0.01, 1e-4

    @property
    def passes_per_iteration(self) -> int:
        return int(self.num_passes)

    # ---- loss and optimiser ------------------------------------------------------------------------
    def _build_loss(self):
        loss = super()._build_loss()
        base = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        if self.dice_only:
            base.weight_ce = 0   # nnU-Net's DC_and_CE / DC_and_BCE skip the CE term at weight 0
        self.segmentation_loss = base
        if isinstance(loss, DeepSupervisionWrapper) and self.ds_weights == "paper":
            first = self.network_class.class_for_plans(self.configuration_manager).first_side_level
            loss = DeepSupervisionWrapper(base, paper_ds_weights(len(loss.weight_factors), first, ddp=self.is_ddp))
        return loss

    def configure_optimizers(self):
        if not self.paper_schedule:
            return super().configure_optimizers()
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, momentum=0.9,
                                    weight_decay=self.weight_decay)
        return optimizer, IterationStepLRScheduler(optimizer, self.initial_lr, self.num_epochs,
                                                   self.num_iterations_per_epoch, decay_every=2500, gamma=0.1)

    # ---- the passes ---------------------------------------------------------------------------------
    def forward(self, batch: dict) -> LeFeDOutput:
        return self.network(batch["data"], feedback=batch.get("feedback"), both=True)

    def next_pass(self, batch: dict, output: LeFeDOutput) -> dict:
        return {**batch, "feedback": discrepancy_feedback(output.features1, output.features2, self.feedback_scale)}

    @staticmethod
    def decoder1_outputs(output: LeFeDOutput):
        """Decoder 1's outputs in nnU-Net's form (list highest resolution first, or the tensor)."""
        return [output.seg1, *output.side1] if output.side1 else output.seg1

    def labeled_loss(self, output: LeFeDOutput, batch: dict):
        target = batch["target"]   # a list per deep-supervision scale when decoder 1 has side outputs
        dec1 = self.loss(self.decoder1_outputs(output), target)
        dec2 = self.segmentation_loss(output.seg2, target[0] if isinstance(target, list) else target)
        return dec1 + self.decoder2_weight * dec2, {"decoder1_loss": dec1.detach(), "decoder2_loss": dec2.detach()}

    def unlabeled_loss(self, output: LeFeDOutput, batch: dict):
        # over the class axis of a batch (nnU-Net's label_manager.apply_inference_nonlin works on one case)
        nonlin = torch.sigmoid if self.label_manager.has_regions else (lambda t: torch.softmax(t, 1))
        return F.mse_loss(nonlin(output.seg1.float()), nonlin(output.seg2.float())), {}

    def online_evaluation(self, output: LeFeDOutput, batch: dict) -> dict:
        return super().online_evaluation(self.decoder1_outputs(output), batch)
