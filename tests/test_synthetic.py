import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins import synthetic
from nnunet_plugins.synthetic import SyntheticSpec, generate_dataset, make_case


def test_dataset_layout_and_geometry(tmp_path):
    folder = generate_dataset(tmp_path, dataset_id=12, name="Toy", num_cases=3, num_test=1, shape=(12, 20, 24),
                              spacing=(2.5, 0.7, 0.9), num_structures=3, num_channels=2, seed=3)
    assert os.path.basename(folder) == "Dataset012_Toy"
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["channel_names"] == {"0": "CT", "1": "MR1"}
    assert dj["labels"] == {"background": 0, "ellipsoid": 1, "box": 2, "tube": 3}
    assert dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert sorted(os.listdir(os.path.join(folder, "imagesTr"))) == [
        f"Toy_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)]
    assert sorted(os.listdir(os.path.join(folder, "labelsTr"))) == [f"Toy_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(os.listdir(os.path.join(folder, "imagesTs"))) == ["Toy_003_0000.nii.gz", "Toy_003_0001.nii.gz"]
    assert os.listdir(os.path.join(folder, "labelsTs")) == ["Toy_003.nii.gz"]
    origins = set()
    for i in range(3):
        seg = sitk.ReadImage(os.path.join(folder, "labelsTr", f"Toy_{i:03d}.nii.gz"))
        arr = sitk.GetArrayFromImage(seg)
        assert arr.shape == (12, 20, 24)
        assert set(np.unique(arr)) == {0, 1, 2, 3}, "every structure must be present in every case"
        np.testing.assert_allclose(seg.GetSpacing(), (0.9, 0.7, 2.5), rtol=1e-6)
        direction = np.array(seg.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)
        assert np.abs(direction - np.eye(3)).max() > 0.05, "direction must be oblique"
        origins.add(seg.GetOrigin())
        for c in range(2):
            img = sitk.ReadImage(os.path.join(folder, "imagesTr", f"Toy_{i:03d}_{c:04d}.nii.gz"))
            assert img.GetSize() == seg.GetSize()
            np.testing.assert_allclose(img.GetOrigin(), seg.GetOrigin())
            np.testing.assert_allclose(img.GetDirection(), seg.GetDirection())
    assert len(origins) == 3, "each case has its own origin"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "no temporary folder may remain"


def test_structures_are_separable_by_intensity_and_disjoint():
    spec = SyntheticSpec(shape=(24, 48, 48), num_structures=4)
    channels, label, _ = make_case(spec, 7)
    img = channels[0]
    means = [float(img[label == k].mean()) for k in range(5)]
    # structure means differ from each other and from the background by several noise std
    gaps = np.abs(np.subtract.outer(means, means))[np.triu_indices(5, 1)]
    assert gaps.min() > 2 * spec.noise_std
    # structures never touch: no voxel of one structure is a 6-neighbour of another structure
    for axis in range(3):
        a, b = np.moveaxis(label, axis, 0)[1:], np.moveaxis(label, axis, 0)[:-1]
        touching = (a > 0) & (b > 0) & (a != b)
        assert not touching.any()


def test_seed_determines_data(tmp_path):
    a, la, ga = make_case(SyntheticSpec(), 11)
    b, lb, gb = make_case(SyntheticSpec(), 11)
    c, lc, _ = make_case(SyntheticSpec(), 12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(la, lb)
    assert ga["origin"] == gb["origin"]
    assert not np.array_equal(la, lc)


def test_rerun_is_noop_and_conflict_is_an_error(tmp_path):
    folder = generate_dataset(tmp_path, dataset_id=5, num_cases=1, num_test=0, shape=(8, 16, 16))
    stamp = os.path.getmtime(os.path.join(folder, "dataset.json"))
    assert generate_dataset(tmp_path, dataset_id=5, num_cases=1, num_test=0, shape=(8, 16, 16)) == folder
    assert os.path.getmtime(os.path.join(folder, "dataset.json")) == stamp
    with pytest.raises(ValueError, match="already exists"):
        generate_dataset(tmp_path, dataset_id=5, num_cases=2, num_test=0, shape=(8, 16, 16))
    generate_dataset(tmp_path, dataset_id=5, num_cases=2, num_test=0, shape=(8, 16, 16), overwrite=True)
    assert len(os.listdir(os.path.join(folder, "labelsTr"))) == 2
    with pytest.raises(ValueError, match="already used"):
        generate_dataset(tmp_path, dataset_id=5, name="Other", num_cases=1, shape=(8, 16, 16))


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synthetic._write_image

    def failing(array, geometry, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(array, geometry, path)

    monkeypatch.setattr(synthetic, "_write_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path, dataset_id=9, num_cases=3, num_test=0, shape=(8, 16, 16))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"shape": (4, 16, 16)}, "shape"),
    ({"num_structures": 0}, "num_structures"),
    ({"spacing": (1.0, -1.0, 1.0)}, "spacing"),
    ({"dataset_id": 1000}, "dataset_id"),
    ({"name": "bad name"}, "name"),
])
def test_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)
