"""Time one UniSeg training step against nnU-Net's PlainConvUNet with the same U-Net, in one process.

A step: forward with deep supervision, cross-entropy on every output (UniSeg: logits sliced to the
task's classes, as UniSegTrainer does), backward, SGD (lr 1e-2, momentum 0.99, Nesterov). Both
networks use the official UniSeg U-Net (6 stages 32..320, first stage kernel 1x3x3, strides
(1,2,2) then (2,2,2)) built with nnU-Net v2 conventions; UniSeg adds 11 tasks' prompt, FUSE and the
1/2/4-channel stems. The models alternate after a warm-up; the median ratio UniSeg / U-Net is printed.

CPU default (about a minute on one thread): patch 16x64x64, batch 2. ``--device cuda`` uses AMP and
the official patch 64x192x192.

    OMP_NUM_THREADS=1 python benchmarks/bench_uniseg_step.py [--patch 16 64 64] [--device cpu|cuda]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import parse_step_args, step_parser, time_steps

def parse_args(argv=None):
    p = step_parser(__doc__.split("\n\n")[0], [16, 64, 64], [64, 192, 192], memory=False)
    args = parse_step_args(p, argv)
    return args


def build(name, args):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_plugins.architectures.uniseg import OFFICIAL_FEATURES, OFFICIAL_KERNELS, OFFICIAL_STRIDES, UniSeg

    torch.manual_seed(0)
    if name == "UniSeg":
        net = UniSeg(4, 4, 11, patch_size=tuple(args.patch), stem_channels=(1, 2, 4), official_generic_unet=False)
        task, classes = torch.tensor([3] * args.batch), 3   # a 1-channel, 3-class task (MOTS-like)
    else:
        net = PlainConvUNet(1, 6, OFFICIAL_FEATURES, nn.Conv3d, OFFICIAL_KERNELS, OFFICIAL_STRIDES, 2, 3, 2, True,
                            nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                            {"inplace": True}, deep_supervision=True)
        task, classes = None, 3
    net = net.to(args.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 1, *args.patch, generator=g).to(args.device)
    y = torch.randint(0, classes, (args.batch, 1, *args.patch), generator=g).float().to(args.device)
    task = None if task is None else task.to(args.device)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
            outs = net(x) if task is None else net(x, task)
            loss = sum(F.cross_entropy(o[:, :classes].float(),
                                       F.interpolate(y, size=o.shape[2:], mode="nearest")[:, 0].long()) for o in outs)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return net, step


def main(argv=None):
    args = parse_args(argv)
    nets, steps = {}, {}
    for name in ("UniSeg", "U-Net"):
        nets[name], steps[name] = build(name, args)
    print(f"device {args.device}{' (AMP)' if args.amp else ''}, threads {torch.get_num_threads()}, patch {args.patch}, "
          f"batch {args.batch}")
    for name, net in nets.items():
        print(f"{name:6s} {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    med, _ = time_steps(steps, args.device, args.iters)
    for name in steps:
        print(f"{name:6s} step (fwd+bwd+SGD): {med[name] * 1e3:9.1f} ms (median of {args.iters})")
    print(f"time ratio UniSeg / U-Net: {med['UniSeg'] / med['U-Net']:.2f}")


if __name__ == "__main__":
    main()
