"""Masked-volume reconstruction: the self-supervised objective that pre-trains MedSeqFT's M_0 and scores
samples for MDS selection.

MedSeqFT (Ye, Wu, Luo et al., 2025; no official code) pre-trains its 3-D model with a masked-volume
objective and ranks the samples of each new dataset by that objective's loss under M_0 (MDS). The paper
does not give the objective's details; this module implements the SimMIM-style form (Xie et al., CVPR
2022; Chen et al., "Masked image modeling advances 3D medical image analysis", WACV 2023): random cubes of
the input are masked, the network reconstructs the input from what remains, and the loss is taken on
the masked voxels only.

* Masking (:func:`random_cube_mask`): the patch is divided into a regular grid of cubes of ``cube_size``
  voxels per axis (or a fraction of the patch), starting at the patch origin; for every sample exactly
  ``round(mask_ratio * number of cells)`` cells, drawn uniformly without replacement, are masked, on all
  channels. A grid (rather than cubes thrown at random places) makes the masked fraction exact and the
  cubes disjoint, so every mask masks the same amount, which MDS's comparison of losses between cases
  relies on. When ``cube_size`` does not divide the patch the last cell of an axis is cut at the border
  (the ratio is exact in cells, approximate in voxels). Vectorised: one ``rand``/``argsort`` over the
  cells, then ``repeat_interleave`` per axis.
* Fill (:func:`apply_mask`): masked voxels become ``0`` (default) or standard-normal noise. nnU-Net's
  preprocessing z-scores intensities (CT: after clipping, with the foreground's statistics), so 0 is a
  mean intensity, a value that carries no information about the hidden content; noise (``"noise"``) has
  roughly the normalised intensities' first two moments, so the network cannot find the masked cubes by
  a constant value alone (Models Genesis in-paints cubes filled with random values), at the price of a
  noisier input.
* Head (:class:`ReconstructionHead`): a ``1x1`` convolution (with bias, no activation: normalised
  intensities are unbounded) from the U-Net decoder's LAST FEATURES to the input channels. We take the
  decoder features and not the network's output channels because the output channels are the
  segmentation classes of one task: MedSeqFT grows one segmentation head per task, and the
  reconstruction objective must stay the same across stages (MDS of stage t scores with M_0 and its
  head); the features are also richer than ``num_classes`` logits. The U-Net is not edited:
  :class:`ReconstructionNetwork` reads the features as the input of ``decoder.seg_layers[-1]`` with a
  forward pre-hook that exists only during its forward (see :mod:`.feature_capture`).
* Loss (:func:`masked_reconstruction_loss`): MSE (default, as MAE, He et al. CVPR 2022) or L1 (as
  SimMIM) between reconstruction and the ORIGINAL input on the masked voxels only (unmasked voxels do
  not enter, whatever their values: ``torch.where``, not a product, so even non-finite predictions there
  are ignored), averaged over masked voxels and channels.

Defaults of :class:`MaskedReconstruction`: ratio 0.6 (SimMIM's default), cubes of 16 voxels, zero fill,
MSE. Chen et al. report that for 3-D medical images a HIGH masking ratio with RELATIVELY SMALL patches and
a lightweight reconstruction head work best, which is this combination (16 voxels is 1/8 of a typical
3d_fullres patch edge of 128; the head is one 1x1 conv).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from nnunet_plugins.training.feature_capture import capture_inputs, final_decoder_features_module

__all__ = ["cube_size_voxels", "random_cube_mask", "apply_mask", "masked_error_sums", "masked_reconstruction_loss",
           "ReconstructionHead", "ReconstructionNetwork", "MaskedReconstruction"]

CubeSize = Union[int, float, Sequence[Union[int, float]]]
FILLS = ("zero", "noise")
LOSSES = ("mse", "l1")


def cube_size_voxels(cube_size: CubeSize, patch_size: Sequence[int]) -> Tuple[int, ...]:
    """The cube edge in voxels per axis. ``cube_size``: an int (voxels, every axis), a float in (0, 1]
    (fraction of each axis of the patch, rounded, at least 1 voxel), or one such value per axis."""
    patch_size = tuple(int(p) for p in patch_size)
    values = list(cube_size) if isinstance(cube_size, (list, tuple)) else [cube_size] * len(patch_size)
    if len(values) != len(patch_size):
        raise ValueError(f"cube_size {cube_size!r} has {len(values)} entries, the patch {patch_size} "
                         f"{len(patch_size)} axes")
    out = []
    for v, p in zip(values, patch_size):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"cube_size entries must be ints (voxels) or floats in (0, 1] (fractions), got {v!r}")
        if isinstance(v, float):
            if not 0 < v <= 1:
                raise ValueError(f"a fractional cube_size must be in (0, 1], got {v}")
            v = max(1, int(round(v * p)))
        if v < 1:
            raise ValueError(f"cube_size must be >= 1 voxel, got {v}")
        out.append(min(int(v), p))
    return tuple(out)


def random_cube_mask(shape: Sequence[int], mask_ratio: float, cube_size: CubeSize,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Boolean mask ``(B, 1, *spatial)`` (True = masked) for a batch of ``shape = (B, C, *spatial)``
    (or ``(B, *spatial)`` with ``len(spatial)`` given by the cube size sequence; pass the input's shape).

    Every sample gets its own ``round(mask_ratio * cells)`` grid cells (see the module docstring); the
    draw uses ``generator`` (on its own device) so a seeded generator reproduces the masks.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError(f"shape must be (B, C, *spatial) with 1-3 spatial axes, got {shape}")
    batch, spatial = shape[0], shape[2:]
    if not 0 < float(mask_ratio) < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    cube = cube_size_voxels(cube_size, spatial)
    grid = tuple(math.ceil(p / c) for p, c in zip(spatial, cube))
    n_cells = math.prod(grid)
    n_masked = int(round(float(mask_ratio) * n_cells))
    if not 1 <= n_masked <= n_cells - 1:
        raise ValueError(f"mask_ratio {mask_ratio} of {n_cells} cube(s) of {cube} voxels in a {spatial} patch masks "
                         f"{n_masked}: choose smaller cubes or another ratio")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(batch, n_cells, generator=generator, device=gen_device)
    chosen = keys.argsort(dim=1)[:, :n_masked]            # uniform subset without replacement per sample
    cells = torch.zeros(batch, n_cells, dtype=torch.bool, device=gen_device).scatter_(1, chosen, True)
    mask = cells.to(device if device is not None else gen_device).view(batch, 1, *grid)
    for axis, (c, p) in enumerate(zip(cube, spatial)):
        mask = mask.repeat_interleave(c, dim=2 + axis).narrow(2 + axis, 0, p)
    return mask


def apply_mask(x: Tensor, mask: Tensor, fill: str = "zero", generator: torch.Generator | None = None) -> Tensor:
    """``x`` with the masked voxels (``mask`` True, broadcast over channels) replaced by 0 (``"zero"``) or
    by standard-normal noise drawn with ``generator`` (``"noise"``). ``x`` itself is not modified."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if fill == "zero":
        return x.masked_fill(mask, 0)
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    return torch.where(mask, noise, x)


