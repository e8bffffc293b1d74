"""Knowledge-distillation terms for MedSeqFT's K&G RFT step: logits MSE, KL at a temperature, features MSE.

MedSeqFT (Ye, Wu, Luo et al., 2025; no official code) trains LoRA adapters on the frozen previous model
with ``L_seg + lambda KD(student, T_t) + mu KD(student, M_{t-1})``; the paper does not publish the KD
form, so the three usual ones are offered (the string option of :func:`build_distillation_loss`):

* ``"logits_mse"`` (Ba & Caruana 2014): mean over voxels and classes of ``(z_s - z_t)^2``.
* ``"kl"`` (Hinton et al. 2015): per voxel ``KL(softmax(z_t / T) || softmax(z_s / T))`` summed over the
  classes, averaged over voxels, times ``T^2`` (keeps the gradient scale independent of ``T``). Averaged
  per VOXEL (segmentation is per-voxel classification), where PyTorch's ``kl_div(batchmean)`` would
  divide the sum over all voxels by the batch size only.
* ``"features_mse"`` (FitNets, Romero et al. 2015, without a regressor: student and teacher share the
  architecture): mean squared difference of a list of feature maps (e.g. the decoder's last features,
  :mod:`.feature_capture`), shapes equal pairwise.

Every term:

* takes a tensor or a LIST of tensors (nnU-Net's deep-supervision outputs, highest resolution first, or
  several feature maps) and returns ``sum_i w_i term_i``; ``weights=None`` means equal weights summing to
  1 (pass nnU-Net's deep-supervision weights to weigh logits like the segmentation loss does);
* takes an optional boolean ``mask`` (``(B, *spatial)`` or ``(B, 1, *spatial)`` at the highest
  resolution, or one per list entry): the mean is then over the masked voxels (and channels) only; a
  mask at another resolution than an entry is resized with nearest-neighbour interpolation (for nnU-Net's
  stride-2 pyramids: every other voxel); an empty mask gives 0 (with a graph, so ``backward`` works);
* detaches the teacher: gradients reach the student only.
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["logits_mse", "kl_divergence", "features_mse", "LogitsMSE", "KLDistillation", "FeaturesMSE",
           "build_distillation_loss", "KD_TYPES"]

Maps = Union[Tensor, Sequence[Tensor]]
Mask = Union[None, Tensor, Sequence[Tensor]]
KD_TYPES = ("logits_mse", "kl", "features_mse")


def _as_list(x: Maps, name: str) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        return list(x)
    raise ValueError(f"{name} must be a tensor or a non-empty list of tensors, got {type(x).__name__}")


def _pairs(student: Maps, teacher: Maps, weights: Sequence[float] | None, mask: Mask):
    s, t = _as_list(student, "student"), _as_list(teacher, "teacher")
    if len(s) != len(t):
        raise ValueError(f"student has {len(s)} outputs, teacher {len(t)}")
    for i, (a, b) in enumerate(zip(s, t)):
        if a.shape != b.shape:
            raise ValueError(f"output {i}: student {tuple(a.shape)} and teacher {tuple(b.shape)} differ in shape")
    if weights is None:
        weights = [1.0 / len(s)] * len(s)
    elif len(weights) != len(s):
        raise ValueError(f"{len(weights)} weights for {len(s)} outputs")
    if mask is None or isinstance(mask, Tensor):
        masks = [mask] * len(s)
    else:
        masks = list(mask)
        if len(masks) != len(s):
            raise ValueError(f"{len(masks)} masks for {len(s)} outputs")
    return zip(s, t, weights, masks)


def _fit_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """``mask`` as a boolean ``(B, 1, *spatial)`` at ``like``'s spatial size (nearest neighbour)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    spatial = like.shape[2:]
    if mask.dim() == like.dim() - 1:
        mask = mask.unsqueeze(1)
    if mask.dim() != like.dim() or mask.shape[1] != 1 or mask.shape[0] != like.shape[0]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit outputs {tuple(like.shape)}: give (B, *spatial) "
                         f"or (B, 1, *spatial)")
    if mask.shape[2:] != spatial:
        mask = F.interpolate(mask.to(torch.uint8), size=tuple(spatial), mode="nearest").bool()
    return mask


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(B, C, *spatial)`` over everything, or over the masked voxels and all C."""
    if mask is None:
        return values.mean()
    mask = mask.expand_as(values)
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / mask.sum().clamp_min(1)


def logits_mse(student: Maps, teacher: Maps, weights: Sequence[float] | None = None, mask: Mask = None) -> Tensor:
    """``sum_i w_i mean((z_s,i - z_t,i)^2)`` (masked mean when ``mask``); teacher detached."""
    return sum(w * _masked_mean((s - t.detach()).square(), _fit_mask(m, s))
               for s, t, w, m in _pairs(student, teacher, weights, mask))


def kl_divergence(student: Maps, teacher: Maps, temperature: float = 2.0, weights: Sequence[float] | None = None,
                  mask: Mask = None) -> Tensor:
    """``sum_i w_i T^2 mean_voxels sum_c p_t (log p_t - log p_s)``, ``p = softmax(z / T)`` over dim 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    total = 0
    for s, t, w, m in _pairs(student, teacher, weights, mask):
        log_ps = F.log_softmax(s / temperature, dim=1)
        log_pt = F.log_softmax(t.detach() / temperature, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1, keepdim=True)
        total = total + w * temperature ** 2 * _masked_mean(kl, _fit_mask(m, s))
    return total


