"""MedSeqFT against plain sequential fine-tuning: time and memory per stage, forgetting of task 1.

Runs in a work folder (``--workdir``, a rerun reuses finished steps: the stages are skipped by their records):
three synthetic datasets (A: 1, B: 2, C: 3 structures), nnU-Net's plans of C narrowed to a small U-Net
(``--features``, ``--patch``), ``nnunet-plugins medseqft pretrain`` on the images of all three, then the sequence
A -> B twice: MedSeqFT (E teacher + E student epochs per stage) and plain sequential fine-tuning at the same budget
(2E epochs per stage). Reported, from the stage records and the predictions:

* per stage and method: wall time of each phase (MDS buffer, teacher, LoRA student / plain fine-tuning), its
  ratio to plain fine-tuning, and peak memory (CUDA: peak allocation in the stage; CPU: the run's peak resident
  set so far);
* forgetting: task-1 Dice on A's held-out cases after stage 1 and after stage 2 (``medseqft predict --task``).

    OMP_NUM_THREADS=1 python benchmarks/bench_medseqft.py [--workdir DIR] [--epochs 4] [--iterations 12]
        [--device cpu|cuda] [--features 4 8 16 16 16 16] [--patch 16 32 32] [--cases 6]

Writes ``benchmarks/results/medseqft.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PLANS = "MedSeqFTPlans"
DATASETS = {31: ("A", 1), 32: ("B", 2), 33: ("C", 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="medseqft_bench_work")
    p.add_argument("--epochs", type=int, default=4, help="E: epochs of each MedSeqFT phase (plain: 2E)")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 16, 16, 16])
    p.add_argument("--patch", type=int, nargs=3, default=[16, 32, 32])
    p.add_argument("--shape", type=int, nargs=3, default=[16, 32, 32], help="synthetic volume size")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--pretrain-iterations", type=int, default=30)
    p.add_argument("--out", default=os.path.join(HERE, "results", "medseqft"))
    return p.parse_args(argv)


def _dice(pred_folder, labels_folder, label=1):
    import SimpleITK as sitk

    values = []
    for f in sorted(os.listdir(labels_folder)):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels_folder, f))) == label
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_folder, f))) == label
        values.append(2 * np.logical_and(ref, pred).sum() / max(1, ref.sum() + pred.sum()))
    return float(np.mean(values))


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnunet_plugins.runner import console_command, nnunet_cpu_env, run_step
    from nnunet_plugins.synthetic import generate_dataset

    root = os.path.abspath(args.workdir)
    env = nnunet_cpu_env(root, augmentation_workers=0, threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
    log = os.path.join(root, "log.txt")
    plugins = [sys.executable, "-m", "nnunet_plugins"]
    for i, (name, structures) in DATASETS.items():
        generate_dataset(env["nnUNet_raw"], dataset_id=i, name=name, num_cases=args.cases, num_test=3,
                         shape=tuple(args.shape), num_structures=structures, seed=i)
    plans_file = os.path.join(env["nnUNet_preprocessed"], "Dataset033_C", "nnUNetPlans.json")
    if not os.path.isfile(plans_file):
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}   # nnU-Net's planner crashes on 0
        run_step(console_command("nnUNetv2_extract_fingerprint") + ["-d", "33", "-np", "1"], plan_env, log)
        run_step(console_command("nnUNetv2_plan_experiment") + ["-d", "33"], plan_env, log)
        plans = json.load(open(plans_file))
        cfg = plans["configurations"]["3d_fullres"]
        kwargs = cfg["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = list(args.features[:kwargs["n_stages"]])
        cfg["patch_size"] = list(args.patch)
        json.dump(plans, open(plans_file, "w"), indent=1)
    run_step(plugins + ["medseqft", "pretrain", "-d", "33", "31", "32", "--iterations", str(args.pretrain_iterations),
                        "--cube-size", "8", "-device", args.device, "-np", "1"], env, log)
    init = os.path.join(env["nnUNet_results"], "Dataset033_C", f"MedSeqFTPretrainer__{PLANS}__3d_fullres",
                        "fold_all", "checkpoint_final.pth")
    common = plugins + ["medseqft", "run", "--init", init, "--sequence", "31", "32", "--cube-size", "8", "-k", "3",
                        "--repeats", "2", "-device", args.device, "--iterations", str(args.iterations),
                        "--val-iterations", "1", "-np", "1", "--no-val"]
    methods = {"MedSeqFT": ("MedSeqFTTrainer", ["--epochs", str(args.epochs)]),
               "plain": ("SequentialFTTrainer", ["--epochs", str(2 * args.epochs), "--plain"])}
    rows = {}
    for method, (trainer, extra) in methods.items():
        run_step(common + extra, env, log)
        for stage, (dataset, name) in enumerate([("31", "Dataset031_A"), ("32", "Dataset032_B")], start=1):
            folder = os.path.join(env["nnUNet_results"], name, f"{trainer}__{PLANS}__3d_fullres", "fold_0")
            record = json.load(open(os.path.join(folder, "medseqft_stage.json")))
            out = os.path.join(root, f"pred_{trainer}_{stage}")
            run_step(plugins + ["medseqft", "predict", "-i", os.path.join(env["nnUNet_raw"], "Dataset031_A", "imagesTs"),
                                "-o", out, "-d", dataset, "--task", "31", "-tr", trainer, "-device", args.device,
                                "--disable-tta"], env, log)
            rows[method, stage] = {"seconds": record.get("seconds", {}), "peak_memory_mib": record.get("peak_memory_mib"),
                                   "task1_dice": _dice(out, os.path.join(env["nnUNet_raw"], "Dataset031_A", "labelsTs"))}
    lines = [f"MedSeqFT vs plain sequential fine-tuning ({args.device}; E={args.epochs} x {args.iterations} iterations "
             f"per phase, plain 2E; U-Net features {args.features}, patch {args.patch})", "",
             "| stage | method | buffer s | teacher s | student / fine-tune s | total s | total / plain | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for stage in (1, 2):
        plain_total = sum(rows["plain", stage]["seconds"].values()) or float("nan")
        for method in methods:
            r = rows[method, stage]
            s = r["seconds"]
            total = sum(s.values())
            lines.append(f"| {stage} | {method} | {s.get('buffer', 0):.1f} | {s.get('teacher', 0):.1f} | "
                         f"{s.get('student', 0):.1f} | {total:.1f} | {total / plain_total:.2f} | {r['peak_memory_mib']} |")
    lines += ["", "| method | task-1 Dice after stage 1 | after stage 2 | forgetting |", "| --- | --- | --- | --- |"]
    for method in methods:
        a, b = rows[method, 1]["task1_dice"], rows[method, 2]["task1_dice"]
        lines.append(f"| {method} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({f"{m}/{s}": v for (m, s), v in rows.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
