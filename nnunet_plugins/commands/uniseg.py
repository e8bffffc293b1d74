"""``nnunet-plugins uniseg-backbone``: fine-tune a UniSeg backbone on a new dataset with stock nnU-Net.

UniSeg's downstream use (paper Sec. 3 "as a strong representation learner"; official
``UniSeg_Trainer_DS``): drop the prompt, keep encoder and decoder, fine-tune on one dataset. A
UniSeg trained by ``UniSegTrainer`` is nnU-Net's ``PlainConvUNet`` plus the prompt parts, so its
backbone converts 1:1 into ``PlainConvUNet`` weights:

* the stem convolution of the downstream dataset's channel count becomes the stem;
* the first transposed convolution drops its last input channel (the task prompt), as the official
  downstream trainer does;
* the universal prompt and FUSE are dropped; segmentation heads are left to nnU-Net (its
  ``-pretrained_weights`` loader never transfers them).

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
import os

import numpy as np
import torch

from nnunet_plugins.atomic import torch_save, write_json

PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
STEM = "encoder.stages.0.0.convs.0"


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


def plain_unet_arch_kwargs(architecture: dict) -> dict:
    """The U-Net arch_kwargs of a UniSegTrainer model's plans (they name nnU-Net's PlainConvUNet)."""
    if architecture["network_class_name"] != PLAIN_UNET:
        raise ValueError(f"the UniSeg model's plans name {architecture['network_class_name']}, expected {PLAIN_UNET}")
    return dict(architecture["arch_kwargs"])


def uniseg_backbone_state_dict(uniseg_state: dict, target_state: dict) -> tuple[dict, list]:
    """Map a UniSeg state dict onto the keys and shapes of a ``PlainConvUNet`` state dict.

    Returns (state dict for every key of ``target_state`` except mismatching segmentation heads,
    list of notes). Raises ValueError naming the key when the backbones do not match.
    """
    out, notes = {}, []
    for key, target in target_state.items():
        src_key = key
        if ".seg_layers." in key:
            # nnU-Net's -pretrained_weights never transfers segmentation heads; keep them when they fit
            if key in uniseg_state and uniseg_state[key].shape == target.shape:
                out[key] = uniseg_state[key].clone()
            continue
        # the stem: both references of the first conv (".conv." and ".all_modules.0.")
        for prefix in (f"{STEM}.conv.", f"{STEM}.all_modules.0.", f"decoder.{STEM}.conv.",
                       f"decoder.{STEM}.all_modules.0."):
            if key.startswith(prefix):
                c = target_state[prefix + "weight"].shape[1]
                src_key = f"{prefix}convs.{c}.{key[len(prefix):]}"
                if src_key not in uniseg_state:
                    stems = sorted({k[len(prefix) + len('convs.'):].split('.')[0] for k in uniseg_state
                                    if k.startswith(prefix + "convs.")})
                    raise ValueError(f"the UniSeg model has stems for {stems} input channels, the downstream "
                                     f"dataset has {c}")
                break
        if src_key not in uniseg_state:
            if key.endswith(".bias") and "transpconvs" in key:
                out[key] = torch.zeros_like(target)  # official-style (bias-free) transposed convolutions
                notes.append(f"{key}: no bias in the UniSeg model, set to 0")
                continue
            raise ValueError(f"{key} is missing in the UniSeg weights: the backbones do not match")
        value = uniseg_state[src_key]
        if key.endswith("transpconvs.0.weight") and value.shape[0] == target.shape[0] + 1:
            # the first decoder input is concat(bottleneck, task prompt): drop the prompt's channel
            value = value[:-1]
        if value.shape != target.shape:
            raise ValueError(f"{key}: UniSeg has shape {tuple(value.shape)}, the downstream U-Net "
                             f"{tuple(target.shape)}; the architectures differ")
        out[key] = value.clone()
    return out, notes


def convert(model_folder: str, fold: str, checkpoint_name: str, dataset: str, configuration: str, plans: str,
            target_plans: str, output: str | None = None) -> tuple[str, str]:
    """Write backbone weights and downstream plans; return (weights file, plans file)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugins.planners.common import fit_to_divisor

    fold_dir = f"fold_{fold}"
    ckpt_file = os.path.join(model_folder, fold_dir, checkpoint_name)
    if not os.path.isfile(ckpt_file):
        raise FileNotFoundError(f"no checkpoint {ckpt_file}")
    checkpoint = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    if checkpoint.get("trainer_name") and "UniSeg" not in checkpoint["trainer_name"]:
        print(f"warning: checkpoint was written by {checkpoint['trainer_name']}, not a UniSeg trainer")
    with open(os.path.join(model_folder, "plans.json")) as f:
        up_plans = json.load(f)
    up_config = checkpoint["init_args"]["configuration"]
    arch = plain_unet_arch_kwargs(up_plans["configurations"][up_config]["architecture"])

    ds_name = maybe_convert_to_dataset_name(int(dataset) if str(dataset).isdigit() else dataset)
    pre = os.path.join(nnUNet_preprocessed, ds_name)
    plans_file = os.path.join(pre, plans + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} does not exist: plan the downstream dataset first "
                                f"(nnUNetv2_plan_and_preprocess -d {ds_name[7:10]} -c {configuration})")
    with open(plans_file) as f:
        down_plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        down_dj = json.load(f)
    pm = PlansManager(down_plans)
    if configuration not in down_plans["configurations"]:
        raise ValueError(f"{plans_file} has no configuration {configuration!r}")
    down_cfg = pm.get_configuration(configuration)
    if len(down_cfg.patch_size) != len(arch["strides"][0]):
        raise ValueError(f"the UniSeg model is {len(arch['strides'][0])}-D, configuration {configuration} is "
                         f"{len(down_cfg.patch_size)}-D")

    # downstream plans: own spacing / normalisation / preprocessed data, UniSeg's U-Net
    new_plans = json.loads(json.dumps(down_plans))
    new_plans["plans_name"] = target_plans
    resolved = pm.get_configuration(configuration).configuration  # inheritance resolved
    cfg = dict(resolved)
    cfg.pop("inherits_from", None)
    cfg["architecture"] = {"network_class_name": PLAIN_UNET, "arch_kwargs": arch,
                           "_kw_requires_import": up_plans["configurations"][up_config]["architecture"]
                           .get("_kw_requires_import", ["conv_op", "norm_op", "dropout_op", "nonlin"])}
    total_stride = np.prod(np.asarray(arch["strides"]), axis=0).tolist()
    cfg["patch_size"] = fit_to_divisor(down_cfg.patch_size, total_stride)
    new_plans["configurations"] = {configuration: cfg}

    # backbone weights, checked against the network nnU-Net will build from these plans
    new_pm = PlansManager(new_plans)
    new_cfg = new_pm.get_configuration(configuration)
    n_in = determine_num_input_channels(new_pm, new_cfg, down_dj)
    n_out = new_pm.get_label_manager(down_dj).num_segmentation_heads
    target = get_network_from_plans(new_cfg.network_arch_class_name, new_cfg.network_arch_init_kwargs,
                                    new_cfg.network_arch_init_kwargs_req_import, n_in, n_out, allow_init=True,
                                    deep_supervision=True)
    if not isinstance(target, PlainConvUNet):
        raise RuntimeError("internal: the backbone plans do not build a PlainConvUNet")
    state, notes = uniseg_backbone_state_dict(checkpoint["network_weights"], target.state_dict())
    for n in notes:
        print(n)
    print("segmentation heads are not transferred: nnU-Net's -pretrained_weights re-initialises them")
    weights = {"network_weights": state, "converted_from": os.path.abspath(ckpt_file),
               "note": "UniSeg backbone (prompt and FUSE dropped) for nnUNetv2_train -pretrained_weights"}
    output = output or os.path.join(pre, f"uniseg_backbone_{target_plans}.pth")
    torch_save(weights, output)
    load_pretrained_weights(target, output)  # exactly what nnUNetv2_train -pretrained_weights will do
    out_plans = os.path.join(pre, target_plans + ".json")
    write_json(new_plans, out_plans)
    return output, out_plans


def run(args) -> int:
    weights, plans_file = convert(args.model_folder, args.fold, args.checkpoint, args.dataset, args.configuration,
                                  args.plans, args.target_plans, args.output)
    with open(plans_file) as f:
        plans = json.load(f)
    ds = plans["dataset_name"][7:10]
    print(f"wrote {weights}\nwrote {plans_file}")
    print(f"next: nnUNetv2_train {ds} {args.configuration} FOLD -p {args.target_plans} -pretrained_weights {weights}"
          f"   (official downstream schedule: add -tr nnUNetTrainer_100epochs)")
    return 0
