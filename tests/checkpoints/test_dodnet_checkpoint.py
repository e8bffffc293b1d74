"""Official DoDNet checkpoints (jianpengz/DoDNet ``a_DynConv/unet3D_DynConv882.py``) -> our DoDNet."""
import torch

from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.checkpoints.common import unwrap_state_dict
from nnunet_plugins.checkpoints.dodnet import convert_state_dict

from official_names import DODNET
from checkpoint_helpers import assert_mismatches_named, assert_roundtrip, randomize, to_official

TINY = dict(num_tasks=3, features_per_stage=(8, 8, 16, 16, 16), blocks_per_stage=(1, 2, 1, 1, 1), norm_groups=4)


def _convert(official, network):
    return convert_state_dict(unwrap_state_dict(official, "test"), network)


def test_tiny_official_checkpoint_roundtrips_every_tensor_and_the_output():
    torch.manual_seed(0)
    source = randomize(DoDNet(**TINY), 1)
    # the FP16 training script's checkpoint: {'model': DataParallel state dict, 'optimizer', 'amp'}
    official = {"model": to_official(source, DODNET, prefix="module."), "optimizer": {}, "amp": {}}
    x = torch.randn(2, 1, 16, 16, 16)
    task = torch.tensor([2, 0])
    assert_roundtrip(source, DoDNet(**TINY), official, _convert, lambda net: net(x, task))


def test_tiny_mismatches_are_named():
    official = to_official(randomize(DoDNet(**TINY), 1), DODNET)
    assert_mismatches_named(official, DoDNet(**TINY), convert_state_dict,
                            drop="x2_resb.0.gn2.weight", ours_of_drop="decoder_blocks.2.norm2.weight",
                            reshape="controller.weight", ours_of_reshape="controller.weight")


def test_official_configuration_names_and_shapes():
    """The official network's names and shapes, enumerated from unet3D([1, 2, 2, 2, 2]) with weight_std
    (no conv biases; precls_conv's plain Conv3d and the controller have one), fit our default DoDNet."""
    sd, cin = {"conv1.weight": (32, 1, 3, 3, 3)}, 32

    def block(name, cin, cout):
        sd.update({f"{name}.gn1.weight": (cin,), f"{name}.gn1.bias": (cin,), f"{name}.conv1.weight": (cout, cin, 3, 3, 3),
                   f"{name}.gn2.weight": (cout,), f"{name}.gn2.bias": (cout,), f"{name}.conv2.weight": (cout, cout, 3, 3, 3)})

    for k, (cout, n, strided) in enumerate(zip((32, 64, 128, 256, 256), (1, 2, 2, 2, 2), (0, 1, 1, 1, 1))):
        for j in range(n):
            block(f"layer{k}.{j}", cin if j == 0 else cout, cout)
        if strided or cin != cout:
            sd.update({f"layer{k}.0.downsample.0.weight": (cin,), f"layer{k}.0.downsample.0.bias": (cin,),
                       f"layer{k}.0.downsample.2.weight": (cout, cin, 1, 1, 1)})
        cin = cout
    sd.update({"fusionConv.0.weight": (256,), "fusionConv.0.bias": (256,), "fusionConv.2.weight": (256, 256, 1, 1, 1)})
    for name, ci, co in (("x8_resb.0", 256, 128), ("x4_resb.0", 128, 64), ("x2_resb.0", 64, 32), ("x1_resb.0", 32, 32)):
        block(name, ci, co)
        if ci != co:
            sd.update({f"{name}.downsample.0.weight": (ci,), f"{name}.downsample.0.bias": (ci,),
                       f"{name}.downsample.2.weight": (co, ci, 1, 1, 1)})
    sd.update({"precls_conv.0.weight": (32,), "precls_conv.0.bias": (32,), "precls_conv.2.weight": (8, 32, 1, 1, 1),
               "precls_conv.2.bias": (8,), "GAP.0.weight": (256,), "GAP.0.bias": (256,),
               "controller.weight": (162, 256 + 7, 1, 1, 1), "controller.bias": (162,)})
    official = {k: torch.zeros(s) for k, s in sd.items()}
    assert sum(v.numel() for v in official.values()) == 17_329_528   # the official parameter count
    net = DoDNet()
    net.load_state_dict(convert_state_dict(official, net), strict=True)
