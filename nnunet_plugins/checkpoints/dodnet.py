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

from typing import Mapping

import torch
from torch import Tensor

from nnunet_plugins.checkpoints.common import convert_with, rules_renamer

#: constructor arguments of the official network beyond DoDNet's defaults (none: the defaults are official)
OFFICIAL_ARCH_KWARGS: dict = {}

#: NoBottleneck's layers -> ours (PreActResidualBlock)
_BLOCK = {"gn1": "norm1", "conv1": "conv1", "gn2": "norm2", "conv2": "conv2", "downsample.0": "shortcut.0",
          "downsample.2": "shortcut.2"}
_BLOCK_RE = r"(gn1|conv1|gn2|conv2|downsample\.0|downsample\.2)\.(weight|bias)"


def official_names(num_stages: int = 5):
    """Callable ``official name -> ours or None`` for a DoDNet with ``num_stages`` encoder stages."""
    scales = {str(2 ** (num_stages - 2 - i)): i for i in range(num_stages - 1)}  # x8_resb -> decoder_blocks.0 ...
    return rules_renamer([
        (r"conv1\.weight", "stem.weight"),
        (rf"layer(\d+)\.(\d+)\.{_BLOCK_RE}", lambda m: f"encoder_stages.{m[1]}.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"),
        (r"fusionConv\.([02])\.(weight|bias)", r"fusion.\1.\2"),
        (rf"x({'|'.join(scales)})_resb\.0\.{_BLOCK_RE}",
         lambda m: f"decoder_blocks.{scales[m[1]]}.{_BLOCK[m[2]]}.{m[3]}"),
        (r"precls_conv\.([02])\.(weight|bias)", r"pre_head.\1.\2"),
        (r"GAP\.0\.(weight|bias)", r"gap_norm.\1"),
        (r"controller\.(weight|bias)", r"controller.\1"),
    ])


def convert_state_dict(official: Mapping[str, Tensor], network: torch.nn.Module) -> dict:
    """``network``'s state dict from an official DoDNet one (prefixes stripped); raises
    :class:`~nnunet_plugins.checkpoints.common.CheckpointMismatch` naming every tensor that does not fit."""
    return convert_with(official, official_names(len(network.encoder_stages)), network, "DoDNet")
