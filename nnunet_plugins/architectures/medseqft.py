"""MedSeqFT's network: the plans' U-Net with one segmentation head per task seen.

Paper: Y. Ye, Y. Wu, X. Luo et al. "MedSeqFT: Sequential Fine-tuning Foundation Models for 3D Medical Image
Segmentation", 2025 (no official code). The model M_t after stage t segments every task 1..t: one shared
body (the U-Net of M_0's plans: encoder, decoder) and, per task, its own segmentation head.

How the heads sit in the U-Net: dynamic-network-architectures' ``UNetDecoder`` computes every output
with ``decoder.seg_layers[s]`` (a 1x1 conv per decoder stage; all stages with deep supervision, the last
one without). :class:`TaskHeads` replaces each of these layers by a module holding that layer's 1x1 conv
for EVERY task and applying the one of the active task, so the U-Net's own forward (and its deep
supervision) is untouched and one forward pass gives the active task's outputs, at every scale. Task 1's
convs are the U-Net's own seg layers; a new task appends a fresh 1x1 conv (same layout: bias, conv op) at
every stage (:meth:`MedSeqFTNetwork.add_task`).

Why not the multi-task machinery (``trainers/multitask.py``, ``blocks/dynamic_head.py``): that trains ONE network
on a combined dataset with a task id per sample; a MedSeqFT stage trains on one ordinary nnU-Net dataset (the stock
loader, loss and validation) and only the buffers' distillation runs the old heads, so the task is a property of
the network (which head answers), not of the batch, and an ordinary ``nnUNetv2_predict`` of the stage's dataset
predicts the stage's task.

* Active task: :meth:`MedSeqFTNetwork.set_task` (0-based; default the LAST task, i.e. the stage's own
  task, which is what ``nnUNetv2_predict -tr MedSeqFTTrainer`` predicts). Earlier tasks are predicted by
  ``nnunet-plugins medseqft predict --task`` (nnU-Net's predictor with the task set on the network).
* Arguments: ``input_channels``; ``num_classes`` (classes of the last task; must equal
  ``task_classes[-1]``); ``unet_class`` / ``unet_kwargs`` (the plans' architecture entry, imports resolved:
  ``PlainConvUNet`` or ``ResidualEncoderUNet``); ``task_classes`` (classes per task, in the order the
  tasks were seen; None: one task of ``num_classes``); ``deep_supervision``.
* Shapes: ``(B, input_channels, *patch) -> (B, task_classes[task], *patch)`` (a list over the decoder
  scales, highest resolution first, with deep supervision).
* Parameters: the U-Net's with ``task_classes[0]`` classes plus ``(F_s + 1) * K_t`` per further task t and
  decoder stage s (F_s: the stage's output features; checked in the tests).
* State-dict names: ``unet.<the U-Net's own names>`` with ``unet.decoder.seg_layers.<s>.heads.<t>.*`` for
  the heads. :func:`unet_body_state` maps a plain U-Net's state dict (any nnU-Net checkpoint of these
  plans) onto the body (its segmentation layers, which belong to its own task, are left out).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from nnunet_plugins.architectures.contract import PlansNetwork, resolve_arch_kwargs, total_stride

__all__ = ["TaskHeads", "MedSeqFTNetwork", "unet_body_state", "head_prefix", "load_previous_model"]


class TaskHeads(nn.Module):
    """One decoder stage's segmentation layer for every task: ``forward(x) = heads[task](x)``."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.task = len(self.heads) - 1

    def forward(self, x: Tensor) -> Tensor:
        return self.heads[self.task](x)


def _new_head(like: nn.Module, num_classes: int) -> nn.Module:
    conv = getattr(like, "base", like)       # a LoRA wrapper keeps the conv as .base
    head = type(conv)(conv.in_channels, num_classes, kernel_size=1, bias=conv.bias is not None)
    return head.to(device=conv.weight.device, dtype=conv.weight.dtype)


def head_prefix(task: int) -> str:
    """fnmatch pattern of the modules of task ``task``'s head at every decoder stage."""
    return f"unet.decoder.seg_layers.*.heads.{int(task)}"


