"""Per-task prediction with nnU-Net's predictor, and export back to the source datasets' labels.

nnU-Net's inference only builds the network and feeds it images, so the task of each case has to
reach the network from outside. Convention for every multi-task network of this package:

* ``forward(x, task_id=None)``; ``task_id`` is a LongTensor (B,) (or an int);
* ``set_inference_task(task_id: int | None)`` stores a task that ``forward`` uses when it gets none;
* with neither, ``forward`` raises a RuntimeError saying how to predict: the stock ``nnUNetv2_predict``
  therefore fails clearly instead of silently predicting some task.

``MultiTaskPredictor`` (an ``nnUNetPredictor``) sets the task of every case (from the case name's
``<tag>_`` prefix, or a forced task) before nnU-Net's sliding-window inference, keeps only the task's
output channels, converts them with the task's label manager (nnU-Net's resampling / cropping
reversal) and writes the segmentation in the combined dataset's label values, so the files are
ordinary nnU-Net predictions of the combined dataset. ``export_to_source`` then writes each case in
its source dataset's label values, file name and file format, which is what the challenge exporters
and evaluators of this package read.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from time import sleep

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

from nnunet_plugins.atomic import atomic_output
from nnunet_plugins.multitask.metadata import METADATA_KEY, MultiTaskSpec
from nnunet_plugins.multitask.partial_labels import select_channels


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    net = getattr(network, "module", network)  # DDP
    return getattr(net, "_orig_mod", net)      # torch.compile


def spec_from_plans_or_dataset_json(plans: dict, dataset_json: dict) -> MultiTaskSpec:
    if METADATA_KEY in plans:
        return MultiTaskSpec.from_plans(plans)
    return MultiTaskSpec.from_dataset_json(dataset_json)


def export_task_prediction(logits, properties: dict, configuration_manager, plans_manager, label_manager,
                           value_lut, output_file: str) -> str:
    """Task-local logits -> segmentation in the original geometry -> ``value_lut`` values -> file.

    ``label_manager`` is the task's (local classes); ``value_lut[i]`` the value written for local
    class ``i`` (combined values for nnU-Net-layout outputs). Written atomically.
    """
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(logits, plans_manager, configuration_manager,
                                                                      label_manager, properties)
    value_lut = np.asarray(value_lut)
    out = value_lut[np.asarray(seg).astype(np.int64)]
    out = out.astype(np.uint8 if value_lut.max() < 256 else np.uint16)
    rw = plans_manager.image_reader_writer_class()
    with atomic_output(output_file) as tmp:
        rw.write_seg(out, tmp, properties)
    return output_file


class MultiTaskPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that predicts every case for its own task (see the module docstring).

    After initialisation ``task_spec`` holds the tasks and ``trainer_class`` the trainer whose hooks
    (``task_output_channels``, ``task_label_manager``) say which output channels belong to a task and
    how they become a segmentation. ``forced_task`` (tag or id) predicts every case for that task.
    """

    task_spec: MultiTaskSpec = None
    trainer_class = None
    forced_task = None
    current_task = None
    _task_channels = None

    # ---- set-up ------------------------------------------------------------------------------------
    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds, checkpoint_name="checkpoint_final.pth"):
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self._setup_tasks()

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._setup_tasks()

    def _setup_tasks(self, trainer_class=None):
        # a trainer class set beforehand (the trainer's own validation does that) wins over the name look-up
        trainer_class = trainer_class or self.trainer_class
        if trainer_class is None:
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

            trainer_class = recursive_find_trainer_class_by_name(self.trainer_name)
        for hook in ("task_output_channels", "task_label_manager"):
            if not hasattr(trainer_class, hook):
                raise RuntimeError(f"trainer {self.trainer_name} is not a multi-task trainer (no {hook}); predict it "
                                   f"with nnUNetv2_predict")
        self.trainer_class = trainer_class
        self.task_spec = spec_from_plans_or_dataset_json(self.plans_manager.plans, self.dataset_json)
        self.combined_label_manager = self.plans_manager.get_label_manager(self.dataset_json)
        self._local_to_combined = self.task_spec.local_to_combined_lut()

    def set_task(self, task) -> int:
        """Make the network and the predictor work on ``task`` (tag or id); returns the task id."""
        t = self.task_spec.resolve_task(task)
        net = unwrap_network(self.network)
        if not hasattr(net, "set_inference_task"):
            raise RuntimeError(f"{type(net).__name__} has no set_inference_task(); it is not a multi-task network")
        net.set_inference_task(t)
        self.label_manager = self.trainer_class.task_label_manager(self.task_spec, t)
        channels = list(self.trainer_class.task_output_channels(self.task_spec, t))
        if len(channels) != self.label_manager.num_segmentation_heads:
            raise RuntimeError(f"task {t}: {len(channels)} output channels but its label manager expects "
                               f"{self.label_manager.num_segmentation_heads}")
        self._task_channels = channels
        self.current_task = t
        return t

    def value_lut(self, task: int) -> np.ndarray:
        """Local class -> combined label value for ``task``."""
        return self._local_to_combined[task, :self.task_spec.tasks[task].num_classes]

    def task_of_output(self, ofile: str) -> int:
        if self.forced_task is not None:
            return self.task_spec.resolve_task(self.forced_task)
        return self.task_spec.task_of_case(os.path.basename(ofile))

    # ---- inference ---------------------------------------------------------------------------------
    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        if self._task_channels is None:
            raise RuntimeError("MultiTaskPredictor: call set_task() before predicting")
        # slicing commutes with the mirroring average nnU-Net computes, so slice once at the end
        return select_channels(super()._internal_maybe_mirror_and_predict(x), self._task_channels)

    def predict_case_logits(self, data: torch.Tensor, task) -> torch.Tensor:
        """Task-local logits of one preprocessed case (C, ...) for ``task`` (all folds averaged)."""
        self.set_task(task)
        return self.predict_logits_from_preprocessed_data(data)

    def _predict_item(self, item: dict, pool, pending: list) -> str:
        """Predict one preprocessed case for its task and export it (in ``pool`` if given)."""
        data = item["data"]
        if isinstance(data, str):
            path = data
            data = torch.from_numpy(np.load(path))
            os.remove(path)
        ofile = item["ofile"]
        if ofile is None:
            raise ValueError("multi-task prediction needs output file names (they carry the task prefix)")
        task = self.task_of_output(ofile)
        if pool is not None:
            while check_workers_alive_and_busy(pool, list(pool._pool), pending, allowed_num_queued=2):
                sleep(0.1)
        logits = self.predict_case_logits(data, task).cpu().numpy()
        out = ofile + self.dataset_json["file_ending"]
        args = (logits, item["data_properties"], self.configuration_manager, self.plans_manager, self.label_manager,
                self.value_lut(task), out)
        if pool is None:
            export_task_prediction(*args)
        else:
            pending.append(pool.apply_async(export_task_prediction, args))
        return out

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """nnU-Net's loop over preprocessed cases, with each case predicted for its task.

        Writes ``<ofile><file_ending>`` in the combined label values; returns the written files.
        ``num_processes_segmentation_export`` 0 exports in this process.
        """
        if save_probabilities:
            raise ValueError("saving probabilities is not supported for multi-task predictions (the probability "
                             "channels differ per task)")
        written = []
        if num_processes_segmentation_export <= 0:
            # in-process export (no worker processes), as nnU-Net's predict_from_files_sequential
            for item in data_iterator:
                written.append(self._predict_item(item, None, []))
        else:
            with multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export) as pool:
                pending = []
                for item in data_iterator:
                    written.append(self._predict_item(item, pool, pending))
                for r in pending:
                    r.get()
        if hasattr(data_iterator, "_finish"):
            data_iterator._finish()
        return written


