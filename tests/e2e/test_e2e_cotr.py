"""End to end: CoTr through nnU-Net's own commands, as a user runs them (CPU, tiny configuration).

synthetic dataset -> `nnunet-plugins plan -m CoTr --preprocess` -> `nnUNetv2_train -tr CoTrTrainer`
-> `nnUNetv2_train --c` (continue) -> `nnUNetv2_predict` -> Dice against the held-out labels, and the
prediction's geometry equals the input's.
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

from e2e_helpers import assert_same_geometry, dice

pytestmark = pytest.mark.slow

TINY_COTR = {"stage_channels": [8, 24, 48, 48], "blocks_per_stage": [1, 1, 1], "num_heads": 4, "ffn_dim": 96,
             "num_encoder_layers": 1}


def test_cotr_plan_train_continue_predict(nnunet_env, tmp_path):
    env = dict(nnunet_env, NNUNET_PLUGINS_EPOCHS="4", NNUNET_PLUGINS_ITERS="30", NNUNET_PLUGINS_VAL_ITERS="2",
               NNUNET_PLUGINS_SAVE_EVERY="1", NNUNET_PLUGINS_SEED="0")  # seeded: reproducible on CI
    log = str(tmp_path / "log.txt")
    raw = env["nnUNet_raw"]
    folder = generate_dataset(raw, dataset_id=501, num_cases=8, num_test=2, shape=(16, 48, 48),
                              spacing=(3.0, 0.8, 0.8), num_structures=2, seed=1)

    plugins = [sys.executable, "-m", "nnunet_plugins"]
    run_step(plugins + ["plan", "-d", "501", "-m", "CoTr", "--preprocess", "--patch-size", "16", "32", "32",
                        "--arch-kwargs", json.dumps(TINY_COTR)], env, log)
    plans_file = os.path.join(env["nnUNet_preprocessed"], "Dataset501_Synthetic", "nnUNetPlans_CoTr.json")
    plans = json.load(open(plans_file))
    assert list(plans["configurations"]) == ["3d_fullres"]
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["patch_size"] == [16, 32, 32]
    assert cfg["architecture"]["network_class_name"] == "nnunet_plugins.architectures.cotr.CoTr"

    train = console_command("nnUNetv2_train") + ["501", "3d_fullres", "0", "-tr", "CoTrTrainer", "-p",
                                                  "nnUNetPlans_CoTr", "-device", "cpu"]
    run_step(train, dict(env, NNUNET_PLUGINS_EPOCHS="3"), log)
    model = os.path.join(env["nnUNet_results"], "Dataset501_Synthetic", "CoTrTrainer__nnUNetPlans_CoTr__3d_fullres")
    final = os.path.join(model, "fold_0", "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "CoTrTrainer" and ckpt["current_epoch"] == 3
    first_weights = {k: v.clone() for k, v in ckpt["network_weights"].items()}

    # continue: nnU-Net restores network, optimiser and epoch counter and trains the remaining epoch
    run_step(train + ["--c"], env, log)
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 4
    assert any(not torch.equal(first_weights[k], v) for k, v in ckpt["network_weights"].items())
    logs = sorted(f for f in os.listdir(os.path.join(model, "fold_0")) if f.startswith("training_log"))
    assert len(logs) == 2
    second = open(os.path.join(model, "fold_0", logs[-1])).read()
    assert "Epoch 3" in second and "Epoch 0" not in second, "continued training must resume at epoch 3"
    # the model folder's plans are what the predictor uses
    assert json.load(open(os.path.join(model, "plans.json")))["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 32]

    # nnU-Net's model selection reads the fold's validation results like for its own trainers
    run_step(console_command("nnUNetv2_find_best_configuration") + ["501", "-c", "3d_fullres", "-tr", "CoTrTrainer",
                                                                    "-p", "nnUNetPlans_CoTr", "-f", "0",
                                                                    "--disable_ensembling"], env, log)
    instructions = open(os.path.join(env["nnUNet_results"], "Dataset501_Synthetic", "inference_instructions.txt")).read()
    assert "-tr CoTrTrainer" in instructions and "-p nnUNetPlans_CoTr" in instructions

    predict = console_command("nnUNetv2_predict") + ["-i", os.path.join(folder, "imagesTs"), "-d", "501", "-c",
                                                     "3d_fullres", "-f", "0", "-tr", "CoTrTrainer", "-p",
                                                     "nnUNetPlans_CoTr", "-device", "cpu", "--disable_progress_bar",
                                                     "--save_probabilities"]
    out, out_no_tta, ensembled = (str(tmp_path / n) for n in ("pred", "pred_no_tta", "ensemble"))
    run_step(predict + ["-o", out], env, log)
    run_step(predict + ["-o", out_no_tta, "--disable_tta"], env, log)
    run_step(console_command("nnUNetv2_ensemble") + ["-i", out, out_no_tta, "-o", ensembled, "-np", "1"], env, log)
    for case in ("Synthetic_008", "Synthetic_009"):
        probabilities = np.load(os.path.join(out, case + ".npz"))["probabilities"]
        assert probabilities.shape == (3, 16, 48, 48)
        np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-3)
        assert os.path.isfile(os.path.join(ensembled, case + ".nii.gz"))
    dices = []
    for case in ("Synthetic_008", "Synthetic_009"):
        ref_img = sitk.ReadImage(os.path.join(folder, "labelsTs", case + ".nii.gz"))
        pred_img = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        assert_same_geometry(pred_img, ref_img)
        ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
        assert set(np.unique(pred)) <= {0, 1, 2}
        dices += [dice(ref == 1, pred == 1), dice(ref == 2, pred == 2)]
    # learned: an untrained or broken model is far below this (chance-level overlap of these small
    # structures is a few percent); 120 tiny-CoTr iterations reach about 0.9 (validation fold: 0.92)
    print("held-out Dice", dices)
    assert np.mean(dices) > 0.7, dices
