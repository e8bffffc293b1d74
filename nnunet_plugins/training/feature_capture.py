"""Read a network's intermediate features without editing the network: the inputs of chosen modules.

MedSeqFT needs the U-Net decoder's last features (the input of dynamic-network-architectures'
``decoder.seg_layers[-1]``) twice: the masked-reconstruction head runs on them, and the features-MSE
distillation compares them between student and teacher. A forward PRE-hook on the module that consumes
them captures them for every network that routes its features through a module, whatever its forward
looks like, and works unchanged after :func:`~nnunet_plugins.architectures.blocks.lora.add_lora` wraps that
module (the LoRA wrapper calls the original layer with the same input).

The hooks live only inside the ``with`` block, so the network holds no reference to activations (and
their autograd graph) afterwards and a saved / exported network carries no hook.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List

from torch import Tensor, nn

__all__ = ["capture_inputs", "final_decoder_features_module"]


@contextmanager
def capture_inputs(*modules: nn.Module) -> Iterator[List[Tensor | None]]:
    """Yield a list whose entry ``i`` is the first positional input of ``modules[i]``'s most recent call
    inside the block (``None`` until it is called). Gradients flow through the captured tensors."""
    captured: List[Tensor | None] = [None] * len(modules)

    def hook(i):
        def _store(_module, args):
            captured[i] = args[0]
        return _store

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def final_decoder_features_module(network: nn.Module) -> nn.Module:
    """The module whose input is the U-Net's full-resolution decoder features: ``decoder.seg_layers[-1]``
    of dynamic-network-architectures' ``UNetDecoder`` (PlainConvUNet, ResidualEncoderUNet, and the
    plugins' U-Nets built on it). It is called once per forward pass, with or without deep supervision."""
    seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if not isinstance(seg_layers, nn.ModuleList) or len(seg_layers) == 0:
        raise ValueError(f"{type(network).__name__} has no decoder.seg_layers (dynamic-network-architectures' "
                         f"UNetDecoder); pass the module whose input holds the final decoder features")
    return seg_layers[-1]
