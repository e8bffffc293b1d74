"""Issue 13 (reliability): truncated files, changed releases, stale temporaries, extra predictions in export."""
import gzip
import json
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.dataset_conversion import amos22, kipa22, kits21, myops2020, segrap2023
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.dataset_conversion.common import CaseError, ChallengeError, Geometry, load_file, read_sitk


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:max(64, int(len(data) * keep))])


# item 1: a truncated .nii.gz is an error naming it, for all five challenges (one read: the bytes copied are the
# bytes decoded)
@pytest.mark.parametrize("challenge,relative", [
    ("kits21", "case_00001/imaging.nii.gz"),
    ("amos22", "labelsTr/amos_0004.nii.gz"),
    ("segrap2023", "SegRap2023_Training_Set_120cases/segrap_0001/image_contrast.nii.gz"),
    ("myops2020", "train25/myops_training_102_T2.nii.gz"),
    ("kipa22", "train/image/1.nii.gz"),
])
def test_truncated_file_is_an_error_naming_it(tmp_path, challenge, relative):
    rel = synth.generate(challenge, str(tmp_path / "rel"))
    path = os.path.join(rel, relative)
    _truncate(path)
    assert sitk.GetArrayFromImage(sitk.ReadImage(path)).size   # SimpleITK alone accepts the file
    module = {"kits21": kits21, "amos22": amos22, "segrap2023": segrap2023, "myops2020": myops2020,
              "kipa22": kipa22}[challenge]
    with pytest.raises(ChallengeError, match=r"file .*" + os.path.basename(relative).replace(".", r"\.")
                       + r": cannot read (image|label|.*image): the file is truncated"):
        module.convert(rel, raw=str(tmp_path / "raw"), progress=False)


def test_nifti_short_by_less_than_its_header_is_truncated(tmp_path):
    """The voxel data must be complete counting from the real data offset (352 here), not from the header's
    get_data_offset() (0 after nibabel's from_bytes): a file short by 200 bytes was accepted."""
    rel = synth.kipa22(tmp_path / "kipa")
    path = os.path.join(rel, "train", "image", "1.nii.gz")
    raw = gzip.decompress(open(path, "rb").read())
    img = sitk.ReadImage(path)
    voxels = int(np.prod(img.GetSize())) * sitk.GetArrayViewFromImage(img).itemsize
    offset = len(raw) - voxels                  # SimpleITK writes no extension: the header ends at the data
    assert offset == 352
    with open(path, "wb") as f:
        f.write(gzip.compress(raw[:-200]))     # a complete gzip stream of a NIfTI missing its last 200 bytes
    message = (f"case KiPA_1, file {path}: cannot read image: the file is truncated ({len(raw) - 200} uncompressed "
               f"bytes of header and voxel data, {len(raw)} needed: {offset} of header and {voxels} for size "
               f"{tuple(img.GetSize())} of type uint16)")
    with pytest.raises(ChallengeError) as e:
        kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False, num_processes=1)
    assert message in str(e.value)
    with pytest.raises(CaseError) as e:
        load_file("KiPA_1", path)
    assert str(e.value) == message


@pytest.mark.parametrize("keep,reason", [
    (0, "empty"), (1, r"truncated \(1 byte, inside the gzip header\)"),
    (5, r"truncated \(Compressed file ended"), (30, r"truncated \(Compressed file ended"),
])
def test_file_cut_inside_the_gzip_header_is_truncated(tmp_path, keep, reason):
    """SimpleITK cannot even pick a reader for these ("Unable to determine ImageIO reader"): the header-only read
    that comes first must say the file is truncated and name it."""
    rel = synth.kipa22(tmp_path / "kipa")
    path = os.path.join(rel, "train", "image", "1.nii.gz")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:keep])
    with pytest.raises(ChallengeError, match=r"case KiPA_1, file " + re.escape(path)
                       + r": cannot read image: the file is " + reason):
        kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False, num_processes=1)
    with pytest.raises(CaseError, match=r"cannot read image: the file is " + reason):
        Geometry.read("KiPA_1", path)
    with pytest.raises(CaseError, match=r"cannot read prediction: the file is " + reason.split()[0]):
        read_sitk("KiPA_1", path, "prediction")


