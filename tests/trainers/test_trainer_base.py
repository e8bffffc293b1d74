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
