"""End to end: LeFeD through nnU-Net's own commands on a tiny semi-supervised synthetic dataset (CPU).

`nnunet-plugins synth --unlabeled` (12 training cases + imagesUn + 2 test cases) -> nnUNetv2_plan_and_preprocess
-> narrow the plans (8..32 features) -> `nnunet-plugins semi split --labeled 4` -> `nnunet-plugins semi
preprocess` -> nnUNetv2_train -tr LeFeDTrainer -> nnUNetv2_train --c -> nnUNetv2_predict on the held-out cases
(the predictor builds the inference network, encoder + decoder 1, and loads the training checkpoint) ->
held-out Dice above a threshold that an untrained or broken run fails.
"""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.runner import console_command, nnunet_cpu_env, run_step

from e2e_helpers import assert_same_geometry, dice

pytestmark = pytest.mark.slow

DATASET_ID = 614
NAME = "Dataset614_LeFeDSynth"
TEST_CASES = ("LeFeDSynth_012", "LeFeDSynth_013")
# Held-out Dice (2 cases x 2 structures) after 2 + 1 epochs x 8 iterations (3 passes each), 4 labeled cases,
# measured on 2 shared CPU cores: 0.866 / 0.955 / 0.967 / 0.984 (16x40x40 images, 3 + 1 epochs x 10: 0.893 /
# 0.969 / 0.981 / 0.988). The thresholds leave room for run-to-run variation; a model that did not learn
# (or whose predictor lost decoder 1's weights) segments neither structure.
MIN_MEAN_DICE = 0.7
MIN_DICE = 0.5


def _narrow(plans_file, features):
    with open(plans_file) as f:
        plans = json.load(f)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(features * 2 ** i, 4 * features) for i in range(arch["n_stages"])]
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=1)


def test_lefed_semi_supervised_train_continue_predict(tmp_path):
    env = nnunet_cpu_env(tmp_path, threads=1)
    env.update(NNUNET_PLUGINS_VAL_ITERS="1", NNUNET_PLUGINS_SAVE_EVERY="1", NNUNET_PLUGINS_ITERS="8",
               nnUNet_def_n_proc="1", NNUNET_PLUGINS_SEED="0")  # seeded: reproducible on CI
    log = str(tmp_path / "log.txt")
    plugins = [sys.executable, "-m", "nnunet_plugins"]
    run_step(plugins + ["synth", "-d", str(DATASET_ID), "--name", "LeFeDSynth", "--cases", "12", "--test-cases", "2",
                        "--unlabeled", "4", "--shape", "16", "32", "32", "--spacing", "3.0", "0.8", "0.8",
                        "--structures", "2", "--seed", "1"], env, log)
    raw = os.path.join(env["nnUNet_raw"], NAME)
    planning = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}   # nnU-Net's planner cannot take 0
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"],
             planning, log)
    pre = os.path.join(env["nnUNet_preprocessed"], NAME)
    _narrow(os.path.join(pre, "nnUNetPlans.json"), 8)
    run_step(plugins + ["semi", "split", "-d", str(DATASET_ID), "--labeled", "4"], env, log)
    run_step(plugins + ["semi", "preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "--no-progress"], env, log)
    semi = json.load(open(os.path.join(pre, "splits_semi.json")))["splits"][0]
    assert len(semi["labeled"]) == 4 and len(semi["unlabeled"]) == len(semi["train"]) - 4

    train = console_command("nnUNetv2_train") + [str(DATASET_ID), "3d_fullres", "0", "-tr", "LeFeDTrainer",
                                                 "-device", "cpu"]
    run_step(train, dict(env, NNUNET_PLUGINS_EPOCHS="2"), log)
    model = os.path.join(env["nnUNet_results"], NAME, "LeFeDTrainer__nnUNetPlans__3d_fullres")
    fold = os.path.join(model, "fold_0")
    final = os.path.join(fold, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "LeFeDTrainer" and ckpt["current_epoch"] == 2
    assert any(k.startswith("decoder2.") for k in ckpt["network_weights"])   # --c needs decoder 2
    first = {k: v.clone() for k, v in ckpt["network_weights"].items()}
    record = json.load(open(os.path.join(fold, "semi_split.json")))
    assert record["labeled"] == sorted(semi["labeled"]) and record["parameters"]["labeled"] == "4"
    assert record["unlabeled_training_cases"] == sorted(semi["unlabeled"])
    assert record["unlabeled_images"] == [f"LeFeDSynth_{i:03d}" for i in range(14, 18)]

    run_step(train + ["--c"], dict(env, NNUNET_PLUGINS_EPOCHS="3"), log)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3
    for prefix in ("encoder.", "decoder.", "decoder2."):
        assert any(not torch.equal(first[k], v) for k, v in ckpt["network_weights"].items() if k.startswith(prefix))
    logs = sorted(f for f in os.listdir(fold) if f.startswith("training_log"))
    second = open(os.path.join(fold, logs[-1])).read()
    assert "Epoch 2" in second and "Epoch 0" not in second
    assert "semi-supervised batches: 2 labeled + 2 unlabeled" in second
    # nnU-Net's final validation ran on the fold's validation cases (never on the unlabeled ones)
    val = json.load(open(os.path.join(fold, "validation", "summary.json")))
    assert sorted(os.path.basename(c["reference_file"])[:-7] for c in val["metric_per_case"]) == sorted(semi["val"])

    out = str(tmp_path / "pred")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(raw, "imagesTs"), "-o", out, "-d",
                                                    str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr",
                                                    "LeFeDTrainer", "-device", "cpu", "--disable_progress_bar",
                                                    "-npp", "1", "-nps", "1"], env, log)
    dices = []
    for case in TEST_CASES:
        ref_img = sitk.ReadImage(os.path.join(raw, "labelsTs", case + ".nii.gz"))
        pred_img = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        assert_same_geometry(pred_img, ref_img)
        ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
        assert set(np.unique(pred)) <= {0, 1, 2}
        dices += [dice(ref == label, pred == label) for label in (1, 2)]
    print("LeFeD held-out Dice", dices, "validation Dice", val["foreground_mean"]["Dice"])
    assert np.mean(dices) > MIN_MEAN_DICE and min(dices) > MIN_DICE, dices
