"""BA-Net: boundary-aware U-Net with one shared encoder and two decoders.

Papers: Hu, Zhang, Xia. "Boundary-aware network for kidney tumor segmentation", MLMI 2020; Hu, Liao, Ye,
Xia. "Boundary-Aware Network for Kidney Parsing", KiPA 2022 (LNCS 13648); Hu, Liao, Xia. "Boundary-Aware
Network for Abdominal Multi-Organ Segmentation", AMOS 2022 (arXiv:2208.13774). Official code: the nnU-Net
v1 fork ShishuaiHu/BA-Net (``generic_BANetV2``).

Architecture (composed from dynamic-network-architectures blocks, so every nnU-Net v2 plan builds it):

* one encoder (``PlainConvEncoder``, or ``ResidualEncoder`` for nnU-Net's ResEnc plans) whose skips feed
* a boundary decoder (``boundary_decoder``, a ``UNetDecoder`` with 2 outputs: background / boundary) and
* a segmentation decoder (``decoder``, a ``UNetDecoder`` with ``num_classes`` outputs) of identical
  structure and separate weights.

At every decoder stage ``s`` (lowest resolution first) the boundary decoder produces boundary logits
``b_s`` at that stage's resolution; the segmentation decoder's transposed-convolution output ``u_s`` is
re-weighted as ``u_s * (1 + softmax(b_s)[:, 1])`` BEFORE it is concatenated with the encoder skip. The
gate is not detached, so the segmentation loss trains the boundary decoder too. Both decoders are deeply
supervised at every scale.

The segmentation decoder is named ``decoder`` (as in ``PlainConvUNet``) so that nnU-Net's conventions
(``network.decoder.deep_supervision``) and the state-dict names of the encoder and the segmentation path
are those of nnU-Net's own U-Net; with ``official_v1_layout=False`` a plain nnU-Net v2 checkpoint
initialises the encoder and the segmentation path by name (shapes included).

Shapes (``d`` = 2 or 3 spatial axes, input ``x``: ``(B, input_channels, *spatial)``):

* ``forward(x)`` with deep supervision on: list of segmentation logits, highest resolution first,
  ``[(B, num_classes, *spatial), (B, num_classes, *spatial / strides[1]), ...]`` (one per decoder stage);
  with deep supervision off: ONE tensor ``(B, num_classes, *spatial)``. This is what nnU-Net's
  predictor uses, so inference only ever sees the segmentation decoder's full-resolution output.
* ``forward(x, return_boundary=True)``: the pair ``(segmentation, boundary)`` where ``boundary`` has the
  same structure as ``segmentation`` with 2 channels. The trainer uses this for its boundary loss.

Decoder layout (``official_v1_layout``, default True): the official network is nnU-Net v1's generic
U-Net (``Generic_UNet``) with a second decoder. nnU-Net v1 gives decoder stage ``s`` the convolution
kernel of the encoder stage BELOW the skip (the one it upsamples from) and has no bias in the
transposed convolutions and the 1x1 output convolutions (``seg_output_use_bias=False``). By default we
build exactly that layout, so the network has the official parameter count for the same plans (also
when ``BANetTrainer`` builds it from ordinary nnU-Net v2 plans) and the official checkpoints load by
shape (see ``nnunet_plugins.checkpoints.banet``): 48,366,848 parameters for 6 stages,
32..320 features, 1 input channel, 5 classes, 3x3x3 kernels; 47,521,056 with 16 classes, a (1, 3, 3)
first stage and in-plane-only first and last pooling (AMOS22-like plans). The plain nnU-Net U-Net has
31,198,009 in the first setting.

``official_v1_layout=False`` builds nnU-Net v2's ``UNetDecoder`` layout instead (decoder kernel of the
skip's stage, biases everywhere): the encoder and the segmentation path are then tensor for tensor
those of ``PlainConvUNet`` / ``ResidualEncoderUNet``, so plain nnU-Net v2 weights initialise them by
name (``load_state_dict(..., strict=False)`` leaves only ``boundary_decoder.*`` missing). Counts in
that layout: 48,368,483 and 47,412,154 for the two settings above. For isotropic kernels the layouts
differ only by the biases; with anisotropic kernels the decoder kernels differ too.
"""
from __future__ import annotations

