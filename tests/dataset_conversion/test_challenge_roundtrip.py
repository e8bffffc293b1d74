"""convert -> (prediction = converted label) -> export -> evaluate: perfect scores, the submission layout the
organisers expect, the input images' exact geometry; and the completeness check."""
import json
import os
import shutil
import zipfile

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.dataset_conversion import amos22, kipa22, kits21, myops2020, segrap2023
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.dataset_conversion.common import ChallengeError, IncompleteError
from nnunet_plugins.evaluation import amos22 as eval_amos
from nnunet_plugins.evaluation import kipa22 as eval_kipa
from nnunet_plugins.evaluation import kits21 as eval_kits
from nnunet_plugins.evaluation import myops2020 as eval_myops
from nnunet_plugins.evaluation import segrap2023 as eval_segrap


def _labels_as_predictions(folder, dst, cases=None):
    os.makedirs(dst, exist_ok=True)
    for f in sorted(os.listdir(os.path.join(folder, "labelsTr"))):
        if cases is None or f[:-7] in cases:
            shutil.copy(os.path.join(folder, "labelsTr", f), os.path.join(dst, f))
    return str(dst)


def _all_perfect(summary, metrics=None):
    for group in summary.values():
        for col, v in group["mean"].items():
            if metrics is None or col.split("_")[0] in metrics:
                assert v == pytest.approx(1.0), col


def _same_sitk_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()


def test_kits21_roundtrip_nifti_and_grand_challenge(tmp_path):
    rel = synth.kits21(tmp_path / "kits", num_cases=3)
    folder = kits21.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    preds = _labels_as_predictions(folder, tmp_path / "pred")
    files = kits21.export(preds, str(tmp_path / "sub"), str(rel), progress=False)
    assert [os.path.basename(f) for f in files] == ["case_00000.nii.gz", "case_00001.nii.gz", "case_00002.nii.gz"]
    for f in files:
        out, ref = nibabel.load(f), nibabel.load(os.path.join(rel, os.path.basename(f)[:-7], "imaging.nii.gz"))
        assert np.array_equal(out.affine, ref.affine) and out.get_data_dtype() == np.uint8
        maj = nibabel.load(os.path.join(rel, os.path.basename(f)[:-7], "aggregated_MAJ_seg.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(maj.dataobj))
    result = eval_kits.evaluate(str(tmp_path / "sub"), str(rel), progress=False, verbose=False)
    assert set(result["summary"]) == {"majority", "samples"}
    _all_perfect({"majority": result["summary"]["majority"]})
    samples = result["summary"]["samples"]["mean"]
    assert 0.5 < samples["Dice_kidney_and_mass"] < 1.0   # annotators disagree with the majority vote
    assert os.path.isfile(result["files"]["per_case_csv"]) and os.path.isfile(result["files"]["json"])
    # grand-challenge output: .mha inputs -> images/kidney-tumor-and-cyst/<name>.mha in the input's geometry
    inp = tmp_path / "input"
    synth.kits21_container_input(str(rel), str(inp))
    out = kits21.export(preds, str(tmp_path / "gc"), str(inp), progress=False)
    assert [os.path.relpath(f, tmp_path / "gc") for f in out] == [
        os.path.join("images", "kidney-tumor-and-cyst", f"case_{i:05d}.mha") for i in range(3)]
    for f in out:
        seg, ref = sitk.ReadImage(f), sitk.ReadImage(str(inp / "images" / "ct" / os.path.basename(f)))
        _same_sitk_geometry(seg, ref)
        maj_file = os.path.join(rel, os.path.basename(f)[:-4], "aggregated_MAJ_seg.nii.gz")
        maj = np.asanyarray(nibabel.load(maj_file).dataobj)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), np.moveaxis(maj, 0, -1))
    # the .mha -> NIfTI mapping of the organisers gives back the release's image and affine
    kits21.mha_to_kits_nifti("case_00001", str(inp / "images" / "ct" / "case_00001.mha"), str(tmp_path / "x.nii.gz"))
    a, b = nibabel.load(str(tmp_path / "x.nii.gz")), nibabel.load(os.path.join(rel, "case_00001", "imaging.nii.gz"))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


