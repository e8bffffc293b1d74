"""Time the vectorised surface metrics against straightforward reference implementations.

All run in this process on the same pair of masks (two overlapping, differently sized ellipsoids with anisotropic
spacing):

* surface Dice (surfel definition): ``compute_surface_distances`` (shifted-slice neighbourhood codes, exact
  Euclidean distance transform on the masks' bounding box) against a point-to-point reference (explicit surfel
  point lists, a Python loop over the points of one surface, each taking the minimum distance to every point of
  the other surface);
* contour Hausdorff / average Hausdorff (KiPA22): ``hausdorff_and_average`` against the same point-to-point
  reference and against ITK's compiled ``HausdorffDistanceImageFilter``.

Prints the median time of each, the ratios and the largest difference of the results.

    OMP_NUM_THREADS=1 python benchmarks/bench_surface_distance.py [--shape 48 96 96] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from nnunet_plugins.evaluation import surface as S


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96], metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"))
    p.add_argument("--tolerance", type=float, default=1.0, help="surface Dice tolerance in mm")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the vectorised versions (median)")
    return p.parse_args(argv)


def make_masks(shape):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = [s / 2 for s in shape]

    def ellipsoid(c, r):
        return sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r)) <= 1

    a = ellipsoid(centre, [s * 0.3 for s in shape])
    b = ellipsoid([c + 1.5 for c in centre], [s * 0.28 for s in shape])
    return a, b


def reference_surface_dice(gt, pred, spacing, tol):
    """Point-to-point reference: surfel points and areas, then a loop over the points of each surface."""
    areas = S.surfel_area_table(spacing)

    def points(mask):
        codes = S.neighbour_codes(mask)
        idx = np.argwhere((codes != 0) & (codes != 255))
        return idx * np.asarray(spacing), areas[codes[tuple(idx.T)]]

    pg, ag = points(gt)
    pp, ap = points(pred)
    d_gt = np.array([np.sqrt(((pp - p) ** 2).sum(1)).min() for p in pg])
    d_pred = np.array([np.sqrt(((pg - p) ** 2).sum(1)).min() for p in pp])
    return (ag[d_gt <= tol].sum() + ap[d_pred <= tol].sum()) / (ag.sum() + ap.sum()), len(pg) + len(pp)


def reference_hausdorff(ca, cb, spacing):
    pa, pb = np.argwhere(ca) * np.asarray(spacing), np.argwhere(cb) * np.asarray(spacing)
    d_ab = np.array([np.sqrt(((pb - p) ** 2).sum(1)).min() for p in pa])
    d_ba = np.array([np.sqrt(((pa - p) ** 2).sum(1)).min() for p in pb])
    return max(d_ab.max(), d_ba.max()), (d_ab.mean() + d_ba.mean()) / 2


def itk_hausdorff(ca, cb, spacing):
    import SimpleITK as sitk
    ia, ib = sitk.GetImageFromArray(ca.astype(np.uint8)), sitk.GetImageFromArray(cb.astype(np.uint8))
    for im in (ia, ib):
        im.SetSpacing(tuple(spacing[::-1]))
    f = sitk.HausdorffDistanceImageFilter()
    f.Execute(ia, ib)
    return f.GetHausdorffDistance(), f.GetAverageHausdorffDistance()


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None):
    args = parse_args(argv)
    spacing = tuple(args.spacing)
    a, b = make_masks(tuple(args.shape))
    S.surfel_area_table(spacing)   # table construction is cached; not part of the timing

    t_vec, nsd = timed(lambda: S.surface_dice(a, b, spacing, args.tolerance), args.repeats)
    t_ref, (nsd_ref, n_points) = timed(lambda: reference_surface_dice(a, b, spacing, args.tolerance), 1)
    print(f"surface Dice, {tuple(args.shape)} voxels, {n_points} surface points, tolerance {args.tolerance} mm")
    print(f"  vectorised (distance transform) {t_vec * 1e3:9.1f} ms")
    print(f"  point-to-point reference        {t_ref * 1e3:9.1f} ms   ratio {t_ref / t_vec:7.1f}x")
    print(f"  |difference| {abs(nsd - nsd_ref):.2e}  (value {nsd:.6f})")

    ca, cb = S.contour_voxels(a), S.contour_voxels(b)
    t_vec, (hd, avd) = timed(lambda: S.hausdorff_and_average(ca, cb, spacing), args.repeats)
    t_ref, (hd_ref, avd_ref) = timed(lambda: reference_hausdorff(ca, cb, spacing), 1)
    t_itk, (hd_itk, avd_itk) = timed(lambda: itk_hausdorff(ca, cb, spacing), args.repeats)
    print(f"contour HD / AVD, {int(ca.sum() + cb.sum())} contour voxels")
    print(f"  vectorised (distance transform) {t_vec * 1e3:9.1f} ms")
    print(f"  point-to-point reference        {t_ref * 1e3:9.1f} ms   ratio {t_ref / t_vec:7.1f}x")
    print(f"  ITK HausdorffDistanceImageFilter{t_itk * 1e3:9.1f} ms   ratio {t_itk / t_vec:7.1f}x")
    print(f"  |difference| to reference: HD {abs(hd - hd_ref):.2e}, AVD {abs(avd - avd_ref):.2e}; "
          f"to ITK: HD {abs(hd - hd_itk):.2e}, AVD {abs(avd - avd_itk):.2e}")


if __name__ == "__main__":
    main()
