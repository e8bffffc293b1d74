"""Surface metrics against hand-computed surfaces and brute-force point-to-point distances."""
import itertools
import warnings

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


# ------------------------------------------------------------------------------------------------------------
# Surface Dice by the tolerance search: identical to the full distance maps and to DeepMind's surface-distance
# ------------------------------------------------------------------------------------------------------------

TOLERANCES = (0.0, 0.5, 1.0, 2.0, 3.7, 50.0, np.inf)


def _pairs():
    """(gt, pred, spacing) cases: random blobs, a perturbed copy, masks touching the volume border, disjoint
    masks far apart, anisotropic random spacings and one of exact binary fractions (where many offsets have
    exactly the length of a tolerance: 2 mm is one step along axis 0, two along axis 1, four along axis 2)."""
    from scipy import ndimage
    rng = np.random.default_rng(12)
    cases = []
    for i in range(4):
        shape = (9 + i, 12, 14 - i)
        gt = ndimage.binary_dilation(rng.random(shape) > 0.96, iterations=2)
        pred = gt ^ (ndimage.binary_dilation(rng.random(shape) > 0.97) & (rng.random(shape) > 0.4))
        if i % 2:
            gt[0, :4, :] = True   # touches three faces of the volume
            pred[-2:, -3:, -1] = True
        spacing = (2.0, 1.0, 0.5) if i == 3 else tuple(rng.uniform(0.3, 3.0, 3))
        cases.append((gt, pred, spacing))
    far = np.zeros((6, 20, 8), bool)
    far_pred = far.copy()
    far[1:4, 1:4, 2:5] = True
    far_pred[2:5, 14:19, 3:6] = True
    cases.append((far, far_pred, (1.5, 0.8, 1.1)))
    return cases


def _full_map_surface_dice(sd, tol):
    """Surface Dice from the exact distance arrays (the distance maps of the whole bounding box)."""
    a_gt, a_pred = sd.surfel_areas_gt, sd.surfel_areas_pred
    overlap = a_gt[sd.distances_gt_to_pred <= tol].sum() + a_pred[sd.distances_pred_to_gt <= tol].sum()
    return float(overlap / (a_gt.sum() + a_pred.sum()))


def _deepmind_surface_dice(gt, pred, spacing, tol, monkeypatch):
    dm = pytest.importorskip("surface_distance", reason="DeepMind's surface-distance (setup.py's test extra)")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)   # its empty-mask branch still uses np.Inf (NumPy < 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # it imports from scipy.ndimage.filters / .morphology
        return dm.compute_surface_dice_at_tolerance(dm.compute_surface_distances(gt, pred, list(spacing)), tol)


@pytest.mark.parametrize("case", range(5))
def test_tolerance_search_equals_full_distance_maps_and_deepmind(case, monkeypatch):
    gt, pred, spacing = _pairs()[case]
    for tol in TOLERANCES:
        fast = S.surface_dice_from_distances(S.compute_surface_distances(gt, pred, spacing), tol)
        full = _full_map_surface_dice(S.compute_surface_distances(gt, pred, spacing), tol)
        assert fast == full, (tol, fast, full)   # the same points within, summed in the same order
        assert fast == pytest.approx(_deepmind_surface_dice(gt, pred, spacing, tol, monkeypatch), abs=1e-9)
        assert S.surface_dice(gt.astype(np.uint8), pred.astype(np.int16), spacing, tol) == fast
    for order in (list(TOLERANCES), list(TOLERANCES[::-1]), [1.0, 0.5, 3.7, 0.5]):
        assert S.surface_dice(gt, pred, spacing, order) == [S.surface_dice(gt, pred, spacing, t) for t in order]
    if case == 4:   # far apart: nothing within 3.7 mm, everything within 50 mm
        assert S.surface_dice(gt, pred, spacing, [3.7, 50.0]) == [0.0, 1.0]


@pytest.mark.parametrize("path", ["probes", "probes then transform", "transform"])
def test_every_search_path_decides_as_the_distance_maps(path, monkeypatch):
    """The offset probes, the switch to the distance transform part way, and the transform alone: each finds
    exactly the points whose distance (from the full distance maps) is <= the tolerance; the probes also give
    the exact distances up to their limit and inf beyond."""
    if path == "probes":
        monkeypatch.setattr(S, "_EDT_NS_PER_POINT", np.inf)
    elif path == "probes then transform":
        monkeypatch.setattr(S, "_EDT_NS_PER_POINT", 1e-3)   # switch after the first probe
    else:
        monkeypatch.setattr(S, "_MAX_OFFSETS", 0)
    for gt, pred, spacing in _pairs():
        for tol in TOLERANCES:
            sd = S.compute_surface_distances(gt, pred, spacing)
            pair = sd._pair
            within = sd.within_tolerance(tol)
            searched = [0 <= tol < pair.diameter and pair.points[1 - side].size > 0 for side in (0, 1)]
            # the probes ran to the end: always, or where one probe (offset 0) is all there is
            finished = path == "probes" or (path == "probes then transform" and tol < min(spacing))
            for side in (0, 1):
                assert (pair._probed[side] is not None) == (searched[side] and finished)
            exact = (sd.distances_gt_to_pred, sd.distances_pred_to_gt)   # read afterwards: not used by the search
            for side in (0, 1):
                np.testing.assert_array_equal(within[side], exact[side] <= tol)
                if path == "probes" and searched[side]:
                    probed = pair._probed[side].distances
                    np.testing.assert_array_equal(probed, np.where(exact[side] <= pair._probed[side].limit,
                                                                   exact[side], np.inf))


