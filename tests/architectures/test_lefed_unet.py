"""LeFeDUNet: LeFeD on nnU-Net's plans U-Net (shapes, feedback into the encoder, detached gate, inference
network = PlainConvUNet tensors that load a training checkpoint, contract with the plans)."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.architectures.lefed import LeFeDOutput, LeFeDUNet, discrepancy_feedback
from test_network_contract import IMPORTS, PLAIN, UNET, configuration, hooked_conv_elements

KW = dict(input_channels=1, n_stages=4, features_per_stage=[4, 8, 16, 16], conv_op=nn.Conv3d,
          kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
          n_conv_per_stage=[2, 2, 2, 2], num_classes=3, n_conv_per_stage_decoder=[1, 2, 1], conv_bias=True,
          norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
          nonlin_kwargs={"inplace": True})
SHAPE = (8, 16, 16)


def net(**kw):
    torch.manual_seed(0)
    return LeFeDUNet(**{**KW, "deep_supervision": True, **kw})


def test_shapes_and_stage_features():
    m = net()
    out = m(torch.randn(2, 1, *SHAPE), both=True)
    assert isinstance(out, LeFeDOutput)
    assert out.seg1.shape == out.seg2.shape == (2, 3, *SHAPE)
    assert [tuple(s.shape[2:]) for s in out.side1] == [(8, 8, 8), (4, 4, 4)]   # nnU-Net's lower DS outputs
    expected = [(16, 2, 2, 2), (16, 4, 4, 4), (8, 8, 8, 8), (4, 8, 16, 16)]     # deepest first
    for f1, f2, (c, *size) in zip(out.features1, out.features2, expected):
        assert f1.shape == f2.shape == (2, c, *size)
    # forward(x) is decoder 1 as PlainConvUNet: the DS list, or one tensor without deep supervision
    m.eval()
    x = torch.randn(1, 1, *SHAPE)
    ds = m(x)
    assert isinstance(ds, list) and torch.allclose(ds[0], m(x, both=True).seg1)
    m.deep_supervision = False
    assert torch.allclose(m(x), ds[0])


def test_discrepancy_feedback_formula_and_no_gradient():
    f1 = [torch.tensor([[1.0, 2.0]], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    f2 = [torch.tensor([[3.0, -2.0]], requires_grad=True), torch.tensor([[0.0]], requires_grad=True)]
    e = discrepancy_feedback(f1, f2)
    assert torch.allclose(e[0], torch.tensor([[2e-3, -4e-3]])) and torch.allclose(e[1], torch.tensor([[-5e-4]]))
    assert all(not t.requires_grad and t.grad_fn is None for t in e)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_feedback_is_added_to_the_matching_encoder_stage(k):
    m = net().eval()
    x = torch.randn(1, 1, *SHAPE)
    with torch.no_grad():
        plain = m.encode(x)
        out = m(x, both=True)
        feedback = [torch.zeros_like(f) for f in out.features1]
        feedback[k] = torch.full_like(feedback[k], 0.25)
        fed = m.encode(x, feedback)
    stage = len(plain) - 1 - k      # e_k (deepest first) -> encoder stage n-1-k
    for s in range(stage):
        assert torch.equal(plain[s], fed[s])
    # the stage's output gets exactly e_k (later stages then see the changed input)
    assert torch.allclose(fed[stage] - 0.25, plain[stage], atol=1e-6)
    if stage < len(plain) - 1:
        assert not torch.allclose(fed[stage + 1], plain[stage + 1])
    with pytest.raises(ValueError, match="one per encoder stage"):
        m.encode(x, feedback[:2])


def test_second_pass_feedback_carries_no_gradient_into_the_first():
    m = net()
    x = torch.randn(2, 1, *SHAPE)
    first = m(x, both=True)
    reached = []
    for t in first.features1 + first.features2:
        t.register_hook(lambda g: reached.append(g))
    e = discrepancy_feedback(first.features1, first.features2)
    assert all(t.grad_fn is None for t in e)
    second = m(x, feedback=e, both=True)
    (second.seg1.sum() + second.seg2.sum()).backward()
    assert reached == []     # the second pass's loss never flows back into the first pass's graph
    assert all(p.grad is not None for p in m.encoder.parameters())


def test_gate_is_detached_decoder2_loss_never_reaches_decoder1():
    m = net()
    out = m(torch.randn(2, 1, *SHAPE), both=True)
    out.seg2.square().mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in m.decoder.parameters() if p is not None
               and not any(p is q for q in m.encoder.parameters()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.decoder2.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())
    # and the gate does use decoder 1: changing decoder 1's transposed convolution changes decoder 2's output
    x = torch.randn(1, 1, *SHAPE)
    m.eval()
    with torch.no_grad():
        before = m(x, both=True).seg2
        m.decoder.transpconvs[0].weight.mul_(3.0)
        assert not torch.allclose(before, m(x, both=True).seg2)


def test_gate_formula():
    m = net().eval()
    x = torch.randn(1, 1, *SHAPE)
    seen = {}
    m.decoder2.ups[0].register_forward_hook(lambda mod, inp, out: seen.update({"in": inp[0]}))
    with torch.no_grad():
        skips = m.encode(x)
        m(x, both=True)
    b = skips[-1]
    assert torch.allclose(seen["in"], b + b * torch.sigmoid(b), atol=1e-6)


def test_every_parameter_gets_a_gradient_from_the_lefed_losses():
    """All parameters take part in a pass (DDP without find_unused_parameters)."""
    m = net()
    out = m(torch.randn(2, 1, *SHAPE), both=True)
    (sum(o.mean() for o in [out.seg1, *out.side1]) + out.seg2.mean()).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_inference_network_is_plainconvunet_and_loads_the_training_checkpoint():
    train = net()
    inference = LeFeDUNet(**KW, deep_supervision=False)          # what nnU-Net's predictor builds
    assert inference.inference and inference.decoder2 is None
    reference = PlainConvUNet(**KW, deep_supervision=False)
    assert {k: v.shape for k, v in inference.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert any(k.startswith("decoder2.") for k in train.state_dict())
    inference.load_state_dict(train.state_dict())                # strict (the default)
    x = torch.randn(1, 1, *SHAPE)
    train.eval(), inference.eval()
    with torch.no_grad():
        assert torch.allclose(inference(x), train(x, both=True).seg1)
    broken = {k: v for k, v in train.state_dict().items() if not k.startswith("encoder.stages.0.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        inference.load_state_dict(broken)
    with pytest.raises(RuntimeError, match="no decoder 2"):
        inference(x, both=True)
    n_train, n_inf = (sum(p.numel() for p in m.parameters()) for m in (train, inference))
    assert n_inf == sum(p.numel() for p in reference.parameters()) and n_train > n_inf


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_feature_map_size_counts_every_conv_output(deep_supervision):
    m = net(deep_supervision=deep_supervision)
    x = torch.randn(1, 1, *SHAPE)
    count = []
    hooks = [mod.register_forward_hook(lambda mod, i, o: count.append(o.numel())) for mod in m.modules()
             if isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        m.eval()(x, both=not m.inference)
    for h in hooks:
        h.remove()
    if m.inference:   # PlainConvUNet's own count
        assert m.compute_conv_feature_map_size(SHAPE) == \
            PlainConvUNet(**KW).compute_conv_feature_map_size(SHAPE) == hooked_conv_elements(m, x)
    else:
        assert m.compute_conv_feature_map_size(SHAPE) == sum(count)


def test_from_plans():
    pm, cm = configuration((8, 32, 32), PLAIN, UNET, IMPORTS)
    train = LeFeDUNet.from_plans(pm, cm, 1, 3, True)
    assert type(train) is LeFeDUNet and train.decoder2 is not None and train.deep_supervision
    inference = LeFeDUNet.from_plans(pm, cm, 1, 3, False)
    assert inference.decoder2 is None
    assert LeFeDUNet.plans_divisor(cm) == (2, 4, 4) and LeFeDUNet.fit_patch([7, 30, 30], cm) == [8, 32, 32]
    resenc = dict(UNET, n_blocks_per_stage=[1, 1, 1])
    resenc.pop("n_conv_per_stage")
    pm_r, cm_r = configuration((8, 32, 32), "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                               resenc, IMPORTS)
    with pytest.raises(ValueError, match="PlainConvUNet"):
        LeFeDUNet.from_plans(pm_r, cm_r, 1, 3, True)
    pm_2d, cm_2d = configuration((32, 32), PLAIN, dict(UNET, conv_op="torch.nn.modules.conv.Conv2d",
                                                       norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
                                                       kernel_sizes=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]]),
                                 IMPORTS)
    net2d = LeFeDUNet.from_plans(pm_2d, cm_2d, 1, 2, True)
    out = net2d(torch.randn(2, 1, 32, 32), both=True)
    assert out.seg2.shape == (2, 2, 32, 32)


def test_official_vnet_from_plans():
    from nnunet_plugins.architectures.contract import network_name
    from nnunet_plugins.architectures.lefed import LeFeDVNet

    pm, cm = configuration((20, 40, 56), network_name(LeFeDVNet))
    train = LeFeDUNet.from_plans(pm, cm, 1, 2, True)       # what LeFeDTrainer builds on plans naming the V-Net
    assert type(train) is LeFeDVNet and not train.inference and not train.upsample_side_outputs
    assert sum(p.numel() for p in train.parameters()) == 12_348_718
    inference = LeFeDUNet.from_plans(pm, cm, 1, 2, False)  # what nnUNetv2_predict builds
    assert inference.inference and sum(p.numel() for p in inference.parameters()) == 9_448_866
    inference.load_state_dict(train.state_dict())           # strict; decoder2.* and side.* dropped
    assert LeFeDUNet.plans_divisor(cm) == (16, 16, 16) and LeFeDUNet.fit_patch([20, 44, 56], cm) == [16, 48, 64]
    scales = LeFeDUNet.plans_deep_supervision_scales(cm)
    assert scales == [[1.0] * 3, [1.0] * 3, [0.5] * 3, [0.25] * 3, [0.125] * 3, [0.0625] * 3]
    small_pm, small_cm = configuration((16, 16, 32), network_name(LeFeDVNet), {"n_filters": 4})
    small = LeFeDUNet.from_plans(small_pm, small_cm, 1, 2, True).eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        ds = small(x)                                         # nnU-Net's list: [seg1, *side1]
        both = small(x, both=True)
    assert [tuple(o.shape[2:]) for o in ds] == [tuple(int(s * f) for s, f in zip((16, 16, 32), sc)) for sc in scales]
    assert isinstance(both, LeFeDOutput) and torch.allclose(ds[0], both.seg1)
    small.deep_supervision = False
    with torch.no_grad():
        assert torch.allclose(small(x), both.seg1)
    assert small.compute_conv_feature_map_size((16, 16, 32)) > \
        LeFeDUNet.from_plans(small_pm, small_cm, 1, 2, False).compute_conv_feature_map_size((16, 16, 32))
    with pytest.raises(ValueError, match="3-D network"):
        LeFeDUNet.from_plans(*configuration((16, 16), network_name(LeFeDVNet)), 1, 2, True)
