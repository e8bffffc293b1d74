"""Official CoTr checkpoints (YtongXie/CoTr ``ResTranUnet``) -> our CoTr: names, shapes, outputs, errors."""
import pytest
import torch

from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.checkpoints.common import CheckpointMismatch, unwrap_state_dict
from nnunet_plugins.checkpoints.cotr import (PREFIXES, convert_official_cotr_state_dict, convert_state_dict,
                                             load_official_cotr_weights)

from official_names import COTR
from checkpoint_helpers import assert_mismatches_named, assert_roundtrip, randomize, to_official

TINY = dict(input_channels=1, num_classes=3, patch_size=(16, 32, 32), stage_channels=(8, 16, 24, 24),
            blocks_per_stage=(2, 1, 1), num_heads=2, ffn_dim=32, num_encoder_layers=2, num_points=2,
            official_axis_order=True)



def _convert(official, network):
    return convert_state_dict(unwrap_state_dict(official, "test", PREFIXES), network)


def test_tiny_official_checkpoint_roundtrips_every_tensor_and_the_output():
    torch.manual_seed(0)
    source = randomize(CoTr(**TINY), 1)
    official = {"state_dict": to_official(source, COTR, prefix="module.U_ResTran3D.")}
    x = torch.randn(1, 1, 16, 32, 32)
    assert_roundtrip(source, CoTr(**TINY), official, _convert, lambda net: net(x))
    # the same through the loader (checkpoint dict, official axis order required)
    target = CoTr(**TINY)
    load_official_cotr_weights(target, official)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_tiny_mismatches_are_named():
    source = randomize(CoTr(**TINY), 1)
    official = to_official(source, COTR)
    assert_mismatches_named(official, CoTr(**TINY), convert_state_dict,
                            drop="ds1_cls_conv.bias", ours_of_drop="decoder.ds_heads.1.bias",
                            reshape="stage0_de.resconv2.conv.weight", ours_of_reshape="decoder.blocks.2.conv2.conv.weight")


def _official_state_dict(num_classes=14, in_ch=1):
    """An official ResTranUnet state dict built from the official module/parameter naming, filled with
    distinct random numbers (names and shapes as the official code creates them)."""
    sd = {}
    g = torch.Generator().manual_seed(0)

    def add(name, *shape):
        sd["U_ResTran3D." + name] = torch.randn(*shape, generator=g)

    def inorm(prefix, c):
        add(prefix + ".weight", c)
        add(prefix + ".bias", c)

    add("backbone.conv1.weight", 64, in_ch, 7, 7, 7)
    inorm("backbone.norm1", 64)
    cin = 64
    for layer, (cout, n) in enumerate(zip((192, 384, 384), (3, 3, 2)), start=1):
        for j in range(n):
            add(f"backbone.layer{layer}.{j}.conv1.weight", cout, cin if j == 0 else cout, 3, 3, 3)
            inorm(f"backbone.layer{layer}.{j}.norm1", cout)
            if j == 0:
                add(f"backbone.layer{layer}.0.downsample.0.weight", cout, cin, 1, 1, 1)
                inorm(f"backbone.layer{layer}.0.downsample.1", cout)
        cin = cout
    add("encoder_Detrans.level_embed", 2, 384)
    for i in range(6):
        p = f"encoder_Detrans.encoder.layers.{i}."
        for name, o, k in (("self_attn.sampling_offsets", 144, 384), ("self_attn.attention_weights", 48, 384),
                           ("self_attn.value_proj", 384, 384), ("self_attn.output_proj", 384, 384),
                           ("linear1", 1536, 384), ("linear2", 384, 1536)):
            add(p + name + ".weight", o, k)
            add(p + name + ".bias", o)
        inorm(p + "norm1", 384)
        inorm(p + "norm2", 384)
    for stage, (cin, cout) in zip((2, 1, 0), ((384, 384), (384, 192), (192, 64))):
        add(f"transposeconv_stage{stage}.weight", cin, cout, 2, 2, 2)
        for r in (1, 2):
            add(f"stage{stage}_de.resconv{r}.conv.weight", cout, cout, 3, 3, 3)
            inorm(f"stage{stage}_de.resconv{r}.norm", cout)
        add(f"ds{stage}_cls_conv.weight", num_classes, cout, 1, 1, 1)
        add(f"ds{stage}_cls_conv.bias", num_classes)
    add("cls_conv.weight", num_classes, 64, 1, 1, 1)
    add("cls_conv.bias", num_classes)
    return sd


def test_official_checkpoint_mapping():
    sd = _official_state_dict()
    assert sum(v.numel() for v in sd.values()) == 41_872_504  # the official naming covers every parameter
    net = CoTr(official_axis_order=True)
    load_official_cotr_weights(net, {"state_dict": {"module." + k: v for k, v in sd.items()}})
    own = net.state_dict()
    pairs = [("backbone.layer2.0.downsample.1.weight", "backbone.stages.1.0.shortcut.1.weight"),
             ("backbone.layer3.1.conv1.weight", "backbone.stages.2.1.conv.weight"),
             ("encoder_Detrans.encoder.layers.5.self_attn.sampling_offsets.bias",
              "transformer.layers.5.self_attn.sampling_offsets.bias"),
             ("transposeconv_stage2.weight", "decoder.upconvs.0.weight"),
             ("stage0_de.resconv2.norm.bias", "decoder.blocks.2.conv2.norm.bias"),
             ("ds1_cls_conv.weight", "decoder.ds_heads.1.weight"),
             ("cls_conv.bias", "decoder.seg_head.bias")]
    for official, ours in pairs:
        torch.testing.assert_close(own[ours], sd["U_ResTran3D." + official])
    assert len(convert_official_cotr_state_dict(sd)) == len(own)

    with pytest.raises(ValueError, match="official_axis_order"):
        load_official_cotr_weights(CoTr(), sd)
    bad = dict(sd)
    bad["U_ResTran3D.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="extra.weight"):
        load_official_cotr_weights(net, bad)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_official_cotr_weights(CoTr(num_classes=5, official_axis_order=True), sd)
    missing = {k: v for k, v in sd.items() if "cls_conv" not in k}
    with pytest.raises(ValueError, match="missing in the checkpoint"):
        load_official_cotr_weights(net, missing)
