"""DoDNetTrainer / TransDoDNetTrainer: binary channels from task metadata, partial-label loss through the
trainer, networks from plans, optimisers and schedules, patch fitting, prediction back to source labels."""
import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.training.binary_channels import BinaryChannel, BinaryChannelLabelManager
from nnunet_plugins.multitask.metadata import MultiTaskSpec, TaskSpec
from nnunet_plugins.multitask.prediction import MultiTaskPredictor, export_task_prediction, export_to_source
from nnunet_plugins.trainers import DoDNetTrainer, TransDoDNetTrainer
from nnunet_plugins.architectures.contract import fit_patch
from nnunet_plugins.training.binary_channels import channel_targets_for, task_binary_channels
from nnunet_plugins.training.lr_schedulers import WarmupPolyLRScheduler, warmup_epochs_for

PLAIN = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
         "arch_kwargs": {}, "_kw_requires_import": []}
TINY_DODNET = {"network_class_name": "nnunet_plugins.architectures.dodnet.DoDNet",
               "arch_kwargs": {"features_per_stage": [4, 8, 8], "blocks_per_stage": [1, 1, 1],
                               "strides": [1, [1, 2, 2], 2], "norm_groups": 4, "head_channels": 4,
                               "conv_op": "torch.nn.modules.conv.Conv3d"},
               "_kw_requires_import": ["conv_op"]}
TINY_TRANSDODNET = {"network_class_name": "nnunet_plugins.architectures.transdodnet.TransDoDNet",
                    "arch_kwargs": {"stem_channels": 4, "backbone_planes": [2, 4, 4], "backbone_blocks": [1, 1, 1],
                                    "d_model": 12, "n_heads": 2, "d_ffn": 16, "num_encoder_layers": 1,
                                    "num_decoder_layers": 1, "n_levels": 2, "n_points": 2,
                                    "decoder_channels": [4, 8, 8, 8], "head_channels": 4},
                    "_kw_requires_import": []}


def _task(tag, labels, values, names, combined, regions=None, channels=1):
    return TaskSpec(tag=tag, source_dataset=f"Dataset_{tag}", channel_names={str(i): "CT" for i in range(channels)},
                    label_names=names, label_values=values, combined_labels=combined, source_labels=labels,
                    source_regions_class_order=regions)


# Liv: organ includes tumour (regions); Spl: organ only; Kid: plain labels with non-consecutive source values
SPEC = MultiTaskSpec(tasks=(
    _task("Liv", {"background": 0, "liver": [1, 2], "tumour": 2}, (0, 1, 2), ("background", "label_1", "tumour"),
          (0, 1, 2), regions=[1, 2]),
    _task("Spl", {"background": 0, "spleen": 1}, (0, 1), ("background", "spleen"), (0, 3)),
    _task("Kid", {"background": 0, "kidney": 2, "cyst": 5}, (0, 2, 5), ("background", "kidney", "cyst"), (0, 4, 5)),
), num_input_channels=1)


def mots_like_spec(num_tasks=7):
    tasks = [_task(f"T{t}", {"background": 0, "organ": [1, 2], "tumour": 2}, (0, 1, 2),
                   ("background", "label_1", "tumour"), (0, 2 * t + 1, 2 * t + 2), regions=[1, 2])
             for t in range(num_tasks)]
    return MultiTaskSpec(tasks=tuple(tasks), num_input_channels=1)


def make_plans(patch, arch, spec=SPEC, configuration="3d_fullres"):
    return {
        "dataset_name": "Dataset999_Test", "plans_name": "TestPlans", "label_manager": "LabelManager",
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [64, 64, 64],
        "foreground_intensity_properties_per_channel": {}, "multitask": spec.to_plans_entry(),
        "configurations": {configuration: {
            "data_identifier": "TestPlans_" + configuration, "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": [1.0] * len(patch), "normalization_schemes": ["NoNormalization"],
            "use_mask_for_norm": [False], "architecture": arch, "batch_dice": False,
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None}}},
    }


