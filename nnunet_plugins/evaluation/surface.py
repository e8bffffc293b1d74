"""Vectorised surface distances: surface Dice (NSD) and contour Hausdorff / average Hausdorff distance.

Two surface definitions are used by the challenges this package supports, and each is reproduced
exactly:

1. **Surfels on the voxel-corner grid** (the definition of Nikolov et al. 2018, "Deep learning to achieve
   clinically applicable segmentation of head and neck anatomy for radiotherapy", and of DeepMind's
   ``surface-distance`` package that the KiTS21 and SegRap2023 evaluation code call). Every point of the
   grid of voxel corners looks at its 2x2x2 neighbourhood of voxels; a neighbourhood that is neither all
   inside nor all outside holds a piece of the marching-cubes surface (vertices at edge midpoints), whose
   area is the point's weight. The distance of a surface point to the other surface is the Euclidean
   distance to the nearest surface point of the other mask on the same corner grid (in mm, from an exact
   Euclidean distance transform). Surface Dice at tolerance t is
   ``(area of A's surface within t of B + area of B's surface within t of A) / (area A + area B)``.

   The per-neighbourhood areas come from :func:`neighbour_code_normals`, which builds the marching-cubes
   surface of each of the 256 neighbourhood configurations itself: the surface of the *minority* corners
   (corners inside when at most four are inside, otherwise the outside corners; so a configuration and its
   complement share a surface), the minority corners kept apart on faces with diagonal corners, and each
   surface polygon split into the triangles of largest total area. During development this construction
   was checked to give, for every configuration and for anisotropic spacings, the same surfel areas as the
   lookup table of the reference implementation; the tests here check it against hand-computed surfaces.

2. **Contour voxels** (ITK's ``SimpleContourExtractorImageFilter`` + ``HausdorffDistanceImageFilter``, used
   by the KiPA22 evaluation): a contour voxel is a foreground voxel with a background voxel among its 26
   neighbours (voxels beyond the image border repeat the border voxel, ITK's zero-flux Neumann condition);
   the directed distances are those from each contour voxel of one mask to the nearest contour voxel of the
   other; HD is the largest, the average Hausdorff distance the mean of the two directed means.

Everything is vectorised: neighbourhood codes by shifted slices, distances by
``scipy.ndimage.distance_transform_edt`` on the bounding box of both masks (exact, because every point of
the other surface lies inside that box). ``benchmarks/bench_surface_distance.py`` compares the speed with a
point-to-point reference.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------------------
# Marching-cubes surfel table
# --------------------------------------------------------------------------------------------------------

# A neighbourhood code has one bit per corner of the 2x2x2 neighbourhood: corner (a, b, c) (offsets along
# the three array axes) is bit 7 - (4a + 2b + c), so corner (0, 0, 0) is the most significant bit.
_CORNERS = tuple(itertools.product((0, 1), repeat=3))


def _corner_bit(corner) -> int:
    a, b, c = corner
    return 7 - (4 * a + 2 * b + c)


def _face_cycles():
    """The six cube faces, each as its four corners in cyclic order."""
    faces = []
    for axis in range(3):
        u_axis, v_axis = [a for a in range(3) if a != axis]
        for value in (0, 1):
            cycle = []
            for u, v in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[u_axis], corner[v_axis] = value, u, v
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


_FACES = _face_cycles()


def _edge(c1, c2):
    return (c1, c2) if c1 < c2 else (c2, c1)


def _surface_polygons(inside: frozenset) -> list[list]:
    """Closed polygons (lists of cube edges whose midpoints are the vertices) around the corners ``inside``.

    On a face whose two inside corners are diagonal, each inside corner is cut off on its own, so the
    corners of ``inside`` are never joined across a face.
    """
    neighbours: dict = {}
    for cycle in _FACES:
        face_edges = [_edge(cycle[i], cycle[(i + 1) % 4]) for i in range(4)]
        crossing = [e for e in face_edges if (e[0] in inside) != (e[1] in inside)]
        if len(crossing) == 2:
            segments = [tuple(crossing)]
        elif len(crossing) == 4:
            # corner i lies between face edges i-1 and i; cut off each inside corner separately
            segments = [(face_edges[i - 1], face_edges[i]) for i, c in enumerate(cycle) if c in inside]
        else:
            segments = []
        for a, b in segments:
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    polygons, seen = [], set()
    for start in sorted(neighbours):
        if start in seen:
            continue
        polygon, previous, current = [start], None, start
        seen.add(start)
        while True:
            following = [n for n in neighbours[current] if n != previous and n not in seen]
            if not following:
                break
            previous, current = current, following[0]
            polygon.append(current)
            seen.add(current)
        polygons.append(polygon)
    return polygons


def _largest_area_triangulation(points: np.ndarray) -> list[tuple[int, int, int]]:
    """Triangulation of a (possibly non-planar) polygon with the largest total area (interval dynamic
    programming over the polygon's vertex sequence)."""
    n = len(points)

    def area(i, j, k):
        return 0.5 * np.linalg.norm(np.cross(points[j] - points[i], points[k] - points[i]))

    best = {}
    for length in range(2, n):
        for i in range(n - length):
            j = i + length
            candidates = []
            for k in range(i + 1, j):
                candidates.append((best.get((i, k), (0.0, []))[0] + best.get((k, j), (0.0, []))[0]
                                   + area(i, k, j), k))
            value, k = max(candidates, key=lambda t: t[0])
            best[(i, j)] = (value, best.get((i, k), (0.0, []))[1] + best.get((k, j), (0.0, []))[1] + [(i, k, j)])
    return best[(0, n - 1)][1]


@lru_cache(maxsize=None)
def neighbour_code_normals() -> tuple[np.ndarray, ...]:
    """For each of the 256 neighbourhood codes, the area-weighted normals (one row per triangle, in voxel
    units, axis order of the array) of its piece of marching-cubes surface; code 0 and 255 have none."""
    table = []
    for code in range(256):
        inside = frozenset(c for c in _CORNERS if code >> _corner_bit(c) & 1)
        if len(inside) > 4:  # a configuration and its complement share one surface
            inside = frozenset(_CORNERS) - inside
        normals = []
        for polygon in _surface_polygons(inside):
            points = np.array([[(p + q) / 2.0 for p, q in zip(*edge)] for edge in polygon])
            for i, j, k in _largest_area_triangulation(points):
                normals.append(0.5 * np.cross(points[j] - points[i], points[k] - points[i]))
        table.append(np.array(normals, dtype=np.float64).reshape(-1, 3))
    return tuple(table)


@lru_cache(maxsize=64)
def _surfel_areas_cached(spacing: tuple) -> np.ndarray:
    s0, s1, s2 = spacing
    # a plane area element with normal n scales by (s1 s2, s0 s2, s0 s1) under the voxel-to-mm scaling
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    areas = np.zeros(256)
    for code, normals in enumerate(neighbour_code_normals()):
        if len(normals):
            areas[code] = np.linalg.norm(normals * scale, axis=1).sum()
    areas.flags.writeable = False
    return areas


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Surface area (mm^2) of each of the 256 neighbourhood codes for voxel ``spacing`` (array axis order)."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    return _surfel_areas_cached(spacing)


# --------------------------------------------------------------------------------------------------------
# Surfel distances
# --------------------------------------------------------------------------------------------------------

def _bounding_box(mask: np.ndarray):
    """Slices of the smallest box holding every True voxel of ``mask``, or None if it has none."""
    slices = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code (uint8) of every voxel-corner point of ``mask`` (shape + 1 per axis): the corner
    point q looks at voxels q - 1 .. q along each axis; voxels outside the array count as background."""
    padded = np.pad(mask.astype(bool), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for corner in _CORNERS:
        a, b, c = corner
        codes |= padded[a:a + n0, b:b + n1, c:c + n2].astype(np.uint8) << np.uint8(_corner_bit(corner))
    return codes


@dataclass
class SurfaceDistances:
    """Surfel distances between two masks (unsorted; entries of a side share one order)."""
    distances_gt_to_pred: np.ndarray   # mm, one per surface point of the reference
    distances_pred_to_gt: np.ndarray   # mm, one per surface point of the prediction
    surfel_areas_gt: np.ndarray        # mm^2
    surfel_areas_pred: np.ndarray      # mm^2


def compute_surface_distances(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]) \
        -> SurfaceDistances:
    """Distances from each surface point of one mask to the other mask's surface, with surfel areas.

    ``spacing`` is in the array's axis order (for a SimpleITK array: ``image.GetSpacing()[::-1]``). If a mask
    is empty, its own lists are empty and the other side's distances are ``inf``.
    """
    mask_gt = np.asarray(mask_gt, dtype=bool)
    mask_pred = np.asarray(mask_pred, dtype=bool)
    if mask_gt.shape != mask_pred.shape or mask_gt.ndim != 3:
        raise ValueError(f"masks must be 3-D and of equal shape, got {mask_gt.shape} and {mask_pred.shape}")
    box = _bounding_box(mask_gt | mask_pred)
    empty = np.zeros(0)
    if box is None:
        return SurfaceDistances(empty, empty, empty, empty)
    areas = surfel_area_table(spacing)
    codes_gt = neighbour_codes(mask_gt[box])
    codes_pred = neighbour_codes(mask_pred[box])
    border_gt = (codes_gt != 0) & (codes_gt != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)
    sampling = [float(s) for s in spacing]

    def distance_to(border):
        if not border.any():
            return None
        return ndimage.distance_transform_edt(~border, sampling=sampling)

    dist_to_gt = distance_to(border_gt)
    dist_to_pred = distance_to(border_pred)
    d_gt = dist_to_pred[border_gt] if dist_to_pred is not None else np.full(int(border_gt.sum()), np.inf)
    d_pred = dist_to_gt[border_pred] if dist_to_gt is not None else np.full(int(border_pred.sum()), np.inf)
    return SurfaceDistances(d_gt, d_pred, areas[codes_gt[border_gt]], areas[codes_pred[border_pred]])


def surface_dice_from_distances(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` (distance <= tolerance counts as overlap); nan if both surfaces are
    empty."""
    overlap = sd.surfel_areas_gt[sd.distances_gt_to_pred <= tolerance_mm].sum() + \
        sd.surfel_areas_pred[sd.distances_pred_to_gt <= tolerance_mm].sum()
    total = sd.surfel_areas_gt.sum() + sd.surfel_areas_pred.sum()
    return float(overlap / total) if total > 0 else float("nan")


def surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                 tolerances_mm: float | Sequence[float]):
    """Surface Dice of two masks at one tolerance (float) or several (list of floats)."""
    sd = compute_surface_distances(mask_gt, mask_pred, spacing)
    if np.isscalar(tolerances_mm):
        return surface_dice_from_distances(sd, float(tolerances_mm))
    return [surface_dice_from_distances(sd, float(t)) for t in tolerances_mm]


