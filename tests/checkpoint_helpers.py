"""Shared checks of the official-checkpoint converters (tests/checkpoints/).

Each converter test writes its OWN table ``our name -> official name`` (regex rows, written from the
official code) and uses these helpers to (1) turn a randomly initialised network of ours into an
official-format state dict, (2) convert it back onto a freshly initialised network and compare every
tensor and the outputs, (3) check that a missing, an extra and a mis-shaped tensor are each named.
"""
import re

import pytest
import torch

import official_names as names
from nnunet_plugins.architectures.banet import BANetPlainConvUNet
from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.checkpoints.common import CheckpointMismatch


def randomize(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every parameter (norm weights around 1) so a swapped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return network


def to_official(network: torch.nn.Module, table, prefix: str = "") -> dict:
    """Official-format state dict of ``network``: every tensor once (aliases skipped), renamed by the first
    row of ``table`` ((pattern, replacement) with ``re.fullmatch`` semantics) that matches; a name no
    row matches fails the test (the table must cover the whole network)."""
    out = {}
    for name, tensor in list(network.named_parameters()) + list(network.named_buffers()):
        if name not in network.state_dict():
            continue  # non-persistent buffers are not in checkpoints
        for pattern, repl in table:
            if re.fullmatch(pattern, name):
                official = re.sub(f"^{pattern}$", repl, name)
                break
        else:
            pytest.fail(f"the test's official name table has no row for {name}")
        assert prefix + official not in out, f"two tensors named {official}"
        out[prefix + official] = tensor.detach().clone()
    return out


def assert_roundtrip(source: torch.nn.Module, target: torch.nn.Module, official: dict, convert, forward) -> dict:
    """``convert(official, target)`` loads into ``target`` and reproduces ``source``: every tensor and the
    output of ``forward(network)``."""
    weights = convert(official, target)
    target.load_state_dict(weights, strict=True)
    src = source.state_dict()
    assert set(target.state_dict()) == set(src)
    for k, v in target.state_dict().items():
        assert torch.equal(v, src[k]), f"{k} differs after conversion"
    source.eval(), target.eval()
    with torch.no_grad():
        a, b = forward(source), forward(target)
    for x, y in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    return weights


def assert_mismatches_named(official: dict, network: torch.nn.Module, convert, drop: str, ours_of_drop: str,
                            reshape: str, ours_of_reshape: str) -> None:
    """A missing, an extra and a mis-shaped official tensor each raise CheckpointMismatch naming it."""
    missing = {k: v for k, v in official.items() if k != drop}
    with pytest.raises(CheckpointMismatch, match=re.escape(ours_of_drop)):
        convert(missing, network)
    extra = dict(official, **{"not_a_layer.weight": torch.zeros(3)})
    with pytest.raises(CheckpointMismatch, match=r"no place.*'not_a_layer\.weight'"):
        convert(extra, network)
    wrong = dict(official)
    wrong[reshape] = torch.zeros(*[s + 1 for s in official[reshape].shape])
    with pytest.raises(CheckpointMismatch, match=re.escape(ours_of_reshape) + ".*" + re.escape(reshape)):
        convert(wrong, network)


# tiny configurations (constructor arguments) of every network with released weights
TINY_COTR = dict(stage_channels=[8, 16, 24, 24], blocks_per_stage=[2, 1, 1], num_heads=2, ffn_dim=32, num_encoder_layers=2,
            num_points=2)
TINY_DODNET = dict(features_per_stage=[8, 8, 16, 16, 16], blocks_per_stage=[1, 2, 1, 1, 1], norm_groups=4)
TINY_TRANSDODNET = dict(stem_channels=8, backbone_planes=[4, 8, 8], backbone_blocks=[1, 2, 1], d_model=24, n_heads=4,
                   d_ffn=48, num_encoder_layers=2, num_decoder_layers=2, n_levels=2, n_points=2,
                   decoder_channels=[8, 16, 16, 16])
TINY_UNISEG = dict(features_per_stage=[4, 8, 16], kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
              strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], stem_channels=[1, 2, 4], official_generic_unet=True)
TINY_BANET = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d, kernel_sizes=TINY_UNISEG["kernel_sizes"],
             strides=TINY_UNISEG["strides"], n_conv_per_stage=2, n_conv_per_stage_decoder=2, conv_bias=True,
             norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
             nonlin_kwargs={"negative_slope": 1e-2, "inplace": True}, official_v1_layout=True)


def official_checkpoints(n_in, n_labels, uniseg_classes, num_tasks, binary_channels):
    """method -> (a tiny network of ours with random weights, its checkpoint in the official format (names of
    tests/official_names.py, DataParallel 'module.' and wrapper prefixes), the arch kwargs a model folder needs).

    Single-task networks: ``n_in`` channels, ``n_labels`` classes; multi-task: ``num_tasks`` tasks, UniSeg
    ``uniseg_classes`` classes, DoDNet / TransDoDNet ``binary_channels`` outputs."""
    torch.manual_seed(0)
    nets = {
        "banet": (BANetPlainConvUNet(n_in, num_classes=n_labels, **TINY_BANET), names.BANET, "", {}),
        "cotr": (CoTr(n_in, n_labels, (16, 32, 32), official_axis_order=True, **TINY_COTR), names.COTR, "U_ResTran3D.", TINY_COTR),
        "uniseg": (UniSeg(n_in, uniseg_classes, num_tasks, patch_size=(8, 32, 32), **TINY_UNISEG), names.UNISEG, "", {}),
        "dodnet": (DoDNet(n_in, binary_channels, num_tasks, **TINY_DODNET), names.DODNET, "", TINY_DODNET),
        "transdodnet": (TransDoDNet(n_in, binary_channels, num_tasks, official_offset_normalizer=True, official_axis_order=True,
                                    **TINY_TRANSDODNET), names.transdodnet(4), "ResCNN_DeformTR.", TINY_TRANSDODNET),
    }
    out = {}
    for seed, (method, (net, table, prefix, kwargs)) in enumerate(nets.items()):
        out[method] = (randomize(net, seed), {"state_dict": to_official(net, table, "module." + prefix)}, kwargs)
    return out