# ---------------------------------------------------------------------------------------------------
# export in the source datasets' labels
# ---------------------------------------------------------------------------------------------------
def export_to_source(spec: MultiTaskSpec, prediction_file: str, output_folder: str, case: str | None = None,
                     subfolder_per_task: bool = True) -> str:
    """Write one combined-label prediction in its source dataset's label values, name and format.

    The output is ``output_folder/<tag>/<source case><source file ending>`` (without ``<tag>/`` when
    ``subfolder_per_task`` is False). Values that belong to another task are an error.
    """
    import SimpleITK as sitk

    name = os.path.basename(prediction_file)
    if case is None:
        for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
            if name.endswith(ending):
                case = name[:-len(ending)]
                break
        else:
            raise ValueError(f"cannot tell the case name of {prediction_file}")
    t = spec.task_of_case(case)
    task = spec.tasks[t]
    lut = spec.combined_to_source_lut(t)
    img = sitk.ReadImage(prediction_file)
    arr = sitk.GetArrayFromImage(img).astype(np.int64)
    present = np.unique(arr)
    bad = [int(v) for v in present if v < 0 or v >= len(lut) or lut[v] < 0]
    if bad:
        raise ValueError(f"{prediction_file}: values {bad} are not labels of task {task.tag!r} "
                         f"(its combined values: {list(task.combined_labels)})")
    out = lut[arr]
    dtype = np.uint8 if max(task.label_values) < 256 else np.uint16
    out_img = sitk.GetImageFromArray(out.astype(dtype))
    out_img.CopyInformation(img)
    folder = os.path.join(output_folder, task.tag) if subfolder_per_task and task.tag else output_folder
    target = os.path.join(folder, spec.source_case(case) + task.source_file_ending)
    with atomic_output(target) as tmp:
        sitk.WriteImage(out_img, tmp, True)
    return target