# --------------------------------------------------------------------------------------------------------
# Contour voxels (ITK semantics)
# --------------------------------------------------------------------------------------------------------

_FULL_NEIGHBOURHOOD = np.ones((3, 3, 3), dtype=bool)


def contour_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background voxel among their 26 neighbours; beyond the border the border
    voxel repeats (ITK SimpleContourExtractorImageFilter, radius 1)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    eroded = ndimage.binary_erosion(mask, structure=_FULL_NEIGHBOURHOOD, border_value=1)
    return mask & ~eroded


def directed_contour_distances(points_from: np.ndarray, points_to: np.ndarray,
                               spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Distance (mm) from every True voxel of ``points_from`` to the nearest True voxel of ``points_to``."""
    points_from = np.asarray(points_from, dtype=bool)
    points_to = np.asarray(points_to, dtype=bool)
    box = _bounding_box(points_from | points_to)
    if box is None or not points_to.any():
        return np.full(int(points_from.sum()), np.inf)
    dt = ndimage.distance_transform_edt(~points_to[box], sampling=[float(s) for s in spacing])
    return dt[points_from[box]]


def hausdorff_and_average(set_a: np.ndarray, set_b: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) \
        -> tuple[float, float]:
    """(Hausdorff distance, average Hausdorff distance) between two non-empty voxel sets, as ITK's
    HausdorffDistanceImageFilter defines them: the larger directed maximum, and the mean of the two
    directed means."""
    d_ab = directed_contour_distances(set_a, set_b, spacing)
    d_ba = directed_contour_distances(set_b, set_a, spacing)
    if d_ab.size == 0 or d_ba.size == 0:
        raise ValueError("both voxel sets must be non-empty")
    return float(max(d_ab.max(), d_ba.max())), float((d_ab.mean() + d_ba.mean()) / 2.0)
