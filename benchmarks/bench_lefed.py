"""LeFeD against nnU-Net's default: training-step time and memory at the same plans, and held-out Dice.

Step (default): one LeFeD iteration is what ``LeFeDTrainer.train_step`` does per batch: K = 3 passes, each a
forward of encoder + both decoders on L + U = 2 + 2 patches (with the previous pass's discrepancy feedback from
pass 2 on), the labeled loss (deep-supervised Dice + CE on decoder 1, Dice + CE on decoder 2, labeled samples) +
MSE(softmax p1, softmax p2) on all samples, backward, clipping at 12, an SGD step. The baseline is nnU-Net's
default step on ``PlainConvUNet`` of the SAME plans (nnU-Net 2.8's default topology for the patch, 32..320
features) with batch 2 (the labeled patches; ``--batch B``: LeFeD then takes B + B). Both are timed in this
process, interleaved after a warm-up; the ratio LeFeD / nnU-Net is printed, also per optimiser step (LeFeD takes K
per iteration). Memory: peak CUDA memory, or on CPU the growth of the peak RSS in a fresh process per model.

    OMP_NUM_THREADS=1 python benchmarks/bench_lefed.py [--patch 16 64 64] [--device cpu|cuda]

Dice (``--dice ROOT``): a synthetic dataset (``--cases`` training cases, ``--labeled`` of them labeled,
imagesUn, 4 test cases) through nnU-Net's commands: plan and preprocess, ``nnunet-plugins semi split`` /
``semi preprocess``, then ``nnUNetv2_train -tr LeFeDTrainer`` and ``-tr LabeledOnlyTrainer`` (nnU-Net's default
on the same labeled cases only) for ``--epochs`` x ``--iters``, ``nnUNetv2_predict`` on the test cases; prints
the held-out Dice of both (a report, not a check).

    python benchmarks/bench_lefed.py --dice /tmp/lefed_dice --epochs 10 --iters 50 [--device cuda]
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from bench_banet_step import ds_loss, plans_arguments
from common import cpu_peak_rss, parse_step_args, print_cpu_memory, step_parser, time_steps


def parse_args(argv=None):
    p = step_parser(__doc__.split("\n\n")[0], [16, 64, 64], [128, 128, 128])
    p.add_argument("--classes", type=int, default=2, help="output classes incl. background (LA, Pancreas: 2)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--passes", type=int, default=3, help="K, LeFeD's passes per batch")
    p.add_argument("--dice", metavar="ROOT", default=None, help="run the held-out Dice comparison under ROOT "
                   "(--iters is then the training iterations per epoch)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--labeled", default="4")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[24, 64, 64], help="synthetic image size (--dice)")
    return parse_step_args(p, argv)


def build(name, args):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_plugins.architectures.lefed import LeFeDUNet, discrepancy_feedback

    kwargs, patch = plans_arguments(args.patch, args.spacing)
    torch.manual_seed(0)
    lefed = name == "LeFeD"
    net = (LeFeDUNet if lefed else PlainConvUNet)(1, num_classes=args.classes, **kwargs)
    net.apply(net.initialize)
    net = net.to(args.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    g = torch.Generator().manual_seed(1)
    batch = 2 * args.batch if lefed else args.batch   # L + U = --batch labeled + as many unlabeled for LeFeD
    x = torch.randn(batch, 1, *patch, generator=g).to(args.device)
    coarse = torch.randint(0, args.classes, (args.batch, 1, *[max(1, p // 8) for p in patch]), generator=g)
    y = F.interpolate(coarse.float(), size=patch, mode="nearest")
    sizes = [[p // int(s) for p, s in zip(patch, cum)] for cum in np.cumprod(kwargs["strides"], 0)[:-1]]
    targets = [F.interpolate(y, size=s, mode="nearest-exact").to(args.device) for s in sizes]
    loss = ds_loss(len(sizes))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp)

    def optimiser_step(total):
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()

    def step():
        if not lefed:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
                total = loss(net(x), targets)
            optimiser_step(total)
            return
        feedback = None
        for _ in range(args.passes):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp):
                out = net(x, feedback=feedback, both=True)
                lab = [o[:args.batch] for o in [out.seg1, *out.side1]]
                total = loss(lab, targets) + loss.loss(out.seg2[:args.batch], targets[0]) + F.mse_loss(
                    torch.softmax(out.seg1.float(), 1), torch.softmax(out.seg2.float(), 1))
            optimiser_step(total)
            feedback = discrepancy_feedback(out.features1, out.features2)

    return net, patch, kwargs, step


def make_step(name, argv):
    return build(name, parse_args(argv))[3]


def step_benchmark(args, argv):
    nets, steps = {}, {}
    for name in ("LeFeD", "nnU-Net"):
        nets[name], patch, kwargs, steps[name] = build(name, args)
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    print(f"device {args.device}{' (AMP fp16)' if args.amp else ''}, threads {torch.get_num_threads()}, "
          f"patch {patch}, {kwargs['n_stages']} stages, {args.classes} classes; LeFeD K={args.passes}, batch "
          f"{args.batch}+{args.batch}; nnU-Net batch {args.batch}")
    print(f"parameters: LeFeD training {params['LeFeD'] / 1e6:.2f}M (inference = nnU-Net's), "
          f"nnU-Net {params['nnU-Net'] / 1e6:.2f}M (ratio {params['LeFeD'] / params['nnU-Net']:.2f})")
    med, peak_cuda = time_steps(steps, args.device, args.iters)
    for name in steps:
        print(f"{name:8s} iteration: {med[name] * 1e3:9.1f} ms (median of {args.iters})")
    ratio = med["LeFeD"] / med["nnU-Net"]
    print(f"time ratio LeFeD iteration (K={args.passes} passes) / nnU-Net iteration: {ratio:.2f} "
          f"(per optimiser step: {ratio / args.passes:.2f})")
    if args.device.startswith("cuda"):
        for name in steps:
            print(f"{name:8s} peak CUDA memory: {peak_cuda[name] / 2 ** 30:.2f} GiB")
        print(f"memory ratio LeFeD / nnU-Net: {peak_cuda['LeFeD'] / peak_cuda['nnU-Net']:.2f}")
    elif not args.no_memory:
        del nets, steps
        print_cpu_memory(cpu_peak_rss(make_step, ("LeFeD", "nnU-Net"), argv), "LeFeD", "nnU-Net", width=8)


def dice_benchmark(args):
    import SimpleITK as sitk

    from nnunet_plugins.runner import console_command, nnunet_cpu_env, run_step

    root = os.path.abspath(args.dice)
    env = nnunet_cpu_env(root, augmentation_workers=None if args.device.startswith("cuda") else 0, threads=1)
    env.update(NNUNET_PLUGINS_EPOCHS=str(args.epochs), NNUNET_PLUGINS_ITERS=str(args.iters),
               NNUNET_PLUGINS_VAL_ITERS="2", nnUNet_def_n_proc="1")
    log = os.path.join(root, "log.txt")
    dataset, name = "615", "Dataset615_LeFeDBench"
    plugins = [sys.executable, "-m", "nnunet_plugins"]
    raw = os.path.join(env["nnUNet_raw"], name)
    if not os.path.isdir(raw):
        run_step(plugins + ["synth", "-d", dataset, "--name", "LeFeDBench", "--cases", str(args.cases),
                            "--test-cases", "4", "--unlabeled", str(args.cases), "--shape", *map(str, args.shape),
                            "--structures", "2", "--seed", "7"], env, log)
        planning = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", dataset, "-c", "3d_fullres", "-np", "2"],
                 planning, log)
        run_step(plugins + ["semi", "split", "-d", dataset, "--labeled", args.labeled], env, log)
        run_step(plugins + ["semi", "preprocess", "-d", dataset, "-c", "3d_fullres", "--no-progress"], env, log)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    result = {}
    for trainer in ("LeFeDTrainer", "LabeledOnlyTrainer"):
        run_step(console_command("nnUNetv2_train") + [dataset, "3d_fullres", "0", "-tr", trainer, "-device", device],
                 env, log)
        out = os.path.join(root, "pred_" + trainer)
        run_step(console_command("nnUNetv2_predict") + ["-i", os.path.join(raw, "imagesTs"), "-o", out, "-d", dataset,
                                                        "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", device,
                                                        "--disable_progress_bar"], env, log)
        dices = []
        for f in sorted(os.listdir(os.path.join(raw, "labelsTs"))):
            ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(raw, "labelsTs", f)))
            pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, f)))
            for label in (1, 2):
                r, p = ref == label, pred == label
                dices.append(2.0 * (r & p).sum() / max(1, r.sum() + p.sum()))
        result[trainer] = float(np.mean(dices))
    print(f"held-out Dice ({args.labeled} labeled of {args.cases} training cases + {args.cases} imagesUn, "
          f"{args.epochs} x {args.iters} iterations): LeFeD {result['LeFeDTrainer']:.4f}, nnU-Net default on the "
          f"labeled cases only {result['LabeledOnlyTrainer']:.4f}")
    print(json.dumps(result))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dice:
        dice_benchmark(args)
    else:
        step_benchmark(args, argv)


if __name__ == "__main__":
    main()
