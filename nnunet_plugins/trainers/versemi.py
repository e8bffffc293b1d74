"""VerSemiTrainer: VerSemi (Zeng, Xie, Lu et al., TMI 2025) trained by nnU-Net v2: multi-task AND semi-supervised.

One network for several partially labelled datasets (a combined dataset, ``nnunet-plugins combine``),
each source with a labeled fraction and unlabeled images; the task prompt selects a dataset's structures
and one extra SYNTHETIC task (id T) segments the union of the foregrounds of CutMix-ed images.

Pieces reused, not copied:

* network: :class:`~nnunet_plugins.architectures.versemi.VerSemiUNet` (the plans' U-Net + controller +
  dynamic head 8 -> 8 -> 8 -> classes); plans naming ``VerSemiVNet`` are not supported by this trainer;
* multi-task: :class:`~nnunet_plugins.trainers.multitask.MultiTaskTrainer` (task tables, per-task
  channels, partial-label Dice + CE, per-task validation, ``predict-multitask`` / ``export-multitask``;
  the stock ``nnUNetv2_predict`` fails with the multi-task networks' message); its task-balanced loader
  with ``tasks_per_batch = 2``: the first half of a batch is one task draw, the second half another, so the
  halves that CutMix pairs usually come from different datasets, as the official loader's shuffle of all
  datasets gives;
* unlabeled data: :func:`nnunet_plugins.semi.dataloading.get_semi_dataloaders` (the fold's labeled cases or
  the labeled fraction of ``splits_semi.json``, plus unlabeled training cases and preprocessed ``imagesUn``);
  unlabeled targets are -1 and never read (only ``target[:L]`` enters a loss);
* CutMix and the loss terms: :mod:`nnunet_plugins.training.cutmix`, :mod:`nnunet_plugins.training.versemi`.

Stages (methods.md; official ``train.py``): stage 1 (epochs ``< stage2_start_epoch``; labeled only,
r = 2/3) and stage 2 (r ~ U(0.3, 0.6), one r per batch and mix as official). ``stage2_start_epoch`` is a
trainer attribute (None: half of ``num_epochs``; environment ``NNUNET_PLUGINS_VERSEMI_STAGE2_EPOCH``
overrides it for shortened runs). The stage follows ``current_epoch``, so ``--c`` resumes in the right
stage. The official script runs stage 1 only (stage 2 is commented out): ``official_stage1_only = True``
(subclass ``VerSemiTrainer_stage1only``) reproduces that and needs no unlabeled data.

Each step is ONE forward pass of the concatenated inputs with per-sample task ids (nnU-Net's U-Net uses
instance norm, so this equals separate passes; DDP sees one forward / backward):
stage 1: [labeled (L), mix (P) x {synthetic, task A, task B}]; stage 2: [labeled (L), labeled-labeled mix
(P) x synthetic, unlabeled-labeled mix (L) x {synthetic, task 0 .. T-1}], P = L // 2 pairs (first half
with second half; a batch of one sample, e.g. DDP with one sample per rank, mixes the sample with itself).
The CutMix terms use every deep-supervision output with nnU-Net's weights (the box resampled to each
scale as nnU-Net resamples the targets).

Optimisation (official): Adam lr 1e-3, betas (0.5, 0.999), no weight decay, constant learning rate; nnU-Net's epochs,
iterations, gradient clipping (12) and augmentation. Batch: the plans' batch size of labeled patches (the
official 8) plus as many unlabeled patches in stage 2 (official 8 + 8).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_plugins.architectures.versemi import VerSemiUNet
from nnunet_plugins.semi.dataloading import finish_semi_loaders, get_semi_dataloaders
from nnunet_plugins.semi.split import record_semi_split
from nnunet_plugins.trainers.multitask import MultiTaskTrainer
from nnunet_plugins.training.cutmix import cutmix, draw_cubes, mask_at_scale, source_targets
from nnunet_plugins.training.versemi import (
    SYNTHETIC_CLASSES, consistency_loss, labeled_cube_loss, source_terms_loss, synthetic_union_loss,
)

STAGE2_EPOCH_VARIABLE = "NNUNET_PLUGINS_VERSEMI_STAGE2_EPOCH"


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


class VerSemiTrainer(MultiTaskTrainer):
    """VerSemi (see the module docstring): stage 1 then stage 2, Adam 1e-3 (0.5, 0.999)."""

    network_class = VerSemiUNet
    tasks_per_batch = 2
    #: CutMix box ratio r of stage 1 (official --mask_ratio 2/3) and the range of stage 2 (official U(0.3, 0.6))
    stage1_ratio: float = 2.0 / 3.0
    stage2_ratio: tuple = (0.3, 0.6)
    #: first epoch of stage 2 (None: num_epochs // 2)
    stage2_start_epoch: int | None = None
    #: the official script: stage 1 only (no unlabeled data)
    official_stage1_only: bool = False
    #: unlabeled patches per stage-2 batch (None: the labeled batch size; the UL mix pairs them one to one)
    unlabeled_batch_size: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3
        self.adam_betas = (0.5, 0.999)
        self.weight_decay = 0.0   # official: Adam without weight decay (nnU-Net's default would be 3e-5)
        raw = os.environ.get(STAGE2_EPOCH_VARIABLE, "").strip()
        if raw:
            if not raw.isdigit():
                raise ValueError(f"{STAGE2_EPOCH_VARIABLE} must be a non-negative integer, got {raw!r}")
            self.stage2_start_epoch = int(raw)
        elif self.stage2_start_epoch is None:
            self.stage2_start_epoch = self.num_epochs // 2
        self.synthetic_task = self.task_spec.num_tasks
        self._one_sample_warned = False

    # ---- optimiser ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, betas=self.adam_betas,
                                     weight_decay=self.weight_decay)
        # official: constant learning rate (poly with exponent 0, stepped per epoch like nnU-Net's)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    # ---- stages ------------------------------------------------------------------------------------
    @property
    def stage(self) -> int:
        if self.official_stage1_only or self.current_epoch < self.stage2_start_epoch:
            return 1
        return 2

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if hasattr(self.dataloader_train, "draw_unlabeled"):
            self.dataloader_train.draw_unlabeled = self.stage == 2
        self.print_to_log_file(f"VerSemi stage {self.stage}" + (" (labeled only)" if self.stage == 1 else
                                                                " (semi-supervised)"))

    def on_train_epoch_end(self, train_outputs: list):
        # nnU-Net logs the total loss only: the stage's terms go to the log file (means over the epoch)
        names = [k for k in (train_outputs[0] if train_outputs else {}) if k.endswith("_loss")]
        if names:
            means = {k: float(np.mean([float(o[k]) for o in train_outputs])) for k in names}
            self.print_to_log_file("VerSemi terms: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        super().on_train_epoch_end(train_outputs)

    # ---- data --------------------------------------------------------------------------------------
    def get_dataloaders(self):
        def loader(dataset, batch_size, patch, final_patch, transforms, train):
            return self.build_dataloader(dataset, patch, final_patch, transforms, batch_size=batch_size,
                                         tasks_per_batch=self.tasks_per_batch if train else 1)

        unlabeled = 0 if self.official_stage1_only else (self.unlabeled_batch_size or self.batch_size)
        train, val = get_semi_dataloaders(self, self.batch_size, unlabeled,
                                          require_unlabeled=not self.official_stage1_only, labeled_loader=loader)
        train.draw_unlabeled = self.stage == 2
        if self.local_rank == 0:
            record_semi_split(self.output_folder, **self.semi_data)
        return train, val

    def on_train_end(self):
        super().on_train_end()
        finish_semi_loaders(self.dataloader_train, self.dataloader_val)

    # ---- forward / loss ----------------------------------------------------------------------------
    def _num_classes(self, task_id: torch.Tensor) -> torch.Tensor:
        counts = torch.as_tensor([t.num_classes for t in self.task_spec.tasks] + [SYNTHETIC_CLASSES],
                                 device=task_id.device)
        return counts[task_id]

    def _pairs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (a, b) of the labeled-labeled mix: first half with second half (official)."""
        if n == 1:
            if not self._one_sample_warned:
                self.print_to_log_file("VerSemi: one labeled sample per step; it is mixed with itself")
                self._one_sample_warned = True
            return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        p = n // 2
        return torch.arange(p), torch.arange(p, 2 * p)

    def forward(self, batch: dict):
        if not self.network.training:   # validation: the task-prompted prediction only
            return super().forward(batch)
        labeled = batch.get("labeled")
        n_lab = int(labeled.sum()) if labeled is not None else batch["data"].shape[0]
        if labeled is not None and not bool(labeled[:n_lab].all()):
            raise ValueError("semi batches must hold the labeled samples first")
        data, task = batch["data"], batch["task_id"]
        x_lab, t_lab = data[:n_lab], task[:n_lab]
        seg = _as_list(batch["target"])[0][:n_lab]      # full-resolution labels of the labeled samples only
        ia, ib = (i.to(data.device) for i in self._pairs(n_lab))
        stage = self.stage
        ratio = self.stage1_ratio if stage == 1 else self.stage2_ratio
        spatial = data.shape[2:]
        inside = draw_cubes(len(ia), spatial, ratio, device=data.device).mask(spatial)
        mix = cutmix(x_lab[ia], x_lab[ib], inside)
        syn = torch.full((len(ia),), self.synthetic_task, dtype=torch.long, device=data.device)
        inputs, tasks = [x_lab, mix], [t_lab, syn]
        if stage == 1:
            inputs += [mix, mix]
            tasks += [t_lab[ia], t_lab[ib]]
        mixes = {"inside": inside, "a": ia, "b": ib}
        n_un = data.shape[0] - n_lab
        if stage == 2:
            if n_un == 0:
                raise RuntimeError("VerSemi stage 2 got a batch without unlabeled samples (is the loader "
                                   "drawing them? see get_dataloaders)")
            x_un = data[n_lab:]
            k = min(n_un, n_lab)   # official: equal unlabeled and labeled batches, paired one to one
            inside_ul = draw_cubes(k, spatial, self.stage2_ratio, device=data.device).mask(spatial)
            mix_ul = cutmix(x_un[:k], x_lab[:k], inside_ul)   # unlabeled outside the box, labeled inside
            for t in [self.synthetic_task] + list(range(self.task_spec.num_tasks)):
                inputs.append(mix_ul)
                tasks.append(torch.full((k,), t, dtype=torch.long, device=data.device))
            mixes.update(inside_ul=inside_ul, k=k)
        sizes = [len(t) for t in tasks]
        out = self.network(torch.cat(inputs), torch.cat(tasks))
        parts = [list(o.split(sizes)) for o in _as_list(out)]   # per scale: one tensor per group
        return {"stage": stage, "parts": parts, "is_list": isinstance(out, (list, tuple)), "n_lab": n_lab,
                "mixes": mixes, "seg": seg}

    def _scale_weights(self, n: int) -> list:
        if isinstance(self.loss, DeepSupervisionWrapper) and self.loss.weight_factors is not None:
            w = list(self.loss.weight_factors)[:n]
        else:
            w = [1.0] * n
        return w

    def compute_loss(self, output, batch: dict):
        if not isinstance(output, dict):   # validation
            return super().compute_loss(output, batch)
        n_lab, stage, parts, mixes = output["n_lab"], output["stage"], output["parts"], output["mixes"]
        targets = [t[:n_lab] for t in _as_list(batch["target"])]     # unlabeled targets never read
        task = batch["task_id"][:n_lab]
        lab_out = [p[0] for p in parts]
        supervised = super().compute_loss(lab_out if output["is_list"] else lab_out[0],
                                          {"target": targets if output["is_list"] else targets[0], "task_id": task})[0]
        ia, ib, inside = mixes["a"], mixes["b"], mixes["inside"]
        ta, tb = task[ia], task[ib]
        weights = self._scale_weights(len(parts))
        union = torch.zeros((), device=lab_out[0].device)
        spec = torch.zeros_like(union)
        cons = torch.zeros_like(union)
        cube = torch.zeros_like(union)
        for w, p, seg in zip(weights, parts, targets):
            if w == 0:
                continue
            m = mask_at_scale(inside, seg.shape[2:])
            union = union + w * synthetic_union_loss(p[1], seg[ia], seg[ib], m)
            if stage == 1:
                y_a, y_b = source_targets(seg[ia], seg[ib], m, ta, tb)
                mapper = self.task_label_mapper
                spec = spec + w * source_terms_loss(p[2], p[3], mapper.to_local_per_sample(y_a, ta),
                                                    mapper.to_local_per_sample(y_b, tb), self._num_classes(ta),
                                                    self._num_classes(tb))
            else:
                k = mixes["k"]
                m_ul = mask_at_scale(mixes["inside_ul"], seg.shape[2:])
                counts = [t.num_classes for t in self.task_spec.tasks]
                cons = cons + w * consistency_loss(p[2], p[3:], counts)
                cube = cube + w * labeled_cube_loss(p[2], seg[:k], m_ul)
        total_w = sum(weights)
        union, spec, cons, cube = (v / total_w for v in (union, spec, cons, cube))
        if stage == 1:
            return supervised + union + spec, {"sup_loss": supervised, "union_loss": union, "source_loss": spec}
        return supervised + union + cons + cube, {"sup_loss": supervised, "union_loss": union,
                                                  "consistency_loss": cons, "cube_loss": cube}


class VerSemiTrainer_stage1only(VerSemiTrainer):
    """The official script: stage 1 (labeled data, r = 2/3) for the whole run; no unlabeled data needed."""

    official_stage1_only = True
