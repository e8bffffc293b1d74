"""Shared behaviour of every trainer in this package.

``PluginTrainer`` is an ``nnUNetTrainer`` with three small additions that all methods need:

* run-length overrides from the environment, so that demos, tests and quick experiments can shorten
  any plugin trainer without a new subclass per length (nnU-Net's own ``nnUNetTrainer_5epochs``
  pattern does not compose with method trainers)::

      NNUNET_PLUGINS_EPOCHS       num_epochs
      NNUNET_PLUGINS_ITERS        num_iterations_per_epoch
      NNUNET_PLUGINS_VAL_ITERS    num_val_iterations_per_epoch
      NNUNET_PLUGINS_SAVE_EVERY   save_every (checkpoint_latest interval, epochs)

  Unset variables leave nnU-Net's defaults (1000 x 250, 50 validation iterations, every 50 epochs).
* ``update_configuration``: change entries of the active configuration (patch size, batch size, ...)
  in the plans the trainer holds. nnU-Net copies those plans into the model folder at the start of
  training and the predictor reads them from there, so a method that must adapt the plans (CoTr's
  patch divisibility) stays consistent between training and ``nnUNetv2_predict``.
* ``unwrapped_network``: the network behind DDP and ``torch.compile`` wrappers.
* ``ddp_find_unused_parameters``: nnU-Net wraps the network in ``DistributedDataParallel`` without
  ``find_unused_parameters``, which fails in multi-GPU training as soon as one step leaves a parameter
  without gradient (e.g. UniSeg's stem for another channel count). Trainers whose networks do that
  set this class attribute to True and nnU-Net's own wrapping then passes the flag.

The network (``network_class``): a method trainer names its network class (a
:class:`~nnunet_plugins.architectures.contract.PlansNetwork`) and asks it instead of reading the plans
itself: ``build_network_architecture`` is the network's ``from_plans`` (plus ``network_context``, what
the trainer knows and the plans do not), the patch is fitted to the network's divisor at construction
(``update_configuration``), deep supervision follows the network's scales (none: switched off).
Without a ``network_class`` everything is nnU-Net's.

The training step (``train_step`` / ``validation_step``): nnU-Net 2.8.1's semantics, implemented once
here: device transfer of every tensor of the batch, autocast on CUDA only, grad scaler, gradient
clipping at ``grad_clip_norm`` (nnU-Net: 12), the online pseudo Dice. A method overrides hooks:

``forward(batch) -> output``
    how the network is called (default ``self.network(batch["data"])``);
``compute_loss(output, batch) -> (loss, log)``
    the loss to optimise and extra values to log (default ``self.loss(output, batch["target"])``, ``{}``);
``online_evaluation(output, batch) -> dict``
    ``tp_hard`` / ``fp_hard`` / ``fn_hard`` for the pseudo Dice (default nnU-Net's).

``optimizer_step(loss)`` (backward through the grad scaler, unscale, clip, step) is the one optimiser
step. Several forward/backward passes per iteration (semi-supervised methods such as LeFeD):
``passes_per_iteration`` = K makes ``train_step`` run zero_grad / forward / compute_loss / optimizer_step
K times on the batch; the hook ``next_pass(batch, output) -> batch`` prepares the next pass (e.g. adds
feedback computed from this pass's output); the logged values are the passes' means.

The constructor signature is nnU-Net's own; nnU-Net re-creates trainers from it (checkpoints, DDP).
"""
from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

RUN_LENGTH_VARIABLES = {
    "NNUNET_PLUGINS_EPOCHS": "num_epochs",
    "NNUNET_PLUGINS_ITERS": "num_iterations_per_epoch",
    "NNUNET_PLUGINS_VAL_ITERS": "num_val_iterations_per_epoch",
    "NNUNET_PLUGINS_SAVE_EVERY": "save_every",
}


def read_run_length_overrides(environ=os.environ) -> dict:
    """Return {trainer attribute: value} for the run-length variables that are set.

    Raises ValueError naming the variable when a value is not a positive integer.
    """
    overrides = {}
    for variable, attribute in RUN_LENGTH_VARIABLES.items():
        raw = environ.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{variable} must be a positive integer, got {raw!r}")
        overrides[attribute] = value
    return overrides


