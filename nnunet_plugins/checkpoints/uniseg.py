"""UniSeg checkpoints: official UniSeg (yeerwen/UniSeg, nnU-Net v1) -> our ``UniSeg``, and a trained UniSeg's
backbone -> nnU-Net's ``PlainConvUNet`` for downstream fine-tuning.

Official checkpoints
--------------------
The official ``UniSeg_Trainer`` (nnU-Net v1) saves ``{'state_dict': ...}`` of ``UniSeg_model``, an nnU-Net
v1 ``Generic_UNet`` (names: :mod:`nnunet_plugins.checkpoints.nnunet_v1`) plus:

==================================================  =====================================================
official                                            ours (``official_generic_unet=True``)
==================================================  =====================================================
conv_blocks_context.0.blocks.0.conv_{1,2,4}         encoder.stages.0.0.convs.0.conv.convs.{1,2,4}
conv_blocks_context.0.blocks.0.instnorm             encoder.stages.0.0.convs.0.norm (shared by the stems)
intermedia_prompt (1, T, *bottleneck)               universal_prompt
fusion_layer.blocks.{i}.conv / instnorm             fuse.convs.{i}.conv / norm
tu.0 (input: bottleneck + 1 prompt channel)         decoder.transpconvs.0
==================================================  =====================================================

The U-Net (stages, widths, kernels, strides, convs per stage, classes), the stems, the number of tasks
and FUSE's width are read from the tensor shapes; the prompt's spatial size times the total stride is
the patch the network was trained on (official 64x192x192), which the model folder's plans must keep
(the prompt has the bottleneck's size of that patch).

Backbone for fine-tuning
------------------------
UniSeg's downstream use (paper Sec. 3 "as a strong representation learner"; official
``UniSeg_Trainer_DS``): drop the prompt, keep encoder and decoder, fine-tune on one dataset. A UniSeg
trained by ``UniSegTrainer`` is nnU-Net's ``PlainConvUNet`` plus the prompt parts, so its backbone
converts 1:1 into ``PlainConvUNet`` weights (:func:`uniseg_backbone_state_dict`, :func:`convert`; the
command is ``nnunet-plugins uniseg-backbone``):

* the stem convolution of the downstream dataset's channel count becomes the stem;
* the first transposed convolution drops its last input channel (the task prompt), as the official
  downstream trainer does;
* the universal prompt and FUSE are dropped; segmentation heads are left to nnU-Net (its
  ``-pretrained_weights`` loader never transfers them).
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np
import torch

from nnunet_plugins.atomic import torch_save, write_json
from nnunet_plugins.checkpoints.common import CheckpointMismatch, convert_with
from nnunet_plugins.checkpoints.nnunet_v1 import REQUIRES_IMPORT, V1UNetNames, infer_v1_unet, plans_ops

UNISEG_NETWORK = "nnunet_plugins.architectures.uniseg.UniSeg"
WHAT = "an official UniSeg (UniSeg_model) checkpoint"
_STEM = re.compile(r"conv_blocks_context\.0\.blocks\.0\.conv_(\d+)\.(weight|bias)")
_FUSE = re.compile(r"fusion_layer\.blocks\.(\d+)\.(conv|instnorm)\.(weight|bias)")


def official_names(official: Mapping[str, torch.Tensor]):
    """Callable ``official name -> ours or None`` for the official UniSeg state dict ``official``."""
    unet = V1UNetNames(official)

    def rename(key: str) -> str | None:
        if m := _STEM.fullmatch(key):
            return f"encoder.stages.0.0.convs.0.conv.convs.{m[1]}.{m[2]}"
        if key == "intermedia_prompt":
            return "universal_prompt"
        if m := _FUSE.fullmatch(key):
            return f"fuse.convs.{m[1]}.{'conv' if m[2] == 'conv' else 'norm'}.{m[3]}"
        return unet(key)

    return rename


def convert_state_dict(official: Mapping[str, torch.Tensor], network: torch.nn.Module) -> dict:
    """``network``'s state dict from an official UniSeg one (prefixes stripped); raises
    :class:`CheckpointMismatch` naming every missing, extra or mis-shaped tensor."""
    return convert_with(official, official_names(official), network, "UniSeg")


def infer_official_architecture(official: Mapping[str, torch.Tensor]) -> dict:
    """UniSeg constructor arguments (plans form: ops as strings) of an official checkpoint, plus
    ``num_tasks``, ``num_classes`` and ``patch_size`` (the training patch the prompt was made for)."""
    stems = sorted(int(m[1]) for k in official if (m := _STEM.fullmatch(k)) and m[2] == "weight")
    if not stems or "intermedia_prompt" not in official:
        raise CheckpointMismatch(f"not {WHAT}: no 'conv_blocks_context.0.blocks.0.conv_<channels>' stems or no "
                                 f"'intermedia_prompt' in its state dict")
    unet = infer_v1_unet(dict(official), WHAT, stem_weight=f"conv_blocks_context.0.blocks.0.conv_{stems[0]}.weight")
    prompt = tuple(official["intermedia_prompt"].shape)
    if "fusion_layer.blocks.0.conv.weight" not in official:
        raise CheckpointMismatch(f"not {WHAT}: no 'fusion_layer.blocks.0.conv.weight'")
    total_stride = np.prod(np.asarray(unet["strides"]), axis=0).tolist()
    kwargs = {k: unet[k] for k in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage",
                                   "n_conv_per_stage_decoder", "conv_bias")}
    kwargs.update(plans_ops(unet["dim"], unet["batch_norm"]), stem_channels=stems,
                  fuse_channels=int(official["fusion_layer.blocks.0.conv.weight"].shape[0]), official_generic_unet=True)
    return {"arch_kwargs": kwargs, "num_tasks": prompt[1], "num_classes": unet["num_classes"],
            "patch_size": [int(p) * int(s) for p, s in zip(prompt[2:], total_stride)]}


def plans_architecture(arch_kwargs: dict) -> dict:
    """The plans architecture entry that makes ``UniSegTrainer`` build UniSeg with ``arch_kwargs``."""
    return {"network_class_name": UNISEG_NETWORK, "arch_kwargs": arch_kwargs,
            "_kw_requires_import": [k for k in REQUIRES_IMPORT if k in arch_kwargs]}


# ---------------------------------------------------------------------------------------------------
# backbone for downstream fine-tuning
# ---------------------------------------------------------------------------------------------------
PLAIN_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
STEM = "encoder.stages.0.0.convs.0"


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