@pytest.mark.parametrize("task", [1, 2])
def test_amos22_roundtrip_validation_zip(tmp_path, task):
    rel = synth.amos22(tmp_path / "amos")
    folder = amos22.convert(str(rel), task=task, raw=str(tmp_path / "raw"), progress=False)
    val = ["amos_0008"] + (["amos_0510"] if task == 2 else [])
    preds = _labels_as_predictions(folder, tmp_path / "pred", val)
    result = amos22.export(preds, str(tmp_path / "sub"), os.path.join(rel, "imagesVa"), task=task, progress=False)
    with zipfile.ZipFile(result["archive"]) as z:
        assert sorted(z.namelist()) == [f"{c}.nii.gz" for c in val]
    for c in val:
        out = nibabel.load(os.path.join(tmp_path / "sub", f"{c}.nii.gz"))
        ref = nibabel.load(os.path.join(rel, "imagesVa", f"{c}.nii.gz"))
        assert np.array_equal(out.affine, ref.affine) and out.shape == ref.shape
        assert out.get_data_dtype() == np.uint8
    ev = eval_amos.evaluate(result["archive"], str(rel), out_dir=str(tmp_path / "ev"), progress=False, verbose=False)
    _all_perfect(ev["summary"])
    assert [r["case"] for r in ev["rows"]] == val and ev["task"] == task   # inferred from the predictions
    if task == 1:
        # a CT-only submission scored as task 2: the validation MRI case counts as missing (listed), or as empty
        with pytest.raises(ChallengeError, match=r"1 prediction\(s\) of reference cases missing in .*: amos_0510"):
            eval_amos.evaluate(result["archive"], str(rel), out_dir=str(tmp_path / "ev"), progress=False,
                               verbose=False, task=2)
        ev2 = eval_amos.evaluate(result["archive"], str(rel), out_dir=str(tmp_path / "ev"), progress=False,
                                 verbose=False, task=2, missing="empty")
        rows = {r["case"]: r for r in ev2["rows"]}
        assert sorted(rows) == val + ["amos_0510"] and ev2["task"] == 2 and rows["amos_0510"]["modality"] == "MRI"
        # a labels folder is the reference set as given: its MRI case is missing without --task as well
        with pytest.raises(ChallengeError, match=r"1 prediction\(s\) of reference cases missing in .*: amos_0510"):
            eval_amos.evaluate(result["archive"], os.path.join(rel, "labelsVa"), out_dir=str(tmp_path / "ev"),
                               progress=False, verbose=False)
        present = np.unique(np.asanyarray(nibabel.load(os.path.join(rel, "labelsVa", "amos_0510.nii.gz")).dataobj))
        organs = [eval_amos.STRUCTURES[k - 1] for k in present if k > 0]
        assert organs and all(rows["amos_0510"][f"DSC_{o}"] == 0.0 for o in organs)   # scored as empty
        assert all(rows["amos_0008"][f"DSC_{o}"] == 1.0 for o in eval_amos.STRUCTURES)
    else:
        # task 1 scores the CT cases only: the MRI prediction is an extra (an error unless allowed)
        with pytest.raises(ChallengeError, match=r"1 prediction\(s\) in .* match no reference case: amos_0510"):
            eval_amos.evaluate(result["archive"], str(rel), out_dir=str(tmp_path / "ev"), progress=False,
                               verbose=False, task=1)
        ev1 = eval_amos.evaluate(result["archive"], str(rel), out_dir=str(tmp_path / "ev"), progress=False,
                                 verbose=False, task=1, allow_extra=True)
        assert [r["case"] for r in ev1["rows"]] == ["amos_0008"] and ev1["extra_predictions"] == ["amos_0510"]
    # the completeness check lists every missing case
    if task == 2:
        os.remove(os.path.join(preds, "amos_0008.nii.gz"))
        os.remove(os.path.join(preds, "amos_0510.nii.gz"))
        with pytest.raises(IncompleteError, match="2 AMOS22 task 2 predictions missing in .*: amos_0008, amos_0510"):
            amos22.export(preds, str(tmp_path / "sub2"), os.path.join(rel, "imagesVa"), task=2, progress=False)


