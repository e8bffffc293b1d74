"""End to end: BA-Net through nnU-Net's own commands on tiny synthetic data (CPU).

3-D (the learning check): a synthetic dataset with 2 structures -> nnUNetv2_plan_and_preprocess ->
narrow the plans (8..32 features; 4 x 30 iterations take about half a minute on CPU) -> `nnunet-plugins
banet split` (the official KiPA22 4-fold protocol) -> nnUNetv2_train -tr BANetTrainer -> nnUNetv2_train
--c -> nnUNetv2_predict on held-out cases -> nnUNetv2_evaluate_simple; the held-out Dice must show that
the model learned (a model that did not learn is far below the threshold).

2-D and ResEnc (mechanics): a KiPA-shaped dataset (4 structures, as KiPA22's vein / kidney / artery /
tumour) -> the official split -> nnUNetv2_train -tr BANetTrainer (2d; and 3d on nnUNetPlannerResEncM
plans) -> nnUNetv2_predict -> nnUNetv2_evaluate_simple.
"""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.training.crossval import kfold_split
from nnunet_plugins.runner import console_command, run_step
from nnunet_plugins.synthetic import generate_dataset

from e2e_helpers import assert_same_geometry

pytestmark = pytest.mark.slow

DATASET_ID = 512
NAME = "Dataset512_KiPASynth"
TEST_CASES = ("KiPASynth_006", "KiPASynth_007")
LEARN_ID = 513
LEARN_NAME = "Dataset513_BANetLearn"
LEARN_TEST_CASES = ("BANetLearn_008", "BANetLearn_009")
LEARN_SEED = 1
# Held-out Dice (2 cases x 2 structures) after 4 epochs x 30 iterations, measured on 2 CPU cores: mean
# 0.954-0.969 and every value >= 0.926 over 7 unseeded runs (dataset seeds 1-5, seed 1 three times), mean
# 0.953-0.977 (every value >= 0.941) with NNUNET_PLUGINS_SEED 0-3; the same run with 1 iteration per epoch
# (4 in all) scores a mean of 0.048 (its training loss still drops by > 0.1). One unseeded CI run missed the
# second structure (mean 0.625), so the training runs seeded (TRAIN_SEED): reproducible on CI.
TRAIN_SEED = "0"
LEARN_MIN_MEAN_DICE = 0.85
LEARN_MIN_DICE = 0.7  # every structure in every case: a model that misses one structure fails too


def _planning_env(env):
    # nnUNet_n_proc_DA=0 speeds up CPU training but makes nnU-Net's planner crash (torch.set_num_threads(0))
    return {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}


def _narrow(plans_file, features):
    with open(plans_file) as f:
        plans = json.load(f)
    for cfg in plans["configurations"].values():
        if "architecture" in cfg:
            n = cfg["architecture"]["arch_kwargs"]["n_stages"]
            cfg["architecture"]["arch_kwargs"]["features_per_stage"] = [min(features * 2 ** i, 4 * features)
                                                                        for i in range(n)]
            cfg["batch_size"] = 2
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=1)
    return plans


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory):
    """nnU-Net folders and the CPU settings shared by this module's tests."""
    from nnunet_plugins.runner import nnunet_cpu_env

    root = tmp_path_factory.mktemp("banet_e2e")
    env = nnunet_cpu_env(root, threads=1)
    env.update(NNUNET_PLUGINS_VAL_ITERS="2", NNUNET_PLUGINS_SAVE_EVERY="1", NNUNET_PLUGINS_SEED=TRAIN_SEED)
    return env, str(root / "log.txt")


@pytest.fixture(scope="module")
def prepared(e2e_env):
    """The KiPA-shaped dataset, its plans (narrowed), 2d preprocessing and the official split."""
    env, log = e2e_env
    folder = generate_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name="KiPASynth", num_cases=6,
                              num_test=len(TEST_CASES), shape=(16, 40, 40), spacing=(1.0, 0.8, 0.8),
                              num_structures=4, seed=4)
    # plans for all configurations (the ResEnc test plans 3d_fullres itself), preprocessing for 2d only
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "2d", "-np", "2"],
             _planning_env(env), log)
    _narrow(os.path.join(env["nnUNet_preprocessed"], NAME, "nnUNetPlans.json"), 4)
    run_step([sys.executable, "-m", "nnunet_plugins", "banet", "split", "-d", str(DATASET_ID)], env, log)
    return env, folder, log


