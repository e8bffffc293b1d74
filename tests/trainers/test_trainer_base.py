import pytest

from nnunet_plugins.planners.common import fit_to_divisor, patch_for_voxel_budget
from nnunet_plugins.trainers.base import read_run_length_overrides


def test_run_length_overrides():
    assert read_run_length_overrides({}) == {}
    got = read_run_length_overrides({"NNUNET_PLUGINS_EPOCHS": "3", "NNUNET_PLUGINS_ITERS": "7",
                                     "NNUNET_PLUGINS_VAL_ITERS": "2", "NNUNET_PLUGINS_SAVE_EVERY": "1"})
    assert got == {"num_epochs": 3, "num_iterations_per_epoch": 7, "num_val_iterations_per_epoch": 2,
                   "save_every": 1}
    for bad in ("0", "-1", "three", "1.5"):
        with pytest.raises(ValueError, match="NNUNET_PLUGINS_EPOCHS"):
            read_run_length_overrides({"NNUNET_PLUGINS_EPOCHS": bad})


def test_fit_to_divisor():
    assert fit_to_divisor([48, 192, 192], [8, 16, 16]) == [48, 192, 192]
    assert fit_to_divisor([3, 70, 190], [8, 16, 16]) == [8, 64, 192]
    with pytest.raises(ValueError):
        fit_to_divisor([16, 32], [8, 16, 16])


def test_patch_for_voxel_budget_reproduces_the_official_cotr_patch():
    # BCV after nnU-Net's resampling: ~3 mm slices, 0.76 mm in-plane, median 148 x 512 x 512
    assert patch_for_voxel_budget((3.0, 0.76, 0.76), (148, 512, 512), 48 * 192 * 192, (8, 16, 16)) == [48, 192, 192]
    # a small image caps the patch at its own size (rounded up to the divisor)
    assert patch_for_voxel_budget((3.0, 0.8, 0.8), (30, 60, 60), 48 * 192 * 192, (8, 16, 16)) == [32, 64, 64]
    # budget freed by a capped axis goes to the others
    patch = patch_for_voxel_budget((1.0, 1.0, 1.0), (16, 400, 400), 32 ** 3 * 8, (8, 16, 16))
    assert patch[0] == 16 and patch[1] == patch[2] and patch[1] > 64


def test_ddp_wrapping_passes_find_unused_parameters_only_inside_the_context():
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    from nnunet_plugins.trainers.base import ddp_with_unused_parameters
    from nnunet_plugins.trainers.multitask import MultiTaskTrainer
    from nnunet_plugins.trainers.uniseg import UniSegTrainer

    original = module.DDP
    with ddp_with_unused_parameters():
        assert module.DDP.func is original and module.DDP.keywords == {"find_unused_parameters": True}
    assert module.DDP is original
    with pytest.raises(KeyError):
        with ddp_with_unused_parameters():
            raise KeyError("restored on errors too")
    assert module.DDP is original
    assert MultiTaskTrainer.ddp_find_unused_parameters and UniSegTrainer.ddp_find_unused_parameters


def test_ddp_wrapper_with_unused_parameters_tolerates_an_unused_branch(tmp_path):
    """What the flag is for: a step that leaves one branch without gradient (one process, gloo, CPU).
    Plain DDP raises "Expected to have finished reduction in the prior iteration" on the second step."""
    import torch
    import torch.distributed as dist
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    from nnunet_plugins.trainers.base import ddp_with_unused_parameters

    class TwoStems(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x, use_a=True):
            return (self.a if use_a else self.b)(x)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with ddp_with_unused_parameters():
            net = module.DDP(TwoStems())
        for use_a in (True, False, True):
            net(torch.randn(4, 3), use_a).sum().backward()
        assert net.module.b.weight.grad is not None and net.module.a.weight.grad is not None
    finally:
        dist.destroy_process_group()