def dataset_json(spec=SPEC):
    return {"channel_names": {"0": "noNorm"}, "labels": spec.combined_labels_dict(), "numTraining": 2,
            "file_ending": ".nii.gz", "multitask": spec.to_json()}


@pytest.fixture
def results_env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    monkeypatch.delenv("NNUNET_PLUGINS_EPOCHS", raising=False)
    for configuration in ("3d_fullres", "2d"):
        data = tmp_path / "pre" / "Dataset999_Test" / f"TestPlans_{configuration}"
        data.mkdir(parents=True)
        (data / "case.b2nd").write_bytes(b"")   # initialize() picks the dataset class from the files


def make_trainer(cls, plans, configuration="3d_fullres", spec=SPEC):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return cls(plans, configuration, 0, dataset_json(spec), device=torch.device("cpu"))


# ---- channels from the task metadata ---------------------------------------------------------------
def test_binary_channels_and_targets_come_from_each_tasks_labels():
    channels = task_binary_channels(SPEC)
    # local class indices: Liv regions (liver = local 1 and 2, painted 1; tumour = local 2), Kid values 2, 5 -> 1, 2
    assert channels == [[BinaryChannel("liver", (1, 2), 1), BinaryChannel("tumour", (2,), 2)],
                        [BinaryChannel("spleen", (1,), 1)],
                        [BinaryChannel("kidney", (1,), 1), BinaryChannel("cyst", (2,), 2)]]
    targets = channel_targets_for(SPEC)
    seg = torch.tensor([0, 1, 2, 3, 4, 5]).view(1, 1, 6).expand(3, 1, 6)   # combined values
    target, annotated = targets(seg, torch.tensor([0, 1, 2]))
    assert annotated.tolist() == [[True, True], [True, False], [True, True]]
    expected = np.zeros((3, 2, 6))
    expected[0, 0, [1, 2]] = 1      # liver includes tumour
    expected[0, 1, 2] = 1
    expected[1, 0, 3] = 1           # spleen
    expected[2, 0, 4], expected[2, 1, 5] = 1, 1
    np.testing.assert_array_equal(target.numpy(), expected)
    assert DoDNetTrainer.task_output_channels(SPEC, 1) == [0]
    assert TransDoDNetTrainer.task_output_channels(SPEC, 2) == [0, 1]


def test_missing_or_inconsistent_source_labels_are_clear_errors():
    bare = MultiTaskSpec(tasks=(_task("X", {}, (0, 1), ("background", "a"), (0, 1)),), num_input_channels=1)
    with pytest.raises(ValueError, match="task 'X'.*no source 'labels'"):
        task_binary_channels(bare)
    odd = MultiTaskSpec(tasks=(_task("Y", {"background": 0, "a": [1, 7], "b": 1}, (0, 1), ("background", "a"), (0, 1),
                                     regions=[1, 1]),), num_input_channels=1)
    with pytest.raises(ValueError, match=r"task 'Y'.*\[7\]"):
        task_binary_channels(odd)


# ---- networks from plans ---------------------------------------------------------------------------
def test_stock_plans_give_the_official_networks():
    spec = mots_like_spec()
    pm = PlansManager(make_plans([64, 192, 192], PLAIN, spec))
    cm = pm.get_configuration("3d_fullres")
    net = DoDNetTrainer.build_network_architecture(pm, cm, 1, spec.num_combined_labels, False)
    assert isinstance(net, DoDNet) and net.num_classes == 2 and net.num_tasks == 7
    assert sum(p.numel() for p in net.parameters()) == 17_329_528
    del net
    net = TransDoDNetTrainer.build_network_architecture(pm, cm, 1, spec.num_combined_labels, False)
    assert isinstance(net, TransDoDNet) and net.num_classes == 2 and net.num_tasks == 7
    assert sum(p.numel() for p in net.parameters()) == 39_049_941


@pytest.mark.parametrize("cls,arch,patch", [(DoDNetTrainer, TINY_DODNET, [8, 16, 16]),
                                            (TransDoDNetTrainer, TINY_TRANSDODNET, [16, 32, 32])])
