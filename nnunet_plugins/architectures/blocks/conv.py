"""Convolution building blocks shared by the package's hand-written networks (CoTr, DoDNet, TransDoDNet).

* :class:`WSConv2d` / :class:`WSConv3d`: weight-standardised convolutions (Qiao et al. 2019, "Weight
  Standardization"), as the official CoTr ``Conv3d_wd`` and DoDNet ``Conv3d(weight_std=True)``: every
  output filter is shifted to zero mean and divided by its standard deviation (UNBIASED variance,
  ``eps = 1e-12`` under the square root) before the convolution. One implementation serves both
  dimensions (``weight_standardized_conv(conv_op)`` picks the class).
* :class:`ConvNormFactory`: what every conv block of a network needs to know (conv type 2-D/3-D, weight
  standardisation, norm kind) in one object that is not a module, so it stays out of the state dict.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["standardize_weight", "WSConv2d", "WSConv3d", "weight_standardized_conv", "ConvNormFactory"]


def standardize_weight(weight: Tensor) -> Tensor:
    """Zero mean and unit (unbiased) variance per output filter, eps 1e-12 under the square root."""
    w = weight - weight.mean(dim=tuple(range(1, weight.ndim)), keepdim=True)
    std = torch.sqrt(torch.var(w.reshape(w.shape[0], -1), dim=1) + 1e-12)
    return w / std.view(-1, *([1] * (weight.ndim - 1)))


class _WeightStandardized:
    """Mixin for ``nn.ConvNd``: convolve with the standardised weight (the stored weight is unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


class WSConv2d(_WeightStandardized, nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation (see the module docstring)."""


class WSConv3d(_WeightStandardized, nn.Conv3d):
    """``nn.Conv3d`` with weight standardisation (see the module docstring)."""


def weight_standardized_conv(conv_op: type[nn.Module]) -> type[nn.Module]:
    """The weight-standardised class for ``nn.Conv2d`` / ``nn.Conv3d``."""
    if conv_op is nn.Conv3d:
        return WSConv3d
    if conv_op is nn.Conv2d:
        return WSConv2d
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")


_NORM_OPS = {2: {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d},
             3: {"instance": nn.InstanceNorm3d, "batch": nn.BatchNorm3d}}


class ConvNormFactory:
    """Conv / norm / nonlinearity constructors of one network (not a module: stays out of the state dict).

    Args:
        conv_op: ``nn.Conv3d`` or ``nn.Conv2d`` (decides 2-D or 3-D).
        weight_standardization: convs are :class:`WSConv3d` / :class:`WSConv2d`.
        norm: ``"instance"`` (affine), ``"batch"`` or ``"group"``.
        norm_groups: GroupNorm groups (``"group"``).
        fit_groups: with ``"group"``, use the largest divisor of the channel count that divides
            ``norm_groups`` (CoTr's narrow widths) instead of raising for indivisible widths (DoDNet).
        nonlin: ``"leakyrelu"`` (slope 0.01) or ``"relu"``.
        owner: network name for error messages.
    """

    def __init__(self, conv_op: type[nn.Module] = nn.Conv3d, weight_standardization: bool = False,
                 norm: str = "instance", norm_groups: int = 16, fit_groups: bool = False, nonlin: str = "relu",
                 owner: str = "network"):
        if conv_op not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"{owner}: conv_op must be nn.Conv2d or nn.Conv3d, got {conv_op}")
        if norm not in ("instance", "batch", "group"):
            raise ValueError(f"{owner}: norm must be 'instance', 'batch' or 'group', got {norm!r}")
        if nonlin not in ("leakyrelu", "relu"):
            raise ValueError(f"{owner}: nonlin must be 'leakyrelu' or 'relu', got {nonlin!r}")
        self.conv_op = conv_op
        self.dim = 3 if conv_op is nn.Conv3d else 2
        self.conv_class = weight_standardized_conv(conv_op) if weight_standardization else conv_op
        self.norm_kind, self.norm_groups, self.fit_groups = norm, int(norm_groups), fit_groups
        self.nonlin_kind, self.owner = nonlin, owner

    def conv(self, cin: int, cout: int, kernel: int, stride=1, bias: bool = False) -> nn.Module:
        """``kernel`` x ... convolution, 'same' padding (``kernel // 2``), no bias unless asked."""
        return self.conv_class(cin, cout, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=bias)

    def norm(self, channels: int) -> nn.Module:
        if self.norm_kind != "group":
            op = _NORM_OPS[self.dim][self.norm_kind]
            return op(channels, affine=True) if self.norm_kind == "instance" else op(channels)
        if self.fit_groups:
            return nn.GroupNorm(math.gcd(self.norm_groups, channels), channels)
        if channels % self.norm_groups:
            raise ValueError(f"{self.owner}: GroupNorm with {self.norm_groups} groups needs channel counts divisible "
                             f"by {self.norm_groups}, got {channels} (set norm_groups or the widths accordingly)")
        return nn.GroupNorm(self.norm_groups, channels)

    def nonlin(self) -> nn.Module:
        return nn.LeakyReLU(0.01, inplace=True) if self.nonlin_kind == "leakyrelu" else nn.ReLU(inplace=True)