# item 2: a changed release file is reconverted on a rerun, and the run says so
def test_changed_source_is_reconverted_and_reported(tmp_path, capsys):
    rel = synth.kipa22(tmp_path / "kipa")
    raw = str(tmp_path / "raw")
    folder = kipa22.convert(str(rel), raw=raw, progress=False)
    untouched = os.stat(os.path.join(folder, "labelsTr", "KiPA_0.nii.gz")).st_mtime_ns
    label = os.path.join(rel, "train", "label", "1.nii.gz")
    img = sitk.ReadImage(label)
    arr = sitk.GetArrayFromImage(img)
    arr[arr == 4] = 2          # the tumour relabelled as kidney
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(img)
    sitk.WriteImage(edited, label)
    capsys.readouterr()
    assert kipa22.convert(str(rel), raw=raw, progress=False) == folder
    out = capsys.readouterr().out
    assert ("reconverting 1 case(s) whose source files changed since they were converted: KiPA_1 "
            "(train/label/1.nii.gz)\n") in out
    assert "up to date" not in out
    converted = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "KiPA_1.nii.gz")))
    np.testing.assert_array_equal(converted, arr)
    assert os.stat(os.path.join(folder, "labelsTr", "KiPA_0.nii.gz")).st_mtime_ns == untouched
    capsys.readouterr()
    kipa22.convert(str(rel), raw=raw, progress=False)
    assert "complete and up to date" in capsys.readouterr().out
    # a dataset without the record (an earlier version wrote it) is converted again, and the run says why
    os.remove(os.path.join(folder, "conversion_sources.json"))
    kipa22.convert(str(rel), raw=raw, progress=False)
    assert "converting 4 case(s) again: their files exist but there is no record" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(folder, "conversion_sources.json"))


def test_moved_release_is_up_to_date_and_removed_case_is_reported(tmp_path, capsys):
    """The record is keyed by paths relative to the release: a release moved (or copied with its times) is up to
    date; a case taken out of the release is removed from the dataset and named."""
    rel = synth.kipa22(tmp_path / "kipa")
    raw = str(tmp_path / "raw")
    folder = kipa22.convert(str(rel), raw=raw, progress=False)
    record = json.load(open(os.path.join(folder, "conversion_sources.json")))["cases"]
    assert sorted(record["KiPA_1"]) == ["train/image/1.nii.gz", "train/label/1.nii.gz"]
    assert sorted(record["KiPA_70"]) == ["test/image/70.nii.gz"]
    # a record of an earlier version (absolute paths) of the same, unmoved release is still up to date
    old = {"cases": {c: {os.path.join(str(rel), p): v for p, v in r.items()} for c, r in record.items()}}
    json.dump(old, open(os.path.join(folder, "conversion_sources.json"), "w"))
    capsys.readouterr()
    kipa22.convert(str(rel), raw=raw, progress=False)
    assert "complete and up to date; nothing to do" in capsys.readouterr().out
    assert json.load(open(os.path.join(folder, "conversion_sources.json")))["cases"] == record   # rewritten
    converted = [os.path.join(folder, "imagesTr", f) for f in os.listdir(os.path.join(folder, "imagesTr"))]
    stamps = {f: os.stat(f).st_mtime_ns for f in converted}
    moved = str(tmp_path / "moved" / "KiPA22")
    os.makedirs(os.path.dirname(moved))
    os.rename(rel, moved)
    copied = str(tmp_path / "copied")
    shutil.copytree(moved, copied, copy_function=shutil.copy2)    # cp -rp: contents and times
    for release in (moved, copied):
        capsys.readouterr()
        assert kipa22.convert(release, raw=raw, progress=False) == folder
        assert "complete and up to date; nothing to do" in capsys.readouterr().out
    assert {f: os.stat(f).st_mtime_ns for f in converted} == stamps
    # a case removed from the release: removed from the dataset (dataset.json counts the rest) and named
    os.remove(os.path.join(copied, "train", "image", "2.nii.gz"))
    os.remove(os.path.join(copied, "train", "label", "2.nii.gz"))
    assert kipa22.convert(copied, raw=raw, progress=False) == folder
    out = capsys.readouterr().out
    assert (f"removing 1 case(s) that are no longer in the release from {folder}: KiPA_2 (2 file(s)); rerun "
            "nnUNetv2_plan_and_preprocess") in out
    assert "reconverting" not in out
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == ["KiPA_0.nii.gz", "KiPA_1.nii.gz"]
    assert json.load(open(os.path.join(folder, "dataset.json")))["numTraining"] == 2
    assert "KiPA_2" not in json.load(open(os.path.join(folder, "conversion_sources.json")))["cases"]
    # a removed test image (numTraining unchanged) is not "up to date" either
    os.remove(os.path.join(copied, "test", "image", "70.nii.gz"))
    kipa22.convert(copied, raw=raw, progress=False)
    out = capsys.readouterr().out
    assert "removing 1 case(s) that are no longer in the release" in out and ": KiPA_70 (1 file(s))" in out
    assert os.listdir(os.path.join(folder, "imagesTs")) == []


