"""Official CoTr checkpoints (YtongXie/CoTr, ``ResTranUnet``) -> our :class:`~nnunet_plugins.architectures.cotr.CoTr`.

The official trainer (nnU-Net v1) saves ``{'state_dict': ...}`` of ``ResTranUnet``, whose parameters live
under ``U_ResTran3D.`` (and ``module.`` when trained with DataParallel):

==========================================================  =============================================
official (``U_ResTran3D.`` stripped)                        ours
==========================================================  =============================================
backbone.conv1 / norm1                                      backbone.stem.conv / norm
backbone.layer{k}.{j}.conv1 / norm1 / downsample.{0,1}      backbone.stages.{k-1}.{j}.conv / norm / shortcut.{0,1}
encoder_Detrans.level_embed                                 transformer.level_embed
encoder_Detrans.encoder.layers.{i}.*                        transformer.layers.{i}.* (same inner names)
transposeconv_stage{s}                                      decoder.upconvs.{2-s}
stage{s}_de.resconv{r}.conv / norm                          decoder.blocks.{2-s}.conv{r}.conv / norm
ds{s}_cls_conv / cls_conv                                   decoder.ds_heads.{2-s} / decoder.seg_head
==========================================================  =============================================

Official weights were trained with the official deformable-attention axis order: the network must be
built with ``official_axis_order=True`` (the model folder's plans say so).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import Tensor

from nnunet_plugins.checkpoints.common import (
    CheckpointMismatch, convert_with, read_checkpoint, rules_renamer, unwrap_state_dict,
)

#: official wrapper modules whose name prefixes every parameter
PREFIXES = ("U_ResTran3D.",)
#: constructor arguments of the official network beyond CoTr's defaults
OFFICIAL_ARCH_KWARGS = {"official_axis_order": True}

#: official name (prefixes stripped) -> ours
official_to_ours_name = rules_renamer([
    (r"backbone\.conv1\.(.+)", r"backbone.stem.conv.\1"),
    (r"backbone\.norm1\.(.+)", r"backbone.stem.norm.\1"),
    (r"backbone\.layer([123])\.(\d+)\.conv1\.(.+)", lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}.conv.{m[3]}"),
    (r"backbone\.layer([123])\.(\d+)\.norm1\.(.+)", lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}.norm.{m[3]}"),
    (r"backbone\.layer([123])\.(\d+)\.downsample\.([01])\.(.+)",
     lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}.shortcut.{m[3]}.{m[4]}"),
    (r"encoder_Detrans\.level_embed", "transformer.level_embed"),
    (r"encoder_Detrans\.encoder\.layers\.(\d+)\.(.+)", r"transformer.layers.\1.\2"),
    (r"transposeconv_stage([012])\.(.+)", lambda m: f"decoder.upconvs.{2 - int(m[1])}.{m[2]}"),
    (r"stage([012])_de\.resconv([12])\.(conv|norm)\.(.+)",
     lambda m: f"decoder.blocks.{2 - int(m[1])}.conv{m[2]}.{m[3]}.{m[4]}"),
    (r"ds([012])_cls_conv\.(.+)", lambda m: f"decoder.ds_heads.{2 - int(m[1])}.{m[2]}"),
    (r"cls_conv\.(.+)", r"decoder.seg_head.\1"),
])


def convert_state_dict(official: Mapping[str, Tensor], network: torch.nn.Module) -> dict:
    """``network``'s state dict from an official one (prefixes stripped, see :func:`unwrap_state_dict`);
    raises :class:`CheckpointMismatch` naming every missing, extra or mis-shaped tensor."""
    return convert_with(official, official_to_ours_name, network, "CoTr")


def convert_official_cotr_state_dict(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Rename an official CoTr state dict (with or without 'module.' / 'U_ResTran3D.') to our names.

    Raises :class:`CheckpointMismatch` listing every key that is not a CoTr parameter.
    """
    state = unwrap_state_dict(state_dict, "official CoTr state dict", PREFIXES)
    out, unknown = OrderedDict(), []
    for key, value in state.items():
        name = official_to_ours_name(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise CheckpointMismatch(f"{len(unknown)} keys are not parameters of the official CoTr network, e.g. "
                                 f"{unknown[:5]}")
    return out


def load_official_cotr_weights(model, checkpoint, *, allow_axis_order_mismatch: bool = False,
                               allow_pickle: bool = False) -> None:
    """Load official CoTr weights (a state dict, a checkpoint dict wrapping one, or a path) into ``model``;
    strict: :class:`CheckpointMismatch` names every missing, extra or mis-shaped tensor.

    ``model`` must be built with ``official_axis_order=True`` unless ``allow_axis_order_mismatch``
    (e.g. for fine-tuning).
    """
    if not model.official_axis_order and not allow_axis_order_mismatch:
        raise ValueError("official CoTr weights expect the official deformable-attention axis order: build "
                         "CoTr(..., official_axis_order=True) or pass allow_axis_order_mismatch=True")
    source = "official CoTr checkpoint"
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        source = str(checkpoint)
        checkpoint = read_checkpoint(str(checkpoint), allow_pickle)
    weights = convert_state_dict(unwrap_state_dict(checkpoint, source, PREFIXES), model)
    model.load_state_dict(weights, strict=True)
