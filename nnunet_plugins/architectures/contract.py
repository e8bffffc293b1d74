"""The contract between the package's networks and nnU-Net: one place, used by trainers and planners.

Every network class of the package (CoTr, BANetPlainConvUNet, BANetResidualEncoderUNet, UniSeg, DoDNet,
TransDoDNet) mixes in :class:`PlansNetwork` and so offers:

``from_plans(plans_manager, configuration_manager, num_input_channels, num_output_channels,
deep_supervision=True, **extra)`` (classmethod)
    The network for an nnU-Net plans configuration, built on nnU-Net's own path
    (``nnunetv2.utilities.get_network_from_plans``). The constructor arguments come from
    :meth:`~PlansNetwork.kwargs_from_plans` (the plans' ``architecture.arch_kwargs`` when the plans name
    this class, plus what the network derives from the configuration, e.g. its patch size); ``extra``
    are arguments the trainer knows and the plans do not (a multi-task network's number of tasks).
``plans_divisor(configuration_manager)`` (classmethod)
    Every patch axis must be a multiple of this (total stride of the network built from these plans).
``fit_patch(patch_size, configuration_manager)`` (classmethod)
    The nearest patch the network can train on (:func:`fit_patch`, the package's one patch fitter).
``plans_deep_supervision_scales(configuration_manager)`` (classmethod)
    Scale of each output relative to the input, highest resolution first, as nnU-Net's
    ``_get_deep_supervision_scales``; None when the network has no auxiliary outputs.
``compute_conv_feature_map_size(input_size)``
    Number of conv output elements for one sample of spatial size ``input_size`` (the
    dynamic-network-architectures contract with nnU-Net's planner, which uses it for its memory
    estimate): the output of every convolution and transposed convolution counted once.
``deep_supervision`` (attribute / property)
    Whether ``forward`` returns the list of outputs (nnU-Net toggles it around the final validation).

Trainers name their network (``PluginTrainer.network_class``) and ask it; planners ask it too.
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import numpy as np
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

__all__ = ["PlansNetwork", "DecoderDeepSupervision", "network_name", "resolve_arch_kwargs", "fit_to_divisor", "fit_patch",
           "total_stride", "conv_output_size", "strided"]


def network_name(cls: type) -> str:
    """The dotted path nnU-Net's plans use for ``cls`` (``architecture.network_class_name``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_arch_kwargs(configuration_manager) -> dict:
    """The plans' ``arch_kwargs`` with the entries listed in ``_kw_requires_import`` imported."""
    kwargs = dict(configuration_manager.network_arch_init_kwargs or {})
    for key in configuration_manager.network_arch_init_kwargs_req_import or ():
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(f"plans arch_kwargs {key}={kwargs[key]!r} cannot be imported")
            kwargs[key] = located
    return kwargs


def fit_to_divisor(patch_size: Sequence[int], divisor: Sequence[int]) -> list[int]:
    """Round each axis of ``patch_size`` to the nearest positive multiple of ``divisor``."""
    if len(patch_size) != len(divisor):
        raise ValueError(f"patch size {list(patch_size)} and divisor {list(divisor)} have different dimensions")
    return [int(max(d, round(p / d) * d)) for p, d in zip(patch_size, divisor)]


def fit_patch(patch_size: Sequence[int], divisor: Sequence[int], avoid_single_voxel: bool = False) -> list[int]:
    """Nearest patch whose axes are multiples of ``divisor``; with ``avoid_single_voxel`` the deepest level
    keeps more than one voxel (instance norm cannot normalise one voxel): the last axis is doubled when
    every axis would equal the divisor."""
    patch = fit_to_divisor(patch_size, divisor)
    if avoid_single_voxel and all(p == d for p, d in zip(patch, divisor)):
        patch[-1] *= 2
    return patch


def total_stride(strides: Sequence, dim: int) -> tuple[int, ...]:
    """Product of per-stage strides (each an int or one int per axis), checked against ``dim``."""
    out = [1] * dim
    for s in strides:
        s = tuple(s) if isinstance(s, (list, tuple)) else (s,) * dim
        if len(s) != dim:
            raise ValueError(f"stride {list(s)} does not match a {dim}-D patch")
        out = [o * int(v) for o, v in zip(out, s)]
    return tuple(out)


