"""BANetTrainer: BA-Net (Hu et al., KiPA22 / AMOS22) trained by nnU-Net v2.

What BA-Net changes relative to ``nnUNetTrainer`` and nothing else:

* the network: the plans' U-Net (``PlainConvUNet`` or, on ResEnc plans, ``ResidualEncoderUNet``) becomes
  its BA-Net counterpart with the same constructor arguments (``BANetPlainConvUNet`` /
  ``BANetResidualEncoderUNet``: shared encoder, boundary decoder, boundary-gated segmentation decoder).
  The decoders have the official network's layout (``official_v1_layout``: nnU-Net v1's decoder kernels,
  no bias in transposed / output convolutions), so ordinary nnU-Net v2 plans give the official parameter
  count. Plans may set ``official_v1_layout: false`` in ``arch_kwargs`` (optionally naming a BA-Net class
  directly) for nnU-Net v2's decoder layout, whose encoder and segmentation path are named and shaped as
  nnU-Net's own U-Net;
* the targets: ``BoundaryTargetTransform`` is inserted into nnU-Net's training and validation pipelines
  right before the deep-supervision downsampling, so the boundary is computed once on the augmented
  full-resolution patch and downsampled exactly like the segmentation (it travels as the last target
  channel; ``_split_target`` separates it again);
* the loss: deep-supervised Dice+CE on the segmentation + deep-supervised Dice+CE on the boundary
  (2 classes, Dice on the boundary class), 1:1, with nnU-Net's deep-supervision weights for both, as the
  official ``BANetV2Trainer``. The official code also carries a consistency term (boundary prediction vs
  the boundary of the predicted segmentation) that it keeps switched off; here it is
  ``consistency_weight`` (0 = off, the default) starting at ``consistency_start`` x num_epochs (the
  official's commented-out condition is "second half of training"); ``BANetTrainer_consistency`` turns
  it on;
* ``set_deep_supervision_enabled`` switches deep supervision of both decoders.

Optimiser, schedule, augmentation, sampling, checkpointing and inference are nnU-Net's (the official
trainer uses nnU-Net v1's defaults: SGD 1e-2, poly, 1000 x 250, gradient clipping 12). Inference uses
only the segmentation decoder's full-resolution output, so ``nnUNetv2_predict -tr BANetTrainer`` writes
ordinary segmentations. Logged losses: ``loss`` is the optimised total (segmentation + boundary (+
consistency)); the segmentation and boundary parts are printed per epoch.

Region-based training (``regions_class_order`` in dataset.json) is not supported: BA-Net's boundary is
defined on a label map and its segmentation loss is softmax Dice+CE.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_plugins.architectures.banet import BANetUNet
from nnunet_plugins.training.boundary import BoundaryTargetTransform, inner_boundary
from nnunet_plugins.trainers.base import PluginTrainer

# value of the boundary target where the segmentation carries nnU-Net's ignore label
BOUNDARY_IGNORE_VALUE = 2


def insert_boundary_transform(pipeline: BasicTransform, ignore_label: int | None = None) -> ComposeTransforms:
    """Insert ``BoundaryTargetTransform`` before the deep-supervision downsampling (or append it)."""
    if not isinstance(pipeline, ComposeTransforms):
        pipeline = ComposeTransforms([pipeline])
    transforms = list(pipeline.transforms)
    position = next((i for i, t in enumerate(transforms) if isinstance(t, DownsampleSegForDSTransform)),
                    len(transforms))
    transforms.insert(position, BoundaryTargetTransform(channel=0, ignore_label=ignore_label,
                                                        ignore_value=BOUNDARY_IGNORE_VALUE))
    pipeline.transforms = transforms
    return pipeline


def _check_no_regions(regions) -> None:
    if regions is not None:
        raise ValueError("BANetTrainer does not support region-based training (dataset.json "
                         "'regions_class_order'): BA-Net's boundary targets are defined on label maps")


class BANetTrainer(PluginTrainer):
    # the BA-Net counterpart of the plans' U-Net (plain or residual encoder); fails at construction on others
    network_class = BANetUNet
    consistency_weight: float = 0.0  # official: term present but switched off
    consistency_start: float = 0.5  # fraction of num_epochs after which the term is active when enabled

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions:
            _check_no_regions(self.label_manager.foreground_regions)
        self.boundary_loss = None

    # ----------------------------------------------------------------------------------------- targets
    @staticmethod
    def get_training_transforms(patch_size: Union[np.ndarray, Tuple[int]], rotation_for_DA,
                                deep_supervision_scales: Union[List, Tuple, None], mirror_axes: Tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: List[bool] = None,
                                is_cascaded: bool = False, foreground_labels=None, regions=None,
                                ignore_label: int = None) -> BasicTransform:
        _check_no_regions(regions)
        pipeline = PluginTrainer.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        return insert_boundary_transform(pipeline, ignore_label)

    @staticmethod
    def get_validation_transforms(deep_supervision_scales: Union[List, Tuple, None], is_cascaded: bool = False,
                                  foreground_labels=None, regions=None, ignore_label: int = None) -> BasicTransform:
        _check_no_regions(regions)
        pipeline = PluginTrainer.get_validation_transforms(
            deep_supervision_scales, is_cascaded=is_cascaded, foreground_labels=foreground_labels, regions=regions,
            ignore_label=ignore_label)
        return insert_boundary_transform(pipeline, ignore_label)

    @staticmethod
    def _split_target(target):
        """(segmentation targets, boundary targets): the boundary is the last target channel."""
        if isinstance(target, (list, tuple)):
            return [t[:, :-1] for t in target], [t[:, -1:] for t in target]
        return target[:, :-1], target[:, -1:]

    # ----------------------------------------------------------------------------------------- loss
    def _build_loss(self):
        seg_loss = super()._build_loss()
        self.boundary_loss = self._build_boundary_loss(seg_loss)
        return seg_loss

    def _build_boundary_loss(self, seg_loss):
        """Dice+CE on the 2-class boundary output (Dice on the boundary class), deep-supervised like seg_loss."""
        ignore = BOUNDARY_IGNORE_VALUE if self.label_manager.ignore_label is not None else None
        loss = DC_and_CE_loss({"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False,
                               "ddp": self.is_ddp}, {}, weight_ce=1, weight_dice=1, ignore_label=ignore,
                              dice_class=MemoryEfficientSoftDiceLoss)
        if isinstance(seg_loss, DeepSupervisionWrapper):
            loss = DeepSupervisionWrapper(loss, seg_loss.weight_factors)
        return loss

    def _consistency_active(self) -> bool:
        return self.consistency_weight > 0 and self.current_epoch >= self.consistency_start * self.num_epochs

    @staticmethod
    def predicted_boundaries(seg_output):
        """Boundary targets of the predicted segmentation (argmax) at every output scale (no gradient)."""
        with torch.no_grad():
            outputs = seg_output if isinstance(seg_output, (list, tuple)) else [seg_output]
            targets = [inner_boundary(o.argmax(1, keepdim=True), o.ndim - 2).to(torch.int16) for o in outputs]
        return targets if isinstance(seg_output, (list, tuple)) else targets[0]

    def compute_losses(self, seg_output, bdr_output, target) -> dict:
        seg_target, bdr_target = self._split_target(target)
        losses = {"seg_loss": self.loss(seg_output, seg_target), "boundary_loss": self.boundary_loss(bdr_output, bdr_target)}
        total = losses["seg_loss"] + losses["boundary_loss"]
        if self._consistency_active():
            losses["consistency_loss"] = self.boundary_loss(bdr_output, self.predicted_boundaries(seg_output))
            total = total + self.consistency_weight * losses["consistency_loss"]
        losses["loss"] = total
        return losses

    # ----------------------------------------------------------------------------------------- steps
    def forward(self, batch: dict):
        return self.network(batch["data"], return_boundary=True)

    def compute_loss(self, output, batch: dict):
        losses = self.compute_losses(*output, batch["target"])
        return losses.pop("loss"), losses

    def online_evaluation(self, output, batch: dict) -> dict:
        # pseudo Dice on the segmentation only
        seg_target, _ = self._split_target(batch["target"])
        return super().online_evaluation(output[0], {**batch, "target": seg_target})

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        self._print_loss_parts("train", train_outputs)

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        self._print_loss_parts("val", val_outputs)

    def _print_loss_parts(self, which: str, outputs: List[dict]) -> None:
        collated = collate_outputs(outputs)
        parts = {k: float(np.mean(collated[k])) for k in ("seg_loss", "boundary_loss", "consistency_loss")
                 if k in collated}
        self.print_to_log_file(f"{which} " + ", ".join(f"{k} {v:.4f}" for k, v in parts.items()))


class BANetTrainer_consistency(BANetTrainer):
    """BA-Net with the official code's (disabled) seg/boundary consistency term switched on (weight 1,
    second half of training)."""

    consistency_weight = 1.0
