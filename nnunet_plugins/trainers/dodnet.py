"""DoDNetTrainer and TransDoDNetTrainer: DoDNet (Zhang et al., CVPR 2021) and TransDoDNet (Xie et al., TPAMI
2023) trained by nnU-Net v2 on a universal (multi-task) dataset.

Both methods predict, for the requested task, a few independent SIGMOID channels from a dynamic head
generated for that task (MOTS: organ, tumour; the organ channel includes the tumour). What the two
trainers change relative to ``MultiTaskTrainer`` (task-balanced loader, per-task prediction and export)
and nothing else:

* channels (:class:`BinaryChannelMultiTaskTrainer`): the binary channels of each task come from that
  task's source ``labels`` (``nnunet_plugins.training.binary_channels.binary_channels_from_labels``): a
  region-based source gives one channel per region (nested organ / tumour as nnU-Net regions, painted
  in ``regions_class_order``), a plain source one channel per label. Channel ``k`` of a task is network
  output ``k``; the network has as many outputs as the task with the most channels (official 2);
* loss: :class:`~nnunet_plugins.training.partial_label_loss.PartialLabelDiceBCELoss` (binary Dice + BCE
  per channel, official ``DiceLoss4MOTS`` + ``CELoss4MOTS``) on each sample's own channels; outputs a
  sample's task does not annotate (a task with fewer channels than the network) are masked, never
  trained as background;
* prediction: the task's channels become a segmentation through
  :class:`~nnunet_plugins.training.binary_channels.BinaryChannelLabelManager` (sigmoid, > 0.5, painted
  in channel order) in the task's local classes (``task_label_manager``), so the final validation,
  ``nnunet-plugins predict-multitask`` and ``export-multitask`` write each source's labels;
* deep supervision: none (the official networks have no auxiliary heads); the trainers keep the
  networks' single-tensor output whatever nnU-Net asks and build no deep-supervision targets;
* network: built in the static ``build_network_architecture`` from the plans and the task metadata
  (``MultiTaskTrainer.task_spec_from_plans``): number of tasks, output channels. The official widths are
  used unless the plans' architecture names the network class itself
  (``nnunet_plugins.architectures.dodnet.DoDNet`` / ``...transdodnet.TransDoDNet``), then its
  ``arch_kwargs`` are the constructor arguments (e.g. narrow networks for CPU runs). ``predict-multitask``
  rebuilds exactly the trained network from the plans in the model folder; the stock
  ``nnUNetv2_predict`` fails with a message naming ``predict-multitask`` (the networks need a task);
* patch: every patch axis must be a multiple of the network's total stride (DoDNet: 16 per axis with
  the official strides; TransDoDNet: (16, 32, 32) for the ResNet-50 backbone, and more than one voxel at
  the deepest level). Plans whose patch does not fit are rounded to the nearest multiple and the patch
  is recorded in the plans the trainer copies into the model folder (as ``CoTrTrainer``), so
  prediction slides the same window. With the official strides (2 on every axis) anisotropic data loses
  the z-axis fastest; plans naming DoDNet may set ``strides`` per axis (e.g. ``[1, [1, 2, 2], 2, 2, 2]``)
  and the divisor follows them.

Optimisation
------------
* DoDNet (official ``a_DynConv/train.py``): SGD lr 1e-2, momentum 0.99, Nesterov, poly 0.9 over the
  epochs (nnU-Net's ``PolyLRScheduler``), gradient clipping at 12 (nnU-Net's), AMP on CUDA. Weight decay
  0: the official optimiser is built without one (its ``--weight_decay`` argument is never passed to
  SGD); nnU-Net's default would be 3e-5 (``DoDNetTrainer.weight_decay``). Epochs and iterations are
  nnU-Net's (1000 x 250; official 500 x 250).
* TransDoDNet (official ``TransDoD/train.py``): AdamW lr 2e-4, weight decay 1e-4, gradient clipping at
  0.1, per-epoch schedule: linear warm-up from 1 % of the lr over the first 10 epochs
  (``lr * (0.01 + 0.99 * e / 10)``), then poly 0.9 of the absolute epoch (``lr * (1 - e / E) ** 0.9``),
  E = 1000 epochs x 250 iterations as nnU-Net. (The official optimiser has two parameter groups,
  transformer and the rest, with the same lr, ``lr_tr_mult`` = 1: one group here.) A run shortened with ``NNUNET_PLUGINS_EPOCHS`` keeps at most
  a tenth of its epochs for warm-up (:func:`warmup_epochs_for`: 10 epochs from 100 epochs on, 5 of 50,
  none below 10 epochs), so a short run still trains mostly near the paper's learning rate instead of
  spending all of it warming up.

Sampling is the package's task-balanced sampler (one task per batch); the official DoDNet/TransDoDNet
loaders draw cases uniformly from the pooled list.
"""
from __future__ import annotations

