"""UniSeg: prompt-driven universal segmentation (Ye, Xie, Zhang, Chen, Xia; MICCAI 2023).

Paper: "UniSeg: A Prompt-driven Universal Segmentation Model as well as A Strong Representation
Learner". Official code: yeerwen/UniSeg (``UniSeg_model`` on nnU-Net v1's ``Generic_UNet``).

Architecture (composed of dynamic-network-architectures blocks, as nnU-Net v2's ``PlainConvUNet``):

* encoder: ``PlainConvEncoder`` (strided convs, conv + IN + LeakyReLU(0.01), 2 convs per stage),
  except that the stem's first convolution exists once per INPUT CHANNEL COUNT (official: 1, 2, 4;
  shared norm / nonlinearity) and is chosen by the number of channels the task has;
* universal prompt: a learnable tensor (1, T, *bottleneck size) (T tasks);
* FUSE: concat(bottleneck features F (C ch), prompt (T ch)) -> three conv (3x3x3) + IN + LReLU blocks
  (C+T) -> (C+T)//4 -> (C+T)//4 -> T; the channel of the sample's task is the task-specific prompt;
* decoder: nnU-Net's ``UNetDecoder`` whose input is concat(F, task prompt): C+1 channels (321);
* output: ``num_classes`` = the largest class count of any task; the trainer slices each task's
  logits (``[:, :K_t]``) before Dice + CE.

Shapes: ``x`` (B, input_channels, *patch) -> deep supervision on: list of (B, num_classes, *scale_s)
highest resolution first; off: (B, num_classes, *patch). ``task_id``: LongTensor (B,) (or an int).

Multi-task convention (``nnunet_plugins.multitask``): ``forward(x, task_id=None)`` falls back to the
task set with ``set_inference_task``; with neither it raises a RuntimeError, so nnU-Net's stock
predictor can never silently segment with some arbitrary prompt.

Input channels: with ``task_input_channels`` (one entry per task) a sample of task t uses the first
``task_input_channels[t]`` channels of ``x`` (a universal dataset pads narrower tasks with zero
channels) and the stem of that channel count. Without it, the stem is chosen by ``x.shape[1]`` as in
the official code.

Deviations and options:

* ``official_generic_unet`` (default True, the official configuration): the U-Net details of nnU-Net
  v1's ``Generic_UNet`` that the official model inherits: transposed convolutions and segmentation
  heads without bias, and each decoder stage using the conv kernel of the encoder stage one level
  deeper (v1 indexes ``conv_kernel_sizes[-(u+1)]``). With it the official configuration has exactly
  32,114,381 parameters. ``UniSegTrainer`` builds from nnU-Net v2 plans with it False, i.e. exactly
  nnU-Net v2's ``PlainConvUNet`` plus the prompt parts, so a UniSeg backbone converts 1:1 into a
  ``PlainConvUNet`` for downstream fine-tuning.
* the official forward selects the prompt channel of the FIRST sample's task for the whole batch
  (its batches hold one task); here each sample gets its own task's channel (identical for one-task
  batches).
* the prompt has the bottleneck size of ``patch_size``; an input of another size (never the case in
  nnU-Net's sliding window) gets the prompt resized by linear interpolation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, get_matching_convtransp
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn

from nnunet_plugins.architectures.blocks.unet_decoder import unet_decoder
from nnunet_plugins.architectures.contract import (
    DecoderDeepSupervision, PlansNetwork, network_name, resolve_arch_kwargs, total_stride,
)

# official configuration (yeerwen/UniSeg UniSeg_Trainer + its 3d_fullres plans)
OFFICIAL_FEATURES = (32, 64, 128, 256, 320, 320)
OFFICIAL_KERNELS = ((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
OFFICIAL_STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
OFFICIAL_PATCH = (64, 192, 192)
OFFICIAL_STEMS = (1, 2, 4)
# PlainConvUNet constructor arguments that UniSeg takes under the same name (UniSeg on nnU-Net's stock plans)
UNET_KWARGS = ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder",
               "conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin",
               "nonlin_kwargs")


class ChannelCountStem(nn.Module):
    """The stem's first convolution, once per input channel count; picks the one matching ``x``."""

    def __init__(self, conv_op, channel_counts: Sequence[int], out_channels: int, kernel_size, stride, bias: bool):
        super().__init__()
        kernel_size = [kernel_size] * convert_conv_op_to_dim(conv_op) if isinstance(kernel_size, int) else list(kernel_size)
        self.channel_counts = tuple(sorted(set(int(c) for c in channel_counts)))
        self.convs = nn.ModuleDict({str(c): conv_op(c, out_channels, kernel_size, stride,
                                                    padding=[(k - 1) // 2 for k in kernel_size], bias=bias)
                                    for c in self.channel_counts})
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.shape[1])
        if key not in self.convs:
            raise RuntimeError(f"UniSeg has stems for {list(self.channel_counts)} input channels, got an input with "
                               f"{x.shape[1]}")
        return self.convs[key](x)


class UniSeg(PlansNetwork, DecoderDeepSupervision, nn.Module):
    """UniSeg network (see the module docstring).

    Args:
        input_channels: channels of the input tensor (of a universal dataset: the widest task's).
        num_classes: output channels = the largest class count (background included) of any task.
        num_tasks: T, the number of tasks (prompt channels).
        patch_size: training patch; sets the prompt's spatial size (patch // total stride).
        features_per_stage, kernel_sizes, strides, n_conv_per_stage, n_conv_per_stage_decoder: the
            U-Net (nnU-Net plans' names); default: official (6 stages 32..320).
        task_input_channels: channel count of each task (length T) or None (stem chosen by x).
        stem_channels: channel counts that get a stem; default: those of ``task_input_channels``, or
            ``input_channels``.
        fuse_channels: hidden width of FUSE; default (C_bottleneck + T) // 4 (official).
        conv_op, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
            nonlin_kwargs: building blocks (nnU-Net plans' names); default 3-D, IN, LeakyReLU(0.01).
        deep_supervision: return outputs at every decoder scale (list, highest resolution first).
        official_generic_unet: nnU-Net v1 Generic_UNet details of the official code (see above).
    """

    def __init__(self, input_channels: int, num_classes: int, num_tasks: int,
                 patch_size: Sequence[int] = OFFICIAL_PATCH,
                 features_per_stage: Sequence[int] = OFFICIAL_FEATURES,
                 kernel_sizes: Sequence = OFFICIAL_KERNELS,
                 strides: Sequence = OFFICIAL_STRIDES,
                 n_conv_per_stage: int | Sequence[int] = 2,
                 n_conv_per_stage_decoder: int | Sequence[int] = 2,
                 task_input_channels: Sequence[int] | None = None,
                 stem_channels: Sequence[int] | None = None,
                 fuse_channels: int | None = None,
                 conv_op=nn.Conv3d, conv_bias: bool = True,
                 norm_op=None, norm_op_kwargs: dict | None = None,
                 dropout_op=None, dropout_op_kwargs: dict | None = None,
                 nonlin=nn.LeakyReLU, nonlin_kwargs: dict | None = None,
                 deep_supervision: bool = True, official_generic_unet: bool = True):
        super().__init__()
        dim = convert_conv_op_to_dim(conv_op)
        n_stages = len(features_per_stage)
        if num_tasks < 1 or num_classes < 2:
            raise ValueError(f"UniSeg needs num_tasks >= 1 and num_classes >= 2, got {num_tasks}, {num_classes}")
        if len(patch_size) != dim:
            raise ValueError(f"patch_size {list(patch_size)} does not match the {dim}-D conv_op")
        if len(kernel_sizes) != n_stages or len(strides) != n_stages:
            raise ValueError("features_per_stage, kernel_sizes and strides need one entry per stage")
        if norm_op is None:
            norm_op = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
        norm_op_kwargs = {"eps": 1e-5, "affine": True} if norm_op_kwargs is None else norm_op_kwargs
        nonlin_kwargs = {"negative_slope": 1e-2, "inplace": True} if nonlin_kwargs is None else nonlin_kwargs
        kernel_sizes = [[k] * dim if isinstance(k, int) else list(k) for k in kernel_sizes]
        strides = [[s] * dim if isinstance(s, int) else list(s) for s in strides]
        total_stride = np.prod(np.asarray(strides), axis=0)
        if any(p % s for p, s in zip(patch_size, total_stride)):
            raise ValueError(f"patch_size {list(patch_size)} is not divisible by the total stride {total_stride.tolist()}")

        if task_input_channels is not None:
            task_input_channels = [int(c) for c in task_input_channels]
            if len(task_input_channels) != num_tasks:
                raise ValueError(f"task_input_channels has {len(task_input_channels)} entries for {num_tasks} tasks")
            if max(task_input_channels) > input_channels or min(task_input_channels) < 1:
                raise ValueError(f"task_input_channels {task_input_channels} must be in 1..{input_channels}")
        if stem_channels is None:
            stem_channels = sorted(set(task_input_channels)) if task_input_channels is not None else [input_channels]
        stem_channels = sorted(set(int(c) for c in stem_channels))
        if task_input_channels is not None and not set(task_input_channels) <= set(stem_channels):
            raise ValueError(f"no stem for some task channel counts: tasks {task_input_channels}, stems {stem_channels}")

        self.input_channels = input_channels
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.patch_size = tuple(int(p) for p in patch_size)
        self.official_generic_unet = official_generic_unet
        self.inference_task: int | None = None
        self.register_buffer("task_input_channels",
                             torch.as_tensor(task_input_channels if task_input_channels is not None else [0] * num_tasks,
                                             dtype=torch.long), persistent=False)
        self._slice_inputs = task_input_channels is not None

        self.encoder = PlainConvEncoder(max(stem_channels), n_stages, list(features_per_stage), conv_op, kernel_sizes,
                                        strides, n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True)
        # replace the stem's first convolution by one convolution per channel count (both references:
        # ConvDropoutNormReLU keeps the conv as .conv and as .all_modules[0])
        first = self.encoder.stages[0][0].convs[0]
        stem = ChannelCountStem(conv_op, stem_channels, features_per_stage[0], kernel_sizes[0], strides[0], conv_bias)
        first.conv = stem
        first.all_modules[0] = stem

        bottleneck = features_per_stage[-1]
        self.universal_prompt = nn.Parameter(torch.randn(1, num_tasks, *[int(p // s) for p, s in zip(patch_size, total_stride)]))
        hidden = (bottleneck + num_tasks) // 4 if fuse_channels is None else int(fuse_channels)
        self.fuse = StackedConvBlocks(3, conv_op, bottleneck + num_tasks, [hidden, hidden, num_tasks], kernel_sizes[-1],
                                      1, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
                                      nonlin_kwargs)

        # nnU-Net v1's decoder layout with official_generic_unet (the shared block, as BA-Net's official layout)
        self.decoder = unet_decoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                    official_v1_layout=official_generic_unet)
        transpconv = get_matching_convtransp(conv_op)
        s0 = strides[-1]
        # the decoder's input is concat(bottleneck, task prompt): one channel more than the bottleneck
        self.decoder.transpconvs[0] = transpconv(bottleneck + 1, features_per_stage[-2], s0, s0,
                                                 bias=conv_bias and not official_generic_unet)
        self.apply(InitWeights_He(1e-2))

    # ---- nnU-Net contract ---------------------------------------------------------------------------
    context_kwargs = PlansNetwork.context_kwargs + ("num_tasks", "patch_size", "task_input_channels")

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The U-Net of the plans (nnU-Net's ``PlainConvUNet`` plans, or plans naming UniSeg), nnU-Net v2's
        conventions unless the plans set ``official_generic_unet``, and the configuration's patch."""
        name = configuration_manager.network_arch_class_name
        if name == cls.network_name():
            kwargs = cls.arch_kwargs_from_plans(configuration_manager)
        elif name == network_name(PlainConvUNet):
            kwargs = {k: v for k, v in resolve_arch_kwargs(configuration_manager).items() if k in UNET_KWARGS}
        else:
            raise ValueError(f"UniSeg builds on nnU-Net's plain U-Net ({network_name(PlainConvUNet)}), but the plans "
                             f"name {name}; use plans from nnU-Net's default planner (nnUNetPlans)")
        kwargs.setdefault("official_generic_unet", False)
        return {**kwargs, "patch_size": tuple(configuration_manager.patch_size)}

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        return total_stride(kwargs.get("strides", OFFICIAL_STRIDES), dim)

    # ---- task handling ------------------------------------------------------------------------------
    def set_inference_task(self, task_id: int | None) -> None:
        if task_id is not None and not 0 <= int(task_id) < self.num_tasks:
            raise ValueError(f"task id {task_id} out of range 0..{self.num_tasks - 1}")
        self.inference_task = None if task_id is None else int(task_id)

    def _task_ids(self, task_id, batch: int, device) -> torch.Tensor:
        if task_id is None:
            if self.inference_task is None:
                raise RuntimeError(
                    "UniSeg is a multi-task network and needs the task of its input: call it as network(x, task_id) "
                    "or set_inference_task(t) first. nnU-Net's nnUNetv2_predict cannot pass a task; predict with "
                    "`nnunet-plugins predict-multitask` (it takes each case's task from its name or --task).")
            task_id = self.inference_task
        task_id = torch.as_tensor(task_id, dtype=torch.long, device=device).reshape(-1)
        if task_id.numel() == 1 and batch > 1:
            task_id = task_id.expand(batch)
        if task_id.numel() != batch:
            raise ValueError(f"got {task_id.numel()} task ids for a batch of {batch}")
        if task_id.min() < 0 or task_id.max() >= self.num_tasks:
            raise ValueError(f"task ids must be in 0..{self.num_tasks - 1}, got {task_id.tolist()}")
        return task_id

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task_id=None):
        task_id = self._task_ids(task_id, x.shape[0], x.device)
        if not self._slice_inputs:
            return self._forward(x, task_id)
        counts = self.task_input_channels.to(task_id.device)[task_id]
        unique = torch.unique(counts).tolist()
        if len(unique) == 1:
            return self._forward(x[:, :unique[0]], task_id)
        # samples of tasks with different channel counts go through different stems: run each group
        # (instance norm is per sample, so grouping does not change any sample's result)
        outputs = None
        for c in unique:
            idx = torch.nonzero(counts == c).squeeze(1)
            out = self._forward(x[idx, :c], task_id[idx])
            out = out if isinstance(out, (list, tuple)) else [out]
            if outputs is None:
                outputs = [o.new_empty((x.shape[0], *o.shape[1:])) for o in out]
            for full, part in zip(outputs, out):
                full[idx] = part
        return outputs if self.decoder.deep_supervision else outputs[0]

    def _forward(self, x: torch.Tensor, task_id: torch.Tensor):
        skips = self.encoder(x)
        features = skips[-1]
        prompt = self.universal_prompt
        if prompt.shape[2:] != features.shape[2:]:
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[features.ndim - 2]
            prompt = F.interpolate(prompt, size=features.shape[2:], mode=mode, align_corners=False)
        dynamic_prompt = self.fuse(torch.cat([features, prompt.expand(x.shape[0], *prompt.shape[1:])], dim=1))
        index = task_id.view(-1, 1, *([1] * (features.ndim - 2))).expand(-1, 1, *features.shape[2:])
        task_prompt = torch.gather(dynamic_prompt, 1, index)
        return self.decoder(skips[:-1] + [torch.cat([features, task_prompt], dim=1)])

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Feature map voxels (nnU-Net's planner's memory estimate); FUSE and prompt add bottleneck-sized maps."""
        bottleneck = [int(i // s) for i, s in zip(input_size, np.prod(np.asarray(self.encoder.strides), axis=0))]
        fuse = sum(np.prod([c, *bottleneck], dtype=np.int64) for c in (self.fuse.convs[0].output_channels,
                                                                          self.fuse.convs[1].output_channels,
                                                                          self.num_tasks))
        return int(self.encoder.compute_conv_feature_map_size(input_size)
                   + self.decoder.compute_conv_feature_map_size(input_size) + fuse)
