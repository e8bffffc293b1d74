"""Assertions shared by the end-to-end tests (imported as a plain module; pytest puts tests/ on sys.path)."""
import numpy as np


def assert_same_geometry(image, reference):
    """``image`` (SimpleITK) has the size, spacing, origin and direction of ``reference``."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def dice(reference_mask, predicted_mask):
    """Dice of two boolean masks (0 when both are empty)."""
    return 2.0 * np.logical_and(reference_mask, predicted_mask).sum() / max(1, reference_mask.sum()
                                                                             + predicted_mask.sum())


def check_multitask_exports_and_stock_refusal(model_fold, dataset_id, trainer, plans_name, images, root, env, log,
                                              offsets, source_values=None):
    """The two checks every multi-task trainer's e2e test ends with.

    ``export-multitask`` of nnU-Net's final validation folder (combined labels) writes each case under its source's
    tag with the source's values (``offsets``: tag -> the combined label offset of that source; ``source_values``:
    tag -> the allowed source values, optional); and the stock ``nnUNetv2_predict``, which cannot pass a task, fails
    with the multi-task networks' message instead of predicting some task."""
    import os
    import subprocess
    import sys

    import SimpleITK as sitk

    from nnunet_plugins.runner import console_command, run_step

    val = os.path.join(model_fold, "validation")
    exported = os.path.join(root, "val_src")
    run_step([sys.executable, "-m", "nnunet_plugins", "export-multitask", "-i", val, "-o", exported, "-d",
              str(dataset_id)], env, log)
    val_cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(val) if f.endswith(".nii.gz"))
    assert val_cases
    for case in val_cases:
        tag, source_case = case.split("_", 1)
        combined_pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(val, case + ".nii.gz")))
        got = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(exported, tag, source_case + ".nii.gz")))
        np.testing.assert_array_equal(got, np.where(combined_pred > 0, combined_pred - offsets[tag], 0))
        if source_values is not None:
            assert set(np.unique(got)) <= source_values[tag], case

    res = subprocess.run(console_command("nnUNetv2_predict") + ["-i", images, "-o", os.path.join(root, "stock"), "-d",
                                                                str(dataset_id), "-c", "3d_fullres", "-f", "0", "-tr",
                                                                trainer, "-p", plans_name, "-device", "cpu", "-npp",
                                                                "1", "-nps", "1", "--disable_progress_bar"],
                         env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "predict-multitask" in res.stdout + res.stderr