import pydoc
from typing import Sequence

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_plugins.multitask.metadata import MultiTaskSpec
from nnunet_plugins.training.binary_channels import (
    BinaryChannel, BinaryChannelLabelManager, binary_channels_from_labels,
)
from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss, TaskChannelTargets
from nnunet_plugins.planners.common import fit_to_divisor
from nnunet_plugins.trainers.multitask import MultiTaskTrainer

DODNET_NETWORK = "nnunet_plugins.architectures.dodnet.DoDNet"
TRANSDODNET_NETWORK = "nnunet_plugins.architectures.transdodnet.TransDoDNet"
# constructor arguments the trainers take from the task metadata and the trainer, never from the plans
TRAINER_SET_KWARGS = ("input_channels", "num_classes", "num_tasks", "deep_supervision")
OFFICIAL_WARMUP_EPOCHS = 10
OFFICIAL_WARMUP_START_FACTOR = 0.01


# ---------------------------------------------------------------------------------------------------
# binary channels of a multi-task dataset
# ---------------------------------------------------------------------------------------------------
def _task_name(spec: MultiTaskSpec, t: int) -> str:
    task = spec.tasks[t]
    return f"task {task.tag or t!r} ({task.source_dataset or 'no source name'})"


def task_binary_channels(spec: MultiTaskSpec) -> list[list[BinaryChannel]]:
    """Per task, its binary channels with values and paint values in the task's LOCAL class indices.

    Read from each task's source ``labels`` and ``regions_class_order`` (the combined dataset's
    metadata keeps them verbatim); raises ValueError naming the task when they are missing or name
    values the task does not have.
    """
    out = []
    for t, task in enumerate(spec.tasks):
        where = f"{_task_name(spec, t)} labels"
        if not task.source_labels:
            raise ValueError(f"{where}: the task metadata has no source 'labels'; binary-channel training needs "
                             f"them (datasets combined with `nnunet-plugins combine` carry them)")
        channels = binary_channels_from_labels(task.source_labels, task.source_regions_class_order, where=where)
        local = {int(v): i for i, v in enumerate(task.label_values)}
        converted = []
        for c in channels:
            missing = sorted({v for v in (*c.values, c.paint_value) if v not in local})
            if missing:
                raise ValueError(f"{where}: channel {c.name!r} uses label values {missing} that the task does not "
                                 f"have (its values: {list(task.label_values)})")
            converted.append(BinaryChannel(c.name, tuple(local[v] for v in c.values), local[c.paint_value]))
        out.append(converted)
    return out


def max_binary_channels(spec: MultiTaskSpec) -> int:
    """Output channels of the network: the largest channel count of any task (official MOTS: 2)."""
    return max(len(c) for c in task_binary_channels(spec))