class MedSeqFTNetwork(PlansNetwork, nn.Module):
    """The plans' U-Net with one segmentation head per task (see the module docstring)."""

    spatial_dims = (2, 3)
    context_kwargs = ("input_channels", "num_classes", "deep_supervision", "task_classes")

    def __init__(self, input_channels: int, num_classes: int, unet_class: str, unet_kwargs: dict,
                 task_classes: Sequence[int] | None = None, deep_supervision: bool = True):
        super().__init__()
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        task_classes = [int(num_classes)] if task_classes is None else [int(k) for k in task_classes]
        if not task_classes or min(task_classes) < 1:
            raise ValueError(f"task_classes must list >= 1 classes per task, got {task_classes}")
        if int(num_classes) != task_classes[-1]:
            raise ValueError(f"num_classes {num_classes} is not the last task's {task_classes[-1]} "
                             f"(task_classes {task_classes})")
        self.unet = get_network_from_plans(unet_class, dict(unet_kwargs), [], input_channels, task_classes[0],
                                           allow_init=True, deep_supervision=deep_supervision)
        seg_layers = getattr(getattr(self.unet, "decoder", None), "seg_layers", None)
        if not isinstance(seg_layers, nn.ModuleList):
            raise ValueError(f"MedSeqFT needs a U-Net with decoder.seg_layers (dynamic-network-architectures' "
                             f"PlainConvUNet / ResidualEncoderUNet); the plans name {unet_class}")
        for s, layer in enumerate(list(seg_layers)):
            seg_layers[s] = TaskHeads([layer])
        self.input_channels = int(input_channels)
        for k in task_classes[1:]:
            self.add_task(k)

    # ---- tasks -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The U-Net's decoder (so that ``decoder.seg_layers`` is found as on a plain U-Net)."""
        return self.unet.decoder

    @property
    def task_heads(self) -> list:
        return list(self.unet.decoder.seg_layers)

    @property
    def num_tasks(self) -> int:
        return len(self.task_heads[0].heads)

    @property
    def task_classes(self) -> list[int]:
        return [getattr(h, "base", h).out_channels for h in self.task_heads[0].heads]

    def add_task(self, num_classes: int) -> int:
        """Append a fresh head of ``num_classes`` at every decoder stage; it becomes the active task."""
        for stage in self.task_heads:
            stage.heads.append(_new_head(stage.heads[0], int(num_classes)))
        self.set_task(self.num_tasks - 1)
        return self.num_tasks - 1

    def set_task(self, task: int) -> None:
        """Make ``task`` (0-based) the one ``forward`` predicts."""
        if not 0 <= int(task) < self.num_tasks:
            raise ValueError(f"task {task} does not exist: the network has {self.num_tasks} task(s)")
        for stage in self.task_heads:
            stage.task = int(task)

    @property
    def task(self) -> int:
        return self.task_heads[0].task

    def forward(self, x: Tensor):
        return self.unet(x)

    # ---- contract ----------------------------------------------------------------------------------
    @property
    def deep_supervision(self) -> bool:
        return self.unet.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.unet.decoder.deep_supervision = bool(enabled)

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        return {"unet_class": configuration_manager.network_arch_class_name,
                "unet_kwargs": resolve_arch_kwargs(configuration_manager)}

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        return total_stride(kwargs["unet_kwargs"]["strides"], dim)

    def compute_conv_feature_map_size(self, input_size) -> int:
        return int(self.unet.compute_conv_feature_map_size(input_size))


def unet_body_state(state: Mapping[str, Tensor]) -> dict:
    """A plain U-Net's state dict (nnU-Net checkpoint names, ``module.`` / ``_orig_mod.`` prefixes allowed)
    as :class:`MedSeqFTNetwork` body entries (``unet.`` prefix), without its segmentation layers."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if ".seg_layers." in f".{key}":
            continue
        out["unet." + key] = value
    return out


def load_previous_model(network: MedSeqFTNetwork, state: Mapping[str, Tensor], previous_tasks: int) -> None:
    """Load M_{t-1} (``state``: a MedSeqFTNetwork state dict with ``previous_tasks`` heads, or a plain U-Net's
    for M_0 when ``previous_tasks == 0``) into ``network`` (``previous_tasks + 1`` tasks). Every body entry
    and every old head must be present and of the same shape; only the new task's head keeps its
    initialisation. Errors name the tensors."""
    if previous_tasks == 0:
        state = unet_body_state(state)
    own = network.state_dict()
    new_head = f".heads.{previous_tasks}."
    missing = sorted(k for k in own if k not in state and new_head not in k)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"the previous model does not fit the plans' U-Net: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shapes {shapes[:5]} ({len(missing)}/{len(unexpected)}/"
                         f"{len(shapes)} in all)")
    own.update({k: v.to(own[k].dtype) for k, v in state.items()})
    with torch.no_grad():
        network.load_state_dict(own)