class PlansNetwork:
    """Mixin of the package's networks: their contract with nnU-Net (see the module docstring)."""

    #: spatial dimensions the network can be built for
    spatial_dims: tuple[int, ...] = (2, 3)
    #: the deepest level must keep more than one voxel (instance norm there)
    avoid_single_voxel_bottleneck: bool = False
    #: constructor arguments set by the trainer / task metadata, never by the plans' arch_kwargs
    context_kwargs: tuple[str, ...] = ("input_channels", "num_classes", "deep_supervision")

    @classmethod
    def network_name(cls) -> str:
        return network_name(cls)

    # ---- plans -> constructor arguments -------------------------------------------------------------
    @classmethod
    def arch_kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' ``arch_kwargs`` (imports resolved) when the plans name this class, else ``{}`` (the
        network's own defaults, e.g. the official configuration on nnU-Net's stock plans)."""
        if configuration_manager.network_arch_class_name != cls.network_name():
            return {}
        kwargs = resolve_arch_kwargs(configuration_manager)
        clash = sorted(set(kwargs) & set(cls.context_kwargs))
        if clash:
            raise ValueError(f"the plans' arch_kwargs for {cls.network_name()} set {clash}; these come from the task "
                             f"metadata and the trainer, remove them from the plans")
        return kwargs

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """Constructor arguments from the plans configuration (without channels, classes, deep supervision)."""
        return cls.arch_kwargs_from_plans(configuration_manager)

    @classmethod
    def class_for_plans(cls, configuration_manager) -> type:
        """The class to build (a family of networks may pick a member by the plans, as BA-Net does)."""
        return cls

    @classmethod
    def check_plans(cls, configuration_manager, configuration: str = "") -> None:
        """Raise a clear error when the network cannot be built for this configuration."""
        patch = list(configuration_manager.patch_size)
        if len(patch) not in cls.spatial_dims:
            kind = " or ".join(f"{d}-D" for d in cls.spatial_dims)
            where = f"configuration {configuration!r}" if configuration else "the plans' configuration"
            raise ValueError(f"{cls.__name__} is a {kind} network, but {where} has a {len(patch)}-D patch "
                             f"{patch}; train a 3-D configuration such as 3d_fullres")

    @classmethod
    def from_plans(cls, plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **extra):
        """The network for the plans (see the module docstring); ``extra`` overrides constructor arguments."""
        cls.check_plans(configuration_manager)
        kwargs = {**cls.kwargs_from_plans(configuration_manager), "num_classes": num_output_channels, **extra}
        num_classes = kwargs.pop("num_classes")
        return get_network_from_plans(network_name(cls.class_for_plans(configuration_manager)), kwargs, [],
                                      num_input_channels, num_classes, allow_init=True,
                                      deep_supervision=deep_supervision)

    # ---- what trainers and planners ask -------------------------------------------------------------
    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        """Required input divisor of the network built with constructor arguments ``kwargs`` (``{}``: defaults)."""
        raise NotImplementedError(f"{cls.__name__} does not declare its input divisor")

    @classmethod
    def plans_divisor(cls, configuration_manager) -> tuple[int, ...]:
        return tuple(cls.divisor_for(cls.kwargs_from_plans(configuration_manager),
                                     len(configuration_manager.patch_size)))

    @classmethod
    def fit_patch(cls, patch_size: Sequence[int], configuration_manager=None) -> list[int]:
        """Nearest patch the network built from these plans (None: with its defaults) can train on."""
        divisor = (cls.plans_divisor(configuration_manager) if configuration_manager is not None
                   else cls.divisor_for({}, len(patch_size)))
        return fit_patch(list(patch_size), divisor, cls.avoid_single_voxel_bottleneck)

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager) -> list | None:
        """nnU-Net's scales (cumulative pooling of the plans' U-Net), as ``nnUNetTrainer`` computes them."""
        return list(list(i) for i in 1 / np.cumprod(np.vstack(configuration_manager.pool_op_kernel_sizes), axis=0))[:-1]

    def compute_conv_feature_map_size(self, input_size) -> int:
        raise NotImplementedError(f"{type(self).__name__} does not implement compute_conv_feature_map_size")


class DecoderDeepSupervision:
    """``deep_supervision`` of a network whose decoder (``self.decoder``) decides it (nnU-Net's convention)."""

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)


def conv_output_size(channels: int, size: Sequence[int]) -> int:
    """Elements of one conv output map: ``channels * prod(size)`` (dynamic-network-architectures' count)."""
    return int(np.prod([channels, *size], dtype=np.int64))


def strided(size: Sequence[int], stride) -> list[int]:
    """Spatial size after a convolution with ``stride`` ('same' padding), as d-n-a computes it."""
    stride = stride if isinstance(stride, (list, tuple)) else [stride] * len(size)
    return [int(i) // int(s) for i, s in zip(size, stride)]
