"""Converters: synthetic release -> nnU-Net raw dataset; layout, dataset.json, nnU-Net's integrity check,
resume / overwrite / interruption, and clear errors on bad input."""
import filecmp
import json
import os
import shutil

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.dataset_conversion import amos22, kipa22, kits21, myops2020, segrap2023
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.dataset_conversion.common import CaseError, ChallengeError, ReleaseLayoutError


def _verify(folder):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)   # raises on any problem


def _listing(folder, sub):
    return sorted(os.listdir(os.path.join(folder, sub)))


def _dj(folder):
    with open(os.path.join(folder, "dataset.json")) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- each challenge

def test_kits21(tmp_path):
    rel = synth.kits21(tmp_path / "kits", num_cases=3)
    folder = kits21.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    assert os.path.basename(folder) == "Dataset135_KiTS2021"
    assert _listing(folder, "imagesTr") == [f"case_{i:05d}_0000.nii.gz" for i in range(3)]
    assert _listing(folder, "labelsTr") == [f"case_{i:05d}.nii.gz" for i in range(3)]
    dj = _dj(folder)
    assert dj["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dj["regions_class_order"] == [1, 3, 2]
    assert dj["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3
    # files copied unchanged (nnU-Net's reader reorients; the predictions come back in this orientation)
    assert filecmp.cmp(os.path.join(rel, "case_00001", "imaging.nii.gz"),
                       os.path.join(folder, "imagesTr", "case_00001_0000.nii.gz"), shallow=False)
    assert filecmp.cmp(os.path.join(rel, "case_00001", "aggregated_MAJ_seg.nii.gz"),
                       os.path.join(folder, "labelsTr", "case_00001.nii.gz"), shallow=False)
    _verify(folder)
    # nnU-Net reads the KiTS arrays reoriented to RAS: (z, y, x) with the slice axis first
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    seg, props = NibabelIOWithReorient().read_seg(os.path.join(folder, "labelsTr", "case_00000.nii.gz"))
    assert seg.shape == (1, 16, 32, 32)
    np.testing.assert_allclose(props["spacing"], [3.0, 0.8, 0.8], rtol=1e-6)
    # another label source is another conversion: needs --overwrite
    with pytest.raises(ChallengeError, match="overwrite"):
        kits21.convert(str(rel), raw=str(tmp_path / "raw"), label_source="and", progress=False)
    folder = kits21.convert(str(rel), raw=str(tmp_path / "raw"), label_source="and", overwrite=True, progress=False)
    assert filecmp.cmp(os.path.join(rel, "case_00002", "aggregated_AND_seg.nii.gz"),
                       os.path.join(folder, "labelsTr", "case_00002.nii.gz"), shallow=False)


@pytest.mark.parametrize("task", [1, 2])
def test_amos22_tasks_and_validation_merge(tmp_path, task):
    rel = synth.amos22(tmp_path / "amos")
    raw = str(tmp_path / "raw")
    folder = amos22.convert(str(rel), task=task, raw=raw, progress=False)
    cases_tr = [f[:-12] for f in _listing(folder, "imagesTr")]
    cases_ts = [f[:-12] for f in _listing(folder, "imagesTs")]
    if task == 1:
        assert os.path.basename(folder) == "Dataset218_AMOS2022_task1"
        assert cases_tr == ["amos_0001", "amos_0004", "amos_0005", "amos_0008"] and cases_ts == ["amos_0011"]
        assert _dj(folder)["channel_names"] == {"0": "CT"}
    else:
        assert cases_tr == ["amos_0001", "amos_0004", "amos_0005", "amos_0008", "amos_0507", "amos_0508",
                            "amos_0510"]
        assert cases_ts == ["amos_0011", "amos_0512"]
        assert _dj(folder)["channel_names"] == {"0": "zscore"}   # CT and MRI: per-image z-score
    dj = _dj(folder)
    assert dj["labels"]["background"] == 0 and dj["labels"]["prostate/uterus"] == 15 and len(dj["labels"]) == 16
    assert dj["numTraining"] == len(cases_tr) and dj["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    _verify(folder)
    if task == 2:
        # the oblique MRI case comes through byte for byte; nnU-Net reorients it and writes back its affine
        src = os.path.join(rel, "imagesTr", "amos_0507.nii.gz")
        assert filecmp.cmp(src, os.path.join(folder, "imagesTr", "amos_0507_0000.nii.gz"), shallow=False)
        affine = nibabel.load(src).affine
        assert np.abs(affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) - np.eye(3)).max() > 0.1
        from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
        io = NibabelIOWithReorient()
        seg, props = io.read_seg(os.path.join(folder, "labelsTr", "amos_0507.nii.gz"))
        out = str(tmp_path / "back.nii.gz")
        io.write_seg(seg[0], out, props)
        back = nibabel.load(out)
        np.testing.assert_allclose(back.affine, affine, atol=1e-5)
        original = nibabel.load(os.path.join(rel, "labelsTr", "amos_0507.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(original.dataobj))
        # validation kept separate on request
        folder2 = amos22.convert(str(rel), task=2, raw=raw, dataset_id=230, merge_validation=False, progress=False)
        assert _listing(folder2, "imagesVal") == ["amos_0008_0000.nii.gz", "amos_0510_0000.nii.gz"]
        assert _dj(folder2)["numTraining"] == 5


def test_segrap2023_maps_masks_and_validation(tmp_path):
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=2, num_validation=1)
    raw = str(tmp_path / "raw")
    folder = segrap2023.convert(str(rel), task=1, raw=raw, progress=False)
    assert _listing(folder, "imagesTr") == ["segrap_0000_0000.nii.gz", "segrap_0000_0001.nii.gz",
                                            "segrap_0001_0000.nii.gz", "segrap_0001_0001.nii.gz"]
    assert _listing(folder, "imagesTs") == ["segrap_0002_0000.nii.gz", "segrap_0002_0001.nii.gz"]
    dj = _dj(folder)
    assert dj["channel_names"] == {"0": "CT", "1": "CT"} and len(dj["labels"]) == 55
    assert dj["labels"]["Brain+TemporalLobe_L+Hippocampus_L"] == 6 and dj["labels"]["PharynxConst"] == 52
    _verify(folder)
    # building the map from the 45 overlapping masks gives the shipped map
    folder_m = segrap2023.convert(str(rel), task=1, raw=raw, dataset_id=611, labels="masks", progress=False)
    for case in ("segrap_0000", "segrap_0001"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder_m, "labelsTr", f"{case}.nii.gz")))
        np.testing.assert_array_equal(a, b)
        assert len(np.unique(a)) > 40
    # task 2 from the GTV masks
    folder2 = segrap2023.convert(str(rel), task=2, raw=raw, labels="masks", progress=False)
    assert _dj(folder2)["labels"] == {"background": 0, "GTVp": 1, "GTVnd": 2}
    lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder2, "labelsTr", "segrap_0000.nii.gz")))
    gtvp = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0000",
                                                              "GTVp.nii.gz")))
    np.testing.assert_array_equal(lab == 1, gtvp == 1)
    _verify(folder2)
    # a shipped map that disagrees with the masks is caught by --check-masks
    map_file = os.path.join(rel, segrap2023.MAP_FOLDER, "Task001", "segrap_0001.nii.gz")
    img = sitk.ReadImage(map_file)
    arr = sitk.GetArrayFromImage(img)
    arr[arr == 6] = 4   # hippocampus part lost
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, map_file)
    with pytest.raises(ChallengeError, match=r"segrap_0001.*disagrees with the masks of Hippocampus_L"):
        segrap2023.convert(str(rel), task=1, raw=raw, dataset_id=612, check_masks=True, progress=False)


