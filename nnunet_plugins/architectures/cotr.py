"""CoTr: a CNN encoder, a deformable transformer over its two deepest levels, an additive-skip decoder.

Paper: Y. Xie, J. Zhang, C. Shen, Y. Xia. "CoTr: Efficiently Bridging CNN and Transformer for 3D
Medical Image Segmentation". MICCAI 2021. Official code: github.com/YtongXie/CoTr (``ResTranUnet`` /
``U_ResTran3D``); this is our own implementation of that architecture.

Architecture (defaults = the official configuration)
----------------------------------------------------
Input ``(B, C_in, D, H, W)``; ``D`` divisible by 8, ``H`` and ``W`` by 16 (:attr:`CoTr.required_divisor`).

* CNN encoder ("ResNet-9" of the official code; convolutions without bias):
  stem ``7x7x7`` conv, stride ``(1, 2, 2)``, 64 ch, norm, nonlin           -> level 0 ``(D, H/2, W/2)``
  three stages of (3, 3, 2) residual units, 192 / 384 / 384 ch; the first unit of each stage has
  stride 2 -> levels 1, 2, 3 at ``(D/2, H/4, W/4)``, ``(D/4, H/8, W/8)``, ``(D/8, H/16, W/16)``.
  A residual unit is ONE ``3x3x3`` conv + norm, plus the input (through a ``1x1x1`` conv + norm
  projection where the shape changes), then the nonlinearity.
* DeTrans: :class:`~nnunet_plugins.architectures.blocks.deformable_attention.DeformableTransformerEncoder3D` over
  levels 2 and 3 (6 layers, d_model 384, 6 heads, FFN 1536, GELU, dropout 0.1, post-norm, 4 points per
  head and level, 3-D sine positional encoding + learnable level embedding). For a 48x192x192 patch
  the two levels are 12x24x24 and 6x12x12 = 7,776 tokens.
* Decoder: transposed convs (kernel = stride = 2, no bias) 384->384->192->64 with ADDITIVE skips: the
  first skip is the transformer's level-2 output (tokens reshaped), then CNN levels 1 and 0; after
  each addition a residual block of two ``3x3x3`` conv+norm+nonlin with an identity shortcut.
  Deep-supervision heads (``1x1x1`` conv with bias) after each of the three blocks; the full-resolution
  output is a trilinear ``(1, 2, 2)`` upsampling of the last block followed by a ``1x1x1`` conv (computed
  as the conv followed by the upsampling: the two commute, and the classes are fewer than the 64 channels).

Outputs: with ``deep_supervision`` on, ``[full, ds0, ds1, ds2]`` (nnU-Net order, highest resolution
first) at the scales :attr:`CoTr.deep_supervision_scales` relative to the input, i.e. ``(1, 1, 1)``,
``(1, 1/2, 1/2)``, ``(1/2, 1/4, 1/4)``, ``(1/4, 1/8, 1/8)``; with it off, the ``full`` logits tensor
``(B, num_classes, D, H, W)`` only. ``deep_supervision`` lives on ``self.decoder`` (and is mirrored by
the ``CoTr.deep_supervision`` property) so nnU-Net's stock ``set_deep_supervision_enabled`` works.

Decisions
---------
* Axis order of the deformable attention: geometrically correct by default; the official code's
  ``(d, w, h)`` reference points handed to ``grid_sample`` (which reads ``(w, h, d)``) are reproduced
  with ``official_axis_order=True`` (e.g. to run official checkpoints, :mod:`nnunet_plugins.checkpoints.cotr`).
* Defaults follow the official training run (``run_training.py``): instance norm with affine
  parameters and LeakyReLU(0.01).
* Initialisation as the official code: Kaiming-normal (``fan_out``) for the CNN encoder's and the
  decoder's (transposed) convolutions, norms at weight 1 / bias 0, the transformer as Deformable DETR.
* Parameter count at the defaults with 1 input channel and 14 classes: 41,872,504 (encoder
  20,500,800; DeTrans 9,316,992; decoder + heads 12,054,712), equal to the official network's.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

# WSConv3d (official Conv3d_wd) lives in blocks/conv.py; importable here too, as main's LoRA tests do
from nnunet_plugins.architectures.blocks.conv import ConvNormFactory, WSConv3d  # noqa: F401
from nnunet_plugins.architectures.blocks.deformable_attention import DeformableTransformerEncoder3D, position_encoding_split
from nnunet_plugins.architectures.contract import DecoderDeepSupervision, PlansNetwork, conv_output_size, strided

__all__ = ["CoTr", "WSConv3d"]


_NORMS = {"instance": "instance", "in": "instance", "batch": "batch", "bn": "batch", "group": "group", "gn": "group"}
_NONLINS = {"leakyrelu": "leakyrelu", "relu": "relu"}


class _ConvNormAct(nn.Module):
    def __init__(self, cfg: ConvNormFactory, cin: int, cout: int, kernel: int, stride=1):
        super().__init__()
        self.conv = cfg.conv(cin, cout, kernel, stride)
        self.norm = cfg.norm(cout)
        self.nonlin = cfg.nonlin()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class _EncoderUnit(nn.Module):
    """One conv + norm, plus the (projected) input, then the nonlinearity (official ``ResBlock``)."""

    def __init__(self, cfg: ConvNormFactory, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = cfg.conv(cin, cout, 3, stride)
        self.norm = cfg.norm(cout)
        self.shortcut = (nn.Sequential(cfg.conv(cin, cout, 1, stride), cfg.norm(cout))
                         if stride != 1 or cin != cout else None)
        self.nonlin = cfg.nonlin()

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.nonlin(self.norm(self.conv(x)) + residual)


class CoTrEncoder(nn.Module):
    """Stem + residual stages; returns the four levels ``[stem, stage1, stage2, stage3]``."""

    def __init__(self, cfg: ConvNormFactory, input_channels: int, channels: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        self.stem = _ConvNormAct(cfg, input_channels, channels[0], 7, stride=(1, 2, 2))
        stages = []
        for cin, cout, n in zip(channels[:-1], channels[1:], blocks):
            stages.append(nn.Sequential(*[_EncoderUnit(cfg, cin if i == 0 else cout, cout, 2 if i == 0 else 1)
                                          for i in range(n)]))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = [self.stem(x)]
        for stage in self.stages:
            out.append(stage(out[-1]))
        return out


class _DecoderBlock(nn.Module):
    """Two conv+norm+nonlin and an identity shortcut (official decoder ``ResBlock``)."""

    def __init__(self, cfg: ConvNormFactory, channels: int):
        super().__init__()
        self.conv1 = _ConvNormAct(cfg, channels, channels, 3)
        self.conv2 = _ConvNormAct(cfg, channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + x


class CoTrDecoder(nn.Module):
    """Transposed-conv decoder with additive skips and deep-supervision heads.

    ``forward(bottleneck, skips)`` with ``skips`` deepest first. ``deep_supervision`` (bool) decides
    between ``[full, ds0, ds1, ds2]`` and ``full``.
    """

    def __init__(self, cfg: ConvNormFactory, channels: Sequence[int], num_classes: int, deep_supervision: bool):
        super().__init__()
        # channels = (c0, c1, c2, c3); up-steps c3->c2, c2->c1, c1->c0 (deepest first)
        pairs = list(zip(channels[:0:-1], channels[-2::-1]))
        self.upconvs = nn.ModuleList([nn.ConvTranspose3d(cin, cout, kernel_size=2, stride=2, bias=False)
                                      for cin, cout in pairs])
        self.blocks = nn.ModuleList([_DecoderBlock(cfg, cout) for _, cout in pairs])
        self.ds_heads = nn.ModuleList([nn.Conv3d(cout, num_classes, kernel_size=1) for _, cout in pairs])
        self.seg_head = nn.Conv3d(channels[0], num_classes, kernel_size=1)
        self.deep_supervision = bool(deep_supervision)

    def forward(self, bottleneck: Tensor, skips: Sequence[Tensor]) -> Tensor | list[Tensor]:
        x = bottleneck
        ds = []
        for up, block, head, skip in zip(self.upconvs, self.blocks, self.ds_heads, skips):
            x = block(up(x) + skip)
            if self.deep_supervision:
                ds.append(head(x))
        # undo the stem's (1, 2, 2) stride. The official order is upsample, then the 1x1x1 head; the two commute
        # (the head is linear per voxel, trilinear upsampling a per-channel combination of voxels with weights
        # summing to 1, so the bias passes through unchanged), and heading first upsamples num_classes channels
        # instead of 64 and runs the head on a quarter of the voxels: same output to rounding (tests)
        d, h, w = x.shape[2:]
        full = F.interpolate(self.seg_head(x), size=(d, 2 * h, 2 * w), mode="trilinear", align_corners=False)
        if not self.deep_supervision:
            return full
        return [full] + ds[::-1]


class CoTr(PlansNetwork, DecoderDeepSupervision, nn.Module):
    """CoTr (Xie et al., MICCAI 2021): see the module docstring for the architecture and decisions.

    Args:
        input_channels: image channels.
        num_classes: output channels (logits).
        patch_size: training patch ``(D, H, W)``; validated against :attr:`required_divisor` (the
            network itself runs on any divisible size, e.g. sliding-window patches).
        deep_supervision: return ``[full, ds0, ds1, ds2]`` (True) or ``full`` (False); toggled later
            through the ``deep_supervision`` attribute.
        norm: ``"instance"`` (default, affine), ``"batch"`` or ``"group"`` (16 groups); official
            aliases ``"IN"``, ``"BN"``, ``"GN"`` accepted.
        nonlin: ``"leakyrelu"`` (slope 0.01, the official default) or ``"relu"``.
        weight_std: weight-standardised convolutions (official ``Conv3d_wd``) in the encoder and the
            decoder blocks.
        stage_channels: widths of the stem and the three stages (the last two must be equal: they
            are the transformer's ``d_model``).
        blocks_per_stage: residual units per stage.
        num_heads, ffn_dim, num_encoder_layers, num_points, dropout: DeTrans settings.
        official_axis_order: reproduce the official deformable-attention axis order (see
            :mod:`nnunet_plugins.architectures.blocks.deformable_attention`).

    Shapes: input ``(B, input_channels, D, H, W)`` with ``D % 8 == H % 16 == W % 16 == 0``; outputs
    ``(B, num_classes, D*s_d, H*s_h, W*s_w)`` for the scales in :attr:`deep_supervision_scales`.
    """

    #: total downsampling of the deepest level per axis (stem (1, 2, 2) and three stride-2 stages)
    required_divisor: tuple[int, int, int] = (8, 16, 16)
    #: scale of each output relative to the input, in output order (nnU-Net's convention)
    deep_supervision_scales: tuple[tuple[float, float, float], ...] = (
        (1.0, 1.0, 1.0), (1.0, 0.5, 0.5), (0.5, 0.25, 0.25), (0.25, 0.125, 0.125))
    # nnU-Net contract (nnunet_plugins.architectures.contract)
    spatial_dims = (3,)
    avoid_single_voxel_bottleneck = True   # instance norm (the default) cannot normalise one voxel
    context_kwargs = PlansNetwork.context_kwargs + ("patch_size",)

    def __init__(self, input_channels: int = 1, num_classes: int = 14,
                 patch_size: Sequence[int] = (48, 192, 192), deep_supervision: bool = True,
                 norm: str = "instance", nonlin: str = "leakyrelu", weight_std: bool = False,
                 stage_channels: Sequence[int] = (64, 192, 384, 384), blocks_per_stage: Sequence[int] = (3, 3, 2),
                 num_heads: int = 6, ffn_dim: int = 1536, num_encoder_layers: int = 6, num_points: int = 4,
                 dropout: float = 0.1, official_axis_order: bool = False):
        super().__init__()
        if norm.lower() not in _NORMS:
            raise ValueError(f"norm must be one of 'instance', 'batch', 'group' (or IN/BN/GN), got {norm!r}")
        if nonlin.lower() not in _NONLINS:
            raise ValueError(f"nonlin must be 'leakyrelu' or 'relu', got {nonlin!r}")
        stage_channels, blocks_per_stage = tuple(stage_channels), tuple(blocks_per_stage)
        if len(stage_channels) != 4 or len(blocks_per_stage) != 3 or min(stage_channels) < 1 or min(blocks_per_stage) < 1:
            raise ValueError("CoTr needs stage_channels for the stem and 3 stages (4 positive ints) and "
                             f"blocks_per_stage for 3 stages, got {stage_channels} and {blocks_per_stage}")
        d_model = stage_channels[3]
        if stage_channels[2] != d_model:
            raise ValueError("the two deepest stages feed one transformer and must have equal widths, "
                             f"got stage_channels={stage_channels}")
        if d_model % num_heads:
            raise ValueError(f"transformer width {d_model} is not divisible by num_heads={num_heads}")
        position_encoding_split(d_model)  # raises for widths the 3-D sine encoding cannot split
        self._norm = _NORMS[norm.lower()]
        self.patch_size = self._check_size(patch_size, what="patch_size")
        self.input_channels, self.num_classes = int(input_channels), int(num_classes)
        self.official_axis_order = official_axis_order

        # official GroupNorm(16, C); narrow test widths fall back to the largest divisor of C <= 16
        cfg = ConvNormFactory(nn.Conv3d, weight_std, self._norm, 16, fit_groups=True, nonlin=_NONLINS[nonlin.lower()],
                              owner="CoTr")
        self.backbone = CoTrEncoder(cfg, input_channels, stage_channels, blocks_per_stage)
        self.transformer = DeformableTransformerEncoder3D(
            d_model=d_model, n_heads=num_heads, num_layers=num_encoder_layers, d_ffn=ffn_dim, dropout=dropout,
            activation="gelu", n_levels=2, n_points=num_points, official_axis_order=official_axis_order)
        self.decoder = CoTrDecoder(cfg, stage_channels, num_classes, deep_supervision)
        self._init_cnn(self.backbone)
        self._init_cnn(self.decoder)

    @staticmethod
    def _init_cnn(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm)) and m.weight is not None:
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)

    @classmethod
    def check_input_size(cls, spatial: Sequence[int], what: str = "input") -> tuple[int, int, int]:
        """Return ``spatial`` as a tuple or raise ValueError if CoTr cannot process it.

        Instances additionally reject, with instance norm, a size whose deepest level is a single
        voxel (e.g. ``(8, 16, 16)``): instance norm needs more than one voxel per channel.
        """
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3:
            raise ValueError(f"CoTr is a 3-D network: {what} must have 3 spatial dims (D, H, W), got {spatial}")
        bad = [s for s, k in zip(spatial, cls.required_divisor) if s < k or s % k]
        if bad:
            raise ValueError(f"CoTr {what} spatial size {spatial} must be a positive multiple of "
                             f"{cls.required_divisor} (stem stride (1, 2, 2) and three stride-2 stages)")
        return spatial

    def _check_size(self, spatial: Sequence[int], what: str) -> tuple[int, int, int]:
        spatial = self.check_input_size(spatial, what)
        if self._norm == "instance" and all(s == k for s, k in zip(spatial, self.required_divisor)):
            raise ValueError(f"CoTr {what} spatial size {spatial} leaves one voxel at the deepest level, which "
                             "instance norm cannot normalise; use e.g. (16, 16, 16), (8, 32, 16) or (8, 16, 32)")
        return spatial

    # ---- nnU-Net contract -----------------------------------------------------------------------
    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' arch_kwargs when they name CoTr (``nnunet-plugins plan -m CoTr``), else the official
        configuration; the patch is the configuration's."""
        return {**cls.arch_kwargs_from_plans(configuration_manager),
                "patch_size": tuple(configuration_manager.patch_size)}

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        return cls.required_divisor   # fixed by the architecture (stem stride and three stride-2 stages)

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager) -> list:
        return [list(s) for s in cls.deep_supervision_scales]

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Conv output elements for one ``input_size`` (D, H, W) sample (nnU-Net's planner estimate); the
        transformer has no convolutions."""
        self.check_input_size(input_size)
        size = strided(input_size, (1, 2, 2))   # stem
        total = conv_output_size(self.backbone.stem.conv.out_channels, size)
        levels = [size]
        for stage in self.backbone.stages:
            for unit in stage:   # conv (+ projection shortcut conv)
                size = strided(size, unit.conv.stride)
                total += (1 if unit.shortcut is None else 2) * conv_output_size(unit.conv.out_channels, size)
            levels.append(size)
        decoder = self.decoder
        for up, head, size in zip(decoder.upconvs, decoder.ds_heads, levels[-2::-1]):
            # transposed conv, the block's two convs, the deep-supervision head
            total += 3 * conv_output_size(up.out_channels, size)
            if decoder.deep_supervision:
                total += conv_output_size(head.out_channels, size)
        # the head runs before the (1, 2, 2) upsampling, at the stem's resolution
        return total + conv_output_size(decoder.seg_head.out_channels, levels[0])

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if x.dim() != 5:
            raise ValueError(f"CoTr is a 3-D network: expected input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"CoTr built for {self.input_channels} input channels got {x.shape[1]}")
        self._check_size(x.shape[2:], what="input")
        levels = self.backbone(x)
        t2, t3 = self.transformer(levels[2:])
        return self.decoder(t3, [t2, levels[1], levels[0]])

