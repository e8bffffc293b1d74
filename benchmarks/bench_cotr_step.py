"""Time one CoTr training step against nnU-Net's default 3-D U-Net at the same patch and batch.

A step is: forward with deep supervision, cross-entropy on every output (targets nearest-downsampled
to each output's size), backward, SGD update (lr 1e-2, momentum 0.99, Nesterov, as both trainers).
The baseline is ``dynamic_network_architectures``' ``PlainConvUNet`` configured exactly as nnU-Net
2.8's default ``3d_fullres`` planner would for this patch and spacing: ``get_pool_and_conv_props``
(feature maps down to 4 voxels) gives strides and kernel sizes, features 32 * 2^i capped at 320, two
convs per stage, instance norm, LeakyReLU, conv bias.

Both models are timed in THIS process, alternating iterations after a warm-up, and the ratio
CoTr / U-Net is printed. Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated`` per model (statistics reset in between);
* CPU: each model runs a few steps in a fresh child process (``spawn``) and reports its peak resident
  set size (``VmHWM`` of /proc/self/status; not ``ru_maxrss``, which Linux carries over from the
  parent across fork + exec) and the increase of that peak over the resident size just before its
  first step (``VmRSS``: what training adds on top of interpreter, torch and the model's weights).

CPU default (under ~2 minutes on one thread): patch 16x64x64, batch 2. On CUDA (``--device cuda``)
AMP is used (``--no-amp`` to disable) and the default patch is the official 48x192x192.

    OMP_NUM_THREADS=1 python benchmarks/bench_cotr_step.py [--patch 16 64 64] [--device cpu|cuda]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from common import cpu_peak_rss, parse_step_args, print_cpu_memory, step_parser, time_steps

def parse_args(argv=None):
    p = step_parser(__doc__.split("\n\n")[0], [16, 64, 64], [48, 192, 192])
    p.add_argument("--classes", type=int, default=14)
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 0.8, 0.8],
                   help="voxel spacing the U-Net topology is planned for (nnU-Net's pooling rule uses it)")
    args = parse_step_args(p, argv)
    return args


def build_unet(patch, spacing, in_ch, classes):
    """nnU-Net 2.8's default 3d_fullres PlainConvUNet for this patch (see module docstring)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, unet_patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    unet_patch = [int(s) for s in unet_patch]
    n = len(strides)
    net = PlainConvUNet(in_ch, n, [min(320, 32 * 2 ** i) for i in range(n)], torch.nn.Conv3d,
                        [list(k) for k in kernels], [list(s) for s in strides], [2] * n, classes, [2] * (n - 1),
                        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return net, unet_patch, strides


def build_cotr(patch, in_ch, classes):
    from nnunet_plugins.architectures.cotr import CoTr
    return CoTr(input_channels=in_ch, num_classes=classes, patch_size=patch, deep_supervision=True)


def build(name, args):
    torch.manual_seed(0)
    if name == "CoTr":
        net, patch = build_cotr(args.patch, 1, args.classes), list(args.patch)
        net.strides = None
    else:
        net, patch, strides = build_unet(args.patch, args.spacing, 1, args.classes)
        net.strides = strides
    net = net.to(args.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, *patch, generator=g).to(args.device)
    y = torch.randint(0, args.classes, (args.batch, 1, *patch), generator=g).float().to(args.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
            outs = net(x)
            loss = sum(F.cross_entropy(o.float(), F.interpolate(y, size=o.shape[2:], mode="nearest")[:, 0].long())
                       for o in outs)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return net, patch, step


def make_step(name, argv):
    """Build one model's training step from the command line (used in the memory child processes)."""
    return build(name, parse_args(argv))[2]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    nets, steps, patches = {}, {}, {}
    for name in ("CoTr", "U-Net"):
        nets[name], patches[name], steps[name] = build(name, args)
    strides = nets["U-Net"].strides
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    print(f"device {args.device}{' (AMP fp16)' if args.amp else ''}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.classes} classes")
    print(f"CoTr  patch {patches['CoTr']}, {params['CoTr'] / 1e6:.2f}M parameters")
    print(f"U-Net patch {patches['U-Net']}, {params['U-Net'] / 1e6:.2f}M parameters, {len(strides)} stages, "
          f"strides {[list(s) for s in strides]}")
    if patches["U-Net"] != patches["CoTr"]:
        print("note: nnU-Net's planner adjusted the U-Net patch for divisibility")

    med, peak_cuda = time_steps(steps, args.device, args.iters)
    for name in steps:
        print(f"{name:5s} step (fwd+bwd+SGD): {med[name] * 1e3:9.1f} ms (median of {args.iters})")
    print(f"time ratio CoTr / U-Net: {med['CoTr'] / med['U-Net']:.2f}")

    if args.device.startswith("cuda"):
        for name in steps:
            print(f"{name:5s} peak CUDA memory (max_memory_allocated): {peak_cuda[name] / 2 ** 30:.2f} GiB")
        print(f"memory ratio CoTr / U-Net: {peak_cuda['CoTr'] / peak_cuda['U-Net']:.2f}")
    elif not args.no_memory:
        del nets, steps
        print_cpu_memory(cpu_peak_rss(make_step, ("CoTr", "U-Net"), argv), "CoTr", "U-Net", width=5)


if __name__ == "__main__":
    main()
