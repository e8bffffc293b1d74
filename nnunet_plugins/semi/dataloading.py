"""Batches of L labeled + U unlabeled patches, both through nnU-Net's own sampling and augmentation.

:func:`get_semi_dataloaders` is what a semi-supervised trainer calls instead of
``nnUNetTrainer.get_dataloaders``. It builds the same pieces nnU-Net builds (the trainer's
``get_training_transforms`` / ``get_validation_transforms`` with the same arguments, the trainer's dataset
class, ``nnUNetDataLoader``, ``SingleThreadedAugmenter`` or ``NonDetMultiThreadedAugmenter`` depending on
``nnUNet_n_proc_DA``) twice:

* labeled stream: the fold's labeled training cases (all of them, or those ``splits_semi.json`` keeps
  labeled), batch size L, nnU-Net's foreground oversampling;
* unlabeled stream: the fold's training cases that ``splits_semi.json`` marks unlabeled plus the
  preprocessed ``imagesUn`` cases (``<data_identifier>_unlabeled``, see :mod:`nnunet_plugins.semi.preprocess`),
  batch size U, patches drawn uniformly (no foreground oversampling: it would need the labels).

Each train batch is ``{'data', 'target', 'keys', 'labeled'}``: the L labeled samples first, then the U
unlabeled ones; ``labeled`` is a bool tensor (L x True, U x False); ``target`` has nnU-Net's structure (a
list per deep-supervision scale, or one tensor) and its unlabeled entries are :data:`UNLABELED_TARGET` (-1)
everywhere, a value no loss accepts as a class (cross-entropy and one-hot encodings fail on it), so an
unlabeled sample's target cannot be used by accident. (Region-based datasets have boolean targets; there the
batch target becomes int8, 0/1 for labeled samples, which nnU-Net's region losses accept.)

Labels of unlabeled cases never reach a batch: an unlabeled case's segmentation is replaced, before
cropping, by nnU-Net's dummy of a case without labels (-1 outside the nonzero region, 0 inside; this is
what ``MaskImageTransform`` needs to give the image the treatment nnU-Net gives it), and its
``class_locations`` (derived from labels) are dropped. Note that nnU-Net's preprocessing marks with -1 only
voxels outside the nonzero region that are also labeled background, so for a training case with
foreground outside its nonzero region that -1 region would carry a trace of the label; this does not occur
for images whose nonzero region covers the foreground (any normal scan).

The validation iterator is nnU-Net's (labeled validation cases, validation transforms), batch L + U, with
``labeled`` all True.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import numpy as np
import torch

from nnunet_plugins.semi.preprocess import unlabeled_preprocessed_folder
from nnunet_plugins.training.augmentation import nnunet_transforms
from nnunet_plugins.semi.split import load_semi_split

#: the target value of every voxel of an unlabeled sample (never a class index)
UNLABELED_TARGET = -1
DEFAULT_LABELED_BATCH = 2
DEFAULT_UNLABELED_BATCH = 2


class _LabelFreeSeg:
    """A case's segmentation seen without its labels: -1 where nnU-Net marked "outside the nonzero region",
    0 elsewhere. Sliced lazily, like the (memory-mapped) array it wraps."""

    def __init__(self, seg):
        self._seg = seg
        self.shape = tuple(seg.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(np.int16)

    def __getitem__(self, item):
        return np.where(np.asarray(self._seg[item]) < 0, -1, 0).astype(np.int16)

    def __array__(self, dtype=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class UnlabeledDataset:
    """nnU-Net's dataset interface (``identifiers``, ``load_case``) over several nnU-Net datasets whose
    cases are all used without labels (see the module docstring)."""

    def __init__(self, datasets: Sequence):
        self._owner = {}
        for ds in datasets:
            for identifier in ds.identifiers:
                if identifier in self._owner:
                    raise ValueError(f"unlabeled case {identifier!r} appears in two sources "
                                     f"({self._owner[identifier].source_folder}, {ds.source_folder})")
                self._owner[identifier] = ds
        self.identifiers = sorted(self._owner)

    def __len__(self):
        return len(self.identifiers)

    def load_case(self, identifier):
        data, seg, _seg_prev, properties = self._owner[identifier].load_case(identifier)
        properties = {k: v for k, v in properties.items() if k != "class_locations"}
        properties["class_locations"] = None
        return data, _LabelFreeSeg(seg), None, properties


def _unlabeled_loader(dataset, batch_size, patch_size, final_patch_size, label_manager, transforms):
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    loader = nnUNetDataLoader(dataset, batch_size, patch_size, final_patch_size, label_manager,
                              oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                              transforms=transforms, probabilistic_oversampling=False)
    # with an ignore label nnU-Net samples annotated voxels from class_locations: unlabeled patches are uniform
    loader.has_ignore = False
    return loader


class SemiBatchIterator:
    """Joins a labeled and an unlabeled nnU-Net augmenter into L + U batches (see the module docstring).

    Other tensor entries of the labeled batch (e.g. a multi-task loader's ``task_id``) are joined with the
    unlabeled batch's entry of that name, or with -1 (unknown) where the unlabeled loader has none.
    ``draw_unlabeled = False`` (a trainer's labeled-only phase) returns labeled batches without drawing
    unlabeled ones.
    """

    def __init__(self, labeled, unlabeled=None):
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.draw_unlabeled = True

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        lab = next(self.labeled)
        n_lab = lab["data"].shape[0]
        if self.unlabeled is None or not self.draw_unlabeled:
            lab["labeled"] = torch.ones(n_lab, dtype=torch.bool)
            lab["keys"] = list(lab["keys"])
            return lab
        un = next(self.unlabeled)
        n_un = un["data"].shape[0]

        def join(t_lab, t_un):
            if t_lab.dtype == torch.bool:  # region targets: -1 needs a signed type (nnU-Net's losses take int8)
                t_lab = t_lab.to(torch.int8)
            return torch.cat([t_lab, torch.full(t_un.shape, UNLABELED_TARGET, dtype=t_lab.dtype)])

        target = [join(a, b) for a, b in zip(lab["target"], un["target"])] if isinstance(lab["target"], list) \
            else join(lab["target"], un["target"])
        joined = {"data": torch.cat([lab["data"], un["data"]]), "target": target,
                  "keys": list(lab["keys"]) + list(un["keys"]),
                  "labeled": torch.cat([torch.ones(n_lab, dtype=torch.bool), torch.zeros(n_un, dtype=torch.bool)])}
        for key, value in lab.items():
            if key not in joined and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n_lab:
                other = un.get(key)
                if not (torch.is_tensor(other) and other.shape[1:] == value.shape[1:] and other.shape[0] == n_un):
                    other = torch.full((n_un, *value.shape[1:]), -1, dtype=value.dtype)
                joined[key] = torch.cat([value, other.to(value.dtype)])
        return joined

    next = __next__

    def _finish(self):  # nnUNetTrainer.on_train_end calls this on its loaders
        for it in (self.labeled, self.unlabeled):
            if it is not None and hasattr(it, "_finish"):
                it._finish()


def finish_semi_loaders(*loaders) -> None:
    """Shut down the worker processes of the semi iterators among ``loaders`` (a trainer's ``on_train_end``:
    nnU-Net's own only knows its augmenter classes, and each semi iterator wraps two), without their prints."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        for loader in loaders:
            if isinstance(loader, SemiBatchIterator):
                loader._finish()


def _augmenter(loader, num_processes: int, pin_memory: bool, num_cached: int):
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=num_processes,
                                        num_cached=num_cached, seeds=None, pin_memory=pin_memory, wait_time=0.002)


def semi_datasets(trainer, tr_keys: Sequence[str]):
    """(labeled dataset, unlabeled dataset or None, semi-split entry or None, imagesUn identifiers) of the
    trainer's fold."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    entry = load_semi_split(trainer.preprocessed_dataset_folder_base, trainer.fold, tr_keys) \
        if trainer.fold != "all" else None
    labeled_keys = list(entry["labeled"]) if entry else list(tr_keys)
    unlabeled_keys = list(entry["unlabeled"]) if entry else []
    dataset_lab = trainer.dataset_class(trainer.preprocessed_dataset_folder, labeled_keys,
                                        folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    sources = []
    if unlabeled_keys:
        sources.append(trainer.dataset_class(trainer.preprocessed_dataset_folder, unlabeled_keys))
    un_folder = unlabeled_preprocessed_folder(trainer.preprocessed_dataset_folder_base,
                                              trainer.configuration_manager.data_identifier)
    extra: List[str] = []
    if os.path.isdir(un_folder) and any(f.endswith(".pkl") for f in os.listdir(un_folder)):
        cls = infer_dataset_class(un_folder)
        extra = sorted(i for i in cls.get_identifiers(un_folder) if not i.startswith("."))
        sources.append(cls(un_folder, extra))
    if sources and trainer.is_cascaded:
        raise ValueError("semi-supervised training of a cascade stage is not supported (unlabeled cases have no "
                         "previous-stage segmentation)")
    return dataset_lab, (UnlabeledDataset(sources) if sources else None), entry, extra


def get_semi_dataloaders(trainer, labeled_batch_size: int = DEFAULT_LABELED_BATCH,
                         unlabeled_batch_size: int = DEFAULT_UNLABELED_BATCH, require_unlabeled: bool = True,
                         labeled_loader=None):
    """(train iterator of L + U batches, validation iterator) for an ``nnUNetTrainer`` (see module docstring).

    Reads everything from the trainer as ``nnUNetTrainer.get_dataloaders`` does. ``labeled_loader``
    (optional) builds the labeled training and the validation loader in place of ``nnUNetDataLoader``:
    ``labeled_loader(dataset, batch_size, patch_size, final_patch_size, transforms, train)``, e.g. a
    multi-task trainer's task-balanced loader (its extra batch entries such as ``task_id`` are kept). Also sets
    ``trainer.semi_data`` = {"labeled", "unlabeled_training_cases", "unlabeled_images", "parameters",
    "source"} for :func:`nnunet_plugins.semi.split.record_semi_split`.
    """
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    if labeled_batch_size < 1 or unlabeled_batch_size < 0:
        raise ValueError(f"need L >= 1 labeled and U >= 0 unlabeled samples per batch, got {labeled_batch_size}, "
                         f"{unlabeled_batch_size}")
    if trainer.dataset_class is None:
        trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    transforms = nnunet_transforms(trainer)
    patch_size, initial_patch_size = transforms.patch_size, transforms.initial_patch_size
    lm = trainer.label_manager

    tr_keys, val_keys = trainer.do_split()
    dataset_lab, dataset_un, entry, extra = semi_datasets(trainer, tr_keys)
    if unlabeled_batch_size > 0 and dataset_un is None and require_unlabeled:
        raise ValueError(f"no unlabeled data for {trainer.plans_manager.dataset_name} fold {trainer.fold}: add "
                         f"imagesUn and run `nnunet-plugins semi preprocess`, or run `nnunet-plugins semi split`")
    if dataset_un is None:
        unlabeled_batch_size = 0
    dataset_val = trainer.dataset_class(trainer.preprocessed_dataset_folder, val_keys,
                                        folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    trainer.semi_data = {"labeled": list(dataset_lab.identifiers),
                         "unlabeled_training_cases": list(entry["unlabeled"]) if entry else [],
                         "unlabeled_images": extra,
                         "parameters": entry["parameters"] if entry else None,
                         "source": entry["file"] if entry else None}

    if labeled_loader is None:
        def labeled_loader(dataset, batch_size, patch, final_patch, transforms_, train):
            return nnUNetDataLoader(dataset, batch_size, patch, final_patch, lm,
                                    oversample_foreground_percent=trainer.oversample_foreground_percent,
                                    sampling_probabilities=None, pad_sides=None, transforms=transforms_,
                                    probabilistic_oversampling=trainer.probabilistic_oversampling)
    dl_lab = labeled_loader(dataset_lab, labeled_batch_size, initial_patch_size, patch_size, transforms.train, True)
    dl_un = _unlabeled_loader(dataset_un, unlabeled_batch_size, initial_patch_size, patch_size, lm, transforms.train) \
        if unlabeled_batch_size > 0 else None
    dl_val = labeled_loader(dataset_val, labeled_batch_size + unlabeled_batch_size, patch_size, patch_size,
                            transforms.val, False)

    n = get_allowed_n_proc_DA()
    pin = trainer.device.type == "cuda"
    if n == 0:
        n_lab = n_un = n_val = 0
    else:  # nnU-Net's budget, shared by the two training streams
        n_un = n // 2 if dl_un is not None and n > 1 else (1 if dl_un is not None else 0)
        n_lab = max(1, n - n_un)
        n_val = max(1, n // 2)
    train = SemiBatchIterator(_augmenter(dl_lab, n_lab, pin, max(6, n_lab // 2)),
                              _augmenter(dl_un, n_un, pin, max(6, n_un // 2)) if dl_un is not None else None)
    val = SemiBatchIterator(_augmenter(dl_val, n_val, pin, max(3, n // 4)))
    _ = next(train)  # as nnU-Net: start the workers and fail early
    _ = next(val)
    return train, val
