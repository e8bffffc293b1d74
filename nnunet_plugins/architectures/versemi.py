"""VerSemi: one task-prompted network for several partially labelled datasets plus a synthetic task.

Paper: Q. Zeng, Y. Xie, Z. Lu et al. "Segment Together: A Versatile Paradigm for Semi-Supervised
Medical Image Segmentation". IEEE TMI 2025. Official code: github.com/maxwell0027/VerSemi
(``vnet_odod_mix.py``, ``train.py``); this is our own implementation of that architecture.

Both networks end in a DoDNet-style DYNAMIC HEAD (:mod:`nnunet_plugins.architectures.blocks.dynamic_head`):
a controller turns ``GAP(bottleneck) ++ one-hot(task)`` into the kernels of three ``1x1`` convolutions
8 -> 8 -> 8 -> ``num_classes`` that run on an 8-channel full-resolution decoder output. VerSemi has
``T`` real tasks (one per source dataset) plus ONE SYNTHETIC TASK, id ``T``, that segments the union of
the foregrounds of CutMix-ed images (:mod:`nnunet_plugins.training.cutmix`). Task ids are therefore
``0..T`` (the official code numbers them ``1..T+1``); the one-hot code has ``T + 1`` entries.

* :class:`VerSemiVNet`: the official V-Net variant (the paper's network), 9,484,144 parameters with
  the defaults (1 input channel, 2 classes, 4 tasks).
* :class:`VerSemiUNet`: the plans-driven variant (the project's default for nnU-Net datasets):
  dynamic-network-architectures' ``PlainConvEncoder`` + ``UNetDecoder`` built from the plans, the
  decoder's segmentation layers producing the 8 head channels, plus the controller and dynamic head.

Both follow :class:`~nnunet_plugins.architectures.blocks.dynamic_head.TaskConditionedNetwork`:
``forward(x, task_id=None)`` with ``task_id`` a LongTensor ``(B,)`` or an int, or the task set with
``set_inference_task`` (any of ``0..T``, the synthetic task included).
"""
from __future__ import annotations

from typing import List, Tuple, Type, Union

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from nnunet_plugins.architectures.blocks.dynamic_head import (
    TaskConditionedNetwork, TaskController, apply_dynamic_head, dynamic_head_layer_sizes, num_dynamic_params,
)
from nnunet_plugins.architectures.blocks.vnet import VNetEncoder, vnet_conv_stage
from nnunet_plugins.architectures.contract import (
    DecoderDeepSupervision, PlansNetwork, network_name, resolve_arch_kwargs, total_stride,
)

__all__ = ["VerSemiVNet", "VerSemiUNet"]

_OPS = {  # dim -> (conv, transposed conv, instance norm, batch norm)
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.BatchNorm3d),
}


class _TaskHeadMixin:
    """Controller + dynamic head bookkeeping shared by both VerSemi networks."""

    def _build_task_head(self, num_tasks: int, bottleneck_channels: int, num_classes: int, head_channels: int,
                         head_layers: int, second_output: bool, conv_op, pre: nn.Module | None) -> None:
        if num_tasks < 1:
            raise ValueError(f"{type(self).__name__}: num_tasks (real tasks T) must be >= 1, got {num_tasks}")
        self.num_real_tasks = int(num_tasks)
        self.synthetic_task = int(num_tasks)           # id of the CutMix union task
        self.num_tasks = int(num_tasks) + 1            # valid ids 0..T (TaskConditionedNetwork's check)
        self.num_classes = int(num_classes)
        self.head_parallel_outputs = 2 if second_output else 1
        self.head_layer_sizes = dynamic_head_layer_sizes(head_channels, head_channels, head_layers, self.num_classes,
                                                         self.head_parallel_outputs)
        self.num_dynamic_params = num_dynamic_params(self.head_layer_sizes)
        self.controller = TaskController(bottleneck_channels, self.num_tasks, self.num_dynamic_params, conv_op, pre)

    def _head(self, head_input: Tensor, params: Tensor) -> Tensor:
        out = apply_dynamic_head(head_input, params, self.head_layer_sizes, self.head_parallel_outputs)
        # official: the second parallel output is computed and discarded ("only the first is used")
        return out[:, :self.num_classes]


