"""VerSemi networks: official V-Net count, shapes, task prompt, per-sample dynamic head, gradients."""
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.architectures.versemi import VerSemiUNet, VerSemiVNet


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_official_vnet_parameter_count_and_controller_shape():
    net = VerSemiVNet(input_channels=1, num_classes=2, num_tasks=4)
    assert _count(net) == 9_484_144
    # controller: GAP (256) ++ one-hot of T + 1 = 5 task ids -> 162 + 18 values, as official
    assert net.controller.conv.weight.shape == (180, 261, 1, 1, 1) and net.num_dynamic_params == 180
    assert net.num_tasks == 5 and net.synthetic_task == 4 and net.num_real_tasks == 4
    # the paper's head (no unused second output): 18 generated values fewer
    assert _count(VerSemiVNet(official_second_output=False)) == 9_484_144 - 18 * 262
    # encoder stage widths / conv counts of the official V-Net (16 base filters)
    assert [sum(isinstance(m, nn.Conv3d) for m in s.modules()) for s in net.encoder_stages] == [1, 2, 3, 3, 3]
    assert all(isinstance(m, nn.InstanceNorm3d) and not m.affine
               for s in net.encoder_stages for m in s.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm))


@pytest.mark.parametrize("conv_op,shape", [(nn.Conv3d, (16, 32, 16)), (nn.Conv2d, (32, 48))])
def test_vnet_shapes_and_errors(conv_op, shape):
    torch.manual_seed(0)
    net = VerSemiVNet(input_channels=2, num_classes=3, num_tasks=2, base_filters=4, conv_op=conv_op).eval()
    x = torch.randn(2, 2, *shape)
    assert net(x, torch.tensor([0, 2])).shape == (2, 3, *shape)
    assert isinstance(VerSemiVNet(base_filters=4, deep_supervision=True, conv_op=conv_op)(
        torch.randn(1, 1, *shape), 0), list)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.randn(1, 2, *[s + 8 for s in shape]), 0)
    with pytest.raises(ValueError, match="tasks 0..2"):
        net(x, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="predict-multitask"):
        net(x)


def test_vnet_task_id_changes_output_and_synthetic_task_usable():
    torch.manual_seed(1)
    net = VerSemiVNet(base_filters=4).double().eval()
    x = torch.randn(1, 1, 16, 32, 16, dtype=torch.float64).expand(5, -1, -1, -1, -1)
    out = net(x, torch.arange(5))
    for t in range(1, 5):
        assert not torch.allclose(out[0], out[t], atol=1e-4)
    net.set_inference_task(4)  # the synthetic (union) task can be predicted too
    torch.testing.assert_close(net(x[:1]), out[4:5])


def _capture(net, x, task_id, head_module):
    """Head input, generated parameters and output of one forward pass."""
    seen = {}
    h1 = head_module.register_forward_hook(lambda m, i, o: seen.__setitem__("head_input", o))
    h2 = net.controller.register_forward_hook(lambda m, i, o: seen.__setitem__("params", o))
    out = net(x, task_id)
    h1.remove()
    h2.remove()
    return seen["head_input"], seen["params"], out


def test_vnet_per_sample_heads_equal_a_loop_of_conv3d_official_layout():
    torch.manual_seed(2)
    net = VerSemiVNet(base_filters=4).double().eval()
    x = torch.randn(3, 1, 16, 32, 16, dtype=torch.float64)
    tid = torch.tensor([1, 4, 0])
    feats, params, out = _capture(net, x, tid, net.head_input)
    assert feats.shape == (3, 8, 16, 32, 16) and params.shape == (3, 180)
    for b in range(3):
        p, h = params[b], feats[b:b + 1]
        # official parse_dynamic_params: weights 64, 64, 16, 16 then biases 8, 8, 2, 2; first output used
        h = F.relu(F.conv3d(h, p[0:64].reshape(8, 8, 1, 1, 1), p[160:168]))
        h = F.relu(F.conv3d(h, p[64:128].reshape(8, 8, 1, 1, 1), p[168:176]))
        ref = F.conv3d(h, p[128:144].reshape(2, 8, 1, 1, 1), p[176:178])
        torch.testing.assert_close(out[b:b + 1], ref)