def channel_targets_for(spec: MultiTaskSpec, channels: Sequence[Sequence[BinaryChannel]] | None = None
                        ) -> TaskChannelTargets:
    """``TaskChannelTargets`` over COMBINED label values (what the batches hold): channel ``k`` of task
    ``t`` is foreground on the combined values of its local classes; channels past a task's own are
    unannotated for it."""
    channels = task_binary_channels(spec) if channels is None else channels
    width = max(len(c) for c in channels)
    table = []
    for task, chans in zip(spec.tasks, channels):
        row = [[int(task.combined_labels[i]) for i in c.values] for c in chans]
        table.append(row + [None] * (width - len(row)))
    return TaskChannelTargets(table)


def fit_patch(patch_size: Sequence[int], divisor: Sequence[int], avoid_single_voxel: bool = False) -> list[int]:
    """Nearest patch whose axes are multiples of ``divisor``; with ``avoid_single_voxel`` the deepest
    level keeps more than one voxel (instance norm cannot normalise one voxel): the last axis is doubled
    when every axis would equal the divisor."""
    patch = fit_to_divisor(list(patch_size), list(divisor))
    if avoid_single_voxel and all(p == d for p, d in zip(patch, divisor)):
        patch[-1] *= 2
    return patch


def _plans_kwargs(configuration_manager: ConfigurationManager, network_name: str) -> dict:
    """Constructor arguments from the plans when they name ``network_name`` (imports resolved), else {}."""
    if configuration_manager.network_arch_class_name != network_name:
        return {}
    kwargs = dict(configuration_manager.network_arch_init_kwargs or {})
    for key in configuration_manager.network_arch_init_kwargs_req_import or ():
        if isinstance(kwargs.get(key), str):
            located = pydoc.locate(kwargs[key])
            if located is None:
                raise ValueError(f"plans arch_kwargs {key}={kwargs[key]!r} cannot be imported")
            kwargs[key] = located
    clash = sorted(set(kwargs) & set(TRAINER_SET_KWARGS))
    if clash:
        raise ValueError(f"the plans' arch_kwargs for {network_name} set {clash}; these come from the task metadata "
                         f"and the trainer, remove them from the plans")
    return kwargs


# ---------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------
def warmup_epochs_for(num_epochs: int, official: int = OFFICIAL_WARMUP_EPOCHS) -> int:
    """Warm-up epochs of a run of ``num_epochs``: the official 10, at most a tenth of the run."""
    return int(min(official, max(0, int(num_epochs)) // 10))


class WarmupPolyLRScheduler(PolyLRScheduler):
    """TransDoDNet's schedule (official ``adjust_learning_rate``), stepped per epoch like nnU-Net's poly:

    ``lr(e) = initial_lr * (start_factor + (1 - start_factor) * e / warmup_steps)`` for ``e < warmup_steps``,
    ``lr(e) = initial_lr * (1 - e / max_steps) ** exponent`` afterwards (poly of the absolute step, as the
    official code: the warm-up does not shift the poly curve).
    """

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9,
                 start_factor: float = OFFICIAL_WARMUP_START_FACTOR, current_step: int | None = None):
        if warmup_steps < 0 or (warmup_steps > 0 and warmup_steps >= max_steps):
            raise ValueError(f"warm-up of {warmup_steps} steps does not fit a schedule of {max_steps} steps")
        self.warmup_steps, self.start_factor = int(warmup_steps), float(start_factor)
        super().__init__(optimizer, initial_lr, max_steps, exponent, current_step)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps)
        return self.initial_lr * (1 - step / self.max_steps) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