from typing import List, Tuple, Type, Union

import torch
from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunet_plugins.architectures.blocks.unet_decoder import unet_decoder
from nnunet_plugins.architectures.contract import PlansNetwork, network_name, resolve_arch_kwargs, total_stride

def banet_network_class(plans_network_class: str) -> str:
    """The BA-Net network class (dotted path) for the architecture named in the plans."""
    if plans_network_class in BANET_COUNTERPARTS.values():
        return plans_network_class
    short = plans_network_class.rpartition(".")[2]
    if short in BANET_COUNTERPARTS:
        return BANET_COUNTERPARTS[short]
    raise ValueError(f"BA-Net needs plans with a U-Net architecture ({', '.join(BANET_COUNTERPARTS)}, or a BA-Net "
                     f"class), but the plans name {plans_network_class!r}; plan with nnUNetv2_plan_experiment "
                     f"(default planner or nnUNetPlannerResEncM/L/XL)")


BOUNDARY_CHANNELS = 2  # background / boundary, as the official boundary decoder


def boundary_attention(upsampled: torch.Tensor, boundary_logits: torch.Tensor) -> torch.Tensor:
    """BA-Net's gate: ``upsampled * (1 + softmax(boundary_logits)[:, 1])`` (broadcast over channels).

    Not detached: gradients of the segmentation loss reach the boundary decoder through it.
    """
    gate = 1.0 + torch.softmax(boundary_logits, dim=1)[:, 1:2]
    return upsampled * gate.to(upsampled.dtype)


