"""`synth --unlabeled`: imagesUn written, the labeled cases unchanged by adding unlabeled ones."""
import json
import os

import numpy as np
import SimpleITK as sitk

from nnunet_plugins.cli import main
from nnunet_plugins.synthetic import generate_dataset


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_unlabeled_images(tmp_path):
    kw = dict(dataset_id=620, num_cases=2, num_test=1, shape=(8, 12, 12), num_structures=1, seed=2)
    plain = generate_dataset(tmp_path / "a", **kw)
    assert main(["synth", "-d", "620", "--cases", "2", "--test-cases", "1", "--shape", "8", "12", "12",
                 "--structures", "1", "--seed", "2", "--unlabeled", "2", "--raw", str(tmp_path / "b")]) == 0
    semi = os.path.join(tmp_path / "b", "Dataset620_Synthetic")
    assert sorted(os.listdir(os.path.join(semi, "imagesUn"))) == ["Synthetic_003_0000.nii.gz",
                                                                  "Synthetic_004_0000.nii.gz"]
    assert sorted(os.listdir(semi)) == ["dataset.json", "imagesTr", "imagesTs", "imagesUn", "labelsTr", "labelsTs"]
    for sub, name in (("imagesTr", "Synthetic_001_0000.nii.gz"), ("labelsTs", "Synthetic_002.nii.gz")):
        np.testing.assert_array_equal(_array(os.path.join(plain, sub, name)), _array(os.path.join(semi, sub, name)))
    a = _array(os.path.join(semi, "imagesUn", "Synthetic_003_0000.nii.gz"))
    assert a.shape == (8, 12, 12) and a.std() > 0
    assert json.load(open(os.path.join(semi, "dataset.json")))["synthetic"]["num_unlabeled"] == 2
    assert "num_unlabeled" not in json.load(open(os.path.join(plain, "dataset.json")))["synthetic"]
