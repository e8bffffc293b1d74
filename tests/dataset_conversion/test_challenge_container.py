"""Container entry points end to end with real (tiny) nnU-Net models: synthetic release -> convert ->
``nnUNetv2_plan_and_preprocess --verify_dataset_integrity`` -> one-epoch CPU training (PluginTrainer, two
iterations) -> ``nnunet-plugins challenge-infer`` on the organisers' input layout -> output layout, names and the
input images' exact geometry."""
import glob
import os
import sys

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.dataset_conversion import kits21, segrap2023
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.runner import console_command, run_step

pytestmark = pytest.mark.slow

SHORT = {"NNUNET_PLUGINS_EPOCHS": "1", "NNUNET_PLUGINS_ITERS": "2", "NNUNET_PLUGINS_VAL_ITERS": "1"}


def _train(dataset_id, env, log):
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}   # 0 there breaks nnU-Net's planner
    run_step(console_command("nnUNetv2_plan_and_preprocess") + ["-d", str(dataset_id), "-c", "3d_fullres", "-np", "1",
                                                                "--verify_dataset_integrity"], plan_env, log,
             echo=False)
    run_step(console_command("nnUNetv2_train") + [str(dataset_id), "3d_fullres", "0", "-tr", "PluginTrainer",
                                                  "-device", "cpu"], dict(env, **SHORT), log, echo=False)
    models = glob.glob(os.path.join(env["nnUNet_results"], f"Dataset{dataset_id:03d}_*",
                                    "PluginTrainer__nnUNetPlans__3d_fullres"))
    assert len(models) == 1 and os.path.isfile(os.path.join(models[0], "fold_0", "checkpoint_final.pth"))
    return models[0]


def _infer(challenge, model, inp, out, env, log, *extra):
    run_step([sys.executable, "-m", "nnunet_plugins", "challenge-infer", challenge, "--model", model, "--input",
              str(inp), "--output", str(out), "--device", "cpu", "--disable-tta", "-f", "0", *extra], env, log,
             echo=False)


def test_container_entry_points(nnunet_env, tmp_path):
    env = nnunet_env
    log = str(tmp_path / "log.txt")
    raw = env["nnUNet_raw"]

    # ---------------------------------------------------------------- KiTS21: .mha in, .mha out
    rel = synth.kits21(tmp_path / "kits", num_cases=5, seed=1)
    kits21.convert(str(rel), raw=raw, progress=False)
    model = _train(135, env, log)
    inp = tmp_path / "kits_input"
    synth.kits21_container_input(str(rel), str(inp), ["case_00000", "case_00003"])
    _infer("kits21", model, inp, tmp_path / "kits_output", env, log)
    outputs = sorted(os.listdir(tmp_path / "kits_output" / "images" / "kidney-tumor-and-cyst"))
    assert outputs == ["case_00000.mha", "case_00003.mha"]
    for name in outputs:
        seg = sitk.ReadImage(str(tmp_path / "kits_output" / "images" / "kidney-tumor-and-cyst" / name))
        ref = sitk.ReadImage(str(inp / "images" / "ct" / name))
        assert seg.GetSize() == ref.GetSize() and seg.GetSpacing() == ref.GetSpacing()
        assert seg.GetOrigin() == ref.GetOrigin() and seg.GetDirection() == ref.GetDirection()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2, 3}

    # ---------------------------------------------------------------- AMOS22 test phase: /input/*.nii.gz
    # (the container's I/O does not depend on what the single-channel NIfTI model segments; the KiTS model
    # reads NIfTI through NibabelIOWithReorient, as an AMOS model does)
    amos = synth.amos22(tmp_path / "amos", shape=(16, 32, 32))
    amos_in = tmp_path / "amos_input"
    amos_in.mkdir()
    for case in ("amos_0011", "amos_0512"):
        os.link(os.path.join(amos, "imagesTs", f"{case}.nii.gz"), amos_in / f"{case}.nii.gz")
    os.link(os.path.join(amos, "imagesTr", "amos_0507.nii.gz"), amos_in / "amos_0507.nii.gz")   # oblique MRI
    _infer("amos22", model, amos_in, tmp_path / "amos_output", env, log)
    assert sorted(os.listdir(tmp_path / "amos_output")) == ["amos_0011.nii.gz", "amos_0507.nii.gz",
                                                            "amos_0512.nii.gz"]
    for case in ("amos_0011", "amos_0507"):
        out = nibabel.load(str(tmp_path / "amos_output" / f"{case}.nii.gz"))
        ref = nibabel.load(str(amos_in / f"{case}.nii.gz"))
        assert out.shape == ref.shape and np.array_equal(out.affine, ref.affine)
        assert out.get_data_dtype() == np.uint8

    # ---------------------------------------------------------------- SegRap2023 task 2: two CTs in, 4-D .mha out
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=5, seed=2)
    segrap2023.convert(str(rel), task=2, raw=raw, progress=False)
    model = _train(602, env, log)
    case_dir = os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0004")
    seg_in = tmp_path / "segrap_input"
    synth.segrap2023_container_input({"3f2a-uuid": (os.path.join(case_dir, "image.nii.gz"),
                                                    os.path.join(case_dir, "image_contrast.nii.gz"))}, str(seg_in))
    _infer("segrap2023", model, seg_in, tmp_path / "segrap_output", env, log)
    out_dir = tmp_path / "segrap_output" / "images" / "gross-tumor-volume-segmentation"
    assert os.listdir(out_dir) == ["3f2a-uuid.mha"]
    four = sitk.ReadImage(str(out_dir / "3f2a-uuid.mha"))
    ref = sitk.ReadImage(str(seg_in / "images" / "head-neck-ct" / "3f2a-uuid.mha"))
    arr = sitk.GetArrayFromImage(four)
    assert four.GetDimension() == 4 and four.GetPixelID() == sitk.sitkUInt8
    assert arr.shape == (2,) + sitk.GetArrayViewFromImage(ref).shape
    assert four.GetSpacing()[:3] == ref.GetSpacing() and four.GetOrigin()[:3] == ref.GetOrigin()
    assert set(np.unique(arr)) <= {0, 1}
    # a task-1 request with this task-2 model is refused with a clear message
    with pytest.raises(RuntimeError, match="task 1 requested but the model is a task 2 model"):
        _infer("segrap2023", model, seg_in, tmp_path / "x", env, log, "--task", "1")
