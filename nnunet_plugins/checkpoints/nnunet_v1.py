"""nnU-Net v1 ``Generic_UNet`` parameter names -> dynamic-network-architectures names (BA-Net, UniSeg).

The official BA-Net (``generic_BANetV2``) and UniSeg (``UniSeg_model``) are nnU-Net v1 ``Generic_UNet``
subclasses (strided-conv pooling, transposed-conv upsampling); our networks are built from
dynamic-network-architectures blocks (``PlainConvEncoder`` / ``UNetDecoder``):

=================================================  ============================================
official (v1)                                      ours
=================================================  ============================================
conv_blocks_context.{d}.blocks.{i}.conv / instnorm  encoder.stages.{d}.0.convs.{i}.conv / norm
conv_blocks_context.{last}.0.blocks.{i}             encoder.stages.{last}.0.convs.{i}
conv_blocks_context.{last}.1.blocks.{j}             encoder.stages.{last}.0.convs.{n0 + j}
conv_blocks_localization.{u}.0 / .1 (same rule)     decoder.stages.{u}.convs.{i}
tu.{u}                                              decoder.transpconvs.{u}
seg_outputs.{u}                                     decoder.seg_layers.{u}
=================================================  ============================================

v1 splits the bottleneck and every decoder stage into two ``StackedConvLayers`` (``.0`` with n-1 convs,
``.1`` with the last); their blocks are numbered on in one ``StackedConvBlocks`` here (``n0`` = blocks of
part ``.0``). ``u`` counts decoder stages from the bottleneck in both.
"""
from __future__ import annotations

import re
from collections import defaultdict

from nnunet_plugins.checkpoints.common import CheckpointMismatch

_BLOCK = r"(?:([01])\.)?blocks\.(\d+)\.(conv|instnorm)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
_STAGE = re.compile(r"^(\w+?)\.(\d+)\." + _BLOCK)
_SINGLE = re.compile(r"^(\w+?)\.(\d+)\.(weight|bias)$")
_LAYER = {"conv": "conv", "instnorm": "norm"}

#: v1 module lists -> our module paths of a plain U-Net
UNET_STAGES = {"conv_blocks_context": "encoder.stages.{s}.0", "conv_blocks_localization": "decoder.stages.{s}"}
UNET_SINGLES = {"tu": "decoder.transpconvs", "seg_outputs": "decoder.seg_layers"}


class V1UNetNames:
    """Callable ``official name -> our name or None`` for a v1 state dict ``state``.

    ``stages``: v1 ``StackedConvLayers`` lists -> our stage path (``{s}`` = stage index); ``singles``:
    v1 lists of single layers -> our ModuleList path.
    """

    def __init__(self, state, stages: dict = UNET_STAGES, singles: dict = UNET_SINGLES):
        self.stages, self.singles = stages, singles
        self.first_part = defaultdict(int)  # (list, stage) -> conv blocks in part .0
        for key in state:
            m = _STAGE.match(key)
            if m and m.group(1) in stages and m.group(3) == "0" and m.group(5) == "conv" and m.group(6) == "weight":
                self.first_part[(m.group(1), m.group(2))] += 1

    def __call__(self, key: str) -> str | None:
        m = _STAGE.match(key)
        if m and m.group(1) in self.stages:
            which, stage, part, block, layer, what = m.groups()
            block = int(block) + (self.first_part[(which, stage)] if part == "1" else 0)
            return f"{self.stages[which].format(s=stage)}.convs.{block}.{_LAYER[layer]}.{what}"
        m = _SINGLE.match(key)
        if m and m.group(1) in self.singles:
            return f"{self.singles[m.group(1)]}.{m.group(2)}.{m.group(3)}"
        return None


def _shape(state: dict, key: str, what: str) -> tuple:
    if key not in state:
        raise CheckpointMismatch(f"official checkpoint lacks {key!r}; is this {what}?")
    return tuple(state[key].shape)


def infer_v1_unet(state: dict, what: str, stem_weight: str = "conv_blocks_context.0.blocks.0.conv.weight") -> dict:
    """The U-Net of a v1 state dict from its tensor shapes: dynamic-network-architectures constructor
    arguments (``n_stages``, ``features_per_stage``, ``kernel_sizes``, ``strides``, ``n_conv_per_stage``,
    ``n_conv_per_stage_decoder``, ``conv_bias``) plus ``dim``, ``input_channels``, ``num_classes``,
    ``batch_norm``. ``stem_weight``: the stage-0 first convolution (UniSeg has one per channel count)."""
    num_pool = len({m.group(2) for k in state if (m := _SINGLE.match(k)) and m.group(1) == "tu"})
    if num_pool == 0:
        raise CheckpointMismatch(f"not {what}: no 'tu.*' transposed convolutions in its state dict")
    blocks = defaultdict(int)  # stage -> conv blocks (both parts)
    for k in state:
        if (m := _STAGE.match(k)) and m.group(1) == "conv_blocks_context" and m.group(6) == "weight" \
                and m.group(5) == "conv":
            blocks[int(m.group(2))] += 1
    features, kernels, n_conv = [], [], []
    for d in range(num_pool + 1):
        if d == 0:
            first = stem_weight
        elif d < num_pool:
            first = f"conv_blocks_context.{d}.blocks.0.conv.weight"
        else:  # the bottleneck is a Sequential of two StackedConvLayers
            first = f"conv_blocks_context.{d}.0.blocks.0.conv.weight"
        shape = _shape(state, first, what)
        if d == 0:
            input_channels = shape[1]
        features.append(shape[0])
        kernels.append(list(shape[2:]))
        n_conv.append(blocks[d] + (1 if d == 0 and stem_weight != "conv_blocks_context.0.blocks.0.conv.weight" else 0))
    dim = len(kernels[0])
    strides = [[1] * dim]
    for d in range(1, num_pool + 1):
        strides.append(list(_shape(state, f"tu.{num_pool - d}.weight", what)[2:]))  # tu.{u} undoes pool -(u+1)
    n_conv_decoder = [sum(1 for k in state if re.match(rf"^conv_blocks_localization\.{u}\.\d+\.blocks\.\d+\.conv\."
                                                       rf"weight$", k)) for u in range(num_pool)]
    return dict(input_channels=input_channels, n_stages=num_pool + 1, features_per_stage=features, dim=dim,
                kernel_sizes=kernels, strides=strides, n_conv_per_stage=n_conv, n_conv_per_stage_decoder=n_conv_decoder,
                num_classes=_shape(state, "seg_outputs.0.weight", what)[0],
                conv_bias="conv_blocks_context.1.blocks.0.conv.bias" in state,
                batch_norm=any(k.endswith("running_mean") for k in state))


def plans_ops(dim: int, batch_norm: bool = False) -> dict:
    """nnU-Net v1's building blocks as plans ``arch_kwargs`` (strings; listed in ``_kw_requires_import``)."""
    norm = (f"torch.nn.modules.batchnorm.BatchNorm{dim}d" if batch_norm
            else f"torch.nn.modules.instancenorm.InstanceNorm{dim}d")
    return dict(conv_op=f"torch.nn.modules.conv.Conv{dim}d", norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU",
                nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})


REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
