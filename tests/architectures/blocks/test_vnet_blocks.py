"""V-Net encoder blocks: parameter count by hand, shapes, norms, feedback checks."""
import pytest
import torch

from nnunet_plugins.architectures.blocks.vnet import VNetEncoder, vnet_norm, vnet_norm_kind


def hand_count(cin, f, bn=True):
    widths = [f * 2 ** i for i in range(5)]
    norm = 2 if bn else 0
    total = 0
    for i, (w, n) in enumerate(zip(widths, (1, 2, 3, 3, 3))):
        c = cin if i == 0 else w  # the downsampling before stage i already doubles the width
        for _ in range(n):
            total += c * w * 27 + w + norm * w
            c = w
    for a, b in zip(widths[:-1], widths[1:]):
        total += a * b * 8 + b + norm * b
    return total


@pytest.mark.parametrize("cin,f,norm", [(1, 16, "batch"), (2, 8, "instance"), (1, 4, "none")])
def test_count_and_shapes(cin, f, norm):
    enc = VNetEncoder(cin, f, norm, dropout=0.3).eval()
    assert sum(p.numel() for p in enc.parameters()) == hand_count(cin, f, bn=norm == "batch")
    outs = enc(torch.randn(1, cin, 16, 32, 48))
    assert [tuple(o.shape) for o in outs] == [(1, f * 2 ** i, 16 // 2 ** i, 32 // 2 ** i, 48 // 2 ** i) for i in range(5)]
    assert vnet_norm_kind(enc.stages[0][1]) == norm


def test_bad_norm_and_feedback():
    with pytest.raises(ValueError, match="normalization"):
        vnet_norm("layer", 4)
    enc = VNetEncoder(1, 4)
    with pytest.raises(ValueError, match="5 tensors"):
        enc(torch.randn(1, 1, 16, 16, 16), [torch.zeros(1)])


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_2d_encoder_same_count_as_hand_with_2d_kernels(norm):
    enc = VNetEncoder(2, 4, norm, dropout=0.5, dim=2).eval()
    assert all(not isinstance(m, torch.nn.Conv3d) for m in enc.modules())
    # 2-D: 3x3 kernels (9 weights) and 2x2 downsampling (4 weights) instead of 27 and 8
    widths = [4 * 2 ** i for i in range(5)]
    nrm = 2 if norm == "batch" else 0
    total = 0
    for i, (w, n) in enumerate(zip(widths, (1, 2, 3, 3, 3))):
        c = 2 if i == 0 else w  # the downsampling before stage i already doubles the width
        for _ in range(n):
            total += c * w * 9 + w + nrm * w
            c = w
    total += sum(a * b * 4 + b + nrm * b for a, b in zip(widths[:-1], widths[1:]))
    assert sum(p.numel() for p in enc.parameters()) == total
    outs = enc(torch.randn(1, 2, 32, 48))
    assert [tuple(o.shape) for o in outs] == [(1, 4 * 2 ** i, 32 // 2 ** i, 48 // 2 ** i) for i in range(5)]
    assert vnet_norm_kind(enc.stages[0][1]) == norm
    with pytest.raises(ValueError, match="2-D or 3-D"):
        VNetEncoder(1, 4, dim=1)
