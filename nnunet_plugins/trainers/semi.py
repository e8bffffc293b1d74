"""``SemiSupervisedTrainer``: the base of every semi-supervised method (LeFeD, VerSemi, ...).

nnU-Net trains on labeled cases only. This trainer replaces its training batches by L labeled + U
unlabeled patches (:func:`nnunet_plugins.semi.dataloading.get_semi_dataloaders`: nnU-Net's sampling and
augmentation for both streams, worker processes as ``nnUNet_n_proc_DA`` says) and splits the loss into two
hooks. Everything else is nnU-Net's: plans, network, validation, checkpoints, ``--c``, ``--val``, DDP and
``nnUNetv2_predict -tr <subclass>``.

Where the unlabeled data come from (see :mod:`nnunet_plugins.semi`):

* ``imagesUn/`` of the raw dataset, preprocessed by ``nnunet-plugins semi preprocess -d D``;
* the labeled-fraction protocol, ``nnunet-plugins semi split -d D --labeled N|P%``: of the fold's training
  cases only N keep their labels, the others are used as unlabeled images (validation cases untouched).

Without ``splits_semi.json`` all training cases of the fold are labeled; with ``require_unlabeled`` (default)
a fold without any unlabeled image is an error naming the dataset.

API (stable: subclasses and other helpers build on it)
------------------------------------------------------
Class attributes (tiny subclasses change them, as nnU-Net's ``nnUNetTrainer_250epochs``):

``labeled_batch_size`` (L, default 2) / ``unlabeled_batch_size`` (U, default 2)
    samples per training batch and per process (under DDP each rank draws its own L + U, as nnU-Net's
    per-rank batch); ``self.batch_size`` is set to L + U.
``unlabeled_loss_weight`` (default 1.0)
    weight of the unlabeled loss in the total.
``require_unlabeled`` (default True)
    fail when the fold has no unlabeled image (False: train on labeled batches alone).

Training batches are ``{'data', 'target', 'keys', 'labeled'}``: the L labeled samples first, then the U
unlabeled ones; ``labeled`` is a bool tensor on the device; unlabeled targets are -1 everywhere
(:data:`~nnunet_plugins.semi.dataloading.UNLABELED_TARGET`). Validation batches are nnU-Net's with
``labeled`` all True.

Hooks (besides :class:`~nnunet_plugins.trainers.base.PluginTrainer`'s ``forward``, ``online_evaluation``,
``optimizer_step``):

``labeled_loss(output, batch) -> (loss, log)``
    the supervised loss; ``output`` and ``batch`` hold the LABELED samples only (:meth:`labeled_part`
    selects them in tensors and in lists / tuples of tensors, e.g. deep-supervision outputs and targets).
    Default: nnU-Net's ``self.loss`` (Dice + CE, deep supervision).
``unlabeled_loss(output, batch) -> (loss, log)``
    the loss that learns from images without labels; ``output`` and ``batch`` hold ALL samples (consistency
    losses are usually taken on every sample; select ``~batch['labeled']`` for an unlabeled-only loss) and
    ``batch`` has no ``'target'`` key, so no label can leak into it. Default: none (zero).
``compute_loss(output, batch)``
    ``labeled_loss + unlabeled_loss_weight * unlabeled_loss``, logging both as ``labeled_loss`` /
    ``unlabeled_loss`` (plus the hooks' own entries). Methods with several passes per batch set the base's
    ``passes_per_iteration`` and carry state between passes with its ``next_pass`` hook, as ``LeFeDTrainer``
    does.

At the start of training the trainer writes the semi split it uses into its fold folder
(``semi_split.json``: protocol parameters, labeled cases, unlabeled training cases, imagesUn cases; see
:func:`nnunet_plugins.semi.split.record_semi_split`); at the end it shuts down both loader streams.
"""
from __future__ import annotations

import torch

from nnunet_plugins.semi.dataloading import (DEFAULT_LABELED_BATCH, DEFAULT_UNLABELED_BATCH, finish_semi_loaders,
                                             get_semi_dataloaders)
from nnunet_plugins.semi.split import record_semi_split
from nnunet_plugins.trainers.base import PluginTrainer