# ---------------------------------------------------------------------------------------------------
# trainers
# ---------------------------------------------------------------------------------------------------
class BinaryChannelMultiTaskTrainer(MultiTaskTrainer):
    """Multi-task training of a dynamic-head network with per-task binary sigmoid channels (see the module
    docstring). Base of DoDNetTrainer and TransDoDNetTrainer; subclasses give the network
    (``build_network_architecture``, ``network_divisor``)."""

    avoid_single_voxel_bottleneck: bool = False
    network_name: str = "the network"
    supports_2d: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        patch = list(self.configuration_manager.patch_size)
        if len(patch) != 3 and not (self.supports_2d and len(patch) == 2):
            kind = "a 2-D or 3-D network" if self.supports_2d else "a 3-D network"
            raise ValueError(f"{self.network_name} is {kind}, but configuration {configuration!r} has a "
                             f"{len(patch)}-D patch {patch}; train a 3-D configuration such as 3d_fullres")
        # the official networks have no auxiliary outputs: no deep supervision targets, one logits tensor
        self.enable_deep_supervision = False
        self.binary_channels = task_binary_channels(self.task_spec)
        self.channel_targets = channel_targets_for(self.task_spec, self.binary_channels)
        self._paint_values = [[c.paint_value for c in chans] for chans in self.binary_channels]
        self.print_to_log_file("binary channels per task: " + "; ".join(
            f"{t.tag or i}: " + ", ".join(f"{c.name}={list(t.combined_labels[v] for v in c.values)}" for c in chans)
            for i, (t, chans) in enumerate(zip(self.task_spec.tasks, self.binary_channels))), also_print_to_console=False)
        divisor = self.network_divisor(self.configuration_manager, len(patch))
        fitted = fit_patch(patch, divisor, self.avoid_single_voxel_bottleneck)
        if fitted != patch:
            self.print_to_log_file(f"{type(self).__name__}: patch axes must be multiples of {tuple(divisor)}: "
                                   f"patch {patch} -> {fitted} (recorded in the model folder's plans)",
                                   also_print_to_console=True)
            self.update_configuration(patch_size=fitted)

    @staticmethod
    def network_divisor(configuration_manager: ConfigurationManager, dim: int) -> tuple[int, ...]:
        raise NotImplementedError

    # ---- channels, label managers --------------------------------------------------------------------
    @classmethod
    def task_output_channels(cls, spec: MultiTaskSpec, task: int) -> list:
        return list(range(len(task_binary_channels(spec)[task])))

    @classmethod
    def task_label_manager(cls, spec: MultiTaskSpec, task: int) -> BinaryChannelLabelManager:
        # local class indices out; the predictor's value table turns them into combined / source labels
        return BinaryChannelLabelManager(task_binary_channels(spec)[task])

    def logits_to_local_segmentation(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        """Sigmoid > 0.5 (logit > 0) per channel, painted in channel order, as the label manager does."""
        seg = torch.zeros((logits.shape[0], 1, *logits.shape[2:]), dtype=torch.long, device=logits.device)
        for k, value in enumerate(self._paint_values[task]):   # a loop over (few) channels, not voxels
            seg = torch.where(logits[:, k:k + 1] > 0, value, seg)
        return seg

    # ---- loss ------------------------------------------------------------------------------------------
    def _build_loss(self):
        return PartialLabelDiceBCELoss()

    def _get_deep_supervision_scales(self):
        return None

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net toggles deep supervision around its final validation; these networks have no auxiliary
        # heads, so they always return one logits tensor
        net = self.unwrapped_network
        if hasattr(net, "deep_supervision"):
            net.deep_supervision = False

    def compute_loss(self, output, target, task_id: torch.Tensor) -> torch.Tensor:
        """Binary Dice + BCE on each sample's own channels; channels its task lacks are masked."""
        output = output[0] if isinstance(output, (list, tuple)) else output
        target = target[0] if isinstance(target, (list, tuple)) else target
        channel_target, annotated = self.channel_targets(target, task_id)
        return self.loss(output, channel_target, annotated)


class DoDNetTrainer(BinaryChannelMultiTaskTrainer):
    """DoDNet (see the module docstring): SGD 1e-2 / 0.99 Nesterov, poly, clip 12, no weight decay.
    3-D as the paper; a 2-D configuration builds the same network with ``nn.Conv2d``."""

    network_name = "DoDNet"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-2
        self.weight_decay = 0.0   # official: SGD without weight decay (module docstring)

    @staticmethod
    def network_kwargs(configuration_manager: ConfigurationManager, dim: int) -> dict:
        kwargs = _plans_kwargs(configuration_manager, DODNET_NETWORK)
        if "conv_op" not in kwargs:
            kwargs["conv_op"] = nn.Conv3d if dim == 3 else nn.Conv2d
        return kwargs

    @staticmethod
    def network_divisor(configuration_manager: ConfigurationManager, dim: int) -> tuple[int, ...]:
        import inspect

        from nnunet_plugins.architectures.dodnet import DoDNet

        strides = DoDNetTrainer.network_kwargs(configuration_manager, dim).get(
            "strides", inspect.signature(DoDNet).parameters["strides"].default)
        out = [1] * dim
        for s in strides:
            s = tuple(s) if isinstance(s, (list, tuple)) else (s,) * dim
            if len(s) != dim:
                raise ValueError(f"DoDNet stride {list(s)} in the plans does not match the {dim}-D patch")
            out = [o * int(v) for o, v in zip(out, s)]
        return tuple(out)

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        from nnunet_plugins.architectures.dodnet import DoDNet

        spec = MultiTaskTrainer.task_spec_from_plans(plans_manager)
        dim = len(configuration_manager.patch_size)
        return DoDNet(input_channels=num_input_channels, num_classes=max_binary_channels(spec),
                      num_tasks=spec.num_tasks, deep_supervision=enable_deep_supervision,
                      **DoDNetTrainer.network_kwargs(configuration_manager, dim))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


class TransDoDNetTrainer(BinaryChannelMultiTaskTrainer):
    """TransDoDNet (see the module docstring): AdamW 2e-4 / wd 1e-4, warm-up + poly, clip 0.1; 3-D only."""

    grad_clip_norm = 0.1
    avoid_single_voxel_bottleneck = True
    network_name = "TransDoDNet"
    supports_2d = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 2e-4
        self.weight_decay = 1e-4
        self.warmup_epochs = warmup_epochs_for(self.num_epochs)

    @staticmethod
    def network_kwargs(configuration_manager: ConfigurationManager) -> dict:
        return _plans_kwargs(configuration_manager, TRANSDODNET_NETWORK)

    @staticmethod
    def network_divisor(configuration_manager: ConfigurationManager, dim: int) -> tuple[int, ...]:
        import inspect

        from nnunet_plugins.architectures.transdodnet import TransDoDNet

        planes = TransDoDNetTrainer.network_kwargs(configuration_manager).get(
            "backbone_planes", inspect.signature(TransDoDNet).parameters["backbone_planes"].default)
        n = len(planes)   # stem stride (1, 2, 2), then one stride-2 stage per entry
        return (2 ** n, 2 ** (n + 1), 2 ** (n + 1))

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        from nnunet_plugins.architectures.transdodnet import TransDoDNet

        if len(configuration_manager.patch_size) != 3:
            raise ValueError(f"TransDoDNet is a 3-D network; the plans' patch {list(configuration_manager.patch_size)} "
                             f"is not 3-D")
        spec = MultiTaskTrainer.task_spec_from_plans(plans_manager)
        return TransDoDNet(input_channels=num_input_channels, num_classes=max_binary_channels(spec),
                           num_tasks=spec.num_tasks, deep_supervision=enable_deep_supervision,
                           **TransDoDNetTrainer.network_kwargs(configuration_manager))

    def configure_optimizers(self):
        self.warmup_epochs = warmup_epochs_for(self.num_epochs)
        optimizer = torch.optim.AdamW(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        self.print_to_log_file(f"TransDoDNet schedule: AdamW lr {self.initial_lr}, weight decay {self.weight_decay}, "
                               f"{self.warmup_epochs} warm-up epochs of {self.num_epochs}, then poly 0.9",
                               also_print_to_console=False)
        return optimizer, WarmupPolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, self.warmup_epochs)
