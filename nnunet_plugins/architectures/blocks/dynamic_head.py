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

PARALLEL OUTPUTS (VerSemi, official ``vnet_odod_mix.py``): the head may end in several output layers
that all read the features of the layer before them (``parallel_outputs`` > 1). Their blocks follow the
same rule (weights of every layer, the parallel ones last, then the biases), so VerSemi's official
8 -> 8 -> 8 -> (2, 2) head has weights 64 + 64 + 16 + 16, biases 8 + 8 + 2 + 2: 180 values. The
outputs are returned concatenated along the channel axis, first output first.

:class:`TaskController` is the DoDNet-style controller that generates those vectors: global average
pool of the bottleneck (after an optional pre-pooling module) concatenated with the one-hot task, one
``1x1`` convolution to ``P`` values per sample.

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
    "TaskController",
    "TaskConditionedNetwork",
]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dynamic_head_layer_sizes(in_channels: int = 8, hidden_channels: int = 8, num_layers: int = 3,
                             out_channels: int = 2, parallel_outputs: int = 1) -> list[tuple[int, int]]:
    """``(c_in, c_out)`` of every layer of the dynamic head (official: ``[(8, 8), (8, 8), (8, 2)]``).

    With ``parallel_outputs`` = k > 1 the last layer appears k times (k parallel output layers on the
    same features; VerSemi official: ``[(8, 8), (8, 8), (8, 2), (8, 2)]``); pass the same k to
    :func:`apply_dynamic_head`.
    """
    if num_layers < 1 or parallel_outputs < 1 or min(in_channels, hidden_channels, out_channels) < 1:
        raise ValueError(f"a dynamic head needs >= 1 layer, >= 1 output and positive widths, got "
                         f"num_layers={num_layers}, parallel_outputs={parallel_outputs}, in={in_channels}, "
                         f"hidden={hidden_channels}, out={out_channels}")
    widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
    sizes = list(zip(widths[:-1], widths[1:]))
    return sizes + [sizes[-1]] * (parallel_outputs - 1)


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


def apply_dynamic_head(features: Tensor, params: Tensor, layer_sizes: Sequence[tuple[int, int]],
                       parallel_outputs: int = 1) -> Tensor:
    """Apply each sample's own dynamic head: ``features`` ``(N, c_in, *spatial)``, ``params`` ``(N, P)``
    -> ``(N, c_out_last, *spatial)``.

    Every layer is a ``1x1`` convolution with the sample's generated weight and bias, ReLU between
    layers (none after the last). Implemented as one grouped convolution per layer over the batch
    folded into the channel axis (``groups = N``), as the official code does.

    ``parallel_outputs`` = k: the last k entries of ``layer_sizes`` are parallel output layers on the
    same features (see :func:`dynamic_head_layer_sizes`); they run as one grouped convolution and
    their outputs come back concatenated along the channels, ``(N, k * c_out, *spatial)``.
    """
    spatial = features.shape[2:]
    if len(spatial) not in _CONV_FN:
        raise ValueError(f"features must be (N, C, *spatial) with 1-3 spatial dims, got {tuple(features.shape)}")
    n = features.shape[0]
    if params.shape[0] != n:
        raise ValueError(f"{params.shape[0]} parameter vectors for a batch of {n} feature maps")
    if features.shape[1] != layer_sizes[0][0]:
        raise ValueError(f"dynamic head expects {layer_sizes[0][0]} input channels, got {features.shape[1]}")
    if not 1 <= parallel_outputs <= len(layer_sizes) or \
            len({ci for ci, _ in layer_sizes[len(layer_sizes) - parallel_outputs:]}) != 1:
        raise ValueError(f"{parallel_outputs} parallel output layers need that many trailing layers reading the same "
                         f"width, got layer sizes {list(layer_sizes)}")
    conv = _CONV_FN[len(spatial)]
    ones = (1,) * len(spatial)
    x = features.reshape(1, n * features.shape[1], *spatial)
    layers = split_dynamic_params(params.to(features.dtype), layer_sizes)
    n_seq = len(layers) - parallel_outputs
    # the parallel outputs read the same input: stacking their kernels makes them one layer of a
    # wider output, so the loop below stays the single-output code path
    weight = torch.cat([w for w, _ in layers[n_seq:]], dim=1)
    bias = torch.cat([b for _, b in layers[n_seq:]], dim=1)
    layers = layers[:n_seq] + [(weight, bias)]
    for i, (weight, bias) in enumerate(layers):
        co, ci = weight.shape[1:]
        x = conv(x, weight.reshape(n * co, ci, *ones), bias.reshape(n * co), groups=n)
        if i < len(layers) - 1:
            x = F.relu(x)
    return x.reshape(n, -1, *spatial)


class TaskController(nn.Module):
    """DoDNet-style controller: ``GAP(pre(bottleneck)) ++ one-hot(task)`` -> ``1x1`` conv -> ``(B, P)``.

    Args:
        in_channels: bottleneck channels C.
        num_task_ids: length of the one-hot code (T; VerSemi: T + 1 with the synthetic task).
        num_params: P, the dynamic head's parameter count (:func:`num_dynamic_params`).
        conv_op: ``nn.Conv3d`` / ``nn.Conv2d`` / ``nn.Conv1d``; the ``1x1`` conv of the bottleneck's
            dimensionality, so an official checkpoint's ``(P, C + T, 1, 1, 1)`` kernel loads as is.
        pre: module applied to the bottleneck before pooling (VerSemi official: BatchNorm + ReLU;
            None: the bottleneck as it is, e.g. when the encoder already ends in norm + nonlinearity).

    ``forward(bottleneck (B, C, *spatial), task_id LongTensor (B,))`` -> ``(B, P)``.
    Parameters: ``(C + T) * P + P`` plus ``pre``'s.
    """

    def __init__(self, in_channels: int, num_task_ids: int, num_params: int, conv_op: type[nn.Module] = nn.Conv3d,
                 pre: nn.Module | None = None):
        super().__init__()
        if min(in_channels, num_task_ids, num_params) < 1:
            raise ValueError(f"TaskController needs positive in_channels, num_task_ids and num_params, got "
                             f"{in_channels}, {num_task_ids}, {num_params}")
        self.num_task_ids = int(num_task_ids)
        self.pre = pre if pre is not None else nn.Identity()
        self.conv = conv_op(in_channels + num_task_ids, num_params, kernel_size=1)

    def forward(self, bottleneck: Tensor, task_id: Tensor) -> Tensor:
        pooled = self.pre(bottleneck).flatten(2).mean(-1)
        onehot = F.one_hot(task_id, self.num_task_ids).to(pooled.dtype)
        cond = torch.cat([pooled, onehot], dim=1).reshape(pooled.shape[0], -1, *([1] * (bottleneck.dim() - 2)))
        return self.conv(cond).flatten(1)


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
