"""LeFeD's official V-Net: one encoder, two different decoders, discrepancy feedback into the encoder.

Paper: Zeng, Xie, Lu et al. "Discrepancy Matters: Learning from Inconsistent Decoder Features for Consistent
Semi-supervised Medical Image Segmentation" (LeFeD), IEEE TMI 2025. Official code: maxwell0027/LeFeD
(``networks/my_net.py``: ``Encoder``, ``Decoder``, ``SideConv``, ``LeFeD_Net``), a V-Net in the style of
the MC-Net / UA-MT code bases.

Layout (``n_filters`` = f = 16 as official, 3x3x3 convolutions, BatchNorm, ReLU):

* encoder (:class:`~nnunet_plugins.architectures.blocks.vnet.VNetEncoder`, the V-Net encoder of the
  MC-Net line): 5 stages of 1, 2, 3, 3, 3 conv-BN-ReLU layers with f, 2f, 4f, 8f, 16f features at full, 1/2,
  1/4, 1/8, 1/16 resolution; between stages a 2x2x2 stride-2 convolution (+BN+ReLU) doubles the features;
  Dropout3d(p=0.3) on the bottleneck when ``has_dropout``.
* decoder 1 (``decoder1``, the one used for inference): per stage an upsampling to the next resolution
  (2x2x2 stride-2 transposed convolution + BN + ReLU), added to the encoder skip, then 3, 3, 2, 1
  conv-BN-ReLU layers; Dropout3d(p=0.5) before the 1x1 output convolution when ``has_dropout``.
* decoder 2 (``decoder2``): the same, but each upsampling is trilinear (``align_corners=True``) + 3x3x3
  convolution + BN + ReLU, and it is GATED by decoder 1's stage features ``F1`` (detached sigmoid):
  bottleneck ``x <- x + x * sigmoid(F1_0)``, each upsampled map ``u_k <- u_k + skip_k * sigmoid(F1_k)``
  (the skip is re-weighted, not concatenated). The gate is detached, so decoder 2's loss never reaches
  decoder 1 through it (gradients still reach the shared encoder through ``x`` and the skips).
* side outputs (``side``, deep supervision on decoder 1): a 1x1 convolution on each of decoder 1's stage
  features, trilinearly upsampled (``align_corners=True``) to full resolution as official (or left at
  their own resolution with ``upsample_side_outputs=False``, for nnU-Net's downsampled targets).

Stage features (``F_k``, deepest first, the order of the official code and of the feedback): ``F_0`` the
(gated, for decoder 2) bottleneck, ``F_1..F_4`` the upsampled maps BEFORE the skip is added (8f at 1/8 ..
f at full resolution). The discrepancy ``e_k = scale * (F2_k - F1_k)`` (:func:`discrepancy_feedback`,
``scale = 1e-3``, detached) is added on the next pass to the encoder stage output of the same size
(``e_0`` to the bottleneck, ``e_4`` to the full-resolution stage), before the bottleneck dropout.

Parameter counts (``input_channels=1, num_classes=2``): 12,348,718 for training (encoder, both decoders,
side outputs) and 9,448,866 for inference (encoder + decoder 1, ``inference=True``; 9,449,868 with
``deep_supervision=True``, which keeps the side convolutions).

Shapes (input ``x``: ``(B, input_channels, D, H, W)`` with D, H, W divisible by 16):

* ``inference=False``: ``forward(x, feedback=None)`` returns :class:`LeFeDOutput` with ``seg1`` and
  ``seg2`` ``(B, num_classes, D, H, W)``, ``side1`` (the 5 side outputs, full resolution first, empty when
  ``deep_supervision`` is False), ``features1``/``features2`` (5 tensors each, deepest first).
* ``inference=True``: ``forward(x)`` returns decoder 1's logits ``(B, num_classes, D, H, W)`` (or the list
  ``[seg1, *side1]`` when ``deep_supervision``), what nnU-Net's predictor expects; its state dict is the
  training network's without ``decoder2.*`` (see :func:`inference_state_dict`).

Where the released code deviates (it does not run as released):

* ``LeFeD_Net.__init__`` calls ``super(MCNet3d_v2, self)`` (NameError) and ``train.py`` imports
  ``MCNet3d_v2`` (absent) and uses an undefined ``Pancreas`` dataset; we build the network the training
  script evidently means (``LeFeD_Net`` with ``normalization='batchnorm', has_dropout=True``).
* ``SideConv`` hard-codes 256..16 input channels (only ``n_filters=16`` works); ours follows ``n_filters``.
* ``Decoder`` has an unused branch gating by both decoders' features (0.5 (w1 + w2)); not reproduced.
* Deep supervision: the paper weights side outputs 0.8, 0.6, 0.4, 0.2, 0.1 (full resolution ..
  bottleneck); the official training script takes their plain mean. :func:`deep_supervision_weights`
  gives both (``official_mean=True``: 1/5 each); the network is the same either way.
* The official script computes a consistency ramp-up weight but never uses it (MSE weight 1).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_plugins.architectures.contract import (DecoderDeepSupervision, PlansNetwork, network_name,
                                                   resolve_arch_kwargs, total_stride)
from nnunet_plugins.architectures.blocks.vnet import (VNET_ENCODER_CONVS, VNetEncoder, vnet_conv_stage, vnet_norm,
                                                      vnet_norm_kind)

#: conv layers per decoder stage (1/8 .. full resolution)
DECODER_CONVS = (3, 3, 2, 1)
#: the paper's deep-supervision weights, full resolution .. bottleneck
PAPER_DS_WEIGHTS = (0.8, 0.6, 0.4, 0.2, 0.1)
FEEDBACK_SCALE = 1e-3


def deep_supervision_weights(official_mean: bool = False) -> tuple:
    """Weights of decoder 1's side outputs (full resolution first): the paper's 0.8 .. 0.1, or with
    ``official_mean=True`` the released training script's plain mean (1/5 each)."""
    n = len(PAPER_DS_WEIGHTS)
    return tuple([1.0 / n] * n) if official_mean else PAPER_DS_WEIGHTS


