"""The labeled-fraction protocol: per fold, keep the labels of N (or P%) training cases only.

Semi-supervised papers report results "with 10% / 20% of the labels": of a fold's training cases a fixed,
seeded subset keeps its labels and the others are used as unlabeled images; validation cases are
untouched. ``nnunet-plugins semi split -d D --labeled 4`` (or ``20%``) writes, next to nnU-Net's
``splits_final.json`` (created first if absent, exactly as ``nnUNetTrainer.do_split`` would: 5 folds,
seed 12345, over the sorted training cases), the file ``splits_semi.json``::

    {"parameters": {"labeled": "4", "seed": 12345, "splits_file": "splits_final.json"},
     "splits": [{"train": [...], "val": [...], "labeled": [...], "unlabeled": [...]}, ...]}

``train``/``val`` are copies of the fold in ``splits_final.json`` (a trainer checks they still agree);
``labeled`` + ``unlabeled`` partition ``train``. The labeled subset of fold ``k`` is drawn by
``numpy.random.default_rng([seed, k])`` from the fold's sorted training cases, so the file is reproducible
from its parameters. ``P%`` means ``round(P / 100 * n_train)`` cases (at least 1).
A trainer records the fold it trains on into its output folder with :func:`record_semi_split`.

Per task (``--per-task``, combined multi-task datasets, ``dataset.json["multitask"]``): the count or
percentage applies within each task's training cases of the fold (drawn by ``default_rng([seed, k, t])``
from the task's sorted cases), so every source keeps its own labeled fraction.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_plugins.atomic import write_json

SPLITS_FILE = "splits_final.json"
SEMI_SPLITS_FILE = "splits_semi.json"
#: what a trainer writes into its fold folder
RECORD_FILE = "semi_split.json"
DEFAULT_SEED = 12345


def parse_labeled(text: str | int) -> Tuple[str, float]:
    """``"4"`` -> ("count", 4); ``"20%"`` -> ("percent", 20.0)."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", s)
    if m:
        p = float(m.group(1))
        if not 0 < p <= 100:
            raise ValueError(f"--labeled percentage must be in (0, 100], got {s}")
        return "percent", p
    if not s.isdigit() or int(s) < 1:
        raise ValueError(f"--labeled takes a number of cases (e.g. 4) or a percentage (e.g. 20%), got {s!r}")
    return "count", int(s)


def num_labeled(labeled: str | int, n_train: int, fold: int = 0) -> int:
    kind, value = parse_labeled(labeled)
    n = max(1, math.floor(value / 100.0 * n_train + 0.5)) if kind == "percent" else int(value)
    if n > n_train:
        raise ValueError(f"fold {fold} has {n_train} training cases, cannot keep the labels of {n}")
    return n


def _draw(cases: List[str], labeled: str | int, rng_seed: list, fold: int) -> set:
    n = num_labeled(labeled, len(cases), fold)
    return {cases[int(i)] for i in np.random.default_rng(rng_seed).choice(len(cases), n, replace=False)}


def semi_splits(splits: Sequence[dict], labeled: str | int, seed: int = DEFAULT_SEED,
                task_of_case=None) -> List[dict]:
    """The labeled/unlabeled partition of every fold of ``splits`` (nnU-Net's splits_final.json content).

    ``task_of_case`` (a function case -> task id): draw the labeled cases within each task (module docstring).
    """
    out = []
    for k, fold in enumerate(splits):
        train = sorted(str(c) for c in fold["train"])
        if task_of_case is None:
            chosen = _draw(train, labeled, [int(seed), k], k)
        else:
            tasks = sorted({task_of_case(c) for c in train})
            chosen = set()
            for t in tasks:
                chosen |= _draw([c for c in train if task_of_case(c) == t], labeled, [int(seed), k, int(t)], k)
        out.append({"train": list(fold["train"]), "val": list(fold["val"]),
                    "labeled": [c for c in train if c in chosen],
                    "unlabeled": [c for c in train if c not in chosen]})
    return out


