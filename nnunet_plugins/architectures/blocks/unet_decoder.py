"""nnU-Net's U-Net decoder in either of its two layouts: nnU-Net v2's ``UNetDecoder`` or nnU-Net v1's.

The official BA-Net and UniSeg code build on nnU-Net v1's ``Generic_UNet``, whose decoder differs from
nnU-Net v2's ``UNetDecoder`` (dynamic-network-architectures) in two details:

* decoder stage ``s`` (1-based from the bottleneck) convolves with the kernel of the encoder stage BELOW
  the skip, ``conv_kernel_sizes[-s]``, where v2 uses the skip's own stage, ``kernel_sizes[-(s + 1)]``
  (the layouts differ only for anisotropic kernels);
* the transposed convolutions and the 1x1 segmentation outputs have no bias (v1's
  ``seg_output_use_bias=False``).

:func:`unet_decoder` builds a ``UNetDecoder`` in either layout, so the module tree and the state-dict
names are those of ``UNetDecoder`` in both (``stages``, ``transpconvs``, ``seg_layers``).
"""
from __future__ import annotations

from types import SimpleNamespace

from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

__all__ = ["unet_decoder", "v1_decoder_view"]


def v1_decoder_view(encoder: nn.Module) -> SimpleNamespace:
    """What ``UNetDecoder`` reads from an encoder, with nnU-Net v1's decoder kernels.

    ``UNetDecoder`` stage ``s`` reads ``kernel_sizes[-(s + 1)]``; shifting the list by one makes it read
    v1's ``kernel_sizes[-s]``. A plain namespace (not a module), so the decoder registers no encoder copy.
    """
    kernels = list(encoder.kernel_sizes)
    return SimpleNamespace(
        output_channels=encoder.output_channels, strides=encoder.strides, conv_op=encoder.conv_op,
        conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
        dropout_op=encoder.dropout_op, dropout_op_kwargs=encoder.dropout_op_kwargs, nonlin=encoder.nonlin,
        nonlin_kwargs=encoder.nonlin_kwargs, kernel_sizes=kernels[1:] + kernels[-1:])


def drop_bias(conv: nn.Module) -> None:
    """Remove a convolution's bias (``nn.Module.__setattr__`` keeps 'bias' registered as an absent parameter)."""
    conv.bias = None


def unet_decoder(encoder: nn.Module, num_classes: int, n_conv_per_stage, deep_supervision: bool,
                 nonlin_first: bool = False, official_v1_layout: bool = False,
                 register_encoder: bool = True) -> UNetDecoder:
    """A ``UNetDecoder`` over ``encoder``'s skips; ``official_v1_layout``: nnU-Net v1's layout (see the module
    docstring), else nnU-Net v2's.

    ``register_encoder``: the decoder keeps the encoder as a submodule, as d-n-a's ``UNetDecoder`` does (its
    state dict then repeats the encoder under ``decoder.encoder.*``, as every nnU-Net v2 checkpoint does);
    False (v1 layout only) keeps a plain description of it (the official BA-Net checkpoint layout has no such
    copy).
    """
    source = v1_decoder_view(encoder) if official_v1_layout else encoder
    decoder = UNetDecoder(source, num_classes, n_conv_per_stage, deep_supervision, nonlin_first=nonlin_first)
    if official_v1_layout:
        for m in list(decoder.transpconvs) + list(decoder.seg_layers):
            drop_bias(m)
    if register_encoder and official_v1_layout:
        decoder.encoder = encoder   # the kernels are already built; the real encoder joins the module tree
    return decoder