class LeFeDDecoder(nn.Module):
    """V-Net decoder: ``transposed`` upsampling (decoder 1) or trilinear + conv (decoder 2)."""

    def __init__(self, num_classes: int, n_filters: int, norm: str, has_dropout: bool, transposed: bool):
        super().__init__()
        widths = [n_filters * 2 ** i for i in range(len(VNET_ENCODER_CONVS))][::-1]  # bottleneck .. full
        ups = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            if transposed:
                up = [nn.ConvTranspose3d(cin, cout, 2, stride=2)]
            else:
                up = [nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True),
                      nn.Conv3d(cin, cout, 3, padding=1)]
            ups.append(nn.Sequential(*up, vnet_norm(norm, cout), nn.ReLU(inplace=True)))
        self.ups = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(vnet_conv_stage(n, c, c, norm) for n, c in zip(DECODER_CONVS, widths[1:]))
        self.dropout = nn.Dropout3d(p=0.5) if has_dropout else nn.Identity()
        self.seg_head = nn.Conv3d(n_filters, num_classes, 1)

    def forward(self, skips: Sequence[torch.Tensor], gate_features: Optional[Sequence[torch.Tensor]] = None):
        """``skips``: encoder outputs full resolution .. bottleneck. ``gate_features``: decoder 1's stage
        features (deepest first) to gate by, or None. Returns (logits, stage features deepest first)."""
        x = skips[-1]
        gates = None
        if gate_features is not None:
            # detached: decoder 2 must not train decoder 1 through the gate (official: w.detach())
            gates = [torch.sigmoid(f).detach() for f in gate_features]
            x = x + x * gates[0]
        features = [x]
        for k, (up, block) in enumerate(zip(self.ups, self.blocks)):
            u = up(x)
            skip = skips[-2 - k]
            features.append(u)
            x = block(u + (skip * gates[k + 1] if gates is not None else skip))
        return self.seg_head(self.dropout(x)), features


class LeFeDOutput(NamedTuple):
    seg1: torch.Tensor              # decoder 1 logits, full resolution
    seg2: torch.Tensor              # decoder 2 logits, full resolution
    side1: List[torch.Tensor]       # decoder 1 side outputs, full resolution first ([] without deep supervision)
    features1: List[torch.Tensor]   # decoder 1 stage features, deepest first
    features2: List[torch.Tensor]   # decoder 2 stage features, deepest first


