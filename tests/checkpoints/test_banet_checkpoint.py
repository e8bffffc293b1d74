"""BA-Net protocol: the `banet split` command (official KiPA22 4-fold split) and the official-checkpoint converter."""
import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_plugins.cli import main as cli_main
from nnunet_plugins.checkpoints.banet import (CheckpointMismatch, build_network, convert_state_dict,
                                                     infer_official_architecture, plans_architecture)
from nnunet_plugins.training.crossval import kfold_split


def _raw_dataset(root, dataset_id=503, n=10):
    folder = os.path.join(root, f"Dataset{dataset_id}_KiPA")
    os.makedirs(os.path.join(folder, "labelsTr"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "vein": 1, "kidney": 2, "artery": 3,
                                                             "tumour": 4}, "numTraining": n,
                   "file_ending": ".nii.gz"}, f)
    ids = [f"case_{i:05d}" for i in range(n)]
    for i in reversed(ids):  # listing order must not matter
        open(os.path.join(folder, "labelsTr", i + ".nii.gz"), "w").close()
    return ids


def test_split_command_writes_splits_final(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
        os.makedirs(tmp_path / name)
    ids = _raw_dataset(str(tmp_path / "nnUNet_raw"))
    assert cli_main(["banet", "split", "-d", "503"]) == 0
    path = tmp_path / "nnUNet_preprocessed" / "Dataset503_KiPA" / "splits_final.json"
    splits = json.loads(path.read_text())
    assert splits == kfold_split(ids, 4, 12345)
    assert [len(s["val"]) for s in splits] == [3, 3, 2, 2]
    assert "4 folds" in capsys.readouterr().out
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp")]
    # rerun with the same split: fine; a different existing split is protected
    assert cli_main(["banet", "split", "-d", "Dataset503_KiPA"]) == 0
    with pytest.raises(SystemExit) as e:
        cli_main(["banet", "split", "-d", "503", "--folds", "5"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert cli_main(["banet", "split", "-d", "503", "--folds", "5", "--overwrite"]) == 0
    assert len(json.loads(path.read_text())) == 5


def test_split_command_without_cases_fails_clearly(tmp_path, monkeypatch, capsys):
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    folder = tmp_path / "nnUNet_raw" / "Dataset504_Empty"
    os.makedirs(folder / "labelsTr")
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "labels": {}, "channel_names": {}}))
    with pytest.raises(SystemExit):
        cli_main(["banet", "split", "-d", "504"])
    assert "no training cases" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ converter
def official_state_dict(dim=3, input_channels=1, num_classes=5, features=(4, 8, 16, 16), n_conv=2, seed=0,
                        kernels=None, strides=None):
    """A state dict with the official generic_BANetV2's parameter names and shapes (nnU-Net v1 Generic_UNet,
    strided-conv pooling, transposed-conv upsampling, IN, decoder kernels of the stage below, no bias in
    transposed convs and outputs), filled with random values."""
    g = torch.Generator().manual_seed(seed)
    n = len(features)
    kernels = kernels or ([[1, 3, 3]] + [[3, 3, 3]] * (n - 1) if dim == 3 else [[3, 3]] * n)
    strides = strides or ([[1] * dim, [1, 2, 2]] + [[2] * dim] * (n - 2) if dim == 3 else [[1, 1]] + [[2, 2]] * (n - 1))
    sd = OrderedDict()

    def block(prefix, cin, cout, k):
        sd[prefix + ".conv.weight"] = torch.randn(cout, cin, *k, generator=g) * 0.2
        sd[prefix + ".conv.bias"] = torch.randn(cout, generator=g) * 0.1
        sd[prefix + ".instnorm.weight"] = 1 + torch.randn(cout, generator=g) * 0.1
        sd[prefix + ".instnorm.bias"] = torch.randn(cout, generator=g) * 0.1

    cin = input_channels
    for d in range(n - 1):
        for i in range(n_conv):
            block(f"conv_blocks_context.{d}.blocks.{i}", cin if i == 0 else features[d], features[d], kernels[d])
        cin = features[d]
    for i in range(n_conv - 1):
        block(f"conv_blocks_context.{n - 1}.0.blocks.{i}", cin if i == 0 else features[-1], features[-1], kernels[-1])
    block(f"conv_blocks_context.{n - 1}.1.blocks.0", features[-1], features[-1], kernels[-1])
    for name, trans, head, out in (("conv_blocks_boundary", "tb", "bdr_outputs", 2),
                                   ("conv_blocks_localization", "tu", "seg_outputs", num_classes)):
        for u in range(n - 1):
            below, skip, k = features[n - 1 - u], features[n - 2 - u], kernels[n - 1 - u]
            sd[f"{trans}.{u}.weight"] = torch.randn(below, skip, *strides[n - 1 - u], generator=g) * 0.2
            for i in range(n_conv - 1):
                block(f"{name}.{u}.0.blocks.{i}", 2 * skip if i == 0 else skip, skip, k)
            block(f"{name}.{u}.1.blocks.0", skip, skip, k)
            sd[f"{head}.{u}.weight"] = torch.randn(out, skip, *([1] * dim), generator=g) * 0.3
    return sd, strides


