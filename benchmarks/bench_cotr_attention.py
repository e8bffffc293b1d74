"""CoTr's deformable transformer (DeTrans), forward + backward: the gather sampler vs the grid_sample one.

``ms_deform_attn_3d`` has two implementations with the same values and gradients (tests): ``grid_sample``
(one ``F.grid_sample`` per level, heads folded into the batch: the official code's approach and this package's
only sampler before) and ``gather`` (one weighted ``F.embedding_bag`` over all levels, heads, points and the 8
trilinear corners; the CPU default). Both run in THIS process on the same inputs and weights, interleaved
(A B, B A, ...); the ratio is the median of the per-round ratios grid_sample / gather (> 1: gather is faster).

Three measurements:

* sampling: ``ms_deform_attn_3d`` alone (values, locations and weights requiring gradients);
* DeTrans: the whole encoder (official widths: d_model 384, 6 heads, 6 layers, FFN 1536, 2 levels, 4 points;
  train mode) on the levels CoTr makes of ``--patch`` (D/4 x H/8 x W/8 and D/8 x H/16 x W/16);
* ``--network``: the whole CoTr network (official configuration, 14 classes) with deep supervision, now vs
  before (grid_sample sampler and the official upsample-then-head order, kept here as the reference).

    OMP_NUM_THREADS=1 python benchmarks/bench_cotr_attention.py [--patch 32 96 96] [--batch 1] [--network]
    OMP_NUM_THREADS=1 python benchmarks/bench_cotr_attention.py --patch 48 192 192 --rounds 3   # official patch
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import torch  # noqa: E402

from nnunet_plugins.architectures.blocks.deformable_attention import (  # noqa: E402
    DeformableTransformerEncoder3D,
    MSDeformAttn3D,
    ms_deform_attn_3d,
    reference_points_3d,
)
from nnunet_plugins.architectures.cotr import CoTr, CoTrDecoder  # noqa: E402

IMPLEMENTATIONS = ("grid_sample", "gather")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, nargs=3, default=[32, 96, 96], help="CoTr input patch D H W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median of the per-round ratios)")
    p.add_argument("--layers", type=int, default=6, help="DeTrans layers (official: 6)")
    p.add_argument("--network", action="store_true", help="also time the whole CoTr network")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def levels_of(patch):
    d, h, w = patch
    return [(d // 4, h // 8, w // 8), (d // 8, h // 16, w // 16)]


def set_implementation(module: torch.nn.Module, implementation: str) -> None:
    for m in module.modules():
        if isinstance(m, MSDeformAttn3D):
            m.implementation = implementation


def interleaved(calls: dict, rounds: int, device: str) -> dict:
    names = list(calls)
    for n in names:   # warm-up
        calls[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            calls[n]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[n].append(time.perf_counter() - t0)
    return times


def report(what: str, times: dict, diff: float | None = None) -> float:
    """Print and return the median per-round ratio first variant / second variant (> 1: the second is faster)."""
    (old, t_old), (new, t_new) = times.items()
    ratio = statistics.median([a / b for a, b in zip(t_old, t_new)])
    extra = "" if diff is None else f"   max |difference| {diff:.1e}"
    print(f"{what:36s} {old} {statistics.median(t_old) * 1e3:9.1f} ms   {new} {statistics.median(t_new) * 1e3:9.1f} ms"
          f"   speed-up {ratio:.2f}x{extra}", flush=True)
    return ratio


def bench_sampling(levels, batch, rounds, device, heads=6, head_dim=64, points=4):
    g = torch.Generator().manual_seed(0)
    s = sum(d * h * w for d, h, w in levels)
    value = torch.randn(batch, s, heads, head_dim, generator=g)
    ref = reference_points_3d(levels)
    # CoTr's initial sampling pattern: point i at (i + 1) voxels from the query, plus noise
    loc = ref[None, :, None, None, None, :] + torch.randn(batch, s, heads, len(levels), points, 3, generator=g) * 0.1
    w = torch.softmax(torch.randn(batch, s, heads, len(levels) * points, generator=g), -1)
    w = w.view(batch, s, heads, len(levels), points)
    value, loc, w = (t.to(device) for t in (value, loc, w))
    probe = torch.randn(batch, s, heads * head_dim, generator=g).to(device)
    outs = {}

    def call(impl):
        xs = [t.detach().requires_grad_(True) for t in (value, loc, w)]
        out = ms_deform_attn_3d(xs[0], levels, xs[1], xs[2], implementation=impl)
        (out * probe).sum().backward()
        outs[impl] = out.detach()

    times = interleaved({impl: (lambda i=impl: call(i)) for impl in IMPLEMENTATIONS}, rounds, device)
    diff = float((outs["gather"] - outs["grid_sample"]).abs().max())
    return report(f"sampling ({s} queries, batch {batch})", times, diff)


def bench_module(name, module, inputs, rounds, device, variants=None):
    """``variants``: {name: function(module) that configures it}; default: the two samplers."""
    module = module.to(device)
    variants = variants or {impl: (lambda m, i=impl: set_implementation(m, i)) for impl in IMPLEMENTATIONS}

    def call(variant):
        variants[variant](module)
        xs = [[f.detach().requires_grad_(True) for f in x] if isinstance(x, list) else x.detach().requires_grad_(True)
              for x in inputs]
        out = module(*xs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().mean() for o in outs).backward()

    module.eval()   # outputs without dropout for the difference
    with torch.no_grad():
        diffs = []
        for variant in variants:
            variants[variant](module)
            out = module(*inputs)
            diffs.append(out if isinstance(out, (list, tuple)) else [out])
        diff = max(float((a - b).abs().max()) for a, b in zip(*diffs))
    module.train()
    times = interleaved({v: (lambda v=v: call(v)) for v in variants}, rounds, device)
    return report(name, times, diff)


def decoder_forward_before(self, bottleneck, skips):
    """CoTrDecoder.forward as it was (the official order): upsample the 64-channel features, then the head.

    Today's forward with an identity head returns the upsampled features; the real head comes after.
    """
    head = self.seg_head
    self.seg_head = torch.nn.Identity()
    try:
        out = CoTrDecoder.forward(self, bottleneck, skips)
    finally:
        self.seg_head = head
    return [head(out[0])] + out[1:] if self.deep_supervision else head(out)


def configure_before(net):
    """CoTr as before this benchmark's changes: grid_sample sampler, upsampling before the head."""
    set_implementation(net, "grid_sample")
    net.decoder.forward = types.MethodType(decoder_forward_before, net.decoder)


def configure_now(net):
    set_implementation(net, "auto")
    net.decoder.__dict__.pop("forward", None)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    levels = levels_of(args.patch)
    tokens = sum(d * h * w for d, h, w in levels)
    print(f"CoTr patch {args.patch} -> DeTrans levels {levels} ({tokens} tokens), batch {args.batch}, "
          f"device {args.device}, {torch.get_num_threads()} threads; forward + backward", flush=True)
    bench_sampling(levels, args.batch, args.rounds, args.device)
    enc = DeformableTransformerEncoder3D(num_layers=args.layers)
    feats = [torch.randn(args.batch, 384, *s).to(args.device) for s in levels]
    bench_module(f"DeTrans ({args.layers} layers, official widths)", enc, [feats], args.rounds, args.device)
    if args.network:
        net = CoTr(1, 14, patch_size=args.patch)
        x = torch.randn(args.batch, 1, *args.patch).to(args.device)
        bench_module("CoTr network (official, deep sup.)", net, [x], max(3, args.rounds // 2), args.device,
                     variants={"before": configure_before, "now": configure_now})


if __name__ == "__main__":
    main()
