"""A tiny planned and preprocessed synthetic dataset with imagesUn, and an nnU-Net trainer on it, for the
semi-supervised data tests (imported as a plain module; pytest puts tests/ on sys.path)."""
import json
import os

DATASET_ID = 611
DATASET = "Dataset611_Synthetic"


def plan_and_preprocess_tiny(root, num_cases=8, num_unlabeled=3, configurations=("3d_fullres",)):
    """Synthetic dataset (1 channel, 16 x 32 x 32) + nnU-Net's fingerprint, plans and preprocessing in-process
    under ``root``; the caller has set nnUNet_raw / nnUNet_preprocessed / nnUNet_results to folders of
    ``root``. Returns the raw dataset folder."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    from nnunet_plugins.synthetic import generate_dataset

    folder = generate_dataset(os.environ["nnUNet_raw"], dataset_id=DATASET_ID, num_cases=num_cases, num_test=0,
                              num_unlabeled=num_unlabeled, shape=(16, 32, 32), spacing=(3.0, 0.8, 0.8),
                              num_structures=2, seed=3)
    extract_fingerprints([DATASET_ID], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=list(configurations), num_processes=[1] * len(configurations),
               show_progress_bar=False)
    return folder


def nnunet_env(root):
    env = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = os.path.join(str(root), name)
        os.makedirs(env[name], exist_ok=True)
    return env


def make_trainer(fold=0, configuration="3d_fullres"):
    """nnU-Net's own trainer on the dataset (CPU), as nnUNetv2_train builds it."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False  # nnU-Net's run_training adds this key
    return nnUNetTrainer(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
