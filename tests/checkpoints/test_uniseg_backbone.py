"""Downstream fine-tuning: a UniSeg backbone converts into nnU-Net's PlainConvUNet (prompt dropped)."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from torch import nn

from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.checkpoints.uniseg import uniseg_backbone_state_dict

ARCH = dict(features_per_stage=(4, 8, 16), kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
            strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)))


def plain(input_channels, num_classes=3):
    return PlainConvUNet(input_channels, 3, list(ARCH["features_per_stage"]), nn.Conv3d, ARCH["kernel_sizes"],
                         ARCH["strides"], 2, num_classes, 2, True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True},
                         None, None, nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def uniseg(**kw):
    torch.manual_seed(0)
    return UniSeg(2, 4, 3, patch_size=(8, 32, 32), task_input_channels=(1, 2, 2), **ARCH, **kw)


@pytest.mark.parametrize("channels", [1, 2])
def test_backbone_loads_into_plain_unet_with_nnunets_loader(channels, tmp_path):
    up = uniseg(official_generic_unet=False)
    down = plain(channels)
    state, notes = uniseg_backbone_state_dict(up.state_dict(), down.state_dict())
    torch.save({"network_weights": state}, tmp_path / "b.pth")
    load_pretrained_weights(down, str(tmp_path / "b.pth"))   # what nnUNetv2_train -pretrained_weights does
    # the encoder is UniSeg's encoder with the stem of this channel count
    x = torch.randn(2, channels, 8, 32, 32)
    with torch.no_grad():
        for a, b in zip(down.encoder(x), up.encoder(x)):
            torch.testing.assert_close(a, b)
    # decoder weights are UniSeg's; the first transposed conv lost only the prompt's input channel
    torch.testing.assert_close(down.decoder.transpconvs[0].weight, up.decoder.transpconvs[0].weight[:-1])
    torch.testing.assert_close(down.decoder.stages[1].convs[1].conv.weight, up.decoder.stages[1].convs[1].conv.weight)
    assert not any("universal_prompt" in k or k.startswith("fuse") for k in state)


def test_official_style_backbone_gets_zero_transposed_conv_biases():
    up = UniSeg(2, 4, 3, patch_size=(8, 32, 32), features_per_stage=(4, 8, 16), kernel_sizes=(3, 3, 3),
                strides=((1, 1, 1), (1, 2, 2), (2, 2, 2)), task_input_channels=(1, 2, 2))
    down = PlainConvUNet(1, 3, [4, 8, 16], nn.Conv3d, 3, ARCH["strides"], 2, 3, 2, True, nn.InstanceNorm3d,
                         {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})
    state, notes = uniseg_backbone_state_dict(up.state_dict(), down.state_dict())
    assert (state["decoder.transpconvs.1.bias"] == 0).all() and any("no bias" in n for n in notes)
    down.load_state_dict({**down.state_dict(), **state})


def test_mismatches_are_named():
    up = uniseg(official_generic_unet=False)
    with pytest.raises(ValueError, match=r"stems for \['1', '2'\] input channels.*has 3"):
        uniseg_backbone_state_dict(up.state_dict(), plain(3).state_dict())
    wider = PlainConvUNet(1, 3, [4, 8, 32], nn.Conv3d, ARCH["kernel_sizes"], ARCH["strides"], 2, 3, 2, True,
                          nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True})
    with pytest.raises(ValueError, match="architectures differ"):
        uniseg_backbone_state_dict(up.state_dict(), wider.state_dict())
