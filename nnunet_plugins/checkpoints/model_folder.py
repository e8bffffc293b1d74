"""An official checkpoint -> a complete nnU-Net v2 model folder that nnU-Net's predictor runs.

``write_model_folder("cotr", "official.pth", dataset=501, configuration="3d_fullres")`` writes::

    $nnUNet_results/Dataset501_X/CoTrTrainer__nnUNetPlans__3d_fullres/
        plans.json                  the dataset's plans, this configuration's architecture = the checkpoint's network
        dataset.json                the preprocessed dataset's (labels, channels, file ending)
        dataset_fingerprint.json    copied when the preprocessed dataset has one
        fold_0/checkpoint_final.pth nnU-Net 2.8's checkpoint format ('network_weights', 'init_args',
                                    'trainer_name', 'inference_allowed_mirroring_axes', ...)

Everything except the network comes from the user's nnU-Net dataset (``nnUNetv2_plan_and_preprocess``
first): spacing, normalisation and patch of the plans configuration, labels of ``dataset.json``. The
plans' architecture entry names our network and its constructor arguments, so the method's trainer
rebuilds exactly the checkpoint's network; the patch is rounded to the network's required divisor
(UniSeg: the patch the official prompt was trained for). The network is built here the way
``nnUNetPredictor.initialize_from_trained_model_folder`` builds it (the trainer's static
``build_network_architecture``, found by name) and must take the converted weights strictly.

Single-task models (BA-Net: ``BANetTrainer``, CoTr: ``CoTrTrainer``) run with the stock
``nnUNetv2_predict -tr TRAINER``. Multi-task models (UniSeg: ``UniSegTrainer``, DoDNet: ``DoDNetTrainer``,
TransDoDNet: ``TransDoDNetTrainer``) need a combined multi-task dataset (``nnunet-plugins combine``) with as
many tasks (and output channels) as the checkpoint, and run through ``nnunet-plugins predict-multitask``
(the stock ``nnUNetv2_predict`` cannot pass a task and refuses them). The checkpoint also serves as
``nnUNetv2_train -pretrained_weights`` for fine-tuning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable

import torch

from nnunet_plugins.architectures.contract import fit_patch
from nnunet_plugins.atomic import atomic_directory, atomic_output, torch_save, write_json
from nnunet_plugins.checkpoints import MULTITASK, TRAINERS, banet, cotr, dodnet, transdodnet, uniseg
from nnunet_plugins.checkpoints.common import CheckpointMismatch, read_checkpoint, unwrap_state_dict


@dataclass(frozen=True)
class Converter:
    """How one method's official checkpoints become a model folder."""
    method: str                   # key of TRAINERS: the trainer whose build_network_architecture builds it
    network: str                  # network class named in the plans' architecture entry
    convert: Callable             # (official state dict, network) -> our state dict (strict)
    official_kwargs: dict = field(default_factory=dict)   # constructor arguments of the official network
    prefixes: tuple = ()          # official wrapper-module prefixes of the parameter names
    infer: Callable | None = None  # official state dict -> (arch_kwargs, forced patch or None), from its shapes

    @property
    def network_class(self) -> type:
        """The network class (its contract gives the patch divisor and the single-voxel rule)."""
        import pydoc

        return pydoc.locate(self.network)

    def fit_patch(self, patch, arch_kwargs: dict) -> list[int]:
        """Nearest patch the network built with ``arch_kwargs`` takes (the network's own contract)."""
        net = self.network_class
        divisor = net.divisor_for(arch_kwargs, len(patch))
        return fit_patch(list(patch), divisor, net.avoid_single_voxel_bottleneck)

    @property
    def trainer(self) -> str:
        return TRAINERS[self.method]

    @property
    def multitask(self) -> bool:
        return self.method in MULTITASK


def _banet_infer(official: dict):
    return banet.plans_architecture(banet.infer_official_architecture(official))["arch_kwargs"], None


def _uniseg_infer(official: dict):
    arch = uniseg.infer_official_architecture(official)
    return arch["arch_kwargs"], arch["patch_size"]


