"""nnU-Net's own DDP training (``run_ddp``, what ``nnUNetv2_train -num_gpus 2`` runs) on CPU with gloo, for every
plugin trainer of the registry: 2 processes, 2 iterations each, tiny networks (``nnunet_plugins.ddp_cpu``);
semi-supervised trainers (LeFeD: 3 forward/backward passes and optimiser steps per iteration) take their
unlabeled data from the harness dataset's ``splits_semi.json``.

Checked: both ranks run DDP on CPU with half the plans' batch; they end with identical weights (hash of the whole
state dict, buffers included) equal to the checkpoint; only rank 0 writes checkpoints; multi-task batches hold one
task per rank; BA-Net's boundary targets train; ``--c`` continues (epoch, weights) and the final validation
(split over the ranks, multi-task per task) completes.

Multi-task design under DDP: each rank draws its own batches (nnU-Net's DDP has no distributed sampler), so in one
step the ranks may hold different tasks. DDP stays consistent because MultiTaskTrainer wraps the network with
``find_unused_parameters=True``: every rank reduces every gradient bucket, a parameter that a rank's task did
not use contributes zero there. A global step therefore averages over up to world-size tasks (each rank's batch
is single-task, as UniSeg's sampler requires).
"""
import json
import math
import os

import pytest
import torch

from nnunet_plugins import trainer_check as tc
from nnunet_plugins.ddp_cpu import dict_hash, train_ddp

pytestmark = pytest.mark.slow

SHORT = {"NNUNET_PLUGINS_EPOCHS": "1", "NNUNET_PLUGINS_ITERS": "2", "NNUNET_PLUGINS_VAL_ITERS": "1",
         "NNUNET_PLUGINS_SAVE_EVERY": "1"}
CONTINUED = "DoDNetTrainer"


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_cpu")
    env = tc.check_environment(str(root))
    env["nnUNet_def_n_proc"] = "1"
    pre = tc.prepare_dataset(env)
    trainers = tc.plugin_trainer_names()
    runs = [{"trainer": t, "plans": tc.write_check_plans(pre, t, "tiny")[0], "validate": False, "env": SHORT,
             "seed": 0} for t in trainers]
    first = next(r for r in runs if r["trainer"] == CONTINUED)
    runs.append(dict(first, continue_training=True, validate=True, env=dict(SHORT, NNUNET_PLUGINS_EPOCHS="2")))
    reports = train_ddp(tc.DATASET_ID, tc.CONFIGURATION, 0, runs, str(root / "reports"), env=env, timeout_s=900)
    return {"trainers": trainers, "reports": dict(zip(trainers, reports)), "continued": reports[-1], "root": root,
            "env": env, "pre": pre}


def _rank_batch(trainer):
    """nnU-Net splits the plans' batch (2) over the ranks; semi-supervised trainers draw L + U per rank."""
    import nnunet_plugins.trainers as trainers
    from nnunet_plugins.trainers.semi import SemiSupervisedTrainer

    cls = getattr(trainers, trainer)
    return cls.labeled_batch_size + cls.unlabeled_batch_size if issubclass(cls, SemiSupervisedTrainer) else 1


def _checkpoint(report):
    return torch.load(os.path.join(report["output_folder"], "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)


def test_every_trainer_trains_under_ddp_with_identical_weights(ddp):
    assert set(ddp["reports"]) >= {"CoTrTrainer", "BANetTrainer", "UniSegTrainer", "DoDNetTrainer",
                                   "TransDoDNetTrainer", "LeFeDTrainer"}
    for trainer, (rank0, rank1) in ddp["reports"].items():
        for rank, report in enumerate((rank0, rank1)):
            assert report["rank"] == rank and report["is_ddp"] and report["device"] == "cpu", (trainer, report)
            assert report["batch_size"] == _rank_batch(trainer), f"{trainer}: the plans' batch of 2 is split over 2 ranks"
            assert len(report["steps"]) == 2 and report["current_epoch"] == 1, (trainer, report)
        assert rank0["state_hash"] == rank1["state_hash"], f"{trainer}: ranks diverged"
    # equal weights must come from DDP's gradient averaging, not from equal data: the ranks draw their own batches
    differing = [t for t, (a, b) in ddp["reports"].items() if [s["keys"] for s in a["steps"]] != [s["keys"] for s in
                                                                                                 b["steps"]]]
    assert len(differing) >= len(ddp["reports"]) // 2, differing


def test_rank0_alone_writes_checkpoints_holding_the_common_weights(ddp):
    for trainer, (rank0, rank1) in ddp["reports"].items():
        assert rank1["saved"] == [], f"{trainer}: rank 1 wrote {rank1['saved']}"
        assert "checkpoint_final.pth" in rank0["saved"], trainer
        epochs = 1
        if trainer == CONTINUED:  # its model folder holds the continued run's checkpoint
            rank0, epochs = ddp["continued"][0], 2
        ckpt = _checkpoint(rank0)
        assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == epochs  # epochs done
        assert dict_hash(ckpt["network_weights"]) == rank0["state_hash"], trainer
        losses = ckpt["logging"]["train_losses"]
        assert len(losses) == epochs and all(math.isfinite(float(v)) for v in losses), (trainer, losses)


def test_banet_boundary_decoder_trains_under_ddp(ddp):
    for trainer in ("BANetTrainer", "BANetTrainer_consistency"):
        weights = _checkpoint(ddp["reports"][trainer][0])["network_weights"]
        init = {k: v for k, v in weights.items() if k.startswith("boundary_decoder.")}
        assert init, f"{trainer}: no boundary decoder in the checkpoint"
        log = open(_training_log(ddp["reports"][trainer][0])).read()
        assert "boundary_loss" in log, f"{trainer}: boundary loss not logged under DDP"


def _training_log(report):
    folder = report["output_folder"]
    return os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("training_log"))[-1])


