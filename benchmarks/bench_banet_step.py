"""Time one BA-Net training step against nnU-Net's default U-Net at the same plans, patch and batch.

A step is what each trainer does per iteration: forward with deep supervision, nnU-Net's loss
(deep-supervised Dice+CE with nnU-Net's weights; BA-Net adds the same loss on its boundary outputs),
backward, gradient clipping at 12, SGD update (lr 1e-2, momentum 0.99, Nesterov). Both networks come
from ONE plans-style architecture: nnU-Net 2.8's default 3d_fullres topology for the patch and spacing
(``get_pool_and_conv_props``, features 32 * 2^i capped at 320, two convs per stage, instance norm,
LeakyReLU); the baseline is ``PlainConvUNet`` built from it, BA-Net is ``BANetPlainConvUNet`` with the
same arguments (what ``BANetTrainer`` builds from those plans).

Both models are timed in THIS process, alternating steps after a warm-up; the ratio BA-Net / U-Net is
printed. Also the boundary targets' cost in the data pipeline: ``BoundaryTargetTransform`` on one
augmented sample relative to nnU-Net's whole training transform pipeline for that sample.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per model; on CPU each model runs two steps in
a fresh ``spawn`` child and reports the growth of its peak resident set (``VmHWM`` - ``VmRSS`` before the
first step, Linux /proc).

    OMP_NUM_THREADS=1 python benchmarks/bench_banet_step.py [--patch 16 64 64] [--device cpu|cuda] [--no-amp]

CPU default: patch 16x64x64, batch 2, 5 classes (KiPA22). CUDA default: AMP, patch 128x128x128.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from common import cpu_peak_rss, parse_step_args, print_cpu_memory, step_parser, time_steps

def parse_args(argv=None):
    p = step_parser(__doc__.split("\n\n")[0], [16, 64, 64], [128, 128, 128])
    p.add_argument("--classes", type=int, default=5, help="output classes incl. background (KiPA22: 5)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    args = parse_step_args(p, argv)
    return args


def plans_arguments(patch, spacing):
    """PlainConvUNet arguments as nnU-Net's default planner writes them for this patch and spacing."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    _, strides, kernels, fitted_patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    n = len(strides)
    kwargs = dict(n_stages=n, features_per_stage=[min(320, 32 * 2 ** i) for i in range(n)], conv_op=torch.nn.Conv3d,
                  kernel_sizes=[list(k) for k in kernels], strides=[list(s) for s in strides],
                  n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
                  norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                  dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                  deep_supervision=True)
    return kwargs, [int(p) for p in fitted_patch]


def ds_loss(num_scales):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    weights = np.array([1 / 2 ** i for i in range(num_scales)])
    weights[-1] = 0
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def build(name, args):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_plugins.architectures.banet import BANetPlainConvUNet
    from nnunet_plugins.training.boundary import inner_boundary

    kwargs, patch = plans_arguments(args.patch, args.spacing)
    torch.manual_seed(0)
    cls = BANetPlainConvUNet if name == "BA-Net" else PlainConvUNet
    net = cls(1, num_classes=args.classes, **kwargs)
    net.apply(net.initialize)
    net = net.to(args.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, *patch, generator=g).to(args.device)
    # blocky labels so that boundaries are a realistic fraction of the patch
    coarse = torch.randint(0, args.classes, (args.batch, 1, *[max(1, p // 8) for p in patch]), generator=g)
    y = torch.nn.functional.interpolate(coarse.float(), size=patch, mode="nearest")
    # one output per decoder stage, at the resolution of encoder stages 0 .. n-2
    sizes = [[p // int(s) for p, s in zip(patch, cum)] for cum in np.cumprod(kwargs["strides"], 0)[:-1]]
    seg_t = [torch.nn.functional.interpolate(y, size=s, mode="nearest-exact").to(args.device) for s in sizes]
    full_bdr = inner_boundary(y, 3).float()
    bdr_t = [torch.nn.functional.interpolate(full_bdr, size=s, mode="nearest-exact").to(args.device) for s in sizes]
    loss = ds_loss(len(sizes))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
            if name == "BA-Net":
                seg, bdr = net(x, return_boundary=True)
                total = loss(seg, seg_t) + loss(bdr, bdr_t)
            else:
                total = loss(net(x), seg_t)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()

    return net, patch, kwargs, step


def boundary_pipeline_share(patch, repeats=5):
    """Seconds of BoundaryTargetTransform and of nnU-Net's whole training pipeline, one sample."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_plugins.training.boundary import BoundaryTargetTransform

    scales = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    pipeline = nnUNetTrainer.get_training_transforms(patch, (-0.52, 0.52), scales, (0, 1, 2), False)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, *patch, generator=g)
    seg = torch.nn.functional.interpolate(torch.randint(0, 5, (1, 1, *[max(1, p // 8) for p in patch]),
                                                        generator=g).float(), size=patch)[0].to(torch.int16)
    bt = BoundaryTargetTransform()
    t_pipe, t_bdr = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipeline(image=image.clone(), segmentation=seg.clone())
        t_pipe.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bt(segmentation=seg.clone())
        t_bdr.append(time.perf_counter() - t0)
    return statistics.median(t_bdr), statistics.median(t_pipe)


def make_step(name, argv):
    """Build one model's training step from the command line (used in the memory child processes)."""
    return build(name, parse_args(argv))[3]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    nets, steps = {}, {}
    for name in ("BA-Net", "U-Net"):
        nets[name], patch, kwargs, steps[name] = build(name, args)
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    print(f"device {args.device}{' (AMP fp16)' if args.amp else ''}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.classes} classes, patch {patch}, {kwargs['n_stages']} stages, "
          f"strides {kwargs['strides']}")
    print(f"parameters: BA-Net {params['BA-Net'] / 1e6:.2f}M, U-Net {params['U-Net'] / 1e6:.2f}M "
          f"(ratio {params['BA-Net'] / params['U-Net']:.2f})")

    med, peak_cuda = time_steps(steps, args.device, args.iters)
    for name in steps:
        print(f"{name:6s} step (fwd+loss+bwd+SGD): {med[name] * 1e3:9.1f} ms (median of {args.iters})")
    print(f"time ratio BA-Net / U-Net: {med['BA-Net'] / med['U-Net']:.2f}")

    if args.device.startswith("cuda"):
        for name in steps:
            print(f"{name:6s} peak CUDA memory: {peak_cuda[name] / 2 ** 30:.2f} GiB")
        print(f"memory ratio BA-Net / U-Net: {peak_cuda['BA-Net'] / peak_cuda['U-Net']:.2f}")
    elif not args.no_memory:
        del nets, steps
        print_cpu_memory(cpu_peak_rss(make_step, ("BA-Net", "U-Net"), argv), "BA-Net", "U-Net")

    t_bdr, t_pipe = boundary_pipeline_share(patch)
    print(f"boundary targets per sample: {t_bdr * 1e3:.1f} ms = {t_bdr / t_pipe:.3f} x nnU-Net's training "
          f"augmentation pipeline ({t_pipe * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
