"""The demo: a method trained and evaluated end to end through nnU-Net's own commands, on CPU.

``nnunet-plugins demo`` (the README's main job) does, in a work folder of its own:

1. ``nnunet-plugins synth``: a synthetic dataset (Dataset501_Synthetic, 3 structures, anisotropic,
   oblique) with held-out test cases;
2. ``nnunet-plugins plan -m CoTr --preprocess``: CoTr plans (narrow stages so that the CPU can train
   it in minutes; ``--full-width`` keeps the official widths) and nnU-Net's preprocessing;
3. ``nnUNetv2_train 501 3d_fullres 0 -tr CoTrTrainer -p nnUNetPlans_CoTr -device cpu`` with a short
   schedule (``NNUNET_PLUGINS_EPOCHS`` / ``NNUNET_PLUGINS_ITERS``);
4. ``nnUNetv2_predict`` on the held-out cases;
5. Dice per structure against the held-out labels, written to ``demo_summary.json`` and printed.

Every step is a real command line, printed before it runs, so the demo doubles as a recipe.
A rerun reuses finished steps (the dataset, the plans, a finished training) and redoes the rest.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from nnunet_plugins.atomic import write_json
from nnunet_plugins.runner import console_command, nnunet_cpu_env, run_step

DEMO_DATASET_ID = 501
# CoTr with a quarter of the official widths (official: 64/192/384/384, 6 heads, FFN 1536):
# about 2.9 M parameters, a few tenths of a second per training iteration on two CPU cores
DEMO_COTR_ARCH = {"stage_channels": [16, 48, 96, 96], "num_heads": 6, "ffn_dim": 384, "num_encoder_layers": 2}
DEMO_PATCH = (16, 64, 64)


def dice_per_label(reference_folder: str, prediction_folder: str, labels: dict) -> dict:
    """Dice of every foreground label over all cases (pooled) and per case; also checks geometry."""
    import SimpleITK as sitk

    per_case, pooled = {}, {name: [0, 0, 0] for name in labels if labels[name] != 0}
    files = sorted(f for f in os.listdir(reference_folder) if f.endswith(".nii.gz"))
    if not files:
        raise FileNotFoundError(f"no reference labels in {reference_folder}")
    for f in files:
        pred_path = os.path.join(prediction_folder, f)
        if not os.path.isfile(pred_path):
            raise FileNotFoundError(f"prediction missing for {f} in {prediction_folder}")
        ref_img, pred_img = sitk.ReadImage(os.path.join(reference_folder, f)), sitk.ReadImage(pred_path)
        for what in ("Spacing", "Origin", "Direction"):
            a, b = getattr(ref_img, f"Get{what}")(), getattr(pred_img, f"Get{what}")()
            if not np.allclose(a, b, atol=1e-4):
                raise ValueError(f"{f}: prediction {what.lower()} {b} differs from the reference's {a}")
        ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
        per_case[f] = {}
        for name, value in labels.items():
            if value == 0:
                continue
            r, p = ref == value, pred == value
            inter, total = int(np.logical_and(r, p).sum()), int(r.sum() + p.sum())
            per_case[f][name] = 1.0 if total == 0 else 2.0 * inter / total
            pooled[name][0] += inter
            pooled[name][1] += total
    dice = {name: (2.0 * i / t if t else 1.0) for name, (i, t, _) in pooled.items()}
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "per_case": per_case}


def run_demo(workdir: str, epochs: int = 8, iterations: int = 25, num_cases: int = 10, full_width: bool = False,
             seed: int = 0) -> dict:
    workdir = os.path.abspath(workdir)
    # the demo's own nnUNet_raw/_preprocessed/_results under workdir, CPU settings, trainers registered
    env = nnunet_cpu_env(workdir, threads=os.cpu_count() or 2)
    env.update(NNUNET_PLUGINS_EPOCHS=str(epochs), NNUNET_PLUGINS_ITERS=str(iterations),
               NNUNET_PLUGINS_VAL_ITERS="5", NNUNET_PLUGINS_SAVE_EVERY="1")
    raw, res = env["nnUNet_raw"], env["nnUNet_results"]
    log_file = os.path.join(workdir, "demo_log.txt")
    plugins = [sys.executable, "-m", "nnunet_plugins"]
    ds = str(DEMO_DATASET_ID)

    run_step(plugins + ["synth", "-d", ds, "--cases", str(num_cases), "--test-cases", "4", "--seed", str(seed),
                        "--raw", raw], env, log_file)
    plan_cmd = plugins + ["plan", "-d", ds, "-m", "CoTr", "--preprocess", "-np", "2",
                          "--patch-size", *map(str, DEMO_PATCH)]
    if not full_width:
        plan_cmd += ["--arch-kwargs", json.dumps(DEMO_COTR_ARCH)]
    run_step(plan_cmd, env, log_file)
    model_dir = os.path.join(res, "Dataset501_Synthetic", "CoTrTrainer__nnUNetPlans_CoTr__3d_fullres")
    train_cmd = console_command("nnUNetv2_train") + [ds, "3d_fullres", "0", "-tr", "CoTrTrainer", "-p", "nnUNetPlans_CoTr",
                                              "-device", "cpu"]
    if os.path.isfile(os.path.join(model_dir, "fold_0", "checkpoint_latest.pth")):
        train_cmd.append("--c")  # an interrupted demo continues where it stopped
    if not os.path.isfile(os.path.join(model_dir, "fold_0", "checkpoint_final.pth")):
        run_step(train_cmd, env, log_file)
    dataset_dir = os.path.join(raw, "Dataset501_Synthetic")
    pred_dir = os.path.join(workdir, "predictions")
    run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(dataset_dir, "imagesTs"), "-o", pred_dir, "-d", ds,
                                             "-c", "3d_fullres", "-f", "0", "-tr", "CoTrTrainer", "-p",
                                             "nnUNetPlans_CoTr", "-device", "cpu", "--disable_progress_bar"],
             env, log_file)
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        labels = json.load(f)["labels"]
    summary = dice_per_label(os.path.join(dataset_dir, "labelsTs"), pred_dir, labels)
    summary.update(method="CoTr", epochs=epochs, iterations_per_epoch=iterations, full_width=full_width)
    write_json(summary, os.path.join(workdir, "demo_summary.json"))
    print("\nCoTr on the synthetic dataset, held-out cases, Dice per structure:")
    for name, value in summary["dice"].items():
        print(f"  {name:12s} {value:.3f}")
    print(f"  {'mean':12s} {summary['mean_dice']:.3f}")
    print(f"(summary: {os.path.join(workdir, 'demo_summary.json')}, log: {log_file})")
    return summary
