"""TransDoDNet: a CNN + deformable transformer whose per-task queries generate dynamic heads.

Paper: Y. Xie, J. Zhang, Y. Xia, C. Shen et al. "Learning from partially labeled data for multi-organ
and tumor segmentation" (TransDoDNet). IEEE TPAMI 2023. Official code: github.com/jianpengz/DoDNet
(``TransDoD/models/TransDoDNet.py``, ``ResCNN2.py``, ``deformable_transformer.py``); this is our own
implementation of that architecture.

Architecture (defaults = the official configuration)
----------------------------------------------------
Input ``(B, C_in, D, H, W)`` with ``D % 16 == H % 32 == W % 32 == 0`` (:attr:`TransDoDNet.required_divisor`).

* Backbone: 3-D ResNet-50. Stem: ``3x3x3`` conv stride ``(1, 2, 2)`` C_in -> 32, IN, ReLU, ``3x3x3``
  conv 32 -> 32, IN, ReLU -> level 0 ``(D, H/2, W/2)``. Four stages of bottleneck blocks
  (``1x1`` -> ``3x3`` (stride) -> ``1x1`` x4, IN, ReLU after the addition; projection shortcut
  ``1x1`` conv + IN on the first block), [3, 4, 6, 3] blocks, 64 / 128 / 256 / 320 planes
  (256 / 512 / 1024 / 1280 channels), stride 2 each -> levels 1..4. Convs without bias; IN is affine.
* Transformer (Deformable DETR style, 3-D): the three deepest levels are projected to d_model 192
  (``1x1`` conv with bias + IN), get a 3-D sine positional encoding + a learnable level embedding and
  pass 3 post-norm encoder layers of multi-scale deformable self-attention (8 heads, 4 points per
  head and level, FFN 768, ReLU, dropout 0.1). ONE QUERY PER TASK: ``nn.Embedding(T, 2*192)`` split
  into a positional part and a content part; reference points = sigmoid(linear(query position)); 3
  post-norm decoder layers (query self-attention, deformable cross-attention to the memory, FFN).
* Controller: the last decoder layer's query of task t -> Linear 192 -> 192, ReLU, Linear 192 -> 162
  = the parameters of task t's dynamic head (8 -> 8 -> 8 -> 2, see
  :mod:`nnunet_plugins.architectures.blocks.dynamic_head`).
* CNN decoder: bottleneck = IN-ReLU(``1x1`` conv 1280 -> 256 of backbone level 4) + IN-ReLU(``1x1``
  conv 192 -> 256 of the transformer's level-4 memory) (official ``add_memory=2``); then four steps of
  transposed conv (kernel = stride = 2, no bias) 256 -> 256 -> 128 -> 64 -> 32, ADD the skip of that
  level (``1x1`` conv + IN + ReLU of backbone level 3, 2, 1, 0: 1024 -> 256, 512 -> 128, 256 -> 64,
  32 -> 32), a residual basic block (two ``3x3x3`` conv + IN); then ``1x1x1`` conv 32 -> 8 + IN + ReLU.
* Head: the task's dynamic head on those 8 channels at ``(D, H/2, W/2)``, then trilinear upsampling
  ``(1, 2, 2)`` of the logits to the input size.

Outputs
-------
The official network returns every query's prediction, ``(B, T, num_classes, D, H, W)``, and its
loss picks each sample's own task ``preds[b, task_id[b]]``. :meth:`TransDoDNet.forward_all_tasks`
returns exactly that tensor. :meth:`TransDoDNet.forward` ``(x, task_id)`` returns the pick,
``(B, num_classes, D, H, W)``: the same values and the same gradients (the other queries' heads never
reach the official loss) without computing and upsampling T-1 unused heads at full resolution; this
is also the package's multi-task convention (``forward(x, task_id=None)`` + ``set_inference_task``).

Parameter count at the defaults (1 input channel, 2 classes, 7 tasks): 39,049,941, equal to the
official network's (backbone 29,025,760; transformer incl. input projections, queries and reference
points 3,661,251; controller 68,322; CNN decoder and head 6,294,608).

Decisions
---------
* Offset normaliser: the official attention divides sampling offsets by a FIXED ``16 * 2**(i-1)``
  per level (64, 32, 16 for 3 levels) whatever the level's size; the paper's (Deformable DETR's)
  definition divides by the level's spatial shape, which is our default.
  ``official_offset_normalizer=True`` reproduces the official behaviour.
* Axis order: geometrically correct by default; ``official_axis_order=True`` reproduces the official
  ``(d, w, h)`` order (see :mod:`nnunet_plugins.architectures.blocks.deformable_attention`). Both official flags are
  needed to run official checkpoints.
* DeepNorm (``deepnorm=True``, the official training default): residual branches of the encoder /
  decoder layers are added to ``alpha * x`` (alpha_enc = 0.81 (N^4 M)^(1/16), alpha_dec = (3M)^(1/4)
  for N encoder and M decoder layers) and the transformer is initialised as DeepNet (Xavier-normal,
  gain beta_enc = 0.87 (N^4 M)^(-1/16) / beta_dec = (12M)^(-1/4) for value/output projections and
  FFN weights, gain 1 for other matrices). ``deepnorm=False`` gives plain Deformable DETR layers and
  initialisation.
* Positional encoding: the official TransDoDNet's sine encoding (coordinate ``(i + 1) / size``, not
  CoTr's ``(i + 0.5) / size``).
* Deep supervision: the official network has none; ``deep_supervision=True`` returns a one-element
  list ``[logits]``.
* Initialisation otherwise as the official code: Kaiming-normal (``fan_out``) for every (transposed)
  convolution, norms at weight 1 / bias 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnunet_plugins.architectures.blocks.deformable_attention import (
    DeformableDecoderLayer3D, DeformableTransformerEncoder3D, MSDeformAttn3D, official_transdodnet_offset_normalizer,
    position_encoding_split, unflatten_levels,
)
from nnunet_plugins.architectures.blocks.conv import ConvNormFactory
from nnunet_plugins.architectures.blocks.dynamic_head import (
    TaskConditionedNetwork, apply_dynamic_head, dynamic_head_layer_sizes, num_dynamic_params,
)
from nnunet_plugins.architectures.contract import PlansNetwork, conv_output_size, strided

__all__ = ["TransDoDNet", "ResNet3D", "deepnorm_coefficients"]


def deepnorm_coefficients(num_encoder_layers: int, num_decoder_layers: int) -> dict:
    """DeepNet (Wang et al. 2022) residual scales ``alpha`` and init gains ``beta`` of an
    encoder-decoder: ``{"encoder": (alpha, beta), "decoder": (alpha, beta)}``."""
    n, m = num_encoder_layers, num_decoder_layers
    if n < 1 or m < 1:
        raise ValueError("DeepNorm coefficients need at least one encoder and one decoder layer")
    return {"encoder": (0.81 * (n ** 4 * m) ** 0.0625, 0.87 * (n ** 4 * m) ** -0.0625),
            "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25)}


# 3-D convs (no bias unless asked) and affine instance norm everywhere (official ResCNN2 / TransDoDNet)
_CFG = ConvNormFactory(nn.Conv3d, norm="instance", owner="TransDoDNet")
_norm, _conv = _CFG.norm, _CFG.conv
OFFICIAL_BACKBONE_PLANES = (64, 128, 256, 320)


class _ConvNormReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride=1):
        super().__init__(_conv(cin, cout, kernel, stride), _norm(cout), nn.ReLU(inplace=True))


class Bottleneck3D(nn.Module):
    """ResNet bottleneck: 1x1 -> 3x3x3 (stride) -> 1x1 (x expansion), IN, ReLU after the addition."""

    def __init__(self, cin: int, planes: int, stride=1, expansion: int = 4):
        super().__init__()
        cout = planes * expansion
        self.conv1, self.norm1 = _conv(cin, planes, 1), _norm(planes)
        self.conv2, self.norm2 = _conv(planes, planes, 3, stride), _norm(planes)
        self.conv3, self.norm3 = _conv(planes, cout, 1), _norm(cout)
        strided = any(s != 1 for s in (stride if isinstance(stride, (tuple, list)) else (stride,)))
        self.shortcut = nn.Sequential(_conv(cin, cout, 1, stride), _norm(cout)) if strided or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = F.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class BasicBlock3D(nn.Module):
    """Two 3x3x3 conv + IN with an identity shortcut, ReLU after the addition (decoder block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.norm1 = _conv(channels, channels, 3), _norm(channels)
        self.conv2, self.norm2 = _conv(channels, channels, 3), _norm(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + x)


class ResNet3D(nn.Module):
    """3-D ResNet of TransDoDNet: two-conv stem (first stride ``stem_stride``), bottleneck stages.

    ``forward`` returns all levels ``[stem, stage1, ..., stageK]``. (The official ResNet also defines a
    max-pool that its forward never uses; it has no parameters and is omitted.)
    """

    def __init__(self, input_channels: int = 1, stem_channels: int = 32, planes: Sequence[int] = (64, 128, 256, 320),
                 blocks: Sequence[int] = (3, 4, 6, 3), stem_stride=(1, 2, 2), stage_stride=2, expansion: int = 4):
        super().__init__()
        self.stem = nn.Sequential(_ConvNormReLU(input_channels, stem_channels, 3, stem_stride),
                                  _ConvNormReLU(stem_channels, stem_channels, 3))
        stages, cin = [], stem_channels
        for p, n in zip(planes, blocks):
            stages.append(nn.Sequential(*[Bottleneck3D(cin if i == 0 else p * expansion, p,
                                                       stage_stride if i == 0 else 1, expansion) for i in range(n)]))
            cin = p * expansion
        self.stages = nn.ModuleList(stages)
        self.out_channels = [stem_channels] + [p * expansion for p in planes]

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = [self.stem(x)]
        for stage in self.stages:
            levels.append(stage(levels[-1]))
        return levels


class TransDoDNet(PlansNetwork, TaskConditionedNetwork):
    """TransDoDNet (Xie et al., TPAMI 2023); see the module docstring for architecture and decisions.

    Args:
        input_channels: image channels.
        num_classes: binary (sigmoid) outputs of every dynamic head (official 2: organ, tumour).
        num_tasks: T = number of task queries (official 7, MOTS).
        deep_supervision: return ``[logits]`` instead of ``logits`` (no auxiliary heads exist).
        stem_channels, backbone_planes, backbone_blocks, expansion: the ResNet (official 32,
            (64, 128, 256, 320), (3, 4, 6, 3) = ResNet-50, 4).
        d_model, n_heads, d_ffn, num_encoder_layers, num_decoder_layers, n_levels, n_points, dropout:
            the transformer (official 192, 8, 768, 3, 3, 3, 4, 0.1). ``d_model`` must be a multiple of 6
            (3-D sine encoding) and of ``n_heads``.
        decoder_channels: widths of the CNN decoder from full resolution (level 0) to the bottleneck
            (official (32, 64, 128, 256, 256)); ``decoder_channels[0]`` must equal the stem width.
        head_channels, head_layers: the dynamic head (official 8 channels, 3 layers).
        memory_fusion: bottleneck input: ``"both"`` (official ``add_memory=2``: CNN level + transformer
            memory), ``"cnn"`` (0) or ``"transformer"`` (1).
        deepnorm: DeepNorm residual scaling and initialisation (official default True).
        official_offset_normalizer, official_axis_order: reproduce the official attention (see above).

    Forward: ``x`` ``(B, input_channels, D, H, W)``; ``task_id`` LongTensor ``(B,)`` / int / None (then
    :meth:`set_inference_task`'s task). Returns ``(B, num_classes, D, H, W)`` (or ``[that]`` with deep
    supervision). :meth:`forward_all_tasks` returns ``(B, T, num_classes, D, H, W)``.
    """

    def __init__(self, input_channels: int = 1, num_classes: int = 2, num_tasks: int = 7,
                 deep_supervision: bool = False, *, stem_channels: int = 32,
                 backbone_planes: Sequence[int] = OFFICIAL_BACKBONE_PLANES, backbone_blocks: Sequence[int] = (3, 4, 6, 3),
                 expansion: int = 4, d_model: int = 192, n_heads: int = 8, d_ffn: int = 768,
                 num_encoder_layers: int = 3, num_decoder_layers: int = 3, n_levels: int = 3, n_points: int = 4,
                 dropout: float = 0.1, decoder_channels: Sequence[int] = (32, 64, 128, 256, 256),
                 head_channels: int = 8, head_layers: int = 3, memory_fusion: str = "both", deepnorm: bool = True,
                 official_offset_normalizer: bool = False, official_axis_order: bool = False):
        super().__init__()
        planes, blocks, dec = tuple(backbone_planes), tuple(backbone_blocks), tuple(decoder_channels)
        if len(planes) != len(blocks) or len(planes) < 1:
            raise ValueError(f"TransDoDNet: backbone_planes and backbone_blocks need one entry per stage, got "
                             f"{planes} and {blocks}")
        if len(dec) != len(planes) + 1 or dec[0] != stem_channels:
            raise ValueError(f"TransDoDNet: decoder_channels needs one width per backbone level (stem first, "
                             f"{len(planes) + 1} entries) starting with stem_channels={stem_channels}, got {dec}")
        if not 1 <= n_levels <= len(planes):
            raise ValueError(f"TransDoDNet: n_levels must be 1..{len(planes)} (deepest backbone stages), got {n_levels}")
        if d_model % n_heads:
            raise ValueError(f"TransDoDNet: d_model={d_model} is not divisible by n_heads={n_heads}")
        position_encoding_split(d_model)
        if memory_fusion not in ("both", "cnn", "transformer"):
            raise ValueError(f"TransDoDNet: memory_fusion must be 'both', 'cnn' or 'transformer', got {memory_fusion!r}")
        if min(input_channels, num_classes, num_tasks) < 1:
            raise ValueError("TransDoDNet: input_channels, num_classes and num_tasks must be positive")
        self.input_channels, self.num_classes, self.num_tasks = int(input_channels), int(num_classes), int(num_tasks)
        self.deep_supervision = bool(deep_supervision)
        self.memory_fusion, self.deepnorm = memory_fusion, bool(deepnorm)
        self.official_offset_normalizer, self.official_axis_order = official_offset_normalizer, official_axis_order
        self.stem_stride, self.n_levels = (1, 2, 2), int(n_levels)
        self.required_divisor = self.divisor_for({"backbone_planes": planes}, 3)

        # --- backbone
        self.backbone = ResNet3D(self.input_channels, stem_channels, planes, blocks, self.stem_stride, 2, expansion)
        level_channels = self.backbone.out_channels

        # --- transformer
        coeffs = deepnorm_coefficients(num_encoder_layers, num_decoder_layers) if deepnorm else None
        attn_kwargs = dict(official_axis_order=official_axis_order, offset_bias_init="transdodnet",
                           offset_normalizer=(official_transdodnet_offset_normalizer(n_levels)
                                              if official_offset_normalizer else None))
        self.input_proj = nn.ModuleList([nn.Sequential(_conv(c, d_model, 1, bias=True), _norm(d_model))
                                         for c in level_channels[-n_levels:]])
        self.encoder = DeformableTransformerEncoder3D(
            d_model=d_model, n_heads=n_heads, num_layers=num_encoder_layers, d_ffn=d_ffn, dropout=dropout,
            activation="relu", n_levels=n_levels, n_points=n_points, position_offset=1.0,
            residual_scale=coeffs["encoder"][0] if coeffs else 1.0, **attn_kwargs)
        self.query_embed = nn.Embedding(self.num_tasks, 2 * d_model)
        self.reference_points = nn.Linear(d_model, 3)
        self.decoder_layers = nn.ModuleList([
            DeformableDecoderLayer3D(d_model, d_ffn, dropout, "relu", n_levels, n_heads, n_points,
                                     residual_scale=coeffs["decoder"][0] if coeffs else 1.0, **attn_kwargs)
            for _ in range(num_decoder_layers)])

        # --- controller: task query -> dynamic head parameters
        self.head_layer_sizes = dynamic_head_layer_sizes(head_channels, head_channels, head_layers, self.num_classes)
        self.num_dynamic_params = num_dynamic_params(self.head_layer_sizes)
        self.controller = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(inplace=True),
                                        nn.Linear(d_model, self.num_dynamic_params))

        # --- CNN decoder
        if memory_fusion in ("both", "transformer"):
            self.memory_proj = _ConvNormReLU(d_model, dec[-1], 1)
        if memory_fusion in ("both", "cnn"):
            self.bottleneck_proj = _ConvNormReLU(level_channels[-1], dec[-1], 1)
        # skip projections and up-steps for levels len-2 .. 0 (deepest first)
        levels = range(len(level_channels) - 2, -1, -1)
        self.skip_projs = nn.ModuleList([_ConvNormReLU(level_channels[l], dec[l], 1) for l in levels])
        self.upconvs = nn.ModuleList([nn.ConvTranspose3d(dec[l + 1], dec[l], kernel_size=2, stride=2, bias=False)
                                      for l in levels])
        self.decoder_blocks = nn.ModuleList([BasicBlock3D(dec[l]) for l in levels])
        self.pre_head = _ConvNormReLU(dec[0], head_channels, 1)

        self._init_weights(coeffs)

    # ---- nnU-Net contract -----------------------------------------------------------------------
    spatial_dims = (3,)
    avoid_single_voxel_bottleneck = True   # instance norm at the deepest level
    context_kwargs = PlansNetwork.context_kwargs + ("num_tasks",)

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple[int, ...]:
        """Stem stride (1, 2, 2), then one stride-2 stage per backbone stage."""
        n = len(kwargs.get("backbone_planes", OFFICIAL_BACKBONE_PLANES))
        return (2 ** n, 2 ** (n + 1), 2 ** (n + 1))

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager) -> None:
        return None   # no auxiliary heads (the official network has none)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Conv output elements for one ``input_size`` (D, H, W) sample (nnU-Net's planner estimate): backbone,
        input projections, CNN decoder and the task's dynamic head (the transformer has no convolutions)."""
        first, second = self.backbone.stem[0][0], self.backbone.stem[1][0]
        size = strided(input_size, first.stride)
        total = conv_output_size(first.out_channels, size) + conv_output_size(second.out_channels, size)
        levels = [size]
        for stage in self.backbone.stages:
            for block in stage:   # 1x1, 3x3x3 (strided), 1x1 (+ projection shortcut)
                total += conv_output_size(block.conv1.out_channels, size)
                size = strided(size, block.conv2.stride)
                total += conv_output_size(block.conv2.out_channels, size) + conv_output_size(block.conv3.out_channels, size)
                if block.shortcut is not None:
                    total += conv_output_size(block.shortcut[0].out_channels, size)
            levels.append(size)
        total += sum(conv_output_size(proj[0].out_channels, lvl)
                     for proj, lvl in zip(self.input_proj, levels[-self.n_levels:]))
        for proj in (getattr(self, "memory_proj", None), getattr(self, "bottleneck_proj", None)):
            if proj is not None:
                total += conv_output_size(proj[0].out_channels, levels[-1])
        for up, skip, size in zip(self.upconvs, self.skip_projs, levels[-2::-1]):
            # transposed conv, skip projection, the basic block's two convs
            total += 2 * conv_output_size(up.out_channels, size) + 2 * conv_output_size(skip[0].out_channels, size)
        total += conv_output_size(self.pre_head[0].out_channels, levels[0])
        return total + sum(conv_output_size(c_out, levels[0]) for _, c_out in self.head_layer_sizes)

    # ------------------------------------------------------------------------------------------
    def _init_weights(self, coeffs: dict | None) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.InstanceNorm3d) and m.weight is not None:
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)
        if coeffs is None:
            # Deformable DETR: Xavier-uniform for every transformer matrix, then the attention modules'
            # own initialisation, reference-point projection Xavier with zero bias, level embedding N(0, 1)
            for module in (self.encoder, self.decoder_layers):
                for p in module.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
            for m in self.modules():
                if isinstance(m, MSDeformAttn3D):
                    m.reset_parameters()
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        else:
            # DeepNet initialisation of the official code (``_deepnorm_init``): value/output projections
            # and FFN weights Xavier-normal with gain beta, every other matrix gain 1; biases keep the
            # attention modules' initialisation (grid-pattern offsets, uniform attention, zeros)
            for part, layers in (("encoder", self.encoder.layers), ("decoder", self.decoder_layers)):
                beta = coeffs[part][1]
                for name, p in layers.named_parameters():
                    if p.dim() < 2:
                        continue
                    scaled = (name.endswith(("value_proj.weight", "output_proj.weight"))
                              or name.endswith(("linear1.weight", "linear2.weight")))
                    nn.init.xavier_normal_(p, gain=beta if scaled else 1.0)
        nn.init.normal_(self.encoder.level_embed)

    # ------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"TransDoDNet is a 3-D network: expected input (B, C, D, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.input_channels:
            raise ValueError(f"TransDoDNet built for {self.input_channels} input channels got {x.shape[1]}")
        if any(s % k for s, k in zip(x.shape[2:], self.required_divisor)):
            raise ValueError(f"TransDoDNet input spatial size {tuple(x.shape[2:])} must be divisible by "
                             f"{self.required_divisor} (stem stride (1, 2, 2) and {len(self.required_divisor) + 1} "
                             f"stride-2 stages)")
        if all(s == k for s, k in zip(x.shape[2:], self.required_divisor)):
            raise ValueError(f"TransDoDNet input spatial size {tuple(x.shape[2:])} leaves one voxel at the deepest "
                             f"level, which instance norm cannot normalise; use a larger input, e.g. "
                             f"{(2 * self.required_divisor[0],) + tuple(self.required_divisor[1:])}")

    def task_queries(self, levels: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Transformer on the deepest ``n_levels`` backbone levels.

        Returns the decoded task queries ``(B, T, d_model)`` (last decoder layer) and the encoder's
        memory of the deepest level as a map ``(B, d_model, D_L, H_L, W_L)``.
        """
        srcs = [proj(level) for proj, level in zip(self.input_proj, levels[-self.n_levels:])]
        memory, shapes, _ = self.encoder.encode_tokens(srcs)
        b = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.to(memory.dtype).split(memory.shape[2], dim=1)
        query_pos, tgt = query_pos[None].expand(b, -1, -1), tgt[None].expand(b, -1, -1)
        # one reference point per query, shared by all levels (all volumes are unpadded)
        reference_points = self.reference_points(query_pos).sigmoid()
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, reference_points, memory, shapes)
        return tgt, unflatten_levels(memory, shapes)[-1]

    def _head_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dynamic-head input features ``(B, head_channels, D, H/2, W/2)`` and the per-task dynamic
        parameters ``(B, T, num_dynamic_params)``."""
        self._check_input(x)
        levels = self.backbone(x)
        queries, deepest_memory = self.task_queries(levels)
        params = self.controller(queries)
        h = None
        if self.memory_fusion in ("both", "transformer"):
            h = self.memory_proj(deepest_memory.to(levels[-1].dtype))
        if self.memory_fusion in ("both", "cnn"):
            cnn = self.bottleneck_proj(levels[-1])
            h = cnn if h is None else h + cnn
        for up, proj, block, skip in zip(self.upconvs, self.skip_projs, self.decoder_blocks, levels[-2::-1]):
            h = block(up(h) + proj(skip))
        return self.pre_head(h), params

    def _to_input_size(self, logits: Tensor, size) -> Tensor:
        # the logits are at the stem's resolution: undo its (1, 2, 2) stride (official nn.Upsample)
        return F.interpolate(logits, size=tuple(size), mode="trilinear", align_corners=False)

    def forward(self, x: Tensor, task_id: Tensor | int | None = None) -> Tensor | list[Tensor]:
        task_id = self.task_ids(x, task_id)
        features, params = self._head_features(x)
        own = params[torch.arange(x.shape[0], device=params.device), task_id]  # each sample's own task
        logits = self._to_input_size(apply_dynamic_head(features, own, self.head_layer_sizes), x.shape[2:])
        return [logits] if self.deep_supervision else logits

    def forward_all_tasks(self, x: Tensor) -> Tensor:
        """Every task query's prediction, ``(B, T, num_classes, D, H, W)`` (the official output)."""
        features, params = self._head_features(x)
        b, t = params.shape[:2]
        expanded = features[:, None].expand(b, t, *features.shape[1:]).reshape(b * t, *features.shape[1:])
        logits = apply_dynamic_head(expanded, params.reshape(b * t, -1), self.head_layer_sizes)
        return self._to_input_size(logits, x.shape[2:]).reshape(b, t, self.num_classes, *x.shape[2:])