# item 6: our temporaries of a killed export are removed on the next run (only ours, by their naming pattern)
def test_export_removes_own_stale_temporaries(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    folder = kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    out = tmp_path / "sub"
    out.mkdir()
    stale = out / ".tmp-0123abcd-1.nii.gz"            # what atomic_output leaves after a kill -9
    stale.write_bytes(b"partial")
    foreign = out / ".tmp-notours.txt"
    foreign.write_bytes(b"keep")
    kipa22.export(os.path.join(folder, "labelsTr"), str(out), os.path.join(rel, "train", "image"), progress=False)
    assert not stale.exists() and foreign.exists()
    assert sorted(os.listdir(out)) == [".tmp-notours.txt", "0.nii.gz", "1.nii.gz", "2.nii.gz"]


# item 7 (export side): a prediction that matches no input image is listed; an error unless allow_extra
def test_export_extra_prediction_is_an_error_unless_allowed(tmp_path):
    rel = synth.kipa22(tmp_path / "kipa")
    folder = kipa22.convert(str(rel), raw=str(tmp_path / "raw"), progress=False)
    preds = tmp_path / "preds"
    shutil.copytree(os.path.join(folder, "labelsTr"), preds)
    shutil.copy(preds / "KiPA_0.nii.gz", preds / "KiPA_9.nii.gz")
    with pytest.raises(ChallengeError, match=r"1 prediction\(s\) in .*preds match no input image: 9 \(pass "
                                             r"--allow-extra to ignore them\)"):
        kipa22.export(str(preds), str(tmp_path / "sub"), os.path.join(rel, "train", "image"), progress=False)
    files = kipa22.export(str(preds), str(tmp_path / "sub"), os.path.join(rel, "train", "image"), progress=False,
                          allow_extra=True)
    assert sorted(os.path.basename(f) for f in files) == ["0.nii.gz", "1.nii.gz", "2.nii.gz"]


def test_run_parallel_takes_a_function_not_a_dotted_name():
    from nnunet_plugins.dataset_conversion.common import run_parallel

    import os.path

    assert run_parallel(os.path.join, [("a", {"a": "x"})], progress=False) == {"a": "x"}
    with pytest.raises(TypeError, match="takes the function itself, got 'os.path:join'"):
        run_parallel("os.path:join", [("a", {"a": "x"})], progress=False)
