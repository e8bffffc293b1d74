"""End to end: VerSemi on two partially labelled synthetic sources, each with unlabeled images and a labeled fraction.

Sources "Two" (2 structures) and "One" (1 structure, another label set), each with 5 training cases, 2 unlabeled
images (imagesUn) and 1 test case -> ``combine`` (carries imagesUn) -> ``nnUNetv2_plan_and_preprocess`` ->
``semi preprocess`` -> ``semi split --labeled 2 --per-task`` (2 labeled cases per source in each fold) ->
``nnUNetv2_train -tr VerSemiTrainer -device cpu`` for 1 epoch (stage 1), then ``--c`` to 3 epochs across the stage
switch (epoch 1: stage 2) -> ``predict-multitask`` on the test images (Dice thresholds), ``export-multitask`` of the
validation folder, and the stock ``nnUNetv2_predict`` failing with the multi-task message.
The plans' U-Net is narrowed to CPU-test widths through its arch_kwargs (same preprocessed data).
"""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.runner import console_command, run_step
from nnunet_plugins.synthetic import generate_dataset

from e2e_helpers import check_multitask_exports_and_stock_refusal, dice

pytestmark = pytest.mark.slow

PLUGINS = [sys.executable, "-m", "nnunet_plugins"]
DATASET = "Dataset030_Vs"
TRAINER = "VerSemiTrainer"
RUN = dict(NNUNET_PLUGINS_SEED="0", nnUNet_n_proc_DA="0", NNUNET_PLUGINS_ITERS="20", NNUNET_PLUGINS_VAL_ITERS="2",
           NNUNET_PLUGINS_SAVE_EVERY="1", NNUNET_PLUGINS_VERSEMI_STAGE2_EPOCH="1")
FAST_PREDICT = ["-device", "cpu", "--disable-tta", "-npp", "0", "-nps", "0"]


@pytest.fixture(scope="module")
def versemi(tmp_path_factory):
    from nnunet_plugins.runner import nnunet_cpu_env

    root = tmp_path_factory.mktemp("e2e_versemi")
    env = nnunet_cpu_env(root, augmentation_workers=None, threads=1)
    log = str(root / "log.txt")
    raw = env["nnUNet_raw"]
    two = generate_dataset(raw, dataset_id=31, name="Two", num_cases=5, num_test=1, num_unlabeled=2,
                           shape=(16, 32, 32), num_structures=2, num_channels=1, seed=11)
    one = generate_dataset(raw, dataset_id=32, name="One", num_cases=5, num_test=1, num_unlabeled=2,
                           shape=(16, 32, 32), num_structures=1, num_channels=1, seed=12)
    run_step(PLUGINS + ["combine", "-d", "31", "32", "-o", "30", "-n", "Vs"], env, log)
    combined_un = sorted(os.listdir(os.path.join(raw, DATASET, "imagesUn")))
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", "30", "-c", "3d_fullres", "-np", "2"], env, log)
    run_step(PLUGINS + ["semi", "preprocess", "-d", "30", "--no-progress"], env, log)
    run_step(PLUGINS + ["semi", "split", "-d", "30", "--labeled", "2", "--per-task"], env, log)
    pre = os.path.join(env["nnUNet_preprocessed"], DATASET)
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    plans["plans_name"] = "nnUNetPlans_vs"
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(8 * 2 ** i, 16) for i in range(arch["n_stages"])]
    json.dump(plans, open(os.path.join(pre, "nnUNetPlans_vs.json"), "w"), indent=2)

    train = console_command("nnUNetv2_train") + ["30", "3d_fullres", "0", "-tr", TRAINER, "-p", "nnUNetPlans_vs",
                                                 "-device", "cpu"]
    run_step(train, {**env, **RUN, "NNUNET_PLUGINS_EPOCHS": "1"}, log)
    model = os.path.join(env["nnUNet_results"], DATASET, f"{TRAINER}__nnUNetPlans_vs__3d_fullres")
    first = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    run_step(train + ["--c"], {**env, **RUN, "NNUNET_PLUGINS_EPOCHS": "3"}, log)
    return {"env": env, "log": log, "root": root, "two": two, "one": one, "pre": pre, "model": model,
            "first": first, "combined_un": combined_un}


