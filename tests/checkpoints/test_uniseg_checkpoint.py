"""Official UniSeg checkpoints (yeerwen/UniSeg ``UniSeg_model``, nnU-Net v1) -> our UniSeg."""
import pytest
import torch

from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.checkpoints.common import CheckpointMismatch, unwrap_state_dict
from nnunet_plugins.checkpoints.uniseg import convert_state_dict, infer_official_architecture

from official_names import UNISEG
from official_names import V1_LAYER as LAYER
from checkpoint_helpers import assert_mismatches_named, assert_roundtrip, randomize, to_official

ARCH = dict(features_per_stage=[4, 8, 16], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], stem_channels=[1, 2, 4], official_generic_unet=True)
PATCH = (8, 32, 32)



def uniseg():
    return UniSeg(input_channels=2, num_classes=3, num_tasks=2, patch_size=PATCH, **ARCH)


def _convert(official, network):
    return convert_state_dict(unwrap_state_dict(official, "test"), network)


@pytest.mark.parametrize("channels", [1, 2])
def test_tiny_official_checkpoint_roundtrips_every_tensor_and_the_output(channels):
    torch.manual_seed(0)
    source = randomize(uniseg(), 1)
    official = {"state_dict": to_official(source, UNISEG), "epoch": 1000, "plot_stuff": ([], [], [], [])}
    x = torch.randn(2, channels, *PATCH)
    assert_roundtrip(source, uniseg(), official, _convert, lambda net: net(x, torch.tensor([1, 1])))


def test_architecture_is_read_from_the_official_tensors():
    official = to_official(randomize(uniseg(), 1), UNISEG)
    arch = infer_official_architecture(official)
    assert (arch["num_tasks"], arch["num_classes"], arch["patch_size"]) == (2, 3, list(PATCH))
    kwargs = arch["arch_kwargs"]
    assert {k: kwargs[k] for k in ARCH} == ARCH
    assert kwargs["n_conv_per_stage"] == [2, 2, 2] and kwargs["n_conv_per_stage_decoder"] == [2, 2]
    assert kwargs["fuse_channels"] == (16 + 2) // 4 and kwargs["conv_bias"] is True
    with pytest.raises(CheckpointMismatch, match="intermedia_prompt"):
        infer_official_architecture({k: v for k, v in official.items() if k != "intermedia_prompt"})


def test_tiny_mismatches_are_named():
    official = to_official(randomize(uniseg(), 1), UNISEG)
    assert_mismatches_named(official, uniseg(), convert_state_dict,
                            drop="conv_blocks_context.0.blocks.0.conv_4.weight",
                            ours_of_drop="encoder.stages.0.0.convs.0.conv.convs.4.weight",
                            reshape="intermedia_prompt", ours_of_reshape="universal_prompt")


def test_official_configuration_count():
    """Official configuration (6 stages 32..320, stems 1/2/4, 11 tasks, 4 classes): 32,114,381 parameters."""
    net = UniSeg(input_channels=4, num_classes=4, num_tasks=11, stem_channels=(1, 2, 4))
    table = [(r"encoder\.stages\.([0-4])\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
              lambda m: f"conv_blocks_context.{m[1]}.blocks.{m[2]}.{LAYER[m[3]]}.{m[4]}"),
             (r"encoder\.stages\.5\.0\.convs\.(\d)\.(conv|norm)\.(weight|bias)",
              lambda m: f"conv_blocks_context.5.{m[1]}.blocks.0.{LAYER[m[2]]}.{m[3]}")]
    official = to_official(net, UNISEG[:1] + table + UNISEG[3:])
    assert sum(v.numel() for v in official.values()) == 32_114_381
    assert official["tu.0.weight"].shape == (321, 320, 2, 2, 2)   # bottleneck + task prompt channel
    assert infer_official_architecture(official)["patch_size"] == [64, 192, 192]
    convert_state_dict(official, net)
