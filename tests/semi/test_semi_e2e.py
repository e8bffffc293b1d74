"""End to end, as a user runs it: `nnunet-plugins synth --unlabeled` -> nnU-Net's plan and preprocess ->
`nnunet-plugins semi split` -> `nnunet-plugins semi preprocess` -> L + U batches drawn by nnU-Net's
worker processes (NonDetMultiThreadedAugmenter), and the semi split recorded in the fold folder.

The commands run in this process through the CLI's ``main`` (the code path of the console command, without
three more interpreter and torch start-ups) and nnU-Net's planning through its Python API, one worker, to
stay well under 1.5 minutes on 2 shared cores."""
import json
import os

import pytest
import torch

from nnunet_plugins.cli import main

pytestmark = pytest.mark.slow


def test_semi_split_preprocess_and_worker_batches(tmp_path, monkeypatch, capsys):
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(tmp_path / k)
        monkeypatch.setenv(k, str(tmp_path / k))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's planner cannot take 0
    from semi_helpers import make_trainer, plan_and_preprocess

    assert main(["synth", "-d", "612", "--cases", "8", "--test-cases", "0", "--unlabeled", "3", "--shape",
                 "16", "32", "32", "--structures", "2", "--seed", "4"]) == 0
    plan_and_preprocess(612)
    assert main(["semi", "split", "-d", "612", "--labeled", "25%", "--seed", "9"]) == 0
    assert main(["semi", "preprocess", "-d", "612", "--no-progress"]) == 0
    env = {k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset612_Synthetic")
    semi = json.load(open(os.path.join(pre, "splits_semi.json")))
    final = json.load(open(os.path.join(pre, "splits_final.json")))
    assert [s["val"] for s in semi["splits"]] == [s["val"] for s in final]
    assert [len(s["labeled"]) for s in semi["splits"]] == [2, 2, 2, 2, 2]  # 25% of 6 or 7 training cases
    un = os.path.join(pre, "nnUNetPlans_3d_fullres_unlabeled")
    assert sorted(f for f in os.listdir(un) if f.endswith(".pkl")) == \
        ["Synthetic_008.pkl", "Synthetic_009.pkl", "Synthetic_010.pkl"]
    # a rerun has nothing to do
    capsys.readouterr()
    assert main(["semi", "preprocess", "-d", "612", "--no-progress"]) == 0
    assert "0 case(s) preprocessed, 3 already done" in capsys.readouterr().out

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    from nnunet_plugins.semi.dataloading import UNLABELED_TARGET, get_semi_dataloaders
    from nnunet_plugins.semi.split import record_semi_split

    trainer = make_trainer(fold=1, dataset="Dataset612_Synthetic")
    train, val = get_semi_dataloaders(trainer, 2, 2)
    try:
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        assert isinstance(train.labeled, NonDetMultiThreadedAugmenter)
        assert isinstance(train.unlabeled, NonDetMultiThreadedAugmenter)
        fold = semi["splits"][1]
        seen_un = set()
        for _ in range(6):
            b = next(train)
            assert b["labeled"].tolist() == [True, True, False, False]
            assert set(b["keys"][:2]) <= set(fold["labeled"])
            seen_un |= set(b["keys"][2:])
            assert all((t[2:] == UNLABELED_TARGET).all() and (t[:2] >= 0).all() for t in b["target"])
            assert torch.isfinite(b["data"]).all() and b["data"][2:].abs().sum() > 0
        assert seen_un <= set(fold["unlabeled"]) | {"Synthetic_008", "Synthetic_009", "Synthetic_010"}
        assert next(val)["labeled"].all()
    finally:
        train._finish()
        val._finish()
    os.makedirs(trainer.output_folder, exist_ok=True)
    d = trainer.semi_data
    path = record_semi_split(trainer.output_folder, d["labeled"], d["unlabeled_training_cases"], d["unlabeled_images"],
                             d["parameters"], d["source"])
    rec = json.load(open(path))
    assert rec["parameters"]["labeled"] == "25%" and rec["labeled"] == sorted(fold["labeled"])
    assert rec["unlabeled_images"] == ["Synthetic_008", "Synthetic_009", "Synthetic_010"]
    assert path == os.path.join(env["nnUNet_results"], "Dataset612_Synthetic", "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                "fold_1", "semi_split.json")
