"""BA-Net network: parameter counts, shapes, the boundary gate's placement, gradient flow, ResEnc variant."""
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn

from nnunet_plugins.architectures.banet import BANetPlainConvUNet, BANetResidualEncoderUNet, boundary_attention

FEATURES_6 = [32, 64, 128, 256, 320, 320]
ISO = dict(kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5)
# the only 6-stage configuration with a (1,3,3) first stage whose official count is 47.52M (16 classes):
# AMOS22-like plans, in-plane-only first and last pooling
ANISO = dict(kernel_sizes=[[1, 3, 3]] + [[3, 3, 3]] * 5,
             strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]])


def plans_kwargs(dim=3, features=FEATURES_6, kernel_sizes=None, strides=None, n_conv=2):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    n = len(features)
    return dict(n_stages=n, features_per_stage=features, conv_op=conv, kernel_sizes=kernel_sizes, strides=strides,
                n_conv_per_stage=[n_conv] * n, n_conv_per_stage_decoder=[n_conv] * (n - 1), conv_bias=True,
                norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def count(module):
    return sum(p.numel() for p in module.parameters())


def official_v1_count(input_channels, num_classes, features, kernels, strides, n_conv=2):
    """Parameters of the official generic_BANetV2 (nnU-Net v1 Generic_UNet + boundary decoder), by hand.

    Conv (bias) + instance norm (affine) per layer; decoder stage at level l uses the kernel of stage
    l+1 (v1); transposed convolutions and 1x1 outputs have no bias.
    """
    def layer(cin, cout, k):
        return cin * cout * int(np.prod(k)) + cout + 2 * cout

    total, cin = 0, input_channels
    for f, k in zip(features, kernels):
        total += layer(cin, f, k) + (n_conv - 1) * layer(f, f, k)
        cin = f
    decoder = 0
    for level in range(len(features) - 1):
        below, skip = features[level + 1], features[level]
        decoder += below * skip * int(np.prod(strides[level + 1]))
        decoder += layer(2 * skip, skip, kernels[level + 1]) + (n_conv - 1) * layer(skip, skip, kernels[level + 1])
    heads = sum(features[:-1]) * (num_classes + 2)
    return total + 2 * decoder + heads


@pytest.mark.parametrize("config,num_classes,official,v2_layout", [
    (ISO, 5, 48_366_848, 48_368_483),
    (ANISO, 16, 47_521_056, 47_412_154),
])
def test_parameter_counts(config, num_classes, official, v2_layout):
    kwargs = plans_kwargs(**config)
    default = BANetPlainConvUNet(1, num_classes=num_classes, **kwargs)
    v2 = BANetPlainConvUNet(1, num_classes=num_classes, official_v1_layout=False, **kwargs)
    # the default network IS the official one: its count, checked against an independent computation
    assert default.official_v1_layout is True
    assert count(default) == official == official_v1_count(1, num_classes, FEATURES_6, config["kernel_sizes"],
                                                           config["strides"])
    # methods.md: 48.37M (5 classes, isotropic) and 47.52M (16 classes, anisotropic first stage)
    assert round(count(default) / 1e6, 2) == (48.37 if num_classes == 5 else 47.52)
    assert count(BANetPlainConvUNet(1, num_classes=num_classes, official_v1_layout=True, **kwargs)) == official
    # the v2 layout = nnU-Net v2's PlainConvUNet + a boundary decoder of the same structure
    assert count(v2) == v2_layout != official
    plain = PlainConvUNet(1, num_classes=num_classes, **kwargs)
    extra_decoder = UNetDecoder(plain.encoder, 2, kwargs["n_conv_per_stage_decoder"], True)
    assert count(v2) == count(plain) + count(extra_decoder) - count(plain.encoder)


def test_plain_unet_reference_count_and_split():
    kwargs = plans_kwargs(**ISO)
    plain = PlainConvUNet(1, num_classes=5, **kwargs)
    assert round(count(plain) / 1e6, 2) == 31.20
    assert count(plain) == 31_198_009
    net = BANetPlainConvUNet(1, num_classes=5, **kwargs)
    # methods.md: encoder 14.03M, each decoder 17.17M
    assert round(count(net.encoder) / 1e6, 2) == 14.03
    assert round(count(net.decoder) / 1e6, 2) == 17.17
    assert round(count(net.boundary_decoder) / 1e6, 2) == 17.17


def tiny(dim=3, deep_supervision=True, num_classes=3, **extra):
    if dim == 3:
        k, s = [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    else:
        k, s = [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]]
    torch.manual_seed(0)
    net = BANetPlainConvUNet(2, num_classes=num_classes, deep_supervision=deep_supervision,
                             **plans_kwargs(dim, [4, 8, 16], k, s), **extra)
    net.apply(net.initialize)
    return net


@pytest.mark.parametrize("dim,shape", [(3, (8, 16, 16)), (2, (16, 24))])
def test_output_shapes(dim, shape):
    net = tiny(dim)
    x = torch.randn(2, 2, *shape)
    out = net(x)
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (2, 3, *shape)
    down = tuple(i // j for i, j in zip(shape, [1, 2, 2] if dim == 3 else [2, 2]))
    assert out[1].shape == (2, 3, *down)
    seg, bdr = net(x, return_boundary=True)
    assert [b.shape[1] for b in bdr] == [2, 2] and [b.shape[2:] for b in bdr] == [o.shape[2:] for o in seg]
    for a, b in zip(seg, out):
        assert torch.equal(a, b)
    net.deep_supervision = False
    assert net.decoder.deep_supervision is False and net.boundary_decoder.deep_supervision is False
    single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (2, 3, *shape)
    assert torch.allclose(single, out[0])
    seg1, bdr1 = net(x, return_boundary=True)
    assert torch.allclose(bdr1, bdr[0]) and bdr1.shape == (2, 2, *shape)


def _capture(net):
    captured = {}

    def save(name, what):
        def hook(module, inputs, output):
            captured[name] = (inputs[0] if what == "in" else output).detach().clone()
        return hook

    for s in range(len(net.decoder.stages)):
        net.decoder.stages[s].register_forward_hook(save(f"stage_in{s}", "in"))
        net.decoder.transpconvs[s].register_forward_hook(save(f"up{s}", "out"))
        net.boundary_decoder.seg_layers[s].register_forward_hook(save(f"bdr{s}", "out"))
    for d, stage in enumerate(net.encoder.stages):
        stage.register_forward_hook(save(f"skip{d}", "out"))
    return captured


@pytest.mark.parametrize("dim", [2, 3])
def test_gate_multiplies_upsampled_features_before_concatenation(dim):
    """The segmentation stage input must be cat(up * (1 + p_boundary), skip): the skip half is NOT gated.

    Fails if the gate moves after the concatenation (the skip half would be scaled), before the
    transposed convolution (the up half would differ from the gated transposed-conv output), or is dropped.
    """
    net = tiny(dim)
    captured = _capture(net)
    x = torch.randn(2, 2, *((8, 16, 16) if dim == 3 else (16, 24)))
    with torch.no_grad():
        net(x)
    n = len(net.decoder.stages)
    for s in range(n):
        stage_in = captured[f"stage_in{s}"]
        c = stage_in.shape[1] // 2
        gate = 1 + torch.softmax(captured[f"bdr{s}"], 1)[:, 1:2]
        assert (gate > 1.0).all() and (gate < 2.0).all()
        torch.testing.assert_close(stage_in[:, :c], captured[f"up{s}"] * gate)
        skip = captured[f"skip{n - 1 - s}"]
        torch.testing.assert_close(stage_in[:, c:], skip, rtol=0, atol=0)


def test_gate_with_a_known_boundary_map():
    """Boundary head forced to a constant logit pair: the gate is the same known constant everywhere."""
    net = tiny(3, official_v1_layout=False)  # the v2 layout's heads have a bias to set the constant with
    logit = 1.3
    for head in net.boundary_decoder.seg_layers:
        nn.init.zeros_(head.weight)
        head.bias.data[:] = torch.tensor([0.0, logit])
    captured = _capture(net)
    with torch.no_grad():
        net(torch.randn(1, 2, 8, 16, 16))
    expected = 1 + 1 / (1 + np.exp(-logit))
    for s in range(2):
        c = captured[f"stage_in{s}"].shape[1] // 2
        torch.testing.assert_close(captured[f"stage_in{s}"][:, :c], captured[f"up{s}"] * expected)
    assert torch.equal(boundary_attention(torch.ones(1, 3, 2, 2), torch.zeros(1, 2, 2, 2)), torch.full((1, 3, 2, 2), 1.5))


def test_segmentation_loss_trains_the_boundary_decoder():
    net = tiny(3)
    x = torch.randn(2, 2, 8, 16, 16)
    seg = net(x)
    loss = sum(o.square().mean() for o in seg)  # a loss on the segmentation outputs only
    loss.backward()
    for name, p in net.boundary_decoder.named_parameters():
        if name.startswith("encoder."):
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches boundary_decoder.{name}"
    # and the boundary outputs are trained by their own loss without touching the segmentation head
    net.zero_grad()
    _, bdr = net(x, return_boundary=True)
    sum(b.square().mean() for b in bdr).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.decoder.seg_layers.parameters())
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_nnunet_default_deep_supervision_switch_works_too():
    """nnU-Net's stock set_deep_supervision_enabled only sets network.decoder.deep_supervision."""
    net = tiny(2)
    net.decoder.deep_supervision = False
    assert isinstance(net(torch.randn(1, 2, 16, 16)), torch.Tensor)


def test_plain_nnunet_weights_load_into_the_segmentation_path():
    kwargs = plans_kwargs(3, [4, 8, 16], [[3, 3, 3]] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    plain = PlainConvUNet(1, num_classes=3, deep_supervision=True, **kwargs)
    net = BANetPlainConvUNet(1, num_classes=3, deep_supervision=True, official_v1_layout=False, **kwargs)
    result = net.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("boundary_decoder.") for k in result.missing_keys)
    # the default (official) layout has no biases in transposed / output convolutions
    official = BANetPlainConvUNet(1, num_classes=3, deep_supervision=True, **kwargs)
    result = official.load_state_dict(plain.state_dict(), strict=False)
    assert "decoder.transpconvs.0.bias" in result.unexpected_keys


@pytest.mark.parametrize("extra", [{}, {"official_v1_layout": True}])
def test_official_layout_shifts_decoder_kernels_and_drops_biases(extra):
    net = tiny(3, **extra)  # the official layout is the default
    assert net.official_v1_layout is True
    # decoder stage at the full-resolution level uses stage 1's kernel (3,3,3), not stage 0's (1,3,3)
    assert tuple(net.decoder.stages[-1].convs[0].conv.kernel_size) == (3, 3, 3)
    for dec in (net.decoder, net.boundary_decoder):
        assert all(m.bias is None for m in list(dec.transpconvs) + list(dec.seg_layers))
    v2 = tiny(3, official_v1_layout=False)
    assert v2.official_v1_layout is False
    assert tuple(v2.decoder.stages[-1].convs[0].conv.kernel_size) == (1, 3, 3)
    for dec in (v2.decoder, v2.boundary_decoder):
        assert all(m.bias is not None for m in list(dec.transpconvs) + list(dec.seg_layers))
    assert not any(k.startswith(("decoder.encoder", "boundary_decoder.encoder")) for k in net.state_dict())
    assert net(torch.randn(1, 2, 8, 16, 16))[0].shape == (1, 3, 8, 16, 16)


def test_residual_encoder_variant_matches_resenc_unet():
    # the arguments nnUNetPlannerResEncM writes (shortened to 4 stages and narrow features)
    kwargs = dict(n_stages=4, features_per_stage=[8, 16, 32, 32], conv_op=nn.Conv3d,
                  kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                  n_blocks_per_stage=[1, 3, 4, 6], n_conv_per_stage_decoder=[1, 1, 1], conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                  dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    ref = ResidualEncoderUNet(1, num_classes=4, deep_supervision=True, **kwargs)
    v2 = BANetResidualEncoderUNet(1, num_classes=4, deep_supervision=True, official_v1_layout=False, **kwargs)
    extra = UNetDecoder(ref.encoder, 2, [1, 1, 1], True)
    assert count(v2) == count(ref) + count(extra) - count(ref.encoder)
    result = v2.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("boundary_decoder.") for k in result.missing_keys)
    # default: the official BA-Net decoders (isotropic kernels here, so they differ from v2 only by the
    # biases of the transposed convs (features 8, 16, 32) and of the 1x1 heads (4 + 2 classes, 3 stages))
    net = BANetResidualEncoderUNet(1, num_classes=4, deep_supervision=True, **kwargs)
    assert net.official_v1_layout is True
    assert count(v2) - count(net) == 2 * (8 + 16 + 32) + 3 * (4 + 2)
    assert all(m.bias is None for dec in (net.decoder, net.boundary_decoder)
               for m in list(dec.transpconvs) + list(dec.seg_layers))
    net.apply(net.initialize)
    seg, bdr = net(torch.randn(1, 1, 16, 16, 16), return_boundary=True)
    assert [o.shape[1:] for o in seg] == [(4, 16, 16, 16), (4, 8, 8, 8), (4, 4, 4, 4)]
    assert [b.shape[1] for b in bdr] == [2, 2, 2]
    net.deep_supervision = False
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


@pytest.mark.parametrize("official_v1_layout", [True, False])
def test_residual_encoder_variant_with_anisotropic_kernels(official_v1_layout):
    kwargs = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op=nn.Conv3d,
                  kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                  n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                  norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                  dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    net = BANetResidualEncoderUNet(2, num_classes=3, deep_supervision=True, official_v1_layout=official_v1_layout,
                                   **kwargs)
    # v1: the full-resolution decoder stage takes stage 1's kernel; v2: the skip stage's (1, 3, 3)
    expected = (3, 3, 3) if official_v1_layout else (1, 3, 3)
    assert tuple(net.decoder.stages[-1].convs[0].conv.kernel_size) == expected
    assert tuple(net.boundary_decoder.stages[-1].convs[0].conv.kernel_size) == expected
    net.apply(net.initialize)
    seg, bdr = net(torch.randn(1, 2, 4, 16, 16), return_boundary=True)
    assert [o.shape[1:] for o in seg] == [(3, 4, 16, 16), (3, 4, 8, 8)]
    assert [b.shape[1:] for b in bdr] == [(2, 4, 16, 16), (2, 4, 8, 8)]


def test_feature_map_size_counts_both_decoders():
    net = tiny(3)
    plain = PlainConvUNet(2, num_classes=3, deep_supervision=True,
                          **plans_kwargs(3, [4, 8, 16], [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
                                         [[1, 1, 1], [1, 2, 2], [2, 2, 2]]))
    size = (8, 16, 16)
    assert net.compute_conv_feature_map_size(size) > 1.9 * plain.compute_conv_feature_map_size(size) - \
        plain.encoder.compute_conv_feature_map_size(size)


def test_torch_compile_traces_the_whole_forward():
    """nnU-Net compiles the network on CUDA by default: dynamo must capture BA-Net in one graph."""
    net = tiny(3)
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    x = torch.randn(1, 2, 8, 16, 16)
    seg, bdr = compiled(x, return_boundary=True)
    ref_seg, ref_bdr = net(x, return_boundary=True)
    for a, b in zip(seg + bdr, ref_seg + ref_bdr):
        torch.testing.assert_close(a, b)


def test_autocast_keeps_the_gate_in_the_feature_dtype():
    up = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    gated = boundary_attention(up, torch.randn(1, 2, 3, 3))
    assert gated.dtype == torch.bfloat16
    net = tiny(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 2, 16, 16))
    assert out[0].dtype == torch.bfloat16 and torch.isfinite(out[0].float()).all()


def test_per_stage_counts_of_the_wrong_length_are_named():
    with pytest.raises(ValueError, match=r"n_conv_per_stage needs 3 entries .* got \[2, 2\] and \[2, 2\]"):
        BANetPlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], [2, 2], 2, 2)
    with pytest.raises(ValueError, match=r"n_conv_per_stage_decoder 2, got \[1, 1, 1\] and \[1, 1, 1\]"):
        BANetResidualEncoderUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, 2, [1, 1, 1])
    net = BANetResidualEncoderUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, 2, 1)
    assert len(net.encoder.stages) == 3 and len(net.decoder.stages) == 2
