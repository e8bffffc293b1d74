"""DoDNet network: parameter counts, shapes, per-sample dynamic head, task conditioning, errors."""
import numpy as np
import pytest
import torch
from torch import nn

from nnunet_plugins.architectures.blocks.conv import WSConv2d, WSConv3d
from nnunet_plugins.architectures.dodnet import DoDNet

TINY = dict(features_per_stage=(8, 8, 16, 16, 16), blocks_per_stage=(1, 1, 1, 1, 1), norm_groups=4, head_channels=4)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_official_parameter_count_total_and_parts():
    net = DoDNet()  # 1 input channel, 2 classes (organ, tumour), 7 tasks
    assert _count(net) == 17_329_528
    parts = {name: _count(child) for name, child in net.named_children()}
    assert parts == {"stem": 864, "encoder_stages": 15_376_512, "fusion": 66_048, "decoder_blocks": 1_842_496,
                     "pre_head": 328, "gap_norm": 512, "controller": 42_768}
    # controller: 1x1 conv from GAP (256) ++ one-hot task (7) to the 162 head parameters, with bias
    assert net.controller.weight.shape == (162, 263, 1, 1, 1) and net.num_dynamic_params == 162
    assert parts["controller"] == 263 * 162 + 162
    assert parts["stem"] == 27 * 32  # 3x3x3, no bias


def test_count_follows_inputs_classes_and_tasks():
    base = 17_329_528
    net = DoDNet(input_channels=3, num_classes=4, num_tasks=11)
    p_head = 8 * 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4
    expected = base - 27 * 32 + 27 * 32 * 3 - (263 * 162 + 162) + (256 + 11) * p_head + p_head
    assert net.num_dynamic_params == p_head
    assert _count(net) == expected


def test_weight_standardised_convs_used_and_correct():
    net = DoDNet(**TINY)
    assert isinstance(net.stem, WSConv3d)
    assert type(net.pre_head[2]) is nn.Conv3d and type(net.controller) is nn.Conv3d  # plain, as official
    assert not isinstance(DoDNet(weight_standardization=False, **TINY).stem, WSConv3d)
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, padding=1, bias=False).double()
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    w = conv.weight.detach().numpy().reshape(4, -1)
    w = (w - w.mean(1, keepdims=True)) / np.sqrt(w.var(1, ddof=1, keepdims=True) + 1e-12)
    ref = torch.nn.functional.conv2d(x, torch.from_numpy(w).view(4, 3, 3, 3), padding=1)
    torch.testing.assert_close(conv(x), ref)


@pytest.mark.parametrize("conv_op,shape,strides", [
    (nn.Conv3d, (16, 16, 16), (1, 2, 2, 2, 2)),
    (nn.Conv3d, (8, 32, 16), (1, (1, 2, 2), (2, 2, 2), (2, 2, 1), 2)),
    (nn.Conv2d, (32, 48), (1, 2, 2, 2, 2)),
])
def test_output_shapes(conv_op, shape, strides):
    torch.manual_seed(0)
    net = DoDNet(input_channels=2, num_classes=3, num_tasks=4, conv_op=conv_op, strides=strides, **TINY)
    x = torch.randn(2, 2, *shape)
    out = net(x, torch.tensor([0, 3]))
    assert out.shape == (2, 3, *shape) and torch.isfinite(out).all()
    net.deep_supervision = True
    out = net(x, torch.tensor([1, 2]))
    assert isinstance(out, list) and len(out) == 1 and out[0].shape == (2, 3, *shape)


def test_dynamic_head_is_per_sample_and_task_conditioned():
    torch.manual_seed(0)
    net = DoDNet(num_tasks=3, **TINY).eval()
    x = torch.randn(3, 1, 16, 16, 16)
    tasks = torch.tensor([0, 2, 1])
    with torch.no_grad():
        batched = net(x, tasks)
        alone = torch.cat([net(x[i:i + 1], tasks[i:i + 1]) for i in range(3)])
        other_task = net(x, torch.tensor([1, 2, 1]))
    # GroupNorm and the grouped dynamic conv keep samples independent
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    # the task changes the head of sample 0 only
    assert (batched[0] - other_task[0]).abs().max() > 1e-4
    torch.testing.assert_close(batched[1:], other_task[1:])


def test_dynamic_params_from_gap_and_onehot():
    torch.manual_seed(0)
    net = DoDNet(num_tasks=3, **TINY)
    h = torch.randn(2, 16, 2, 2, 2)
    params = net.dynamic_params(h, torch.tensor([0, 2]))
    pooled = torch.relu(net.gap_norm(h)).mean(dim=(2, 3, 4))
    cond = torch.cat([pooled, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])], 1)
    ref = cond @ net.controller.weight.view(net.num_dynamic_params, -1).T + net.controller.bias
    torch.testing.assert_close(params, ref)


def test_gradients_reach_controller_and_backbone():
    torch.manual_seed(0)
    net = DoDNet(num_tasks=3, **TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    net(x, torch.tensor([0, 0])).square().mean().backward()
    for name in ("stem.weight", "encoder_stages.4.0.conv2.weight", "fusion.2.weight", "decoder_blocks.3.conv2.weight",
                 "pre_head.2.weight", "gap_norm.weight", "controller.weight", "controller.bias"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # only the one-hot column of the task in the batch (task 0) receives gradient
    task_cols = net.controller.weight.grad.view(net.num_dynamic_params, -1)[:, 16:]
    assert task_cols[:, 0].abs().sum() > 0 and task_cols[:, 1:].abs().sum() == 0


def test_inference_task_and_errors():
    torch.manual_seed(0)
    net = DoDNet(num_tasks=3, **TINY).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(RuntimeError, match="set_inference_task"):
        net(x)
    net.set_inference_task(2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x, torch.tensor([2])))
    with pytest.raises(ValueError, match="tasks 0..2"):
        net(x, torch.tensor([3]))
    with pytest.raises(ValueError, match="tasks 0..2"):
        net.set_inference_task(5)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 2, 16, 16, 16), 0)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 16, 16, 12), 0)
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.randn(1, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="GroupNorm"):
        DoDNet(features_per_stage=(8, 8, 16, 16, 16), norm_groups=16)
    with pytest.raises(ValueError, match="one entry per stage"):
        DoDNet(features_per_stage=(8, 16), blocks_per_stage=(1, 1, 1), strides=(1, 2))


def test_autocast_bfloat16_trains():
    from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss

    torch.manual_seed(0)
    net = DoDNet(num_tasks=3, **TINY)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor([0, 1]))
        loss = PartialLabelDiceBCELoss()(out, (x > 0).float().expand(-1, 2, -1, -1, -1))
    loss.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert torch.isfinite(net.controller.weight.grad).all() and net.stem.weight.grad.abs().sum() > 0
