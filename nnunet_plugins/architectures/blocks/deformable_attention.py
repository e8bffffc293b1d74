"""3-D multi-scale deformable attention and a deformable transformer encoder, in pure PyTorch.

Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) lets every query attend
to a few (``n_points``) sampled locations per head and feature level instead of to all tokens. Its 3-D
form is the core of CoTr (Xie et al., MICCAI 2021, "DeTrans") and of TransDoDNet (Xie et al., TPAMI
2023). Both official code bases ship a pure-PyTorch 3-D sampler built on ``F.grid_sample``; this
module is our own implementation of the same computation, written from the method's definition.

Conventions used throughout this module
---------------------------------------
* Feature levels are flattened level by level, each in row-major ``(d, h, w)`` order, and
  concatenated: tokens ``(N, sum_l D_l*H_l*W_l, C)``. ``spatial_shapes`` is a sequence of
  ``(D_l, H_l, W_l)`` integer triples (a ``(L, 3)`` tensor is accepted too).
* Locations are normalised to ``[0, 1]`` per axis with voxel centres at ``(i + 0.5) / size``: the
  convention of the Deformable-DETR family (reference points on voxel centres, grid ``2*loc - 1``
  sampled with ``align_corners=False``, zero padding outside the volume).
* By default, locations are ordered ``(d, h, w)``. ``F.grid_sample`` reads the last grid dimension as
  ``(x, y, z) = (w, h, d)``, so we flip it before sampling.

The official-axis-order bug (``official_axis_order``)
-----------------------------------------------------
The official CoTr code (and TransDoDNet's, which shares it) stacks reference points and offset
normalisers as ``(d, w, h)`` and hands that to ``grid_sample`` unchanged, which reads it as
``(w, h, d)``: the depth coordinate indexes the width axis and so on. With zero offsets no query
samples its own voxel (unless its three normalised coordinates coincide). The default here is the
geometrically correct order; ``official_axis_order=True`` reproduces the official behaviour
exactly, e.g. to run checkpoints trained with the official code.

Main API
--------
``ms_deform_attn_3d``          vectorised sampling + weighting: on CPU one weighted ``embedding_bag``
                               over all levels, heads, points and trilinear corners; elsewhere one
                               ``grid_sample`` per level, heads folded into the batch (no Python loop
                               over heads, points or queries either way)
``ms_deform_attn_reference``   slow, independent reference (explicit loops, hand-written trilinear
                               interpolation); used by the tests and the benchmark
``MSDeformAttn3D``             the attention module (offset / weight / value / output projections)
``reference_points_3d``, ``sine_position_encoding_3d``, ``flatten_levels``, ``unflatten_levels``
``DeformableEncoderLayer3D``, ``DeformableTransformerEncoder3D``  post-norm encoder (CoTr's DeTrans)
``DeformableDecoderLayer3D``   post-norm decoder layer: query self-attention + deformable
                               cross-attention to the multi-level memory + FFN (TransDoDNet)
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ms_deform_attn_3d",
    "ms_deform_attn_reference",
    "MSDeformAttn3D",
    "official_transdodnet_offset_normalizer",
    "reference_points_3d",
    "position_encoding_split",
    "sine_position_encoding_3d",
    "flatten_levels",
    "unflatten_levels",
    "level_start_indices",
    "DeformableEncoderLayer3D",
    "DeformableTransformerEncoder3D",
    "DeformableDecoderLayer3D",
]

Shape3 = tuple[int, int, int]


# ----------------------------------------------------------------------------------------------
# helpers on level shapes
# ----------------------------------------------------------------------------------------------
def _shape_list(spatial_shapes) -> list[Shape3]:
    """Normalise ``spatial_shapes`` (sequence of triples or an (L, 3) tensor) to a list of int triples."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = []
    for s in spatial_shapes:
        s = tuple(int(v) for v in s)
        if len(s) != 3 or min(s) < 1:
            raise ValueError(f"each spatial shape must be three positive ints (D, H, W), got {s}")
        shapes.append(s)
    if not shapes:
        raise ValueError("spatial_shapes is empty: at least one feature level is needed")
    return shapes


def level_start_indices(spatial_shapes) -> list[int]:
    """Token index at which each level starts in the flattened sequence."""
    starts, total = [], 0
    for d, h, w in _shape_list(spatial_shapes):
        starts.append(total)
        total += d * h * w
    return starts


def flatten_levels(features: Sequence[Tensor]) -> tuple[Tensor, list[Shape3]]:
    """``[(N, C, D_l, H_l, W_l)]`` -> tokens ``(N, sum_l D_l H_l W_l, C)`` and the level shapes."""
    shapes = [tuple(int(v) for v in f.shape[2:]) for f in features]
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    return tokens, shapes