CONVERTERS = {
    "banet": Converter("banet", banet.BANET_PLAIN, banet.convert_state_dict, infer=_banet_infer),
    "cotr": Converter("cotr", "nnunet_plugins.architectures.cotr.CoTr", cotr.convert_state_dict,
                      official_kwargs=cotr.OFFICIAL_ARCH_KWARGS, prefixes=cotr.PREFIXES),
    "uniseg": Converter("uniseg", uniseg.UNISEG_NETWORK, uniseg.convert_state_dict, infer=_uniseg_infer),
    "dodnet": Converter("dodnet", "nnunet_plugins.architectures.dodnet.DoDNet", dodnet.convert_state_dict,
                        official_kwargs=dodnet.OFFICIAL_ARCH_KWARGS),
    "transdodnet": Converter("transdodnet", "nnunet_plugins.architectures.transdodnet.TransDoDNet",
                             transdodnet.convert_state_dict,
                             official_kwargs=transdodnet.OFFICIAL_ARCH_KWARGS, prefixes=transdodnet.PREFIXES),
}
#: plans arch_kwargs that name classes (nnU-Net's ``_kw_requires_import``)
IMPORTED_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def _folder_from_env(variable: str) -> str:
    folder = os.environ.get(variable)
    if not folder:
        raise RuntimeError(f"{variable} is not set")
    return folder


def dataset_folder_name(dataset, preprocessed: str) -> str:
    """``DatasetXXX_Name`` of an ID or name, looked up in the preprocessed folder."""
    text = str(dataset)
    if re.fullmatch(r"Dataset\d{3}_.+", text):
        names = [text]
    elif text.isdigit():
        names = sorted(n for n in os.listdir(preprocessed) if n.startswith(f"Dataset{int(text):03d}_")) \
            if os.path.isdir(preprocessed) else []
    else:
        raise ValueError(f"dataset must be an ID or DatasetXXX_Name, got {dataset!r}")
    if len(names) != 1 or not os.path.isdir(os.path.join(preprocessed, names[0])):
        raise FileNotFoundError(f"dataset {dataset} is not preprocessed in {preprocessed} (run "
                                f"nnUNetv2_plan_and_preprocess first)" if not names or len(names) == 1 else
                                f"several preprocessed datasets have ID {dataset}: {names}")
    return names[0]


def model_plans(method: str, official: dict, plans: dict, configuration: str, dataset_json: dict,
                arch_kwargs: dict | None = None) -> dict:
    """The model folder's plans: ``plans`` with only ``configuration`` (inheritance resolved), whose
    architecture is the checkpoint's network and whose patch fits it; multi-task: the task metadata."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    conv = CONVERTERS[method]
    if configuration not in plans.get("configurations", {}):
        raise ValueError(f"the plans {plans.get('plans_name')!r} have no configuration {configuration!r} (have "
                         f"{', '.join(plans.get('configurations', {}))})")
    cfg = dict(PlansManager(plans).get_configuration(configuration).configuration)
    cfg.pop("inherits_from", None)
    kwargs, patch = (conv.infer(official) if conv.infer else ({}, None))
    kwargs = {**kwargs, **conv.official_kwargs, **(arch_kwargs or {})}
    if patch is None:
        patch = conv.fit_patch(cfg["patch_size"], kwargs)
    elif len(patch) != len(cfg["patch_size"]):
        raise ValueError(f"the checkpoint's network is {len(patch)}-D, configuration {configuration} is "
                         f"{len(cfg['patch_size'])}-D")
    cfg["patch_size"] = [int(p) for p in patch]
    cfg["architecture"] = {"network_class_name": conv.network, "arch_kwargs": kwargs,
                           "_kw_requires_import": [k for k in IMPORTED_KWARGS if isinstance(kwargs.get(k), str)]}
    out = json.loads(json.dumps({**plans, "configurations": {configuration: cfg}}))
    if conv.multitask:
        from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec

        out[METADATA_KEY] = MultiTaskSpec.from_dataset_json(dataset_json).to_plans_entry()
    return out


def build_network(trainer_name: str, plans: dict, configuration: str, dataset_json: dict) -> torch.nn.Module:
    """The network exactly as nnU-Net's predictor builds it from a model folder's plans."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer = recursive_find_trainer_class_by_name(trainer_name)
    if trainer is None:
        raise RuntimeError(f"nnU-Net cannot find the trainer {trainer_name}: is nnunet_plugins installed (pip install .)?")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    return trainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                              pm.get_label_manager(dataset_json).num_segmentation_heads,
                                              enable_deep_supervision=False)