def select_samples(value, mask: torch.Tensor):
    """``value`` (a tensor, or a list / tuple of tensors, nested) restricted to the samples where ``mask``."""
    if torch.is_tensor(value):
        return value[mask]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple outputs
        return type(value)(*(select_samples(v, mask) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(select_samples(v, mask) for v in value)
    raise TypeError(f"cannot select samples of a {type(value).__name__}")


class SemiSupervisedTrainer(PluginTrainer):
    """Base trainer of semi-supervised methods (see the module docstring for the API)."""

    labeled_batch_size: int = DEFAULT_LABELED_BATCH
    unlabeled_batch_size: int = DEFAULT_UNLABELED_BATCH
    unlabeled_loss_weight: float = 1.0
    require_unlabeled: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if int(self.labeled_batch_size) < 1 or int(self.unlabeled_batch_size) < 0:
            raise ValueError(f"{type(self).__name__}: need labeled_batch_size >= 1 and unlabeled_batch_size >= 0, "
                             f"got {self.labeled_batch_size}, {self.unlabeled_batch_size}")
        self.batch_size = int(self.labeled_batch_size) + int(self.unlabeled_batch_size)
        self.semi_data = None

    def _set_batch_size_and_oversample(self):
        # nnU-Net splits the plans' batch over the DDP ranks here; a semi-supervised batch is L + U per process
        # (each rank draws its own, with nnU-Net's foreground oversampling of the L labeled patches)
        self.batch_size = int(self.labeled_batch_size) + int(self.unlabeled_batch_size)

    # ---- data --------------------------------------------------------------------------------------
    def get_dataloaders(self):
        train, val = get_semi_dataloaders(self, int(self.labeled_batch_size), int(self.unlabeled_batch_size),
                                          require_unlabeled=self.require_unlabeled)
        d = self.semi_data
        self.print_to_log_file(f"semi-supervised batches: {self.labeled_batch_size} labeled + "
                               f"{self.unlabeled_batch_size if train.unlabeled is not None else 0} unlabeled; "
                               f"{len(d['labeled'])} labeled cases, {len(d['unlabeled_training_cases'])} unlabeled "
                               f"training cases, {len(d['unlabeled_images'])} imagesUn cases")
        return train, val

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0 and self.semi_data is not None:
            record_semi_split(self.output_folder, **self.semi_data)

    def on_train_end(self):
        super().on_train_end()
        finish_semi_loaders(self.dataloader_train, self.dataloader_val)

    # ---- losses ------------------------------------------------------------------------------------
    @staticmethod
    def labeled_part(output, batch: dict):
        """(output, batch) restricted to the labeled samples (``batch['labeled']``)."""
        mask = batch["labeled"]
        if bool(mask.all()):
            return output, batch
        part = {k: (select_samples(v, mask) if k in ("data", "target", "labeled") else v) for k, v in batch.items()}
        if "keys" in batch:
            part["keys"] = [k for k, m in zip(batch["keys"], mask.tolist()) if m]
        return select_samples(output, mask), part

    def labeled_loss(self, output, batch: dict) -> tuple[torch.Tensor, dict]:
        """Hook: supervised loss on the labeled samples (default nnU-Net's ``self.loss``)."""
        return self.loss(output, batch["target"]), {}

    def unlabeled_loss(self, output, batch: dict) -> tuple[torch.Tensor, dict]:
        """Hook: loss without labels on all samples (``batch`` has no target). Default: none."""
        return None, {}

    def compute_loss(self, output, batch: dict) -> tuple[torch.Tensor, dict]:
        sup, log = self.labeled_loss(*self.labeled_part(output, batch))
        unsup, log_un = self.unlabeled_loss(output, {k: v for k, v in batch.items() if k != "target"})
        log = {"labeled_loss": sup.detach(), **log, **log_un}
        if unsup is None:
            return sup, log
        log["unlabeled_loss"] = unsup.detach()
        return sup + self.unlabeled_loss_weight * unsup, log


class LabeledOnlyTrainer(SemiSupervisedTrainer):
    """nnU-Net's default training on the labeled cases of the semi split only (batches of L labeled patches,
    nnU-Net's loss, no unlabeled data): the supervised lower bound semi-supervised papers report, trained on
    exactly the cases a semi-supervised trainer keeps labeled (``nnUNetv2_train D 3d_fullres 0 -tr
    LabeledOnlyTrainer``)."""

    unlabeled_batch_size = 0
    require_unlabeled = False