def test_segrap2023_roundtrip_validation_layout_and_4d(tmp_path):
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=2)
    raw = str(tmp_path / "raw")
    folder = segrap2023.convert(str(rel), task=1, raw=raw, progress=False)
    preds = _labels_as_predictions(folder, tmp_path / "pred")
    res = segrap2023.export(preds, str(tmp_path / "val"), str(rel), task=1, progress=False)
    assert len(res["files"]) == 90
    with zipfile.ZipFile(res["archive"]) as z:
        names = sorted(z.namelist())
    assert names == sorted(f"{c}/{o}.nii.gz" for c in ("segrap_0000", "segrap_0001") for o in segrap2023.OARS)
    case_dir = os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0001")
    image = sitk.ReadImage(os.path.join(case_dir, "image.nii.gz"))
    for organ in ("Brain", "Hippocampus_L", "MiddleEar_R", "Larynx", "PharynxConst"):
        out = sitk.ReadImage(os.path.join(tmp_path / "val", "segrap_0001", f"{organ}.nii.gz"))
        _same_sitk_geometry(out, image)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out),
                                      sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case_dir, f"{organ}.nii.gz"))))
    ev = eval_segrap.evaluate(res["archive"], str(rel), task=1, out_dir=str(tmp_path / "ev"), progress=False,
                              verbose=False)
    _all_perfect(ev["summary"])
    assert len(ev["rows"][0]) == 1 + 90
    # test phase: one 4-D uint8 .mha [45, Z, Y, X] per case, channels in the official order
    res = segrap2023.export(preds, str(tmp_path / "gc"), str(rel), task=1, out_format="grand-challenge",
                            progress=False)
    f = os.path.join(tmp_path / "gc", "images", "head-neck-segmentation", "segrap_0001.mha")
    assert f in res["files"] and "archive" not in res
    four = sitk.ReadImage(f)
    arr = sitk.GetArrayFromImage(four)
    assert four.GetDimension() == 4 and arr.shape == (45,) + sitk.GetArrayViewFromImage(image).shape
    assert four.GetPixelID() == sitk.sitkUInt8
    assert four.GetSpacing() == image.GetSpacing() + (1.0,) and four.GetOrigin()[:3] == image.GetOrigin()
    for i, organ in enumerate(segrap2023.OARS):
        np.testing.assert_array_equal(arr[i], sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case_dir,
                                                                                                  f"{organ}.nii.gz"))))
    ev = eval_segrap.evaluate(str(tmp_path / "gc"), str(rel), task=1, out_dir=str(tmp_path / "ev4"), progress=False,
                              verbose=False)
    _all_perfect(ev["summary"])
    # task 2: GTVs
    folder2 = segrap2023.convert(str(rel), task=2, raw=raw, progress=False)
    preds2 = _labels_as_predictions(folder2, tmp_path / "pred2")
    res = segrap2023.export(preds2, str(tmp_path / "gc2"), str(rel), task=2, out_format="grand-challenge",
                            progress=False)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(res["files"][0]))
    gtvp = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0000",
                                                              "GTVp.nii.gz")))
    assert arr.shape[0] == 2 and np.array_equal(arr[0], gtvp)
    assert os.path.dirname(res["files"][0]).endswith(os.path.join("images", "gross-tumor-volume-segmentation"))
    ev = eval_segrap.evaluate(preds2, str(rel), task=2, out_dir=str(tmp_path / "ev5"), progress=False, verbose=False)
    _all_perfect(ev["summary"])


def test_myops2020_roundtrip_original_values_uint16(tmp_path):
    rel = synth.myops2020(tmp_path / "myops")
    folder = myops2020.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    preds = _labels_as_predictions(folder, tmp_path / "pred")
    files = myops2020.export(preds, str(tmp_path / "sub"), os.path.join(rel, "train25"), progress=False)
    assert [os.path.basename(f) for f in files] == [f"myops_training_{i}_seg.nii.gz" for i in (101, 102, 103)]
    for f in files:
        case = os.path.basename(f)[:-len("_seg.nii.gz")]
        out = sitk.ReadImage(f)
        assert out.GetPixelID() == sitk.sitkUInt16
        _same_sitk_geometry(out, sitk.ReadImage(os.path.join(rel, "train25", f"{case}_C0.nii.gz")))
        gd = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(rel, "train25_myops_gd", f"{case}_gd.nii.gz")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), gd)
        assert set(np.unique(gd)) == {0, 200, 500, 600, 1220, 2221}
    ev = eval_myops.evaluate(str(tmp_path / "sub"), str(rel), progress=False, verbose=False)
    _all_perfect(ev["summary"])
    # nnU-Net's own predictions (values 0-5) are recognised too
    ev = eval_myops.evaluate(preds, str(rel), out_dir=str(tmp_path / "ev"), progress=False, verbose=False)
    _all_perfect(ev["summary"])


def test_kipa22_roundtrip_same_names(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    folder = kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    preds = _labels_as_predictions(folder, tmp_path / "pred")
    files = kipa22.export(preds, str(tmp_path / "sub"), os.path.join(rel, "train", "image"), progress=False)
    assert sorted(os.path.basename(f) for f in files) == ["0.nii.gz", "1.nii.gz", "2.nii.gz"]
    for f in files:
        out = sitk.ReadImage(f)
        _same_sitk_geometry(out, sitk.ReadImage(os.path.join(rel, "train", "image", os.path.basename(f))))
    ev = eval_kipa.evaluate(str(tmp_path / "sub"), str(rel), progress=False, verbose=False)
    s = ev["summary"]["all"]["mean"]
    for name in eval_kipa.STRUCTURES:
        assert s[f"DSC_{name}"] == 1.0 and s[f"HD_{name}"] == 0.0 and s[f"AVD_{name}"] == 0.0
    with open(ev["files"]["json"]) as fh:
        assert json.load(fh)["per_case"][0]["case"] == "0"
    # test-set export from nnU-Net's imagesTs names; a missing prediction is reported by name
    with pytest.raises(IncompleteError, match="1 KiPA22 predictions missing in .*: 70"):
        kipa22.export(preds, str(tmp_path / "sub_test"), str(rel), progress=False)
