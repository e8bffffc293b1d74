"""Issue 13: evaluate never averages silently over fewer cases, checks geometry as export does, treats extra
predictions as export does."""
import os
import shutil

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.dataset_conversion import kipa22
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.dataset_conversion.common import ChallengeError
from nnunet_plugins.evaluation import amos22 as amos_eval
from nnunet_plugins.evaluation import kipa22 as kipa_eval
from nnunet_plugins.evaluation import kits21 as kits_eval
from nnunet_plugins.evaluation import myops2020 as myops_eval
from nnunet_plugins.evaluation import segrap2023 as segrap_eval


@pytest.fixture
def kipa(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    preds = tmp_path / "preds"
    shutil.copytree(os.path.join(rel, "train", "label"), preds)
    return rel, preds


# item 3: missing predictions are listed and fail by default; --missing empty scores them as empty
def test_missing_predictions_fail_or_score_as_empty(tmp_path, kipa):
    rel, preds = kipa
    os.remove(preds / "2.nii.gz")
    with pytest.raises(ChallengeError, match=r"1 prediction\(s\) of reference cases missing in .*preds: 2 \(pass "
                                             r"--missing empty"):
        kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False)
    result = kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False,
                                missing="empty")
    rows = {r["case"]: r for r in result["rows"]}
    assert sorted(rows) == ["0", "1", "2"] and result["summary"]["all"]["num_cases"] == 3
    assert rows["0"]["DSC_Kidney"] == 1.0 and rows["2"]["DSC_Kidney"] == 0.0
    assert result["summary"]["all"]["mean"]["DSC_Kidney"] == pytest.approx(2 / 3)
    assert result["missing_predictions"] == ["2"]
    skipped = kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False,
                                 missing="skip")
    assert skipped["summary"]["all"]["num_cases"] == 2


def test_missing_predictions_other_challenges(tmp_path):
    rel = synth.kits21(tmp_path / "kits", num_cases=2)
    preds = tmp_path / "kp"
    preds.mkdir()
    shutil.copy(os.path.join(rel, "case_00000", "aggregated_MAJ_seg.nii.gz"), preds / "case_00000.nii.gz")
    with pytest.raises(ChallengeError, match=r"1 prediction\(s\) of reference cases missing .*: case_00001"):
        kits_eval.evaluate(str(preds), rel, progress=False, verbose=False)
    rel = synth.myops2020(tmp_path / "myops")
    preds = tmp_path / "mp"
    shutil.copytree(os.path.join(rel, "train25_myops_gd"), preds)
    os.remove(preds / "myops_training_101_gd.nii.gz")
    with pytest.raises(ChallengeError, match="missing .*: myops_training_101"):
        myops_eval.evaluate(str(preds), rel, progress=False, verbose=False)


def _flip(src, dst):
    img = sitk.ReadImage(src)
    d = np.array(img.GetDirection()).reshape(3, 3)
    d[:, 0] *= -1
    img.SetDirection(tuple(d.ravel()))
    sitk.WriteImage(img, dst)


# item 4: a prediction whose geometry differs is an error (the export's check and message); the explicit option
# follows the official code, which ignores geometry
def test_geometry_is_checked_as_export_does(tmp_path, kipa):
    rel, preds = kipa
    _flip(str(preds / "1.nii.gz"), str(preds / "1.nii.gz"))
    with pytest.raises(ChallengeError, match=r"case 1, file .*preds/1\.nii\.gz: prediction geometry differs from the "
                                             r"reference 1\.nii\.gz \(x, y, z as SimpleITK reports them; tolerance "
                                             r"0\.0001\): direction \(-1\.0, 0\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0, 0\.0, "
                                             r"1\.0\) instead of \(1\.0, 0\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0, 0\.0, "
                                             r"1\.0\)"):
        kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False)
    # export says the same about the same file (against the input image)
    with pytest.raises(ChallengeError, match=r"prediction geometry differs from the input image 1\.nii\.gz \(x, y, z "
                                             r"as SimpleITK reports them; tolerance 0\.0001\): direction"):
        kipa22.export(str(preds), str(tmp_path / "sub"), os.path.join(rel, "train", "image"), progress=False)
    result = kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False,
                                ignore_geometry=True)
    assert result["summary"]["all"]["num_cases"] == 3 and result["ignore_geometry"] is True