class VerSemiVNet(_TaskHeadMixin, TaskConditionedNetwork):
    """The official VerSemi V-Net (``vnet_odod_mix.VNet``) with controller and dynamic head.

    Architecture (base width F = ``base_filters``, official 16; "norm" = instance norm without affine
    parameters, the official ``normalization='instancenorm'``):

    * encoder (:class:`~nnunet_plugins.architectures.blocks.vnet.VNetEncoder`, shared with LeFeD): five
      stages of 1 / 2 / 3 / 3 / 3 (3x3x3 conv -> norm -> ReLU) with widths F / 2F / 4F / 8F / 16F; between
      them a stride-2, kernel-2 conv -> norm -> ReLU that doubles the width. V-Net as used by the official
      code: PLAIN conv stages (its residual block is unused). ``encoder_stages`` / ``downsampling`` are the
      encoder's ``stages`` / ``downsamples`` (state-dict names ``encoder.stages.*``, ``encoder.downsamples.*``);
    * decoder: from the bottleneck, transposed conv (kernel 2, stride 2) -> norm -> ReLU halving the
      width, ADDED to the encoder stage of that scale, then 3 / 3 / 2 conv stages (8F, 4F, 2F); a last
      transposed conv to F channels at full resolution WITHOUT the stage-1 skip (the official addition
      is commented out);
    * head input: BatchNorm -> ReLU -> 1x1 conv F -> 8 (official ``precls_conv``);
    * controller: BatchNorm -> ReLU -> GAP of the bottleneck (16F = 256) ++ one-hot of the T + 1 task
      ids -> 1x1 conv -> the dynamic parameters;
    * dynamic head 8 -> 8 (ReLU) -> 8 (ReLU) -> ``num_classes``; with ``official_second_output`` (the
      default, as official) the controller also generates a second parallel 8 -> ``num_classes`` output
      layer (weights 64 + 64 + 16 + 16, biases 8 + 8 + 2 + 2 = 180 values) that is computed and never
      used, as in the official code. ``official_second_output=False`` builds the paper's 162-value head.

    Parameters with the defaults (1 input channel, 2 classes, 4 tasks): 9,484,144, the official count
    (9,479,428 without the second output).

    Args:
        input_channels, num_classes: image channels; classes of the dynamic head (softmax, official 2:
            background / the task's foreground).
        num_tasks: T, the real tasks; the network also has the synthetic task id T.
        deep_supervision: returns ``[logits]`` (the V-Net has no auxiliary outputs) for list-consuming code.
        base_filters: F. head_channels / head_layers: the dynamic head (official 8 / 3).
        official_second_output: see above.
        conv_op: ``nn.Conv3d`` (official) or ``nn.Conv2d`` (the same network in 2-D).

    Shapes: ``x`` ``(B, input_channels, *spatial)``, every axis divisible by 16 (4 stride-2 steps);
    ``task_id`` LongTensor ``(B,)`` / int in ``0..T``. Returns ``(B, num_classes, *spatial)`` logits.

    Not reproduced: the official ``Dropout3d(0.5)`` on the bottleneck, switched by an ``is_train``
    argument that the official training script never sets (it has no parameters).
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 2, num_tasks: int = 4,
                 deep_supervision: bool = False, *, base_filters: int = 16, head_channels: int = 8,
                 head_layers: int = 3, official_second_output: bool = True,
                 conv_op: type[nn.Module] = nn.Conv3d):
        super().__init__()
        dim = {nn.Conv3d: 3, nn.Conv2d: 2}.get(conv_op)
        if dim is None:
            raise ValueError(f"VerSemiVNet: conv_op must be nn.Conv3d or nn.Conv2d, got {conv_op}")
        if min(input_channels, num_classes, base_filters, head_channels, head_layers) < 1:
            raise ValueError("VerSemiVNet: input_channels, num_classes, base_filters, head_channels and head_layers "
                             "must be positive")
        conv, convt, inorm, bnorm = _OPS[dim]
        self.dim, self.conv_op = dim, conv_op
        self.input_channels = int(input_channels)
        self.deep_supervision = bool(deep_supervision)
        f = int(base_filters)
        widths = [f, 2 * f, 4 * f, 8 * f, 16 * f]
        dec_convs = (3, 3, 2)

        def up(cin, cout):
            return nn.Sequential(convt(cin, cout, kernel_size=2, stride=2), inorm(cout), nn.ReLU(inplace=True))

        # official normalization='instancenorm': instance norm without affine parameters, no dropout
        self.encoder = VNetEncoder(self.input_channels, f, "instance", dim=dim)
        # decoder level l = 3, 2, 1 (deepest first): up widths[l+1] -> widths[l], + skip l, conv stage
        self.upsampling = nn.ModuleList([up(widths[l + 1], widths[l]) for l in (3, 2, 1, 0)])
        self.decoder_stages = nn.ModuleList([vnet_conv_stage(n, widths[l], widths[l], "instance", dim)
                                             for n, l in zip(dec_convs, (3, 2, 1))])
        self.head_input = nn.Sequential(bnorm(f), nn.ReLU(inplace=True), conv(f, head_channels, kernel_size=1))
        self._build_task_head(num_tasks, widths[-1], num_classes, head_channels, head_layers,
                              official_second_output, conv,
                              pre=nn.Sequential(bnorm(widths[-1]), nn.ReLU(inplace=True)))

    @property
    def encoder_stages(self) -> nn.ModuleList:
        """The encoder's conv stages, full resolution first."""
        return self.encoder.stages

    @property
    def downsampling(self) -> nn.ModuleList:
        """The encoder's stride-2 convs between its stages."""
        return self.encoder.downsamples

    @property
    def required_divisor(self) -> tuple[int, ...]:
        """Every input axis must be a multiple of this (four stride-2 steps)."""
        return (16,) * self.dim

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor | list[Tensor]:
        task_id = self.task_ids(x, task_id)
        if x.dim() != self.dim + 2 or x.shape[1] != self.input_channels:
            raise ValueError(f"VerSemiVNet expects (B, {self.input_channels}, {self.dim} spatial dims), got "
                             f"{tuple(x.shape)}")
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"VerSemiVNet input spatial size {tuple(x.shape[2:])} must be divisible by 16")
        skips = self.encoder(x)           # full resolution .. bottleneck
        h = skips[-1]
        params = self.controller(h, task_id)
        for up, stage, skip in zip(self.upsampling, self.decoder_stages, reversed(skips[1:4])):
            h = stage(up(h) + skip)
        logits = self._head(self.head_input(self.upsampling[-1](h)), params)
        return [logits] if self.deep_supervision else logits


