"""Time the vectorised 3-D multi-scale deformable attention against the naive loop reference.

Both run in this process on the same inputs: ``ms_deform_attn_3d`` (its device's default sampler: one
weighted embedding_bag on CPU, one grid_sample per level elsewhere; ``bench_cotr_attention.py`` compares
the two) and ``ms_deform_attn_reference`` (Python loops over batch, heads, levels and points with
hand-written trilinear interpolation). Prints per-call times, the speed-up ratio and the
largest output difference. Defaults are CoTr's DeTrans at the official 48x192x192 patch: levels
12x24x24 and 6x12x12 (7,776 queries), batch 2, 6 heads of 64 channels, 4 points.

    OMP_NUM_THREADS=1 python benchmarks/bench_deformable_attention.py [--backward] [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nnunet_plugins.architectures.blocks.deformable_attention import (
    ms_deform_attn_3d,
    ms_deform_attn_reference,
    reference_points_3d,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[12, 24, 24, 6, 12, 12],
                   help="level shapes as D H W triples, flattened (default: CoTr at 48x192x192)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per implementation (median reported)")
    p.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if len(args.levels) % 3:
        p.error("--levels takes D H W triples")
    args.shapes = [tuple(args.levels[i:i + 3]) for i in range(0, len(args.levels), 3)]
    return args


def make_inputs(shapes, batch, heads, head_dim, points, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(d * h * w for d, h, w in shapes)
    value = torch.randn(batch, s, heads, head_dim, generator=g)
    # queries = all tokens (self-attention); locations around each query's own voxel centre
    ref = reference_points_3d(shapes)
    offsets = torch.randn(batch, s, heads, len(shapes), points, 3, generator=g) * 0.05
    loc = ref[None, :, None, None, None, :] + offsets
    w = torch.softmax(torch.randn(batch, s, heads, len(shapes) * points, generator=g), -1)
    w = w.view(batch, s, heads, len(shapes), points)
    return [t.to(device) for t in (value, loc, w)]


def time_call(fn, inputs, backward, repeats, device):
    times = []
    out = None
    for i in range(repeats + 1):  # first call = warm-up
        xs = [t.detach().requires_grad_(backward) for t in inputs]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*xs)
        if backward:
            out.sum().backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out.detach()


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    value, loc, w = make_inputs(args.shapes, args.batch, args.heads, args.head_dim, args.points, args.device)
    n_q = loc.shape[1]
    print(f"levels {args.shapes}, {n_q} queries, batch {args.batch}, {args.heads} heads x {args.head_dim} ch, "
          f"{args.points} points, device {args.device}, threads {torch.get_num_threads()}, "
          f"{'forward+backward' if args.backward else 'forward'}")

    def fast(v, l_, w_):
        return ms_deform_attn_3d(v, args.shapes, l_, w_)

    def slow(v, l_, w_):
        return ms_deform_attn_reference(v, args.shapes, l_, w_)

    t_fast, out_fast = time_call(fast, (value, loc, w), args.backward, args.repeats, args.device)
    t_slow, out_slow = time_call(slow, (value, loc, w), args.backward, max(1, args.repeats // 2), args.device)
    diff = (out_fast - out_slow).abs().max().item()
    print(f"vectorised:               {t_fast * 1e3:9.1f} ms")
    print(f"naive loop reference:     {t_slow * 1e3:9.1f} ms")
    print(f"speed-up (naive / vectorised): {t_slow / t_fast:.1f}x   max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
