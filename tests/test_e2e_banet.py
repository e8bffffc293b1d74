"""End to end: BA-Net through nnU-Net's own commands on a tiny KiPA-shaped synthetic dataset (CPU).

synthetic dataset (4 structures, as KiPA22's vein / kidney / artery / tumour) -> nnUNetv2_plan_and_preprocess
-> narrow the plans (tiny features so a CPU trains in seconds) -> `nnunet-plugins banet split` (official
4-fold split) -> nnUNetv2_train -tr BANetTrainer (3d_fullres, 2d; and 3d on nnUNetPlannerResEncM plans)
-> nnUNetv2_train --c -> nnUNetv2_predict -> nnUNetv2_evaluate_simple.
"""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.modules.crossval import kfold_split
from nnunet_plugins.runner import console_command, run_step
from nnunet_plugins.synthetic import generate_dataset

pytestmark = pytest.mark.slow

DATASET_ID = 512
NAME = "Dataset512_KiPASynth"
TEST_CASES = ("KiPASynth_006", "KiPASynth_007")


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
def prepared(tmp_path_factory):
    """Dataset, plans (narrowed) and preprocessing shared by this module's tests."""
    from nnunet_plugins._autoregister import register

    root = tmp_path_factory.mktemp("banet_e2e")
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(root / name)
        os.makedirs(env[name], exist_ok=True)
    env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="2", nnUNet_compile="0", OMP_NUM_THREADS="1",
               NNUNET_PLUGINS_VAL_ITERS="2", NNUNET_PLUGINS_SAVE_EVERY="1")
    register(env)
    log = str(root / "log.txt")
    folder = generate_dataset(env["nnUNet_raw"], dataset_id=DATASET_ID, name="KiPASynth", num_cases=6,
                              num_test=len(TEST_CASES), shape=(16, 40, 40), spacing=(1.0, 0.8, 0.8),
                              num_structures=4, seed=4)
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "3d_fullres", "2d",
                                                               "-np", "2"], _planning_env(env), log)
    _narrow(os.path.join(env["nnUNet_preprocessed"], NAME, "nnUNetPlans.json"), 4)
    run_step([sys.executable, "-m", "nnunet_plugins", "banet", "split", "-d", str(DATASET_ID)], env, log)
    return env, folder, log


def _check_predictions(folder, out, labels=(1, 2, 3, 4)):
    for case in TEST_CASES:
        ref_img = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
        pred_img = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        assert pred_img.GetSize() == ref_img.GetSize()
        np.testing.assert_allclose(pred_img.GetSpacing(), ref_img.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(pred_img.GetOrigin(), ref_img.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred_img.GetDirection(), ref_img.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred_img))) <= {0, *labels}


def _evaluate(env, folder, out, log):
    summary = os.path.join(out, "summary_banet.json")
    run_step(console_command("nnUNetv2_evaluate_simple") + [os.path.join(folder, "labelsTs"), out, "-l", "1", "2",
                                                            "3", "4", "-o", summary, "-np", "1"], env, log)
    with open(summary) as f:
        result = json.load(f)
    assert set(result["mean"]) == {"1", "2", "3", "4"}
    # cross-check nnU-Net's Dice of one case and label against a direct computation
    case = result["metric_per_case"][0]
    ref = sitk.GetArrayFromImage(sitk.ReadImage(case["reference_file"]))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(case["prediction_file"]))
    r, p = ref == 2, pred == 2
    if r.sum() + p.sum():
        assert case["metrics"]["2"]["Dice"] == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()), abs=1e-6)
    return result


def test_official_split_is_used(prepared):
    env, folder, _ = prepared
    with open(os.path.join(env["nnUNet_preprocessed"], NAME, "splits_final.json")) as f:
        splits = json.load(f)
    assert splits == kfold_split([f"KiPASynth_{i:03d}" for i in range(6)], 4, 12345)


def test_banet_3d_train_continue_predict_evaluate(prepared, tmp_path):
    env, folder, log = prepared
    env = dict(env, NNUNET_PLUGINS_ITERS="12")
    train = console_command("nnUNetv2_train") + [str(DATASET_ID), "3d_fullres", "0", "-tr", "BANetTrainer",
                                                 "-device", "cpu"]
    run_step(train, dict(env, NNUNET_PLUGINS_EPOCHS="2"), log)
    model = os.path.join(env["nnUNet_results"], NAME, "BANetTrainer__nnUNetPlans__3d_fullres")
    final = os.path.join(model, "fold_0", "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "BANetTrainer" and ckpt["current_epoch"] == 2
    weights = ckpt["network_weights"]
    assert any(k.startswith("boundary_decoder.stages") for k in weights)
    assert any(k.startswith("decoder.stages") for k in weights)
    first = {k: v.clone() for k, v in weights.items()}

    run_step(train + ["--c"], dict(env, NNUNET_PLUGINS_EPOCHS="3"), log)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 3
    for prefix in ("decoder.stages", "boundary_decoder.stages", "encoder.stages"):
        assert any(not torch.equal(first[k], v) for k, v in ckpt["network_weights"].items() if k.startswith(prefix))
    logs = sorted(f for f in os.listdir(os.path.join(model, "fold_0")) if f.startswith("training_log"))
    assert len(logs) == 2
    second = open(os.path.join(model, "fold_0", logs[-1])).read()
    assert "Epoch 2" in second and "Epoch 0" not in second
    assert "boundary_loss" in second
    # the loss BA-Net optimises went down (a model without gradients, or a broken target, does not)
    losses = ckpt["logging"]["train_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    # nnU-Net's own validation of fold 0 ran on the official split's validation cases
    with open(os.path.join(model, "fold_0", "validation", "summary.json")) as f:
        val = json.load(f)
    splits = json.load(open(os.path.join(env["nnUNet_preprocessed"], NAME, "splits_final.json")))
    assert sorted(os.path.basename(c["reference_file"])[:-7] for c in val["metric_per_case"]) == sorted(splits[0]["val"])

    out = str(tmp_path / "pred3d")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(folder, "imagesTs"), "-o", out, "-d",
                                                    str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr",
                                                    "BANetTrainer", "-device", "cpu", "--disable_progress_bar"],
             env, log)
    _check_predictions(folder, out)
    _evaluate(env, folder, out, log)


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
