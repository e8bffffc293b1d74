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

The constructor signature is nnU-Net's own; nnU-Net re-creates trainers from it (checkpoints, DDP).
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _nnunet_trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

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


@contextlib.contextmanager
def ddp_with_unused_parameters():
    """Make nnU-Net's ``initialize`` wrap DDP with ``find_unused_parameters=True`` (module global swap)."""
    original = _nnunet_trainer_module.DDP
    _nnunet_trainer_module.DDP = functools.partial(original, find_unused_parameters=True)
    try:
        yield
    finally:
        _nnunet_trainer_module.DDP = original


class PluginTrainer(nnUNetTrainer):
    """Base class of the package's trainers (see the module docstring)."""

    ddp_find_unused_parameters = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        overrides = read_run_length_overrides()
        for attribute, value in overrides.items():
            setattr(self, attribute, value)
        if overrides:
            self.print_to_log_file(f"Run length from the environment: {overrides}", also_print_to_console=True)

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
