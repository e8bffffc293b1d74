"""Tiny MedSeqFT setups shared by the command and end-to-end tests (imported as a plain module)."""
import json
import os
import subprocess
import sys

import torch

from nnunet_plugins.runner import console_command, nnunet_cpu_env, run_step
from nnunet_plugins.synthetic import generate_dataset

PLUGINS = [sys.executable, "-m", "nnunet_plugins"]
# three datasets with different structures (1, 2, 3 foreground structures; other seeds, other cases)
DATASETS = {31: ("A", 1), 32: ("B", 2), 33: ("C", 3)}
TINY_FEATURES = [4, 8, 16, 16, 16, 16]


def medseqft_env(root):
    """nnU-Net folders under ``root``, CPU settings (augmentation in the training process)."""
    # seeded: the tiny runs are reproducible (nnU-Net itself does not seed)
    return dict(nnunet_cpu_env(root, augmentation_workers=0, threads=1), NNUNET_PLUGINS_SEED="0")


def make_datasets(env, cases=6, test_cases=2, shape=(16, 32, 32), datasets=DATASETS, channels=1):
    for i, (name, structures) in datasets.items():
        generate_dataset(env["nnUNet_raw"], dataset_id=i, name=name, num_cases=cases, num_test=test_cases,
                         shape=shape, num_structures=structures, num_channels=channels, seed=i)


def plan_tiny(env, dataset_id, log, features=TINY_FEATURES, patch=(16, 32, 32)):
    """nnU-Net's fingerprint and plans (no preprocessing), narrowed to a tiny U-Net and patch."""
    plan_env = dict(env)
    plan_env.pop("nnUNet_n_proc_DA", None)   # nnU-Net 2.8.1's planner crashes on 0
    run_step(console_command("nnUNetv2_extract_fingerprint") + ["-d", str(dataset_id), "-np", "1"], plan_env, log,
             echo=False)
    run_step(console_command("nnUNetv2_plan_experiment") + ["-d", str(dataset_id)], plan_env, log, echo=False)
    pre = os.path.join(env["nnUNet_preprocessed"], [d for d in os.listdir(env["nnUNet_preprocessed"])
                                                    if d.startswith(f"Dataset{dataset_id:03d}_")][0])
    f = os.path.join(pre, "nnUNetPlans.json")
    plans = json.load(open(f))
    cfg = plans["configurations"]["3d_fullres"]
    kwargs = cfg["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = list(features[:kwargs["n_stages"]])
    cfg["patch_size"] = list(patch)
    json.dump(plans, open(f, "w"), indent=1)
    return pre, plans


def nnunet_checkpoint(env, pre, plans, seed=0):
    """A model folder of nnU-Net's default trainer (random U-Net weights of the plans, no reconstruction head),
    as any nnU-Net checkpoint given to ``--init``; returns its checkpoint path."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.load(open(os.path.join(env["nnUNet_raw"], os.path.basename(pre), "dataset.json")))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, len(dataset_json["labels"]),
                                 allow_init=True, deep_supervision=True)
    folder = os.path.join(env["nnUNet_results"], os.path.basename(pre), "nnUNetTrainer__nnUNetPlans__3d_fullres")
    os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
    json.dump(plans, open(os.path.join(folder, "plans.json"), "w"))
    json.dump(dataset_json, open(os.path.join(folder, "dataset.json"), "w"))
    path = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"}, path)
    return path


def plugins(*args, env):
    return subprocess.run(PLUGINS + [str(a) for a in args], capture_output=True, text=True, env=env)