def test_trainer_builds_from_plans_arch_kwargs_and_inference_rebuilds_it(results_env, cls, arch, patch):
    trainer = make_trainer(cls, make_plans(patch, arch))
    trainer.initialize()
    net = trainer.network
    assert net.num_tasks == 3 and net.num_classes == 2 and net.input_channels == 1   # Liv / Kid have 2 channels
    if cls is DoDNetTrainer:
        assert [s[0].conv1.out_channels for s in net.encoder_stages] == [4, 8, 8]     # the plans' widths
    else:
        assert net.backbone.out_channels == [4, 8, 16, 16]
    assert not trainer.enable_deep_supervision and trainer._get_deep_supervision_scales() is None
    trainer.set_deep_supervision_enabled(True)   # nnU-Net's toggle: there are no auxiliary heads
    out = net(torch.randn(2, 1, *patch), torch.tensor([0, 2]))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, *patch)
    # what predict-multitask builds from the model folder's plans: the same network, weights load strictly
    inference = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 6, False)
    inference.load_state_dict(net.state_dict(), strict=True)
    inference.eval()
    net.eval()
    x = torch.randn(1, 1, *patch)
    inference.set_inference_task(1)
    torch.testing.assert_close(inference(x), net(x, torch.tensor([1])))
    inference.set_inference_task(None)
    with pytest.raises(RuntimeError, match="predict-multitask"):   # what the stock nnUNetv2_predict runs into
        inference(x)


def test_plans_must_not_set_what_the_task_metadata_decides():
    arch = copy.deepcopy(TINY_DODNET)
    arch["arch_kwargs"]["num_classes"] = 5
    pm = PlansManager(make_plans([8, 16, 16], arch))
    with pytest.raises(ValueError, match="num_classes"):
        DoDNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 6, False)


# ---- loss through the trainer ----------------------------------------------------------------------
def _reference_loss(logits, target, annotated, smooth=1.0):
    """Binary Dice + BCE per (sample, channel), mean over annotating samples per channel, mean over channels."""
    z, t, m = logits.double().numpy(), target.double().numpy(), annotated
    dice_c, bce_c = [], []
    for c in range(z.shape[1]):
        d, b = [], []
        for s in range(z.shape[0]):
            if not m[s][c]:
                continue
            p = 1 / (1 + np.exp(-z[s, c]))
            d.append(1 - 2 * (p * t[s, c]).sum() / (p.sum() + t[s, c].sum() + smooth))
            b.append(np.mean(np.maximum(z[s, c], 0) - z[s, c] * t[s, c] + np.log1p(np.exp(-np.abs(z[s, c])))))
        if d:
            dice_c.append(np.mean(d))
            bce_c.append(np.mean(b))
    return np.mean(dice_c) + np.mean(bce_c)


def test_compute_loss_masks_channels_a_task_does_not_annotate(results_env):
    trainer = make_trainer(DoDNetTrainer, make_plans([8, 16, 16], TINY_DODNET))
    trainer.initialize()
    g = torch.Generator().manual_seed(0)
    seg = torch.zeros(2, 1, 4, 6, 6, dtype=torch.int16)
    seg[0, 0, 1:3, 1:4, 1:4] = 3                 # sample 0: task Spl, spleen (combined 3)
    seg[1, 0, 0:2, 2:5, 2:5] = 1                 # sample 1: task Liv, liver with a tumour
    seg[1, 0, 1, 3, 3] = 2
    task_id = torch.tensor([1, 0])
    logits = torch.randn(2, 2, 4, 6, 6, generator=g)
    loss, log = trainer.compute_loss(logits, {"target": seg, "task_id": task_id})
    assert log == {}
    target = np.zeros((2, 2, 4, 6, 6))
    target[0, 0] = seg[0, 0].numpy() == 3
    target[1, 0] = np.isin(seg[1, 0].numpy(), [1, 2])
    target[1, 1] = seg[1, 0].numpy() == 2
    expected = _reference_loss(logits, torch.from_numpy(target), [[True, False], [True, True]])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the spleen sample's second output is not annotated by its task: "tumour everywhere" costs nothing
    z = logits.clone()
    z[0, 1] = 20.0
    z.requires_grad_(True)
    masked, _ = trainer.compute_loss([z], {"target": [seg], "task_id": task_id})   # deep-supervision lists too
    assert masked.item() == pytest.approx(loss.item(), rel=1e-6)
    masked.backward()
    assert z.grad[0, 1].abs().sum() == 0 and z.grad[0, 0].abs().sum() > 0 and z.grad[1, 1].abs().sum() > 0
    # and had it been trained as background, the same prediction would have cost a lot
    as_background = _reference_loss(z.detach(), torch.from_numpy(target), [[True, True], [True, True]])
    assert as_background > loss.item() + 1.0