def nnunet_checkpoint(weights: dict, trainer: str, plans: dict, configuration: str, fold, dataset_json: dict,
                      source: str) -> dict:
    """A checkpoint in nnU-Net 2.8's format (``nnUNetTrainer.save_checkpoint``) for prediction."""
    dim = len(plans["configurations"][configuration]["patch_size"])
    return {"network_weights": weights, "optimizer_state": None, "grad_scaler_state": None, "logging": None,
            "_best_ema": None, "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": trainer, "inference_allowed_mirroring_axes": tuple(range(dim)),
            "converted_from": source}


def write_model_folder(method: str, checkpoint: str, dataset, configuration: str, plans_identifier: str = "nnUNetPlans",
                       fold="0", arch_kwargs: dict | None = None, allow_pickle: bool = False,
                       overwrite: bool = False) -> str:
    """Convert the official ``checkpoint`` of ``method`` into ``$nnUNet_results/<dataset>/<TRAINER>__<plans>__
    <configuration>/fold_<fold>``; returns the model folder. Errors name what does not fit."""
    if method not in CONVERTERS:
        raise ValueError(f"no converter for {method!r}; methods: {', '.join(CONVERTERS)}")
    conv = CONVERTERS[method]
    fold = fold if str(fold) == "all" else int(fold)
    preprocessed = _folder_from_env("nnUNet_preprocessed")
    name = dataset_folder_name(dataset, preprocessed)
    pre = os.path.join(preprocessed, name)
    plans_file = os.path.join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} does not exist: plan the dataset with nnU-Net first (-p names the plans)")
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)

    official = unwrap_state_dict(read_checkpoint(checkpoint, allow_pickle), checkpoint, conv.prefixes)
    plans = model_plans(method, official, plans, configuration, dataset_json, arch_kwargs)
    network = build_network(conv.trainer, plans, configuration, dataset_json)
    try:
        weights = conv.convert(official, network)
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{checkpoint}: {e}{_multitask_hint(conv, plans, network, name)}") from None
    network.load_state_dict(weights, strict=True)  # what the predictor will do

    results = _folder_from_env("nnUNet_results")
    model_name = f"{conv.trainer}__{plans_identifier}__{configuration}"
    model = os.path.join(results, name, model_name)
    ckpt = nnunet_checkpoint(weights, conv.trainer, plans, configuration, fold, dataset_json,
                             os.path.abspath(checkpoint))
    fingerprint = os.path.join(pre, "dataset_fingerprint.json")
    if not os.path.isdir(model):
        os.makedirs(os.path.dirname(model), exist_ok=True)
        with atomic_directory(os.path.dirname(model), model_name) as tmp:  # the folder appears complete or not at all
            _write_contents(tmp, plans, dataset_json, fingerprint, fold, ckpt)
        return model
    existing = os.path.join(model, "plans.json")
    if os.path.isfile(existing) and not overwrite:
        with open(existing) as f:
            if json.load(f) != plans:
                raise FileExistsError(f"{model} holds a model with other plans; pass --overwrite to replace its "
                                      f"plans (its other folds then no longer match them)")
    if os.path.isfile(os.path.join(model, f"fold_{fold}", "checkpoint_final.pth")) and not overwrite:
        raise FileExistsError(f"{model}/fold_{fold}/checkpoint_final.pth exists; pass --overwrite to replace it")
    _write_contents(model, plans, dataset_json, fingerprint, fold, ckpt)
    return model


def _write_contents(folder, plans, dataset_json, fingerprint, fold, ckpt) -> None:
    write_json(plans, os.path.join(folder, "plans.json"))
    write_json(dataset_json, os.path.join(folder, "dataset.json"))
    if os.path.isfile(fingerprint):
        with atomic_output(os.path.join(folder, "dataset_fingerprint.json")) as tmp:
            shutil.copyfile(fingerprint, tmp)
    torch_save(ckpt, os.path.join(folder, f"fold_{fold}", "checkpoint_final.pth"))


def _multitask_hint(conv: Converter, plans: dict, network, dataset_name: str) -> str:
    if not conv.multitask:
        return ""
    from nnunet_plugins.multitask.metadata import MultiTaskSpec

    spec = MultiTaskSpec.from_plans(plans)
    return (f" (our network is built from dataset {dataset_name}: {spec.num_tasks} task(s) "
            f"{list(spec.tags)}, {network.num_classes} output channels; the checkpoint's task count and outputs "
            f"must match them)")