#: PlainConvUNet arguments that VerSemiUNet takes from nnU-Net's stock plans
_UNET_KWARGS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
                "nonlin", "nonlin_kwargs", "nonlin_first")


class VerSemiUNet(PlansNetwork, DecoderDeepSupervision, _TaskHeadMixin, TaskConditionedNetwork):
    """VerSemi on the plans' U-Net: ``PlainConvEncoder`` + ``UNetDecoder`` + controller + dynamic head.

    The constructor takes ``PlainConvUNet``'s arguments (so nnU-Net plans build it) plus the
    keyword-only ``num_tasks`` (T real tasks; the synthetic task is id T):

    * encoder / decoder: exactly ``PlainConvUNet``'s, except that the decoder's segmentation layers
      (1x1 convs, one per decoder stage) output ``head_channels`` (8) features: the head input;
    * controller: GAP of the bottleneck (the encoder's last stage already ends in norm + nonlinearity,
      so nothing is inserted before pooling, unlike the V-Net's BatchNorm + ReLU) ++ one-hot(T + 1)
      -> 1x1 conv -> dynamic parameters;
    * dynamic head 8 -> 8 -> 8 -> ``num_classes`` (the paper's 162 values for 2 classes;
      ``official_second_output=True`` adds the official unused second output, 180 values).

    Deep supervision: the sample's dynamic head runs on the 8-channel output of every decoder stage, so
    ``deep_supervision=True`` returns nnU-Net's list of logits, highest resolution first; nnU-Net's
    ``set_deep_supervision_enabled`` switches ``self.decoder.deep_supervision`` as for ``PlainConvUNet``.

    Shapes: ``x`` ``(B, input_channels, *patch)`` (2-D or 3-D by ``conv_op``), ``task_id`` LongTensor
    ``(B,)`` / int in ``0..T`` -> ``(B, num_classes, *patch)`` or the deep-supervision list.
    Parameters: ``PlainConvUNet``'s with ``num_classes = head_channels``, plus
    ``(features_per_stage[-1] + T + 1) * P + P`` for the controller (P = 162 at the defaults).

    Plans (:class:`~nnunet_plugins.architectures.contract.PlansNetwork`): built from nnU-Net's stock
    ``PlainConvUNet`` entry (its U-Net arguments) or from plans naming this class (their ``arch_kwargs``);
    ``num_tasks`` comes from the trainer (the dataset's task tables), never from the plans.
    """

    context_kwargs = PlansNetwork.context_kwargs + ("num_tasks",)

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Union[int, List[int], Tuple[int, ...]],
                 conv_op: Type[_ConvNd], kernel_sizes: Union[int, List[int], Tuple[int, ...]],
                 strides: Union[int, List[int], Tuple[int, ...]], n_conv_per_stage: Union[int, List[int], Tuple[int, ...]],
                 num_classes: int, n_conv_per_stage_decoder: Union[int, Tuple[int, ...], List[int]],
                 conv_bias: bool = False, norm_op: Union[None, Type[nn.Module]] = None, norm_op_kwargs: dict = None,
                 dropout_op: Union[None, Type[_DropoutNd]] = None, dropout_op_kwargs: dict = None,
                 nonlin: Union[None, Type[torch.nn.Module]] = None, nonlin_kwargs: dict = None,
                 deep_supervision: bool = False, nonlin_first: bool = False, *, num_tasks: int,
                 head_channels: int = 8, head_layers: int = 3, official_second_output: bool = False):
        super().__init__()
        # PlainConvEncoder / UNetDecoder expand and check n_conv_per_stage(_decoder) themselves
        self.input_channels = int(input_channels)
        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True,
                                        nonlin_first=nonlin_first)
        # the decoder's "segmentation" layers are the head-input convs: 8 features per scale
        self.decoder = UNetDecoder(self.encoder, head_channels, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)
        self._build_task_head(num_tasks, self.encoder.output_channels[-1], num_classes, head_channels, head_layers,
                              official_second_output, conv_op, pre=None)

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor | list[Tensor]:
        task_id = self.task_ids(x, task_id)
        skips = self.encoder(x)
        params = self.controller(skips[-1], task_id)
        head_inputs = self.decoder(skips)
        if isinstance(head_inputs, (list, tuple)):
            return [self._head(h, params) for h in head_inputs]
        return self._head(head_inputs, params)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Feature-map voxels for nnU-Net's planner; the dynamic head adds its hidden and output maps
        at every decoder output scale (small next to the decoder's)."""
        if len(input_size) != convert_conv_op_to_dim(self.encoder.conv_op):
            raise ValueError(f"give the spatial input size only, got {input_size}")
        total = self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)
        head = sum(co for _, co in self.head_layer_sizes)
        scales = len(self.decoder.stages) if self.decoder.deep_supervision else 1
        size = list(input_size)
        for s in range(scales):  # decoder output s has the resolution of encoder stage s
            size = [i // j for i, j in zip(size, self.encoder.strides[s])]
            total += np.int64(head) * np.prod(size, dtype=np.int64)
        return total

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)

    # ---- nnU-Net contract ---------------------------------------------------------------------------
    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' U-Net (nnU-Net's ``PlainConvUNet`` entry) or the ``arch_kwargs`` of plans naming this class."""
        name = configuration_manager.network_arch_class_name
        if name == cls.network_name():
            return cls.arch_kwargs_from_plans(configuration_manager)
        if name == network_name(PlainConvUNet):
            return {k: v for k, v in resolve_arch_kwargs(configuration_manager).items() if k in _UNET_KWARGS}
        raise ValueError(f"VerSemiUNet builds on nnU-Net's plain U-Net ({network_name(PlainConvUNet)}), but the plans "
                         f"name {name}; use plans from nnU-Net's default planner (nnUNetPlans)")

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        if "strides" not in kwargs:
            raise ValueError("VerSemiUNet has no default topology: its strides come from the plans")
        return total_stride(kwargs["strides"], dim)