def seed_from_environment(rank: int = 0, environ=os.environ) -> int | None:
    """Seed Python's, numpy's and torch's generators from ``NNUNET_PLUGINS_SEED`` (numpy: seed + rank, so DDP ranks
    draw different patches) for reproducible runs; nnU-Net itself does not seed. Returns the seed, or None when
    the variable is unset. Augmentation worker processes (``nnUNet_n_proc_DA`` > 0) keep their own randomness."""
    raw = environ.get("NNUNET_PLUGINS_SEED")
    if raw is None or raw.strip() == "":
        return None
    try:
        seed = int(raw)
    except ValueError:
        seed = -1
    if seed < 0:
        raise ValueError(f"NNUNET_PLUGINS_SEED must be a non-negative integer, got {raw!r}")
    random.seed(seed)
    np.random.seed((seed + int(rank)) % 2 ** 32)
    torch.manual_seed(seed)
    return seed


@contextlib.contextmanager
def ddp_with_unused_parameters():
    """Make nnU-Net's ``initialize`` wrap DDP with ``find_unused_parameters=True`` (module global swap)."""
    original = _nnunet_trainer_module.DDP
    _nnunet_trainer_module.DDP = functools.partial(original, find_unused_parameters=True)
    try:
        yield
    finally:
        _nnunet_trainer_module.DDP = original


def _to_numpy(value):
    return value.detach().cpu().numpy() if torch.is_tensor(value) else value