def export_folder_to_source(spec: MultiTaskSpec, prediction_folder: str, output_folder: str,
                            file_ending: str = ".nii.gz", subfolder_per_task: bool = True) -> list[str]:
    files = sorted(f for f in os.listdir(prediction_folder) if f.endswith(file_ending) and not f.startswith("."))
    if not files:
        raise FileNotFoundError(f"no predictions *{file_ending} in {prediction_folder}")
    return [export_to_source(spec, os.path.join(prediction_folder, f), output_folder, f[:-len(file_ending)],
                             subfolder_per_task) for f in files]


def sequential_data_iterator(predictor: nnUNetPredictor, list_of_lists: list, output_files: list):
    """nnU-Net's preprocessing in this process, one case at a time (no worker processes)."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=predictor.verbose_preprocessing)
    for files, ofile in zip(list_of_lists, output_files):
        data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        yield {"data": torch.from_numpy(data), "ofile": ofile, "data_properties": properties}


def predict_multitask(model_folder: str, input_folder: str, output_folder: str, *, folds=None,
                      checkpoint_name: str = "checkpoint_final.pth", task=None, source_labels_folder: str | None = None,
                      device: torch.device = torch.device("cpu"), tile_step_size: float = 0.5,
                      use_mirroring: bool = True, num_processes_preprocessing: int = 2,
                      num_processes_export: int = 2, verbose: bool = False) -> list[str]:
    """Predict every case of ``input_folder`` for its task; see ``nnunet-plugins predict-multitask``.

    ``num_processes_preprocessing`` / ``num_processes_export`` 0: no worker processes (small jobs).
    ``input_folder`` holds images in the combined dataset's format (``<tag>_<case>_<cccc>.nii.gz``,
    normalised, all channels), or - with ``task`` - raw images of that source task in the source's own
    format, which are normalised and padded here exactly as ``combine`` does.
    """
    from nnunet_plugins.dataset_conversion.input_check import check_model_inputs
    from nnunet_plugins.multitask.combine import convert_source_images, list_cases

    check_model_inputs(model_folder, input_folder, task)   # channels, complete files, geometry: before any work
    predictor = MultiTaskPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                   perform_everything_on_device=True, device=device, verbose=verbose,
                                   verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
    spec = predictor.task_spec
    tmp = None
    try:
        if task is not None:
            t = spec.resolve_task(task)
            predictor.forced_task = t
            if not spec.implicit:
                tmp = tempfile.mkdtemp(prefix="nnunet_plugins_predict_")
                convert_source_images(spec, t, input_folder, tmp, max(1, num_processes_preprocessing))
                input_folder = tmp
        ending = predictor.dataset_json["file_ending"]
        try:
            cases = list_cases(input_folder, ending, spec.num_input_channels, input_folder)
        except ValueError as e:
            raise ValueError(f"{e}. Images must be in the combined dataset's format ({spec.num_input_channels} "
                             f"channels); for raw images of one source task pass --task TAG") from None
        if not cases:
            raise FileNotFoundError(f"no images '<case>_0000{ending}' in {input_folder}")
        if predictor.forced_task is None:
            for case in cases:
                spec.task_of_case(case)  # unknown prefixes fail before any work
        os.makedirs(output_folder, exist_ok=True)
        names = sorted(cases)
        lists, outputs = [cases[c] for c in names], [os.path.join(output_folder, c) for c in names]
        if num_processes_preprocessing <= 0:
            written = predictor.predict_from_data_iterator(sequential_data_iterator(predictor, lists, outputs),
                                                           num_processes_segmentation_export=num_processes_export)
        else:
            written = predictor.predict_from_files(lists, outputs, save_probabilities=False, overwrite=True,
                                                   num_processes_preprocessing=num_processes_preprocessing,
                                                   num_processes_segmentation_export=num_processes_export)
        if source_labels_folder is not None:
            written = [export_to_source(spec, f, source_labels_folder,
                                        os.path.basename(f)[:-len(ending)]) for f in written]
        return written
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