def test_multitask_batches_hold_one_task_per_rank(ddp):
    multitask = [t for t, reps in ddp["reports"].items() if reps[0]["steps"][0]["task_ids"] is not None]
    assert {"UniSegTrainer", "DoDNetTrainer", "TransDoDNetTrainer", "VerSemiTrainer"} <= set(multitask)
    # VerSemi's stage 2 (the 1-epoch run starts in it) draws one unlabeled sample per rank and step
    assert all(len(s["keys"]) == 2 for r in ddp["reports"]["VerSemiTrainer"] for s in r["steps"])
    for trainer in multitask:
        for report in ddp["reports"][trainer]:
            for step in report["steps"]:
                # semi-supervised multi-task batches (VerSemi's stage 2) append unlabeled samples, task id -1
                labeled = [t for t in step["task_ids"] if t >= 0]
                assert len(labeled) == 1 and len(step["keys"]) == len(step["task_ids"]), (trainer, step)
                assert step["task_ids"][0] >= 0 and all(t == -1 for t in step["task_ids"][1:]), (trainer, step)
                tag = step["keys"][0].split("_")[0]
                assert {"CheckA": 0, "CheckB": 1}[tag] == step["task_ids"][0], (trainer, step)
        print(trainer, "tasks per step (rank 0 | rank 1):",
              [(a["task_ids"][0], b["task_ids"][0]) for a, b in zip(*(r["steps"] for r in ddp["reports"][trainer]))])


def test_continue_under_ddp_and_final_validation(ddp):
    first0 = ddp["reports"][CONTINUED][0]
    rank0, rank1 = ddp["continued"]
    assert rank0["current_epoch"] == rank1["current_epoch"] == 2
    assert rank0["state_hash"] == rank1["state_hash"] != first0["state_hash"]
    assert rank1["saved"] == [] and "checkpoint_final.pth" in rank0["saved"]
    ckpt = _checkpoint(rank0)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["train_losses"]) == 2
    log = open(_training_log(rank0)).read()
    assert "Epoch 1" in log and "Epoch 0" not in log
    # the final validation ran split over both ranks; rank 0 wrote the per-task summary
    validation = os.path.join(rank0["output_folder"], "validation")
    assert os.path.isfile(os.path.join(validation, "summary_per_task.json"))
    assert len([f for f in os.listdir(validation) if f.endswith(".nii.gz")]) == 2


def test_multitask_batch_dice_under_ddp_with_ranks_on_different_tasks(ddp):
    """UniSeg on plans with batch Dice (nnU-Net's planner sets ``batch_dice`` for 2-D configurations), 2 ranks.

    nnU-Net's Dice loss with ``ddp=True`` and batch Dice all-gathers its per-class sums across the ranks; the
    multi-task loss applies it to each rank's task channels, so when the ranks hold different tasks in a step
    (seed 0: step 1 has tasks 0 and 1) they would exchange tensors of different sizes (gloo aborts: "Received
    data size doesn't match expected size"; NCCL: undefined). MultiTaskTrainer._build_loss turns the gathering
    off (batch Dice over the rank's own single-task batch; DDP still averages the gradients): ranks end identical.
    """
    plans_name = tc.write_check_plans(ddp["pre"], "UniSegTrainer", "tiny")[0]
    plans = json.load(open(os.path.join(ddp["pre"], plans_name + ".json")))
    plans["plans_name"] = plans_name + "_batchdice"
    plans["configurations"][tc.CONFIGURATION]["batch_dice"] = True
    json.dump(plans, open(os.path.join(ddp["pre"], plans["plans_name"] + ".json"), "w"), indent=1)
    env = dict(ddp["env"], NNUNET_PLUGINS_DDP_TIMEOUT="60")
    run = {"trainer": "UniSegTrainer", "plans": plans["plans_name"], "validate": False, "seed": 0,
           "env": dict(SHORT, NNUNET_PLUGINS_ITERS="4")}
    rank0, rank1 = train_ddp(tc.DATASET_ID, tc.CONFIGURATION, 0, [run], str(ddp["root"] / "reports_batchdice"),
                             env=env, timeout_s=300)[0]
    tasks = [(a["task_ids"][0], b["task_ids"][0]) for a, b in zip(rank0["steps"], rank1["steps"])]
    assert any(a != b for a, b in tasks), f"the seed no longer puts the ranks on different tasks: {tasks}"
    assert rank0["state_hash"] == rank1["state_hash"]
