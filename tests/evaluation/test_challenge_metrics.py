"""Evaluators against independent computations on small hand-made cases (brute-force distances, ITK filters)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from _reference_metrics import dice as ref_dice
from _reference_metrics import surface_dice as ref_surface_dice
from nnunet_plugins.dataset_conversion import kits21 as kits_tables
from nnunet_plugins.dataset_conversion import segrap2023 as segrap_tables
from nnunet_plugins.dataset_conversion import synthetic_releases as synth
from nnunet_plugins.evaluation import amos22, kipa22, kits21, myops2020, segrap2023


def _write(array, path, spacing_zyx, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(origin)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    sitk.WriteImage(img, str(path))
    return str(path)


def _kits_case(shift):
    ref = np.zeros((8, 12, 12), np.uint8)
    ref[1:7, 2:10, 2:10] = 1
    ref[2:5, 3:7, 3:7] = 2
    ref[4:6, 7:9, 6:9] = 3
    pred = np.roll(ref, shift, axis=2)
    pred[pred == 3] = 1   # cyst missed
    return ref, pred


def test_kits21_hec_metrics_match_independent_computation(tmp_path):
    spacing = (2.0, 0.75, 0.75)   # exact in the float32 NIfTI header
    ref, pred = _kits_case(2)   # shifted by 1.5 mm: between the final and the older kidney tolerance
    _write(ref, tmp_path / "gt" / "case_00007.nii.gz", spacing)
    _write(pred, tmp_path / "pred" / "case_00007.nii.gz", spacing)
    res = kits21.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), progress=False, verbose=False)
    row = res["rows"][0]
    assert row["reference"] == "majority"
    for hec, labels in kits_tables.HEC_LABELS.items():
        p, r = np.isin(pred, labels), np.isin(ref, labels)
        assert row[f"Dice_{hec}"] == pytest.approx(ref_dice(p, r), abs=1e-12)
        tol = kits_tables.SD_TOLERANCES_MM[hec]
        assert row[f"SD_{hec}"] == pytest.approx(ref_surface_dice(r, p, spacing, tol), abs=1e-12)
    assert 0 < row["SD_mass"] < 1 and 0 < row["Dice_tumor"] < 1
    assert res["tolerance_revision"].startswith("neheller/kits21@697892ba")
    # the older tolerances are larger: surface Dice can only grow
    older = kits21.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), tolerances="older", out_dir=str(tmp_path),
                            progress=False, verbose=False)["rows"][0]
    assert older["SD_kidney_and_mass"] > row["SD_kidney_and_mass"]
    older_tol = kits_tables.OLDER_SD_TOLERANCES_MM["kidney_and_mass"]
    assert older["SD_kidney_and_mass"] == pytest.approx(
        ref_surface_dice(np.isin(ref, (1, 2, 3)), np.isin(pred, (1, 2, 3)), spacing, older_tol))


def test_kits21_empty_rules_and_sample_averaging(tmp_path):
    spacing = (2.0, 0.75, 0.75)   # exact in the float32 NIfTI header
    ref, pred = _kits_case(0)
    ref_no_mass = np.where(ref > 1, 1, ref).astype(np.uint8)
    pred_no_mass = ref_no_mass.copy()
    case = tmp_path / "data" / "case_00003"
    _write(ref_no_mass, case / "aggregated_MAJ_seg.nii.gz", spacing)
    _write(ref, case / "segmentation_samples" / "group_0" / "kidney_i1a1_cyst_i1a1_tumor_i1a2.nii.gz", spacing)
    _write(ref_no_mass, case / "segmentation_samples" / "group_1" / "kidney_i1a2_cyst_i1a2_tumor_i1a1.nii.gz", spacing)
    _write(pred_no_mass, tmp_path / "pred" / "case_00003.nii.gz", spacing)
    res = kits21.evaluate(str(tmp_path / "pred"), str(tmp_path / "data"), progress=False, verbose=False)
    maj, samples = res["rows"]
    # no mass in prediction nor reference: both empty -> 1 and 1
    assert maj["Dice_mass"] == 1.0 and maj["SD_tumor"] == 1.0 and maj["Dice_kidney_and_mass"] == 1.0
    # samples: one sample has masses (prediction empty there -> 0), one has none (-> 1): mean 0.5
    assert samples["num_references"] == 2
    assert samples["Dice_tumor"] == 0.5 and samples["SD_mass"] == 0.5
    kidney_vs_first = ref_dice(np.isin(pred_no_mass, (1, 2, 3)), np.isin(ref, (1, 2, 3)))
    assert samples["Dice_kidney_and_mass"] == pytest.approx((kidney_vs_first + 1.0) / 2)
    only_samples = kits21.evaluate(str(tmp_path / "pred"), str(tmp_path / "data"), reference="samples",
                                   progress=False, verbose=False)
    assert [r["reference"] for r in only_samples["rows"]] == ["samples"]


def test_amos22_dsc_nsd(tmp_path):
    import nibabel
    spacing = (0.75, 0.875, 2.5)   # nibabel axes (x, y, z); exact in float32
    ref = np.zeros((14, 12, 8), np.uint8)
    ref[2:8, 2:9, 1:5] = 1
    ref[9:13, 3:7, 2:7] = 6
    pred = ref.copy()
    pred[2:5, 2:9, 1:5] = 0       # part of the spleen missed
    pred[0:2, 0:2, 0:2] = 14      # a bladder the reference does not have
    affine = np.diag(list(spacing) + [1.0])
    for arr, folder in ((ref, "gt"), (pred, "pred")):
        os.makedirs(tmp_path / folder)
        nibabel.save(nibabel.Nifti1Image(arr, affine), str(tmp_path / folder / "amos_0042.nii.gz"))
    row = amos22.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), progress=False, verbose=False)["rows"][0]
    assert row["DSC_spleen"] == pytest.approx(ref_dice(pred == 1, ref == 1))
    assert row["NSD_spleen"] == pytest.approx(ref_surface_dice(ref == 1, pred == 1, spacing, 1.0), abs=1e-12)
    assert row["DSC_liver"] == 1.0 and row["NSD_liver"] == 1.0
    assert row["DSC_bladder"] == 0.0 and row["NSD_bladder"] == 0.0       # only in the prediction
    assert row["DSC_aorta"] == 1.0 and row["NSD_aorta"] == 1.0           # in neither
    row2 = amos22.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), tolerance_mm=2.0, out_dir=str(tmp_path),
                           progress=False, verbose=False)["rows"][0]
    assert row2["NSD_spleen"] == pytest.approx(ref_surface_dice(ref == 1, pred == 1, spacing, 2.0), abs=1e-12)


def test_segrap2023_per_organ_tolerances_rounding_and_empty_rules(tmp_path):
    rel = synth.segrap2023(tmp_path / "segrap", num_cases=1, spacing=(1.0, 1.0, 1.0))
    case_dir = os.path.join(rel, segrap_tables.TRAINING_FOLDER, "segrap_0000")
    gt_map = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(rel, segrap_tables.MAP_FOLDER, "Task001",
                                                                "segrap_0000.nii.gz")))
    pred_map = gt_map.copy()
    for value in (48, 49, 35, 53):   # Larynx parts, OralCavity, Thyroid moved by 2 voxels (2 mm)
        moved = np.roll(gt_map == value, 2, axis=2)
        pred_map[pred_map == value] = 0
        pred_map[moved] = value
    pred_map[pred_map == 34] = 0            # Pituitary missed
    ref_img = sitk.ReadImage(os.path.join(case_dir, "image.nii.gz"))
    pred_img = sitk.GetImageFromArray(pred_map)
    pred_img.CopyInformation(ref_img)
    os.makedirs(tmp_path / "pred")
    sitk.WriteImage(pred_img, str(tmp_path / "pred" / "segrap_0000.nii.gz"))
    res = segrap2023.evaluate(str(tmp_path / "pred"), str(rel), task=1, progress=False, verbose=False)
    full = segrap2023.evaluate(str(tmp_path / "pred"), str(rel), task=1, round_decimals=None, out_dir=str(tmp_path),
                               progress=False, verbose=False)
    row, row_full = res["rows"][0], full["rows"][0]
    pred_masks = segrap_tables.decode(pred_map, 1)
    for organ in ("Larynx", "OralCavity", "Thyroid", "Brain", "Pituitary"):
        gt = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case_dir, f"{organ}.nii.gz"))) > 0
        tol = {"Larynx": 2.0, "OralCavity": 3.0}.get(organ, 1.0)
        p = pred_masks[organ]
        d = ref_dice(p, gt) if p.any() else 0.0
        nsd = ref_surface_dice(gt, p, (1.0, 1.0, 1.0), tol) if p.any() else 0.0
        assert row_full[f"DSC_{organ}"] == pytest.approx(d, abs=1e-12)
        assert row_full[f"NSD_{organ}"] == pytest.approx(nsd, abs=1e-12)
        assert row[f"DSC_{organ}"] == round(row_full[f"DSC_{organ}"], 4)
        assert row[f"NSD_{organ}"] == round(row_full[f"NSD_{organ}"], 4)
    # the tolerance is the organ's: at 1 mm the moved Larynx would score lower than at its 2 mm
    gt_larynx = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(case_dir, "Larynx.nii.gz"))) > 0
    assert row_full["NSD_Larynx"] > ref_surface_dice(gt_larynx, pred_masks["Larynx"], (1.0, 1.0, 1.0), 1.0)
    assert row["NSD_Thyroid"] < 1.0 and row["DSC_Brain"] == 1.0
    assert row["DSC_Pituitary"] == 0.0 and row["NSD_Pituitary"] == 0.0
    # reference empty: both empty -> 1/1, prediction only -> 0/0
    assert segrap2023.structure_metrics(np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), (1, 1, 1), 1.0) == (1.0, 1.0)
    blob = np.zeros((3, 3, 3))
    blob[1, 1, 1] = 1
    assert segrap2023.structure_metrics(blob, np.zeros((3, 3, 3)), (1, 1, 1), 1.0) == (0.0, 0.0)


def test_myops2020_dice_of_scar_and_edema_scar(tmp_path):
    ref = np.zeros((3, 10, 10), np.uint16)
    ref[:, 2:8, 2:8] = 200
    ref[:, 2:5, 2:8] = 1220
    ref[:, 2:3, 2:6] = 2221
    pred = ref.copy()
    pred[:, 2:3, 2:8] = 2221          # scar too large
    pred[:, 4, 2:8] = 200             # edema row missed
    _write(ref, tmp_path / "gt" / "myops_training_110_gd.nii.gz", (10, 1.3, 1.3))
    _write(pred, tmp_path / "pred" / "myops_training_110_seg.nii.gz", (10, 1.3, 1.3))
    no_scar = np.where(ref == 2221, 1220, ref).astype(np.uint16)
    _write(no_scar, tmp_path / "gt" / "myops_training_111_gd.nii.gz", (10, 1.3, 1.3))
    _write(no_scar, tmp_path / "pred" / "myops_training_111_seg.nii.gz", (10, 1.3, 1.3))
    rows = myops2020.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), progress=False, verbose=False)["rows"]
    assert rows[0]["Dice_scar"] == pytest.approx(2 * 12 / (18 + 12))
    edema_scar = (1220, 2221)
    assert rows[0]["Dice_edema_scar"] == pytest.approx(ref_dice(np.isin(pred, edema_scar), np.isin(ref, edema_scar)))
    assert rows[1]["Dice_scar"] == 1.0 and rows[1]["scar_empty_in_both"] is True


def _official_kipa_hd(pred_img, gt_img, label, official_bug):
    """The official KiPA procedure written with ITK's own filters (resampling, contour, Hausdorff)."""
    sp, size = gt_img.GetSpacing(), gt_img.GetSize()
    new_size = [int(round(size[i] * sp[i])) for i in range(3)]
    pred_img = sitk.Image(pred_img)
    if official_bug:
        pred_img.SetSpacing([sp[0]] * 3)

    def resample(img, ref):
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(ref)
        f.SetSize(new_size)
        f.SetOutputSpacing([1, 1, 1])
        f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
        f.SetInterpolator(sitk.sitkNearestNeighbor)
        return f.Execute(img)

    g = sitk.GetArrayFromImage(resample(gt_img, gt_img)) == label
    p = sitk.GetArrayFromImage(resample(pred_img, pred_img if official_bug else gt_img)) == label
    contour = lambda m: sitk.GetArrayFromImage(sitk.SimpleContourExtractor(sitk.GetImageFromArray(m.astype(np.uint8))))
    gc, pc = contour(g), contour(p)
    if not pc.any():
        pc = np.zeros_like(pc)
        pc[[0, -1], :, :] = 1
        pc[:, [0, -1], :] = 1
        pc[:, :, [0, -1]] = 1
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(sitk.GetImageFromArray(pc), sitk.GetImageFromArray(gc))
    return f.GetHausdorffDistance(), f.GetAverageHausdorffDistance()


