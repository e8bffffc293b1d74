"""Shared pieces of the converters: unwrapping checkpoint dicts, rule renaming, the strict alias-aware match."""
import pytest
import torch
from torch import nn

from nnunet_plugins.checkpoints.common import (CheckpointMismatch, convert_with, match_state_dict, read_checkpoint,
                                               rules_renamer, unwrap_state_dict)


def test_unwrap_finds_the_weights_under_any_wrapper_and_strips_prefixes():
    w = torch.ones(2)
    for ckpt in ({"a.weight": w}, {"state_dict": {"module.a.weight": w}, "epoch": 3},
                 {"model": {"module.Wrap.a.weight": w}, "optimizer": {}, "amp": {}},
                 {"network_weights": {"a.weight": w}, "init_args": {}}, {"model": {"state_dict": {"a.weight": w}}}):
        assert unwrap_state_dict(ckpt, "x", ("Wrap.",)) == {"a.weight": w}
    with pytest.raises(ValueError, match="one of"):
        unwrap_state_dict({"weights": {"a": w}}, "f.pth")
    with pytest.raises(ValueError, match="both become 'a.weight'"):
        unwrap_state_dict({"a.weight": w, "module.a.weight": w}, "f.pth")


def test_read_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "bad.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match="bad.pth"):
        read_checkpoint(str(tmp_path / "bad.pth"))


def test_rules_renamer_first_full_match_wins():
    rename = rules_renamer([(r"a\.(\d)", lambda m: f"b.{int(m[1]) + 1}"), (r"a\.(.+)", r"c.\1")])
    assert (rename("a.1"), rename("a.x"), rename("a.1.y"), rename("za.1")) == ("b.2", "c.x", "c.1.y", None)


class _Aliased(nn.Module):
    """A conv registered under two names (as dynamic-network-architectures' blocks do) and a buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 1)
        self.all_modules = nn.Sequential(self.conv)
        self.norm = nn.BatchNorm1d(3)


def test_match_fills_every_alias_and_names_each_problem():
    net = _Aliased()
    official = {"c.w": torch.randn(3, 2, 1), "c.b": torch.randn(3), "n.weight": torch.randn(3), "n.bias": torch.randn(3),
                "n.running_mean": torch.randn(3), "n.running_var": torch.rand(3), "n.num_batches_tracked": torch.tensor(5)}
    rename = rules_renamer([(r"c\.w", "conv.weight"), (r"c\.b", "conv.bias"), (r"n\.(.+)", r"norm.\1")])
    weights = convert_with(official, rename, net, "toy")
    assert set(weights) == set(net.state_dict())
    assert torch.equal(weights["all_modules.0.weight"], official["c.w"]) and torch.equal(weights["conv.weight"], official["c.w"])
    assert torch.equal(weights["norm.num_batches_tracked"], official["n.num_batches_tracked"])
    net.load_state_dict(weights, strict=True)

    bad = dict(official, **{"c.w": torch.randn(4, 2, 1), "extra.x": torch.zeros(1)})
    del bad["n.bias"]
    with pytest.raises(CheckpointMismatch) as e:
        convert_with(bad, rename, net, "toy")
    msg = str(e.value)
    assert "the toy network" in msg and "1 shape mismatches: conv.weight: official (4, 2, 1) vs ours (3, 2, 1)" in msg
    assert "missing in the checkpoint: norm.bias" in msg and "no place in our network: 'extra.x'" in msg
    # our names that are not the network's are named with their official origin
    with pytest.raises(CheckpointMismatch, match=r"'o\.z' \(-> nothere\)"):
        match_state_dict(dict(weights, nothere=torch.zeros(1)), net, "toy", origin={"nothere": "o.z"})
