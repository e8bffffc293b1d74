"""Is BA-Net's extra cost its second decoder, or waste? Floating-point work vs time, BA-Net / U-Net.

BA-Net (``BANetPlainConvUNet``) is nnU-Net's ``PlainConvUNet`` plus a second (boundary) decoder of the same
structure and the boundary gate; the encoder runs once. If the implementation wastes nothing, its
forward + backward time relative to the U-Net at the same plans is at most its ratio of floating-point
operations (``torch.utils.flop_counter``: convolutions and matrix products, forward + backward). This prints
both ratios, the time ratio measured INTERLEAVED in this process (median of the per-round ratios).

    OMP_NUM_THREADS=1 python benchmarks/bench_banet_flops.py [--patch 16 64 64] [--batch 2] [--rounds 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_banet_step import plans_arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, nargs=3, default=[16, 64, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=5, help="output classes incl. background (KiPA22: 5)")
    p.add_argument("--rounds", type=int, default=7)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_plugins.architectures.banet import BANetPlainConvUNet

    torch.manual_seed(0)
    kwargs, patch = plans_arguments(args.patch, [1.0, 1.0, 1.0])
    nets = {"BA-Net": BANetPlainConvUNet(1, num_classes=args.classes, **kwargs),
            "U-Net": PlainConvUNet(1, num_classes=args.classes, **kwargs)}
    x = torch.randn(args.batch, 1, *patch)

    def step(name):
        net = nets[name]
        out = net(x, return_boundary=True) if name == "BA-Net" else net(x)
        outs = out[0] + out[1] if name == "BA-Net" else out   # both decoders' deep-supervision outputs
        sum(o.mean() for o in outs).backward()

    flops = {}
    for name in nets:
        with FlopCounterMode(display=False) as counter:
            step(name)
        flops[name] = counter.get_total_flops()
    times = {name: [] for name in nets}
    for r in range(args.rounds):
        for name in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    flop_ratio = flops["BA-Net"] / flops["U-Net"]
    time_ratio = statistics.median([a / b for a, b in zip(times["BA-Net"], times["U-Net"])])
    print(f"patch {patch}, batch {args.batch}, {kwargs['n_stages']} stages, {torch.get_num_threads()} threads; "
          f"forward + backward")
    for name in nets:
        print(f"{name:7s} {flops[name] / 1e9:8.1f} GFLOP   {statistics.median(times[name]) * 1e3:9.1f} ms")
    print(f"BA-Net / U-Net: FLOP ratio {flop_ratio:.2f}, time ratio {time_ratio:.2f}"
          + ("  (time within the extra work: no overhead beyond the second decoder)" if time_ratio <= flop_ratio * 1.02
             else "  (time above the extra work: overhead)"))


if __name__ == "__main__":
    main()
