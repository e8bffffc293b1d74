"""End to end: two synthetic datasets -> `combine` -> nnU-Net plan/preprocess -> `nnUNetv2_train -tr
UniSegTrainer` (+ `--c` with worker processes) -> `predict-multitask` (+ source labels) -> downstream
fine-tuning of the backbone with nnU-Net's `-pretrained_weights`. CPU, tiny U-Net, tiny patches.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.runner import console_command, run_step
from nnunet_plugins.synthetic import generate_dataset

from e2e_helpers import assert_same_geometry, dice

pytestmark = pytest.mark.slow

PLUGINS = [sys.executable, "-m", "nnunet_plugins"]
MODEL = "UniSegTrainer__nnUNetPlans__3d_fullres"


def _env(root):
    from nnunet_plugins.runner import nnunet_cpu_env

    # planning crashes with nnUNet_n_proc_DA=0 (nnU-Net 2.8.1): unset here, training sets it
    return nnunet_cpu_env(root, augmentation_workers=None, threads=2)


def _tiny_plans(pre_folder, features, patch):
    f = os.path.join(pre_folder, "nnUNetPlans.json")
    plans = json.load(open(f))
    cfg = plans["configurations"]["3d_fullres"]
    n = len(cfg["architecture"]["arch_kwargs"]["features_per_stage"])
    cfg["architecture"]["arch_kwargs"]["features_per_stage"] = features[:n] + [features[-1]] * (n - len(features))
    cfg["patch_size"] = patch
    json.dump(plans, open(f, "w"), indent=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_uniseg")
    env = _env(root)
    log = str(root / "log.txt")
    raw = env["nnUNet_raw"]
    # 5 + 5 cases: nnU-Net's 5-fold split leaves 2 validation cases (the final validation stays short)
    a = generate_dataset(raw, dataset_id=11, name="A", num_cases=5, num_test=1, shape=(16, 40, 40), num_structures=2,
                         num_channels=1, seed=1)
    b = generate_dataset(raw, dataset_id=12, name="B", num_cases=5, num_test=1, shape=(16, 40, 40), num_structures=3,
                         num_channels=2, seed=2)
    run_step(PLUGINS + ["combine", "-d", "11", "12", "-o", "20", "-n", "Uni"], env, log)
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", "20", "-c", "3d_fullres", "-np", "2"], env, log)
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset020_Uni")
    _tiny_plans(pre, [8, 16, 32], [16, 32, 32])
    train_env = dict(env, NNUNET_PLUGINS_SEED="0", nnUNet_n_proc_DA="0", NNUNET_PLUGINS_EPOCHS="3", NNUNET_PLUGINS_ITERS="30",
                     NNUNET_PLUGINS_VAL_ITERS="2", NNUNET_PLUGINS_SAVE_EVERY="1")
    train = console_command("nnUNetv2_train") + ["20", "3d_fullres", "0", "-tr", "UniSegTrainer", "-device", "cpu"]
    run_step(train, train_env, log)
    model = os.path.join(env["nnUNet_results"], "Dataset020_Uni", MODEL)
    first = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    # continue with nnU-Net's data-augmentation worker processes (the loader must work there too)
    run_step(train + ["--c"], dict(train_env, NNUNET_PLUGINS_EPOCHS="4", nnUNet_n_proc_DA="2"), log)
    return {"env": env, "log": log, "root": root, "a": a, "b": b, "model": model, "first": first, "pre": pre}


def test_train_continue_and_validate(trained):
    model = trained["model"]
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert trained["first"]["current_epoch"] == 3 and ckpt["current_epoch"] == 4
    assert ckpt["trainer_name"] == "UniSegTrainer"
    assert any(not torch.equal(trained["first"]["network_weights"][k], v) for k, v in ckpt["network_weights"].items())
    plans = json.load(open(os.path.join(model, "plans.json")))
    assert [t["tag"] for t in plans["multitask"]["tasks"]] == ["A", "B"]   # inference builds UniSeg from these
    logs = sorted(f for f in os.listdir(os.path.join(model, "fold_0")) if f.startswith("training_log"))
    first_log = open(os.path.join(model, "fold_0", logs[0])).read()
    assert "multi-task training cases per task: {'A':" in first_log and "100 batches per sampling round" in first_log
    second = open(os.path.join(model, "fold_0", logs[-1])).read()
    assert "Epoch 3" in second and "Epoch 0" not in second
    per_task = json.load(open(os.path.join(model, "fold_0", "validation", "summary_per_task.json")))
    assert set(per_task["tasks"]) == {"A", "B"}
    summary = json.load(open(os.path.join(model, "fold_0", "validation", "summary.json")))
    assert set(summary["mean"]) == {"1", "2", "3", "4", "5"}


def test_predict_each_case_for_its_task_and_export_source_labels(trained):
    env, log, root = trained["env"], trained["log"], trained["root"]
    combined_ts = os.path.join(env["nnUNet_raw"], "Dataset020_Uni", "imagesTs")
    out, src_out = str(root / "pred"), str(root / "pred_src")
    # -npp/-nps 0: no worker processes (start-up of spawned workers dominates on tiny jobs)
    fast = ["-device", "cpu", "--disable-tta", "-npp", "0", "-nps", "0"]
    run_step(PLUGINS + ["predict-multitask", "-i", combined_ts, "-o", out, "-d", "20", "-f", "0", "--source-labels",
                        src_out] + fast, env, log)
    dices = {}
    for tag, folder, values, n in (("A", trained["a"], {0, 1, 2}, 2), ("B", trained["b"], {0, 3, 4, 5}, 3)):
        case = f"{tag}_005"
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{tag}_{case}.nii.gz")))
        assert set(np.unique(pred)) <= values, f"{case}: only its own task's combined labels"
        ref_img = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
        src_img = sitk.ReadImage(os.path.join(src_out, tag, case + ".nii.gz"))
        assert_same_geometry(src_img, ref_img)
        ref, got = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(src_img)
        assert set(np.unique(got)) <= set(range(n + 1)), "source label values"
        np.testing.assert_array_equal(got, np.where(pred > 0, pred - (0 if tag == "A" else 2), 0))
        dices[tag] = [dice(ref == k, got == k) for k in range(1, n + 1)]
    print("test Dice per task:", {k: round(float(np.mean(v)), 3) for k, v in dices.items()})
    # learned: untrained or task-confused predictions are far below this for these small structures
    assert np.mean([d for v in dices.values() for d in v]) > 0.5, dices

    # raw source images with --task: normalised as `combine` does, so the same prediction
    raw_out = str(root / "pred_raw")
    run_step(PLUGINS + ["predict-multitask", "-i", os.path.join(trained["b"], "imagesTs"), "-o", raw_out, "-d", "20",
                        "-f", "0", "--task", "B"] + fast, env, log)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw_out, "B_B_005.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "B_B_005.nii.gz"))))

    # nnU-Net's own predictor cannot pass a task: it must fail clearly, not predict some task
    res = subprocess.run(console_command("nnUNetv2_predict") + ["-i", combined_ts, "-o", str(root / "stock"), "-d",
                                                                "20", "-c", "3d_fullres", "-f", "0", "-tr",
                                                                "UniSegTrainer", "-device", "cpu", "-npp", "1",
                                                                "-nps", "1", "--disable_progress_bar"],
                         env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "predict-multitask" in res.stdout + res.stderr


def test_backbone_fine_tunes_on_one_dataset_with_nnunets_pretrained_weights(trained):
    env, log = trained["env"], trained["log"]
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", "11", "-c", "3d_fullres", "-np", "2"], env, log)
    run_step(PLUGINS + ["uniseg-backbone", "-m", trained["model"], "-f", "0", "-d", "11"], env, log)
    pre = os.path.join(env["nnUNet_preprocessed"], "Dataset011_A")
    plans = json.load(open(os.path.join(pre, "nnUNetPlans_UniSegBackbone.json")))
    cfg = plans["configurations"]["3d_fullres"]
    up = json.load(open(os.path.join(trained["model"], "plans.json")))["configurations"]["3d_fullres"]["architecture"]
    assert cfg["architecture"]["arch_kwargs"] == up["arch_kwargs"]          # the UniSeg U-Net
    assert cfg["normalization_schemes"] == ["CTNormalization"]   # the downstream dataset's own preprocessing
    weights = os.path.join(pre, "uniseg_backbone_nnUNetPlans_UniSegBackbone.pth")
    run_step(console_command("nnUNetv2_train") + ["11", "3d_fullres", "0", "-tr", "PluginTrainer", "-p",
                                                  "nnUNetPlans_UniSegBackbone", "-pretrained_weights", weights,
                                                  "-device", "cpu"],
             dict(env, nnUNet_n_proc_DA="0", NNUNET_PLUGINS_EPOCHS="1", NNUNET_PLUGINS_ITERS="2",
                  NNUNET_PLUGINS_VAL_ITERS="1"), log)
    assert "Loading pretrained weights from file" in open(log).read()
    done = os.path.join(env["nnUNet_results"], "Dataset011_A", "PluginTrainer__nnUNetPlans_UniSegBackbone__3d_fullres",
                        "fold_0", "checkpoint_final.pth")
    assert os.path.isfile(done)