@pytest.mark.parametrize("official_spacing_bug", [False, True])
def test_kipa22_ignore_geometry_scores_the_voxel_array_as_the_official_code(tmp_path, kipa, official_spacing_bug):
    """The official script resamples each image with its own geometry: a prediction with the correct voxel array
    and a flipped affine scores exactly as the correct file, for DSC, HD and AVD (not HD/AVD of an empty one)."""
    rel, preds = kipa
    kwargs = dict(progress=False, verbose=False, official_spacing_bug=official_spacing_bug)
    # a prediction that is not perfect, so HD/AVD are not all 0: case 1 with a tumour voxel layer erased
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(preds / "1.nii.gz")))
    z = np.nonzero((arr == 4).any(axis=(1, 2)))[0][0]
    arr[z][arr[z] == 4] = 2
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(sitk.ReadImage(str(preds / "1.nii.gz")))
    sitk.WriteImage(edited, str(preds / "1.nii.gz"))
    correct = {r["case"]: r for r in kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev0"),
                                                        **kwargs)["rows"]}
    assert 0 < correct["1"]["HD_Tumor"]
    assert (correct["0"]["HD_Kidney"] == 0.0) != official_spacing_bug   # the bug misaligns even a perfect one
    for case in ("0", "1"):
        _flip(str(preds / f"{case}.nii.gz"), str(preds / f"{case}.nii.gz"))
    flipped = {r["case"]: r for r in kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev1"),
                                                        ignore_geometry=True, **kwargs)["rows"]}
    assert sorted(flipped) == sorted(correct) == ["0", "1", "2"]
    for case in correct:
        for key, value in correct[case].items():
            assert flipped[case][key] == value or (np.isnan(value) and np.isnan(flipped[case][key])), (case, key)


def test_geometry_checked_for_every_challenge(tmp_path):
    # KiTS21 (SimpleITK reading of the NIfTI release)
    rel = synth.kits21(tmp_path / "kits", num_cases=1)
    preds = tmp_path / "kp"
    preds.mkdir()
    _flip(os.path.join(rel, "case_00000", "aggregated_MAJ_seg.nii.gz"), str(preds / "case_00000.nii.gz"))
    with pytest.raises(ChallengeError, match="prediction geometry differs from the reference"):
        kits_eval.evaluate(str(preds), rel, progress=False, verbose=False)
    assert kits_eval.evaluate(str(preds), rel, progress=False, verbose=False, ignore_geometry=True)["rows"]
    # AMOS22 (nibabel affines): an origin moved by 5 mm
    rel = synth.amos22(tmp_path / "amos")
    preds = tmp_path / "ap"
    preds.mkdir()
    for case in ("amos_0008", "amos_0510"):
        nii = nibabel.load(os.path.join(rel, "labelsVa", f"{case}.nii.gz"))
        affine = nii.affine.copy()
        if case == "amos_0510":
            affine[0, 3] += 5.0
        nibabel.save(nibabel.Nifti1Image(np.asanyarray(nii.dataobj), affine), str(preds / f"{case}.nii.gz"))
    with pytest.raises(ChallengeError, match=r"case amos_0510, .*prediction geometry differs from the reference "
                                             r"amos_0510\.nii\.gz \(x, y, z as SimpleITK reports them; tolerance "
                                             r"0\.0001\): origin"):
        amos_eval.evaluate(str(preds), rel, progress=False, verbose=False)
    # MyoPS2020 and SegRap2023
    rel = synth.myops2020(tmp_path / "myops")
    preds = tmp_path / "mp"
    shutil.copytree(os.path.join(rel, "train25_myops_gd"), preds)
    _flip(str(preds / "myops_training_102_gd.nii.gz"), str(preds / "myops_training_102_gd.nii.gz"))
    with pytest.raises(ChallengeError, match="case myops_training_102, .*prediction geometry differs"):
        myops_eval.evaluate(str(preds), rel, progress=False, verbose=False)
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=1)
    maps = os.path.join(rel, "SegRap2023_Training_Set_120cases_OneHot_Labels", "Task002")
    preds = tmp_path / "sp"
    preds.mkdir()
    _flip(os.path.join(maps, "segrap_0000.nii.gz"), str(preds / "segrap_0000.nii.gz"))
    with pytest.raises(ChallengeError, match="case segrap_0000, .*prediction geometry differs from the reference"):
        segrap_eval.evaluate(str(preds), rel, task=2, progress=False, verbose=False)
    assert segrap_eval.evaluate(str(preds), rel, task=2, progress=False, verbose=False, ignore_geometry=True)["rows"]


# item 7 (evaluate side): the export's rule
def test_evaluate_extra_prediction_is_an_error_unless_allowed(tmp_path, kipa):
    rel, preds = kipa
    shutil.copy(preds / "0.nii.gz", preds / "KiPA_9.nii.gz")
    with pytest.raises(ChallengeError, match=r"1 prediction\(s\) in .*preds match no reference case: 9 \(pass "
                                             r"--allow-extra to ignore them\)"):
        kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False)
    result = kipa_eval.evaluate(str(preds), rel, out_dir=str(tmp_path / "ev"), progress=False, verbose=False,
                                allow_extra=True)
    assert [r["case"] for r in result["rows"]] == ["0", "1", "2"] and result["extra_predictions"] == ["9"]
