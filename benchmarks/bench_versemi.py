"""Time a VerSemi training step in each stage against nnU-Net's default training step at the same plans.

Everything goes through nnU-Net's own machinery (``nnunet_plugins.trainer_check``): the shared synthetic
check dataset (two sources combined, one unlabeled image each, planned, preprocessed, ``semi preprocess``),
plans of one patch / batch / U-Net for both trainers, the trainers as ``nnUNetv2_train`` makes them and their
own data loaders. Steps timed (``train_step`` of each trainer on one fixed batch, interleaved, median):

* VerSemi stage 1: labeled batch B, one forward of B + 3 x B/2 samples (task prompts, CutMix under the
  synthetic and both source prompts), nnU-Net's Dice + CE plus the CutMix Dice terms, Adam;
* VerSemi stage 2: B labeled + B unlabeled, one forward of B + B/2 + (T + 1) x B samples (T = 2 tasks here);
* nnU-Net's ``nnUNetTrainer`` step on the same plans (the stock U-Net, batch B).

Ratios VerSemi / nnU-Net are printed; on CUDA also the peak memory of each step and its ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_versemi.py [--size tiny|official] [--device cpu|cuda] [--root DIR]

CPU default: ``--size tiny`` (patch 16x32x32, narrowed U-Net); CUDA default: ``official`` (nnU-Net widths,
patch 64x160x160). The first run prepares the dataset under ``--root`` (a few minutes on CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_steps  # noqa: E402

TRAINER = "VerSemiTrainer"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--size", choices=("tiny", "official"), default=None)
    p.add_argument("--iters", type=int, default=3, help="timed steps per model (median reported)")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "nnunet_plugins_bench_versemi"))
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.size is None:
        args.size = "official" if args.device.startswith("cuda") else "tiny"
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from nnunet_plugins import trainer_check as tc

    env = tc.setup_environment(args.root)
    pre = tc.prepare_dataset(env)
    plans, baseline_plans = tc.write_check_plans(pre, TRAINER, args.size)

    vs = tc.make_trainer(TRAINER, plans, args.device)
    vs.on_train_start()
    base = tc.make_trainer(tc.BASELINE_TRAINER, baseline_plans, args.device)
    base.on_train_start()
    batches = {}
    for stage, epoch in ((1, 0), (2, vs.stage2_start_epoch)):
        vs.current_epoch = epoch
        vs.dataloader_train.draw_unlabeled = stage == 2
        batches[stage] = next(vs.dataloader_train)
    base_batch = next(base.dataloader_train)

    def versemi_step(stage):
        def step():
            vs.current_epoch = 0 if stage == 1 else vs.stage2_start_epoch
            vs.train_step(batches[stage])
        return step

    steps = {"VerSemi stage 1": versemi_step(1), "VerSemi stage 2": versemi_step(2),
             "nnUNetTrainer": lambda: base.train_step(base_batch)}
    vs.network.train()
    base.network.train()
    med, peak = time_steps(steps, args.device, args.iters)
    print(f"device {args.device}, size {args.size}, patch {list(vs.configuration_manager.patch_size)}, "
          f"batch {vs.batch_size} labeled (+{vs.batch_size} unlabeled in stage 2), {vs.task_spec.num_tasks} tasks, "
          f"threads {torch.get_num_threads()}")
    print(f"parameters: VerSemi {sum(p.numel() for p in vs.network.parameters()) / 1e6:.3f}M, "
          f"nnU-Net {sum(p.numel() for p in base.network.parameters()) / 1e6:.3f}M")
    for name in steps:
        print(f"{name:16s} step: {med[name] * 1e3:9.1f} ms (median of {args.iters})"
              + (f", peak CUDA memory {peak[name] / 2 ** 30:.2f} GiB" if name in peak else ""))
    for name in ("VerSemi stage 1", "VerSemi stage 2"):
        print(f"time ratio {name} / nnUNetTrainer: {med[name] / med['nnUNetTrainer']:.2f}"
              + (f"; memory ratio {peak[name] / peak['nnUNetTrainer']:.2f}" if name in peak else ""))
    for loader in (vs.dataloader_train, vs.dataloader_val, base.dataloader_train, base.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()


if __name__ == "__main__":
    main()