@pytest.mark.parametrize("seed, side", [(111, 0), (42, 1)])
def test_tied_offsets_rounding_across_the_tolerance_are_decided_by_the_distance_map(seed, side, monkeypatch):
    """Spacing 1.1 mm and tolerance 5.5 mm: offsets (0, 5, 0) and (0, 3, 4) are both 5.5 mm long, but round to
    5.5 and 5.500000000000001; the distance transform may keep either nearest point. Masks (found by a seed
    search) where it keeps the longer one for a point the probes would count as within: the search must defer."""
    from scipy import ndimage
    monkeypatch.setattr(S, "_EDT_NS_PER_POINT", np.inf)   # probes only, however long
    rng = np.random.default_rng(seed)
    gt = ndimage.binary_dilation(rng.random((14, 14, 14)) > 0.995, iterations=2)
    pred = rng.random((14, 14, 14)) > 0.995
    spacing, tol = (1.1, 1.1, 1.1), 5.5
    sd = S.compute_surface_distances(gt, pred, spacing)
    pair = sd._pair
    probed = S._probe(pair.points[side], pair.surfaces[1 - side], spacing, tol * (1 + S._TIE_BAND))
    exact = pair.distances(side)
    # the probes alone would decide otherwise (if a scipy release breaks ties differently, search another seed)
    assert np.any((probed.distances <= tol) != (exact <= tol)), "no tie decided differently: the test is void"
    fresh = S.compute_surface_distances(gt, pred, spacing)
    np.testing.assert_array_equal(fresh.within_tolerance(tol)[side], exact <= tol)
    assert S.surface_dice(gt, pred, spacing, tol) == _full_map_surface_dice(sd, tol)
    assert S.surface_dice(gt, pred, spacing, tol) == pytest.approx(
        _deepmind_surface_dice(gt, pred, spacing, tol, monkeypatch), abs=1e-12)


def test_empty_masks_match_deepmind(monkeypatch):
    a = np.zeros((5, 6, 7), bool)
    b = a.copy()
    b[0:2, 2:4, 3:7] = True   # touches two faces
    for gt, pred in ((a, b), (b, a)):
        for tol in (0.0, 1.0, 100.0, np.inf):   # 100 mm: past the grid diameter
            assert S.surface_dice(gt, pred, (1.2, 0.7, 2.0), tol) == \
                _deepmind_surface_dice(gt, pred, (1.2, 0.7, 2.0), tol, monkeypatch)
    sd = S.compute_surface_distances(a, b, (1.2, 0.7, 2.0))
    assert sd.distances_gt_to_pred.size == 0 and np.all(np.isinf(sd.distances_pred_to_gt))


def test_surfel_areas_and_codes_equal_deepmind():
    dm = pytest.importorskip("surface_distance", reason="DeepMind's surface-distance (setup.py's test extra)")
    from scipy import ndimage
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.7, 0.9), (0.4, 3.0, 1.3)):
        np.testing.assert_allclose(S.surfel_area_table(spacing),
                                   dm.lookup_tables.create_table_neighbour_code_to_surface_area(spacing),
                                   rtol=1e-12, atol=0)
    mask = np.random.default_rng(5).random((6, 7, 8)) > 0.5
    padded = np.pad(mask, ((0, 1),) * 3).astype(np.uint8)
    expected = ndimage.correlate(padded, dm.lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
    np.testing.assert_array_equal(S.neighbour_codes(mask), expected)


def test_bounding_box_of_several_masks():
    rng = np.random.default_rng(8)
    for _ in range(5):
        masks = [rng.random((7, 9, 11)) > 0.995 for _ in range(2)]
        union = masks[0] | masks[1]
        if not union.any():
            assert S._bounding_box(*masks) is None
            continue
        idx = np.argwhere(union)
        expected = tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
        assert S._bounding_box(*masks) == expected
    assert S._bounding_box(np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool)) is None


def test_tolerances_around_the_largest_distance_of_the_grid():
    """One voxel in opposite corners of the volume: the surface Dice steps from below 1 to 1 exactly at the
    largest surface distance, as the full distance maps give it (tolerances up to and past the grid diameter)."""
    gt = np.zeros((4, 5, 6), bool)
    pred = gt.copy()
    gt[0, 0, 0] = pred[-1, -1, -1] = True
    spacing = (1.3, 0.7, 2.1)
    sd = S.compute_surface_distances(gt, pred, spacing)
    largest = max(sd.distances_gt_to_pred.max(), sd.distances_pred_to_gt.max())
    diameter = np.sqrt((4 * 1.3) ** 2 + (5 * 0.7) ** 2 + (6 * 2.1) ** 2)
    for tol in (np.nextafter(largest, 0), largest, np.nextafter(diameter, 0), diameter, 2 * diameter):
        expected = _full_map_surface_dice(sd, tol)
        assert S.surface_dice(gt, pred, spacing, tol) == expected
    assert S.surface_dice(gt, pred, spacing, largest) == 1.0
    assert S.surface_dice(gt, pred, spacing, np.nextafter(largest, 0)) < 1.0