def masked_error_sums(prediction: Tensor, target: Tensor, mask: Tensor, loss: str = "mse") -> Tuple[Tensor, Tensor]:
    """Per sample: the sum of the squared (``"mse"``) or absolute (``"l1"``) errors over the masked
    voxels and all channels, and the number of summed elements. Both ``(B,)``.

    ``mask`` is boolean, ``(B, 1, *spatial)`` or ``(B, C, *spatial)``; unmasked errors are replaced by 0
    with ``torch.where`` so that nothing there (not even inf / nan) reaches the sums or the gradient."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    mask = mask.expand_as(prediction)
    diff = torch.where(mask, prediction - target.detach(), torch.zeros((), dtype=prediction.dtype,
                                                                        device=prediction.device))
    err = diff.square() if loss == "mse" else diff.abs()
    dims = tuple(range(1, err.dim()))
    return err.sum(dims), mask.sum(dims).to(err.dtype)


def masked_reconstruction_loss(prediction: Tensor, target: Tensor, mask: Tensor, loss: str = "mse",
                               reduction: str = "mean") -> Tensor:
    """MSE / L1 of ``prediction`` against ``target`` on the masked voxels only.

    ``reduction="mean"``: the mean over all masked elements of the batch (a scalar); ``"none"``: the mean
    per sample, ``(B,)``. A sample (or batch) without masked voxels is an error, not a silent 0 or nan."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    sums, counts = masked_error_sums(prediction, target, mask, loss)
    if reduction == "mean":
        if counts.sum() == 0:
            raise ValueError("masked_reconstruction_loss: no masked voxel in the batch")
        return sums.sum() / counts.sum()
    if bool((counts == 0).any()):
        raise ValueError(f"masked_reconstruction_loss: sample(s) {torch.nonzero(counts == 0).flatten().tolist()} "
                         f"have no masked voxel")
    return sums / counts


class ReconstructionHead(nn.Module):
    """``1x1`` convolution (bias, no activation) from ``in_features`` decoder features to
    ``out_channels`` (the image channels). ``conv_op``: ``nn.Conv3d`` / ``nn.Conv2d``.

    Shapes: ``(B, in_features, *spatial) -> (B, out_channels, *spatial)``.
    Parameters: ``(in_features + 1) * out_channels``."""

    def __init__(self, in_features: int, out_channels: int, conv_op: type[nn.Module] = nn.Conv3d):
        super().__init__()
        if conv_op not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            raise ValueError(f"ReconstructionHead: conv_op must be nn.Conv1d/2d/3d, got {conv_op}")
        if min(in_features, out_channels) < 1:
            raise ValueError(f"ReconstructionHead: in_features and out_channels must be >= 1, got "
                             f"{in_features}, {out_channels}")
        self.conv = conv_op(in_features, out_channels, kernel_size=1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)


