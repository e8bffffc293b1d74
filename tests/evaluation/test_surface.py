"""Surface metrics against hand-computed surfaces and brute-force point-to-point distances."""
import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_plugins.evaluation import surface as S


def _box_area(n, spacing):
    """Marching-cubes surface area of an n0 x n1 x n2 box of voxels, by hand: flat faces, 45-degree chamfer strips
    along the edges and a corner triangle at each of the eight corners."""
    (n0, n1, n2), (a, b, c) = n, spacing
    faces = 2 * ((n1 - 1) * b * (n2 - 1) * c + (n0 - 1) * a * (n2 - 1) * c + (n0 - 1) * a * (n1 - 1) * b)
    strips = 4 * ((n2 - 1) * c * np.hypot(a, b) / 2 + (n1 - 1) * b * np.hypot(a, c) / 2
                  + (n0 - 1) * a * np.hypot(b, c) / 2)
    corners = np.sqrt((b * c) ** 2 + (a * c) ** 2 + (a * b) ** 2)
    return faces + strips + corners


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.7, 0.9), (0.4, 3.0, 1.3)])
@pytest.mark.parametrize("n", [(1, 1, 1), (3, 4, 5), (2, 6, 1)])
def test_box_surface_area_equals_hand_computation(n, spacing):
    mask = np.zeros((9, 10, 11), dtype=bool)
    mask[2:2 + n[0], 1:1 + n[1], 3:3 + n[2]] = True
    sd = S.compute_surface_distances(mask, mask, spacing)
    assert sd.surfel_areas_gt.sum() == pytest.approx(_box_area(n, spacing), rel=1e-12)
    assert np.all(sd.distances_gt_to_pred == 0)


def test_table_is_complement_symmetric_and_empty_codes_have_no_area():
    areas = S.surfel_area_table((1.7, 0.6, 2.2))
    assert areas[0] == 0 and areas[255] == 0
    np.testing.assert_allclose(areas, areas[::-1], rtol=1e-12)   # code c and 255 - c share a surface
    assert np.all(areas[1:255] > 0)
    # single corner: a triangle cutting the corner at the edge midpoints
    iso = S.surfel_area_table((1, 1, 1))
    assert iso[1] == pytest.approx(np.sqrt(3) / 8)
    # two corners along an axis: a flat quad of 1 x sqrt(2)/2
    assert iso[3] == pytest.approx(np.sqrt(2) / 2)
    with pytest.raises(ValueError):
        S.surfel_area_table((1, 0, 1))


def _brute_force_surface_dice(gt, pred, spacing, tol):
    """Surface Dice by explicit point lists and all pairwise distances (no distance transform)."""
    areas = S.surfel_area_table(spacing)

    def points(mask):
        codes = S.neighbour_codes(mask)
        idx = np.argwhere((codes != 0) & (codes != 255))
        return idx * np.asarray(spacing), areas[codes[tuple(idx.T)]]

    pg, ag = points(gt)
    pp, ap = points(pred)
    d = np.sqrt(((pg[:, None, :] - pp[None, :, :]) ** 2).sum(-1))
    d_gt, d_pred = d.min(1), d.min(0)
    return (ag[d_gt <= tol].sum() + ap[d_pred <= tol].sum()) / (ag.sum() + ap.sum()), d_gt, d_pred


@pytest.mark.parametrize("seed", range(4))
def test_surface_dice_equals_brute_force(seed):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    shape = (8, 9, 10)
    gt = ndimage.binary_dilation(rng.random(shape) > 0.95, iterations=1)
    pred = ndimage.binary_dilation(rng.random(shape) > 0.95, iterations=1) | gt & (rng.random(shape) > 0.3)
    spacing = tuple(rng.uniform(0.5, 2.5, 3))
    sd = S.compute_surface_distances(gt, pred, spacing)
    for tol in (0.3, 1.0, 2.0, 4.0):
        expected, d_gt, d_pred = _brute_force_surface_dice(gt, pred, spacing, tol)
        assert S.surface_dice_from_distances(sd, tol) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(np.sort(sd.distances_gt_to_pred), np.sort(d_gt), atol=1e-9)
    np.testing.assert_allclose(np.sort(sd.distances_pred_to_gt), np.sort(d_pred), atol=1e-9)