def features_mse(student: Maps, teacher: Maps, weights: Sequence[float] | None = None, mask: Mask = None) -> Tensor:
    """``sum_i w_i mean((f_s,i - f_t,i)^2)`` over a list of feature maps; teacher detached."""
    return logits_mse(student, teacher, weights, mask)


class _KD(nn.Module):
    kind = ""

    def __init__(self, weights: Sequence[float] | None = None):
        super().__init__()
        self.weights = None if weights is None else [float(w) for w in weights]

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


class LogitsMSE(_KD):
    """:func:`logits_mse` as a module; ``forward(student, teacher, mask=None)``."""
    kind = "logits_mse"

    def forward(self, student: Maps, teacher: Maps, mask: Mask = None) -> Tensor:
        return logits_mse(student, teacher, self.weights, mask)


class KLDistillation(_KD):
    """:func:`kl_divergence` at ``temperature`` as a module; ``forward(student, teacher, mask=None)``."""
    kind = "kl"

    def __init__(self, temperature: float = 2.0, weights: Sequence[float] | None = None):
        super().__init__(weights)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, student: Maps, teacher: Maps, mask: Mask = None) -> Tensor:
        return kl_divergence(student, teacher, self.temperature, self.weights, mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weights={self.weights}"


class FeaturesMSE(LogitsMSE):
    """:func:`features_mse` as a module (the same mean squared difference as :class:`LogitsMSE`, applied
    to feature maps); ``forward(student_features, teacher_features, mask=None)``."""
    kind = "features_mse"


def build_distillation_loss(kind: str, temperature: float = 2.0, weights: Sequence[float] | None = None) -> _KD:
    """The KD term named by the option: ``"logits_mse"`` | ``"kl"`` (at ``temperature``) | ``"features_mse"``.
    ``logits_mse`` / ``kl`` take logits (or nnU-Net's deep-supervision lists); ``features_mse`` takes
    feature maps."""
    if kind == "logits_mse":
        return LogitsMSE(weights)
    if kind == "kl":
        return KLDistillation(temperature, weights)
    if kind == "features_mse":
        return FeaturesMSE(weights)
    raise ValueError(f"unknown KD type {kind!r}; choose one of {', '.join(KD_TYPES)}")
