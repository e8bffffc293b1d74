"""The labeled-fraction protocol: splits_semi.json from splits_final.json, reproducible, recorded."""
import json
import os

import numpy as np
import pytest

from nnunet_plugins.semi.split import (default_splits, load_semi_split, num_labeled, parse_labeled,
                                       record_semi_split, semi_splits, write_semi_split)

CASES = [f"case_{i:03d}" for i in range(20)]


def test_parse_and_count():
    assert parse_labeled("4") == ("count", 4)
    assert parse_labeled("12.5%") == ("percent", 12.5)
    assert num_labeled("10%", 80) == 8 and num_labeled("20%", 80) == 16  # the papers' LA protocol
    assert num_labeled("10%", 62) == 6 and num_labeled("20%", 62) == 12  # Pancreas-CT
    assert num_labeled("1%", 10) == 1
    for bad in ("0", "-3", "abc", "0%", "150%"):
        with pytest.raises(ValueError):
            parse_labeled(bad)
    with pytest.raises(ValueError, match="fold 2 has 5"):
        num_labeled("6", 5, fold=2)


def test_default_split_is_nnunets():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ours = default_splits(CASES[::-1])
    theirs = generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)
    assert ours == [{"train": list(map(str, t["train"])), "val": list(map(str, t["val"]))} for t in theirs]


def test_semi_splits_partition_reproducible():
    splits = default_splits(CASES)
    a = semi_splits(splits, "4", seed=1)
    assert a == semi_splits(splits, "4", seed=1)
    assert a != semi_splits(splits, "4", seed=2)
    for fold, entry in zip(splits, a):
        assert entry["val"] == fold["val"] and entry["train"] == fold["train"]
        assert len(entry["labeled"]) == 4 and len(entry["unlabeled"]) == len(fold["train"]) - 4
        assert sorted(entry["labeled"] + entry["unlabeled"]) == sorted(fold["train"])
        assert not set(entry["labeled"]) & set(fold["val"])
    # folds draw differently
    assert len({tuple(e["labeled"]) for e in a}) > 1
    # independent of the order the fold lists its cases in
    shuffled = [{"train": list(np.random.default_rng(0).permutation(f["train"])), "val": f["val"]} for f in splits]
    assert [e["labeled"] for e in semi_splits(shuffled, "4", seed=1)] == [e["labeled"] for e in a]


def test_write_load_record(tmp_path):
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for c in CASES:
        (raw / "imagesTr" / f"{c}_0000.nii.gz").write_bytes(b"")
        (raw / "labelsTr" / f"{c}.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1},
                                                  "numTraining": 20, "file_ending": ".nii.gz"}))
    pre = tmp_path / "pre"
    path = write_semi_split(str(pre), "25%", seed=7, raw_dataset_folder=str(raw))
    final = json.loads((pre / "splits_final.json").read_text())
    assert final == default_splits(CASES)  # created as nnU-Net would
    content = json.loads(open(path).read())
    assert content["parameters"] == {"labeled": "25%", "seed": 7, "splits_file": "splits_final.json"}
    assert [len(s["labeled"]) for s in content["splits"]] == [4] * 5  # 25% of 16
    entry = load_semi_split(str(pre), 3, final[3]["train"])
    assert entry["labeled"] == content["splits"][3]["labeled"] and entry["parameters"]["seed"] == 7
    assert load_semi_split(str(tmp_path / "nothing"), 0) is None
    with pytest.raises(ValueError, match="no longer matches"):
        load_semi_split(str(pre), 3, final[3]["train"][1:])
    with pytest.raises(ValueError, match="5 folds"):
        load_semi_split(str(pre), 5)
    # an existing splits_final.json is used as it is
    custom = [{"train": CASES[:10], "val": CASES[10:]}, {"train": CASES[10:], "val": CASES[:10]}]
    (pre / "splits_final.json").write_text(json.dumps(custom))
    content = json.loads(open(write_semi_split(str(pre), "3")).read())
    assert len(content["splits"]) == 2 and all(set(s["labeled"]) <= set(c["train"])
                                               for s, c in zip(content["splits"], custom))
    out = tmp_path / "fold_0"
    out.mkdir()
    rec = record_semi_split(str(out), entry["labeled"], entry["unlabeled"], ["un_1", "un_0"], entry["parameters"],
                            entry["file"])
    saved = json.loads(open(rec).read())
    assert saved["unlabeled_images"] == ["un_0", "un_1"] and saved["labeled"] == sorted(entry["labeled"])
    assert os.path.basename(rec) == "semi_split.json"


def test_cli_split(tmp_path, monkeypatch):
    from nnunet_plugins.cli import main

    pre = tmp_path / "pre" / "Dataset042_X"
    pre.mkdir(parents=True)
    (pre / "dataset.json").write_text("{}")
    (pre / "splits_final.json").write_text(json.dumps(default_splits(CASES)))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw_missing"))
    assert main(["semi", "split", "-d", "42", "--labeled", "2", "--seed", "3"]) == 0
    content = json.loads((pre / "splits_semi.json").read_text())
    assert content["parameters"]["labeled"] == "2" and all(len(s["labeled"]) == 2 for s in content["splits"])
    with pytest.raises(SystemExit):
        main(["semi", "split", "-d", "42", "--labeled", "two"])


def test_per_task_fraction():
    cases = [f"A_{i}" for i in range(6)] + [f"B_{i}" for i in range(9)]
    splits = default_splits(cases)
    task = {c: 0 if c.startswith("A") else 1 for c in cases}.__getitem__
    for entry, fold in zip(semi_splits(splits, "2", seed=3, task_of_case=task), splits):
        assert sorted(c[0] for c in entry["labeled"]) == ["A", "A", "B", "B"]
        assert sorted(entry["labeled"] + entry["unlabeled"]) == sorted(fold["train"])
    for entry, fold in zip(semi_splits(splits, "50%", seed=3, task_of_case=task), splits):
        for tag in "AB":
            n = sum(c.startswith(tag) for c in fold["train"])
            assert sum(c.startswith(tag) for c in entry["labeled"]) == max(1, int(n / 2 + 0.5))