def discrepancy_feedback(f1_list: Sequence[torch.Tensor], f2_list: Sequence[torch.Tensor],
                         scale: float = FEEDBACK_SCALE) -> List[torch.Tensor]:
    """LeFeD's feedback ``e_k = scale * (F2_k - F1_k)``, detached (it carries no gradient)."""
    if len(f1_list) != len(f2_list):
        raise ValueError(f"both decoders must give the same number of stage features, got {len(f1_list)} "
                         f"and {len(f2_list)}")
    out = []
    for k, (f1, f2) in enumerate(zip(f1_list, f2_list)):
        if f1.shape != f2.shape:
            raise ValueError(f"stage {k}: decoder features differ in shape, {tuple(f1.shape)} vs {tuple(f2.shape)}")
        out.append(scale * (f2.detach() - f1.detach()))
    return out


class LeFeDVNet(PlansNetwork, nn.Module):
    """LeFeD's official V-Net (see the module docstring for the paper, layout, shapes and counts).

    Args:
        input_channels, num_classes: as nnU-Net's networks.
        n_filters: features of the first stage (16 official).
        normalization: ``batch`` (official), ``instance``, ``group`` or ``none``.
        has_dropout: Dropout3d 0.3 on the bottleneck and 0.5 before each output convolution (official
            training uses it; ``eval()`` switches it off).
        deep_supervision: return decoder 1's side outputs (default: True for training, False for inference).
        upsample_side_outputs: side outputs at full resolution (official) or at their stage's resolution.
        inference: build encoder + decoder 1 only (with ``side`` when ``deep_supervision``).
        nnunet_outputs: ``forward(x)`` returns decoder 1's output as nnU-Net's networks do (``[seg1, *side1]``
            with deep supervision, else ``seg1``) and ``forward(x, feedback, both=True)`` the
            :class:`LeFeDOutput`; set by :meth:`from_plans` (``LeFeDTrainer`` on plans naming this class).
            False (default): ``forward(x, feedback)`` of the training network returns :class:`LeFeDOutput`.

    From plans (``architecture.network_class_name`` = this class, ``arch_kwargs`` any of the arguments above
    except channels, classes, deep supervision and inference): side outputs stay at their own resolution
    (``upsample_side_outputs=False`` unless the plans say otherwise) so that nnU-Net's downsampled
    deep-supervision targets fit (scales 1, 1, 1/2, .. 1/16 for ``[seg1, *side1]``); nnU-Net's predictor
    (deep supervision off) builds the inference network, whose ``load_state_dict`` drops the training-only
    ``decoder2.*`` / ``side.*`` entries of a checkpoint (strict otherwise). Patch axes: multiples of 16.
    """

    spatial_dims = (3,)
    context_kwargs = ("input_channels", "num_classes", "deep_supervision", "inference", "nnunet_outputs")
    #: decoder level of the first side output (0 = full resolution), for LeFeD's deep-supervision weights
    first_side_level = 0

    def __init__(self, input_channels: int = 1, num_classes: int = 2, n_filters: int = 16,
                 normalization: str = "batch", has_dropout: bool = True, deep_supervision: Optional[bool] = None,
                 upsample_side_outputs: bool = True, inference: bool = False, nnunet_outputs: bool = False):
        super().__init__()
        self.nnunet_outputs = nnunet_outputs
        if deep_supervision is None:  # side outputs are a training device: on for training, off for inference
            deep_supervision = not inference
        self.inference = inference
        self.deep_supervision = deep_supervision
        self.upsample_side_outputs = upsample_side_outputs
        # official Encoder: the V-Net encoder, Dropout3d(0.3) on the bottleneck when has_dropout
        self.encoder = VNetEncoder(input_channels, n_filters, normalization, 0.3 if has_dropout else None)
        self.decoder1 = LeFeDDecoder(num_classes, n_filters, normalization, has_dropout, transposed=True)
        self.decoder2 = None if inference else LeFeDDecoder(num_classes, n_filters, normalization, has_dropout,
                                                            transposed=False)
        # side convolutions on decoder 1's stage features, full resolution first (bottleneck last)
        widths = [n_filters * 2 ** i for i in range(len(VNET_ENCODER_CONVS))]
        self.side = None if (inference and not deep_supervision) else \
            nn.ModuleList(nn.Conv3d(w, num_classes, 1) for w in widths)

    def side_outputs(self, features1: Sequence[torch.Tensor], size) -> List[torch.Tensor]:
        outs = []
        for conv, f in zip(self.side, list(features1)[::-1]):
            o = conv(f)
            if self.upsample_side_outputs and o.shape[2:] != tuple(size):
                o = F.interpolate(o, size=tuple(size), mode="trilinear", align_corners=True)
            outs.append(o)
        return outs

    def forward(self, x: torch.Tensor, feedback: Optional[Sequence[torch.Tensor]] = None, both: bool = False):
        skips = self.encoder(x, feedback)
        seg1, features1 = self.decoder1(skips)
        side1 = self.side_outputs(features1, x.shape[2:]) if self.deep_supervision else []
        if self.inference or (self.nnunet_outputs and not both):
            if both:
                raise RuntimeError("this LeFeDVNet is an inference network (encoder + decoder 1): it has no decoder 2")
            return [seg1, *side1] if self.deep_supervision else seg1
        seg2, features2 = self.decoder2(skips, gate_features=features1)
        return LeFeDOutput(seg1, seg2, side1, features1, features2)

    # ---- nnU-Net contract (plans naming this class) ----------------------------------------------------
    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        return {"upsample_side_outputs": False, **cls.arch_kwargs_from_plans(configuration_manager)}

    @classmethod
    def from_plans(cls, plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **extra):
        # nnU-Net's predictor builds networks without deep supervision: that is the inference network
        extra = {"inference": not deep_supervision, "nnunet_outputs": True, **extra}
        return super().from_plans(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                  deep_supervision, **extra)

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple:
        return (2 ** (len(VNET_ENCODER_CONVS) - 1),) * dim

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager) -> list:
        """Scales of ``[seg1, *side1]`` (the side outputs full resolution .. bottleneck)."""
        dim = len(configuration_manager.patch_size)
        upsampled = cls.kwargs_from_plans(configuration_manager)["upsample_side_outputs"]
        sides = [[1.0] * dim if upsampled else [0.5 ** i] * dim for i in range(len(VNET_ENCODER_CONVS))]
        return [[1.0] * dim] + sides

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Conv outputs for one sample (every convolution and transposed convolution once; a dry run)."""
        counts = []
        hooks = [m.register_forward_hook(lambda m, i, o: counts.append(o[0].numel()))
                 for m in self.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
        training = self.training
        try:
            with torch.no_grad():
                self.eval()(torch.zeros(1, self.encoder.stages[0][0].in_channels, *input_size), both=not self.inference)
        finally:
            self.train(training)
            for h in hooks:
                h.remove()
        return int(sum(counts))

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        if self.inference:   # a training checkpoint: decoder 2 (and side outputs) are not in the inference network
            state_dict = inference_state_dict(state_dict, keep_side=self.side is not None)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def build_inference_network(self, deep_supervision: bool = False) -> "LeFeDVNet":
        """A network of encoder + decoder 1 (+ side outputs with ``deep_supervision``) with this one's weights."""
        enc = self.encoder
        net = LeFeDVNet(input_channels=enc.stages[0][0].in_channels, num_classes=self.decoder1.seg_head.out_channels,
                        n_filters=enc.widths[0], normalization=vnet_norm_kind(enc.stages[0][1]),
                        has_dropout=isinstance(enc.dropout, nn.Dropout3d), deep_supervision=deep_supervision,
                        upsample_side_outputs=self.upsample_side_outputs, inference=True)
        net.load_state_dict(inference_state_dict(self.state_dict(), keep_side=deep_supervision), strict=True)
        return net