class ReconstructionNetwork(nn.Module):
    """A segmentation U-Net plus a :class:`ReconstructionHead` on its final decoder features.

    ``forward(x)`` runs ``network(x)`` unchanged (encoder + decoder; its segmentation output is computed
    and discarded unless ``return_segmentation``) and returns ``head(features)``, ``(B, C_in, *spatial)``.
    The features are the input of ``feature_module`` (default ``network.decoder.seg_layers[-1]``, looked
    up at every call so that it follows :func:`add_lora`'s wrapping), captured by a hook that exists only
    during the call. Gradients reach the encoder, the decoder and the head; the segmentation layers get
    none from the reconstruction loss.

    Args:
        network: e.g. dynamic-network-architectures' ``PlainConvUNet`` (2-D or 3-D, with or without
            deep supervision), not modified.
        head: an existing head (e.g. loaded with M_0); None builds one from the feature module.
        input_channels: the image channels the head reconstructs; None: ``network.input_channels`` if
            present, else the ``in_channels`` of the network's first convolution.
        feature_module: the module whose input holds the final features (for networks without
            ``decoder.seg_layers``).
    State-dict names: ``network.*`` (the U-Net's own names) and ``head.*``.
    """

    def __init__(self, network: nn.Module, head: ReconstructionHead | None = None, input_channels: int | None = None,
                 feature_module: nn.Module | None = None):
        super().__init__()
        self.network = network
        # a plain attribute, not a submodule: it lives inside ``network`` and must not be saved twice
        object.__setattr__(self, "_feature_module", feature_module)
        if head is None:
            fm = self.feature_module
            if not isinstance(fm, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not hasattr(fm, "base"):
                raise ValueError(f"cannot infer the feature channels from {type(fm).__name__}; pass a head")
            conv = getattr(fm, "base", fm)   # a LoRA wrapper keeps the layer as .base
            head = ReconstructionHead(conv.in_channels, self._input_channels(input_channels), type(conv))
        self.head = head

    @property
    def feature_module(self) -> nn.Module:
        if self._feature_module is not None:
            return self._feature_module
        return final_decoder_features_module(self.network)

    def _input_channels(self, given: int | None) -> int:
        if given is not None:
            return int(given)
        if getattr(self.network, "input_channels", None) is not None:
            return int(self.network.input_channels)
        for m in self.network.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return m.in_channels
        raise ValueError(f"{type(self.network).__name__} has no convolution; pass input_channels")

    def features(self, x: Tensor) -> Tuple[Tensor, object]:
        """``(final decoder features, the network's own output)`` for ``x``."""
        with capture_inputs(self.feature_module) as captured:
            out = self.network(x)
        if captured[0] is None:
            raise RuntimeError(f"{type(self.feature_module).__name__} was not called by {type(self.network).__name__}"
                               f".forward; pass the module that receives the final decoder features")
        return captured[0], out

    def forward(self, x: Tensor, return_segmentation: bool = False):
        feats, seg = self.features(x)
        rec = self.head(feats)
        return (rec, seg) if return_segmentation else rec


@dataclass
class MaskedReconstruction:
    """The objective: mask, reconstruct, score. One object serves pre-training (``objective(model, x)``)
    and MDS (:mod:`.mds` draws one mask per patch with ``mask_input`` and scores the masked voxels).

    Attributes: ``mask_ratio`` (fraction of the grid cells masked), ``cube_size`` (voxels or fraction,
    see :func:`cube_size_voxels`), ``fill`` (``"zero"`` | ``"noise"``), ``loss`` (``"mse"`` | ``"l1"``).
    """
    mask_ratio: float = 0.6
    cube_size: CubeSize = 16
    fill: str = "zero"
    loss: str = "mse"

    def __post_init__(self):
        if not 0 < float(self.mask_ratio) < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def mask_input(self, x: Tensor, generator: torch.Generator | None = None) -> Tuple[Tensor, Tensor]:
        """``(masked input, mask (B, 1, *spatial))``; masks first, then (``"noise"``) the fill, both from
        ``generator``."""
        mask = random_cube_mask(x.shape, self.mask_ratio, self.cube_size, generator, device=x.device)
        return apply_mask(x, mask, self.fill, generator), mask

    def __call__(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None,
                 reduction: str = "mean") -> Tensor:
        """The reconstruction loss of ``model`` on a fresh random mask of ``x`` (see
        :func:`masked_reconstruction_loss`)."""
        masked, mask = self.mask_input(x, generator)
        return masked_reconstruction_loss(model(masked), x, mask, self.loss, reduction)