def test_segrap2023_encode_decode_roundtrip_and_invalid_combination():
    rng = np.random.default_rng(0)
    label_map = rng.integers(0, 55, (5, 6, 7)).astype(np.uint8)
    masks = segrap2023.decode(label_map, 1)
    assert masks["Brain"].sum() == np.isin(label_map, range(1, 10)).sum()
    assert masks["MiddleEar_L"].sum() == np.isin(label_map, (16, 18, 20, 24, 28, 30)).sum()
    assert masks["Larynx"].sum() == np.isin(label_map, (48, 49, 50, 51)).sum()
    np.testing.assert_array_equal(segrap2023.encode(masks, 1), label_map)
    masks["Eye_L"][0, 0, 0] = masks["OpticNerve_L"][0, 0, 0] = True
    with pytest.raises(ValueError, match="Eye_L \\+ OpticNerve_L"):
        segrap2023.encode(masks, 1)


def test_myops2020_channels_and_label_remap(tmp_path):
    rel = synth.myops2020(tmp_path / "myops")
    folder = myops2020.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    assert _listing(folder, "imagesTr")[:3] == [f"myops_training_101_{c:04d}.nii.gz" for c in range(3)]
    assert _listing(folder, "imagesTs") == [f"myops_test_201_{c:04d}.nii.gz" for c in range(3)]
    dj = _dj(folder)
    assert dj["channel_names"] == {"0": "C0", "1": "DE", "2": "T2"}
    for seq, c in (("C0", 0), ("DE", 1), ("T2", 2)):
        assert filecmp.cmp(os.path.join(rel, "train25", f"myops_training_102_{seq}.nii.gz"),
                           os.path.join(folder, "imagesTr", f"myops_training_102_{c:04d}.nii.gz"), shallow=False)
    gd = sitk.ReadImage(os.path.join(rel, "train25_myops_gd", "myops_training_102_gd.nii.gz"))
    lab = sitk.ReadImage(os.path.join(folder, "labelsTr", "myops_training_102.nii.gz"))
    g, l_ = sitk.GetArrayFromImage(gd), sitk.GetArrayFromImage(lab)
    for orig, new in ((500, 1), (600, 2), (200, 3), (1220, 4), (2221, 5), (0, 0)):
        assert (g == orig).any()
        np.testing.assert_array_equal(g == orig, l_ == new)
    assert lab.GetSize()[2] == 4 and lab.GetSpacing()[2] == 12.0   # thick slices kept
    _verify(folder)


