"""LeFeD V-Net: official parameter counts, shapes, the detached gate, discrepancy feedback, gradient flow."""
import pytest
import torch

from nnunet_plugins.architectures.lefed import (LeFeDVNet, deep_supervision_weights, discrepancy_feedback,
                                                inference_state_dict)


def count(module):
    return sum(p.numel() for p in module.parameters())


def small(**kw):
    torch.manual_seed(0)
    return LeFeDVNet(**{"input_channels": 1, "num_classes": 2, "n_filters": 4, "normalization": "batch", **kw})


def test_official_parameter_counts():
    net = LeFeDVNet(input_channels=1, num_classes=2)
    assert count(net) == 12_348_718
    assert count(LeFeDVNet(input_channels=1, num_classes=2, inference=True)) == 9_448_866
    assert count(net.encoder) + count(net.decoder1) == 9_448_866
    assert count(net.build_inference_network()) == 9_448_866


@pytest.mark.parametrize("channels,classes,shape", [(1, 2, (16, 16, 16)), (2, 4, (16, 32, 48))])
def test_shapes(channels, classes, shape):
    net = small(input_channels=channels, num_classes=classes)
    out = net(torch.randn(2, channels, *shape))
    assert out.seg1.shape == out.seg2.shape == (2, classes, *shape)
    assert [s.shape for s in out.side1] == [(2, classes, *shape)] * 5
    widths = [64, 32, 16, 8, 4]
    expect = [(2, w, *(s // 2 ** (4 - k) for s in shape)) for k, w in enumerate(widths)]
    assert [tuple(f.shape) for f in out.features1] == expect
    assert [tuple(f.shape) for f in out.features2] == expect
    native = small(input_channels=channels, num_classes=classes, upsample_side_outputs=False)
    sides = native(torch.randn(2, channels, *shape)).side1
    assert [tuple(s.shape[2:]) for s in sides] == [tuple(d // 2 ** k for d in shape) for k in range(5)]


def test_gate_uses_decoder1_features_and_is_detached():
    net = small(has_dropout=False).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    out.seg2.square().mean().backward()
    dec1 = [p.grad for p in net.decoder1.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in dec1), "decoder 2's loss reached decoder 1"
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in net.decoder2.parameters()
               if p.dim() > 1)
    assert torch.count_nonzero(net.encoder.stages[0][0].weight.grad) > 0
    # the gate is active: changing decoder 1 changes decoder 2's output (train mode: batch statistics, so the
    # change is not damped by untrained running statistics)
    net.train()
    with torch.no_grad():
        before = net(x).seg2.clone()
        net.decoder1.ups[0][0].weight.mul_(3.0)
        assert not torch.allclose(net(x).seg2, before)


def test_gate_formula_bottleneck():
    """Decoder 2's first stage feature is x + x * sigmoid(x) of the bottleneck (F1_0 is the bottleneck)."""
    net = small(has_dropout=False).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
        x5 = out.features1[0]
        torch.testing.assert_close(out.features2[0], x5 + x5 * torch.sigmoid(x5))


def test_discrepancy_feedback_hand_made():
    f1 = [torch.full((1, 2, 2, 2, 2), 1.0, requires_grad=True), torch.tensor([[0.5, -1.0]], requires_grad=True)]
    f2 = [torch.full((1, 2, 2, 2, 2), 3.0, requires_grad=True), torch.tensor([[0.5, 1.0]], requires_grad=True)]
    e = discrepancy_feedback(f1, f2)
    torch.testing.assert_close(e[0], torch.full((1, 2, 2, 2, 2), 2e-3))
    torch.testing.assert_close(e[1], torch.tensor([[0.0, 2e-3]]))
    assert not any(t.requires_grad for t in e)
    torch.testing.assert_close(discrepancy_feedback(f1, f2, scale=0.5)[1], torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        discrepancy_feedback([torch.zeros(2)], [torch.zeros(3)])


@pytest.mark.parametrize("k", [0, 2, 4])
def test_feedback_added_to_matching_encoder_stage(k):
    net = small(has_dropout=False).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        plain = net.encoder(x)  # full resolution .. bottleneck
        feats = net(x).features1
        e = [torch.zeros_like(f) for f in feats]
        e[k] = torch.randn_like(feats[k])
        fed = net.encoder(x, e)
        stage = len(plain) - 1 - k  # feedback is deepest first, encoder outputs shallowest first
        torch.testing.assert_close(fed[stage], plain[stage] + e[k])
        for s in range(stage):  # shallower stages are unaffected
            torch.testing.assert_close(fed[s], plain[s])
        # and the whole network sees it (batch statistics, see above)
        net.train()
        assert not torch.allclose(net(x, e).seg1, net(x).seg1)
        net.eval()
    with pytest.raises(ValueError, match="feedback"):
        net(x, e[:-1])
    with pytest.raises(ValueError, match="shape"):
        net(x, e[::-1])


def test_feedback_carries_no_gradient_into_previous_pass():
    net = small(has_dropout=False)
    x = torch.randn(2, 1, 16, 16, 16)
    first = net(x)
    e = discrepancy_feedback(first.features1, first.features2)
    second = net(x, e)
    net.zero_grad()
    second.seg1.sum().backward()  # would fail ("backward through the graph a second time") or leak if not detached
    first.seg1.sum().backward()


def test_gradients_reach_all_parameters():
    net = small()
    out = net(torch.randn(2, 1, 16, 16, 16))
    loss = out.seg1.square().mean() + out.seg2.square().mean() + sum(s.square().mean() for s in out.side1)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing


def test_inference_network_loads_training_weights_and_matches_decoder1():
    net = small()
    with torch.no_grad():  # make the BN statistics non-trivial
        net(torch.randn(2, 1, 16, 16, 16))
    net.eval()
    inf = net.build_inference_network().eval()
    assert inf.decoder2 is None and inf.side is None
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(inf(x), net(x).seg1)
    fresh = small(inference=True)
    fresh.load_state_dict(inference_state_dict(net.state_dict()), strict=True)
    # a training checkpoint loads too (what nnUNetv2_predict does): decoder2.* / side.* are dropped ...
    fresh.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), net(x).seg1)
    # ... but every inference parameter must be there
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("decoder1.")})
    ds = small(inference=True, deep_supervision=True).eval()
    assert isinstance(ds(x), list) and len(ds(x)) == 6


def test_deep_supervision_weights():
    assert deep_supervision_weights() == (0.8, 0.6, 0.4, 0.2, 0.1)
    assert deep_supervision_weights(official_mean=True) == pytest.approx((0.2,) * 5)
