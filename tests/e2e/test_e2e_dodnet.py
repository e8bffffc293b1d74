"""End to end: two partially labelled synthetic sources -> `combine` -> nnU-Net plan/preprocess ->
`nnUNetv2_train -tr DoDNetTrainer` (+ `--c`) -> `predict-multitask` (+ source labels) and `export-multitask`,
and `nnUNetv2_train -tr TransDoDNetTrainer` -> `predict-multitask`. CPU, tiny networks, tiny patches.

Sources (as MOTS): "Liv" labels an organ and a tumour as nested nnU-Net regions (organ = values 1 and 2,
tumour = value 2, regions_class_order [1, 2]: two sigmoid channels); "Spl" labels one organ (one plain
label, one channel; the network's second output is unannotated for it and masked in the loss).
The stock plans' U-Net is replaced by the tiny networks through the plans' architecture entry
(network_class_name + arch_kwargs), the way a user narrows a network; the planned patch (16, 40, 40) does
not fit either network and the trainers round it to (16, 32, 32).
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

from e2e_helpers import assert_same_geometry, check_multitask_exports_and_stock_refusal, dice

pytestmark = pytest.mark.slow

PLUGINS = [sys.executable, "-m", "nnunet_plugins"]
DATASET = "Dataset020_Dod"
# the Liv task's region labels (in its source values) and what predictions of each task may contain
LIV_LABELS = {"background": 0, "organ": [1, 2], "tumour": 2}
TINY = {
    "DoDNetTrainer": ("nnUNetPlans_dod", "nnunet_plugins.architectures.dodnet.DoDNet",
                      {"features_per_stage": [8, 8, 16, 16, 16], "blocks_per_stage": [1, 1, 1, 1, 1], "norm_groups": 4,
                       "head_channels": 8}),
    "TransDoDNetTrainer": ("nnUNetPlans_tdod", "nnunet_plugins.architectures.transdodnet.TransDoDNet",
                           {"stem_channels": 8, "backbone_planes": [4, 8, 8], "backbone_blocks": [1, 1, 1],
                            "d_model": 24, "n_heads": 4, "d_ffn": 48, "num_encoder_layers": 1, "num_decoder_layers": 1,
                            "n_levels": 2, "n_points": 2, "decoder_channels": [8, 16, 16, 16], "head_channels": 8}),
}
RUN = dict(NNUNET_PLUGINS_SEED="0", nnUNet_n_proc_DA="0", NNUNET_PLUGINS_EPOCHS="3", NNUNET_PLUGINS_ITERS="20",
           NNUNET_PLUGINS_VAL_ITERS="2", NNUNET_PLUGINS_SAVE_EVERY="1")
FAST_PREDICT = ["-device", "cpu", "--disable-tta", "-npp", "0", "-nps", "0"]


def _env(root):
    from nnunet_plugins.runner import nnunet_cpu_env

    # planning crashes with nnUNet_n_proc_DA=0 (nnU-Net 2.8.1): unset here, training sets it
    return nnunet_cpu_env(root, augmentation_workers=None, threads=1)


def _tiny_plans(pre, trainer):
    """A copy of nnU-Net's plans whose 3d_fullres architecture names the tiny network (same preprocessed data)."""
    plans_name, network, kwargs = TINY[trainer]
    plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
    plans["plans_name"] = plans_name
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    plans["configurations"]["3d_fullres"]["architecture"] = {"network_class_name": network, "arch_kwargs": kwargs,
                                                             "_kw_requires_import": []}
    json.dump(plans, open(os.path.join(pre, plans_name + ".json"), "w"), indent=2)
    return plans_name


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_dodnet")
    env = _env(root)
    log = str(root / "log.txt")
    raw = env["nnUNet_raw"]
    # 5 + 5 cases: nnU-Net's 5-fold split leaves 2 validation cases (the final validation stays short)
    liv = generate_dataset(raw, dataset_id=11, name="Liv", num_cases=5, num_test=1, shape=(16, 40, 40),
                           num_structures=2, num_channels=1, seed=1)
    dj = json.load(open(os.path.join(liv, "dataset.json")))
    dj["labels"], dj["regions_class_order"] = LIV_LABELS, [1, 2]
    json.dump(dj, open(os.path.join(liv, "dataset.json"), "w"), indent=2)
    spl = generate_dataset(raw, dataset_id=12, name="Spl", num_cases=5, num_test=1, shape=(16, 40, 40),
                           num_structures=1, num_channels=2, seed=2)
    run_step(PLUGINS + ["combine", "-d", "11", "12", "-o", "20", "-n", "Dod"], env, log)
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", "20", "-c", "3d_fullres", "-np", "2"], env, log)
    pre = os.path.join(env["nnUNet_preprocessed"], DATASET)
    assert json.load(open(os.path.join(pre, "nnUNetPlans.json")))["configurations"]["3d_fullres"]["patch_size"] == \
        [16, 40, 40], "the test expects nnU-Net's planned patch not to fit the networks"
    return {"env": env, "log": log, "root": root, "liv": liv, "spl": spl, "pre": pre}