@pytest.mark.parametrize("cls,arch,patch,clip", [(DoDNetTrainer, TINY_DODNET, [8, 16, 16], 12.0),
                                                 (TransDoDNetTrainer, TINY_TRANSDODNET, [16, 32, 32], 0.1)])
def test_train_and_validation_steps(results_env, monkeypatch, cls, arch, patch, clip):
    trainer = make_trainer(cls, make_plans(patch, arch))
    trainer.initialize()
    clipped = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        clipped.append(max_norm)
        return original(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    seg = torch.zeros(2, 1, *patch, dtype=torch.int16)
    seg[:, :, 2:6, 4:12, 4:12] = 4          # kidney
    seg[:, :, 2:6, 4:8, 4:8] = 5            # cyst
    batch = {"data": torch.randn(2, 1, *patch), "target": seg, "task_id": torch.tensor([2, 2]), "keys": ["a", "b"]}
    before = {k: v.detach().clone() for k, v in trainer.network.named_parameters()}
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"]) and clipped == [clip]
    changed = {k for k, v in trainer.network.named_parameters() if not torch.equal(before[k], v)}
    assert any("controller" in k for k in changed), "the dynamic-head controller is trained"
    with torch.no_grad():
        val = trainer.validation_step(batch)
    # pseudo Dice per combined structure (5): a Kid batch only touches combined 4 and 5
    assert val["tp_hard"].shape == (5,)
    assert not (val["tp_hard"][:3].any() or val["fp_hard"][:3].any() or val["fn_hard"][:3].any())
    assert val["tp_hard"][3] + val["fn_hard"][3] == 2 * 4 * 8 * 8 - 2 * 4 * 4 * 4
    assert val["tp_hard"][4] + val["fn_hard"][4] == 2 * 4 * 4 * 4


# ---- optimisers and schedules ----------------------------------------------------------------------
def test_dodnet_optimiser_and_poly_schedule(results_env):
    trainer = make_trainer(DoDNetTrainer, make_plans([8, 16, 16], TINY_DODNET))
    trainer.initialize()
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.99, True, 0.0)
    assert trainer.grad_clip_norm == 12.0 and trainer.num_epochs == 1000
    for epoch in (0, 1, 500, 999):
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - epoch / 1000) ** 0.9)


def test_transdodnet_optimiser_and_warmup_schedule(results_env):
    trainer = make_trainer(TransDoDNetTrainer, make_plans([16, 32, 32], TINY_TRANSDODNET))
    trainer.initialize()
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and trainer.grad_clip_norm == 0.1
    assert trainer.warmup_epochs == 10 and trainer.num_epochs == 1000
    # official adjust_learning_rate: 1e-2 * lr + e * (lr - 1e-2 * lr) / 10 for e < 10, then poly of e
    lr = 2e-4
    expected = {0: 0.01 * lr, 1: 0.01 * lr + (lr - 0.01 * lr) / 10, 5: 0.01 * lr + 5 * (lr - 0.01 * lr) / 10,
                9: 0.01 * lr + 9 * (lr - 0.01 * lr) / 10, 10: lr * (1 - 10 / 1000) ** 0.9,
                500: lr * 0.5 ** 0.9, 999: lr * (1 / 1000) ** 0.9}
    for epoch, value in expected.items():
        sched.step(epoch)
        assert opt.param_groups[0]["lr"] == pytest.approx(value, rel=1e-12), epoch


