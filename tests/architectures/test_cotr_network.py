"""CoTr network: parameter counts of the official configuration, shapes, errors, gradients, options."""
import re

import pytest
import torch

from nnunet_plugins.architectures.cotr import CoTr

TINY = dict(stage_channels=(8, 16, 24, 24), blocks_per_stage=(2, 1, 1), num_heads=2, ffn_dim=32,
            num_encoder_layers=2, num_points=2)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(input_channels=1, num_classes=3, patch_size=(16, 32, 32), **TINY)
    args.update(kw)
    return CoTr(**args)


def test_official_parameter_count():
    net = CoTr(input_channels=1, num_classes=14, patch_size=(48, 192, 192))
    total = _count(net)
    assert abs(total - 41_872_504) <= 0.001 * 41_872_504
    assert total == 41_872_504
    # per part (methods.md: backbone 20.50M, DeTrans 9.32M, decoder + heads 12.05M)
    assert _count(net.backbone) == 20_500_800
    assert _count(net.transformer) == 9_316_992
    assert _count(net.decoder) == 12_054_712
    assert net.deep_supervision is True
    assert isinstance(net.backbone.stem.norm, torch.nn.InstanceNorm3d)
    assert isinstance(net.backbone.stem.nonlin, torch.nn.LeakyReLU)


@pytest.mark.parametrize("patch", [(16, 32, 32), (24, 64, 48), (8, 32, 16), (48, 192, 192)])
def test_output_shapes_with_and_without_deep_supervision(patch):
    net = _tiny(patch_size=patch)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outs = net(x)
        assert isinstance(outs, list) and len(outs) == 4
        for out, scale in zip(outs, CoTr.deep_supervision_scales):
            assert out.shape == (2, 3, *[int(s * f) for s, f in zip(patch, scale)])
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *patch)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))  # deterministic without dropout


def test_deep_supervision_toggle_matches_nnunet_convention():
    net = _tiny()
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    assert net.deep_supervision is False
    net.eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        single = net(x)
        net.deep_supervision = True
        full = net(x)[0]
    torch.testing.assert_close(single, full)
    assert CoTr.required_divisor == (8, 16, 16)


def test_bad_inputs_raise_clear_errors():
    net = _tiny()
    with pytest.raises(ValueError, match="3-D"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=re.escape("(8, 16, 16)")):
        net(torch.randn(1, 1, 12, 32, 32))
    with pytest.raises(ValueError, match=re.escape("(8, 16, 16)")):
        net(torch.randn(1, 1, 16, 32, 40))
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 2, 16, 32, 32))
    with pytest.raises(ValueError, match="patch_size"):
        _tiny(patch_size=(20, 32, 32))
    with pytest.raises(ValueError, match="one voxel"):
        net(torch.randn(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="one voxel"):
        _tiny(patch_size=(8, 16, 16))
    assert _tiny(patch_size=(8, 16, 16), norm="group")(torch.randn(2, 1, 8, 16, 16))[0].shape == (2, 3, 8, 16, 16)
    with pytest.raises(ValueError, match="3 spatial dims"):
        _tiny(patch_size=(32, 32))
    with pytest.raises(ValueError, match="equal widths"):
        _tiny(stage_channels=(8, 16, 24, 36))
    with pytest.raises(ValueError, match="norm"):
        _tiny(norm="layer")
    with pytest.raises(ValueError, match="num_heads"):
        _tiny(num_heads=5)


def test_gradients_reach_encoder_transformer_and_decoder():
    net = _tiny()
    # after the official initialisation the offset/attention-weight matrices are zero, so the positional
    # and level embeddings get gradient only from the second step on; perturb them like one step would
    with torch.no_grad():
        for layer in net.transformer.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.05)
            layer.self_attn.attention_weights.weight.normal_(0, 0.05)
    x = torch.randn(2, 1, 16, 32, 32)
    outs = net(x)
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for part in ("backbone", "transformer", "decoder"):
        for name, p in getattr(net, part).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {part}.{name}"