def test_vnet_gradients_reach_controller_for_used_tasks_only_first_output():
    torch.manual_seed(3)
    net = VerSemiVNet(base_filters=4)
    out = net(torch.randn(2, 1, 16, 32, 16), torch.tensor([0, 3]))
    out.square().mean().backward()
    g = net.controller.conv.weight.grad.view(180, 64 + 5)
    assert g[:, :64].abs().sum() > 0 and net.controller.conv.bias.grad.abs().sum() > 0
    # one-hot columns: only the tasks in the batch receive gradient
    used = g[:, 64:].abs().sum(0)
    assert used[0] > 0 and used[3] > 0 and used[1] == 0 and used[2] == 0 and used[4] == 0
    # the second parallel output (weights 144..160, biases 178..180) is never used, as official
    rows_unused = torch.cat([torch.arange(144, 160), torch.arange(178, 180)])
    assert g[rows_unused].abs().sum() == 0 and g[:144].abs().sum() > 0
    assert all(p.grad is not None for p in net.encoder_stages.parameters())


TINY_UNET = dict(n_stages=3, features_per_stage=(4, 8, 16), kernel_sizes=3, strides=(1, 2, 2), n_conv_per_stage=2,
                 n_conv_per_stage_decoder=1, conv_bias=True, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _unet(dim, **kw):
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
    norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    return dict(input_channels=2, conv_op=conv, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                num_classes=3, **TINY_UNET, **kw)


@pytest.mark.parametrize("dim,shape", [(3, (8, 16, 12)), (2, (16, 24))])
def test_unet_shapes_deep_supervision_and_count(dim, shape):
    torch.manual_seed(4)
    net = VerSemiUNet(**_unet(dim), num_tasks=2, deep_supervision=True)
    net.apply(net.initialize)
    x = torch.randn(2, 2, *shape)
    outs = net(x, torch.tensor([2, 1]))
    # one output per decoder stage (n_stages - 1), highest resolution first
    assert [o.shape for o in outs] == [(2, 3, *shape), (2, 3, *[s // 2 for s in shape])]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    single = net(x, torch.tensor([2, 1]))
    torch.testing.assert_close(single, outs[0])
    # = PlainConvUNet with 8 "classes" (the head input) + controller (16 + 3) * P + P, P = 8*8*2 + 8*3 + 8+8+3
    p = 64 + 64 + 24 + 8 + 8 + 3
    assert net.num_dynamic_params == p
    base = PlainConvUNet(**{**_unet(dim), "num_classes": 8})
    assert _count(net) == _count(base) + (16 + 3) * p + p
    assert net.compute_conv_feature_map_size(shape) > base.compute_conv_feature_map_size(shape)
    # official second output option: 180 values for 2 classes
    assert VerSemiUNet(**{**_unet(dim), "num_classes": 2}, num_tasks=2, official_second_output=True
                       ).num_dynamic_params == 180


def test_unet_task_prompt_and_per_sample_head_and_gradients():
    torch.manual_seed(5)
    net = VerSemiUNet(**_unet(3), num_tasks=3).double()
    x = torch.randn(1, 2, 8, 8, 8, dtype=torch.float64).expand(4, -1, -1, -1, -1)
    feats, params, out = _capture(net, x, torch.arange(4), net.decoder.seg_layers[-1])
    for t in range(1, 4):
        assert not torch.allclose(out[0], out[t])
    for b in range(4):
        p, h = params[b], feats[b:b + 1]
        h = F.relu(F.conv3d(h, p[0:64].reshape(8, 8, 1, 1, 1), p[64 + 64 + 24:64 + 64 + 24 + 8]))
        h = F.relu(F.conv3d(h, p[64:128].reshape(8, 8, 1, 1, 1), p[160:168]))
        ref = F.conv3d(h, p[128:152].reshape(3, 8, 1, 1, 1), p[168:171])
        torch.testing.assert_close(out[b:b + 1], ref)
    out.sum().backward()
    assert net.controller.conv.weight.grad.abs().sum() > 0
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0


def test_unet_builds_from_plans_with_num_tasks():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    kw = {k: v for k, v in _unet(3).items() if k not in ("input_channels", "num_classes")}
    kw.update(conv_op="torch.nn.Conv3d", norm_op="torch.nn.InstanceNorm3d", nonlin="torch.nn.LeakyReLU", num_tasks=2)
    net = get_network_from_plans("nnunet_plugins.architectures.versemi.VerSemiUNet", kw,
                                 ["conv_op", "norm_op", "nonlin"], 1, 2, deep_supervision=False)
    assert isinstance(net, VerSemiUNet) and net(torch.randn(1, 1, 8, 8, 8), 2).shape == (1, 2, 8, 8, 8)
    with pytest.raises(TypeError, match="num_tasks"):
        VerSemiUNet(**_unet(3))