def official_forward(sd, x, strides, n_conv=2):
    """The official network's forward, written out functionally over its state dict."""
    dim = x.ndim - 2
    conv, tconv = (F.conv3d, F.conv_transpose3d) if dim == 3 else (F.conv2d, F.conv_transpose2d)

    def block(h, prefix, stride=1):
        w = sd[prefix + ".conv.weight"]
        h = conv(h, w, sd[prefix + ".conv.bias"], stride=stride, padding=[(k - 1) // 2 for k in w.shape[2:]])
        h = F.instance_norm(h, weight=sd[prefix + ".instnorm.weight"], bias=sd[prefix + ".instnorm.bias"], eps=1e-5)
        return F.leaky_relu(h, 0.01)

    n = len(strides)
    skips = []
    for d in range(n - 1):
        for i in range(n_conv):
            x = block(x, f"conv_blocks_context.{d}.blocks.{i}", strides[d] if i == 0 else 1)
        skips.append(x)
    for i in range(n_conv - 1):
        x = block(x, f"conv_blocks_context.{n - 1}.0.blocks.{i}", strides[-1] if i == 0 else 1)
    x = block(x, f"conv_blocks_context.{n - 1}.1.blocks.0")
    y, segs, bdrs = x, [], []
    for u in range(n - 1):
        stride = strides[n - 1 - u]
        y = torch.cat((tconv(y, sd[f"tb.{u}.weight"], stride=stride), skips[-(u + 1)]), 1)
        for i in range(n_conv - 1):
            y = block(y, f"conv_blocks_boundary.{u}.0.blocks.{i}")
        y = block(y, f"conv_blocks_boundary.{u}.1.blocks.0")
        b = conv(y, sd[f"bdr_outputs.{u}.weight"])
        bdrs.append(b)
        x = tconv(x, sd[f"tu.{u}.weight"], stride=stride)
        x = (1 + torch.softmax(b, 1)[:, 1:2]) * x
        x = torch.cat((x, skips[-(u + 1)]), 1)
        for i in range(n_conv - 1):
            x = block(x, f"conv_blocks_localization.{u}.0.blocks.{i}")
        x = block(x, f"conv_blocks_localization.{u}.1.blocks.0")
        segs.append(conv(x, sd[f"seg_outputs.{u}.weight"]))
    return segs[::-1], bdrs[::-1]


def save_v1_checkpoint(sd, path):
    """As nnU-Net v1's save_checkpoint: epoch, state_dict, optimizer state, training curves (numpy floats)."""
    torch.save({"epoch": 1000, "state_dict": sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
                "lr_scheduler_state_dict": None,
                "plot_stuff": ([np.float64(0.9), np.float64(0.5)], [np.float64(0.8)], [], [np.float32(0.7)]),
                "best_stuff": (10, np.float64(0.4), np.float64(0.45), 3)}, path)


@pytest.mark.parametrize("dim", [3, 2])
def test_converted_official_checkpoint_reproduces_the_official_forward(tmp_path, capsys, dim):
    sd, strides = official_state_dict(dim=dim, input_channels=2, num_classes=5)
    path, out = str(tmp_path / "model_final_checkpoint.model"), str(tmp_path / "converted" / "banet.pth")
    save_v1_checkpoint(sd, path)
    assert cli_main(["banet", "convert", "-i", path, "-o", out]) == 0
    assert "5 classes" in capsys.readouterr().out
    converted = torch.load(out, map_location="cpu", weights_only=True)
    arch = converted["architecture"]
    assert arch["network_class_name"] == "nnunet_plugins.architectures.banet.BANetPlainConvUNet"
    assert arch["arch_kwargs"]["official_v1_layout"] is True
    assert arch["arch_kwargs"]["strides"] == strides
    assert arch["arch_kwargs"]["features_per_stage"] == [4, 8, 16, 16]
    net = build_network(arch, converted["input_channels"], converted["num_classes"])
    net.load_state_dict(converted["network_weights"], strict=True)
    assert sum(p.numel() for p in net.parameters()) == sum(v.numel() for v in sd.values())
    net.eval()
    x = torch.randn(2, 2, *((8, 16, 16) if dim == 3 else (16, 16)))
    with torch.no_grad():
        seg, bdr = net(x, return_boundary=True)
        ref_seg, ref_bdr = official_forward(sd, x, strides)
    assert len(seg) == len(ref_seg) == 3
    for a, b in zip(seg + bdr, ref_seg + ref_bdr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_convert_checks_a_plans_file(tmp_path, capsys):
    sd, strides = official_state_dict()
    path = str(tmp_path / "official.model")
    save_v1_checkpoint(sd, path)
    arch = plans_architecture(infer_official_architecture(sd))
    kwargs = {k: v for k, v in arch["arch_kwargs"].items() if k != "official_v1_layout"}
    plans = {"configurations": {"3d_fullres": {"architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": kwargs, "_kw_requires_import": arch["_kw_requires_import"]}}}}
    plans_file = tmp_path / "plans.json"
    plans_file.write_text(json.dumps(plans))
    assert cli_main(["banet", "convert", "-i", path, "-o", str(tmp_path / "a.pth"), "--plans", str(plans_file)]) == 0
    # plans with other feature counts do not fit the checkpoint
    kwargs["features_per_stage"] = [4, 8, 16, 32]
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(SystemExit) as e:
        cli_main(["banet", "convert", "-i", path, "-o", str(tmp_path / "b.pth"), "--plans", str(plans_file)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "official (16, 16" in err
    assert not os.path.exists(tmp_path / "b.pth")


def test_mismatches_are_named():
    sd, _ = official_state_dict()
    net = build_network(plans_architecture(infer_official_architecture(sd)), 1, 5)
    assert len(convert_state_dict(sd, net)) == len(net.state_dict())

    missing = OrderedDict(sd)
    del missing["bdr_outputs.1.weight"]
    with pytest.raises(CheckpointMismatch, match=r"boundary_decoder\.seg_layers\.1\.weight"):
        convert_state_dict(missing, net)

    extra = OrderedDict(sd)
    extra["conv_blocks_context.0.blocks.2.conv.weight"] = torch.zeros(4, 4, 1, 3, 3)
    extra["something_else.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch, match="something_else.weight") as e:
        convert_state_dict(extra, net)
    assert "encoder.stages.0.0.convs.2.conv.weight" in str(e.value)

    wrong = OrderedDict(sd)
    wrong["conv_blocks_localization.0.0.blocks.0.conv.weight"] = torch.zeros(16, 32, 1, 3, 3)
    with pytest.raises(CheckpointMismatch, match=r"decoder\.stages\.0\.convs\.0\.conv\.weight: official \(16, 32, 1, 3, 3\)"):
        convert_state_dict(wrong, net)


def test_not_a_banet_checkpoint(tmp_path, capsys):
    sd, _ = official_state_dict()
    plain = OrderedDict((k, v) for k, v in sd.items() if not k.startswith(("conv_blocks_boundary", "tb.", "bdr_")))
    path = str(tmp_path / "plain_unet.model")
    save_v1_checkpoint(plain, path)
    with pytest.raises(SystemExit):
        cli_main(["banet", "convert", "-i", path, "-o", str(tmp_path / "x.pth")])
    assert "not an official BA-Net checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["banet", "convert", "-i", str(tmp_path / "missing.model"), "-o", str(tmp_path / "x.pth")])
    assert "not found" in capsys.readouterr().err


class _Opaque:  # an arbitrary pickled object: refused unless the user allows full unpickling
    pass


def test_arbitrary_pickles_need_allow_pickle(tmp_path, capsys):
    sd, _ = official_state_dict()
    path = str(tmp_path / "odd.model")
    torch.save({"state_dict": sd, "extra": _Opaque()}, path)
    with pytest.raises(SystemExit):
        cli_main(["banet", "convert", "-i", path, "-o", str(tmp_path / "x.pth")])
    assert "--allow-pickle" in capsys.readouterr().err
    assert cli_main(["banet", "convert", "-i", path, "-o", str(tmp_path / "x.pth"), "--allow-pickle"]) == 0
