"""UniSeg network: official parameter count, shapes, task conditioning, stems, clear errors."""
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.architectures.uniseg import (
    OFFICIAL_FEATURES, OFFICIAL_KERNELS, OFFICIAL_STRIDES, UniSeg,
)

TINY = dict(patch_size=(8, 32, 32), features_per_stage=(4, 8, 16), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
            strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), official_generic_unet=False)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_official_configuration_has_the_official_parameter_count():
    # 11 tasks (MOTS x7, VerSe20, Prostate, BraTS21, AutoPET), 1/2/4-channel stems, largest task has 4 classes
    net = UniSeg(input_channels=4, num_classes=4, num_tasks=11, stem_channels=(1, 2, 4))
    assert n_params(net) == 32_114_381
    assert tuple(net.universal_prompt.shape) == (1, 11, 4, 6, 6)
    assert [c.conv.out_channels for c in net.fuse.convs] == [82, 82, 11]   # (320 + 11) // 4 = 82
    assert net.decoder.transpconvs[0].in_channels == 321


def test_v2_convention_is_plain_conv_unet_plus_the_prompt_parts():
    net = UniSeg(input_channels=4, num_classes=4, num_tasks=11, stem_channels=(1, 2, 4), official_generic_unet=False)
    unet = PlainConvUNet(1, 6, OFFICIAL_FEATURES, nn.Conv3d, OFFICIAL_KERNELS, OFFICIAL_STRIDES, 2, 4, 2, True,
                         nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)
    k0 = int(np.prod(OFFICIAL_KERNELS[0]))
    stems = sum(c * 32 * k0 + 32 for c in (2, 4))                  # the stems beyond the 1-channel one
    prompt_channel = 320 * int(np.prod(OFFICIAL_STRIDES[-1]))      # 321st input channel of the first transp. conv
    c, t, h = 320, 11, 82
    fuse = sum(i * o * 27 + o + 2 * o for i, o in ((c + t, h), (h, h), (h, t)))
    prompt = 11 * 4 * 6 * 6
    assert n_params(net) == n_params(unet) + stems + prompt_channel + fuse + prompt


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_shapes_3d(deep_supervision):
    net = UniSeg(2, 4, 3, deep_supervision=deep_supervision, **TINY)
    out = net(torch.randn(2, 2, 8, 32, 32), torch.tensor([0, 2]))
    if deep_supervision:
        assert [tuple(o.shape) for o in out] == [(2, 4, 8, 32, 32), (2, 4, 8, 16, 16)]
    else:
        assert tuple(out.shape) == (2, 4, 8, 32, 32)


def test_shapes_2d():
    net = UniSeg(1, 3, 2, patch_size=(32, 32), features_per_stage=(4, 8, 16), kernel_sizes=(3, 3, 3),
                 strides=(1, 2, 2), conv_op=nn.Conv2d, deep_supervision=False)
    assert tuple(net.universal_prompt.shape) == (1, 2, 8, 8)
    assert tuple(net(torch.randn(3, 1, 32, 32), 1).shape) == (3, 3, 32, 32)


def test_task_prompt_conditions_the_output_and_samples_are_independent():
    torch.manual_seed(0)
    net = UniSeg(2, 4, 3, task_input_channels=(1, 2, 2), **TINY).eval()
    x = torch.randn(4, 2, 8, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 1, 2, 1]))[0]
        assert not torch.allclose(net(x[1:2], torch.tensor([1]))[0], net(x[1:2], torch.tensor([2]))[0])
        for i, t in enumerate([0, 1, 2, 1]):
            single = net(x[i:i + 1], torch.tensor([t]))[0]
            torch.testing.assert_close(out[i:i + 1], single, rtol=1e-4, atol=1e-4)
        # the inference task set on the network is used when forward gets none
        net.set_inference_task(2)
        torch.testing.assert_close(net(x[2:3])[0], out[2:3], rtol=1e-4, atol=1e-4)


def test_task_input_channels_select_the_stem_and_ignore_padding():
    torch.manual_seed(0)
    net = UniSeg(3, 3, 2, task_input_channels=(1, 3), **TINY)
    x = torch.randn(2, 3, 8, 32, 32)
    out = net(x, torch.tensor([0, 0]))
    out[0].sum().backward()
    stems = net.encoder.stages[0][0].convs[0].conv.convs
    assert stems["1"].weight.grad.abs().sum() > 0 and stems["3"].weight.grad is None
    assert net.universal_prompt.grad.abs().sum() > 0
    # a task-0 sample only reads its first channel: the padding channels do not matter
    with torch.no_grad():
        y = x.clone()
        y[:, 1:] = 123.0
        torch.testing.assert_close(net(y, torch.tensor([0, 0]))[0], net(x, torch.tensor([0, 0]))[0])


def test_clear_errors():
    net = UniSeg(2, 3, 2, **TINY)
    with pytest.raises(RuntimeError, match="predict-multitask"):
        net(torch.randn(1, 2, 8, 32, 32))
    with pytest.raises(ValueError, match="task ids must be in 0..1"):
        net(torch.randn(1, 2, 8, 32, 32), torch.tensor([5]))
    with pytest.raises(RuntimeError, match=r"stems for \[2\] input channels"):
        net(torch.randn(1, 3, 8, 32, 32), 0)
    with pytest.raises(ValueError, match="divisible"):
        UniSeg(1, 3, 2, **{**TINY, "patch_size": (8, 30, 32)})
    with pytest.raises(ValueError, match="task_input_channels"):
        UniSeg(2, 3, 2, task_input_channels=(1,), **TINY)


def test_other_input_sizes_resize_the_prompt():
    net = UniSeg(1, 3, 2, deep_supervision=False, **TINY)
    assert tuple(net(torch.randn(1, 1, 16, 64, 32), 1).shape) == (1, 3, 16, 64, 32)
