"""Time a DoDNet and a TransDoDNet training step against nnU-Net's default 3-D U-Net (same patch, batch).

Steps, as each method trains:
* DoDNet: forward with each sample's task id, partial-label binary Dice + BCE (2 sigmoid channels,
  tumour channel unannotated for half the batch), backward, SGD (lr 1e-2, momentum 0.99, Nesterov);
* TransDoDNet: the same loss, backward, gradient clipping at 0.1, AdamW (lr 2e-4, weight decay 1e-4).
  ``forward(x, task_id)`` computes only each sample's own dynamic head; ``--all-tasks`` times the
  official output instead (every task query's head, upsampled, then the pick);
* U-Net baseline: ``PlainConvUNet`` exactly as nnU-Net 2.8's default ``3d_fullres`` planner builds it
  for this patch and spacing (see ``bench_cotr_step.build_unet``), deep supervision, cross-entropy on
  every output, SGD as nnU-Net.

All models are timed in THIS process, alternating iterations after a warm-up; the ratios against the
U-Net are printed. On CUDA the peak of ``torch.cuda.max_memory_allocated`` per model is reported too,
with AMP (``--no-amp`` to disable).

CPU default (a few minutes on one thread): patch 32x64x64 (TransDoDNet needs multiples of
(16, 32, 32) and more than one voxel at its deepest level), batch 2. CUDA default: the official
TransDoDNet patch 64x192x192.

    OMP_NUM_THREADS=1 python benchmarks/bench_dodnet_step.py [--patch 32 64 64] [--device cpu|cuda]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cotr_step import build_unet  # noqa: E402  (the same nnU-Net baseline as the CoTr benchmark)
from common import parse_step_args, step_parser, time_steps  # noqa: E402

MODELS = ("DoDNet", "TransDoDNet", "U-Net")


def parse_args(argv=None):
    p = step_parser(__doc__.split("\n\n")[0], [32, 64, 64], [64, 192, 192], memory=False)
    p.add_argument("--tasks", type=int, default=7)
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 0.8, 0.8],
                   help="voxel spacing the U-Net topology is planned for (nnU-Net's pooling rule uses it)")
    p.add_argument("--all-tasks", action="store_true", help="TransDoDNet: compute every task's head (official)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parse_step_args(p, argv)
    if "U-Net" not in args.models:
        args.models.append("U-Net")
    return args


def build(name, args):
    from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss

    torch.manual_seed(0)
    patch = list(args.patch)
    if name == "DoDNet":
        from nnunet_plugins.architectures.dodnet import DoDNet
        net = DoDNet(num_tasks=args.tasks)
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        clip = None
    elif name == "TransDoDNet":
        from nnunet_plugins.architectures.transdodnet import TransDoDNet
        net = TransDoDNet(num_tasks=args.tasks)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-4)
        clip = 0.1
    else:
        net, patch, _ = build_unet(args.patch, args.spacing, 1, 3)
        opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
        clip = 12.0
    net = net.to(args.device).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, *patch, generator=g).to(args.device)
    seg = torch.randint(0, 3, (args.batch, 1, *patch), generator=g).to(args.device)
    task_id = (torch.arange(args.batch) % args.tasks).to(args.device)
    target = torch.cat([(seg >= 1), (seg == 2)], 1).float()
    annotated = torch.ones(args.batch, 2, dtype=torch.bool, device=args.device)
    annotated[1::2, 1] = False
    partial_loss = PartialLabelDiceBCELoss()
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def forward_loss():
        if name == "U-Net":
            outs = net(x)
            return sum(F.cross_entropy(o.float(), F.interpolate(seg.float(), size=o.shape[2:], mode="nearest")[:, 0]
                                       .long()) for o in outs)
        if name == "TransDoDNet" and args.all_tasks:
            logits = net.forward_all_tasks(x)[torch.arange(args.batch, device=x.device), task_id]
        else:
            logits = net(x, task_id)
        return partial_loss(logits, target, annotated)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
            loss = forward_loss()
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(opt)
        scaler.update()

    return net, patch, step


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nets, steps, patches = {}, {}, {}
    for name in args.models:
        nets[name], patches[name], steps[name] = build(name, args)
    print(f"device {args.device}{' (AMP fp16)' if args.amp else ''}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.tasks} tasks{', TransDoDNet all task heads' if args.all_tasks else ''}")
    for name in args.models:
        print(f"{name:11s} patch {patches[name]}, {sum(p.numel() for p in nets[name].parameters()) / 1e6:.2f}M "
              f"parameters")
    med, peak = time_steps(steps, args.device, args.iters)
    for name in steps:
        print(f"{name:11s} step: {med[name] * 1e3:9.1f} ms (median of {args.iters})"
              + (f", peak CUDA memory {peak[name] / 2 ** 30:.2f} GiB" if name in peak else ""))
    for name in steps:
        if name != "U-Net":
            print(f"time ratio {name} / U-Net: {med[name] / med['U-Net']:.2f}"
                  + (f"; memory ratio {peak[name] / peak['U-Net']:.2f}" if name in peak else ""))


if __name__ == "__main__":
    main()