def test_short_runs_scale_the_warmup(results_env, monkeypatch):
    assert [warmup_epochs_for(n) for n in (1000, 100, 99, 50, 20, 10, 9, 3, 1)] == [10, 10, 9, 5, 2, 1, 0, 0, 0]
    monkeypatch.setenv("NNUNET_PLUGINS_EPOCHS", "50")
    trainer = make_trainer(TransDoDNetTrainer, make_plans([16, 32, 32], TINY_TRANSDODNET))
    trainer.initialize()
    assert trainer.num_epochs == 50 and trainer.warmup_epochs == 5
    trainer.lr_scheduler.step(4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * (0.01 + 0.99 * 4 / 5))
    trainer.lr_scheduler.step(5)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * (1 - 5 / 50) ** 0.9)
    monkeypatch.setenv("NNUNET_PLUGINS_EPOCHS", "3")
    trainer = make_trainer(TransDoDNetTrainer, make_plans([16, 32, 32], TINY_TRANSDODNET))
    trainer.initialize()
    trainer.lr_scheduler.step(0)
    assert trainer.warmup_epochs == 0 and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="warm-up"):
        WarmupPolyLRScheduler(torch.optim.AdamW([nn.Parameter(torch.zeros(1))]), 1e-3, 5, 5)


# ---- patch -----------------------------------------------------------------------------------------
def test_patches_are_fitted_and_recorded_in_the_plans(results_env):
    trainer = make_trainer(DoDNetTrainer, make_plans([20, 40, 56], PLAIN))          # official strides: 16
    assert trainer.configuration_manager.patch_size == [16, 32, 64]
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 64]
    trainer = make_trainer(DoDNetTrainer, make_plans([6, 17, 11], TINY_DODNET))     # strides 1, (1,2,2), 2
    assert trainer.configuration_manager.patch_size == [6, 16, 12]
    trainer = make_trainer(TransDoDNetTrainer, make_plans([20, 40, 72], PLAIN))     # ResNet-50: (16, 32, 32)
    assert trainer.configuration_manager.patch_size == [16, 32, 64]
    trainer = make_trainer(TransDoDNetTrainer, make_plans([16, 32, 32], PLAIN))
    assert trainer.configuration_manager.patch_size == [16, 32, 64], "one voxel at the deepest level is refused"
    trainer = make_trainer(TransDoDNetTrainer, make_plans([10, 20, 20], TINY_TRANSDODNET))  # 3 stages: (8, 16, 16)
    assert trainer.configuration_manager.patch_size == [8, 16, 32]
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["patch_size"] == [8, 16, 32]
    assert fit_patch([30, 50], (16, 16)) == [32, 48]


def test_dodnet_trains_a_2d_configuration_transdodnet_refuses_it(results_env):
    trainer = make_trainer(DoDNetTrainer, make_plans([40, 56], PLAIN, configuration="2d"), configuration="2d")
    assert trainer.configuration_manager.patch_size == [32, 64]
    arch = copy.deepcopy(TINY_DODNET)
    arch["arch_kwargs"].update(conv_op="torch.nn.modules.conv.Conv2d", strides=[1, 2, 2])
    trainer = make_trainer(DoDNetTrainer, make_plans([16, 16], arch, configuration="2d"), configuration="2d")
    trainer.initialize()
    assert trainer.network.conv_op is nn.Conv2d
    seg = torch.zeros(2, 1, 16, 16, dtype=torch.int16)
    seg[:, :, 4:10, 4:10] = 1
    seg[:, :, 6:8, 6:8] = 2
    out = trainer.train_step({"data": torch.randn(2, 1, 16, 16), "target": seg, "task_id": torch.tensor([0, 0])})
    assert np.isfinite(out["loss"])
    with pytest.raises(ValueError, match="TransDoDNet is a 3-D network.*'2d'"):
        make_trainer(TransDoDNetTrainer, make_plans([64, 64], PLAIN, configuration="2d"), configuration="2d")


