"""MedSeqFT's trainers: one stage of sequential fine-tuning on nnU-Net's training loop.

Paper: Y. Ye, Y. Wu, X. Luo et al. "MedSeqFT: Sequential Fine-tuning Foundation Models for 3D Medical Image
Segmentation", 2025 (no official code). The procedure, the options and their defaults are in
:mod:`nnunet_plugins.training.medseqft`; the network (plans U-Net, one segmentation head per task) in
:mod:`nnunet_plugins.architectures.medseqft`. Stage t of a sequence D_1..D_n (``nnunet-plugins medseqft run``):

* :class:`MedSeqFTTeacherTrainer`: full fine-tuning of M_{t-1} (+ a new head for task t) on D_t -> T_t;
* :class:`MedSeqFTTrainer`: M_{t-1} frozen, LoRA adapters of rank r on its convolutions (the new head,
  copied from T_t, trains fully), loss ``L_seg + lambda KD(student, T_t)`` on D_t batches ``+ mu
  KD(student, M_{t-1})`` on a batch of the buffers B_1..B_{t-1} (every old head); at the end the adapters are
  merged: the model folder's ``checkpoint_final.pth`` is M_t, a plain network that ``nnUNetv2_predict -tr
  MedSeqFTTrainer`` predicts task t with;
* :class:`SequentialFTTrainer`: the baseline, plain sequential fine-tuning (M_t = the fine-tuned M_{t-1}).

All are nnU-Net trainers on :class:`~nnunet_plugins.trainers.base.PluginTrainer`'s hooks (``forward``,
``compute_loss``), nnU-Net's loop, data, augmentation, schedule and checkpoints. What a stage needs beyond
the plans (M_{t-1}, T_t, the buffers, the options) is a :class:`StageContext` given with ``set_stage``
before ``initialize``; the task list goes into the plans (``plans["medseqft"]``) that nnU-Net copies into
the model folder, so prediction builds the network with every head. Without a stage the trainers refuse
to train (``nnUNetv2_train -tr MedSeqFTTrainer`` alone has no M_{t-1} to start from); they also refuse DDP
and torch.compile: the student's network is edited (adapters added) after nnU-Net builds it.

Checkpoints are written atomically; ``checkpoint_latest.pth`` of the student holds the adapters (``--c``
continues the LoRA training), ``checkpoint_best.pth`` and ``checkpoint_final.pth`` hold merged, plain weights.

Masked-reconstruction training (:func:`train_reconstruction`): pre-training of M_0 on the images of several
datasets and the brief head-only training for ``--init`` checkpoints without a reconstruction head. Random
patches of the preprocessed cases (nnU-Net's data loader, no augmentation, labels unused), AdamW.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_plugins.architectures.blocks.lora import add_lora, lora_parameters, merge_lora
from nnunet_plugins.architectures.medseqft import MedSeqFTNetwork, TaskHeads, head_prefix, load_previous_model
from nnunet_plugins.atomic import atomic_output, torch_save
from nnunet_plugins.trainers.base import PluginTrainer
from nnunet_plugins.training.feature_capture import capture_inputs, final_decoder_features_module
from nnunet_plugins.training.medseqft import MedSeqFTOptions

__all__ = ["PLANS_KEY", "StageContext", "MedSeqFTTeacherTrainer", "MedSeqFTTrainer", "SequentialFTTrainer",
           "task_outputs", "patch_loader", "train_reconstruction", "load_weights"]

#: the plans entry (copied into the model folder) that lists the tasks of the network
PLANS_KEY = "medseqft"


@dataclass
class StageContext:
    """What stage ``stage`` (1-based) of a sequence needs beyond the plans.

    ``tasks``: one dict per task 1..t (``dataset``, ``num_classes``, ``labels``); ``previous``: checkpoint of
    M_{t-1} (stage 1: M_0, a plain U-Net's checkpoint); ``teacher``: T_t's checkpoint (student only);
    ``buffers``: ``{"task": j (0-based), "folder": preprocessed data folder of D_{j+1}, "case_ids": [...]}``
    for j < t - 1."""
    stage: int
    tasks: list
    previous: str
    options: MedSeqFTOptions = field(default_factory=MedSeqFTOptions)
    teacher: str | None = None
    buffers: list = field(default_factory=list)

    def plans_entry(self) -> dict:
        return {"task_classes": [int(t["num_classes"]) for t in self.tasks],
                "tasks": [{"dataset": t["dataset"], "labels": t["labels"]} for t in self.tasks],
                "stage": int(self.stage)}


def load_weights(path: str) -> dict:
    """``network_weights`` of an nnU-Net checkpoint (error names the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ValueError(f"{path} is not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt["network_weights"]


def task_outputs(network: MedSeqFTNetwork, x: torch.Tensor, tasks: Sequence[int]) -> dict:
    """``{task: output}`` of several heads from ONE pass of the body: the inputs of every decoder stage's
    :class:`TaskHeads` are captured and each task's head applied to them (outputs as the U-Net's: a list,
    highest resolution first, with deep supervision, else the final tensor)."""
    stages = [m for m in network.unet.decoder.seg_layers]
    with capture_inputs(*stages) as features:
        network(x)
    out = {}
    for task in tasks:
        maps = [stage.heads[task](f) for stage, f in zip(stages, features) if f is not None]
        out[task] = maps[::-1] if network.deep_supervision else maps[-1]
    return out


def patch_loader(folder: str, case_ids: Sequence[str] | None, batch_size: int, patch_size: Sequence[int],
                 label_manager) -> Iterator[torch.Tensor]:
    """Endless random patches ``(B, C, *patch)`` of preprocessed cases (nnU-Net's data loader, no
    augmentation; labels unused)."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(folder)(folder, None if case_ids is None else list(case_ids))
    loader = nnUNetDataLoader(dataset, batch_size, patch_size, patch_size, label_manager,
                              oversample_foreground_percent=0.0)
    while True:
        yield torch.as_tensor(np.asarray(next(loader)["data"]), dtype=torch.float32)


class _MedSeqFTStageTrainer(PluginTrainer):
    """Shared: the network with one head per task, the stage context, atomic checkpoints."""

    network_class = MedSeqFTNetwork
    stage: StageContext | None = None

    @classmethod
    def network_context(cls, plans_manager) -> dict:
        entry = plans_manager.plans.get(PLANS_KEY)
        return {"task_classes": list(entry["task_classes"])} if entry else {}

    def set_stage(self, context: StageContext) -> None:
        """Give the stage (before ``initialize``); its task list goes into the plans of the model folder."""
        if context.tasks[-1]["num_classes"] != self.label_manager.num_segmentation_heads:
            raise ValueError(f"stage {context.stage}: task {context.tasks[-1]['dataset']} has "
                             f"{context.tasks[-1]['num_classes']} classes, the dataset "
                             f"{self.label_manager.num_segmentation_heads}")
        self.stage = context
        self.plans_manager.plans[PLANS_KEY] = context.plans_entry()

    def _do_i_compile(self):
        return False   # the network is edited after nnU-Net builds it (heads loaded, adapters added)

    def initialize(self):
        if self.was_initialized:
            return
        if self.stage is None:
            raise RuntimeError(f"{type(self).__name__} trains one stage of a MedSeqFT sequence and needs its "
                               f"previous model: run 'nnunet-plugins medseqft run --init M0 --sequence ...'")
        if self.is_ddp:
            raise RuntimeError(f"{type(self).__name__} does not support DDP (the network is edited after nnU-Net "
                               f"wraps it); train on one device")
        super().initialize()
        self.prepare_stage()
        self.optimizer, self.lr_scheduler = self.configure_optimizers()

    def prepare_stage(self) -> None:
        """Load M_{t-1} into the network (the new task's head keeps its fresh initialisation)."""
        load_previous_model(self.network, load_weights(self.stage.previous), self.stage.stage - 1)

    def configure_optimizers(self):
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        # nnU-Net's SGD and poly schedule, on the parameters that train (LoRA: adapters + the new head)
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def save_checkpoint(self, filename: str) -> None:
        # atomic: a kill leaves the previous checkpoint or none, never a truncated one
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        with atomic_output(filename) as tmp:
            super().save_checkpoint(tmp)


class MedSeqFTTeacherTrainer(_MedSeqFTStageTrainer):
    """K&G RFT step 1: full fine-tuning of M_{t-1} with a new head on D_t (nnU-Net's loss) -> T_t."""


class SequentialFTTrainer(MedSeqFTTeacherTrainer):
    """Baseline: plain sequential fine-tuning, M_t = M_{t-1} fully fine-tuned on D_t (same network, same heads)."""


class MedSeqFTTrainer(_MedSeqFTStageTrainer):
    """K&G RFT steps 2-3: LoRA student distilled from T_t (D_t) and M_{t-1} (buffers), merged into M_t."""

    teacher: nn.Module | None = None
    reference: nn.Module | None = None
    #: learning rate of the adapters and the new head (AdamW; see configure_optimizers); a class attribute, as
    #: nnU-Net's initial_lr, for variants
    lora_lr: float = 5e-3

    def _frozen_copy(self, state: dict | None = None) -> nn.Module:
        net = copy.deepcopy(self.network)
        if state is not None:
            net.load_state_dict(state)
        net.eval()
        net.requires_grad_(False)
        return net

    def prepare_stage(self) -> None:
        super().prepare_stage()
        ctx, opts = self.stage, self.stage.options
        if ctx.teacher is None:
            raise RuntimeError(f"stage {ctx.stage}: the student needs the teacher's checkpoint")
        new = ctx.stage - 1
        self.teacher = self._frozen_copy(load_weights(ctx.teacher))
        with torch.no_grad():   # the new head starts as the teacher's (M_{t-1} has nothing to keep there)
            for own, taught in zip(self.network.task_heads, self.teacher.task_heads):
                own.heads[new].load_state_dict(taught.heads[new].state_dict())
        self.reference = self._frozen_copy() if ctx.buffers else None          # M_{t-1}
        add_lora(self.network, opts.rank, opts.lora_alpha, exclude=[head_prefix(new)])
        for stage in self.network.task_heads:
            stage.heads[new].requires_grad_(True)
        self.kd = opts.kd_loss(None if opts.kd == "features_mse" else getattr(self.loss, "weight_factors", None))
        self._buffer_loaders = [patch_loader(b["folder"], b["case_ids"], self.batch_size,
                                             self.configuration_manager.patch_size, self.label_manager)
                                for b in ctx.buffers]
        self._buffer_tasks = [int(b["task"]) for b in ctx.buffers]
        self._next_buffer = 0
        n_train = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
        self.print_to_log_file(f"MedSeqFT stage {ctx.stage}: {len(lora_parameters(self.network))} LoRA tensors "
                               f"(rank {opts.rank}), {n_train} trainable parameters, buffers of tasks "
                               f"{self._buffer_tasks}", also_print_to_console=True)

    def configure_optimizers(self):
        """AdamW (lr ``lora_lr``, no weight decay) on the adapters and the new head, nnU-Net's poly schedule.

        LoRA is trained with Adam in Hu et al.; nnU-Net's SGD (lr 1e-2, momentum 0.99) moves the zero-initialised
        ``B`` matrices too slowly. Measured on the tiny end-to-end setup (stage 1, 4 x 12 iterations, pseudo Dice of
        the last epoch; teacher 0.88-0.91): SGD 0.0, AdamW 1e-3 0.31, AdamW 5e-3 0.94."""
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

        if not self._has_adapters():
            return super().configure_optimizers()
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, self.lora_lr, weight_decay=0.0)
        return optimizer, PolyLRScheduler(optimizer, self.lora_lr, self.num_epochs)

    # ---- hooks -------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        if self.stage.options.kd != "features_mse":
            return self.network(batch["data"])
        with capture_inputs(final_decoder_features_module(self.network)) as features:
            output = self.network(batch["data"])
        batch["features"] = features[0]
        return output

    def _teacher_term(self, output, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.stage.options.kd == "features_mse":
                with capture_inputs(final_decoder_features_module(self.teacher)) as features:
                    self.teacher(batch["data"])
                return self.kd(batch["features"], features[0].detach())
            target = self.teacher(batch["data"])
        return self.kd(output, target)

    def _buffer_term(self) -> torch.Tensor:
        """KD to M_{t-1} on a batch of one buffer (the buffers take turns), over every old head."""
        i = self._next_buffer
        self._next_buffer = (i + 1) % len(self._buffer_loaders)
        x = next(self._buffer_loaders[i]).to(self.device, non_blocking=True)
        old = list(range(self.stage.stage - 1))
        if self.stage.options.kd == "features_mse":
            terms = []
            for net in (self.network, self.reference):
                with capture_inputs(final_decoder_features_module(net)) as features:
                    with torch.no_grad() if net is self.reference else torch.enable_grad():
                        net(x)
                terms.append(features[0])
            return self.kd(terms[0], terms[1].detach())
        student = task_outputs(self.network, x, old)
        with torch.no_grad():
            reference = task_outputs(self.reference, x, old)
        return sum(self.kd(student[j], reference[j]) for j in old) / len(old)

    def compute_loss(self, output, batch: dict):
        seg = self.loss(output, batch["target"])
        if not self.network.training:      # validation: the stage's segmentation loss only
            return seg, {}
        opts = self.stage.options
        kd_teacher = self._teacher_term(output, batch)
        loss = seg + opts.lam * kd_teacher
        log = {"seg_loss": seg.detach(), "kd_teacher": kd_teacher.detach()}
        if self._buffer_loaders and opts.mu > 0:
            kd_buffer = self._buffer_term()
            loss = loss + opts.mu * kd_buffer
            log["kd_buffer"] = kd_buffer.detach()
        return loss, log

    # ---- checkpoints: adapters in latest, merged weights in best / final ---------------------------
    def _has_adapters(self) -> bool:
        return bool(lora_parameters(self.network))

    def save_checkpoint(self, filename: str) -> None:
        if os.path.basename(filename) == "checkpoint_latest.pth" or not self._has_adapters():
            return super().save_checkpoint(filename)
        network = self.network
        self.network = merge_lora(copy.deepcopy(network))
        try:
            super().save_checkpoint(filename)
        finally:
            self.network = network

    def on_train_end(self):
        if self._has_adapters():
            merge_lora(self.network)     # M_t: plain weights, the original names
        self.teacher = self.reference = None
        super().on_train_end()


# ---- masked-reconstruction training (pre-training M_0, heads for --init checkpoints) ---------------------
def train_reconstruction(model: nn.Module, sources: Sequence[Iterator[torch.Tensor]], objective, iterations: int,
                         parameters, checkpoint: str, lr: float = 1e-3, weight_decay: float = 1e-4,
                         device: torch.device | str = "cpu", save_every: int = 50, seed: int = 0,
                         log=print) -> list:
    """Train ``model`` (a ReconstructionNetwork) with ``objective`` for ``iterations`` steps on batches drawn
    from ``sources`` in turn; only ``parameters`` train (AdamW: the optimiser of masked-image pre-training,
    SimMIM / MAE). ``checkpoint``: ``{model, optimizer, iteration, losses}`` saved atomically every
    ``save_every`` steps and at the end; an existing one is continued (a finished one returns at once).
    Returns the losses of every step."""
    device = torch.device(device)
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    state = {"iteration": 0, "losses": []}
    if os.path.isfile(checkpoint):
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        log(f"continuing masked-reconstruction training at step {state['iteration']} of {iterations}")
    model.to(device).train()
    generator = torch.Generator(device=device).manual_seed(int(seed) + int(state["iteration"]))
    losses = list(state["losses"])

    def save(step):
        torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": step,
                    "losses": losses}, checkpoint)

    for step in range(int(state["iteration"]), iterations):
        x = next(sources[step % len(sources)]).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = objective(model, x, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 12.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, save_every) == 0 or step + 1 == iterations:
            save(step + 1)
            log(f"reconstruction step {step + 1}/{iterations}: loss {np.mean(losses[-save_every:]):.4f}")
    if not os.path.isfile(checkpoint):
        save(iterations)
    return losses
