"""A tiny planned and preprocessed synthetic dataset with imagesUn, and an nnU-Net trainer on it, for the
semi-supervised data tests (imported as a plain module; pytest puts tests/ on sys.path)."""
import json
import os

DATASET_ID = 611
DATASET = "Dataset611_Synthetic"


def plan_and_preprocess(dataset_id, configurations=("3d_fullres",)):
    """nnU-Net's fingerprint, plans and preprocessing (what nnUNetv2_plan_and_preprocess does), in-process
    with one worker: the nnUNet_* variables must point at the test's folders."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    extract_fingerprints([dataset_id], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([dataset_id])
    preprocess([dataset_id], configurations=list(configurations), num_processes=[1] * len(configurations),
               show_progress_bar=False)


def plan_and_preprocess_tiny(root, num_cases=8, num_unlabeled=3):
    """Synthetic dataset (1 channel, 16 x 32 x 32, ``num_unlabeled`` images in imagesUn), planned and
    preprocessed (3d_fullres) by nnU-Net. Returns the raw dataset folder."""
    from nnunet_plugins.synthetic import generate_dataset

    folder = generate_dataset(os.environ["nnUNet_raw"], dataset_id=DATASET_ID, num_cases=num_cases, num_test=0,
                              num_unlabeled=num_unlabeled, shape=(16, 32, 32), spacing=(3.0, 0.8, 0.8),
                              num_structures=2, seed=3)
    plan_and_preprocess(DATASET_ID)
    return folder


def nnunet_env(root):
    env = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = os.path.join(str(root), name)
        os.makedirs(env[name], exist_ok=True)
    return env


def make_trainer(fold=0, configuration="3d_fullres", dataset=DATASET):
    """nnU-Net's own trainer on the dataset (CPU), as nnUNetv2_train builds it."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(pre, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False  # nnU-Net's run_training adds this key
    return nnUNetTrainer(plans, configuration, fold, dataset_json, device=torch.device("cpu"))
