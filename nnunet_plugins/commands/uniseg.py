"""``nnunet-plugins uniseg-backbone``: fine-tune a UniSeg backbone on a new dataset with stock nnU-Net.

Drops the prompt and FUSE of a UniSeg trained by ``UniSegTrainer`` and converts its backbone 1:1 into
nnU-Net ``PlainConvUNet`` weights (see :mod:`nnunet_plugins.checkpoints.uniseg`).

The command writes (1) the backbone as an nnU-Net-style checkpoint for ``nnUNetv2_train
-pretrained_weights`` and (2) plans for the downstream dataset (its own spacing, normalisation and
preprocessed data, i.e. the same ``data_identifier``; the UniSeg U-Net's stages, kernels and strides;
its patch rounded to the U-Net's total stride), then prints the two nnU-Net commands to run, e.g.::

    nnunet-plugins uniseg-backbone -m RESULTS/Dataset600_X/UniSegTrainer__nnUNetPlans__3d_fullres -f 0 -d 601
    nnUNetv2_train 601 3d_fullres 0 -p nnUNetPlans_UniSegBackbone -pretrained_weights .../uniseg_backbone.pth

The downstream dataset must have been planned by nnU-Net first (``nnUNetv2_plan_and_preprocess``).
"""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("uniseg-backbone", help="convert a UniSeg checkpoint for fine-tuning on a new dataset",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model-folder", required=True, help="UniSegTrainer model folder (with plans.json)")
    p.add_argument("-f", "--fold", default="0", help="fold whose checkpoint to use (default 0)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-d", "--dataset", required=True, help="downstream dataset ID or name (planned by nnU-Net)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="the downstream dataset's nnU-Net plans")
    p.add_argument("--target-plans", default="nnUNetPlans_UniSegBackbone", help="plans identifier to write")
    p.add_argument("-o", "--output", default=None,
                   help="backbone weights file (default: <preprocessed dataset>/uniseg_backbone_<target plans>.pth)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_plugins.checkpoints.uniseg import convert

    weights, plans_file = convert(args.model_folder, args.fold, args.checkpoint, args.dataset, args.configuration,
                                  args.plans, args.target_plans, args.output)
    with open(plans_file) as f:
        plans = json.load(f)
    ds = plans["dataset_name"][7:10]
    print(f"wrote {weights}\nwrote {plans_file}")
    print(f"next: nnUNetv2_train {ds} {args.configuration} FOLD -p {args.target_plans} -pretrained_weights {weights}"
          f"   (official downstream schedule: add -tr nnUNetTrainer_100epochs)")
    return 0
