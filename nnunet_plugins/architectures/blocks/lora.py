"""LoRA adapters for convolutional and linear layers: add, train, merge back into plain weights.

LoRA: E. J. Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models". ICLR 2022. Used by
MedSeqFT (Ye, Wu, Luo et al., 2025; no official code) in its K&G RFT step: the previous model is
frozen, rank-r adapters on its convolutions and linear layers are trained with distillation, and
the adapters are merged into the weights to give the next model.

* :func:`add_lora` freezes EVERY parameter of the model and wraps each targeted layer ``W``:
  ``y = W(x) + (alpha / rank) * B(A(dropout(x)))``.

  - ``nn.Linear(in, out)``: ``A = Linear(in, rank)``, ``B = Linear(rank, out)``, no biases.
  - ``nn.Conv{1,2,3}d``: ``A`` is a convolution with the layer's kernel size, stride, padding,
    dilation, padding mode and groups mapping ``in -> rank * groups``; ``B`` a ``1x1`` convolution
    ``rank * groups -> out`` with the same groups (the rank is per group; 1 group for ordinary convs).
    ``B`` being pointwise makes ``B o A`` ONE convolution with the composed kernel
    ``dW[o, c, k] = sum_r B[o, r] A[r, c, k]`` (within each group), so merging is exact.

  ``A`` gets PyTorch's default (Kaiming-uniform) initialisation and ``B`` zeros, so the adapted model
  computes exactly what the base model computes until the adapters are trained.
* :func:`merge_lora` adds ``(alpha / rank) * dW`` to every wrapped layer's weight (computed in float64)
  and puts the plain layer back in place of the wrapper: no adapter remains, the module tree and the
  state-dict names are the original model's, and the parameters' ``requires_grad`` flags are those
  the model had before :func:`add_lora`.
* :func:`lora_parameters` lists the adapters' parameters (the only trainable ones after add_lora).

What is and is not adapted:

* only the layer types ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (the issue's "convolutions and linear
  layers"). Transposed convolutions (U-Net decoders' upsampling), normalisation layers and raw
  parameters stay FROZEN and unchanged; merging does not touch them.
* a subclass of a target type whose forward differs (e.g. a weight-standardised conv) cannot be
  merged exactly (its forward transforms the weight): :func:`add_lora` raises and names it; exclude it.
* linear layers owned by ``nn.MultiheadAttention`` are skipped: the attention reads their weights
  directly instead of calling them.
* ``exclude``: qualified module names or ``fnmatch`` patterns (``"decoder.seg_layers.*"``); a name
  also excludes everything below it. A layer reachable under several names is matched by its first
  name in ``named_modules()`` (dynamic-network-architectures' ``UNetDecoder`` also reaches the encoder
  as ``decoder.encoder``: ``"decoder.*"`` leaves the encoder's convs adapted).

A layer reachable under several names (dynamic-network-architectures keeps each conv as ``.conv``
and as ``.all_modules[0]``) is wrapped once and the wrapper put under every name, so the forward
pass, whichever path it takes, uses the adapter. Normalisation statistics (BatchNorm running means)
still update in train mode; nnU-Net's instance norm has none.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["LoRAConv", "LoRALinear", "add_lora", "merge_lora", "lora_parameters"]

_SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _LoRALayer(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))``; subclasses define the adapters and ``delta_weight``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha) / float(rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _finish(self) -> None:
        w = self.base.weight
        self.lora_A.to(device=w.device, dtype=w.dtype)
        self.lora_B.to(device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)   # adapted model == base model at the start

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with ``scaling * delta_weight`` added to its weight (float64 arithmetic)."""
        w = self.base.weight
        w.copy_((w.double() + self.scaling * self.delta_weight().double()).to(w.dtype))
        return self.base


