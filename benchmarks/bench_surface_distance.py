"""Time surface Dice and the contour Hausdorff metrics against their baselines, all in this process.

Surface Dice (surfel definition, the KiTS21 / AMOS22 / SegRap2023 evaluators' path
``surface_dice_from_distances(compute_surface_distances(gt, pred, spacing), tolerance)``) on a pair of
kidney-like masks (two kidneys with a hilum and a tumour; the prediction shifted by about a voxel, a few per cent
larger or smaller, the tumour partly found) in a 128x256x256 volume with anisotropic spacing, against:

* DeepMind's ``surface-distance`` (``pip install surface-distance``, in setup.py's test extra): the official
  KiTS21 code path, ``compute_surface_distances`` (full distance maps of the bounding box, sorted surfel lists) then
  ``compute_surface_dice_at_tolerance``;
* the previous implementation of this package (``--previous``, a git revision, read with ``git show``): full
  distance maps of the bounding box, unsorted;
* and, for the metrics that need every distance (HD95, average surface distance), ours with the exact distance
  arrays read against DeepMind's ``compute_surface_distances``; their sorted lists must agree.

Contour HD / AVD (KiPA22): ``hausdorff_and_average`` against a point-to-point loop and ITK's compiled
``HausdorffDistanceImageFilter``.

Prints a markdown table: median times of interleaved runs, the ratios and the largest differences of the results.

    OMP_NUM_THREADS=1 python benchmarks/bench_surface_distance.py [--shape 128 256 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_steps  # noqa: E402

from nnunet_plugins.evaluation import surface as S  # noqa: E402
from nnunet_plugins.dataset_conversion.kits21 import SD_TOLERANCES_MM  # noqa: E402

# the last revision before the tolerance search (full distance maps of the bounding box)
PREVIOUS_REVISION = "6989453"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"))
    p.add_argument("--tolerances", type=float, nargs="+",
                   default=[SD_TOLERANCES_MM["kidney_and_mass"], 3.0, 10.0],
                   help="surface Dice tolerances in mm (default: KiTS21's kidney tolerance, SegRap2023's largest, 10)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed calls of each (median)")
    p.add_argument("--previous", default=PREVIOUS_REVISION, help="git revision of the previous implementation")
    p.add_argument("--no-contour", action="store_true", help="skip the contour HD / AVD part")
    p.add_argument("--loop-limit", type=int, default=20000,
                   help="time the point-to-point HD loop only up to this many contour voxels")
    return p.parse_args(argv)


def make_masks(shape, spacing):
    """(reference, prediction): two kidneys (ellipsoids of about 11 x 5 x 6 cm less a hilum) and a tumour."""
    grids = [np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)]   # mm
    extent = [n * s for n, s in zip(shape, spacing)]
    axes = np.ix_(*grids)

    def ellipsoid(centre, radii):
        return sum(((g - c) / r) ** 2 for g, c, r in zip(axes, centre, radii)) <= 1

    def kidney(centre, radii, side):
        hilum = (centre[0], centre[1], centre[2] - side * 0.9 * radii[2])
        return ellipsoid(centre, radii) & ~ellipsoid(hilum, [0.4 * radii[0], 0.35 * radii[1], 0.35 * radii[2]])

    gt, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    for side in (-1, 1):
        centre = (extent[0] * 0.5, extent[1] * 0.55, extent[2] * (0.5 + side * 0.3))
        radii = (min(55.0, extent[0] * 0.3), 25.0, 30.0)
        gt |= kidney(centre, radii, side)
        # about a voxel off along every axis, 2-4 % larger or smaller
        moved = (centre[0] + 0.6 * spacing[0], centre[1] + 1.3 * spacing[1], centre[2] - side * spacing[2])
        pred |= kidney(moved, (radii[0] * 1.02, radii[1] * 0.98, radii[2] * 1.04), side)
    tumour = (extent[0] * 0.6, extent[1] * 0.45, extent[2] * 0.2 - 28.0)
    gt |= ellipsoid(tumour, (15.0, 12.0, 12.0))
    pred |= ellipsoid([c + 1.5 for c in tumour], (11.0, 9.0, 9.0))
    return gt, pred


def load_previous(revision):
    """The module ``nnunet_plugins/evaluation/surface.py`` at ``revision``, or (None, why)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shown = subprocess.run(["git", "-C", root, "show", f"{revision}:nnunet_plugins/evaluation/surface.py"],
                           capture_output=True, text=True)
    if shown.returncode != 0:
        return None, f"git show {revision} failed: {shown.stderr.strip()}"
    path = os.path.join(tempfile.mkdtemp(), "previous_surface.py")
    with open(path, "w") as f:
        f.write(shown.stdout)
    spec = importlib.util.spec_from_file_location("previous_surface", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["previous_surface"] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, None


def deepmind():
    try:
        import surface_distance
    except ImportError:
        sys.exit("DeepMind's surface-distance is the baseline: pip install surface-distance (setup.py's test extra)")
    return surface_distance


def sorted_surfels(distances, areas):
    order = np.lexsort((areas, distances))   # DeepMind's order: by distance, then area
    return distances[order], areas[order]


def surface_table(args, gt, pred, spacing, previous):
    dm = deepmind()
    steps = {}
    for tol in args.tolerances:
        steps[("DeepMind surface-distance", tol)] = lambda tol=tol: dm.compute_surface_dice_at_tolerance(
            dm.compute_surface_distances(gt, pred, spacing), tol)
        if previous is not None:
            steps[("previous (full distance maps)", tol)] = lambda tol=tol: previous.surface_dice_from_distances(
                previous.compute_surface_distances(gt, pred, spacing), tol)
        steps[("ours (tolerance search)", tol)] = lambda tol=tol: S.surface_dice_from_distances(
            S.compute_surface_distances(gt, pred, spacing), tol)
    results = {name: step() for name, step in steps.items()}
    times, _ = time_steps(steps, "cpu", args.repeats)

    print(f"\nSurface Dice, {gt.shape} voxels, spacing {spacing} mm, bounding box "
          f"{tuple(s.stop - s.start for s in S._bounding_box(gt, pred))}, "
          f"{sum(a.size for a in S.compute_surface_distances(gt, pred, spacing)._pair.points)} surface points\n")
    print("| tolerance (mm) | path | time (ms) | DeepMind / this | previous / this | surface Dice | abs diff to DeepMind |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tol in args.tolerances:
        base = times[("DeepMind surface-distance", tol)]
        prev = times.get(("previous (full distance maps)", tol))
        for (name, t), value in results.items():
            if t != tol:
                continue
            ratio_prev = f"{prev / times[(name, t)]:.1f}x" if prev is not None else "-"
            diff = abs(value - results[("DeepMind surface-distance", tol)])
            print(f"| {tol:.4g} | {name} | {times[(name, t)] * 1e3:.1f} | {base / times[(name, t)]:.1f}x | "
                  f"{ratio_prev} | {value:.12f} | {diff:.1e} |")

    # every distance (HD95, average surface distance): the exact arrays against DeepMind's sorted lists
    def ours_all():
        sd = S.compute_surface_distances(gt, pred, spacing)
        return {"distances_gt_to_pred": sd.distances_gt_to_pred, "distances_pred_to_gt": sd.distances_pred_to_gt,
                "surfel_areas_gt": sd.surfel_areas_gt, "surfel_areas_pred": sd.surfel_areas_pred}

    full = {"DeepMind compute_surface_distances": lambda: dm.compute_surface_distances(gt, pred, spacing),
            "ours, exact distance arrays read": ours_all}
    theirs, ours = full["DeepMind compute_surface_distances"](), ours_all()
    times, _ = time_steps(full, "cpu", args.repeats)
    diff = 0.0
    for side in ("gt_to_pred", "pred_to_gt"):
        d, a = f"distances_{side}", f"surfel_areas_{side.split('_')[0]}"
        ours[d], ours[a] = sorted_surfels(ours[d], ours[a])
        diff = max(diff, np.abs(ours[d] - theirs[d]).max(), np.abs(ours[a] - theirs[a]).max())
    hd95, hd95_ours = (dm.compute_robust_hausdorff(x, 95) for x in (theirs, ours))
    asd, asd_ours = (np.mean(dm.compute_average_surface_distance(x)) for x in (theirs, ours))
    print(f"\nEvery distance (for HD95 and the average surface distance): HD95 {hd95_ours:.6f} mm (abs diff to "
          f"DeepMind {abs(hd95 - hd95_ours):.1e}), ASD {asd_ours:.6f} mm ({abs(asd - asd_ours):.1e}); largest abs "
          f"diff of the sorted distance and area lists {diff:.1e}\n")
    print("| path | time (ms) | DeepMind / this |")
    print("| --- | --- | --- |")
    base = times["DeepMind compute_surface_distances"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {base / t:.1f}x |")


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


def contour_table(args, a, b, spacing):
    ca, cb = S.contour_voxels(a), S.contour_voxels(b)
    n_points = int(ca.sum() + cb.sum())
    steps = {"ours (distance transforms)": lambda: S.hausdorff_and_average(ca, cb, spacing),
             "ITK HausdorffDistanceImageFilter": lambda: itk_hausdorff(ca, cb, spacing)}
    if n_points <= args.loop_limit:
        steps["point-to-point loop"] = lambda: reference_hausdorff(ca, cb, spacing)
    results = {name: step() for name, step in steps.items()}
    times, _ = time_steps(steps, "cpu", args.repeats)
    print(f"\nContour HD / AVD, {n_points} contour voxels"
          + ("" if n_points <= args.loop_limit else f" (point-to-point loop skipped: over --loop-limit)") + "\n")
    print("| path | time (ms) | this / ours | HD (mm) | AVD (mm) |")
    print("| --- | --- | --- | --- | --- |")
    ours = times["ours (distance transforms)"]
    for name, t in times.items():
        hd, avd = results[name]
        print(f"| {name} | {t * 1e3:.1f} | {t / ours:.1f}x | {hd:.9f} | {avd:.9f} |")


def main(argv=None):
    args = parse_args(argv)
    warnings.simplefilter("ignore", DeprecationWarning)   # surface-distance imports scipy.ndimage.filters
    spacing = tuple(args.spacing)
    gt, pred = make_masks(tuple(args.shape), spacing)
    S.surfel_area_table(spacing)   # the table is built once and cached; not part of the timing
    previous, why = load_previous(args.previous)
    if previous is None:
        print(f"(no previous implementation: {why})")
    surface_table(args, gt, pred, spacing, previous)
    if not args.no_contour:
        contour_table(args, gt, pred, spacing)


if __name__ == "__main__":
    main()
