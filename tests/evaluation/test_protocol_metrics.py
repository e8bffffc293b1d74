"""Protocol metrics (Dice, Jaccard, HD95, ASD in mm) against medpy, the papers' own implementation."""
import json
import os

import numpy as np
import pytest
from scipy import ndimage

medpy_binary = pytest.importorskip("medpy.metric.binary")

from nnunet_plugins.cli import main  # noqa: E402
from nnunet_plugins.evaluation.protocol import binary_metrics, evaluate_folder  # noqa: E402


def random_mask(rng, shape, blobs=3, touch_border=False):
    mask = np.zeros(shape, dtype=bool)
    grid = np.indices(shape)
    for _ in range(blobs):
        c = rng.uniform(0, shape) if touch_border else rng.uniform(np.array(shape) * 0.2, np.array(shape) * 0.8)
        r = rng.uniform(2, min(shape) / 3, size=3)
        mask |= (((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(0) <= 1
    return mask | (rng.random(shape) < 0.002)  # a few isolated voxels too


def medpy_reference(pred, gt, spacing):
    return {"dice": medpy_binary.dc(pred, gt), "jaccard": medpy_binary.jc(pred, gt),
            "hd95": medpy_binary.hd95(pred, gt, voxelspacing=spacing),
            "asd": medpy_binary.asd(pred, gt, voxelspacing=spacing)}


@pytest.mark.parametrize("seed", range(6))
def test_binary_metrics_match_medpy(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 28, 24)
    spacing = (3.0, 0.7, 1.1) if seed % 2 else (0.8, 2.5, 0.6)
    gt = random_mask(rng, shape, touch_border=seed >= 3)
    pred = ndimage.binary_dilation(gt, iterations=1) if seed == 0 else random_mask(rng, shape, touch_border=seed >= 3)
    ours = binary_metrics(pred, gt, spacing)
    ref = medpy_reference(pred, gt, spacing)
    for m in ref:
        assert ours[m] == pytest.approx(ref[m], rel=1e-9, abs=1e-9), m
    # ASD is directed (prediction -> reference), as medpy's asd(pred, gt)
    swapped = binary_metrics(gt, pred, spacing)
    assert swapped["asd"] == pytest.approx(medpy_binary.asd(gt, pred, voxelspacing=spacing))


def test_empty_mask_conventions():
    z = np.zeros((6, 6, 6), bool)
    one = z.copy()
    one[2:4, 2:4, 2:4] = True
    assert binary_metrics(z, z, (1, 1, 1)) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    for a, b in ((z, one), (one, z)):
        r = binary_metrics(a, b, (1, 1, 1))
        assert r["dice"] == 0 and r["jaccard"] == 0 and np.isnan(r["hd95"]) and np.isnan(r["asd"])
    assert binary_metrics(one, one, (2, 1, 1)) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(one, one[:-1], (1, 1, 1))


def _write(array, spacing, path):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(img, str(path))


def test_folder_per_case_per_label_and_cli(tmp_path):
    rng = np.random.default_rng(7)
    spacing = (2.5, 0.75, 0.625)  # exact in NIfTI's float32 pixdim
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    cases = {}
    for i in range(3):
        gt = random_mask(rng, (16, 20, 20)).astype(np.uint8)
        gt[random_mask(rng, (16, 20, 20), blobs=1)] = 2
        pred = np.where(rng.random(gt.shape) < 0.05, 0, gt).astype(np.uint8)
        pred[ndimage.binary_dilation(gt == 2) & (gt == 0)] = 2
        if i == 2:
            gt[gt == 2] = 0  # label 2 only in the prediction: distances undefined for this case
        cases[f"c{i}"] = (pred, gt)
        _write(pred, spacing, pred_dir / f"c{i}.nii.gz")
        _write(gt, spacing, gt_dir / f"c{i}.nii.gz")
    out = tmp_path / "m.json"
    res = evaluate_folder(str(pred_dir), str(gt_dir), output=str(out), progress=False)
    assert res["labels"] == ["1", "2"]
    rows = {r["case"]: r for r in res["per_case"]}
    for case, (pred, gt) in cases.items():
        for label in (1, 2):
            p, g = pred == label, gt == label
            if g.any():
                ref = medpy_reference(p, g, spacing)
                for m in ref:
                    assert rows[case][f"{m}_{label}"] == pytest.approx(ref[m], rel=1e-9), (case, label, m)
    assert np.isnan(rows["c2"]["hd95_2"]) and rows["c2"]["dice_2"] == 0
    assert res["summary"]["nan_cases"] == {"hd95_2": 1, "asd_2": 1}
    assert res["summary"]["mean"]["hd95_2"] == pytest.approx(np.mean([rows["c0"]["hd95_2"], rows["c1"]["hd95_2"]]))
    saved = json.loads(out.read_text())
    assert saved["per_case"][2]["hd95_2"] == "nan" and len(saved["per_case"]) == 3

    # the union of labels, from the command line
    assert main(["metrics", str(pred_dir), str(gt_dir), "-o", str(tmp_path / "u.json"), "--labels", "1,2",
                 "--no-progress"]) == 0
    union = json.loads((tmp_path / "u.json").read_text())
    pred, gt = cases["c1"]
    assert union["per_case"][1]["dice_1+2"] == pytest.approx(medpy_binary.dc(pred > 0, gt > 0))

    # errors name the case / files
    os.remove(pred_dir / "c1.nii.gz")
    with pytest.raises(ValueError, match="c1"):
        evaluate_folder(str(pred_dir), str(gt_dir), output=str(out), progress=False)
    _write(cases["c1"][0][:-1], spacing, pred_dir / "c1.nii.gz")
    with pytest.raises(Exception, match="c1.nii.gz"):
        evaluate_folder(str(pred_dir), str(gt_dir), output=str(out), progress=False)
