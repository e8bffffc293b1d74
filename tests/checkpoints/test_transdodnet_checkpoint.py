"""Official TransDoDNet checkpoints (jianpengz/DoDNet ``TransDoD/``) -> our TransDoDNet."""
import torch
import torch.nn.functional as F

from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.checkpoints.common import unwrap_state_dict
from nnunet_plugins.checkpoints.transdodnet import PREFIXES, convert_state_dict

from official_names import transdodnet
from checkpoint_helpers import assert_mismatches_named, assert_roundtrip, randomize, to_official

TINY = dict(num_tasks=3, stem_channels=8, backbone_planes=(4, 8, 8), backbone_blocks=(1, 2, 1), d_model=24, n_heads=4,
            d_ffn=48, num_encoder_layers=2, num_decoder_layers=2, n_levels=2, n_points=2,
            decoder_channels=(8, 16, 16, 16), official_offset_normalizer=True, official_axis_order=True)




def _convert(official, network):
    return convert_state_dict(unwrap_state_dict(official, "test", PREFIXES), network)


def test_tiny_official_checkpoint_roundtrips_every_tensor_and_the_output():
    torch.manual_seed(0)
    source = randomize(TransDoDNet(**TINY), 1)
    official = {"state_dict": to_official(source, transdodnet(4), prefix="module.ResCNN_DeformTR."), "epoch": 3}
    x = torch.randn(2, 1, 16, 32, 32)
    task = torch.tensor([1, 2])
    assert_roundtrip(source, TransDoDNet(**TINY), official, _convert, lambda net: net.forward_all_tasks(x))
    target = TransDoDNet(**TINY)
    target.load_state_dict(_convert(official, target))
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(x, task), source.eval()(x, task), rtol=0, atol=0)


def test_decoder_layer_norms_are_mapped_by_meaning():
    """Our decoder layer with converted weights computes the official forward_post written out with the
    OFFICIAL names: norm2 after the self-attention, norm1 after the cross-attention, norm3 after the FFN."""
    torch.manual_seed(0)
    official = to_official(randomize(TransDoDNet(**TINY), 3), transdodnet(4))
    net = TransDoDNet(**TINY)
    net.load_state_dict(convert_state_dict(official, net))
    layer = net.decoder_layers[0].eval()
    p, a = "transformer.decoder.layers.0", layer.residual_scale
    shapes = [(2, 4, 4), (1, 2, 2)]
    memory, tgt, pos = torch.randn(1, 36, 24), torch.randn(1, 3, 24), torch.randn(1, 3, 24)
    ref = torch.rand(1, 3, 3)

    def norm(x, name):
        return F.layer_norm(x, (24,), official[f"{p}.{name}.weight"], official[f"{p}.{name}.bias"])

    with torch.no_grad():
        q = tgt + pos
        t = norm(a * tgt + layer.self_attn(q, q, tgt, need_weights=False)[0], "norm2")
        t = norm(a * t + layer.cross_attn(t + pos, ref, memory, shapes), "norm1")
        ffn = F.linear(F.relu(F.linear(t, official[f"{p}.linear1.weight"], official[f"{p}.linear1.bias"])),
                       official[f"{p}.linear2.weight"], official[f"{p}.linear2.bias"])
        expected = norm(a * t + ffn, "norm3")
        torch.testing.assert_close(layer(tgt, pos, ref, memory, shapes), expected)


def test_tiny_mismatches_are_named():
    official = to_official(randomize(TransDoDNet(**TINY), 1), transdodnet(4))
    assert_mismatches_named(official, TransDoDNet(**TINY), convert_state_dict,
                            drop="transformer.decoder.layers.1.norm1.bias", ours_of_drop="decoder_layers.1.norm2.bias",
                            reshape="shortcut_conv2.0.weight", ours_of_reshape="skip_projs.0.0.weight")


def test_official_configuration_names_and_count():
    """The official configuration (ResNet-50, 5 levels) in official names: 39,049,941 parameters, all placed."""
    net = TransDoDNet(official_offset_normalizer=True, official_axis_order=True)
    official = to_official(net, transdodnet(5))
    assert sum(v.numel() for v in official.values()) == 39_049_941
    for name in ("backbone.layer4.2.conv3.weight", "transformer.decoder.layers.2.norm1.weight", "shortcut_conv3.0.weight",
                 "stage0_de.norm2.bias", "transposeconv_stage3.weight", "memory_conv3_l0.1.weight", "cnn_bottle.0.weight"):
        assert name in official
    assert official["shortcut_conv3.0.weight"].shape == (256, 1024, 1, 1, 1)   # 256 * expansion -> 256
    assert official["transposeconv_stage0.weight"].shape == (64, 32, 2, 2, 2)
    weights = convert_state_dict(official, net)
    assert torch.equal(weights["decoder_layers.2.norm2.weight"], official["transformer.decoder.layers.2.norm1.weight"])