def test_shifted_box_hand_made_surface_dice():
    """A box and the same box shifted by one voxel along axis 0 (2 mm): every surface point lies within 2 mm of
    the other surface (surface Dice 1 at 2 mm); at 1.9 mm the caps no longer count (brute force gives the value)."""
    gt = np.zeros((12, 8, 8), bool)
    gt[3:7, 2:6, 2:6] = True
    pred = np.roll(gt, 1, axis=0)
    spacing = (2.0, 1.0, 1.0)
    assert S.surface_dice(gt, pred, spacing, 2.0) == pytest.approx(1.0)
    sd_small = S.surface_dice(gt, pred, spacing, 1.9)
    expected, _, _ = _brute_force_surface_dice(gt, pred, spacing, 1.9)
    assert sd_small == pytest.approx(expected) and 0.3 < sd_small < 1.0


def test_empty_masks():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    b[1:3, 1:3, 1:3] = True
    sd = S.compute_surface_distances(a, b, (1, 1, 1))
    assert sd.surfel_areas_gt.size == 0 and np.all(np.isinf(sd.distances_pred_to_gt))
    assert S.surface_dice_from_distances(sd, 1.0) == 0.0
    assert np.isnan(S.surface_dice(a, a, (1, 1, 1), 1.0))
    with pytest.raises(ValueError):
        S.compute_surface_distances(a, b[:3], (1, 1, 1))


def test_contour_matches_itk_and_hausdorff_matches_itk_and_brute_force():
    rng = np.random.default_rng(3)
    from scipy import ndimage
    a = ndimage.binary_dilation(rng.random((10, 11, 12)) > 0.97, iterations=2)
    b = ndimage.binary_dilation(rng.random((10, 11, 12)) > 0.97, iterations=2)
    a[0:3, 0:3, 0:3] = True   # touches the border: ITK repeats border voxels, so no contour there
    for m in (a, b):
        itk = sitk.GetArrayFromImage(sitk.SimpleContourExtractor(sitk.GetImageFromArray(m.astype(np.uint8))))
        np.testing.assert_array_equal(S.contour_voxels(m), itk > 0)
    ca, cb = S.contour_voxels(a), S.contour_voxels(b)
    spacing = (1.3, 0.8, 2.0)
    hd, avd = S.hausdorff_and_average(ca, cb, spacing)
    f = sitk.HausdorffDistanceImageFilter()
    ia, ib = sitk.GetImageFromArray(ca.astype(np.uint8)), sitk.GetImageFromArray(cb.astype(np.uint8))
    for im in (ia, ib):
        im.SetSpacing(spacing[::-1])
    f.Execute(ia, ib)
    assert hd == pytest.approx(f.GetHausdorffDistance(), rel=1e-9)
    assert avd == pytest.approx(f.GetAverageHausdorffDistance(), rel=1e-9)
    pa, pb = np.argwhere(ca) * spacing, np.argwhere(cb) * spacing
    d = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1))
    assert hd == pytest.approx(max(d.min(1).max(), d.min(0).max()))
    assert avd == pytest.approx((d.min(1).mean() + d.min(0).mean()) / 2)
    with pytest.raises(ValueError):
        S.hausdorff_and_average(ca, np.zeros_like(cb))


def test_neighbour_codes_bit_layout():
    m = np.zeros((1, 1, 1), bool)
    m[0, 0, 0] = True
    codes = S.neighbour_codes(m)
    assert codes.shape == (2, 2, 2)
    # the voxel is the (1,1,1) corner of corner point (0,0,0) (bit 0) ... and the (0,0,0) corner of point (1,1,1)
    for q in itertools.product((0, 1), repeat=3):
        corner = tuple(1 - x for x in q)
        assert codes[q] == 1 << (7 - (4 * corner[0] + 2 * corner[1] + corner[2]))