def test_kipa22_uint16_and_case_names(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    folder = kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    assert _listing(folder, "labelsTr") == ["KiPA_0.nii.gz", "KiPA_1.nii.gz", "KiPA_2.nii.gz"]
    assert _listing(folder, "imagesTs") == ["KiPA_70_0000.nii.gz"]
    img = sitk.ReadImage(os.path.join(folder, "imagesTr", "KiPA_1_0000.nii.gz"))
    assert img.GetPixelID() == sitk.sitkUInt16 and sitk.GetArrayViewFromImage(img).min() > 500   # offset kept
    assert _dj(folder)["labels"] == {"background": 0, "renal vein": 1, "kidney": 2, "renal artery": 3, "tumor": 4}
    _verify(folder)


# --------------------------------------------------------------------------------------------- dataset builder

def test_rerun_skips_and_interrupted_run_leaves_no_dataset(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa", train_ids=(0, 1, 2, 3))
    raw = str(tmp_path / "raw")
    final = os.path.join(raw, "Dataset603_KiPA2022")
    partial = os.path.join(raw, ".Dataset603_KiPA2022.partial")
    # an unreadable label stops case 2; the others are converted, but no dataset nnU-Net would accept appears
    label2 = os.path.join(rel, "train", "label", "2.nii.gz")
    good = label2 + ".good"
    shutil.move(label2, good)
    with open(label2, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(ChallengeError, match=r"1 of 5 cases failed:\n  case KiPA_2, file .*2\.nii\.gz: cannot read"):
        kipa22.convert(str(rel), raw=raw, num_processes=2, progress=False)
    assert not os.path.exists(final) and os.path.isdir(partial)
    assert not os.path.exists(os.path.join(partial, "dataset.json"))
    assert os.path.isfile(os.path.join(partial, "labelsTr", "KiPA_3.nii.gz"))
    before = os.stat(os.path.join(partial, "labelsTr", "KiPA_3.nii.gz")).st_mtime_ns
    # fix the file and rerun: the run resumes, finished cases are not written again
    shutil.move(good, label2)
    assert kipa22.convert(str(rel), raw=raw, progress=False) == final
    assert not os.path.exists(partial)
    assert os.stat(os.path.join(final, "labelsTr", "KiPA_3.nii.gz")).st_mtime_ns == before
    assert len(os.listdir(os.path.join(final, "labelsTr"))) == 4
    # a rerun of a complete dataset changes nothing
    stamp = os.stat(os.path.join(final, "dataset.json")).st_mtime_ns
    kipa22.convert(str(rel), raw=raw, progress=False)
    assert os.stat(os.path.join(final, "dataset.json")).st_mtime_ns == stamp
    # --overwrite starts clean
    kipa22.convert(str(rel), raw=raw, overwrite=True, progress=False)
    assert os.stat(os.path.join(final, "labelsTr", "KiPA_3.nii.gz")).st_mtime_ns != before
    assert not [f for r, _, fs in os.walk(raw) for f in fs if f.startswith(".tmp-")]
    # the dataset ID of another dataset is refused
    with pytest.raises(ChallengeError, match="already used by Dataset603_KiPA2022"):
        myops2020.convert(str(synth.myops2020(tmp_path / "myops")), raw=raw, dataset_id=603, progress=False)


# --------------------------------------------------------------------------------------------- bad input

def test_missing_channel_and_label_name_case_and_file(tmp_path):
    rel = synth.myops2020(tmp_path / "myops")
    os.remove(os.path.join(rel, "train25", "myops_training_102_DE.nii.gz"))
    with pytest.raises(CaseError, match=r"case myops_training_102, file .*myops_training_102_DE\.nii\.gz: "
                                        r"missing DE channel"):
        myops2020.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    rel = synth.kipa22(tmp_path / "kipa")
    os.remove(os.path.join(rel, "train", "label", "1.nii.gz"))
    with pytest.raises(CaseError, match=r"case KiPA_1, file .*label/1\.nii\.gz: missing label"):
        kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=1)
    os.remove(os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0000", "image_contrast.nii.gz"))
    with pytest.raises(CaseError, match=r"case segrap_0000, .*image_contrast\.nii\.gz: missing contrast CT"):
        segrap2023.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)


def test_geometry_mismatch_between_channels_and_image_label(tmp_path):
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=1)
    path = os.path.join(rel, segrap2023.TRAINING_FOLDER, "segrap_0000", "image_contrast.nii.gz")
    img = sitk.ReadImage(path)
    img.SetOrigin(tuple(np.add(img.GetOrigin(), (0, 0, 5.0))))
    sitk.WriteImage(img, path)
    with pytest.raises(ChallengeError, match=r"case segrap_0000, file .*image_contrast\.nii\.gz: contrast CT image "
                                             r"geometry differs from the non-contrast CT image image\.nii\.gz \(x, y, "
                                             r"z as SimpleITK reports them; tolerance 0\.0001\): origin \(") as e:
        segrap2023.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    assert "np." not in str(e.value) and "direction" not in str(e.value)
    rel = synth.kits21(tmp_path / "kits", num_cases=2)
    seg = os.path.join(rel, "case_00001", "aggregated_MAJ_seg.nii.gz")
    nii = nibabel.load(seg)
    affine = nii.affine.copy()
    affine[:3, 0] *= -1   # a flipped first axis
    nibabel.save(nibabel.Nifti1Image(np.asanyarray(nii.dataobj), affine), seg)
    with pytest.raises(ChallengeError, match=r"case case_00001, file .*aggregated_MAJ_seg\.nii\.gz: label geometry "
                                             r"differs from the image imaging\.nii\.gz \(x, y, z as SimpleITK") as e:
        kits21.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    # plain numbers, the full 3x3 direction (9 values) in x, y, z order
    message = str(e.value)
    assert "np.float64" not in message and "spacing" not in message
    assert message.endswith("direction (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0) instead of "
                            "(0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)")
    # a difference within the tolerance is harmonised: the label takes the image's geometry
    rel = synth.kipa22(tmp_path / "kipa")
    lab = os.path.join(rel, "train", "label", "0.nii.gz")
    img = sitk.ReadImage(lab)
    img.SetSpacing(tuple(s * (1 + 2e-5) for s in img.GetSpacing()))
    sitk.WriteImage(img, lab)
    folder = kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    assert sitk.ReadImage(os.path.join(folder, "labelsTr", "KiPA_0.nii.gz")).GetSpacing() == \
        sitk.ReadImage(os.path.join(rel, "train", "image", "0.nii.gz")).GetSpacing()
    _verify(folder)


def test_label_values_outside_the_challenge_set(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    lab = os.path.join(rel, "train", "label", "2.nii.gz")
    img = sitk.ReadImage(lab)
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, lab)
    with pytest.raises(ChallengeError, match=r"case KiPA_2, file .*2\.nii\.gz: label values 7 are not in this "
                                             r"challenge's set \[0, 1, 2, 3, 4\]"):
        kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    rel = synth.myops2020(tmp_path / "myops")
    gd = os.path.join(rel, "train25_myops_gd", "myops_training_103_gd.nii.gz")
    img = sitk.ReadImage(gd)
    arr = sitk.GetArrayFromImage(img)
    arr[arr == 2221] = 2222
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, gd)
    with pytest.raises(ChallengeError, match="case myops_training_103.*label values 2222"):
        myops2020.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)


def test_unreadable_file_and_wrong_layout(tmp_path):
    rel = synth.amos22(tmp_path / "amos")
    with open(os.path.join(rel, "imagesTr", "amos_0004.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b garbage")
    with pytest.raises(ChallengeError, match=r"case amos_0004, file .*amos_0004\.nii\.gz: cannot read"):
        amos22.convert(str(rel), task=1, raw=str(tmp_path / "raw"), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    for module in (kits21, amos22, segrap2023, myops2020, kipa22):
        with pytest.raises(ReleaseLayoutError, match="not a"):
            module.convert(str(empty), raw=str(tmp_path / "raw"), progress=False)
    # an AMOS case listed in dataset.json but absent
    os.remove(os.path.join(rel, "labelsVa", "amos_0008.nii.gz"))
    with pytest.raises(CaseError, match=r"case amos_0008, file .*labelsVa/amos_0008\.nii\.gz: missing label"):
        amos22.convert(str(rel), task=2, raw=str(tmp_path / "raw2"), progress=False)