def _check_predictions(folder, out, cases=TEST_CASES, labels=(1, 2, 3, 4)):
    for case in cases:
        ref_img = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
        pred_img = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        assert_same_geometry(pred_img, ref_img)
        assert set(np.unique(sitk.GetArrayFromImage(pred_img))) <= {0, *labels}


def _evaluate(env, folder, out, log, labels=(1, 2, 3, 4)):
    summary = os.path.join(out, "summary_banet.json")
    run_step(console_command("nnUNetv2_evaluate_simple") + [os.path.join(folder, "labelsTs"), out, "-l",
                                                            *map(str, labels), "-o", summary, "-np", "1"], env, log)
    with open(summary) as f:
        result = json.load(f)
    assert set(result["mean"]) == set(map(str, labels))
    # cross-check nnU-Net's Dice of every case and label against a direct computation
    for case in result["metric_per_case"]:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(case["reference_file"]))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(case["prediction_file"]))
        for label in labels:
            r, p = ref == label, pred == label
            if r.sum() + p.sum():
                expected = 2 * (r & p).sum() / (r.sum() + p.sum())
                assert case["metrics"][str(label)]["Dice"] == pytest.approx(expected, abs=1e-6)
    return result


def test_official_split_is_used(prepared):
    env, folder, _ = prepared
    with open(os.path.join(env["nnUNet_preprocessed"], NAME, "splits_final.json")) as f:
        splits = json.load(f)
    assert splits == kfold_split([f"KiPASynth_{i:03d}" for i in range(6)], 4, 12345)


def test_banet_3d_learns_continues_predicts(e2e_env, tmp_path):
    env, log = e2e_env
    folder = generate_dataset(env["nnUNet_raw"], dataset_id=LEARN_ID, name="BANetLearn", num_cases=8,
                              num_test=len(LEARN_TEST_CASES), shape=(16, 48, 48), spacing=(3.0, 0.8, 0.8),
                              num_structures=2, seed=LEARN_SEED)
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(LEARN_ID), "-c", "3d_fullres", "-np", "2"],
             _planning_env(env), log)
    plans = _narrow(os.path.join(env["nnUNet_preprocessed"], LEARN_NAME, "nnUNetPlans.json"), 8)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    run_step([sys.executable, "-m", "nnunet_plugins", "banet", "split", "-d", str(LEARN_ID)], env, log)

    # one export worker in nnU-Net's final validation: each spawned worker re-imports torch (seconds on CPU)
    env = dict(env, NNUNET_PLUGINS_ITERS="30", nnUNet_def_n_proc="1")
    train = console_command("nnUNetv2_train") + [str(LEARN_ID), "3d_fullres", "0", "-tr", "BANetTrainer",
                                                 "-device", "cpu"]
    run_step(train, dict(env, NNUNET_PLUGINS_EPOCHS="3"), log)
    model = os.path.join(env["nnUNet_results"], LEARN_NAME, "BANetTrainer__nnUNetPlans__3d_fullres")
    final = os.path.join(model, "fold_0", "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "BANetTrainer" and ckpt["current_epoch"] == 3
    weights = ckpt["network_weights"]
    assert any(k.startswith("boundary_decoder.stages") for k in weights)
    assert any(k.startswith("decoder.stages") for k in weights)
    # ordinary nnU-Net v2 plans -> the official (nnU-Net v1) decoder layout: no bias in the transposed
    # convolutions and heads, and each decoder stage has the kernel of the encoder stage below its skip
    assert "decoder.transpconvs.0.weight" in weights and "decoder.transpconvs.0.bias" not in weights
    assert "boundary_decoder.seg_layers.0.weight" in weights and "boundary_decoder.seg_layers.0.bias" not in weights
    kernels = arch["arch_kwargs"]["kernel_sizes"]
    last = len(kernels) - 2  # the full-resolution decoder stage
    assert list(weights[f"decoder.stages.{last}.convs.0.conv.weight"].shape[2:]) == kernels[1]
    first = {k: v.clone() for k, v in weights.items()}

    run_step(train + ["--c"], dict(env, NNUNET_PLUGINS_EPOCHS="4"), log)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 4
    for prefix in ("decoder.stages", "boundary_decoder.stages", "encoder.stages"):
        assert any(not torch.equal(first[k], v) for k, v in ckpt["network_weights"].items() if k.startswith(prefix))
    logs = sorted(f for f in os.listdir(os.path.join(model, "fold_0")) if f.startswith("training_log"))
    assert len(logs) == 2
    second = open(os.path.join(model, "fold_0", logs[-1])).read()
    assert "Epoch 3" in second and "Epoch 0" not in second
    assert "boundary_loss" in second
    losses = ckpt["logging"]["train_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    # nnU-Net's own validation of fold 0 ran on the official split's validation cases
    with open(os.path.join(model, "fold_0", "validation", "summary.json")) as f:
        val = json.load(f)
    splits = json.load(open(os.path.join(env["nnUNet_preprocessed"], LEARN_NAME, "splits_final.json")))
    assert splits == kfold_split([f"BANetLearn_{i:03d}" for i in range(8)], 4, 12345)
    assert sorted(os.path.basename(c["reference_file"])[:-7] for c in val["metric_per_case"]) == sorted(splits[0]["val"])

    out = str(tmp_path / "pred3d")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(folder, "imagesTs"), "-o", out, "-d",
                                                    str(LEARN_ID), "-c", "3d_fullres", "-f", "0", "-tr",
                                                    "BANetTrainer", "-device", "cpu", "--disable_progress_bar",
                                                    "-npp", "1", "-nps", "1"], env, log)
    _check_predictions(folder, out, LEARN_TEST_CASES, labels=(1, 2))
    result = _evaluate(env, folder, out, log, labels=(1, 2))
    dices = [case["metrics"][label]["Dice"] for case in result["metric_per_case"] for label in ("1", "2")]
    print("held-out Dice", dices, "validation Dice", val["foreground_mean"]["Dice"])
    # learned: both held-out structures are segmented (a model that does not learn stays far below this)
    assert np.mean(dices) > LEARN_MIN_MEAN_DICE and min(dices) > LEARN_MIN_DICE, dices