class LoRALinear(_LoRALayer):
    """LoRA on ``nn.Linear``: ``A`` in -> rank, ``B`` rank -> out (zero-initialised), no biases."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        self._finish()

    def delta_weight(self) -> Tensor:
        return self.lora_B.weight.double() @ self.lora_A.weight.double()


class LoRAConv(_LoRALayer):
    """LoRA on ``nn.Conv{1,2,3}d``: ``A`` with the layer's kernel/stride/padding/dilation/groups
    (in -> rank * groups), ``B`` a ``1x1`` conv (rank * groups -> out, same groups, zero-initialised)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        conv, g = _target_class(base, _SUPPORTED[:3]), base.groups
        self.lora_A = conv(base.in_channels, rank * g, base.kernel_size, stride=base.stride, padding=base.padding,
                           dilation=base.dilation, groups=g, bias=False, padding_mode=base.padding_mode)
        self.lora_B = conv(rank * g, base.out_channels, 1, groups=g, bias=False)
        self._finish()

    def delta_weight(self) -> Tensor:
        a = self.lora_A.weight.double()                     # (rank*g, in/g, *k)
        b = self.lora_B.weight.double()                     # (out, rank, 1...)
        g = self.base.groups
        out = b.shape[0]
        delta = torch.einsum("gor,grk->gok", b.reshape(g, out // g, self.rank),
                             a.reshape(g, self.rank, -1))
        return delta.reshape(out, *a.shape[1:])


def _target_class(module: nn.Module, targets: tuple) -> type | None:
    for t in targets:
        if isinstance(module, t):
            return t
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace_everywhere(model: nn.Module, mapping: dict[int, nn.Module]) -> None:
    """Put ``mapping[id(old)]`` wherever ``old`` is a child of some module of ``model`` (all aliases)."""
    for parent in list(model.modules()):        # listed first: the new modules are not visited
        for key, child in parent._modules.items():
            if child is not None and id(child) in mapping:
                parent._modules[key] = mapping[id(child)]


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
             targets: Sequence[type] = (nn.Conv3d, nn.Conv2d, nn.Linear), exclude: Iterable[str] = ()) -> nn.Module:
    """Freeze ``model`` and wrap its targeted layers with LoRA adapters (in place; returns ``model``).

    Args:
        model: any module (not itself a targeted layer: wrap it in a container).
        rank: r >= 1 (per group for grouped convolutions).
        alpha: scaling numerator, the update is ``alpha / rank * B A``; None: ``alpha = rank`` (scale 1).
        dropout: dropout on the adapter path's input (train mode only; merging equals the eval-mode
            adapted model).
        targets: layer types to adapt, a subset of ``nn.Conv1d/2d/3d, nn.Linear``.
        exclude: qualified names or fnmatch patterns of modules to leave alone.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = tuple(targets)
    bad = [t for t in targets if t not in _SUPPORTED]
    if not targets or bad:
        raise ValueError(f"LoRA targets must be among nn.Conv1d/2d/3d and nn.Linear, got {[t.__name__ for t in bad]}"
                         if bad else "LoRA targets must not be empty")
    if any(isinstance(m, _LoRALayer) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; merge_lora it first")
    exclude = tuple(exclude)
    inside_attention = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention) for c in m.modules()}
    wrappers: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        t = _target_class(module, targets)
        if t is None or id(module) in inside_attention or _matches(name, exclude):
            continue
        if name == "":
            raise ValueError(f"add_lora got a bare {type(module).__name__}; put it in a container (nn.Sequential)")
        if type(module).forward is not t.forward or getattr(type(module), "_conv_forward", None) is not \
                getattr(t, "_conv_forward", None):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) changes {t.__name__}'s forward, so a merged "
                             f"LoRA update would not be exact; pass exclude=[{name!r}] or a pattern covering it")
        cls = LoRALinear if t is nn.Linear else LoRAConv
        wrappers[id(module)] = cls(module, rank, alpha, dropout)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no layer to adapt (targets "
                         f"{[t.__name__ for t in targets]}, exclude {list(exclude)})")
    # requires_grad flags by the ORIGINAL names, which merge_lora restores
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    _replace_everywhere(model, wrappers)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``lora_A`` and ``lora_B`` weights of every wrapped layer), each once."""
    return [p for m in model.modules() if isinstance(m, _LoRALayer)
            for p in (m.lora_A.weight, m.lora_B.weight)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and remove the adapters (in place; returns ``model``).

    Afterwards the module tree and state-dict names equal those before :func:`add_lora`, the outputs
    equal the (eval-mode) adapted model's up to float rounding, and ``requires_grad`` flags are restored.
    """
    layers = {id(m): m for m in model.modules() if isinstance(m, _LoRALayer)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    _replace_everywhere(model, {key: layer.merged_base() for key, layer in layers.items()})
    flags = model.__dict__.pop("_lora_requires_grad", None)
    if flags is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, True))
    return model
