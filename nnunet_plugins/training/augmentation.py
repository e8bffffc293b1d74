"""nnU-Net's training and validation transforms of a trainer, built exactly as ``nnUNetTrainer.get_dataloaders``
builds them, for loaders that replace nnU-Net's (multi-task, semi-supervised)."""
from __future__ import annotations

from typing import NamedTuple


class NnUNetTransforms(NamedTuple):
    train: object              # batchgeneratorsv2 transform for training samples
    val: object                # ... for validation samples
    patch_size: tuple          # the configuration's patch size (final, after augmentation)
    initial_patch_size: tuple  # the larger patch a training sample is cropped with before augmentation


def nnunet_transforms(trainer) -> NnUNetTransforms:
    """The trainer's ``get_training_transforms`` / ``get_validation_transforms`` with the arguments nnU-Net's
    ``get_dataloaders`` passes (deep-supervision scales, rotation, dummy 2-D augmentation, mirroring, mask
    for normalisation, cascade, labels/regions, ignore label)."""
    patch_size = tuple(trainer.configuration_manager.patch_size)
    ds_scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    lm = trainer.label_manager
    label_kwargs = dict(is_cascaded=trainer.is_cascaded, foreground_labels=lm.foreground_labels,
                        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    train = trainer.get_training_transforms(patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
                                            use_mask_for_norm=trainer.configuration_manager.use_mask_for_norm,
                                            **label_kwargs)
    val = trainer.get_validation_transforms(ds_scales, **label_kwargs)
    return NnUNetTransforms(train, val, patch_size, tuple(initial_patch_size))
