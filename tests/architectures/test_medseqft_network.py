"""MedSeqFTNetwork: the plans' U-Net with one segmentation head per task (heads at every decoder stage)."""
import pytest
import torch
from torch import nn

from nnunet_plugins.architectures.blocks.lora import add_lora, lora_parameters, merge_lora
from nnunet_plugins.architectures.medseqft import MedSeqFTNetwork, head_prefix, load_previous_model
from nnunet_plugins.trainers.medseqft import task_outputs

UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
FEATURES = [4, 8, 16]


def _kwargs():
    return dict(n_stages=3, features_per_stage=FEATURES, conv_op=nn.Conv3d, kernel_sizes=[[3, 3, 3]] * 3,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1],
                conv_bias=True, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def _net(task_classes, deep_supervision=True, seed=0):
    torch.manual_seed(seed)
    return MedSeqFTNetwork(1, task_classes[-1], UNET, _kwargs(), task_classes=task_classes,
                           deep_supervision=deep_supervision)


def _plain_unet(num_classes):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, num_classes=num_classes, deep_supervision=True, **{k: v for k, v in _kwargs().items()})


def test_heads_shapes_and_parameter_count():
    net = _net([2, 3, 4])
    x = torch.randn(2, 1, 16, 16, 16)
    assert net.num_tasks == 3 and net.task == 2 and net.task_classes == [2, 3, 4]
    for task, k in enumerate([2, 3, 4]):
        net.set_task(task)
        out = net(x)
        assert [tuple(o.shape) for o in out] == [(2, k, 16, 16, 16), (2, k, 8, 8, 8)]
    # decoder stage s outputs features_per_stage[-(s + 2)]; each extra task adds a 1x1 conv (+ bias) per stage
    extra = sum((FEATURES[-(s + 2)] + 1) * k for k in (3, 4) for s in range(2))
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in _plain_unet(2).parameters()) + extra
    with pytest.raises(ValueError, match="task 3 does not exist"):
        net.set_task(3)
    with pytest.raises(ValueError, match="num_classes 5 is not the last task's 4"):
        MedSeqFTNetwork(1, 5, UNET, _kwargs(), task_classes=[2, 3, 4])


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_task_outputs_of_one_pass_equal_each_head_forward(deep_supervision):
    net = _net([2, 3, 2], deep_supervision).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    together = task_outputs(net, x, [0, 1, 2])
    for task in range(3):
        net.set_task(task)
        alone = net(x)
        alone = alone if deep_supervision else [alone]
        got = together[task] if deep_supervision else [together[task]]
        assert len(got) == len(alone)
        for a, b in zip(got, alone):
            torch.testing.assert_close(a, b)


def test_previous_model_loads_body_and_old_heads_only():
    plain = _plain_unet(5)
    net = _net([2])
    load_previous_model(net, plain.state_dict(), 0)      # M_0: the plain U-Net's body; its 5-class head is not task 1's
    own = net.state_dict()
    for key, value in plain.state_dict().items():
        if ".seg_layers." not in key:
            torch.testing.assert_close(own["unet." + key], value)
    previous = _net([2], seed=1)
    grown = _net([2, 3], seed=2)
    fresh_head = grown.unet.decoder.seg_layers[0].heads[1].weight.clone()
    load_previous_model(grown, previous.state_dict(), 1)
    torch.testing.assert_close(grown.unet.decoder.seg_layers[0].heads[0].weight,
                               previous.unet.decoder.seg_layers[0].heads[0].weight)
    torch.testing.assert_close(grown.unet.decoder.seg_layers[0].heads[1].weight, fresh_head)   # new head kept
    broken = dict(previous.state_dict())
    broken.pop("unet.decoder.seg_layers.1.heads.0.bias")
    with pytest.raises(ValueError, match="missing \\['unet.decoder.seg_layers.1.heads.0.bias'\\]"):
        load_previous_model(grown, broken, 1)


def test_lora_student_trains_adapters_and_new_head_only_and_merges_exactly():
    net = _net([2, 3])
    add_lora(net, rank=2, exclude=[head_prefix(1)])
    for stage in net.task_heads:
        stage.heads[1].requires_grad_(True)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if "lora_" in n or ".heads.1." in n}
    assert all("lora" not in n for n in trainable if ".heads.1." in n)   # the new head is trained fully, no adapter
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_(0, 0.1)
    net.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    adapted = [task_outputs(net, x, [0, 1])[t] for t in (0, 1)]
    merge_lora(net)
    assert not any("lora" in k for k in net.state_dict())
    merged = task_outputs(net, x, [0, 1])
    for t in (0, 1):
        for a, b in zip(adapted[t], merged[t]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
