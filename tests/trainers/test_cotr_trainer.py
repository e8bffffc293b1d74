"""CoTrTrainer builds CoTr from plans, fits patches, and maps CoTr's outputs onto nnU-Net's DS loss."""
import copy

import numpy as np
import pytest
import torch

from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.trainers.cotr import CoTrTrainer

TINY = {"stage_channels": [8, 24, 48, 48], "blocks_per_stage": [1, 1, 1], "num_heads": 4, "ffn_dim": 32,
        "num_encoder_layers": 1}


def make_plans(patch, arch=None, configuration="3d_fullres"):
    arch = arch or {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {}, "_kw_requires_import": []}
    return {
        "dataset_name": "Dataset999_Test", "plans_name": "TestPlans", "label_manager": "LabelManager",
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [64, 64, 64],
        "foreground_intensity_properties_per_channel": {},
        "configurations": {configuration: {
            "data_identifier": "TestPlans_" + configuration, "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": [1.0] * len(patch), "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "architecture": arch, "batch_dice": False}},
    }


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
                "file_ending": ".nii.gz"}


@pytest.fixture
def results_env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    # trainer.initialize() looks at the (here empty) preprocessed data folder to pick a dataset class
    data = tmp_path / "pre" / "Dataset999_Test" / "TestPlans_3d_fullres"
    data.mkdir(parents=True)
    (data / "case.b2nd").write_bytes(b"")


def make_trainer(plans, configuration="3d_fullres"):
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False  # nnU-Net's run_training adds this key
    return CoTrTrainer(plans, configuration, 0, DATASET_JSON, device=torch.device("cpu"))


def test_builds_cotr_from_cotr_plans_with_their_arch_kwargs(results_env):
    arch = {"network_class_name": "nnunet_plugins.architectures.cotr.CoTr", "arch_kwargs": TINY,
            "_kw_requires_import": []}
    trainer = make_trainer(make_plans([16, 32, 32], arch))
    trainer.initialize()
    net = trainer.network
    assert isinstance(net, CoTr) and net.num_classes == 3 and net.input_channels == 1
    assert net.decoder.seg_head.in_channels == 8  # from the plans, not the official 64
    out = net(torch.randn(2, 1, 16, 32, 32))
    assert [tuple(o.shape[2:]) for o in out] == [(16, 32, 32), (16, 16, 16), (8, 8, 8), (4, 4, 4)]
    # the same static builder that nnUNetv2_predict calls, with deep supervision off: one tensor
    inference_net = CoTrTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                           1, 3, enable_deep_supervision=False)
    inference_net.load_state_dict(net.state_dict(), strict=True)
    assert inference_net(torch.randn(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)


def test_stock_plans_give_the_official_network(results_env):
    net = CoTrTrainer.build_network_architecture(
        make_trainer(make_plans([48, 192, 192])).plans_manager,
        make_trainer(make_plans([48, 192, 192])).configuration_manager, 1, 14, True)
    assert sum(p.numel() for p in net.parameters()) == 41_872_504


def test_patch_is_fitted_and_recorded_in_the_plans(results_env):
    trainer = make_trainer(make_plans([20, 40, 56]))
    assert trainer.configuration_manager.patch_size == [16, 32, 64]
    # the plans the trainer copies into the model folder (read by nnUNetv2_predict) carry the fitted patch
    assert trainer.plans_manager.plans["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 64]
    assert CoTr.fit_patch([8, 16, 16]) == [8, 16, 32], "a single deepest voxel cannot be instance-normalised"


def test_2d_configuration_is_a_clear_error(results_env):
    with pytest.raises(ValueError, match="3-D network.*2d"):
        make_trainer(make_plans([64, 64], configuration="2d"), configuration="2d")


def test_impossible_patch_at_inference_is_a_clear_error(results_env):
    trainer = make_trainer(make_plans([16, 32, 32]))
    trainer.configuration_manager.configuration["patch_size"] = [12, 32, 32]
    with pytest.raises(ValueError, match="multiple of"):
        CoTrTrainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)


def test_deep_supervision_targets_and_weights_match_cotr_outputs(results_env):
    trainer = make_trainer(make_plans([16, 32, 64]))
    scales = trainer._get_deep_supervision_scales()
    assert scales == [[1, 1, 1], [1, .5, .5], [.5, .25, .25], [.25, .125, .125]]
    trainer.initialize()
    w = np.asarray(trainer.loss.weight_factors)
    np.testing.assert_allclose(w, np.array([1, .5, .25, .125]) / 1.875)
    # the loss accepts CoTr's outputs with targets downsampled to exactly these scales
    torch.manual_seed(0)
    net = CoTr(1, 3, (16, 32, 64), **TINY)
    x = torch.randn(2, 1, 16, 32, 64)
    seg = torch.randint(0, 3, (2, 1, 16, 32, 64)).float()
    targets = [torch.nn.functional.interpolate(seg, scale_factor=tuple(s), mode="nearest") if s != [1, 1, 1]
               else seg for s in scales]
    outputs = net(x)
    assert [o.shape[2:] for o in outputs] == [t.shape[2:] for t in targets]
    loss = trainer.loss(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert net.decoder.ds_heads[-1].weight.grad.abs().sum() > 0, "the deepest DS head must be trained"


def test_toggling_deep_supervision(results_env):
    trainer = make_trainer(make_plans([16, 32, 32], {"network_class_name": "nnunet_plugins.architectures.cotr.CoTr",
                                                     "arch_kwargs": TINY, "_kw_requires_import": []}))
    trainer.initialize()
    trainer.set_deep_supervision_enabled(False)
    assert isinstance(trainer.network(torch.randn(1, 1, 16, 32, 32)), torch.Tensor)
    trainer.set_deep_supervision_enabled(True)
    assert len(trainer.network(torch.randn(1, 1, 16, 32, 32))) == 4
