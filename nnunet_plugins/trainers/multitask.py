"""MultiTaskTrainer: nnU-Net training of ONE network on a universal dataset (several partially labelled tasks).

Base class of UniSegTrainer, DoDNetTrainer, TransDoDNetTrainer (and later VerSemi). It wires the
multi-task machinery of ``nnunet_plugins.multitask`` into nnU-Net's training loop and changes nothing
else of nnU-Net (plans, preprocessing, augmentation, schedule, checkpoints, ``--c``, ``--val``):

* data: ``MultiTaskDataLoader`` (task-balanced rounds, one task per batch, ``batch['task_id']``),
  single- and multi-process (``nnUNet_n_proc_DA``);
* network: the subclass's ``network_class`` built from the plans; it is called as
  ``network(x, task_id)`` with ``task_id`` a LongTensor (B,) in training and validation, and predicts
  through ``set_inference_task`` (see ``nnunet_plugins.multitask.prediction``);
* loss: nnU-Net's loss (``_build_loss``: Dice + CE with deep supervision) applied per task to the
  task's own output channels and the task-local targets (partial labels: other tasks' structures are
  never trained as background, see ``nnunet_plugins.multitask.partial_labels``);
* metadata: the dataset's task tables (``dataset.json["multitask"]``, or one implicit task for a plain
  nnU-Net dataset) are in ``self.task_spec`` and are copied into the plans (``plans["multitask"]``)
  that nnU-Net saves in the model folder, so ``build_network_architecture`` can read them at
  inference time with ``task_spec_from_plans(plans_manager)``;
* validation: the online pseudo Dice is computed per combined structure (each structure of each task
  is one entry), and the final validation predicts every case for its task and writes nnU-Net's
  ``summary.json`` over the combined labels plus ``summary_per_task.json``.

EXTENSION POINTS (override only these in a method trainer):

``network_class``
    The multi-task network (a ``PlansNetwork`` taking ``(x, task_id)``); ``build_network_architecture``
    is its ``from_plans`` with ``network_context(plans_manager)``: the task metadata
    (``task_spec_from_plans``) gives ``num_tasks`` and the output channels (``num_network_outputs(spec)``,
    default the largest class count of any task).
``task_output_channels(spec, task)`` (classmethod)
    The network output channels holding ``task``'s local classes, in local order; default
    ``range(K_t)`` (UniSeg: outputs sliced to the task's classes). A network with one output per
    combined structure returns ``[0] + [combined values of the task]``.
``task_label_manager(spec, task)`` (classmethod)
    nnU-Net ``LabelManager`` that turns the task's selected output channels into a local
    segmentation at inference; default softmax/argmax over background + the task's structures.
    Sigmoid/region outputs (DoDNet: organ, tumour) return a region-based LabelManager here.
``compute_loss(output, batch) -> (loss, log)`` (``PluginTrainer``'s hook)
    Default: ``self.loss`` (from nnU-Net's ``_build_loss``) per task on selected channels and local
    targets. Override for another loss (DoDNet: binary Dice + BCE per channel with unannotated channels
    masked); ``self.task_label_mapper.to_local(target, task)`` converts combined targets.
``logits_to_local_segmentation(logits, task)``
    Local segmentation (B, 1, ...) from selected logits for the online pseudo Dice; default argmax.
``configure_optimizers()`` and ``_build_loss()``: nnU-Net's hooks, as usual.
``batches_per_task_per_round``: batches each task contributes to a sampling round (UniSeg: 50).
``grad_clip_norm``: gradient-norm clipping of the training step (nnU-Net: 12; TransDoDNet: 0.1).

The step itself (device transfer, autocast, grad scaler, clipping) is ``PluginTrainer``'s; the network
is called as ``network(batch["data"], batch["task_id"])`` (``forward``).
"""
from __future__ import annotations

import multiprocessing
import warnings
from time import sleep

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import distributed as dist

from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec
from nnunet_plugins.multitask.partial_labels import (
    TaskLabelMapper, group_by_task, select_channels, task_grouped_loss,
)
from nnunet_plugins.training.sampling import MultiTaskDataLoader
from nnunet_plugins.trainers.base import PluginTrainer, read_run_length_overrides


