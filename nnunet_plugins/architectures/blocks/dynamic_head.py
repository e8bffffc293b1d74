"""Dynamic (per-sample generated) segmentation heads and task conditioning, as in DoDNet and TransDoDNet.

DoDNet (Zhang, Xie, Xia, Shen; CVPR 2021) and TransDoDNet (Xie, Zhang, Xia et al.; TPAMI 2023) end in
a DYNAMIC HEAD: a small stack of ``1x1(x1)`` convolutions whose kernels and biases are not learned
parameters but are generated for every sample by a controller (DoDNet: from the pooled image features
and the one-hot task; TransDoDNet: from the task's transformer query). A flat parameter vector per
sample is split into the layers' weights and biases and applied with ONE grouped convolution per
layer (the batch folded into the channels, ``groups = batch``), so samples never see each other's
kernels and nothing loops over samples.

Layout of a parameter vector (official ``parse_dynamic_params``; kept so official checkpoints fit):
all weights first, layer by layer, then all biases, layer by layer. Layer ``l`` maps ``c_in`` to
``c_out`` channels; its weight block is ``c_out * c_in`` values in row-major ``(c_out, c_in)`` order.
With the official 8 -> 8 -> 8 -> 2 head: weights 64 + 64 + 16, biases 8 + 8 + 2, 162 values.

Also here: :class:`TaskConditionedNetwork`, the task-id convention shared by the package's multi-task
networks: ``forward(x, task_id=None)`` with ``task_id`` a LongTensor ``(B,)`` (or an int), and
``set_inference_task(t)`` for callers that cannot pass a task (nnU-Net's sliding-window predictor);
with neither, a RuntimeError explains how to predict.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "dynamic_head_layer_sizes",
    "num_dynamic_params",
    "split_dynamic_params",
    "apply_dynamic_head",
    "TaskConditionedNetwork",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dynamic_head_layer_sizes(in_channels: int = 8, hidden_channels: int = 8, num_layers: int = 3,
                             out_channels: int = 2) -> list[tuple[int, int]]:
    """``(c_in, c_out)`` of every layer of the dynamic head (official: ``[(8, 8), (8, 8), (8, 2)]``)."""
    if num_layers < 1 or min(in_channels, hidden_channels, out_channels) < 1:
        raise ValueError(f"a dynamic head needs >= 1 layer and positive widths, got num_layers={num_layers}, "
                         f"in={in_channels}, hidden={hidden_channels}, out={out_channels}")
    widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
    return list(zip(widths[:-1], widths[1:]))


def num_dynamic_params(layer_sizes: Sequence[tuple[int, int]]) -> int:
    """Length of the per-sample parameter vector: ``sum(c_in*c_out + c_out)`` (official head: 162)."""
    return sum(ci * co + co for ci, co in layer_sizes)


def split_dynamic_params(params: Tensor, layer_sizes: Sequence[tuple[int, int]]) -> list[tuple[Tensor, Tensor]]:
    """Split ``(N, P)`` parameter vectors into per-layer ``(weight (N, c_out, c_in), bias (N, c_out))``.

    Layout: all weight blocks first (row-major ``(c_out, c_in)``), then all bias blocks.
    """
    if params.dim() != 2 or params.shape[1] != num_dynamic_params(layer_sizes):
        raise ValueError(f"dynamic parameters must be (N, {num_dynamic_params(layer_sizes)}), got "
                         f"{tuple(params.shape)}")
    n = params.shape[0]
    sizes = [ci * co for ci, co in layer_sizes] + [co for _, co in layer_sizes]
    chunks = torch.split(params, sizes, dim=1)
    k = len(layer_sizes)
    return [(chunks[i].reshape(n, co, ci), chunks[k + i]) for i, (ci, co) in enumerate(layer_sizes)]


def apply_dynamic_head(features: Tensor, params: Tensor, layer_sizes: Sequence[tuple[int, int]]) -> Tensor:
    """Apply each sample's own dynamic head: ``features`` ``(N, c_in, *spatial)``, ``params`` ``(N, P)``
    -> ``(N, c_out_last, *spatial)``.

    Every layer is a ``1x1`` convolution with the sample's generated weight and bias, ReLU between
    layers (none after the last). Implemented as one grouped convolution per layer over the batch
    folded into the channel axis (``groups = N``), as the official code does.
    """
    spatial = features.shape[2:]
    if len(spatial) not in _CONV_FN:
        raise ValueError(f"features must be (N, C, *spatial) with 1-3 spatial dims, got {tuple(features.shape)}")
    n = features.shape[0]
    if params.shape[0] != n:
        raise ValueError(f"{params.shape[0]} parameter vectors for a batch of {n} feature maps")
    if features.shape[1] != layer_sizes[0][0]:
        raise ValueError(f"dynamic head expects {layer_sizes[0][0]} input channels, got {features.shape[1]}")
    conv = _CONV_FN[len(spatial)]
    ones = (1,) * len(spatial)
    x = features.reshape(1, n * features.shape[1], *spatial)
    layers = split_dynamic_params(params.to(features.dtype), layer_sizes)
    for i, (weight, bias) in enumerate(layers):
        co, ci = weight.shape[1:]
        x = conv(x, weight.reshape(n * co, ci, *ones), bias.reshape(n * co), groups=n)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(n, -1, *spatial)


class TaskConditionedNetwork(nn.Module):
    """Base of networks that segment on demand for a task id (the multi-task convention).

    * ``forward(x, task_id=None)``: ``task_id`` is a LongTensor ``(B,)`` (one task per sample), a 0-d
      tensor or an int (same task for the whole batch);
    * ``set_inference_task(t)``: the task used when ``forward`` gets none (``None`` clears it). nnU-Net's
      predictor calls ``network(x)`` only, so the package's per-task predict command sets it per case;
    * with neither, ``forward`` raises RuntimeError, so the stock ``nnUNetv2_predict`` fails clearly
      instead of silently predicting some task.

    Subclasses set ``self.num_tasks`` and call :meth:`task_ids` in ``forward``.
    """

    num_tasks: int = 0

    def __init__(self):
        super().__init__()
        self._inference_task: int | None = None

    @property
    def inference_task(self) -> int | None:
        return self._inference_task

    def set_inference_task(self, task_id: int | None) -> None:
        if task_id is not None:
            if isinstance(task_id, Tensor):
                task_id = int(task_id.item())
            if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < self.num_tasks:
                raise ValueError(f"{type(self).__name__} has tasks 0..{self.num_tasks - 1}; got inference task "
                                 f"{task_id!r}")
        self._inference_task = task_id

    def task_ids(self, x: Tensor, task_id) -> Tensor:
        """The task of every sample of ``x`` as a LongTensor ``(B,)`` on ``x``'s device (validated)."""
        b = x.shape[0]
        name = type(self).__name__
        if task_id is None:
            if self._inference_task is None:
                raise RuntimeError(
                    f"{name} segments on demand for a task: call it as network(x, task_id) with a LongTensor "
                    f"(B,) of task ids, or set the task with network.set_inference_task(t) before predicting. "
                    f"The stock nnUNetv2_predict cannot pass a task; predict multi-task models with "
                    f"`nnunet-plugins predict-multitask`")
            return torch.full((b,), self._inference_task, dtype=torch.long, device=x.device)
        if isinstance(task_id, bool):
            raise ValueError(f"{name}: task_id must be an int or an integer tensor, got a bool")
        if isinstance(task_id, int):
            task_id = torch.full((b,), task_id, dtype=torch.long, device=x.device)
        elif isinstance(task_id, Tensor):
            if task_id.is_floating_point() or task_id.is_complex() or task_id.dtype == torch.bool:
                raise ValueError(f"{name}: task_id must be an integer tensor, got dtype {task_id.dtype}")
            if task_id.dim() == 0:
                task_id = task_id.expand(b)
            if task_id.dim() != 1 or task_id.shape[0] != b:
                raise ValueError(f"{name}: task_id must have shape ({b},) for a batch of {b}, got "
                                 f"{tuple(task_id.shape)}")
            task_id = task_id.to(device=x.device, dtype=torch.long)
        else:
            raise ValueError(f"{name}: task_id must be an int or a LongTensor (B,), got {type(task_id).__name__}")
        # one host sync per forward; cheap next to a 3-D network and turns a device-side assert (or a
        # silently wrong one-hot) into a clear error
        if bool(((task_id < 0) | (task_id >= self.num_tasks)).any()):
            raise ValueError(f"{name} has tasks 0..{self.num_tasks - 1}; got task ids {task_id.tolist()}")
        return task_id