def default_splits(identifiers: Sequence[str]) -> List[dict]:
    """nnU-Net's default split (``nnUNetTrainer.do_split``: 5-fold, seed 12345, sorted identifiers)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=5)
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def training_identifiers(raw_dataset_folder: str) -> List[str]:
    """The training cases nnU-Net preprocesses for a raw dataset (imagesTr or dataset.json's ``dataset``)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    with open(os.path.join(raw_dataset_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    return sorted(get_filenames_of_train_images_and_targets(raw_dataset_folder, dataset_json))


def write_semi_split(preprocessed_dataset_folder: str, labeled: str | int, seed: int = DEFAULT_SEED,
                     raw_dataset_folder: Optional[str] = None, per_task: bool = False) -> str:
    """Write ``splits_semi.json`` next to ``splits_final.json`` (creating nnU-Net's default split first if
    there is none, from the raw dataset's training cases). ``per_task``: the labeled fraction within each task
    of a combined dataset (its ``dataset.json`` task tables). Returns its path."""
    splits_file = os.path.join(preprocessed_dataset_folder, SPLITS_FILE)
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
    else:
        if raw_dataset_folder is None:
            raise FileNotFoundError(f"{splits_file} does not exist and no raw dataset is known to create it from")
        splits = default_splits(training_identifiers(raw_dataset_folder))
        os.makedirs(preprocessed_dataset_folder, exist_ok=True)
        write_json(splits, splits_file)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and "train" in s and "val" in s for s in splits):
        raise ValueError(f"{splits_file}: expected a list of {{'train': [...], 'val': [...]}} folds")
    kind, value = parse_labeled(labeled)
    task_of_case = None
    if per_task:
        from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec

        folder = next((f for f in (preprocessed_dataset_folder, raw_dataset_folder)
                       if f and os.path.isfile(os.path.join(f, "dataset.json"))), None)
        if folder is None:
            raise FileNotFoundError(f"--per-task needs the dataset.json of {preprocessed_dataset_folder}")
        with open(os.path.join(folder, "dataset.json")) as f:
            dataset_json = json.load(f)
        if METADATA_KEY not in dataset_json:
            raise ValueError(f"{os.path.join(folder, 'dataset.json')} has no '{METADATA_KEY}' task tables: --per-task "
                             f"needs a combined dataset (nnunet-plugins combine)")
        task_of_case = MultiTaskSpec.from_dataset_json(dataset_json).task_of_case
    parameters = {"labeled": f"{value:g}%" if kind == "percent" else str(value), "seed": int(seed),
                  "splits_file": SPLITS_FILE}
    if per_task:
        parameters["per_task"] = True
    result = {"parameters": parameters, "splits": semi_splits(splits, labeled, seed, task_of_case)}
    path = os.path.join(preprocessed_dataset_folder, SEMI_SPLITS_FILE)
    write_json(result, path)
    return path


def load_semi_split(preprocessed_dataset_folder: str, fold: int, train_keys: Optional[Sequence[str]] = None) \
        -> Optional[Dict]:
    """Fold ``fold`` of ``splits_semi.json`` (``{"labeled", "unlabeled", "train", "val", "parameters"}``), or
    None if the dataset has no semi split. With ``train_keys`` (the trainer's split) a mismatch is an error."""
    path = os.path.join(preprocessed_dataset_folder, SEMI_SPLITS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        content = json.load(f)
    splits = content.get("splits", [])
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise ValueError(f"{path} has {len(splits)} folds, fold {fold!r} requested (the semi split needs a "
                         f"numbered fold of splits_final.json)")
    entry = dict(splits[fold], parameters=content.get("parameters", {}), file=path)
    if train_keys is not None and sorted(map(str, train_keys)) != sorted(entry["train"]):
        raise ValueError(f"{path}: fold {fold} no longer matches {SPLITS_FILE} (rerun nnunet-plugins semi split)")
    if sorted(entry["labeled"] + entry["unlabeled"]) != sorted(entry["train"]):
        raise ValueError(f"{path}: fold {fold}: labeled + unlabeled cases are not the fold's training cases")
    return entry


def record_semi_split(output_folder: str, labeled: Sequence[str], unlabeled_training_cases: Sequence[str],
                      unlabeled_images: Sequence[str] = (), parameters: Optional[dict] = None,
                      source: Optional[str] = None) -> str:
    """Write the semi split a trainer uses into its fold folder (``semi_split.json``): the protocol's
    parameters (None: all training cases labeled), the labeled and unlabeled training cases and the extra
    unlabeled images (imagesUn). Returns the path."""
    record = {"parameters": parameters if parameters is not None else {"labeled": "all"},
              "source": source,
              "labeled": sorted(labeled),
              "unlabeled_training_cases": sorted(unlabeled_training_cases),
              "unlabeled_images": sorted(unlabeled_images)}
    path = os.path.join(output_folder, RECORD_FILE)
    write_json(record, path)
    return path
