"""Timing and memory helpers shared by the training-step benchmarks (not a test; run the scripts)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def step_parser(description: str, cpu_patch, cuda_patch, memory: bool = True) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes (patch, batch, iterations, device, AMP, memory);
    finish with :func:`parse_step_args`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--patch", type=int, nargs=3, default=None,
                   help=f"D H W (default: {' '.join(map(str, cpu_patch))} CPU, {' '.join(map(str, cuda_patch))} CUDA)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed steps per model (median reported)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    p.add_argument("--no-amp", action="store_true", help="disable autocast on CUDA")
    if memory:
        p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-RSS child processes")
    p.set_defaults(default_patches=(list(cpu_patch), list(cuda_patch)))
    return p


def parse_step_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse; resolve ``--device auto``, the device's default patch and ``amp`` (CUDA unless --no-amp)."""
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.patch is None:
        args.patch = args.default_patches[1 if cuda else 0]
    args.amp = cuda and not args.no_amp
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steps: dict, device: str, iters: int) -> tuple[dict, dict]:
    """Median seconds per call of each step (interleaved, after one warm-up call each) and, on CUDA,
    the peak memory of the warm-up call (bytes)."""
    peak_cuda = {}
    for name, step in steps.items():
        if device.startswith("cuda"):
            sync(device)
            torch.cuda.reset_peak_memory_stats()
        step()
        sync(device)
        if device.startswith("cuda"):
            peak_cuda[name] = torch.cuda.max_memory_allocated()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():  # interleaved, so that load changes hit every model alike
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}, peak_cuda


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (the CPU memory measurement needs Linux)")


def _rss_child(make_step, name, argv, queue):
    step = make_step(name, argv)
    before = proc_status_kib("VmRSS")
    for _ in range(2):
        step()
    queue.put((name, before, proc_status_kib("VmHWM")))


def cpu_peak_rss(make_step, names, argv) -> dict:
    """{name: (RSS before the first step, peak RSS) in KiB}, each model in a fresh spawned process.

    ``make_step(name, argv)`` (a module-level function) builds the model and returns its step. The peak
    is read from /proc (VmHWM), not ru_maxrss, which Linux carries over from the parent into the child.
    """
    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_rss_child, args=(make_step, name, argv, queue))
        proc.start()
        result = queue.get()
        proc.join()
        out[result[0]] = result[1:]
    return out


def print_cpu_memory(rss: dict, model: str, baseline: str, width: int = 6) -> None:
    for name, (before, peak) in rss.items():
        print(f"{name:{width}s} peak RSS {peak / 2 ** 20:.2f} GiB (training adds {(peak - before) / 2 ** 20:.2f} GiB "
              f"over the {before / 2 ** 20:.2f} GiB before the first step)")
    added = {name: peak - before for name, (before, peak) in rss.items()}
    print(f"memory ratio {model} / {baseline} (added by training): {added[model] / added[baseline]:.2f}")