def unflatten_levels(tokens: Tensor, spatial_shapes) -> list[Tensor]:
    """Inverse of :func:`flatten_levels`: tokens ``(N, S, C)`` -> ``[(N, C, D_l, H_l, W_l)]``."""
    shapes = _shape_list(spatial_shapes)
    sizes = [d * h * w for d, h, w in shapes]
    if tokens.shape[1] != sum(sizes):
        raise ValueError(f"{tokens.shape[1]} tokens do not match the level shapes {shapes} "
                         f"({sum(sizes)} tokens)")
    n, _, c = tokens.shape
    return [t.transpose(1, 2).reshape(n, c, *s) for t, s in zip(tokens.split(sizes, dim=1), shapes)]


def reference_points_3d(spatial_shapes, *, official_axis_order: bool = False,
                        device=None, dtype=torch.float32) -> Tensor:
    """Normalised voxel centres of all levels, ``(sum_l D_l H_l W_l, 3)``, in flattened token order.

    Coordinates are ``(i + 0.5) / size`` per axis, ordered ``(d, h, w)``; with
    ``official_axis_order`` they are stacked ``(d, w, h)`` as in the official CoTr/TransDoDNet code.
    """
    out = []
    for d, h, w in _shape_list(spatial_shapes):
        cd = (torch.arange(d, device=device, dtype=dtype) + 0.5) / d
        ch = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        cw = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        gd, gh, gw = torch.meshgrid(cd, ch, cw, indexing="ij")
        axes = (gd, gw, gh) if official_axis_order else (gd, gh, gw)
        out.append(torch.stack([a.reshape(-1) for a in axes], dim=-1))
    return torch.cat(out, dim=0)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def _check_attn_inputs(value, shapes, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, n_heads, head_dim), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if sum(d * h * w for d, h, w in shapes) != s:
        raise ValueError(f"value has {s} tokens but the level shapes {shapes} give "
                         f"{sum(d * h * w for d, h, w in shapes)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 3:
        raise ValueError("sampling_locations must be (N, Lq, n_heads, n_levels, n_points, 3), got "
                         f"{tuple(sampling_locations.shape)}")
    nq, lq, mh, nl, p, _ = sampling_locations.shape
    if nq != n or mh != m or nl != len(shapes):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} do not match value "
                         f"{tuple(value.shape)} and {len(shapes)} levels")
    if tuple(attention_weights.shape) != (n, lq, m, nl, p):
        raise ValueError(f"attention_weights must be {(n, lq, m, nl, p)}, got {tuple(attention_weights.shape)}")


#: implementations of :func:`ms_deform_attn_3d` ("auto": gather on CPU, grid_sample elsewhere)
IMPLEMENTATIONS = ("auto", "gather", "grid_sample")