# ---- prediction back to labels ---------------------------------------------------------------------
class ChannelEcho(nn.Module):
    """Fixed sigmoid logits: channel 0 fires in z < 4, channel 1 in z < 2 (z is the first spatial axis)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.task = None

    def set_inference_task(self, t):
        self.task = t

    def forward(self, x, task_id=None):
        out = torch.full((x.shape[0], 2, *x.shape[2:]), -5.0) + self.w
        out[:, 0, :4] = 5.0
        out[:, 1, :2] = 5.0
        return out


def test_predictions_become_each_tasks_labels_then_source_labels(tmp_path):
    for t, lm_expected in ((0, [2, 2, 1, 1, 0]), (1, [1, 1, 1, 1, 0]), (2, [2, 2, 1, 1, 0])):
        lm = DoDNetTrainer.task_label_manager(SPEC, t)
        assert isinstance(lm, BinaryChannelLabelManager)
        logits = torch.tensor([[5.0, 5, 5, 5, -5], [5, 5, -5, -5, -5]])[:len(task_binary_channels(SPEC)[t])]
        seg = np.asarray(lm.convert_logits_to_segmentation(logits.view(-1, 5, 1, 1))).ravel().tolist()
        assert seg == lm_expected, t
    plans = make_plans([8, 16, 16], TINY_DODNET)
    pm = PlansManager(plans)
    predictor = MultiTaskPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                   perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.trainer_class = DoDNetTrainer
    net = ChannelEcho()
    predictor.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), [net.state_dict()], dataset_json(),
                                    "DoDNetTrainer", None)
    shape = (8, 16, 16)
    props = {"spacing": [1.0, 1.0, 1.0], "shape_after_cropping_and_before_resampling": shape,
             "shape_before_cropping": shape, "bbox_used_for_cropping": [[0, s] for s in shape],
             "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                            "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
    expected_source = {"Liv": (2, 1), "Spl": (1, 1), "Kid": (5, 2)}   # (z < 2, 2 <= z < 4) source values
    expected_combined = {"Liv": (2, 1), "Spl": (3, 3), "Kid": (5, 4)}
    for tag in ("Liv", "Spl", "Kid"):
        logits = predictor.predict_case_logits(torch.zeros(1, *shape), tag)
        assert logits.shape[0] == len(task_binary_channels(SPEC)[SPEC.task_index(tag)])
        file = export_task_prediction(logits.numpy(), props, predictor.configuration_manager, pm,
                                      predictor.label_manager, predictor.value_lut(SPEC.task_index(tag)),
                                      str(tmp_path / f"{tag}_c1.nii.gz"))
        combined = sitk.GetArrayFromImage(sitk.ReadImage(file))
        hi, lo = expected_combined[tag]
        assert (combined[:2] == hi).all() and (combined[2:4] == lo).all() and (combined[4:] == 0).all(), tag
        source = sitk.GetArrayFromImage(sitk.ReadImage(export_to_source(SPEC, file, str(tmp_path / "src"))))
        hi, lo = expected_source[tag]
        assert (source[:2] == hi).all() and (source[2:4] == lo).all() and (source[4:] == 0).all(), tag


def test_online_segmentation_matches_the_label_manager(results_env):
    trainer = make_trainer(DoDNetTrainer, make_plans([8, 16, 16], TINY_DODNET))
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 2, 3, 4, 5, generator=g)
    for task in (0, 2):
        lm = DoDNetTrainer.task_label_manager(SPEC, task)
        online = trainer.logits_to_local_segmentation(logits, task)
        for b in range(2):
            ref = np.asarray(lm.convert_logits_to_segmentation(logits[b]))
            np.testing.assert_array_equal(online[b, 0].numpy(), ref)
    online = trainer.logits_to_local_segmentation(logits[:, :1], 1)
    np.testing.assert_array_equal(online.numpy(), (logits[:, :1] > 0).long().numpy())
