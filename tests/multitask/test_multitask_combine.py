"""``combine``: several tiny raw datasets with different label sets and channel counts -> one dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from multitask_helpers import make_sources
from nnunet_plugins.multitask.combine import combine_datasets
from nnunet_plugins.multitask.metadata import MultiTaskSpec


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    sources = make_sources(str(raw))
    folder = combine_datasets([11, 12, 13], 20, "Uni", raw_root=str(raw), num_processes=1, verbose=False)
    return str(raw), sources, folder


def test_dataset_json_and_task_tables(combined):
    raw, sources, folder = combined
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "noNorm", "1": "noNorm", "2": "noNorm"}
    assert dj["labels"] == {"background": 0, "A:ellipsoid": 1, "A:box": 2, "B:ellipsoid": 3, "B:box": 4,
                            "B:tube": 5, "C:ellipsoid": 6}
    assert dj["numTraining"] == 8 and dj["file_ending"] == ".nii.gz"
    spec = MultiTaskSpec.from_dataset_json(dj, allow_implicit=False)
    assert spec.tags == ("A", "B", "C") and spec.task_input_channels == (1, 2, 3)
    assert spec.task_num_classes == (3, 4, 2) and spec.num_input_channels == 3
    assert [t.normalization[0]["scheme"] for t in spec.tasks] == ["CTNormalization", "CTNormalization",
                                                                   "ZScoreNormalization"]
    assert spec.tasks[1].normalization[1]["scheme"] == "ZScoreNormalization"
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == sorted(
        [f"A_A_{i:03d}.nii.gz" for i in range(3)] + [f"B_B_{i:03d}.nii.gz" for i in range(3)]
        + [f"C_C_{i:03d}.nii.gz" for i in range(2)])
    # nnU-Net accepts it as one dataset
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(folder, num_processes=1)


def test_labels_are_remapped_into_each_tasks_own_values(combined):
    raw, (a, b, c), folder = combined
    for src, tag, offset in ((a, "A", 0), (b, "B", 2), (c, "C", 5)):
        for case in sorted(os.listdir(os.path.join(src, "labelsTr"))):
            source = _arr(os.path.join(src, "labelsTr", case))
            out = _arr(os.path.join(folder, "labelsTr", f"{tag}_{case}"))
            np.testing.assert_array_equal(out, np.where(source > 0, source + offset, 0))
    # test labels of source A come along too
    np.testing.assert_array_equal(_arr(os.path.join(folder, "labelsTs", "A_A_003.nii.gz")),
                                  _arr(os.path.join(a, "labelsTs", "A_003.nii.gz")))


def test_images_normalised_per_source_and_padded(combined):
    raw, (a, b, c), folder = combined
    spec = MultiTaskSpec.from_dataset_json(json.load(open(os.path.join(folder, "dataset.json"))))
    # CT channel of A: clipped to A's foreground percentiles and z-scored with A's foreground statistics
    props = spec.tasks[0].normalization[0]["intensity_properties"]
    fg = np.concatenate([_arr(os.path.join(a, "imagesTr", f"A_{i:03d}_0000.nii.gz"))[
        _arr(os.path.join(a, "labelsTr", f"A_{i:03d}.nii.gz")) > 0] for i in range(3)])
    assert abs(props["mean"] - fg.mean()) < 0.1 * fg.std() and abs(props["std"] / fg.std() - 1) < 0.1
    for case in ("A_000", "A_003"):
        split = "Tr" if case == "A_000" else "Ts"
        raw_img = _arr(os.path.join(a, f"images{split}", f"{case}_0000.nii.gz")).astype(np.float64)
        expected = (np.clip(raw_img, props["percentile_00_5"], props["percentile_99_5"]) - props["mean"]) / props["std"]
        np.testing.assert_allclose(_arr(os.path.join(folder, f"images{split}", f"A_{case}_0000.nii.gz")), expected,
                                   rtol=1e-4, atol=1e-4)
        for pad in (1, 2):  # A has one channel: the others are zero padding
            assert not _arr(os.path.join(folder, f"images{split}", f"A_{case}_{pad:04d}.nii.gz")).any()
    # B's MR channel: z-score per image
    raw_mr = _arr(os.path.join(b, "imagesTr", "B_001_0001.nii.gz")).astype(np.float64)
    np.testing.assert_allclose(_arr(os.path.join(folder, "imagesTr", "B_B_001_0001.nii.gz")),
                               (raw_mr - raw_mr.mean()) / raw_mr.std(), rtol=1e-4, atol=1e-4)
    assert not _arr(os.path.join(folder, "imagesTr", "B_B_001_0002.nii.gz")).any()


def test_ct_and_mr_tasks_do_not_share_ct_statistics(combined):
    raw, (a, b, c), folder = combined
    # channel 0 of C is declared MR ('T2'): z-scored per image, not with any CT statistics
    raw0 = _arr(os.path.join(c, "imagesTr", "C_000_0000.nii.gz")).astype(np.float64)
    out0 = _arr(os.path.join(folder, "imagesTr", "C_C_000_0000.nii.gz"))
    np.testing.assert_allclose(out0, (raw0 - raw0.mean()) / raw0.std(), rtol=1e-4, atol=1e-4)
    # while A's and B's CT channels each use their own source's statistics
    spec = MultiTaskSpec.from_dataset_json(json.load(open(os.path.join(folder, "dataset.json"))))
    pa, pb = (spec.tasks[t].normalization[0]["intensity_properties"] for t in (0, 1))
    assert pa["mean"] != pb["mean"]


def test_geometry_is_kept(combined):
    raw, (a, b, c), folder = combined
    src = sitk.ReadImage(os.path.join(b, "imagesTr", "B_002_0000.nii.gz"))
    for f in ("imagesTr/B_B_002_0000.nii.gz", "imagesTr/B_B_002_0002.nii.gz", "labelsTr/B_B_002.nii.gz"):
        out = sitk.ReadImage(os.path.join(folder, f))
        assert out.GetSize() == src.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(out.GetDirection(), src.GetDirection(), atol=1e-6)


def test_rerun_is_a_noop_and_conflicts_are_errors(combined):
    raw, _, folder = combined
    stamp = os.path.getmtime(os.path.join(folder, "dataset.json"))
    assert combine_datasets([11, 12, 13], 20, "Uni", raw_root=raw, verbose=False) == folder
    assert os.path.getmtime(os.path.join(folder, "dataset.json")) == stamp
    with pytest.raises(ValueError, match="already exists"):
        combine_datasets([11, 12], 20, "Uni", raw_root=raw, verbose=False)
    with pytest.raises(ValueError, match="already used"):
        combine_datasets([11, 12], 20, "Other", raw_root=raw, verbose=False)
    with pytest.raises(ValueError, match="unique"):
        combine_datasets([11, 12], 21, "X", raw_root=raw, tags=["Same", "Same"], verbose=False)
    with pytest.raises(ValueError, match="letters and digits"):
        combine_datasets([11, 12], 21, "X", raw_root=raw, tags=["ok", "not_ok"], verbose=False)
    assert not any(d.startswith(".Dataset021") for d in os.listdir(raw)), "no temporary folder may be left behind"


def test_undeclared_label_value_names_the_case(tmp_path):
    from nnunet_plugins.synthetic import generate_dataset

    src = generate_dataset(str(tmp_path), dataset_id=31, name="Bad", num_cases=2, num_test=0, shape=(8, 16, 16),
                           num_structures=1, seed=4)
    img = sitk.ReadImage(os.path.join(src, "labelsTr", "Bad_001.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(img)
    sitk.WriteImage(bad, os.path.join(src, "labelsTr", "Bad_001.nii.gz"))
    generate_dataset(str(tmp_path), dataset_id=32, name="Good", num_cases=2, num_test=0, shape=(8, 16, 16), seed=5)
    with pytest.raises(ValueError, match=r"Bad_001.*\[7\]"):
        combine_datasets([31, 32], 40, "X", raw_root=str(tmp_path), verbose=False)
    assert not os.path.exists(os.path.join(tmp_path, "Dataset040_X"))


def test_cli_reports_errors_in_one_line(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "nnunet_plugins", "combine", "-d", "998", "-o", "40"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "dataset ID 998" in out.stderr and "Traceback" not in out.stderr


def test_unlabeled_images_are_carried_normalised_padded_and_tagged(tmp_path):
    from nnunet_plugins.synthetic import generate_dataset

    raw = str(tmp_path)
    generate_dataset(raw, dataset_id=41, name="P", num_cases=2, num_test=0, num_unlabeled=2, shape=(8, 8, 8),
                     num_structures=1, num_channels=1, seed=1)
    generate_dataset(raw, dataset_id=42, name="Q", num_cases=2, num_test=0, shape=(8, 8, 8), num_structures=1,
                     num_channels=2, seed=2)
    folder = combine_datasets([41, 42], 43, "PQ", raw_root=raw, verbose=False)
    un = sorted(os.listdir(os.path.join(folder, "imagesUn")))
    # P's two unlabeled images, two channels each (Q has two): channel 1 is the zero padding
    assert un == ["P_P_002_0000.nii.gz", "P_P_002_0001.nii.gz", "P_P_003_0000.nii.gz", "P_P_003_0001.nii.gz"]
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["numTraining"] == 4 and not os.path.exists(os.path.join(folder, "labelsUn"))
    src = _arr(os.path.join(raw, "Dataset041_P", "imagesUn", "P_002_0000.nii.gz")).astype(np.float64)
    got = _arr(os.path.join(folder, "imagesUn", "P_P_002_0000.nii.gz"))
    from nnunet_plugins.multitask.intensity import normalize_channels

    spec = MultiTaskSpec.from_dataset_json(dj)   # normalised with the source's own scheme, as its training images
    expected = normalize_channels(src[None].astype(np.float32), spec.tasks[0].normalization, None)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, src)
    assert not _arr(os.path.join(folder, "imagesUn", "P_P_002_0001.nii.gz")).any()
    # an imagesUn case is part of the combination's fingerprint: a new one needs --overwrite
    generate_dataset(raw, dataset_id=42, name="Q", num_cases=2, num_test=0, num_unlabeled=1, shape=(8, 8, 8),
                     num_structures=1, num_channels=2, seed=2, overwrite=True)
    with pytest.raises(ValueError, match="overwrite"):
        combine_datasets([41, 42], 43, "PQ", raw_root=raw, verbose=False)
    folder = combine_datasets([41, 42], 43, "PQ", raw_root=raw, verbose=False, overwrite=True)
    assert "Q_Q_002_0000.nii.gz" in os.listdir(os.path.join(folder, "imagesUn"))
