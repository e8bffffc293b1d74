"""Unlabeled images through nnU-Net: imagesUn preprocessing (format, equality with nnU-Net's own
preprocessing, resume, errors) and L + U batches (mix, label-free unlabeled samples, corrupted labels change
nothing). One tiny dataset is planned and preprocessed in-process for the module."""
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from semi_helpers import DATASET, make_trainer, nnunet_env, plan_and_preprocess_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("semi")
    env = nnunet_env(root)
    saved = {k: os.environ.get(k) for k in list(env) + ["nnUNet_n_proc_DA"]}
    os.environ.update(env)
    os.environ["nnUNet_n_proc_DA"] = "1"  # nnU-Net's planner cannot take 0
    try:
        raw = plan_and_preprocess_tiny(root)
        os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: reproducible batches
        # a training image also given as an unlabeled one: its preprocessing must equal nnU-Net's
        shutil.copy(os.path.join(raw, "imagesTr", "Synthetic_000_0000.nii.gz"),
                    os.path.join(raw, "imagesUn", "Copy_000_0000.nii.gz"))
        yield {"root": root, "raw": raw, "pre": os.path.join(env["nnUNet_preprocessed"], DATASET)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _load(folder, case):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    data, seg, _, props = nnUNetDatasetBlosc2(folder, [case]).load_case(case)
    return np.asarray(data[:]), np.asarray(seg[:]), props


def test_synth_writes_unlabeled_images(tiny):
    files = sorted(os.listdir(os.path.join(tiny["raw"], "imagesUn")))
    assert files == ["Copy_000_0000.nii.gz", "Synthetic_008_0000.nii.gz", "Synthetic_009_0000.nii.gz",
                     "Synthetic_010_0000.nii.gz"]
    assert not os.path.exists(os.path.join(tiny["raw"], "labelsUn"))
    img = sitk.ReadImage(os.path.join(tiny["raw"], "imagesUn", "Synthetic_008_0000.nii.gz"))
    assert img.GetSize() == (32, 32, 16)


def test_preprocess_unlabeled_as_nnunet(tiny):
    from nnunet_plugins.semi.preprocess import preprocess_unlabeled

    report = preprocess_unlabeled(611, progress=False)
    out = report["3d_fullres"]["folder"]
    assert out == os.path.join(tiny["pre"], "nnUNetPlans_3d_fullres_unlabeled")
    assert sorted(report["3d_fullres"]["done"]) == ["Copy_000", "Synthetic_008", "Synthetic_009", "Synthetic_010"]
    assert sorted(os.listdir(out)) == sorted(f"{c}{e}" for c in report["3d_fullres"]["done"]
                                             for e in (".b2nd", "_seg.b2nd", ".pkl"))
    data, seg, props = _load(out, "Copy_000")
    ref_data, _, ref_props = _load(os.path.join(tiny["pre"], "nnUNetPlans_3d_fullres"), "Synthetic_000")
    np.testing.assert_array_equal(data, ref_data)  # bitwise nnU-Net's preprocessing of the same image
    assert set(np.unique(seg)) <= {-1, 0}  # nnU-Net's dummy segmentation of a case without labels
    assert "class_locations" not in props
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping"):
        assert np.array_equal(np.asarray(props[key]), np.asarray(ref_props[key])), key

    # resumable: finished cases are skipped, a missing one is redone, leftovers are removed
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    os.remove(os.path.join(out, "Synthetic_009.pkl"))
    os.makedirs(os.path.join(out, ".tmp-deadbeef"))
    again = preprocess_unlabeled(611, configurations=["3d_fullres"], progress=False)["3d_fullres"]
    assert again["done"] == ["Synthetic_009"] and len(again["skipped"]) == 3
    assert not os.path.exists(os.path.join(out, ".tmp-deadbeef"))
    for f, t in mtimes.items():
        if not f.startswith("Synthetic_009"):
            assert os.path.getmtime(os.path.join(out, f)) == t


def test_preprocess_errors_name_the_file(tiny, tmp_path):
    import json

    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_plugins.semi.preprocess import check_case_geometry, list_unlabeled_cases

    a = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    b = sitk.GetImageFromArray(np.zeros((4, 5, 7), np.float32))
    sitk.WriteImage(a, str(tmp_path / "x_0000.nii.gz"))
    sitk.WriteImage(b, str(tmp_path / "x_0001.nii.gz"))
    pm = PlansManager(json.load(open(os.path.join(tiny["pre"], "nnUNetPlans.json"))))
    with pytest.raises(ValueError, match="x_0001.nii.gz has shape"):
        check_case_geometry("x", [str(tmp_path / "x_0000.nii.gz"), str(tmp_path / "x_0001.nii.gz")], pm)

    fake = tmp_path / "raw"
    (fake / "imagesUn").mkdir(parents=True)
    dj = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    shutil.copy(tmp_path / "x_0000.nii.gz", fake / "imagesUn" / "u_0000.nii.gz")
    shutil.copy(tmp_path / "x_0001.nii.gz", fake / "imagesUn" / "u_0001.nii.gz")
    with pytest.raises(ValueError, match="case u has channels"):
        list_unlabeled_cases(str(fake), dj)
    os.remove(fake / "imagesUn" / "u_0001.nii.gz")
    (fake / "imagesUn" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        list_unlabeled_cases(str(fake), dj)


@pytest.fixture(scope="module")
def split(tiny):
    from nnunet_plugins.semi.preprocess import preprocess_unlabeled
    from nnunet_plugins.semi.split import write_semi_split

    preprocess_unlabeled(611, progress=False)
    write_semi_split(tiny["pre"], "2", seed=5, raw_dataset_folder=tiny["raw"])
    from nnunet_plugins.semi.split import load_semi_split
    return load_semi_split(tiny["pre"], 0)


def _draw(n, L=2, U=2, seed=0):
    from nnunet_plugins.semi.dataloading import get_semi_dataloaders

    np.random.seed(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    trainer = make_trainer()
    train, val = get_semi_dataloaders(trainer, L, U)
    batches = [next(train) for _ in range(n)]
    vb = next(val)
    train._finish()
    val._finish()
    return trainer, batches, vb


def test_batches_mix_labeled_and_unlabeled(tiny, split):
    from nnunet_plugins.semi.dataloading import UNLABELED_TARGET

    trainer, batches, vb = _draw(3)
    assert split["labeled"] and len(split["labeled"]) == 2 and len(split["unlabeled"]) == 4
    unlabeled_sources = set(split["unlabeled"]) | {"Copy_000", "Synthetic_008", "Synthetic_009", "Synthetic_010"}
    patch = tuple(trainer.configuration_manager.patch_size)
    for b in batches:
        assert b["data"].shape == (4, 1, *patch)
        assert b["labeled"].tolist() == [True, True, False, False]
        assert set(b["keys"][:2]) <= set(split["labeled"]) and set(b["keys"][2:]) <= unlabeled_sources
        targets = b["target"] if isinstance(b["target"], list) else [b["target"]]
        assert len(targets) > 1  # deep supervision scales, as nnU-Net's
        for t in targets:
            assert t.shape[0] == 4
            assert (t[2:] == UNLABELED_TARGET).all()
            assert (t[:2] >= 0).all()
    assert any((b["target"][0][:2] > 0).any() for b in batches)  # labeled samples carry their labels
    assert vb["labeled"].all() and set(vb["keys"]) <= set(split["val"])
    assert sorted(trainer.semi_data["labeled"]) == sorted(split["labeled"])
    assert trainer.semi_data["unlabeled_images"] == ["Copy_000", "Synthetic_008", "Synthetic_009", "Synthetic_010"]
    # an unlabeled target is unusable as a class index
    with pytest.raises((IndexError, RuntimeError)):
        torch.nn.functional.cross_entropy(torch.zeros(2, 3, 4), batches[0]["target"][0][2:, 0, :4, 0, 0].long())

    _, other, _ = _draw(1, L=1, U=3)
    assert other[0]["labeled"].tolist() == [True, False, False, False]


def test_unlabeled_cases_expose_no_labels(tiny, split):
    from nnunet_plugins.semi.dataloading import semi_datasets

    trainer = make_trainer()
    tr, _ = trainer.do_split()
    _, un, _, _ = semi_datasets(trainer, tr)
    for case in split["unlabeled"] + ["Synthetic_008"]:
        data, seg, seg_prev, props = un.load_case(case)
        assert props["class_locations"] is None and seg_prev is None
        assert set(np.unique(seg[...])) <= {-1, 0}


def test_corrupted_labels_of_unlabeled_cases_change_nothing(tiny, split, tmp_path):
    _, before, vb_before = _draw(4, seed=11)
    folder = os.path.join(tiny["pre"], "nnUNetPlans_3d_fullres")
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    try:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

        rng = np.random.default_rng(0)
        for case in split["unlabeled"]:
            data, seg, props = _load(folder, case)
            corrupted = np.where(seg >= 0, rng.integers(0, 3, seg.shape), seg).astype(seg.dtype)
            assert (corrupted != seg).any()
            props["class_locations"] = {k: np.zeros((5, 4), dtype=int) for k in props["class_locations"]}
            for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
                os.remove(os.path.join(folder, case + suffix))
            with pytest.warns(UserWarning):  # nnU-Net asks for chunk sizes; its defaults do here
                nnUNetDatasetBlosc2.save_case(data, corrupted, props, os.path.join(folder, case))
            with open(os.path.join(folder, case + ".pkl"), "rb") as f:
                assert all(len(v) == 5 for v in pickle.load(f)["class_locations"].values())
            assert (_load(folder, case)[1] == corrupted).all()
        _, after, vb_after = _draw(4, seed=11)
    finally:
        shutil.rmtree(folder)
        shutil.copytree(backup, folder)
    for a, b in zip(before, after):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["data"], b["data"])  # bitwise the same images, labeled and unlabeled
        for ta, tb in zip(a["target"], b["target"]):
            assert torch.equal(ta, tb)
    assert torch.equal(vb_before["data"], vb_after["data"])