class PluginTrainer(nnUNetTrainer):
    """Base class of the package's trainers (see the module docstring)."""

    #: the network this trainer trains (a PlansNetwork); None: nnU-Net's network from the plans
    network_class: type | None = None
    #: gradient-norm clipping of the optimiser step (nnU-Net: 12)
    grad_clip_norm: float = 12.0
    #: forward/backward passes per training iteration, each with its own optimiser step (semi-supervised
    #: methods such as LeFeD take several; ``next_pass`` carries state from one pass to the next)
    passes_per_iteration: int = 1
    ddp_find_unused_parameters = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        overrides = read_run_length_overrides()
        for attribute, value in overrides.items():
            setattr(self, attribute, value)
        if overrides:
            self.print_to_log_file(f"Run length from the environment: {overrides}", also_print_to_console=True)
        seed = seed_from_environment(self.local_rank)
        if seed is not None:
            self.print_to_log_file(f"Random seed from NNUNET_PLUGINS_SEED: {seed} (+ rank for numpy)",
                                   also_print_to_console=True)
        if self.network_class is not None:
            self._adapt_to_network(configuration)

    def _adapt_to_network(self, configuration: str) -> None:
        """Ask the network: can it train this configuration, which patch, deep supervision or not."""
        net = self.network_class
        net.check_plans(self.configuration_manager, configuration)
        if net.plans_deep_supervision_scales(self.configuration_manager) is None:
            self.enable_deep_supervision = False   # no auxiliary outputs: no deep-supervision targets
        patch = list(self.configuration_manager.patch_size)
        fitted = net.fit_patch(patch, self.configuration_manager)
        if fitted != patch:
            self.print_to_log_file(f"{type(self).__name__}: {net.__name__} needs patch axes that are multiples of "
                                   f"{tuple(net.plans_divisor(self.configuration_manager))}: patch {patch} -> "
                                   f"{fitted} (recorded in the model folder's plans)", also_print_to_console=True)
            self.update_configuration(patch_size=fitted)

    # ---- network -----------------------------------------------------------------------------------
    @classmethod
    def network_context(cls, plans_manager: PlansManager) -> dict:
        """Constructor arguments the trainer knows and the plans do not (e.g. the number of tasks)."""
        return {}

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> torch.nn.Module:
        context = cls.network_context(plans_manager)
        if cls.network_class is None:
            return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                            num_output_channels, enable_deep_supervision)
        return cls.network_class.from_plans(plans_manager, configuration_manager, num_input_channels,
                                            num_output_channels, enable_deep_supervision, **context)

    def _get_deep_supervision_scales(self):
        if self.network_class is None or not self.enable_deep_supervision:
            return super()._get_deep_supervision_scales()
        return self.network_class.plans_deep_supervision_scales(self.configuration_manager)

    def set_deep_supervision_enabled(self, enabled: bool):
        if self.network_class is None:
            return super().set_deep_supervision_enabled(enabled)
        # a network without auxiliary outputs keeps returning one tensor whatever nnU-Net asks
        self.unwrapped_network.deep_supervision = bool(enabled) and self.enable_deep_supervision

    # ---- the training step's mechanics (nnU-Net 2.8.1's train_step / validation_step) --------------
    def batch_to_device(self, batch: dict) -> dict:
        """The batch with every tensor (and list of tensors, e.g. deep-supervision targets) on the device."""
        moved = dict(batch)
        for key, value in batch.items():
            if torch.is_tensor(value):
                moved[key] = value.to(self.device, non_blocking=True)
            elif isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
                moved[key] = [v.to(self.device, non_blocking=True) for v in value]
        return moved

    def autocast(self):
        # as nnU-Net: autocast only on CUDA (slow on CPU, unsupported on MPS)
        return torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward (through the grad scaler when there is one), clip at ``grad_clip_norm``, step."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()

    def forward(self, batch: dict):
        """Hook: the network's output for a batch on the device."""
        return self.network(batch["data"])

    def compute_loss(self, output, batch: dict) -> tuple[torch.Tensor, dict]:
        """Hook: (loss to optimise, {name: tensor} logged beside it)."""
        return self.loss(output, batch["target"]), {}

    def online_evaluation(self, output, batch: dict) -> dict:
        """Hook: tp_hard / fp_hard / fn_hard of the highest-resolution output (nnU-Net's pseudo Dice)."""
        target = batch["target"]
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        axes = [0] + list(range(2, output.ndim))
        lm = self.label_manager
        if lm.has_regions:
            predicted = (torch.sigmoid(output) > 0.5).long()
        else:
            predicted = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            predicted.scatter_(1, output.argmax(1)[:, None], 1)
        mask = None
        if lm.has_ignore_label:
            if not lm.has_regions:
                mask = (target != lm.ignore_label).float()
                target = torch.where(target == lm.ignore_label, 0, target)
            else:
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted, target, axes=axes, mask=mask)
        tp, fp, fn = (_to_numpy(v) for v in (tp, fp, fn))
        if not lm.has_regions:   # no background Dice
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {"tp_hard": tp, "fp_hard": fp, "fn_hard": fn}

    def next_pass(self, batch: dict, output) -> dict:
        """Hook: the batch of the next pass of an iteration (``passes_per_iteration`` > 1), given this pass's
        output; e.g. LeFeD puts its discrepancy feedback into it. Default: the same batch."""
        return batch

    def train_step(self, batch: dict) -> dict:
        batch = self.batch_to_device(batch)
        logs = []
        for p in range(self.passes_per_iteration):
            if p:
                batch = self.next_pass(batch, output)
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                output = self.forward(batch)
                loss, log = self.compute_loss(output, batch)
            self.optimizer_step(loss)
            logs.append({"loss": _to_numpy(loss), **{k: _to_numpy(v) for k, v in log.items()}})
        if len(logs) == 1:
            return logs[0]
        # several passes: the iteration's values are the passes' means
        return {k: sum(log[k] for log in logs) / len(logs) for k in logs[0]}

    def validation_step(self, batch: dict) -> dict:
        batch = self.batch_to_device(batch)
        with self.autocast():
            output = self.forward(batch)
            loss, log = self.compute_loss(output, batch)
        return {"loss": _to_numpy(loss), **{k: _to_numpy(v) for k, v in log.items()},
                **self.online_evaluation(output, batch)}

    def initialize(self):
        if self.is_ddp and self.ddp_find_unused_parameters:
            with ddp_with_unused_parameters():
                return super().initialize()
        return super().initialize()

    def update_configuration(self, **changes) -> None:
        """Set ``changes`` in the active configuration of the plans and refresh ``configuration_manager``."""
        self.plans_manager.plans["configurations"][self.configuration_name].update(changes)
        self.configuration_manager = ConfigurationManager({**self.configuration_manager.configuration, **changes})

    @property
    def unwrapped_network(self) -> torch.nn.Module:
        net = self.network
        if self.is_ddp:
            net = net.module
        return getattr(net, "_orig_mod", net)