class MultiTaskTrainer(PluginTrainer):
    """See the module docstring (extension points)."""

    batches_per_task_per_round: int = 50
    #: tasks in one training batch (consecutive groups, one sampler draw each; see training.sampling)
    tasks_per_batch: int = 1
    # a batch holds one task: parts of a multi-task network for other tasks (UniSeg's stem for another
    # channel count, another task's head) may get no gradient in a step, which plain DDP rejects
    ddp_find_unused_parameters = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.task_spec = MultiTaskSpec.from_dataset_json(dataset_json)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError("a multi-task dataset must have plain integer labels (no regions, no ignore label); "
                             "region-based targets are a matter of task_label_manager/compute_loss")
        if self.label_manager.num_segmentation_heads != self.task_spec.num_combined_labels:
            raise ValueError(f"dataset.json declares {self.label_manager.num_segmentation_heads} labels but its "
                             f"'{METADATA_KEY}' tables use {self.task_spec.num_combined_labels} combined values")
        # the plans saved in the model folder are what inference builds the network from
        self.plans_manager.plans[METADATA_KEY] = self.task_spec.to_plans_entry()
        self.task_label_mapper = TaskLabelMapper(self.task_spec)

    def apply_run_length_overrides(self) -> None:
        """Re-apply NNUNET_PLUGINS_* run lengths after a subclass set its own defaults."""
        for attribute, value in read_run_length_overrides().items():
            setattr(self, attribute, value)

    @classmethod
    def network_context(cls, plans_manager: PlansManager) -> dict:
        if cls.network_class is None:
            raise NotImplementedError("MultiTaskTrainer is a base class: train a method trainer built on it "
                                      "(UniSegTrainer, DoDNetTrainer, TransDoDNetTrainer) whose network takes "
                                      "(x, task_id)")
        spec = cls.task_spec_from_plans(plans_manager)
        return {"num_classes": cls.num_network_outputs(spec), "num_tasks": spec.num_tasks}

    @classmethod
    def num_network_outputs(cls, spec: MultiTaskSpec) -> int:
        return spec.max_num_classes

    # ---- metadata helpers and hooks ----------------------------------------------------------------
    @staticmethod
    def task_spec_from_plans(plans_manager: PlansManager) -> MultiTaskSpec:
        return MultiTaskSpec.from_plans(plans_manager.plans)

    @classmethod
    def task_output_channels(cls, spec: MultiTaskSpec, task: int) -> list:
        return list(range(spec.tasks[task].num_classes))

    @classmethod
    def task_label_manager(cls, spec: MultiTaskSpec, task: int) -> LabelManager:
        return LabelManager(spec.tasks[task].local_labels, regions_class_order=None)

    def _channels_of(self, task: int) -> list:
        return self.task_output_channels(self.task_spec, task)

    def select_task_outputs(self, output: torch.Tensor, task: int) -> torch.Tensor:
        return select_channels(output, self._channels_of(task))

    def forward(self, batch: dict):
        if "task_id" not in batch:
            raise KeyError("the batch has no 'task_id': multi-task trainers need MultiTaskDataLoader batches")
        return self.network(batch["data"], batch["task_id"])

    def _build_loss(self):
        """nnU-Net's loss, with the cross-rank gathering of its batch Dice turned off: under DDP each rank's
        batch holds one task whose channels may differ from the other ranks' (gathering would exchange
        differently sized, differently structured Dice sums). Batch Dice is then over the rank's own batch;
        DDP still averages the gradients."""
        loss = super()._build_loss()
        inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        if hasattr(inner, "dc") and hasattr(inner.dc, "ddp"):
            inner.dc.ddp = False
        return loss

    def compute_loss(self, output, batch: dict):
        return task_grouped_loss(self.loss, output, batch["target"], batch["task_id"], self._channels_of,
                                 self.task_label_mapper), {}

    def logits_to_local_segmentation(self, logits: torch.Tensor, task: int) -> torch.Tensor:
        return logits.argmax(1, keepdim=True)

    # ---- data --------------------------------------------------------------------------------------
    def build_dataloader(self, dataset, patch_size, final_patch_size, transforms, batch_size: int | None = None,
                         tasks_per_batch: int = 1) -> MultiTaskDataLoader:
        case_tasks = {k: self.task_spec.task_of_case(k) for k in dataset.identifiers}
        return MultiTaskDataLoader(dataset, self.batch_size if batch_size is None else batch_size, patch_size,
                                   final_patch_size, self.label_manager, case_tasks, self.task_spec.num_tasks,
                                   self.batches_per_task_per_round,
                                   oversample_foreground_percent=self.oversample_foreground_percent,
                                   probabilistic_oversampling=self.probabilistic_oversampling,
                                   transforms=transforms, tasks_per_batch=tasks_per_batch)

    def get_dataloaders(self):
        # nnU-Net's get_dataloaders with the multi-task loader in place of nnUNetDataLoader
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        ds_scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        tr_transforms = self.get_training_transforms(
            patch_size, rotation, ds_scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        val_transforms = self.get_validation_transforms(ds_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=lm.foreground_labels, regions=None,
                                                        ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        dl_tr = self.build_dataloader(dataset_tr, initial_patch_size, patch_size, tr_transforms,
                                      tasks_per_batch=self.tasks_per_batch)
        dl_val = self.build_dataloader(dataset_val, patch_size, patch_size, val_transforms)
        counts = {self.task_spec.tags[t] or "task0": int(len(c)) for t, c in enumerate(dl_tr.sampler.cases_of_task)}
        self.print_to_log_file(f"multi-task training cases per task: {counts}; "
                               f"{dl_tr.sampler.batches_per_round} batches per sampling round")

        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            mt_tr, mt_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_tr = NonDetMultiThreadedAugmenter(dl_tr, None, n_proc, max(6, n_proc // 2), None, pin, 0.002)
            mt_val = NonDetMultiThreadedAugmenter(dl_val, None, max(1, n_proc // 2), max(3, n_proc // 4), None, pin,
                                                  0.002)
        _ = next(mt_tr)
        _ = next(mt_val)
        return mt_tr, mt_val

    # ---- online evaluation -------------------------------------------------------------------------
    def online_evaluation(self, output, batch: dict) -> dict:
        output = output[0] if isinstance(output, (list, tuple)) else output
        target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
        task_id = batch["task_id"]

        # pseudo Dice per COMBINED structure: each task's prediction in its own classes, mapped to
        # combined values, so every structure of every task is one entry of nnU-Net's Dice log
        predicted = torch.zeros((output.shape[0], 1, *output.shape[2:]), dtype=torch.long, device=output.device)
        for task, idx in group_by_task(task_id):
            logits = output if idx is None else output[idx.to(output.device)]
            local = self.logits_to_local_segmentation(self.select_task_outputs(logits, task), task)
            combined = self.task_label_mapper.to_combined(local, task)
            if idx is None:
                predicted = combined
            else:
                predicted[idx.to(output.device)] = combined
        n = self.task_spec.num_combined_labels
        onehot = torch.zeros((output.shape[0], n, *output.shape[2:]), device=output.device, dtype=torch.float16)
        onehot.scatter_(1, predicted, 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target.long().clamp_min(0), axes=[0] + list(range(2, output.ndim)))
        return {"tp_hard": tp.detach().cpu().numpy()[1:], "fp_hard": fp.detach().cpu().numpy()[1:],
                "fn_hard": fn.detach().cpu().numpy()[1:]}

    # ---- final validation --------------------------------------------------------------------------
    def perform_actual_validation(self, save_probabilities: bool = False):
        from nnunet_plugins.multitask.prediction import MultiTaskPredictor, export_task_prediction

        if save_probabilities:
            warnings.warn("multi-task validation does not save probabilities (--npz ignored)")
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                       perform_everything_on_device=True, device=self.device, verbose=False,
                                       verbose_preprocessing=False, allow_tqdm=False)
        predictor.trainer_class = type(self)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        folder = join(self.output_folder, "validation")
        maybe_mkdir_p(folder)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys,
                                         folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        with multiprocessing.get_context("spawn").Pool(default_num_processes) as pool:
            workers = list(pool._pool)
            results = []
            for k in dataset_val.identifiers:
                while check_workers_alive_and_busy(pool, workers, results, allowed_num_queued=2):
                    sleep(0.1)
                data, _, _, properties = dataset_val.load_case(k)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = torch.from_numpy(data[:])
                task = self.task_spec.task_of_case(k)
                self.print_to_log_file(f"predicting {k} (task {self.task_spec.tags[task] or task})")
                predictor.set_task(task)
                logits = predictor.predict_sliding_window_return_logits(data).cpu().numpy()
                results.append(pool.apply_async(export_task_prediction, (
                    logits, properties, self.configuration_manager, self.plans_manager, predictor.label_manager,
                    predictor.value_lut(task), join(folder, k + self.dataset_json["file_ending"]))))
            _ = [r.get() for r in results]
        if self.is_ddp:
            dist.barrier()
        if self.local_rank == 0:
            metrics = compute_metrics_on_folder(join(self.preprocessed_dataset_folder_base, "gt_segmentations"), folder,
                                                join(folder, "summary.json"),
                                                self.plans_manager.image_reader_writer_class(),
                                                self.dataset_json["file_ending"], self.label_manager.foreground_labels,
                                                None, chill=True, num_processes=default_num_processes)
            per_task = self.summarize_per_task(metrics)
            save_json(per_task, join(folder, "summary_per_task.json"), sort_keys=False)
            for label in metrics["mean"]:
                self.logger.log_summary(f"final_val/class_{label}_dice", metrics["mean"][label]["Dice"])
            self.logger.log_summary("final_val/foreground_dice", per_task["mean_over_tasks"])
            self.print_to_log_file("Validation complete", also_print_to_console=True)
            self.print_to_log_file("Mean validation Dice per task: ",
                                   {k: v["mean_dice"] for k, v in per_task["tasks"].items()},
                                   also_print_to_console=True)
        self.set_deep_supervision_enabled(True)
        compute_gaussian.cache_clear()

    def summarize_per_task(self, metrics: dict) -> dict:
        """Mean Dice of each task over its own structures (cases where a structure is absent in both
        reference and prediction count as nan and are skipped, as nnU-Net does)."""
        tasks = {}
        for t, task in enumerate(self.task_spec.tasks):
            per_class = {}
            for name, value in zip(task.label_names[1:], task.combined_labels[1:]):
                entry = metrics["mean"].get(str(value), metrics["mean"].get(value))
                per_class[name] = float(entry["Dice"]) if entry is not None else float("nan")
            values = [v for v in per_class.values() if not np.isnan(v)]
            tasks[task.tag or f"task{t}"] = {"mean_dice": float(np.mean(values)) if values else float("nan"),
                                             "dice": per_class}
        means = [v["mean_dice"] for v in tasks.values() if not np.isnan(v["mean_dice"])]
        return {"tasks": tasks, "mean_over_tasks": float(np.mean(means)) if means else float("nan")}
