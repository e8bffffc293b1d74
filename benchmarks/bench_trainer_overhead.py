"""The cost of ``PluginTrainer`` itself: nnU-Net's own network trained and predicted through it vs ``nnUNetTrainer``.

``PluginTrainer`` without a ``network_class`` builds nnU-Net's network from the plans, so any difference to
nnU-Net's default trainer is the overhead of this package's hooks (``batch_to_device``, ``forward``,
``compute_loss``, ``optimizer_step``, ``online_evaluation``). Target (issue 12): at most 1.02 for the training
step, an epoch and prediction.

Both trainers are made by nnU-Net's ``get_trainer_from_args`` (what ``nnUNetv2_train`` does) on the SAME plans,
data and seed (identical initial weights), in THIS process, and timed INTERLEAVED (A B B A ...) so load changes
on a shared machine hit both alike; the reported ratio is the median of the per-round ratios (plugin / default).
Timings on a loaded machine scatter by several per cent, so the script also counts the aten operators one
``train_step`` and one ``validation_step`` of each trainer execute (torch.profiler): equal counts per operator
mean both do the same tensor work, and what is left is Python call overhead:

* ``train_step``: one fixed batch, forward + loss + backward + clip + SGD step;
* ``validation_step``: the same batch under ``torch.no_grad`` with the network in eval mode (online Dice);
* epoch: ``--epoch-iters`` iterations of nnU-Net's loop body (next batch from the trainer's own data loader with
  augmentation, ``train_step``);
* predict: nnU-Net's ``nnUNetPredictor`` sliding window (with mirroring) of one preprocessed case with each
  trained model (``checkpoint_final.pth`` written by the trainers' own ``on_train_end``).

    OMP_NUM_THREADS=1 python benchmarks/bench_trainer_overhead.py [--size tiny|official] [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

TRAINERS = ("nnUNetTrainer", "PluginTrainer")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="tiny", choices=("tiny", "official"),
                   help="tiny: narrow U-Net at 16x32x32 (CPU); official: nnU-Net's widths at 64x160x160")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per measurement (median of ratios)")
    p.add_argument("--epoch-iters", type=int, default=4, help="loop iterations per timed 'epoch'")
    p.add_argument("--predict-rounds", type=int, default=3)
    p.add_argument("--work-dir", default=None, help="keep data and models here (default: a removed temp folder)")
    return p.parse_args(argv)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(calls: dict, rounds: int, device: str) -> dict:
    """{name: [seconds per round]} with the call order reversed every round (A B, B A, ...)."""
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            calls[n]()
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def summarise(what: str, times: dict) -> dict:
    base, plug = times["nnUNetTrainer"], times["PluginTrainer"]
    ratios = [p / b for p, b in zip(plug, base)]
    row = {"what": what, "nnUNetTrainer_s": statistics.median(base), "PluginTrainer_s": statistics.median(plug),
           "ratio": statistics.median(ratios), "ratio_of_medians": statistics.median(plug) / statistics.median(base)}
    print(f"{what:16s} nnUNetTrainer {row['nnUNetTrainer_s'] * 1e3:9.1f} ms   PluginTrainer "
          f"{row['PluginTrainer_s'] * 1e3:9.1f} ms   ratio {row['ratio']:.3f} (median of {len(ratios)} paired rounds; "
          f"ratio of medians {row['ratio_of_medians']:.3f})", flush=True)
    return row


def aten_op_counts(fn) -> dict:
    """{aten operator: calls} of one call of ``fn`` (noise-free: equal counts = the same work)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}


def compare_ops(what: str, calls: dict) -> bool:
    counts = {n: aten_op_counts(c) for n, c in calls.items()}
    base, plug = counts["nnUNetTrainer"], counts["PluginTrainer"]
    diff = {k: plug.get(k, 0) - base.get(k, 0) for k in set(base) | set(plug) if plug.get(k, 0) != base.get(k, 0)}
    print(f"{what:16s} aten operator calls: nnUNetTrainer {sum(base.values())}, PluginTrainer {sum(plug.values())}"
          + ("  (identical per operator)" if not diff else f"  differences: {dict(sorted(diff.items()))}"), flush=True)
    return not diff


def main(argv=None):
    args = parse_args(argv)
    from nnunet_plugins import trainer_check as tc

    own_work = args.work_dir is None
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="nnunet_plugins_overhead-"))
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    env = tc.setup_environment(work, threads=threads)
    try:
        import torch

        pre = tc.prepare_dataset(env, shape=(32, 96, 96) if args.size == "official" else (16, 40, 40),
                                 log_file=os.path.join(work, "prepare_log.txt"))
        plans, _ = tc.write_check_plans(pre, "PluginTrainer", args.size)   # nnU-Net's U-Net for the patch
        trainers, batches = {}, {}
        for name in TRAINERS:
            torch.manual_seed(0)   # identical initial weights
            tr = tc.make_trainer(name, plans, args.device)
            tr.on_train_start()
            tr.on_train_epoch_start()
            trainers[name] = tr
            batches[name] = next(tr.dataloader_train)
        torch.set_num_threads(threads)   # nnU-Net may have changed it
        batch = batches["nnUNetTrainer"]   # the same batch for both
        plugin = trainers["PluginTrainer"]
        print(f"device {args.device}, {threads} threads, patch {plugin.configuration_manager.patch_size}, batch "
              f"{plugin.batch_size}, {sum(p.numel() for p in plugin.network.parameters()) / 1e6:.2f}M parameters "
              f"(PluginTrainer network: {type(plugin.network).__name__})", flush=True)
        rows = []
        for tr in trainers.values():   # warm-up
            tr.train_step(batch)
        rows.append(summarise("train_step", interleaved(
            {n: (lambda t=t: t.train_step(batch)) for n, t in trainers.items()}, args.rounds, args.device)))

        def validate(t):
            t.network.eval()
            with torch.no_grad():
                t.validation_step(batch)
            t.network.train()

        compare_ops("train_step", {n: (lambda t=t: t.train_step(batch)) for n, t in trainers.items()})
        compare_ops("validation_step", {n: (lambda t=t: validate(t)) for n, t in trainers.items()})
        rows.append(summarise("validation_step", interleaved(
            {n: (lambda t=t: validate(t)) for n, t in trainers.items()}, args.rounds, args.device)))

        def epoch(t):
            for _ in range(args.epoch_iters):
                t.train_step(next(t.dataloader_train))

        rows.append(summarise(f"epoch ({args.epoch_iters} it)",
                              interleaved({n: (lambda t=t: epoch(t)) for n, t in trainers.items()},
                                          max(5, args.rounds // 2), args.device)))

        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictors = {}
        for name, tr in trainers.items():
            tr.current_epoch = 1
            tr.on_train_end()   # checkpoint_final.pth, as after training
            pr = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                 perform_everything_on_device=True, device=torch.device(args.device), verbose=False,
                                 verbose_preprocessing=False, allow_tqdm=False)
            pr.initialize_from_trained_model_folder(tr.output_folder_base, (0,))
            predictors[name] = pr
        torch.set_num_threads(threads)
        _, data = tc.preprocessed_case(pre, plans)
        for pr in predictors.values():   # warm-up
            pr.predict_sliding_window_return_logits(data)
        rows.append(summarise("predict", interleaved(
            {n: (lambda p=p: p.predict_sliding_window_return_logits(data)) for n, p in predictors.items()},
            args.predict_rounds, args.device)))
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    worst = max(r["ratio"] for r in rows)
    print(f"largest ratio {worst:.3f} (target <= 1.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
