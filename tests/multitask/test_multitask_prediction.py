"""Per-task prediction (MultiTaskPredictor) and export back to the source datasets' labels."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from multitask_helpers import toy_spec
from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.multitask.prediction import MultiTaskPredictor, export_task_prediction, export_to_source
from nnunet_plugins.trainers import UniSegTrainer

SPEC = toy_spec(channels=(1, 2), classes=(3, 4))   # A: local 0..2 -> combined 0,1,2 / B: local 0..3 -> 0,3,4,5
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


class TaskEcho(nn.Module):
    """Logits that reveal the task: class t+1 wins for task t; channel 3 is a decoy beyond task A's classes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.inference_task = None

    def set_inference_task(self, t):
        self.inference_task = t

    def forward(self, x, task_id=None):
        t = self.inference_task if task_id is None else int(task_id)
        if t is None:
            raise RuntimeError("no task")
        out = torch.zeros(x.shape[0], 4, *x.shape[2:]) + self.w
        out[:, t + 1] = 5.0
        if t == 0:
            out[:, 3] = 10.0
        return out


def make_predictor(network):
    plans = {"dataset_name": "Dataset020_Uni", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "multitask": SPEC.to_plans_entry(),
             "configurations": {"3d_fullres": {
                 "patch_size": [8, 16, 16], "spacing": [3.0, 0.8, 0.8],
                 "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                 "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                        "force_separate_z": None},
                 "architecture": {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}}}}
    dataset_json = {"channel_names": {"0": "noNorm", "1": "noNorm"}, "labels": SPEC.combined_labels_dict(),
                    "file_ending": ".nii.gz", "multitask": SPEC.to_json()}
    pm = PlansManager(plans)
    p = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.trainer_class = UniSegTrainer
    p.manual_initialization(network, pm, pm.get_configuration("3d_fullres"), [network.state_dict()], dataset_json,
                            "UniSegTrainer", (0, 1, 2))
    return p


def properties(shape=(8, 24, 20)):
    return {"spacing": [3.0, 0.8, 0.8], "shape_after_cropping_and_before_resampling": shape,
            "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape],
            "sitk_stuff": {"spacing": (0.8, 0.8, 3.0), "origin": (1.0, 2.0, 3.0), "direction": DIRECTION}}


def test_each_case_is_predicted_for_its_task_with_its_own_channels():
    p = make_predictor(TaskEcho())
    data = torch.randn(2, 8, 24, 20)
    p.set_task("A")
    la = p.predict_sliding_window_return_logits(data)
    assert la.shape[0] == 3 and (la.argmax(0) == 1).all(), "task A: only its 3 channels (the decoy is cut off)"
    p.set_task(1)
    lb = p.predict_sliding_window_return_logits(data)
    assert lb.shape[0] == 4 and (lb.argmax(0) == 2).all()
    np.testing.assert_array_equal(p.value_lut(1), [0, 3, 4, 5])


def test_data_iterator_predicts_and_writes_combined_labels(tmp_path):
    p = make_predictor(TaskEcho())
    items = [{"data": torch.randn(2, 8, 24, 20), "ofile": str(tmp_path / "B_case1"), "data_properties": properties()},
             {"data": torch.randn(2, 8, 24, 20), "ofile": str(tmp_path / "A_case2"), "data_properties": properties()}]
    written = p.predict_from_data_iterator(iter(items), num_processes_segmentation_export=1)
    assert written == [str(tmp_path / "B_case1.nii.gz"), str(tmp_path / "A_case2.nii.gz")]
    b = sitk.ReadImage(written[0])
    assert set(np.unique(sitk.GetArrayFromImage(b))) == {4}       # local class 2 of task B = combined 4
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(written[1])))) == {1}
    np.testing.assert_allclose(b.GetOrigin(), (1.0, 2.0, 3.0))
    np.testing.assert_allclose(b.GetDirection(), DIRECTION)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    with pytest.raises(KeyError, match="not a task"):
        p.predict_from_data_iterator(iter([{"data": torch.randn(2, 8, 24, 20), "ofile": str(tmp_path / "Z_c"),
                                            "data_properties": properties()}]), num_processes_segmentation_export=0)
    # in-process export writes the same file as the worker pool
    again = p.predict_from_data_iterator(iter(items[:1]), num_processes_segmentation_export=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(again[0])), sitk.GetArrayFromImage(b))


def test_export_task_prediction_uses_the_value_table(tmp_path):
    p = make_predictor(TaskEcho())
    logits = torch.zeros(4, 8, 24, 20)
    logits[3, :4] = 1.0   # local class 3 in the upper half, background elsewhere
    out = export_task_prediction(logits.numpy(), properties(), p.configuration_manager, p.plans_manager,
                                 UniSegTrainer.task_label_manager(SPEC, 1), [0, 3, 4, 5], str(tmp_path / "B_x.nii.gz"))
    arr = sitk.GetArrayFromImage(sitk.ReadImage(out))
    assert (arr[:4] == 5).all() and (arr[4:] == 0).all()


def test_stock_nnunet_predictor_fails_clearly_without_a_task():
    net = UniSeg(2, 4, 2, patch_size=(8, 16, 16), features_per_stage=(4, 8), kernel_sizes=(3, 3), strides=(1, 2),
                 deep_supervision=False, official_generic_unet=False)
    p = make_predictor(net)
    stock = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                            allow_tqdm=False)
    stock.manual_initialization(net, p.plans_manager, p.configuration_manager, None, p.dataset_json, "UniSegTrainer",
                                None)
    with pytest.raises(RuntimeError, match="predict-multitask"):
        stock.predict_sliding_window_return_logits(torch.randn(2, 8, 16, 16))


def _write(arr, path, spacing=(0.8, 0.8, 3.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin((5.0, -3.0, 1.0))
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, path)
    return img


def test_export_to_source_labels(tmp_path):
    arr = np.zeros((4, 6, 6), dtype=np.uint8)
    arr[1, 1:3, 1:3] = 3
    arr[2, 3:5, 3:5] = 5
    src = _write(arr, str(tmp_path / "B_case7.nii.gz"))
    out = export_to_source(SPEC, str(tmp_path / "B_case7.nii.gz"), str(tmp_path / "out"))
    assert out == str(tmp_path / "out" / "B" / "case7.nii.gz")
    img = sitk.ReadImage(out)
    got = sitk.GetArrayFromImage(img)
    np.testing.assert_array_equal(got, np.select([arr == 3, arr == 5], [10, 30], 0))   # B's source values
    np.testing.assert_allclose(img.GetOrigin(), src.GetOrigin())
    np.testing.assert_allclose(img.GetDirection(), src.GetDirection())
    arr[0, 0, 0] = 1   # a value of task A in a task-B case
    _write(arr, str(tmp_path / "B_case8.nii.gz"))
    with pytest.raises(ValueError, match=r"values \[1\] are not labels of task 'B'"):
        export_to_source(SPEC, str(tmp_path / "B_case8.nii.gz"), str(tmp_path / "out"))
