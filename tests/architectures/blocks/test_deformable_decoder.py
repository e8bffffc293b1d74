"""Deformable decoder layer, residual scale and sine-encoding offset of the shared attention module."""
import math

import pytest
import torch

from nnunet_plugins.architectures.blocks.deformable_attention import (
    DeformableDecoderLayer3D, DeformableEncoderLayer3D, DeformableTransformerEncoder3D, flatten_levels,
    sine_position_encoding_3d,
)

SHAPES = [(4, 6, 6), (2, 3, 3)]


def _memory(n=2, c=12, seed=0):
    torch.manual_seed(seed)
    feats = [torch.randn(n, c, *s) for s in SHAPES]
    return flatten_levels(feats)


def _manual_decoder(layer, tgt, pos, ref, memory, shapes, a):
    """The layer's computation written out from its parts (post-norm, dropout off)."""
    q = tgt + pos
    h = layer.norm1(a * tgt + layer.self_attn(q, q, tgt, need_weights=False)[0])
    h = layer.norm2(a * h + layer.cross_attn(h + pos, ref, memory, shapes))
    ffn = layer.linear2(torch.relu(layer.linear1(h)))
    return layer.norm3(a * h + ffn)


@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_decoder_layer_equals_its_definition(scale):
    memory, shapes = _memory()
    layer = DeformableDecoderLayer3D(12, 20, dropout=0.0, n_levels=2, n_heads=3, n_points=2,
                                     residual_scale=scale).eval()
    torch.manual_seed(1)
    tgt, pos = torch.randn(2, 5, 12), torch.randn(1, 5, 12).expand(2, -1, -1)
    ref = torch.rand(2, 5, 3)
    out = layer(tgt, pos, ref, memory, shapes)
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, _manual_decoder(layer, tgt, pos, ref, memory, shapes, scale))
    # per-level reference points (N, Lq, L, 3) with equal levels give the same result
    torch.testing.assert_close(layer(tgt, pos, ref[:, :, None].expand(2, 5, 2, 3), memory, shapes), out)


def test_decoder_layer_gradients_and_query_interaction():
    memory, shapes = _memory()
    memory.requires_grad_(True)
    layer = DeformableDecoderLayer3D(12, 20, dropout=0.0, n_levels=2, n_heads=3, n_points=2)
    tgt = torch.randn(2, 4, 12, requires_grad=True)
    out = layer(tgt, None, torch.rand(2, 4, 3), memory, shapes)
    out[:, 0].sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert memory.grad.abs().sum() > 0
    # query 0's output depends on the other queries (self-attention), never on the other sample
    assert tgt.grad[:, 1:].abs().sum() > 0
    layer.zero_grad()
    tgt.grad = None
    layer(tgt, None, torch.rand(2, 4, 3), memory, shapes)[0].sum().backward()
    assert tgt.grad[1].abs().sum() == 0


def test_decoder_layer_errors():
    memory, shapes = _memory()
    layer = DeformableDecoderLayer3D(12, 20, n_levels=2, n_heads=3)
    with pytest.raises(ValueError, match="must agree"):
        layer(torch.randn(2, 4, 8), None, torch.rand(2, 4, 3), memory, shapes)
    with pytest.raises(ValueError, match="activation"):
        DeformableDecoderLayer3D(12, activation="tanh")


def test_encoder_residual_scale():
    memory, shapes = _memory()
    torch.manual_seed(0)
    layer = DeformableEncoderLayer3D(12, 20, dropout=0.0, activation="relu", n_levels=2, n_heads=3, n_points=2,
                                     residual_scale=1.5).eval()
    ref = torch.rand(1, memory.shape[1], 3)
    a = layer.norm1(1.5 * memory + layer.self_attn(memory, ref, memory, shapes))
    expected = layer.norm2(1.5 * a + layer.linear2(torch.relu(layer.linear1(a))))
    torch.testing.assert_close(layer(memory, None, ref, shapes), expected)
    stack = DeformableTransformerEncoder3D(12, 3, 2, 20, n_levels=2, residual_scale=2.0, position_offset=1.0)
    assert all(layer.residual_scale == 2.0 for layer in stack.layers)


def test_sine_encoding_offset():
    pe = sine_position_encoding_3d((3, 4, 5), 12, offset=1.0)
    default = sine_position_encoding_3d((3, 4, 5), 12)
    # depth channel 0: sin((d + offset) / (3 + 1e-6) * 2 pi); width channel 9 (cos, frequency 1)
    for d in range(3):
        assert pe[0, d, 0, 0].item() == pytest.approx(math.sin((d + 1.0) / (3 + 1e-6) * 2 * math.pi), abs=1e-5)
        assert default[0, d, 0, 0].item() == pytest.approx(math.sin((d + 0.5) / (3 + 1e-6) * 2 * math.pi), abs=1e-5)
    for w in range(5):
        assert pe[9, 0, 0, w].item() == pytest.approx(math.cos((w + 1.0) / (5 + 1e-6) * 2 * math.pi), abs=1e-5)