def inference_state_dict(state_dict: dict, keep_side: bool = False) -> dict:
    """A training state dict reduced to what ``LeFeDVNet(..., inference=True)`` holds (no ``decoder2.*``;
    no ``side.*`` unless ``keep_side``)."""
    drop = ("decoder2.",) if keep_side else ("decoder2.", "side.")
    return {k: v for k, v in state_dict.items() if not k.startswith(drop)}


# ---------------------------------------------------------------------------------------------------------
# LeFeD on nnU-Net's plans U-Net
# ---------------------------------------------------------------------------------------------------------
class InterpolateConv(nn.Module):
    """Decoder 2's upsampling: (bi/tri)linear interpolation to the skip's size (``align_corners=True`` as the
    official ``nn.Upsample``), then conv + norm + nonlinearity (``ConvDropoutNormReLU`` of the plans' ops)."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        return self.conv(F.interpolate(x, size=tuple(size), mode=mode, align_corners=True))


class LeFeDUNetDecoder2(nn.Module):
    """LeFeD's second decoder on a plans U-Net encoder: the stages of nnU-Net's ``UNetDecoder`` (concatenation
    with the skip, ``n_conv_per_stage`` convs with the skip stage's kernel), upsampling by interpolation + conv
    instead of a transposed convolution, one output at full resolution (no deep supervision)."""

    def __init__(self, encoder: nn.Module, num_classes: int, n_conv_per_stage: Sequence[int],
                 nonlin_first: bool = False):
        from dynamic_network_architectures.building_blocks.simple_conv_blocks import (ConvDropoutNormReLU,
                                                                                      StackedConvBlocks)
        super().__init__()
        ops = dict(conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                   dropout_op=encoder.dropout_op, dropout_op_kwargs=encoder.dropout_op_kwargs,
                   nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs)
        channels, kernels = list(encoder.output_channels), list(encoder.kernel_sizes)
        ups, stages = [], []
        for s in range(1, len(channels)):
            below, skip, kernel = channels[-s], channels[-(s + 1)], kernels[-(s + 1)]
            ups.append(InterpolateConv(ConvDropoutNormReLU(encoder.conv_op, below, skip, kernel, 1, **ops,
                                                           nonlin_first=nonlin_first)))
            stages.append(StackedConvBlocks(n_conv_per_stage[s - 1], encoder.conv_op, 2 * skip, skip, kernel, 1,
                                            **ops, nonlin_first=nonlin_first))
        self.ups = nn.ModuleList(ups)
        self.stages = nn.ModuleList(stages)
        self.seg_head = encoder.conv_op(channels[0], num_classes, 1, 1, 0, bias=True)

    def forward(self, skips: Sequence[torch.Tensor], gate_features: Sequence[torch.Tensor]):
        """``skips``: encoder outputs (full resolution .. bottleneck); ``gate_features``: decoder 1's stage
        features, deepest first. Returns (logits, stage features deepest first)."""
        # detached: decoder 2 must not train decoder 1 through the gate (official: w.detach())
        gates = [torch.sigmoid(f).detach() for f in gate_features]
        x = skips[-1] + skips[-1] * gates[0]
        features = [x]
        for s, (up, stage) in enumerate(zip(self.ups, self.stages)):
            skip = skips[-(s + 2)]
            u = up(x, skip.shape[2:])
            features.append(u)
            x = stage(torch.cat((u, skip + skip * gates[s + 1]), 1))
        return self.seg_head(x), features

    def compute_conv_feature_map_size(self, skip_sizes: Sequence[Sequence[int]]) -> int:
        """Conv outputs for skips of spatial sizes ``skip_sizes`` (full resolution first)."""
        from nnunet_plugins.architectures.contract import conv_output_size

        total = 0
        for s, (up, stage) in enumerate(zip(self.ups, self.stages)):
            size = skip_sizes[-(s + 2)]
            total += up.conv.compute_conv_feature_map_size(size) + stage.compute_conv_feature_map_size(size)
        return int(total + conv_output_size(self.seg_head.out_channels, skip_sizes[0]))


class LeFeDUNet(DecoderDeepSupervision, PlansNetwork, nn.Module):
    """LeFeD (Zeng, Xie, Lu et al., "Discrepancy Matters", IEEE TMI 2025) on nnU-Net's plain U-Net.

    The paper's idea on the plans' backbone (the official code is a V-Net, :class:`LeFeDVNet`):

    * ``encoder``: ``PlainConvEncoder`` of the plans (``PlainConvUNet`` arguments);
    * ``decoder`` (decoder 1, used for inference): nnU-Net's ``UNetDecoder`` (transposed-convolution
      upsampling, deep-supervision outputs), so encoder + decoder 1 is ``PlainConvUNet`` tensor for tensor
      (same state-dict names);
    * ``decoder2`` (:class:`LeFeDUNetDecoder2`, training only): interpolation + conv upsampling, gated by
      decoder 1's stage features (detached sigmoid): bottleneck ``x <- x + x * sigmoid(F1_0)``, each skip
      ``skip <- skip + skip * sigmoid(F1_k)`` before the concatenation (the paper's residual gate; the
      V-Net adds the gated skip instead, as its decoder adds rather than concatenates skips).

    Stage features ``F_k`` (deepest first, as :class:`LeFeDVNet`): ``F_0`` the decoder's (gated, decoder 2)
    bottleneck, ``F_k`` the upsampled map of decoder stage ``k`` before the skip joins (transposed-conv
    output for decoder 1), with the channels and size of encoder stage ``n_stages - 1 - k``. The feedback
    ``e_k`` (:func:`discrepancy_feedback`) is added to that encoder stage's output on the next pass.

    Args: those of ``dynamic_network_architectures.architectures.unet.PlainConvUNet`` (``input_channels``,
    ``n_stages``, ``features_per_stage``, ``conv_op``, ``kernel_sizes``, ``strides``, ``n_conv_per_stage``,
    ``num_classes``, ``n_conv_per_stage_decoder``, ``conv_bias``, ``norm_op(_kwargs)``, ``dropout_op(_kwargs)``,
    ``nonlin(_kwargs)``, ``deep_supervision``, ``nonlin_first``) plus ``inference`` (default: ``not
    deep_supervision``, as nnU-Net's predictor builds networks without deep supervision): build encoder +
    decoder 1 only. The inference network's ``load_state_dict`` takes a training checkpoint (its
    ``decoder2.*`` entries are dropped; every inference parameter must be present, strict).

    Shapes (input ``x``: ``(B, input_channels, *spatial)``, spatial axes multiples of the total stride):

    * ``forward(x)``: decoder 1's output as ``PlainConvUNet``'s: list of logits highest resolution first
      (``(B, num_classes, *spatial)``, ``(B, num_classes, *spatial / stride_1)``, ...) with deep supervision,
      else one tensor ``(B, num_classes, *spatial)`` (nnU-Net's validation and predictor call this);
    * ``forward(x, feedback=e, both=True)`` (training network): :class:`LeFeDOutput` with ``seg1`` / ``seg2``
      ``(B, num_classes, *spatial)``, ``side1`` decoder 1's lower-resolution deep-supervision outputs (so
      ``[seg1, *side1]`` is nnU-Net's list), ``features1`` / ``features2`` (``n_stages`` tensors each).

    Parameter counts (1 input channel, 2 classes, nnU-Net 3d_fullres plans of 6 stages, 32..320 features,
    3x3x3 kernels): see ``tests/architectures/test_lefed_unet.py`` (decoder 2 adds about as many parameters as
    decoder 1; the inference network has exactly ``PlainConvUNet``'s).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage, conv_op, kernel_sizes, strides,
                 n_conv_per_stage, num_classes: int, n_conv_per_stage_decoder, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict = None, dropout_op=None, dropout_op_kwargs: dict = None,
                 nonlin=None, nonlin_kwargs: dict = None, deep_supervision: bool = False, nonlin_first: bool = False,
                 inference: Optional[bool] = None):
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
        super().__init__()
        # PlainConvEncoder / UNetDecoder expand and check the conv counts; decoder 2 takes UNetDecoder's list
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n_stages - 1)
        self.inference = (not deep_supervision) if inference is None else bool(inference)
        self.encoder = PlainConvEncoder(input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides,
                                        n_conv_per_stage, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                        dropout_op_kwargs, nonlin, nonlin_kwargs, return_skips=True,
                                        nonlin_first=nonlin_first)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision,
                                   nonlin_first=nonlin_first)
        self.decoder2 = None if self.inference else \
            LeFeDUNetDecoder2(self.encoder, num_classes, n_conv_per_stage_decoder, nonlin_first)

    # ---- nnU-Net contract -------------------------------------------------------------------------
    # plans naming LeFeDVNet build the official V-Net instead (every contract question goes to it)
    first_side_level = 1

    @classmethod
    def class_for_plans(cls, configuration_manager) -> type:
        name = configuration_manager.network_arch_class_name
        if name == network_name(cls) or name.rpartition(".")[2] == "PlainConvUNet":
            return cls
        if name == network_name(LeFeDVNet):
            return LeFeDVNet
        raise ValueError(f"LeFeD needs plans with nnU-Net's plain U-Net (PlainConvUNet), {network_name(cls)} or "
                         f"{network_name(LeFeDVNet)}, but the plans name {name!r}; plan with "
                         f"nnUNetv2_plan_experiment (default planner)")

    @classmethod
    def _vnet(cls, configuration_manager):
        return cls.class_for_plans(configuration_manager) is LeFeDVNet

    @classmethod
    def kwargs_from_plans(cls, configuration_manager) -> dict:
        """The plans' ``PlainConvUNet`` arguments (LeFeD adds no argument of its own)."""
        if cls._vnet(configuration_manager):
            return LeFeDVNet.kwargs_from_plans(configuration_manager)
        return resolve_arch_kwargs(configuration_manager)

    @classmethod
    def check_plans(cls, configuration_manager, configuration: str = "") -> None:
        (LeFeDVNet if cls._vnet(configuration_manager) else super()).check_plans(configuration_manager, configuration)

    @classmethod
    def from_plans(cls, plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                   deep_supervision: bool = True, **extra):
        if cls._vnet(configuration_manager):
            return LeFeDVNet.from_plans(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                        deep_supervision, **extra)
        return super().from_plans(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                  deep_supervision, **extra)

    @classmethod
    def plans_divisor(cls, configuration_manager) -> tuple:
        if cls._vnet(configuration_manager):
            return LeFeDVNet.plans_divisor(configuration_manager)
        return super().plans_divisor(configuration_manager)

    @classmethod
    def plans_deep_supervision_scales(cls, configuration_manager):
        if cls._vnet(configuration_manager):
            return LeFeDVNet.plans_deep_supervision_scales(configuration_manager)
        return super().plans_deep_supervision_scales(configuration_manager)

    @classmethod
    def divisor_for(cls, kwargs: dict, dim: int) -> tuple:
        return total_stride(kwargs["strides"], dim)

    @staticmethod
    def initialize(module):
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        InitWeights_He(1e-2)(module)   # as PlainConvUNet

    def encode(self, x: torch.Tensor, feedback: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Encoder stage outputs (full resolution .. bottleneck); ``feedback`` (deepest first) is added to the
        stage output of matching size before it goes on to the next stage and the decoders."""
        stages = list(self.encoder.stages)
        if feedback is not None and len(feedback) != len(stages):
            raise ValueError(f"feedback needs {len(stages)} tensors (one per encoder stage), got {len(feedback)}")
        skips = []
        for s, stage in enumerate(stages):
            x = stage(x)
            if feedback is not None:
                x = x + feedback[len(stages) - 1 - s].to(x.dtype)
            skips.append(x)
        return skips

    def decode1(self, skips: Sequence[torch.Tensor], all_outputs: bool):
        """Decoder 1 (``UNetDecoder``'s computation, keeping its stage features). Returns (outputs highest
        resolution first, stage features deepest first)."""
        dec = self.decoder
        x, features, outputs = skips[-1], [skips[-1]], []
        n = len(dec.stages)
        for s in range(n):
            u = dec.transpconvs[s](x)
            features.append(u)
            x = dec.stages[s](torch.cat((u, skips[-(s + 2)]), 1))
            if all_outputs or s == n - 1:
                outputs.append(dec.seg_layers[s](x))
        return outputs[::-1], features

    def forward(self, x: torch.Tensor, feedback: Optional[Sequence[torch.Tensor]] = None, both: bool = False):
        skips = self.encode(x, feedback)
        outputs, features1 = self.decode1(skips, self.deep_supervision)
        if not both:
            return outputs if self.deep_supervision else outputs[0]
        if self.decoder2 is None:
            raise RuntimeError("this LeFeDUNet is an inference network (encoder + decoder 1): it has no decoder 2")
        seg2, features2 = self.decoder2(skips, features1)
        return LeFeDOutput(outputs[0], seg2, outputs[1:], features1, features2)

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        if self.inference:   # a training checkpoint: its decoder 2 is not part of the inference network
            state_dict = inference_state_dict(state_dict, keep_side=True)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def compute_conv_feature_map_size(self, input_size) -> int:
        total = int(self.encoder.compute_conv_feature_map_size(input_size)
                    + self.decoder.compute_conv_feature_map_size(input_size))
        if self.decoder2 is not None:
            sizes, size = [], list(input_size)
            for stride in self.encoder.strides:
                size = [i // j for i, j in zip(size, stride)]
                sizes.append(size)
            total += self.decoder2.compute_conv_feature_map_size(sizes)
        return total
