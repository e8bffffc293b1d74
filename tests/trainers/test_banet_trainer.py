"""BANetTrainer without subprocesses: network from plans, losses, train/validation steps, consistency term."""
import copy

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_plugins.architectures.banet import BANetPlainConvUNet, BANetResidualEncoderUNet
from nnunet_plugins.training.boundary import inner_boundary
from nnunet_plugins.architectures.banet import banet_network_class
from nnunet_plugins.trainers.banet import BANetTrainer, BANetTrainer_consistency

KIPA_LABELS = {"background": 0, "vein": 1, "kidney": 2, "artery": 3, "tumour": 4}
PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def make_plans(dim=3, network=PLAIN):
    patch = [8, 16, 16] if dim == 3 else [16, 16]
    strides = [[1] * dim, [1, 2, 2] if dim == 3 else [2, 2], [2] * dim, [2] * dim]
    kwargs = {"n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
              "kernel_sizes": [[3] * dim] * 4, "strides": strides, "n_conv_per_stage_decoder": [1, 1, 1],
              "conv_bias": True, "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if network == RESENC:
        kwargs["n_blocks_per_stage"] = [1, 2, 2, 2]
    else:
        kwargs["n_conv_per_stage"] = [2, 2, 2, 2]
    config = {"data_identifier": "nnUNetPlans_x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
              "patch_size": patch, "median_image_size_in_voxels": patch, "spacing": [1.0] * dim,
              "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
              "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
              "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
              "architecture": {"network_class_name": network, "arch_kwargs": kwargs,
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
              "batch_dice": True}
    return {"dataset_name": "Dataset900_KiPAUnit", "plans_name": "nnUNetPlans", "continue_training": False,
            "original_median_spacing_after_transp": [1.0] * 3, "original_median_shape_after_transp": [8, 16, 16],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {"cfg": config}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0,
                                                                  "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                                                                  "std": 1.0}}}


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": KIPA_LABELS, "numTraining": 4, "file_ending": ".nii.gz"}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return tmp_path


def make_trainer(cls=BANetTrainer, dim=3, network=PLAIN, dataset_json=DATASET_JSON):
    trainer = cls(make_plans(dim, network), "cfg", 0, copy.deepcopy(dataset_json), torch.device("cpu"))
    trainer.num_input_channels = 1
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


def make_batch(trainer, dim=3, seed=0, validation=False):
    """A batch as nnU-Net's data loader makes it: per-sample BA-Net pipeline, then stacked."""
    rng = np.random.default_rng(seed)
    patch = tuple(trainer.configuration_manager.patch_size)
    scales = trainer._get_deep_supervision_scales()
    if validation:
        pipeline = trainer.get_validation_transforms(scales)
    else:
        pipeline = trainer.get_training_transforms(patch, (0, 0), scales, tuple(range(dim)), False)
    images, targets = [], []
    for _ in range(2):
        seg = np.zeros(patch, np.int16)
        seg[tuple(slice(1, p - 2) for p in patch)] = 2  # kidney
        seg[tuple(slice(2, p - 4) for p in patch)] = 4  # tumour inside
        seg[(0,) * dim] = 1
        out = pipeline(image=torch.from_numpy(rng.normal(size=(1, *patch)).astype(np.float32)),
                       segmentation=torch.from_numpy(seg)[None])
        images.append(out["image"])
        targets.append(out["segmentation"])
    return {"data": torch.stack(images), "target": [torch.stack(t) for t in zip(*targets)]}


@pytest.mark.parametrize("network,expected", [(PLAIN, BANetPlainConvUNet), (RESENC, BANetResidualEncoderUNet)])
def test_network_from_plans(results, network, expected):
    trainer = make_trainer(network=network)
    assert type(trainer.network) is expected
    assert trainer.network.decoder.num_classes == 5
    assert trainer.network.deep_supervision is True
    trainer.set_deep_supervision_enabled(False)
    assert trainer.network.boundary_decoder.deep_supervision is False
    assert trainer.network(torch.randn(1, 1, 8, 16, 16)).shape == (1, 5, 8, 16, 16)
    # ordinary nnU-Net v2 plans build the official layout (no bias in transposed convs and heads) ...
    net = trainer.network
    assert net.official_v1_layout is True
    assert all(m.bias is None for dec in (net.decoder, net.boundary_decoder)
               for m in list(dec.transpconvs) + list(dec.seg_layers))
    # ... without writing the option into the trainer's plans
    assert "official_v1_layout" not in trainer.configuration_manager.network_arch_init_kwargs


def test_network_class_mapping_and_clear_error():
    assert banet_network_class(PLAIN) == "nnunet_plugins.architectures.banet.BANetPlainConvUNet"
    assert banet_network_class("PlainConvUNet") == "nnunet_plugins.architectures.banet.BANetPlainConvUNet"
    assert banet_network_class(RESENC).endswith("BANetResidualEncoderUNet")
    assert banet_network_class(banet_network_class(PLAIN)) == banet_network_class(PLAIN)
    with pytest.raises(ValueError, match="Primus"):
        banet_network_class("dynamic_network_architectures.architectures.primus.Primus")


def test_unsupported_plans_and_regions_fail_at_construction(results):
    plans = make_plans()
    plans["configurations"]["cfg"]["architecture"]["network_class_name"] = "some.module.TransformerNet"
    with pytest.raises(ValueError, match="TransformerNet"):
        BANetTrainer(plans, "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    regions = {**DATASET_JSON, "labels": {"background": 0, "kidney": [2, 4], "tumour": 4},
               "regions_class_order": [2, 4]}
    with pytest.raises(ValueError, match="region"):
        BANetTrainer(make_plans(), "cfg", 0, regions, torch.device("cpu"))


def test_loss_is_seg_plus_boundary_deep_supervised(results):
    trainer = make_trainer()
    batch = make_batch(trainer)
    assert [t.shape[1] for t in batch["target"]] == [2, 2, 2]
    torch.manual_seed(0)
    seg, bdr = trainer.network(batch["data"], return_boundary=True)
    losses = trainer.compute_losses(seg, bdr, batch["target"])
    # independent computation: nnU-Net's Dice+CE per scale, nnU-Net's DS weights (last scale unused)
    weights = np.array([1, 0.5, 0.0]) / 1.5
    dice_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             dice_class=MemoryEfficientSoftDiceLoss)
    seg_expected = sum(w * dice_ce(o, t[:, :1]) for w, o, t in zip(weights, seg, batch["target"]) if w)
    bdr_expected = sum(w * dice_ce(o, t[:, 1:]) for w, o, t in zip(weights, bdr, batch["target"]) if w)
    torch.testing.assert_close(losses["seg_loss"], seg_expected)
    torch.testing.assert_close(losses["boundary_loss"], bdr_expected)
    torch.testing.assert_close(losses["loss"], seg_expected + bdr_expected)
    assert "consistency_loss" not in losses
    # the boundary channel is the boundary of the label channel
    full = batch["target"][0]
    assert torch.equal(full[:, 1:], inner_boundary(full[:, :1], 3).to(full.dtype))
    assert 0 < full[:, 1].float().mean() < 0.5


def test_train_step_updates_both_decoders_and_validation_step_reports_dice(results):
    trainer = make_trainer()
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    out = trainer.train_step(make_batch(trainer))
    assert set(out) == {"loss", "seg_loss", "boundary_loss"}
    assert np.isclose(out["loss"], out["seg_loss"] + out["boundary_loss"], rtol=1e-5)
    after = trainer.network.state_dict()
    for prefix in ("encoder.", "decoder.stages", "boundary_decoder.stages", "boundary_decoder.seg_layers.0"):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    trainer.network.eval()
    val = trainer.validation_step(make_batch(trainer, seed=1, validation=True))
    assert val["tp_hard"].shape == (4,) and val["fp_hard"].shape == (4,) and val["fn_hard"].shape == (4,)
    assert np.isfinite(val["loss"])
    trainer.on_validation_epoch_end([val, val])  # logs, prints the seg/boundary parts
    assert trainer.logger.get_value("val_losses", step=-1) == pytest.approx(float(val["loss"]))


def test_2d_trainer_step(results):
    trainer = make_trainer(dim=2)
    batch = make_batch(trainer, dim=2)
    assert batch["target"][0].shape == (2, 2, 16, 16)
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"])


def test_consistency_term_only_when_enabled_and_in_the_second_half(results):
    trainer = make_trainer(BANetTrainer_consistency)
    batch = make_batch(trainer)
    seg, bdr = trainer.network(batch["data"], return_boundary=True)
    trainer.current_epoch = 0
    assert "consistency_loss" not in trainer.compute_losses(seg, bdr, batch["target"])
    trainer.current_epoch = trainer.num_epochs // 2
    losses = trainer.compute_losses(seg, bdr, batch["target"])
    expected = trainer.boundary_loss(bdr, [inner_boundary(o.argmax(1, keepdim=True), 3).long() for o in seg])
    torch.testing.assert_close(losses["consistency_loss"], expected)
    torch.testing.assert_close(losses["loss"], losses["seg_loss"] + losses["boundary_loss"] + expected)
    # the default trainer never adds it
    plain = make_trainer()
    plain.current_epoch = plain.num_epochs - 1
    assert "consistency_loss" not in plain.compute_losses(seg, bdr, batch["target"])


def test_ignore_label_is_ignored_by_the_boundary_loss(results):
    dataset_json = {**DATASET_JSON, "labels": {**KIPA_LABELS, "ignore": 5}}
    trainer = make_trainer(dataset_json=dataset_json)
    assert trainer.label_manager.ignore_label == 5
    assert trainer.boundary_loss.loss.ignore_label == 2
    assert trainer.network.decoder.num_classes == 5  # no output for the ignore label


@pytest.mark.parametrize("class_name", [PLAIN, "nnunet_plugins.architectures.banet.BANetPlainConvUNet"])
def test_plans_may_ask_for_the_nnunet_v2_layout(results, class_name):
    plans = make_plans()
    arch = plans["configurations"]["cfg"]["architecture"]
    arch["network_class_name"] = class_name
    arch["arch_kwargs"]["official_v1_layout"] = False
    trainer = BANetTrainer(plans, "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 5, False)
    assert type(net) is BANetPlainConvUNet
    assert net.official_v1_layout is False and net.decoder.transpconvs[0].bias is not None
    assert net(torch.randn(1, 1, 8, 16, 16)).shape == (1, 5, 8, 16, 16)
    official = make_trainer().network
    # isotropic kernels: the v2 layout has exactly the biases of the transposed convs (outputs 16, 8, 4 in
    # each decoder) and of the 3 heads per decoder (5 resp. 2 classes) more
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(net) - n(official) == 2 * (4 + 8 + 16) + 3 * (5 + 2)
