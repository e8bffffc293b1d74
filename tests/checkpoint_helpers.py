"""Shared checks of the official-checkpoint converters (tests/checkpoints/).

Each converter test writes its OWN table ``our name -> official name`` (regex rows, written from the
official code) and uses these helpers to (1) turn a randomly initialised network of ours into an
official-format state dict, (2) convert it back onto a freshly initialised network and compare every
tensor and the outputs, (3) check that a missing, an extra and a mis-shaped tensor are each named.
"""
import re

import pytest
import torch

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