def _train(combined, trainer, extra_env=None, extra_args=()):
    plans_name = _tiny_plans(combined["pre"], trainer)
    cmd = console_command("nnUNetv2_train") + ["20", "3d_fullres", "0", "-tr", trainer, "-p", plans_name, "-device",
                                               "cpu", *extra_args]
    run_step(cmd, {**combined["env"], **RUN, **(extra_env or {})}, combined["log"])
    return os.path.join(combined["env"]["nnUNet_results"], DATASET, f"{trainer}__{plans_name}__3d_fullres"), plans_name


def _check_model_folder(model, trainer):
    plans = json.load(open(os.path.join(model, "plans.json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [16, 32, 32], "the fitted patch is what prediction must slide"
    assert cfg["architecture"]["network_class_name"] == TINY[trainer][1]
    assert [t["tag"] for t in plans["multitask"]["tasks"]] == ["Liv", "Spl"]
    ckpt = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer
    losses = ckpt["logging"]["train_losses"]
    print(f"{trainer} train loss per epoch:", [round(float(v), 3) for v in losses])
    return ckpt, losses


def _predict_and_check(combined, trainer, plans_name, out_name):
    """predict-multitask with --source-labels; returns the test Dice per source structure."""
    env, log, root = combined["env"], combined["log"], combined["root"]
    combined_ts = os.path.join(env["nnUNet_raw"], DATASET, "imagesTs")
    out, src_out = str(root / out_name), str(root / (out_name + "_src"))
    run_step(PLUGINS + ["predict-multitask", "-i", combined_ts, "-o", out, "-d", "20", "-tr", trainer, "-p", plans_name,
                        "-f", "0", "--source-labels", src_out] + FAST_PREDICT, env, log)
    dices = {}
    # Liv: source 1 = organ without tumour, 2 = tumour (combined 1, 2); Spl: source 1 (combined 3)
    for tag, folder, combined_values, offset in (("Liv", combined["liv"], {0, 1, 2}, 0),
                                                 ("Spl", combined["spl"], {0, 3}, 2)):
        case = f"{tag}_005"
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f"{tag}_{case}.nii.gz")))
        assert set(np.unique(pred)) <= combined_values, f"{case}: only its own task's combined labels"
        ref_img = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
        src_img = sitk.ReadImage(os.path.join(src_out, tag, case + ".nii.gz"))
        assert_same_geometry(src_img, ref_img)
        ref, got = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(src_img)
        np.testing.assert_array_equal(got, np.where(pred > 0, pred - offset, 0))   # source values
        if tag == "Liv":   # the two sigmoid channels: organ (values 1 and 2) and tumour (value 2)
            dices["Liv:organ"] = dice(np.isin(ref, [1, 2]), np.isin(got, [1, 2]))
            dices["Liv:tumour"] = dice(ref == 2, got == 2)
        else:
            dices["Spl:organ"] = dice(ref == 1, got == 1)
    print(f"{trainer} test Dice:", {k: round(float(v), 3) for k, v in dices.items()})
    return dices, out