class BANetUNet(PlansNetwork, AbstractDynamicNetworkArchitectures):
    """Shared encoder + boundary decoder + segmentation decoder; subclasses build the encoder.

    ``BANetUNet.from_plans`` builds the member of the family that matches the plans' U-Net
    (:func:`banet_network_class`), in the official decoder layout unless the plans set ``official_v1_layout``.
    """

    encoder: nn.Module

    def _build_decoders(self, num_classes: int, n_conv_per_stage_decoder, deep_supervision: bool,
                        nonlin_first: bool, official_v1_layout: bool) -> None:
        # identical structure, separate weights; the boundary decoder predicts background / boundary. The
        # official (nnU-Net v1) layout keeps no encoder copy in the decoders, as the official checkpoints
        decoders = [unet_decoder(self.encoder, c, n_conv_per_stage_decoder, deep_supervision, nonlin_first,
                                 official_v1_layout, register_encoder=not official_v1_layout)
                    for c in (BOUNDARY_CHANNELS, num_classes)]
        self.boundary_decoder, self.decoder = decoders
        self.official_v1_layout = official_v1_layout
        self.num_classes = num_classes

    # ---- nnU-Net contract -------------------------------------------------------------------------
    @classmethod
    def class_for_plans(cls, configuration_manager) -> type:
        from pydoc import locate

        return locate(banet_network_class(configuration_manager.network_arch_class_name))

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' U-Net arguments; the official layout unless the plans say otherwise (explicit, so plans
        without the key never depend on the class's default)."""
        cls.class_for_plans(configuration_manager)   # clear error for plans without a U-Net
        return {"official_v1_layout": True, **resolve_arch_kwargs(configuration_manager)}

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        return total_stride(kwargs["strides"], dim)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = enabled
        self.boundary_decoder.deep_supervision = enabled

    def forward(self, x: torch.Tensor, return_boundary: bool = False):
        skips = self.encoder(x)
        seg_dec, bdr_dec = self.decoder, self.boundary_decoder
        # read from the segmentation decoder, as nnU-Net's default set_deep_supervision_enabled sets only it
        deep_supervision = seg_dec.deep_supervision
        n = len(seg_dec.stages)
        seg_outputs, bdr_outputs = [], []
        seg, bdr = skips[-1], skips[-1]
        for s in range(n):
            skip = skips[-(s + 2)]
            bdr = bdr_dec.stages[s](torch.cat((bdr_dec.transpconvs[s](bdr), skip), 1))
            bdr_logits = bdr_dec.seg_layers[s](bdr)  # needed at every stage for the gate
            up = boundary_attention(seg_dec.transpconvs[s](seg), bdr_logits)  # gate BEFORE the concatenation
            seg = seg_dec.stages[s](torch.cat((up, skip), 1))
            if deep_supervision or s == n - 1:
                seg_outputs.append(seg_dec.seg_layers[s](seg))
                bdr_outputs.append(bdr_logits)
        seg_outputs, bdr_outputs = seg_outputs[::-1], bdr_outputs[::-1]  # highest resolution first
        if not deep_supervision:
            seg_outputs, bdr_outputs = seg_outputs[0], bdr_outputs[0]
        return (seg_outputs, bdr_outputs) if return_boundary else seg_outputs

    def compute_conv_feature_map_size(self, input_size):
        """Feature-map voxels for nnU-Net's planner memory estimate (encoder + both decoders)."""
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), \
            "give the spatial input size only, e.g. (x, y, z)"
        return (self.encoder.compute_conv_feature_map_size(input_size)
                + self.decoder.compute_conv_feature_map_size(input_size)
                + self.boundary_decoder.compute_conv_feature_map_size(input_size)
                # the gated copy of each transposed-conv output
                + self._gate_feature_map_size(input_size))

    def _gate_feature_map_size(self, input_size):
        import numpy as np

        total, size = 0, list(input_size)
        for s, stride in enumerate(self.encoder.strides[:-1]):
            size = [i // j for i, j in zip(size, stride)]
            total += int(np.prod([self.encoder.output_channels[s], *size], dtype=np.int64))
        return total


def _per_stage_counts(n_stages: int, **counts) -> list:
    """Encoder (``n_stages`` entries) and decoder (``n_stages - 1``) per-stage counts as lists, ints broadcast;
    keyword order: the encoder's count first, then ``n_conv_per_stage_decoder``."""
    (enc_name, enc), (dec_name, dec) = counts.items()
    enc = [enc] * n_stages if isinstance(enc, int) else list(enc)
    dec = [dec] * (n_stages - 1) if isinstance(dec, int) else list(dec)
    if len(enc) != n_stages or len(dec) != n_stages - 1:
        raise ValueError(f"{enc_name} needs {n_stages} entries and {dec_name} {n_stages - 1}, got {enc} and {dec}")
    return [enc, dec]


class BANetPlainConvUNet(BANetUNet):
    """BA-Net on nnU-Net's plain U-Net (``PlainConvUNet`` arguments, plus ``official_v1_layout``).

    Arguments are those of ``dynamic_network_architectures.architectures.unet.PlainConvUNet``:
    ``input_channels``, ``n_stages``, ``features_per_stage``, ``conv_op`` (Conv2d / Conv3d decides 2-D or
    3-D), ``kernel_sizes``, ``strides``, ``n_conv_per_stage``, ``num_classes``, ``n_conv_per_stage_decoder``,
    ``conv_bias``, ``norm_op(_kwargs)``, ``dropout_op(_kwargs)``, ``nonlin(_kwargs)``, ``deep_supervision``,
    ``nonlin_first``. ``official_v1_layout`` (default True): the official network's decoders (nnU-Net v1
    decoder kernels, no bias in the transposed / output convolutions); False: nnU-Net v2's ``UNetDecoder``
    layout, to initialise from plain ``PlainConvUNet`` weights by name (see the module docstring).
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Union[int, List[int], Tuple[int, ...]],
        conv_op: Type[_ConvNd],
        kernel_sizes: Union[int, List[int], Tuple[int, ...]],
        strides: Union[int, List[int], Tuple[int, ...]],
        n_conv_per_stage: Union[int, List[int], Tuple[int, ...]],
        num_classes: int,
        n_conv_per_stage_decoder: Union[int, Tuple[int, ...], List[int]],
        conv_bias: bool = False,
        norm_op: Union[None, Type[nn.Module]] = None,
        norm_op_kwargs: dict = None,
        dropout_op: Union[None, Type[_DropoutNd]] = None,
        dropout_op_kwargs: dict = None,
        nonlin: Union[None, Type[torch.nn.Module]] = None,
        nonlin_kwargs: dict = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        official_v1_layout: bool = True,
    ):
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.all_modules.0", "encoder.stages.0.0.convs.0.conv")
        n_conv_per_stage, n_conv_per_stage_decoder = _per_stage_counts(
            n_stages, n_conv_per_stage=n_conv_per_stage, n_conv_per_stage_decoder=n_conv_per_stage_decoder)
        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True,
                                        nonlin_first=nonlin_first)
        self._build_decoders(num_classes, n_conv_per_stage_decoder, deep_supervision, nonlin_first, official_v1_layout)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)


class BANetResidualEncoderUNet(BANetUNet):
    """BA-Net on nnU-Net's residual-encoder U-Net (``ResidualEncoderUNet`` arguments; ResEnc M/L/XL plans).

    Encoder: ``ResidualEncoder`` (stem + residual blocks); decoders: two plain-convolution decoders as in
    ``ResidualEncoderUNet``. The official BA-Net has no residual variant; this lets BA-Net run on
    ``nnUNetPlannerResEncM/L`` plans unchanged. ``official_v1_layout`` (default True, as
    ``BANetPlainConvUNet``): the decoders are laid out as the official BA-Net's (nnU-Net v1 decoder
    kernels, no bias in transposed / output convolutions); False: nnU-Net v2's ``UNetDecoder`` layout,
    i.e. the encoder and segmentation path of ``ResidualEncoderUNet``, whose weights then load by name.
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Union[int, List[int], Tuple[int, ...]],
        conv_op: Type[_ConvNd],
        kernel_sizes: Union[int, List[int], Tuple[int, ...]],
        strides: Union[int, List[int], Tuple[int, ...]],
        n_blocks_per_stage: Union[int, List[int], Tuple[int, ...]],
        num_classes: int,
        n_conv_per_stage_decoder: Union[int, Tuple[int, ...], List[int]],
        conv_bias: bool = False,
        norm_op: Union[None, Type[nn.Module]] = None,
        norm_op_kwargs: dict = None,
        dropout_op: Union[None, Type[_DropoutNd]] = None,
        dropout_op_kwargs: dict = None,
        nonlin: Union[None, Type[torch.nn.Module]] = None,
        nonlin_kwargs: dict = None,
        deep_supervision: bool = False,
        block: Union[Type[BasicBlockD], Type[BottleneckD]] = BasicBlockD,
        bottleneck_channels: Union[int, List[int], Tuple[int, ...]] = None,
        stem_channels: int = None,
        official_v1_layout: bool = True,
    ):
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stem"
        self.keys_to_in_proj = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
        n_blocks_per_stage, n_conv_per_stage_decoder = _per_stage_counts(
            n_stages, n_blocks_per_stage=n_blocks_per_stage, n_conv_per_stage_decoder=n_conv_per_stage_decoder)
        self.encoder = ResidualEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                       n_blocks_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                       dropout_op_kwargs, nonlin, nonlin_kwargs, block, bottleneck_channels,
                                       return_skips=True, disable_default_stem=False, stem_channels=stem_channels)
        self._build_decoders(num_classes, n_conv_per_stage_decoder, deep_supervision, False, official_v1_layout)

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)


BANET_PLAIN = network_name(BANetPlainConvUNet)
BANET_RESENC = network_name(BANetResidualEncoderUNet)
# nnU-Net's architectures and the BA-Net class that takes the same constructor arguments
BANET_COUNTERPARTS = {"PlainConvUNet": BANET_PLAIN, "ResidualEncoderUNet": BANET_RESENC}
