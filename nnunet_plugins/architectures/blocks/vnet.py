"""V-Net building blocks of the MC-Net / UA-MT code line (the official networks of LeFeD and VerSemi).

The semi-supervised papers of that line share one 3-D V-Net (``networks/VNet.py`` and its copies): five
encoder stages of 1, 2, 3, 3, 3 (3x3x3 conv -> norm -> ReLU) layers with F, 2F, 4F, 8F, 16F features,
joined by 2x2x2 stride-2 convolutions (-> norm -> ReLU) that double the width; plain (non-residual) stages.

The blocks are 3-D as in the official code; ``dim=2`` builds the same layers in 2-D (VerSemi's V-Net offers
a 2-D variant).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

#: conv layers per encoder stage, full resolution .. bottleneck
VNET_ENCODER_CONVS = (1, 2, 3, 3, 3)


_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORMS = {2: (nn.BatchNorm2d, nn.InstanceNorm2d), 3: (nn.BatchNorm3d, nn.InstanceNorm3d)}


def _check_dim(dim: int) -> int:
    if dim not in _CONV:
        raise ValueError(f"V-Net blocks are 2-D or 3-D, got dim={dim!r}")
    return dim


def vnet_norm(kind: str, channels: int, dim: int = 3) -> nn.Module:
    """The official ``normalization`` choices: batch, instance (no affine, as ``nn.InstanceNorm3d``),
    group (16 groups) or none."""
    batch, instance = _NORMS[_check_dim(dim)]
    if kind == "batch":
        return batch(channels)
    if kind == "instance":
        return instance(channels)
    if kind == "group":
        return nn.GroupNorm(16, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"normalization must be batch, instance, group or none, got {kind!r}")


def vnet_norm_kind(module: nn.Module) -> str:
    """The ``vnet_norm`` kind that built ``module``."""
    return {nn.BatchNorm3d: "batch", nn.InstanceNorm3d: "instance", nn.BatchNorm2d: "batch",
            nn.InstanceNorm2d: "instance", nn.GroupNorm: "group"}.get(type(module), "none")


def vnet_conv_stage(n_layers: int, cin: int, cout: int, norm: str, dim: int = 3) -> nn.Sequential:
    """``n_layers`` x (3x3x3 conv -> norm -> ReLU) at one resolution (official ``ConvBlock``)."""
    conv = _CONV[_check_dim(dim)]
    layers = []
    for i in range(n_layers):
        layers += [conv(cin if i == 0 else cout, cout, 3, padding=1), vnet_norm(norm, cout, dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VNetEncoder(nn.Module):
    """The V-Net encoder. ``forward(x, feedback=None)`` returns the stage outputs, full resolution first
    (the last one the bottleneck, after ``Dropout3d(dropout)`` when ``dropout``); ``feedback`` (5 tensors,
    BOTTLENECK FIRST, each of its stage's output shape) is added to the stage outputs before they are used
    (LeFeD's discrepancy feedback; official ``Encoder.forward(input, en)``).

    Shapes: ``x`` ``(B, input_channels, D, H, W)``, each axis divisible by 16; stage ``i`` output
    ``(B, n_filters * 2**i, D / 2**i, H / 2**i, W / 2**i)`` (``dim=2``: ``(B, C, H, W)`` likewise).
    """

    def __init__(self, input_channels: int = 1, n_filters: int = 16, norm: str = "batch",
                 dropout: Optional[float] = None, dim: int = 3):
        super().__init__()
        conv = _CONV[_check_dim(dim)]
        widths = [n_filters * 2 ** i for i in range(len(VNET_ENCODER_CONVS))]
        self.widths = widths
        self.stages = nn.ModuleList(
            vnet_conv_stage(n, input_channels if i == 0 else widths[i], widths[i], norm, dim)
            for i, n in enumerate(VNET_ENCODER_CONVS))
        self.downsamples = nn.ModuleList(
            nn.Sequential(conv(widths[i], widths[i + 1], 2, stride=2), vnet_norm(norm, widths[i + 1], dim),
                          nn.ReLU(inplace=True)) for i in range(len(widths) - 1))
        self.dropout = (nn.Dropout3d if dim == 3 else nn.Dropout2d)(p=dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, feedback: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        n = len(self.stages)
        if feedback is not None and len(feedback) != n:
            raise ValueError(f"feedback must hold {n} tensors (bottleneck first), got {len(feedback)}")
        skips = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if feedback is not None:
                e = feedback[n - 1 - i]
                if e.shape != x.shape:
                    raise ValueError(f"feedback[{n - 1 - i}] has shape {tuple(e.shape)}, encoder stage {i} "
                                     f"output {tuple(x.shape)}")
                x = x + e
            if i < n - 1:
                skips.append(x)
                x = self.downsamples[i](x)
        return skips + [self.dropout(x)]