@pytest.mark.parametrize("official_bug", [False, True])
def test_kipa22_metrics_match_itk_official_procedure(tmp_path, official_bug):
    spacing = (0.5, 0.8, 0.7)   # anisotropic: the official spacing error matters
    gt = np.zeros((20, 16, 18), np.uint8)
    gt[4:16, 3:13, 4:14] = 2
    gt[6:10, 5:9, 6:10] = 4
    gt[2:18, 7:9, 1:4] = 1
    gt[12:15, 10:12, 2:16] = 3
    pred = gt.copy()
    pred[pred == 4] = 2
    pred[5:11, 5:10, 9:12] = 4         # tumour elsewhere
    pred[pred == 3] = 2                # artery missing -> image border rule
    origin = (10.0, -4.0, 7.5)
    _write(gt, tmp_path / "gt" / "5.nii.gz", spacing, origin)
    _write(pred, tmp_path / "pred" / "KiPA_5.nii.gz", spacing, origin)
    row = kipa22.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), official_spacing_bug=official_bug,
                          progress=False, verbose=False)["rows"][0]
    assert row["case"] == "5"
    gt_img = sitk.ReadImage(str(tmp_path / "gt" / "5.nii.gz"))
    pred_img = sitk.ReadImage(str(tmp_path / "pred" / "KiPA_5.nii.gz"))
    for value, name in zip(kipa22.LABEL_VALUES, kipa22.STRUCTURES):
        assert row[f"DSC_{name}"] == pytest.approx(ref_dice(pred == value, gt == value))
        hd, avd = _official_kipa_hd(pred_img, gt_img, value, official_bug)
        assert row[f"HD_{name}"] == pytest.approx(hd, rel=1e-9), name
        assert row[f"AVD_{name}"] == pytest.approx(avd, rel=1e-9), name
    assert row["HD_Artery"] > 5   # the border penalty
    if not official_bug:
        assert row["HD_Vein"] == 0.0   # unchanged structure, correctly overlaid
    else:
        assert row["HD_Vein"] > 0.0    # the official spacing error misplaces even an unchanged structure


def test_kipa22_missing_reference_structure_and_empty_dice(tmp_path):
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[2:8, 2:8, 2:8] = 2
    pred = gt.copy()
    pred[0:2, 0:2, 0:2] = 4
    _write(gt, tmp_path / "gt" / "1.nii.gz", (1.0, 1.0, 1.0))
    _write(pred, tmp_path / "pred" / "1.nii.gz", (1.0, 1.0, 1.0))
    res = kipa22.evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), progress=False, verbose=False)
    row = res["rows"][0]
    assert np.isnan(row["DSC_Vein"]) and row["DSC_Tumor"] == 0.0 and row["DSC_Kidney"] == 1.0
    assert np.isnan(row["HD_Tumor"]) and np.isnan(row["AVD_Vein"])   # the official script would crash here
    assert res["summary"]["all"]["nan_cases"]["HD_Tumor"] == 1