def ms_deform_attn_3d(value: Tensor, spatial_shapes, sampling_locations: Tensor,
                      attention_weights: Tensor, *, official_axis_order: bool = False,
                      implementation: str = "auto") -> Tensor:
    """Vectorised 3-D multi-scale deformable attention sampling.

    Args:
        value: ``(N, S, M, Dh)`` per-head values of all levels, flattened (see module docstring).
        spatial_shapes: ``L`` triples ``(D_l, H_l, W_l)``.
        sampling_locations: ``(N, Lq, M, L, P, 3)`` normalised locations in ``[0, 1]`` (voxel-centre
            convention), ordered ``(d, h, w)``; outside the volume samples are zero.
        attention_weights: ``(N, Lq, M, L, P)`` (already normalised by the caller).
        official_axis_order: hand the last dimension of the locations to ``grid_sample`` unchanged
            (the official code's behaviour, meant for locations stacked ``(d, w, h)`` as it does);
            ``grid_sample`` then reads it as ``(w, h, d)``.
        implementation: ``"gather"`` (:func:`_ms_deform_attn_gather`: one weighted ``embedding_bag``
            over all levels, heads, points and the 8 trilinear corners), ``"grid_sample"``
            (:func:`_ms_deform_attn_grid_sample`: one ``grid_sample`` per level, as the official code)
            or ``"auto"`` (default): gather on CPU, where it is 1.5-2x faster forward + backward than
            ``grid_sample`` (whose 3-D CPU backward is not vectorised; ``benchmarks/bench_cotr_attention.py``),
            grid_sample on other devices (the official path; time both there with the same benchmark).
            Both compute the same values and gradients (tests, to rounding).

    Returns:
        ``(N, Lq, M * Dh)``, in the wider of the value and location dtypes (float32 under AMP).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    shapes = _shape_list(spatial_shapes)
    _check_attn_inputs(value, shapes, sampling_locations, attention_weights)
    if implementation == "auto":
        implementation = "gather" if value.device.type == "cpu" else "grid_sample"
    fn = _ms_deform_attn_gather if implementation == "gather" else _ms_deform_attn_grid_sample
    return fn(value, shapes, sampling_locations, attention_weights, official_axis_order)


def _ms_deform_attn_gather(value: Tensor, shapes: list[Shape3], sampling_locations: Tensor,
                           attention_weights: Tensor, official_axis_order: bool) -> Tensor:
    """Trilinear sampling + weighting as ONE ``F.embedding_bag`` (weighted sum of gathered rows).

    Every (query, head) is a bag of ``L * P * 8`` rows of the values: the 8 corners of each sampling
    point, with per-row weight = attention weight x trilinear weight. ``embedding_bag`` sums them
    without materialising the gathered ``(..., 8, Dh)`` stack, and its backward gives the gradients of
    the values and of the per-row weights (hence of the locations and attention weights).

    Zero padding as ``grid_sample(padding_mode="zeros")``: every level is padded by one zero voxel on
    each side and each corner index is clamped into ``[-1, size]``, so a corner outside the volume
    reads a zero (a corner two voxels out is clamped onto the zero border, never onto a real voxel).
    Values are read in place: ``(N, S, M, Dh)`` viewed as rows ``(n, s, m)`` -> no permute of the
    values, and the bags come out in ``(n, q, m)`` order, i.e. already ``(N, Lq, M * Dh)``.
    """
    n, _, m, dh = value.shape
    _, lq, _, nl, p, _ = sampling_locations.shape
    dt = torch.promote_types(value.dtype, sampling_locations.dtype)
    loc_dt = torch.promote_types(sampling_locations.dtype, torch.float32)
    dev = value.device

    # values padded by one zero voxel per side, level by level: (N, S_pad, M, Dh)
    padded, starts, s_pad = [], [], 0
    for chunk, (d, h, w) in zip(value.split([d * h * w for d, h, w in shapes], dim=1), shapes):
        padded.append(F.pad(chunk.reshape(n, d, h, w, m * dh), (0, 0, 1, 1, 1, 1, 1, 1)).reshape(n, -1, m, dh))
        starts.append(s_pad)
        s_pad += (d + 2) * (h + 2) * (w + 2)
    table = torch.cat(padded, dim=1).to(dt).reshape(n * s_pad * m, dh)

    loc = sampling_locations.to(loc_dt)
    if official_axis_order:
        loc = loc.flip(-1)   # grid_sample reads the official (d, w, h) stack as (x=w, y=h, z=d)
    size = torch.tensor(shapes, device=dev, dtype=loc_dt)                  # (L, 3)
    coord = loc * size[:, None, :] - 0.5                                   # continuous voxel index
    lower = coord.floor()
    frac = coord - lower                                                   # carries the location gradient
    # int32 row indices where they fit: less memory saved for backward and a faster embedding_bag backward
    # (it sorts the indices) than int64
    idx_dtype = torch.int32 if n * s_pad * m < 2 ** 31 else torch.int64
    size_l = size.to(idx_dtype)
    # per axis, corner c in {0, 1}: index clamped into the padded range, shifted by the pad (+1)
    # (corners beyond the zero border all read padding: clamping first keeps far-away locations, e.g. of a
    # diverging run, inside the integer range)
    lower_l = torch.minimum(lower.clamp_min(-2), size[:, None, :]).to(idx_dtype)
    idx = torch.stack([lower_l.clamp(-1, None), (lower_l + 1).clamp(-1, None)], dim=-1)  # (N, Lq, M, L, P, 3, 2)
    idx = torch.minimum(idx, size_l[:, None, :, None]) + 1
    wgt = torch.stack([1 - frac, frac], dim=-1)                            # (N, Lq, M, L, P, 3, 2)
    # padded strides per level: (H+2)(W+2), W+2, 1
    ph, pw = size_l[:, 1] + 2, size_l[:, 2] + 2
    stride = torch.stack([ph * pw, pw, torch.ones_like(pw)], dim=-1)       # (L, 3)
    idx = idx * stride[:, None, :, None]
    # row of value (n, s, m) = (n * S_pad + start_l + flat) * M + m: fold the constants into the d axis
    base = (torch.arange(n, device=dev, dtype=idx_dtype).view(n, 1, 1, 1, 1) * s_pad
            + torch.tensor(starts, device=dev, dtype=idx_dtype).view(1, 1, 1, nl, 1))       # (N, 1, 1, L, 1)
    d_idx = (idx[..., 0, :] + base[..., None]) * m + torch.arange(m, device=dev, dtype=idx_dtype).view(1, 1, m, 1, 1, 1)
    rows = (d_idx[..., :, None, None] + m * idx[..., 1, None, :, None]
            + m * idx[..., 2, None, None, :])                              # (N, Lq, M, L, P, 2, 2, 2)
    per_row = (wgt[..., 0, :, None, None] * wgt[..., 1, None, :, None] * wgt[..., 2, None, None, :]
               * attention_weights.to(loc_dt)[..., None, None, None])
    out = F.embedding_bag(rows.reshape(n * lq * m, nl * p * 8), table,
                          per_sample_weights=per_row.reshape(n * lq * m, nl * p * 8).to(dt), mode="sum")
    return out.view(n, lq, m * dh)


def _ms_deform_attn_grid_sample(value: Tensor, shapes: list[Shape3], sampling_locations: Tensor,
                                attention_weights: Tensor, official_axis_order: bool) -> Tensor:
    """One ``grid_sample`` call per level with the ``M`` heads folded into the batch and all queries and
    points in the grid; the weighted sum over points is accumulated level by level so the full
    ``(N*M, Dh, Lq, L*P)`` stack is never materialised."""
    n, _, m, dh = value.shape
    _, lq, _, _, p, _ = sampling_locations.shape

    grids = 2.0 * sampling_locations - 1.0
    if not official_axis_order:
        # grid_sample's last grid dim is (x, y, z) = (w, h, d): flip our (d, h, w) locations.
        grids = grids.flip(-1)
    # (N, Lq, M, L, P, 3) -> (L, N*M, 1, Lq, P, 3): one 5-D grid per level, heads in the batch
    grids = grids.permute(3, 0, 2, 1, 4, 5).reshape(len(shapes), n * m, 1, lq, p, 3)
    # (N, Lq, M, L, P) -> (L, N*M, 1, Lq, P)
    weights = attention_weights.permute(3, 0, 2, 1, 4).reshape(len(shapes), n * m, 1, lq, p)

    out = None
    for lvl, (chunk, (d, h, w)) in enumerate(zip(value.split([d * h * w for d, h, w in shapes], dim=1),
                                                 shapes)):
        # (N, S_l, M, Dh) -> (N*M, Dh, D, H, W)
        vol = chunk.permute(0, 2, 3, 1).reshape(n * m, dh, d, h, w)
        # sample in the wider of the two dtypes: under AMP values are half precision but locations
        # stay float32 (a half-precision grid would be off by ~0.01 voxel on 24-voxel axes)
        dt = torch.promote_types(vol.dtype, grids.dtype)
        sampled = F.grid_sample(vol.to(dt), grids[lvl].to(dt), mode="bilinear", padding_mode="zeros",
                                align_corners=False)[:, :, 0]  # (N*M, Dh, Lq, P)
        contrib = (sampled * weights[lvl].to(sampled.dtype)).sum(-1)  # (N*M, Dh, Lq)
        out = contrib if out is None else out + contrib
    # (N*M, Dh, Lq) -> (N, Lq, M*Dh)
    return out.reshape(n, m * dh, lq).transpose(1, 2).contiguous()


def _trilinear_zero_pad(vol: Tensor, size: Shape3, cd: Tensor, ch: Tensor, cw: Tensor) -> Tensor:
    """Sample ``vol`` ``(D*H*W, C)`` (row-major d, h, w) at continuous voxel coordinates (zeros outside)."""
    d_, h_, w_ = size
    d0, h0, w0 = cd.floor(), ch.floor(), cw.floor()
    fd, fh, fw = cd - d0, ch - h0, cw - w0
    out = vol.new_zeros(cd.shape[0], vol.shape[1])
    for od in (0, 1):
        for oh in (0, 1):
            for ow in (0, 1):
                id_, ih, iw = d0 + od, h0 + oh, w0 + ow
                wgt = ((fd if od else 1 - fd) * (fh if oh else 1 - fh) * (fw if ow else 1 - fw))
                inside = (id_ >= 0) & (id_ < d_) & (ih >= 0) & (ih < h_) & (iw >= 0) & (iw < w_)
                flat = (id_.clamp(0, d_ - 1) * h_ * w_ + ih.clamp(0, h_ - 1) * w_ + iw.clamp(0, w_ - 1)).long()
                out = out + (wgt * inside.to(wgt.dtype))[:, None] * vol[flat]
    return out


def ms_deform_attn_reference(value: Tensor, spatial_shapes, sampling_locations: Tensor,
                             attention_weights: Tensor, *, official_axis_order: bool = False) -> Tensor:
    """SLOW reference for :func:`ms_deform_attn_3d` (same arguments, same result).

    Written independently of ``grid_sample``: explicit Python loops over batch, heads, levels and
    points, and hand-written trilinear interpolation with zero padding on the voxel-centre
    convention (continuous voxel index = ``loc * size - 0.5``). Vectorised only over queries. For
    tests and benchmarks, never for training.
    """
    shapes = _shape_list(spatial_shapes)
    _check_attn_inputs(value, shapes, sampling_locations, attention_weights)
    n, _, m, dh = value.shape
    _, lq, _, nl, p, _ = sampling_locations.shape
    starts = level_start_indices(shapes)
    out = value.new_zeros(n, lq, m, dh)
    for b in range(n):
        for head in range(m):
            acc = value.new_zeros(lq, dh)
            for lvl, (d, h, w) in enumerate(shapes):
                vol = value[b, starts[lvl]:starts[lvl] + d * h * w, head]  # (S_l, Dh)
                for pt in range(p):
                    loc = sampling_locations[b, :, head, lvl, pt]  # (Lq, 3)
                    if official_axis_order:
                        # the official code's grid is read as (x=w, y=h, z=d)
                        loc_w, loc_h, loc_d = loc.unbind(-1)
                    else:
                        loc_d, loc_h, loc_w = loc.unbind(-1)
                    sampled = _trilinear_zero_pad(vol, (d, h, w), loc_d * d - 0.5, loc_h * h - 0.5,
                                                  loc_w * w - 0.5)
                    acc = acc + attention_weights[b, :, head, lvl, pt, None] * sampled
            out[b, :, head] = acc
    return out.reshape(n, lq, m * dh)


# ----------------------------------------------------------------------------------------------
# attention module
# ----------------------------------------------------------------------------------------------
_OFFSET_BIAS_DIRECTIONS = {
    # Initial sampling directions per head as functions of theta_k = 2*pi*k/n_heads, listed in the
    # OFFICIAL code's (d, w, h) component order (CoTr: ms_deform_attn.py; TransDoDNet its own).
    "cotr": lambda t: (t.cos(), t.sin() * t.cos(), t.sin() * t.sin()),
    "transdodnet": lambda t: (t.sin() * t.cos(), t.cos(), t.sin()),
}


def official_transdodnet_offset_normalizer(n_levels: int) -> list[float]:
    """TransDoDNet's fixed per-level offset normaliser: ``16 * 2**(i-1)`` for ``i = n_levels..1``.

    Level 0 (the first, highest-resolution level) gets the largest value ``16 * 2**(n_levels-1)``,
    the last level 16, the same on all three axes.
    """
    return [16.0 * 2 ** (i - 1) for i in range(n_levels, 0, -1)]


class MSDeformAttn3D(nn.Module):
    """3-D multi-scale deformable attention (Deformable DETR's MSDeformAttn lifted to volumes).

    For each query: ``n_heads * n_levels * n_points`` 3-D offsets (linear on the query), the same
    number of attention weights (linear, softmax over ``n_levels * n_points`` per head), values
    sampled at ``reference_point + offset / normaliser`` and averaged with those weights, then the
    output projection.

    Args:
        d_model: channels C (divisible by ``n_heads``).
        n_levels, n_heads, n_points: as in Deformable DETR.
        official_axis_order: reference points, offsets and normalisers in the official ``(d, w, h)``
            order handed unflipped to ``grid_sample`` (the official bug, see module docstring).
            Default: correct ``(d, h, w)`` order.
        offset_normalizer: ``None`` (default): offsets are divided by each level's spatial shape
            (Deformable DETR / CoTr). Otherwise a sequence with one entry per level, a scalar or a
            triple in this module's axis order; e.g. :func:`official_transdodnet_offset_normalizer`.
        offset_bias_init: ``"cotr"`` or ``"transdodnet"``: the direction pattern of the initial
            offset bias (official ``_reset_parameters`` of each code base). Point ``i`` starts at
            ``i + 1`` times the head's direction, normalised to unit max-norm. In the correct axis
            order the directions keep their official meaning per axis NAME (the official d/w/h
            values are permuted to our d/h/w order).

    Forward:
        ``query`` ``(N, Lq, C)``; ``reference_points`` ``(N|1, Lq, 3)`` or ``(N|1, Lq, L, 3)`` in
        ``[0, 1]`` (this module's axis order); ``value_input`` ``(N, S, C)`` flattened levels;
        ``spatial_shapes`` L triples; optional ``padding_mask`` ``(N, S)`` (True = padding, value
        zeroed). Returns ``(N, Lq, C)``.
    """

    #: sampler of :func:`ms_deform_attn_3d` (same values either way; set on an instance to compare speeds)
    implementation: str = "auto"

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *,
                 official_axis_order: bool = False, offset_normalizer: Sequence | None = None,
                 offset_bias_init: str = "cotr"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if offset_bias_init not in _OFFSET_BIAS_DIRECTIONS:
            raise ValueError(f"offset_bias_init must be one of {sorted(_OFFSET_BIAS_DIRECTIONS)}, "
                             f"got {offset_bias_init!r}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.official_axis_order = official_axis_order
        self.offset_bias_init = offset_bias_init

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 3)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

        if offset_normalizer is None:
            self.register_buffer("fixed_offset_normalizer", None, persistent=False)
        else:
            rows = []
            for v in offset_normalizer:
                v = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
                if len(v) != 3 or min(v) <= 0:
                    raise ValueError(f"offset_normalizer entries must be positive scalars or triples, got {v}")
                rows.append(v)
            if len(rows) != n_levels:
                raise ValueError(f"offset_normalizer has {len(rows)} entries for {n_levels} levels")
            # not persistent: it is configuration, not a learned parameter, and keeps state dicts
            # compatible with the official naming
            self.register_buffer("fixed_offset_normalizer", torch.tensor(rows), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: zero offset weights, grid-pattern offset bias, uniform attention."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack(_OFFSET_BIAS_DIRECTIONS[self.offset_bias_init](thetas), -1)  # official (d, w, h)
        if not self.official_axis_order:
            grid = grid[:, [0, 2, 1]]  # -> (d, h, w), same direction per axis name
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 3).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _normalizer(self, shapes: list[Shape3], device, dtype) -> Tensor:
        if self.fixed_offset_normalizer is not None:
            return self.fixed_offset_normalizer.to(device=device, dtype=dtype)
        order = (0, 2, 1) if self.official_axis_order else (0, 1, 2)
        return torch.tensor([[s[i] for i in order] for s in shapes], device=device, dtype=dtype)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes,
                padding_mask: Tensor | None = None) -> Tensor:
        shapes = _shape_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn3D built for {self.n_levels} levels got {len(shapes)} shapes")
        n, lq, _ = query.shape
        _, s, _ = value_input.shape
        m, nl, p = self.n_heads, self.n_levels, self.n_points

        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, nl, p, 3)
        weights = F.softmax(self.attention_weights(query).view(n, lq, m, nl * p), dim=-1).view(n, lq, m, nl, p)

        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None, :]  # same point on every level
        if reference_points.dim() != 4 or reference_points.shape[-1] != 3 or reference_points.shape[1] != lq:
            raise ValueError(f"reference_points must be (N, {lq}, 3) or (N, {lq}, n_levels, 3), "
                             f"got {tuple(reference_points.shape)}")
        # locations in at least float32 (offsets are half precision under AMP)
        loc_dtype = torch.promote_types(offsets.dtype, torch.float32)
        normalizer = self._normalizer(shapes, offsets.device, loc_dtype)  # (L, 3)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ms_deform_attn_3d(value, shapes, locations, weights, official_axis_order=self.official_axis_order,
                                implementation=self.implementation)
        return self.output_proj(out)


# ----------------------------------------------------------------------------------------------
# positional encoding
# ----------------------------------------------------------------------------------------------
def position_encoding_split(d_model: int) -> tuple[int, int, int]:
    """Channels of the 3-D sine encoding per axis ``(d, h, w)``.

    ``d_model // 3`` per axis with the remainder added to the depth axis (as CoTr's
    ``build_position_encoding``); each count must be even (sin/cos pairs), so in practice
    ``d_model`` is a multiple of 6 (CoTr: 384 -> 128 each; TransDoDNet: 192 -> 64 each).
    """
    base, rem = divmod(d_model, 3)
    split = (base + rem, base, base)
    if base == 0 or any(c % 2 for c in split):
        raise ValueError(f"d_model={d_model} cannot be split into even per-axis sine encodings "
                         f"(got {split}); use a multiple of 6")
    return split


def sine_position_encoding_3d(spatial_shape: Sequence[int], d_model: int, *, temperature: float = 10000.0,
                              offset: float = 0.5, device=None, dtype=torch.float32) -> Tensor:
    """3-D sine positional encoding of a ``(D, H, W)`` grid, ``(d_model, D, H, W)``.

    CoTr's 'v2' encoding (normalised, scale 2*pi): per axis the coordinate ``(i + offset) / (size +
    1e-6) * 2*pi`` is divided by ``temperature ** (3 * (j // 3) / n_axis)`` for feature j (frequencies
    grouped in threes, as the official code does), then even features take the sine, odd ones the
    cosine; channels are ``[depth | height | width]`` with the split of :func:`position_encoding_split`.
    ``offset`` 0.5 (voxel centres) is CoTr's ``cumsum - 0.5``; TransDoDNet's official encoding uses
    the plain ``cumsum``, i.e. ``offset=1.0``.
    Independent of the features' values and of the batch, so it is computed once per shape.
    """
    d, h, w = (int(v) for v in spatial_shape)
    n_d, n_h, n_w = position_encoding_split(d_model)

    def axis(size: int, n_feats: int) -> Tensor:  # (size, n_feats)
        coord = (torch.arange(size, device=device, dtype=torch.float32) + offset) / (size + 1e-6) * (2 * math.pi)
        j = torch.arange(n_feats, device=device, dtype=torch.float32)
        freqs = temperature ** (3 * torch.div(j, 3, rounding_mode="floor") / n_feats)
        arg = coord[:, None] / freqs
        return torch.where(j.remainder(2) == 0, arg.sin(), arg.cos())

    pd, ph, pw = axis(d, n_d), axis(h, n_h), axis(w, n_w)
    pos = torch.cat([pd[:, None, None, :].expand(d, h, w, n_d),
                     ph[None, :, None, :].expand(d, h, w, n_h),
                     pw[None, None, :, :].expand(d, h, w, n_w)], dim=-1)
    return pos.permute(3, 0, 1, 2).to(dtype)


# ----------------------------------------------------------------------------------------------
# encoder
# ----------------------------------------------------------------------------------------------
_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _scaled(x: Tensor, a: float) -> Tensor:
    """``a * x`` for the residual branch; ``x`` itself when ``a == 1`` (CoTr, Deformable DETR): the product
    would be an exact copy, plus its backward, of every token in every layer."""
    return x if a == 1.0 else x * a


class DeformableEncoderLayer3D(nn.Module):
    """Post-norm deformable encoder layer: ``x = LN(a*x + drop(MSDA(x + pos)))``,
    ``x = LN(a*x + drop(W2 drop(act(W1 x))))`` (Deformable DETR / CoTr DeTrans layer).

    ``residual_scale`` ``a`` is 1 for Deformable DETR and CoTr; TransDoDNet's official transformer
    scales the residual branch by DeepNorm's alpha (Wang et al. 2022, "DeepNet").
    Extra keyword arguments go to :class:`MSDeformAttn3D` (``official_axis_order``,
    ``offset_normalizer``, ``offset_bias_init``).
    """

    def __init__(self, d_model: int = 384, d_ffn: int = 1536, dropout: float = 0.1, activation: str = "gelu",
                 n_levels: int = 2, n_heads: int = 6, n_points: int = 4, *, residual_scale: float = 1.0,
                 **attn_kwargs):
        super().__init__()
        self.residual_scale = float(residual_scale)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.self_attn = MSDeformAttn3D(d_model, n_levels, n_heads, n_points, **attn_kwargs)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _ACTIVATIONS[activation]
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor, spatial_shapes,
                padding_mask: Tensor | None = None) -> Tensor:
        query = src if pos is None else src + pos
        a = self.residual_scale
        src = self.norm1(_scaled(src, a) + self.dropout1(self.self_attn(query, reference_points, src, spatial_shapes,
                                                                padding_mask)))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(_scaled(src, a) + self.dropout3(ffn))


class DeformableTransformerEncoder3D(nn.Module):
    """Stack of :class:`DeformableEncoderLayer3D` over multi-level 3-D feature maps (CoTr's DeTrans).

    Adds the 3-D sine positional encoding plus a learnable per-level embedding to the queries, uses
    every voxel centre of every level as a reference point (no padding: all volumes are complete) and
    runs ``num_layers`` layers of multi-scale deformable self-attention.

    Args:
        d_model, n_heads, num_layers, d_ffn, dropout, activation, n_levels, n_points: CoTr's defaults
            are 384, 6, 6, 1536, 0.1, "gelu", 2, 4 (TransDoDNet: 192, 8, 3, 768, 0.1, "relu", 3, 4).
        official_axis_order, offset_normalizer, offset_bias_init: see :class:`MSDeformAttn3D`.
        temperature, position_offset: of the sine encoding (``offset`` of :func:`sine_position_encoding_3d`).
        residual_scale: of every layer (see :class:`DeformableEncoderLayer3D`).

    ``forward(features)`` takes ``n_levels`` maps ``(N, d_model, D_l, H_l, W_l)`` and returns the
    encoded maps in the same shapes. ``encode_tokens(features)`` returns the flattened memory
    ``(N, S, d_model)``, the level shapes and the (pos + level) embedding, e.g. for a decoder's
    cross-attention.

    Initialisation as the official ``DeformableTransformer._reset_parameters``: Xavier-uniform for
    every matrix, then the attention modules' own initialisation, level embedding ~ N(0, 1).
    """

    def __init__(self, d_model: int = 384, n_heads: int = 6, num_layers: int = 6, d_ffn: int = 1536,
                 dropout: float = 0.1, activation: str = "gelu", n_levels: int = 2, n_points: int = 4, *,
                 official_axis_order: bool = False, offset_normalizer: Sequence | None = None,
                 offset_bias_init: str = "cotr", temperature: float = 10000.0, position_offset: float = 0.5,
                 residual_scale: float = 1.0):
        super().__init__()
        position_encoding_split(d_model)  # fail early on an unusable width
        self.d_model, self.n_levels = d_model, n_levels
        self.official_axis_order = official_axis_order
        self.temperature = temperature
        self.position_offset = float(position_offset)
        layer = DeformableEncoderLayer3D(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points,
                                         residual_scale=residual_scale, official_axis_order=official_axis_order,
                                         offset_normalizer=offset_normalizer, offset_bias_init=offset_bias_init)
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for mod in self.modules():
            if isinstance(mod, MSDeformAttn3D):
                mod.reset_parameters()
        nn.init.normal_(self.level_embed)

    def embeddings(self, shapes: list[Shape3], device, dtype) -> Tensor:
        """Positional + level embedding of all tokens, ``(1, S, d_model)``."""
        parts = [sine_position_encoding_3d(s, self.d_model, temperature=self.temperature,
                                           offset=self.position_offset, device=device)
                 .flatten(1).transpose(0, 1).to(dtype) + self.level_embed[lvl].to(dtype)
                 for lvl, s in enumerate(shapes)]
        return torch.cat(parts, dim=0)[None]

    def encode_tokens(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Shape3], Tensor]:
        if len(features) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} feature levels, got {len(features)}")
        for f in features:
            if f.dim() != 5 or f.shape[1] != self.d_model:
                raise ValueError(f"each level must be (N, {self.d_model}, D, H, W), got {tuple(f.shape)}")
        src, shapes = flatten_levels(features)
        # embeddings and reference points in at least float32, also under AMP (as the official code)
        emb_dtype = torch.promote_types(src.dtype, torch.float32)
        pos = self.embeddings(shapes, src.device, emb_dtype)
        ref = reference_points_3d(shapes, official_axis_order=self.official_axis_order,
                                  device=src.device, dtype=emb_dtype)[None]
        out = src
        for layer in self.layers:
            out = layer(out, pos, ref, shapes)
        return out, shapes, pos

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        tokens, shapes, _ = self.encode_tokens(features)
        return unflatten_levels(tokens, shapes)


# ----------------------------------------------------------------------------------------------
# decoder
# ----------------------------------------------------------------------------------------------
class DeformableDecoderLayer3D(nn.Module):
    """Post-norm deformable decoder layer (Deformable DETR's decoder layer on 3-D memory; TransDoDNet)::

        q = k = tgt + query_pos
        tgt = LN1(a*tgt + drop(MHA(q, k, tgt)))                                  self-attention among queries
        tgt = LN2(a*tgt + drop(MSDA(tgt + query_pos, reference_points, memory)))  deformable cross-attention
        tgt = LN3(a*tgt + drop(W2 drop(act(W1 tgt))))                             FFN

    ``residual_scale`` ``a``: 1 in Deformable DETR; DeepNorm's alpha in TransDoDNet's official code.
    The cross-attention is :class:`MSDeformAttn3D` over the flattened multi-level memory; extra keyword
    arguments go to it (``official_axis_order``, ``offset_normalizer``, ``offset_bias_init``). The
    self-attention is ``nn.MultiheadAttention`` (attention dropout = ``dropout``, as the official layer).

    Forward:
        ``tgt`` ``(N, Lq, C)`` query contents; ``query_pos`` ``(N|1, Lq, C)`` or None;
        ``reference_points`` ``(N, Lq, 3)`` or ``(N, Lq, L, 3)`` in ``[0, 1]``; ``memory`` ``(N, S, C)``;
        ``spatial_shapes`` L triples; optional ``padding_mask`` ``(N, S)``. Returns ``(N, Lq, C)``.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *, residual_scale: float = 1.0,
                 **attn_kwargs):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.residual_scale = float(residual_scale)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn3D(d_model, n_levels, n_heads, n_points, **attn_kwargs)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _ACTIVATIONS[activation]
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor | None, reference_points: Tensor, memory: Tensor,
                spatial_shapes, padding_mask: Tensor | None = None) -> Tensor:
        if tgt.dim() != 3 or memory.dim() != 3 or tgt.shape[0] != memory.shape[0] or tgt.shape[2] != memory.shape[2]:
            raise ValueError(f"tgt (N, Lq, C) and memory (N, S, C) must agree, got {tuple(tgt.shape)} and "
                             f"{tuple(memory.shape)}")
        a = self.residual_scale
        q = tgt if query_pos is None else tgt + query_pos
        attn = self.self_attn(q, q, tgt, need_weights=False)[0]
        tgt = self.norm1(_scaled(tgt, a) + self.dropout1(attn))
        q = tgt if query_pos is None else tgt + query_pos
        cross = self.cross_attn(q, reference_points, memory, spatial_shapes, padding_mask)
        tgt = self.norm2(_scaled(tgt, a) + self.dropout2(cross))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(_scaled(tgt, a) + self.dropout4(ffn))
