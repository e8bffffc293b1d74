"""DoDNet: a residual U-Net with a dynamic, task-conditioned segmentation head.

Paper: J. Zhang, Y. Xie, Y. Xia, C. Shen. "DoDNet: Learning to segment multi-organ and tumors from
multiple partially labeled datasets". CVPR 2021. Official code: github.com/jianpengz/DoDNet
(``a_DynConv/unet3D_DynConv882.py``); this is our own implementation of that architecture.

Architecture (defaults = the official configuration)
----------------------------------------------------
Input ``(B, C_in, *spatial)`` (3-D by default; ``conv_op=nn.Conv2d`` builds the same network in 2-D).

* Encoder: a ``3x3x3`` stem conv (C_in -> 32), then five stages of PRE-ACTIVATION residual blocks
  (GN -> ReLU -> conv -> GN -> ReLU -> conv, plus the input; where the shape changes the shortcut is
  GN -> ReLU -> ``1x1x1`` conv with the block's stride). Widths 32 / 64 / 128 / 256 / 256, blocks
  1 / 2 / 2 / 2 / 2, strides 1 / 2 / 2 / 2 / 2. GroupNorm with 16 groups, weight-standardised
  convolutions (official ``Conv3d`` with ``weight_std=True``, the training default), no conv bias.
* Fusion: GN -> ReLU -> ``1x1x1`` conv 256 -> 256 on the deepest stage.
* Controller: GAP(GN -> ReLU(fusion output)) (256-d) concatenated with the one-hot task (T-d) ->
  ``1x1x1`` conv -> 162 dynamic parameters per sample.
* Decoder: four steps of (trilinear x2 upsampling, ADD the encoder skip of that scale, one residual
  block narrowing the width): 256 -> 128 -> 64 -> 32 -> 32; then GN -> ReLU -> ``1x1x1`` conv 32 -> 8.
* Dynamic head (:mod:`nnunet_plugins.architectures.blocks.dynamic_head`): three ``1x1x1`` convs 8 -> 8 (ReLU),
  8 -> 8 (ReLU), 8 -> num_classes with the sample's generated kernels (weights 64 + 64 + 16, biases
  8 + 8 + 2 = 162 values), one grouped conv per layer (groups = batch).

Output: ``(B, num_classes, *spatial)`` logits, one SIGMOID channel per structure (official: organ,
tumour; the organ channel includes the tumour). Parameter count at the defaults (1 input channel, 2
classes, 7 tasks): 17,329,528, equal to the official network's.

Decisions
---------
* Deep supervision: the official network has none. ``deep_supervision=True`` returns a one-element
  list ``[logits]`` (nnU-Net's list convention, highest resolution first) so list-consuming code
  works; there are no auxiliary heads. Trainers train DoDNet with deep supervision off.
* Upsampling interpolates to the skip's exact size (identical to the official ``scale_factor=2``
  for even sizes) and the stage strides are configurable (``strides``), so anisotropic nnU-Net
  pooling such as ``(1, 2, 2)`` works; the official network uses 2 on every axis.
* Task ids follow :class:`~nnunet_plugins.architectures.blocks.dynamic_head.TaskConditionedNetwork` (the package's
  multi-task convention). The official code builds the one-hot on the CPU and moves it with
  ``.cuda()``; here it is ``F.one_hot`` on the input's device.
* Initialisation: PyTorch defaults, as the official code (no custom initialisation).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_plugins.architectures.blocks.conv import ConvNormFactory
from nnunet_plugins.architectures.blocks.dynamic_head import (
    TaskConditionedNetwork, apply_dynamic_head, dynamic_head_layer_sizes, num_dynamic_params,
)
from nnunet_plugins.architectures.contract import PlansNetwork, conv_output_size, strided, total_stride

__all__ = ["DoDNet"]

# official configuration (a_DynConv/unet3D_DynConv882.py)
OFFICIAL_FEATURES = (32, 64, 128, 256, 256)
OFFICIAL_BLOCKS = (1, 2, 2, 2, 2)
OFFICIAL_STRIDES = (1, 2, 2, 2, 2)


class PreActResidualBlock(nn.Module):
    """GN -> ReLU -> conv(stride) -> GN -> ReLU -> conv, plus the input (official ``NoBottleneck``);
    the shortcut is GN -> ReLU -> ``1x1`` conv(stride) where stride or width change."""

    def __init__(self, cfg: ConvNormFactory, cin: int, cout: int, stride=1):
        super().__init__()
        self.norm1 = cfg.norm(cin)
        self.conv1 = cfg.conv(cin, cout, 3, stride)
        self.norm2 = cfg.norm(cout)
        self.conv2 = cfg.conv(cout, cout, 3)
        strided = any(s != 1 for s in (stride if isinstance(stride, (tuple, list)) else (stride,)))
        self.shortcut = (nn.Sequential(cfg.norm(cin), nn.ReLU(), cfg.conv(cin, cout, 1, stride))
                         if strided or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + (x if self.shortcut is None else self.shortcut(x))


def _stride_tuple(stride, dim: int) -> tuple[int, ...]:
    s = tuple(int(v) for v in stride) if isinstance(stride, (tuple, list)) else (int(stride),) * dim
    if len(s) != dim or min(s) < 1:
        raise ValueError(f"DoDNet: stride {stride!r} must be a positive int or {dim} positive ints")
    return s


class DoDNet(PlansNetwork, TaskConditionedNetwork):
    """DoDNet (Zhang et al., CVPR 2021); see the module docstring for architecture and decisions.

    Args:
        input_channels: image channels.
        num_classes: binary (sigmoid) output channels of the dynamic head (official 2: organ, tumour).
        num_tasks: T, the number of tasks (length of the one-hot task code; official 7, MOTS).
        deep_supervision: return ``[logits]`` instead of ``logits`` (no auxiliary heads exist).
        conv_op: ``nn.Conv3d`` (default) or ``nn.Conv2d``.
        features_per_stage: widths of the five encoder stages; the decoder narrows from
            ``features_per_stage[-2]`` back to ``features_per_stage[0]`` (official 32/64/128/256/256).
        blocks_per_stage: residual blocks per encoder stage (official 1/2/2/2/2).
        strides: per stage, an int or one int per axis (official 1/2/2/2/2).
        norm_groups: GroupNorm groups (official 16; widths must be divisible by it).
        weight_standardization: weight-standardised encoder/decoder convs (official training default).
        head_channels: width of the decoder's last ``1x1`` conv and of the dynamic head (official 8).
        head_layers: layers of the dynamic head (official 3).

    Forward: ``x`` ``(B, input_channels, *spatial)`` (every axis divisible by the product of the
    strides), ``task_id`` LongTensor ``(B,)`` / int / None (then :meth:`set_inference_task`'s task).
    Returns ``(B, num_classes, *spatial)`` logits (or ``[logits]`` with deep supervision).
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 2, num_tasks: int = 7,
                 deep_supervision: bool = False, *, conv_op: type[nn.Module] = nn.Conv3d,
                 features_per_stage: Sequence[int] = OFFICIAL_FEATURES,
                 blocks_per_stage: Sequence[int] = OFFICIAL_BLOCKS,
                 strides: Sequence = OFFICIAL_STRIDES, norm_groups: int = 16,
                 weight_standardization: bool = True, head_channels: int = 8, head_layers: int = 3):
        super().__init__()
        features, blocks = tuple(int(f) for f in features_per_stage), tuple(int(b) for b in blocks_per_stage)
        if len(features) < 2 or len(blocks) != len(features) or len(strides) != len(features):
            raise ValueError(f"DoDNet: features_per_stage, blocks_per_stage and strides need one entry per stage "
                             f"(>= 2 stages), got {features}, {blocks}, {tuple(strides)}")
        if min(features) < 1 or min(blocks) < 1 or min(input_channels, num_classes, num_tasks) < 1:
            raise ValueError("DoDNet: widths, block counts, input_channels, num_classes and num_tasks must be positive")
        cfg = ConvNormFactory(conv_op, weight_standardization, "group", int(norm_groups), owner="DoDNet")
        self.input_channels, self.num_classes, self.num_tasks = int(input_channels), int(num_classes), int(num_tasks)
        self.conv_op, self.dim = conv_op, cfg.dim
        self.strides = tuple(_stride_tuple(s, cfg.dim) for s in strides)
        self.deep_supervision = bool(deep_supervision)

        self.stem = cfg.conv(self.input_channels, features[0], 3)
        stages = []
        for i, (cout, n, stride) in enumerate(zip(features, blocks, self.strides)):
            cin = features[max(i - 1, 0)]
            stages.append(nn.Sequential(*[PreActResidualBlock(cfg, cin if j == 0 else cout, cout, stride if j == 0 else 1)
                                          for j in range(n)]))
        self.encoder_stages = nn.ModuleList(stages)
        # the fusion output is added to the second-deepest skip, hence its width
        fused = features[-2]
        self.fusion = nn.Sequential(cfg.norm(features[-1]), nn.ReLU(), cfg.conv(features[-1], fused, 1))
        # decoder step for skip level l (deepest first): up, + skip_l (features[l]), block features[l] -> features[l-1]
        self.decoder_blocks = nn.ModuleList([PreActResidualBlock(cfg, features[l], features[max(l - 1, 0)])
                                             for l in range(len(features) - 2, -1, -1)])
        self.pre_head = nn.Sequential(cfg.norm(features[0]), nn.ReLU(),
                                      conv_op(features[0], head_channels, kernel_size=1))
        self.head_layer_sizes = dynamic_head_layer_sizes(head_channels, head_channels, head_layers, self.num_classes)
        self.num_dynamic_params = num_dynamic_params(self.head_layer_sizes)
        self.gap_norm = cfg.norm(fused)
        self.controller = conv_op(fused + self.num_tasks, self.num_dynamic_params, kernel_size=1)

    @property
    def required_divisor(self) -> tuple[int, ...]:
        """Every input axis must be a multiple of this (product of the stage strides)."""
        return total_stride(self.strides, self.dim)

    # ---- nnU-Net contract -----------------------------------------------------------------------
    context_kwargs = PlansNetwork.context_kwargs + ("num_tasks",)

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' arch_kwargs when they name DoDNet (e.g. narrow networks for CPU runs), else the official
        widths; the convolution (2-D / 3-D) follows the configuration's patch unless the plans set it."""
        kwargs = cls.arch_kwargs_from_plans(configuration_manager)
        kwargs.setdefault("conv_op", nn.Conv3d if len(configuration_manager.patch_size) == 3 else nn.Conv2d)
        return kwargs

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        return total_stride(kwargs.get("strides", OFFICIAL_STRIDES), dim)

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager) -> None:
        return None   # no auxiliary heads (the official network has none)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Conv output elements for one ``input_size`` sample (nnU-Net's planner estimate), the dynamic
        head's three generated 1x1 convolutions included."""
        size = list(input_size)
        total = conv_output_size(self.stem.out_channels, size)
        skips = []
        for stage in self.encoder_stages:
            for block in stage:   # conv1 (strided), conv2 (+ projection shortcut conv)
                size = strided(size, block.conv1.stride)
                total += (2 if block.shortcut is None else 3) * conv_output_size(block.conv1.out_channels, size)
            skips.append(size)
        total += conv_output_size(self.fusion[-1].out_channels, skips[-1])
        total += self.num_dynamic_params   # controller on the pooled features (1 voxel)
        for block, size in zip(self.decoder_blocks, skips[-2::-1]):
            total += (2 if block.shortcut is None else 3) * conv_output_size(block.conv1.out_channels, size)
        total += conv_output_size(self.pre_head[-1].out_channels, input_size)
        return total + sum(conv_output_size(c_out, input_size) for _, c_out in self.head_layer_sizes)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(f"DoDNet built with {self.conv_op.__name__} expects (B, C, {self.dim} spatial dims), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"DoDNet built for {self.input_channels} input channels got {x.shape[1]}")
        div = self.required_divisor
        if any(s % d for s, d in zip(x.shape[2:], div)):
            raise ValueError(f"DoDNet input spatial size {tuple(x.shape[2:])} must be divisible by {div} "
                             f"(product of the stage strides {self.strides})")

    def dynamic_params(self, bottleneck: Tensor, task_id: Tensor) -> Tensor:
        """Controller: GAP(GN->ReLU(bottleneck)) ++ one-hot(task) -> ``(B, num_dynamic_params)``."""
        pooled = F.relu(self.gap_norm(bottleneck)).flatten(2).mean(-1)
        onehot = F.one_hot(task_id, self.num_tasks).to(pooled.dtype)
        cond = torch.cat([pooled, onehot], dim=1).reshape(*pooled.shape[:1], -1, *([1] * self.dim))
        return self.controller(cond).flatten(1)

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor | list[Tensor]:
        task_id = self.task_ids(x, task_id)
        self._check_input(x)
        skips = []
        h = self.stem(x)
        for stage in self.encoder_stages:
            h = stage(h)
            skips.append(h)
        h = self.fusion(skips.pop())
        params = self.dynamic_params(h, task_id)
        mode = "trilinear" if self.dim == 3 else "bilinear"
        for block, skip in zip(self.decoder_blocks, reversed(skips)):
            h = block(F.interpolate(h, size=skip.shape[2:], mode=mode, align_corners=False) + skip)
        logits = apply_dynamic_head(self.pre_head(h), params, self.head_layer_sizes)
        return [logits] if self.deep_supervision else logits