@pytest.fixture(scope="module")
def dodnet(combined):
    # 4 x 30 iterations: with 20 the liver task was still unlearned after 4 epochs for 1 seed in 4 (seeds 0-3:
    # liver organ Dice 0.0 / 0.94 / 0.92 / 0.92); with 30, seeds 0 and 1 give every structure >= 0.85
    run = {"NNUNET_PLUGINS_ITERS": "30"}
    model, plans_name = _train(combined, "DoDNetTrainer", run)
    first = torch.load(os.path.join(model, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    _train(combined, "DoDNetTrainer", {**run, "NNUNET_PLUGINS_EPOCHS": "4"}, ["--c"])
    return {"model": model, "plans": plans_name, "first": first}


def test_dodnet_trains_continues_predicts_and_exports_source_labels(combined, dodnet):
    model = dodnet["model"]
    ckpt, losses = _check_model_folder(model, "DoDNetTrainer")
    assert dodnet["first"]["current_epoch"] == 3 and ckpt["current_epoch"] == 4
    assert any(not torch.equal(dodnet["first"]["network_weights"][k], v) for k, v in ckpt["network_weights"].items())
    logs = sorted(f for f in os.listdir(os.path.join(model, "fold_0")) if f.startswith("training_log"))
    first_log = open(os.path.join(model, "fold_0", logs[0])).read()
    assert "patch [16, 40, 40] -> [16, 32, 32]" in first_log
    assert "binary channels per task: Liv: organ=[1, 2], tumour=[2]; Spl: ellipsoid=[3]" in first_log
    second = open(os.path.join(model, "fold_0", logs[-1])).read()
    assert "Epoch 3" in second and "Epoch 0" not in second
    # nnU-Net's poly schedule of SGD 1e-2 over the 4 epochs of the continued run
    assert "Current learning rate: " + str(np.round(1e-2 * (1 - 3 / 4) ** 0.9, 5)) in second
    # final validation: per task, in the combined labels
    per_task = json.load(open(os.path.join(model, "fold_0", "validation", "summary_per_task.json")))
    assert set(per_task["tasks"]) == {"Liv", "Spl"}
    assert set(json.load(open(os.path.join(model, "fold_0", "validation", "summary.json")))["mean"]) == {"1", "2", "3"}

    dices, _ = _predict_and_check(combined, "DoDNetTrainer", dodnet["plans"], "pred_dod")
    # learned: an untrained or task-confused network is far below this on these structures
    assert losses[-1] < losses[0], losses
    assert np.mean(list(dices.values())) > 0.5, dices

    # export-multitask of nnU-Net's validation folder (combined labels) -> each source's labels; nnU-Net's own
    # predictor cannot pass a task: it must fail clearly, not predict some task
    env, log, root = combined["env"], combined["log"], combined["root"]
    check_multitask_exports_and_stock_refusal(os.path.join(model, "fold_0"), 20, "DoDNetTrainer", dodnet["plans"],
                                              os.path.join(env["nnUNet_raw"], DATASET, "imagesTs"), str(root), env,
                                              log, offsets={"Liv": 0, "Spl": 2},
                                              source_values={"Liv": {0, 1, 2}, "Spl": {0, 1}})


def test_transdodnet_trains_and_predicts(combined):
    model, plans_name = _train(combined, "TransDoDNetTrainer")
    ckpt, losses = _check_model_folder(model, "TransDoDNetTrainer")
    assert ckpt["current_epoch"] == 3
    log = open(os.path.join(model, "fold_0", sorted(f for f in os.listdir(os.path.join(model, "fold_0"))
                                                    if f.startswith("training_log"))[0])).read()
    assert "patch [16, 40, 40] -> [16, 32, 32]" in log
    # 3 epochs: no warm-up (at most a tenth of the run), AdamW 2e-4 then poly
    assert "0 warm-up epochs of 3" in log
    assert "Current learning rate: 0.0002" in log
    dices, _ = _predict_and_check(combined, "TransDoDNetTrainer", plans_name, "pred_tdod")
    # learning criterion: the training loss decreases. A Dice threshold is not reliable here: at the paper's
    # AdamW lr 2e-4, 60 iterations only start to scale up the generated heads (measured: loss 1.51 -> 1.40,
    # test Dice 0.70 / 0.38 / 0.0), whereas DoDNet's SGD reaches Dice ~0.85 in the same run length
    assert losses[-1] < losses[0], losses
