"""End to end: official-format checkpoints of all five methods -> `nnunet-plugins convert-checkpoint` -> model
folders that nnU-Net's commands run: `nnUNetv2_predict -tr BANetTrainer / CoTrTrainer` (single-task) and
`nnunet-plugins predict-multitask -tr UniSegTrainer / DoDNetTrainer / TransDoDNetTrainer` (multi-task).

One tiny preprocessed dataset serves every folder: two synthetic sources combined into a multi-task dataset
("Liv": 1 channel, 2 labels; "Spl": 2 channels, 1 label), planned and preprocessed once by stock nnU-Net.
The single-task models treat it as a plain 2-channel, 4-label dataset. The checkpoints are tiny networks
with random weights written in the official naming (tests/official_names.py); the in-process test
tests/checkpoints/test_model_folder.py checks that nnU-Net's predictor loads exactly those weights, this
one that the stock commands run on the folders and write segmentations on the images' geometry.
"""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_plugins.cli import main as cli_main
from nnunet_plugins.runner import console_command, run_step
from nnunet_plugins.synthetic import generate_dataset

from checkpoint_helpers import official_checkpoints
from e2e_helpers import assert_same_geometry

pytestmark = pytest.mark.slow

PLUGINS = [sys.executable, "-m", "nnunet_plugins"]
DATASET = "Dataset030_Ckpt"
TRAINERS = {"banet": "BANetTrainer", "cotr": "CoTrTrainer", "uniseg": "UniSegTrainer", "dodnet": "DoDNetTrainer",
            "transdodnet": "TransDoDNetTrainer"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from nnunet_plugins.runner import nnunet_cpu_env

    root = tmp_path_factory.mktemp("e2e_ckpt")
    env = nnunet_cpu_env(root, augmentation_workers=None, threads=1)
    log = str(root / "log.txt")
    raw = env["nnUNet_raw"]
    generate_dataset(raw, dataset_id=31, name="Liv", num_cases=2, num_test=1, shape=(16, 40, 40), num_structures=2,
                     num_channels=1, seed=1)
    generate_dataset(raw, dataset_id=32, name="Spl", num_cases=2, num_test=1, shape=(16, 40, 40), num_structures=1,
                     num_channels=2, seed=2)
    # single-task: 2 channels, 4 labels; multi-task: 2 tasks, UniSeg 3 classes (Liv), 2 binary channels
    checkpoints = official_checkpoints(2, 4, uniseg_classes=3, num_tasks=2, binary_channels=2)
    with pytest.MonkeyPatch.context() as mp:   # our commands in this process (saves interpreter start-ups)
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setenv(name, env[name])
        assert cli_main(["combine", "-d", "31", "32", "-o", "30", "-n", "Ckpt", "-np", "1", "--raw", raw]) == 0
        run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", "30", "-c", "3d_fullres", "-np", "1"], env,
                 log)
        labels = json.load(open(os.path.join(env["nnUNet_preprocessed"], DATASET, "dataset.json")))["labels"]
        assert sorted(labels.values()) == [0, 1, 2, 3]
        for method, (_, official, kwargs) in checkpoints.items():
            path = str(root / f"{method}_official.pth")
            torch.save(official, path)
            cmd = ["convert-checkpoint", method, "-i", path, "-d", "30", "-c", "3d_fullres", "-f", "0"]
            assert cli_main(cmd + (["--arch-kwargs", json.dumps(kwargs)] if kwargs else [])) == 0
    return {"env": env, "log": log, "root": root, "images": os.path.join(raw, DATASET, "imagesTs")}


def _check_outputs(out, images, allowed):
    cases = sorted(f[:-len("_0000.nii.gz")] for f in os.listdir(images) if f.endswith("_0000.nii.gz"))
    assert cases == ["Liv_Liv_002", "Spl_Spl_002"]
    for case in cases:
        pred = sitk.ReadImage(os.path.join(out, case + ".nii.gz"))
        assert_same_geometry(pred, sitk.ReadImage(os.path.join(images, case + "_0000.nii.gz")))
        values = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
        assert values <= allowed(case), (case, values)


@pytest.mark.parametrize("method", ["banet", "cotr"])
def test_stock_predict_runs_single_task_model_folders(prepared, method):
    env, root = prepared["env"], prepared["root"]
    out = str(root / f"pred_{method}")
    run_step(console_command("nnUNetv2_predict") + ["-i", prepared["images"], "-o", out, "-d", "30", "-c", "3d_fullres",
                                                    "-f", "0", "-tr", TRAINERS[method], "-device", "cpu", "--disable_tta",
                                                    "-npp", "0", "-nps", "0", "--disable_progress_bar"], env, prepared["log"])
    _check_outputs(out, prepared["images"], lambda case: {0, 1, 2, 3})


@pytest.mark.parametrize("method", ["uniseg", "dodnet", "transdodnet"])
def test_predict_multitask_runs_multi_task_model_folders(prepared, method):
    env, root = prepared["env"], prepared["root"]
    out = str(root / f"pred_{method}")
    run_step(PLUGINS + ["predict-multitask", "-i", prepared["images"], "-o", out, "-d", "30", "-tr", TRAINERS[method],
                        "-f", "0", "-device", "cpu", "--disable-tta", "-npp", "0", "-nps", "0"], env, prepared["log"])
    # each case only gets its own task's labels (Liv: combined 1, 2; Spl: 3)
    _check_outputs(out, prepared["images"], lambda case: {0, 1, 2} if case.startswith("Liv") else {0, 3})
