"""Official DoDNet checkpoints (jianpengz/DoDNet, ``a_DynConv/unet3D_DynConv882.py``) -> our
:class:`~nnunet_plugins.architectures.dodnet.DoDNet`.

The official training script saves ``model.state_dict()`` (or ``{'model': ..., 'optimizer': ..., 'amp': ...}``
with FP16; ``module.`` prefixes under DataParallel) of ``unet3D``:

==================================================  ===============================================
official                                            ours
==================================================  ===============================================
conv1                                               stem
layer{k}.{j}.gn1 / conv1 / gn2 / conv2              encoder_stages.{k}.{j}.norm1 / conv1 / norm2 / conv2
layer{k}.{j}.downsample.0 (GN) / .2 (conv)          encoder_stages.{k}.{j}.shortcut.0 / .2
fusionConv.0 (GN) / .2 (conv)                       fusion.0 / .2
x8_resb / x4_resb / x2_resb / x1_resb .0.*          decoder_blocks.0 / 1 / 2 / 3 .* (inner names as above)
precls_conv.0 (GN) / .2 (conv)                      pre_head.0 / .2
GAP.0 (GN)                                          gap_norm
controller                                          controller
==================================================  ===============================================

The official decoder blocks are named by their output scale (``x8`` = 1/8 of the input); with S encoder
stages ours are ``decoder_blocks.i`` = ``x{2**(S-2-i)}_resb``. The official network is our default
configuration (weight-standardised convs, 16 groups, 7 tasks, 2 outputs); its ``controller`` input
(256 + 7) fixes the number of tasks, so a model folder's dataset must have as many tasks.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from nnunet_plugins.checkpoints.common import convert_with

#: constructor arguments of the official network beyond DoDNet's defaults (none: the defaults are official)
OFFICIAL_ARCH_KWARGS: dict = {}

_BLOCK = {"gn1": "norm1", "conv1": "conv1", "gn2": "norm2", "conv2": "conv2", "downsample.0": "shortcut.0",
          "downsample.2": "shortcut.2"}
_BLOCK_RE = re.compile(r"(gn1|conv1|gn2|conv2|downsample\.0|downsample\.2)\.(weight|bias)")
_DECODER = re.compile(r"x(\d+)_resb\.0\.(.+)")
_SIMPLE = {"conv1.weight": "stem.weight", "fusionConv.0.weight": "fusion.0.weight", "fusionConv.0.bias": "fusion.0.bias",
           "fusionConv.2.weight": "fusion.2.weight", "GAP.0.weight": "gap_norm.weight", "GAP.0.bias": "gap_norm.bias",
           "controller.weight": "controller.weight", "controller.bias": "controller.bias"}
_SEQ = re.compile(r"precls_conv\.([02])\.(weight|bias)")


def official_names(num_stages: int = 5):
    """Callable ``official name -> ours or None`` for a DoDNet with ``num_stages`` encoder stages."""
    scales = {2 ** (num_stages - 2 - i): i for i in range(num_stages - 1)}

    def rename(key: str) -> str | None:
        if key in _SIMPLE:
            return _SIMPLE[key]
        if m := _SEQ.fullmatch(key):
            return f"pre_head.{m[1]}.{m[2]}"
        if m := re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", key):
            inner = _BLOCK_RE.fullmatch(m[3])
            return f"encoder_stages.{m[1]}.{m[2]}.{_BLOCK[inner[1]]}.{inner[2]}" if inner else None
        if m := _DECODER.fullmatch(key):
            inner = _BLOCK_RE.fullmatch(m[2])
            if inner and int(m[1]) in scales:
                return f"decoder_blocks.{scales[int(m[1])]}.{_BLOCK[inner[1]]}.{inner[2]}"
        return None

    return rename


def convert_state_dict(official: Mapping[str, Tensor], network: torch.nn.Module) -> dict:
    """``network``'s state dict from an official DoDNet one (prefixes stripped); raises
    :class:`~nnunet_plugins.checkpoints.common.CheckpointMismatch` naming every tensor that does not fit."""
    return convert_with(official, official_names(len(network.encoder_stages)), network, "DoDNet")
