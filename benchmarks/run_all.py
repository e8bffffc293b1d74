"""Every plugin trainer's training step and prediction against nnU-Net's default trainer, in one command.

For each trainer of the registry (``nnunet_plugins.trainer_check``): the trainer and nnU-Net's default
``nnUNetTrainer`` are made by nnU-Net's own ``get_trainer_from_args`` on plans of the SAME patch, batch size and
preprocessed data (the baseline's network is the U-Net nnU-Net plans for that patch), trained for ``--steps``
steps on one batch of their own data loader (median step time after the first), then each model predicts one
preprocessed case with nnU-Net's sliding window (``nnUNetPredictor``; multi-task trainers: this package's
``MultiTaskPredictor`` on their first task). All timings come from THIS process; the ratios trainer / default
trainer are what to read (CPU timings on a shared machine vary; the ratios much less).

Writes into ``--out`` (default ``benchmarks/results``): ``run_all.json``, ``run_all.md`` (the table) and
``run_all.png`` (bar chart of the ratios; needs matplotlib, which nnU-Net installs; without it the chart is
skipped with a message).

    OMP_NUM_THREADS=1 python benchmarks/run_all.py                      # CPU: tiny networks, 16x32x32 patches
    python benchmarks/run_all.py --device cuda                          # CUDA + AMP: published patches and widths
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--size", default=None, choices=("tiny", "official"),
                   help="patches and widths (default: official on CUDA, tiny on CPU)")
    p.add_argument("--steps", type=int, default=5, help="training steps per trainer (the first is not timed)")
    p.add_argument("--trainers", nargs="+", default=None, help="default: every trainer in the registry")
    p.add_argument("--no-tta", action="store_true", help="predict without test-time mirroring (default on)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--work-dir", default=None, help="keep data and models here (default: a removed temp folder)")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.size = args.size or ("official" if args.device == "cuda" else "tiny")
    return args


def _fmt(value, scale=1.0, digits=1):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def render_markdown(results: dict) -> str:
    env = results["environment"]
    amp = " (AMP)" if results["device"] == "cuda" else ""
    lines = [f"{env.get('device_name', '?')}, device {results['device']}{amp}, {results['size']} sizes, "
             f"torch {env.get('torch')}, nnU-Net {env.get('nnunetv2')}, "
             f"{env.get('cpu_threads')} CPU threads; median of {results['steps'] - 1} timed steps", "",
             "| trainer | patch x batch | parameters | step ms | nnUNetTrainer step ms | step ratio | predict s | "
             "nnUNetTrainer predict s | predict ratio | memory ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["trainers"]:
        if "error" in row or "skipped" in row:
            lines.append(f"| {row['trainer']} | {row.get('error') or row.get('skipped')} |" + " - |" * 8)
            continue
        base = row["baseline"]
        lines.append(f"| {row['trainer']} | {'x'.join(map(str, row['patch']))} x {row['batch_size']} | "
                     f"{row['parameters'] / 1e6:.2f}M | {_fmt(row['median_step_s'], 1e3)} | "
                     f"{_fmt(base['median_step_s'], 1e3)} | {_fmt(row['step_ratio'], digits=2)} | "
                     f"{_fmt(row.get('sliding_window_s'), digits=2)} | "
                     f"{_fmt(base.get('sliding_window_s'), digits=2)} | "
                     f"{_fmt(row.get('predict_ratio'), digits=2)} | {_fmt(row.get('memory_ratio'), digits=2)} |")
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: str) -> str | None:
    """Bar chart of the step and predict ratios per trainer (1.0 = nnU-Net's default trainer)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart written (pip install matplotlib)")
        return None
    rows = [r for r in results["trainers"] if "step_ratio" in r]
    if not rows:
        return None
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4))
    ax.bar(x - 0.2, [r["step_ratio"] for r in rows], 0.4, label="training step")
    ax.bar(x + 0.2, [r.get("predict_ratio") or 0 for r in rows], 0.4, label="prediction (sliding window)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(x, [r["trainer"].replace("Trainer", "").replace("_", "\n") for r in rows])
    ax.set_ylabel("time / nnUNetTrainer (same plans)")
    ax.set_title(f"{results['device']}, {results['size']} sizes")
    ax.legend()
    fig.tight_layout()
    from nnunet_plugins.atomic import atomic_output
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    from nnunet_plugins import trainer_check as tc

    own_work = args.work_dir is None
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="nnunet_plugins_run_all-"))
    env = tc.setup_environment(work, threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
    from nnunet_plugins.device_check import environment_info
    from nnunet_plugins.atomic import atomic_output, write_json

    os.makedirs(args.out, exist_ok=True)
    log_file = os.path.join(args.out, "run_all_log.txt")
    start = time.time()
    try:
        with open(log_file, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            pre = tc.prepare_dataset(env, shape=(32, 96, 96) if args.size == "official" else (16, 40, 40),
                                     log_file=log_file)
            rows = tc.compare_trainers(pre, args.device, args.size, args.steps, args.trainers, sliding_window=True,
                                       tta=not args.no_tta, log=lambda m: print(m, file=sys.__stdout__, flush=True))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    results = {"device": args.device, "size": args.size, "steps": args.steps, "tta": not args.no_tta,
               "environment": environment_info(args.device), "elapsed_s": time.time() - start, "trainers": rows}
    write_json(results, os.path.join(args.out, "run_all.json"))
    md = render_markdown(results)
    with atomic_output(os.path.join(args.out, "run_all.md")) as tmp:
        with open(tmp, "w") as f:
            f.write(md)
    chart = write_chart(results, os.path.join(args.out, "run_all.png"))
    print(md)
    print(f"written: {args.out}/run_all.json, run_all.md" + (", run_all.png" if chart else ""))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