@pytest.mark.parametrize("norm", ["batch", "group", "IN"])
def test_norm_options_and_weight_standardisation(norm):
    net = _tiny(norm=norm, weight_std=True, nonlin="relu")
    out = net(torch.randn(2, 1, 16, 32, 32))
    assert out[0].shape == (2, 3, 16, 32, 32)
    kinds = {"batch": torch.nn.BatchNorm3d, "group": torch.nn.GroupNorm, "IN": torch.nn.InstanceNorm3d}
    assert isinstance(net.backbone.stem.norm, kinds[norm])
    # weight standardisation: the effective filters have zero mean and unit std per output channel
    conv = net.backbone.stem.conv
    w = conv.weight.detach()
    w = w - w.mean(dim=(1, 2, 3, 4), keepdim=True)
    w = w / w.reshape(w.shape[0], -1).std(dim=1).view(-1, 1, 1, 1, 1)
    x = torch.randn(1, 1, 8, 16, 16)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv3d(x, w, None, conv.stride, conv.padding),
                               rtol=1e-4, atol=1e-4)


def test_official_axis_order_changes_the_function_not_the_parameters():
    net = _tiny()
    off = _tiny(official_axis_order=True)
    off.load_state_dict(net.state_dict(), strict=True)  # same names and shapes
    net.eval(), off.eval()
    x = torch.randn(1, 1, 16, 32, 48)
    with torch.no_grad():
        assert not torch.allclose(net(x)[0], off(x)[0], atol=1e-5)


def test_initialisation_is_official():
    net = _tiny()
    # kaiming normal, fan_out, gain sqrt(2): std = sqrt(2 / (out_channels * k^3))
    conv = net.backbone.stages[0][0].conv
    assert abs(conv.weight.std().item() - (2 / (16 * 27)) ** 0.5) < 0.15 * (2 / (16 * 27)) ** 0.5
    assert net.backbone.stem.norm.weight.eq(1).all() and net.backbone.stem.norm.bias.eq(0).all()
    assert net.decoder.upconvs[0].bias is None and net.backbone.stem.conv.bias is None
    assert net.decoder.ds_heads[0].bias is not None


def test_autocast_runs_and_keeps_float32_locations():
    net = _tiny()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = net(x)
        loss = sum(o.float().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(p.grad is not None for p in net.parameters())


def test_traces_as_one_graph_for_torch_compile():
    # nnU-Net 2.8 compiles the network by default on CUDA: no graph breaks (data-dependent Python code)
    net = _tiny().eval()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], net(x)[0], rtol=1e-4, atol=1e-4)


def _full_output_official_order(decoder, bottleneck, skips):
    """The official full-resolution output, written out: decoder blocks, trilinear (1, 2, 2) upsampling of the
    last block's 64-channel features, THEN the 1x1x1 head (CoTr's ``upsamplex2`` + ``cls_conv``)."""
    x = bottleneck
    for up, block, skip in zip(decoder.upconvs, decoder.blocks, skips):
        x = block(up(x) + skip)
    d, h, w = x.shape[2:]
    return decoder.seg_head(torch.nn.functional.interpolate(x, size=(d, 2 * h, 2 * w), mode="trilinear",
                                                            align_corners=False))


@pytest.mark.parametrize("patch", [(16, 32, 32), (8, 48, 16)])
def test_head_before_upsampling_equals_official_order(patch):
    """The decoder applies the 1x1x1 head before the upsampling (cheaper; the two commute): outputs and
    gradients of every decoder parameter and input equal the official order's (float64, 1e-5)."""
    net = _tiny(deep_supervision=False, patch_size=patch).double()   # float64: sums in another order agree
    with torch.no_grad():
        net.decoder.seg_head.bias.normal_()   # a non-zero bias must pass through the upsampling unchanged
    g = torch.Generator().manual_seed(1)
    dec = net.decoder
    d, h, w = patch
    chans = (8, 16, 24, 24)
    shapes = [(d, h // 2, w // 2), (d // 2, h // 4, w // 4), (d // 4, h // 8, w // 8), (d // 8, h // 16, w // 16)]
    feats = [torch.randn(2, c, *s, generator=g, dtype=torch.float64) for c, s in zip(chans, shapes)]
    results = []
    for fn in (lambda b, sk: dec(b, sk), lambda b, sk: _full_output_official_order(dec, b, sk)):
        dec.zero_grad()
        xs = [f.clone().requires_grad_(True) for f in feats]
        out = fn(xs[3], [xs[2], xs[1], xs[0]])
        assert out.shape == (2, 3, *patch)
        probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        (out * probe).sum().backward()
        results.append((out.detach(), [x.grad for x in xs],
                        {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(gx_a, gx_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert gp_a.keys() == gp_b.keys() and "seg_head.bias" in gp_a
    for name in gp_a:
        scale = gp_b[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(gp_a[name] / scale, gp_b[name] / scale, rtol=1e-5, atol=1e-5, msg=name)
