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