def test_banet_2d_train_predict(prepared, tmp_path):
    env, folder, log = prepared
    env = dict(env, NNUNET_PLUGINS_EPOCHS="2", NNUNET_PLUGINS_ITERS="8")
    run_step(console_command("nnUNetv2_train") + [str(DATASET_ID), "2d", "1", "-tr", "BANetTrainer", "-device", "cpu"],
             env, log)
    model = os.path.join(env["nnUNet_results"], NAME, "BANetTrainer__nnUNetPlans__2d")
    ckpt = torch.load(os.path.join(model, "fold_1", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    w = ckpt["network_weights"]["boundary_decoder.seg_layers.0.weight"]
    assert w.ndim == 4 and w.shape[0] == 2  # 2-D boundary head: background / boundary
    out = str(tmp_path / "pred2d")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(folder, "imagesTs"), "-o", out, "-d",
                                                    str(DATASET_ID), "-c", "2d", "-f", "1", "-tr", "BANetTrainer",
                                                    "-device", "cpu", "--disable_progress_bar"], env, log)
    _check_predictions(folder, out)
    _evaluate(env, folder, out, log)


def test_banet_on_residual_encoder_plans(prepared, tmp_path):
    env, folder, log = prepared
    env = dict(env, NNUNET_PLUGINS_EPOCHS="1", NNUNET_PLUGINS_ITERS="4")
    run_step(console_command("nnUNetv2_plan_experiment") + ["-d", str(DATASET_ID), "-pl", "nnUNetPlannerResEncM"],
             _planning_env(env), log)
    plans = _narrow(os.path.join(env["nnUNet_preprocessed"], NAME, "nnUNetResEncUNetMPlans.json"), 4)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    run_step(console_command("nnUNetv2_preprocess") + ["-d", str(DATASET_ID), "-plans_name", "nnUNetResEncUNetMPlans",
                                                       "-c", "3d_fullres", "-np", "2"], _planning_env(env), log)
    train = console_command("nnUNetv2_train") + [str(DATASET_ID), "3d_fullres", "0", "-tr", "BANetTrainer", "-p",
                                                 "nnUNetResEncUNetMPlans", "-device", "cpu"]
    run_step(train, env, log)
    model = os.path.join(env["nnUNet_results"], NAME, "BANetTrainer__nnUNetResEncUNetMPlans__3d_fullres")
    weights = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                         weights_only=False)["network_weights"]
    assert any(k.startswith("encoder.stem") for k in weights)
    assert any(k.startswith("boundary_decoder.stages") for k in weights)
    out = str(tmp_path / "pred_resenc")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(folder, "imagesTs"), "-o", out, "-d",
                                                    str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr",
                                                    "BANetTrainer", "-p", "nnUNetResEncUNetMPlans", "-device", "cpu",
                                                    "--disable_progress_bar"], env, log)
    _check_predictions(folder, out)
