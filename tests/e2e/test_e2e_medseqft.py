"""End to end (CPU, tiny U-Net): three synthetic datasets with different structures (A: 1, B: 2, C: 3
structures); `nnunet-plugins medseqft pretrain` on the images of all three (C's plans); a 2-stage sequence A -> B
with MedSeqFT and with plain sequential fine-tuning at the same budget (MedSeqFT: E teacher + E student epochs per
stage; plain: 2E epochs per stage); task-1 (A) Dice on A's held-out cases after stage 1 and after stage 2 with each
method (`medseqft predict --task`), task-2 Dice with the stock `nnUNetv2_predict -tr MedSeqFTTrainer`.

Printed: the forgetting table. Asserted: only what a broken run fails (models that learnt their task, task 1
still segmented after stage 2, the stage outputs and the buffers)."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins import cli
from nnunet_plugins.runner import console_command, run_step

from e2e_helpers import dice
from medseqft_helpers import PLUGINS, make_datasets, medseqft_env, plan_tiny

pytestmark = pytest.mark.slow

EPOCHS, ITERS = 4, 12
PLANS = "MedSeqFTPlans"


def _task_dice(pred_folder, labels_folder, label=1):
    values = []
    for f in sorted(os.listdir(labels_folder)):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels_folder, f)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_folder, f)))
        values.append(dice(ref == label, pred == label))
    return float(np.mean(values))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from nnunetv2 import paths

    root = tmp_path_factory.mktemp("e2e_medseqft")
    env = medseqft_env(root)
    log = str(root / "log.txt")
    make_datasets(env, cases=6, test_cases=3)
    plan_tiny(env, 33, log)
    run_step(PLUGINS + ["medseqft", "pretrain", "-d", "33", "31", "32", "--iterations", "30", "--cube-size", "8",
                        "-device", "cpu", "-np", "1"], env, log)
    init = os.path.join(env["nnUNet_results"], "Dataset033_C", f"MedSeqFTPretrainer__{PLANS}__3d_fullres", "fold_all",
                        "checkpoint_final.pth")
    common = PLUGINS + ["medseqft", "run", "--init", init, "--sequence", "31", "32", "--cube-size", "8", "-k", "3",
                        "--repeats", "2", "-device", "cpu", "--iterations", str(ITERS), "--val-iterations", "1",
                        "-np", "1", "--no-val"]
    run_step(common + ["--epochs", str(EPOCHS)], env, log)
    run_step(common + ["--epochs", str(2 * EPOCHS), "--plain"], env, log)
    raw = env["nnUNet_raw"]
    table = {}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.setattr(paths, name, env[name])
        for trainer in ("MedSeqFTTrainer", "SequentialFTTrainer"):
            for stage, dataset in ((1, "31"), (2, "32")):
                out = str(root / f"{trainer}_{stage}_task1")
                assert cli.main(["medseqft", "predict", "-i", os.path.join(raw, "Dataset031_A", "imagesTs"), "-o", out,
                                 "-d", dataset, "--task", "31", "-tr", trainer, "-device", "cpu",
                                 "--disable-tta"]) == 0
                table[trainer, stage] = _task_dice(out, os.path.join(raw, "Dataset031_A", "labelsTs"))
    # task 2 through nnU-Net's own predictor: the stage's model folder predicts its task
    out = str(root / "task2")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(raw, "Dataset032_B", "imagesTs"), "-o", out,
                                                     "-d", "32", "-c", "3d_fullres", "-f", "0", "-tr", "MedSeqFTTrainer",
                                                     "-p", PLANS, "-device", "cpu", "--disable_tta", "-npp", "1",
                                                     "-nps", "1"], env, log)
    task2 = np.mean([_task_dice(out, os.path.join(raw, "Dataset032_B", "labelsTs"), label) for label in (1, 2)])
    print("\ntask-1 (A) Dice on A's held-out cases (forgetting = after stage 1 - after stage 2):")
    print("| method | after stage 1 | after stage 2 | forgetting |\n| --- | --- | --- | --- |")
    for trainer, label in (("MedSeqFTTrainer", "MedSeqFT"), ("SequentialFTTrainer", "plain sequential FT")):
        a, b = table[trainer, 1], table[trainer, 2]
        print(f"| {label} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    print(f"task-2 (B) mean Dice of the MedSeqFT stage-2 model (nnUNetv2_predict): {task2:.3f}")
    return {"env": env, "table": table, "task2": task2}


def test_stages_learn_and_task1_survives(runs):
    t = runs["table"]
    # thresholds a broken run fails: a stage that learnt nothing, a merge that broke the network, a lost head
    assert t["MedSeqFTTrainer", 1] > 0.3 and t["SequentialFTTrainer", 1] > 0.3, t
    assert t["MedSeqFTTrainer", 2] > 0.2, t
    assert runs["task2"] > 0.2, runs["task2"]


def test_stage_folders_and_buffers(runs):
    results = runs["env"]["nnUNet_results"]
    for dataset, classes in (("Dataset031_A", [2]), ("Dataset032_B", [2, 3])):
        folder = os.path.join(results, dataset, f"MedSeqFTTrainer__{PLANS}__3d_fullres")
        assert json.load(open(os.path.join(folder, "plans.json")))["medseqft"]["task_classes"] == classes
        record = json.load(open(os.path.join(folder, "fold_0", "medseqft_stage.json")))
        assert record["method"] == "medseqft" and record["dataset"] == dataset
        buffer = json.load(open(os.path.join(folder, "fold_0", "medseqft_buffer.json")))
        assert len(buffer["case_ids"]) == 3 and len(buffer["scores"]) == 4     # 6 cases: fold 0 trains on 4
        chosen = [buffer["scores"][c] for c in buffer["case_ids"]]
        assert chosen == sorted(chosen) and max(chosen) <= min(v for c, v in buffer["scores"].items()
                                                                if c not in buffer["case_ids"])
        assert os.path.isfile(os.path.join(results, dataset, f"SequentialFTTrainer__{PLANS}__3d_fullres", "fold_0",
                                           "medseqft_stage.json"))