def _logs(model):
    folder = os.path.join(model, "fold_0")
    return [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.startswith("training_log")]


def test_combined_dataset_carries_unlabeled_images_and_per_task_fraction(versemi):
    assert versemi["combined_un"] == ["One_One_006_0000.nii.gz", "One_One_007_0000.nii.gz",
                                      "Two_Two_006_0000.nii.gz", "Two_Two_007_0000.nii.gz"]
    record = json.load(open(os.path.join(versemi["model"], "fold_0", "semi_split.json")))
    assert record["parameters"]["per_task"] is True and record["parameters"]["labeled"] == "2"
    tags = [c.split("_")[0] for c in record["labeled"]]
    assert sorted(tags) == ["One"] * 2 + ["Two"] * 2, record["labeled"]
    assert record["unlabeled_training_cases"] and not set(record["labeled"]) & set(record["unlabeled_training_cases"])
    assert record["unlabeled_images"] == [f[:-len("_0000.nii.gz")] for f in versemi["combined_un"]]


def test_versemi_trains_through_the_stage_switch_continues_and_predicts(versemi):
    env, log, root, model = versemi["env"], versemi["log"], versemi["root"], versemi["model"]
    first_log, second_log = _logs(model)[0], _logs(model)[-1]
    assert "VerSemi stage 1 (labeled only)" in first_log and "stage 2" not in first_log
    assert "source_loss" in first_log
    # --c resumed at epoch 1, the first stage-2 epoch: the consistency and labeled-cube terms are trained
    assert "Epoch 1" in second_log and "Epoch 0" not in second_log
    assert "VerSemi stage 2 (semi-supervised)" in second_log and "consistency_loss" in second_log
    assert "cube_loss" in second_log and "source_loss" not in second_log
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert versemi["first"]["current_epoch"] == 1 and ckpt["current_epoch"] == 3
    assert ckpt["trainer_name"] == TRAINER
    # the network: T = 2 real tasks + the synthetic one in the controller's one-hot
    w = ckpt["network_weights"]["controller.conv.weight"]
    assert w.shape[1] == 16 + 3, w.shape
    losses = [float(v) for v in ckpt["logging"]["train_losses"]]
    print("VerSemi train loss per epoch:", [round(v, 3) for v in losses])
    assert all(np.isfinite(losses))

    combined_ts = os.path.join(env["nnUNet_raw"], DATASET, "imagesTs")
    out, src = str(root / "pred"), str(root / "pred_src")
    run_step(PLUGINS + ["predict-multitask", "-i", combined_ts, "-o", out, "-d", "30", "-tr", TRAINER, "-p",
                        "nnUNetPlans_vs", "-f", "0", "--source-labels", src] + FAST_PREDICT, env, log)
    dices = {}
    for tag, folder, n, offset in (("Two", versemi["two"], 2, 0), ("One", versemi["one"], 1, 2)):
        case = f"{tag}_005"
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{tag}_{case}.nii.gz")))
        own = {0} | set(range(offset + 1, offset + n + 1))
        assert set(np.unique(pred)) <= own, f"{case}: only its own task's combined labels"
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz")))
        got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(src, tag, case + ".nii.gz")))
        for v in range(1, n + 1):
            dices[f"{tag}:{v}"] = dice(ref == v, got == v)
    print("VerSemi test Dice:", {k: round(float(v), 3) for k, v in dices.items()})
    # an untrained or task-confused network is far below these on the synthetic structures (the second, smaller
    # structure of "Two" is learned last: it enters the mean only)
    assert dices["Two:1"] > 0.5 and dices["One:1"] > 0.7 and np.mean(list(dices.values())) > 0.5, dices

    # export-multitask of the final validation; the stock predictor fails with the multi-task message
    check_multitask_exports_and_stock_refusal(os.path.join(model, "fold_0"), 30, TRAINER, "nnUNetPlans_vs",
                                              combined_ts, str(root), env, log, offsets={"Two": 0, "One": 2},
                                              source_values={"Two": {0, 1, 2}, "One": {0, 1}})