# ---- the training step, implemented once (PluginTrainer) -----------------------------------------------------
UNET_ARCH = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
             "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                             "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                             "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                             "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                             "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                             "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
             "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _plain_trainer(cls, tmp_path, monkeypatch, labels):
    import torch

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    plans = {"dataset_name": "Dataset999_Test", "plans_name": "TestPlans", "label_manager": "LabelManager",
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [8, 32, 32],
             "foreground_intensity_properties_per_channel": {}, "continue_training": False,
             "configurations": {"3d_fullres": {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor",
                                               "batch_size": 2, "patch_size": [8, 32, 32],
                                               "median_image_size_in_voxels": [8, 32, 32], "spacing": [1.0] * 3,
                                               "normalization_schemes": ["ZScoreNormalization"],
                                               "use_mask_for_norm": [False], "architecture": UNET_ARCH,
                                               "batch_dice": False}}}
    trainer = cls(plans, "3d_fullres", 0, {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2,
                                          "file_ending": ".nii.gz"}, device=torch.device("cpu"))
    torch.manual_seed(0)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


@pytest.mark.parametrize("labels,scaler", [({"background": 0, "a": 1, "b": 2}, False),
                                           ({"background": 0, "a": 1, "ignore": 2}, True)])
def test_plugin_step_is_nnunets_step(tmp_path, monkeypatch, labels, scaler):
    """PluginTrainer's train_step / validation_step give nnU-Net 2.8.1's results on the same network and batch
    (with the grad scaler and with an ignore label too)."""
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_plugins.trainers.base import PluginTrainer

    ours, theirs = (_plain_trainer(c, tmp_path, monkeypatch, labels) for c in (PluginTrainer, nnUNetTrainer))
    theirs.network.load_state_dict(ours.network.state_dict())
    if scaler:
        ours.grad_scaler, theirs.grad_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    seg = torch.zeros(2, 1, 8, 32, 32, dtype=torch.int16)
    seg[:, :, 2:6, 4:20, 4:20] = 1
    seg[:, :, 3:5, 8:12, 8:12] = 2
    batch = {"data": torch.randn(2, 1, 8, 32, 32), "target": [seg, seg[:, :, :, ::2, ::2]], "keys": ["a", "b"]}
    clipped = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, n, *a, **k: clipped.append(n) or original(p, n))
    for _ in range(2):
        a, b = ours.train_step({k: list(v) if isinstance(v, list) else v for k, v in batch.items()}), \
            theirs.train_step({k: list(v) if isinstance(v, list) else v for k, v in batch.items()})
        assert a.keys() == b.keys() and np.allclose(a["loss"], b["loss"], rtol=1e-6)
    assert clipped == [12, 12, 12, 12]
    for (name, p), q in zip(ours.network.named_parameters(), theirs.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():
        a = ours.validation_step({"data": batch["data"], "target": [t.clone() for t in batch["target"]]})
        b = theirs.validation_step({"data": batch["data"], "target": [t.clone() for t in batch["target"]]})
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
    assert a["tp_hard"].shape == (2 if len(labels) == 3 and "ignore" not in labels else 1,)


def test_optimizer_step_clips_at_the_trainers_norm():
    import torch

    from nnunet_plugins.trainers.base import PluginTrainer

    trainer = object.__new__(PluginTrainer)
    trainer.network = torch.nn.Linear(3, 1)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=1.0)
    trainer.grad_scaler, trainer.grad_clip_norm = None, 0.5
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.optimizer.zero_grad()
    trainer.optimizer_step(1000 * trainer.network(torch.ones(1, 3)).sum())
    step = torch.cat([(p - b).flatten() for p, b in zip(trainer.network.parameters(), before)])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-5)   # gradient norm 2000 clipped to 0.5 (lr 1)


def test_seed_from_environment_makes_draws_repeatable_and_rejects_bad_values():
    import numpy as np
    import torch

    from nnunet_plugins.trainers.base import seed_from_environment

    assert seed_from_environment(0, {}) is None
    draws = []
    for rank in (0, 0, 1):
        assert seed_from_environment(rank, {"NNUNET_PLUGINS_SEED": "7"}) == 7
        draws.append((np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]                                       # same seed, same rank: same draws
    assert draws[2][0] != draws[0][0] and draws[2][1] == draws[0][1]  # numpy differs per rank, torch does not
    for bad in ("-1", "x"):
        with pytest.raises(ValueError, match="NNUNET_PLUGINS_SEED must be a non-negative integer"):
            seed_from_environment(0, {"NNUNET_PLUGINS_SEED": bad})
