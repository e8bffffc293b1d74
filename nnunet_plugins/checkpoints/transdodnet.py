"""Official TransDoDNet checkpoints (jianpengz/DoDNet, ``TransDoD/``) -> our
:class:`~nnunet_plugins.architectures.transdodnet.TransDoDNet`.

The official training script saves ``{'state_dict': model.state_dict(), 'optimizer', 'epoch'[, 'amp']}`` of
``TransDoDNet``, which wraps everything in ``ResCNN_DeformTR`` (and ``module.`` under DDP):

=====================================================  ==================================================
official (``ResCNN_DeformTR.`` stripped)               ours
=====================================================  ==================================================
backbone.conv1 / norm1 / conv2 / norm2                 backbone.stem.0.0 / stem.0.1 / stem.1.0 / stem.1.1
backbone.layer{k}.{j}.conv{1,2,3} / norm{1,2,3}        backbone.stages.{k-1}.{j}.(same)
backbone.layer{k}.{j}.downsample.{0,1}                 backbone.stages.{k-1}.{j}.shortcut.{0,1}
input_proj.{l}.{0,1}                                   input_proj.{l}.{0,1}
transformer.level_embed                                encoder.level_embed
transformer.encoder.layers.{i}.*                       encoder.layers.{i}.* (same inner names)
transformer.reference_points                           reference_points
transformer.decoder.layers.{i}.self_attn / cross_attn  decoder_layers.{i}.self_attn / cross_attn
transformer.decoder.layers.{i}.norm2 (after self-att)  decoder_layers.{i}.norm1
transformer.decoder.layers.{i}.norm1 (after cross-att) decoder_layers.{i}.norm2
transformer.decoder.layers.{i}.norm3, linear1, linear2 decoder_layers.{i}.norm3, linear1, linear2
query_embed, controller.{0,2}                          query_embed, controller.{0,2}
memory_conv3_l0.{0,1} / cnn_bottle.{0,1}               memory_proj.{0,1} / bottleneck_proj.{0,1}
shortcut_conv{l}.{0,1}                                 skip_projs.{L-2-l}.{0,1}
transposeconv_stage{l}                                 upconvs.{L-2-l}
stage{l}_de.conv{1,2} / norm{1,2}                      decoder_blocks.{L-2-l}.(same)
precls_conv.{0,1}                                      pre_head.{0,1}
=====================================================  ==================================================

(L = backbone levels = stages + 1, official 5.) The decoder-layer norms are mapped BY MEANING: the
official ``DeformableTransformerDecoderLayer`` (``forward_post``) normalises the self-attention residual
with ``norm2`` and the cross-attention residual with ``norm1``; ours call them ``norm1`` and ``norm2`` in
the order they are applied. (The encoder layers' ``norm1`` / ``norm2`` are in the same order in both.)

Official weights need ``official_offset_normalizer=True`` and ``official_axis_order=True`` (the official
attention); the model folder's plans set both. The official network with ``add_memory=2`` (the default)
is ``memory_fusion="both"``; official ``cnn_bottle`` weights exist in every official checkpoint, so one
trained with ``add_memory=1`` carries tensors our ``memory_fusion="transformer"`` network has no place for
(they are named in the error).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from nnunet_plugins.checkpoints.common import convert_with, rules_renamer

PREFIXES = ("ResCNN_DeformTR.",)
OFFICIAL_ARCH_KWARGS = {"official_offset_normalizer": True, "official_axis_order": True}

_DECODER_LAYER_NORMS = {"norm1": "norm2", "norm2": "norm1", "norm3": "norm3"}
_STEM = {"conv1": "stem.0.0", "norm1": "stem.0.1", "conv2": "stem.1.0", "norm2": "stem.1.1"}


def official_names(num_levels: int = 5):
    """Callable ``official name -> ours or None`` for a TransDoDNet whose backbone has ``num_levels``
    levels (stem + stages)."""
    def up(level: str) -> int:  # the official decoder names its steps by level (deepest skip first)
        return num_levels - 2 - int(level)

    return rules_renamer([
        (r"(input_proj|query_embed|controller)\.(.+)", r"\1.\2"),
        (r"backbone\.(conv1|norm1|conv2|norm2)\.(weight|bias)", lambda m: f"backbone.{_STEM[m[1]]}.{m[2]}"),
        (r"backbone\.layer(\d+)\.(\d+)\.(conv[123]|norm[123])\.(weight|bias)",
         lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
        (r"backbone\.layer(\d+)\.(\d+)\.downsample\.([01])\.(weight|bias)",
         lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}.shortcut.{m[3]}.{m[4]}"),
        (r"transformer\.level_embed", "encoder.level_embed"),
        (r"transformer\.encoder\.layers\.(\d+)\.(.+)", r"encoder.layers.\1.\2"),
        (r"transformer\.reference_points\.(weight|bias)", r"reference_points.\1"),
        (r"transformer\.decoder\.layers\.(\d+)\.(norm[123])\.(weight|bias)",
         lambda m: f"decoder_layers.{m[1]}.{_DECODER_LAYER_NORMS[m[2]]}.{m[3]}"),
        (r"transformer\.decoder\.layers\.(\d+)\.((?:self_attn|cross_attn|linear[12])\..+)", r"decoder_layers.\1.\2"),
        (r"memory_conv3_l0\.([01])\.(weight|bias)", r"memory_proj.\1.\2"),
        (r"cnn_bottle\.([01])\.(weight|bias)", r"bottleneck_proj.\1.\2"),
        (r"shortcut_conv(\d+)\.([01])\.(weight|bias)", lambda m: f"skip_projs.{up(m[1])}.{m[2]}.{m[3]}"),
        (r"transposeconv_stage(\d+)\.weight", lambda m: f"upconvs.{up(m[1])}.weight"),
        (r"stage(\d+)_de\.(conv[12]|norm[12])\.(weight|bias)", lambda m: f"decoder_blocks.{up(m[1])}.{m[2]}.{m[3]}"),
        (r"precls_conv\.([01])\.(weight|bias)", r"pre_head.\1.\2"),
    ])


def convert_state_dict(official: Mapping[str, Tensor], network: torch.nn.Module) -> dict:
    """``network``'s state dict from an official TransDoDNet one (prefixes stripped); raises
    :class:`~nnunet_plugins.checkpoints.common.CheckpointMismatch` naming every tensor that does not fit."""
    return convert_with(official, official_names(len(network.backbone.out_channels)), network, "TransDoDNet")
