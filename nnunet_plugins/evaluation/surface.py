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

Everything is vectorised. Only the bounding box of the two masks is copied (found from one projection of each
full volume); neighbourhood codes come from three paired shifts of it, and the surfaces are computed once for both
directions. Surface Dice needs only whether each surface point lies within the tolerance of the other surface,
so it reads no distance map: the grid offsets no longer than the tolerance are probed nearest first, each probe one
gather over the surface points not matched yet (:func:`_probe`), and the exact distance transform takes over when
that is cheaper (many offsets: large tolerances and surfaces far apart). Offset lengths are rounded as
``scipy.ndimage.distance_transform_edt`` rounds a distance, so every ``distance <= tolerance`` decision, hence
every surface Dice, is the one of the full distance maps (and of DeepMind's code, whose surfel areas equal ours to
rounding); where two offsets of equal true length round to lengths on either side of the tolerance (the
transform may keep either nearest point), the distance transform decides. The exact distance arrays (for HD95 or
mean distances) are computed when first read, by the distance transform of the bounding box (exact: every point
of the other surface lies in it). ``benchmarks/bench_surface_distance.py`` compares the speed with DeepMind's
``surface-distance`` and with the previous implementation (full distance maps).
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

def _bounding_box(*masks: np.ndarray):
    """Slices of the smallest box holding every nonzero voxel of any of ``masks`` (arrays of one shape, at
    least 2-D), or None if there is none.

    Each full volume is read once, by its projection along axis 0 (a reduction over contiguous slices); the
    extent along axis 0 is then read inside the in-plane box only, and no union of the masks is formed.
    """
    footprint = masks[0].any(axis=0)
    for mask in masks[1:]:
        footprint |= mask.any(axis=0)
    slices = []
    for axis in range(footprint.ndim):
        hit = np.flatnonzero(footprint.any(axis=tuple(a for a in range(footprint.ndim) if a != axis)))
        if hit.size == 0:
            return None
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    along_0 = np.zeros(masks[0].shape[0], dtype=bool)
    for mask in masks:
        along_0 |= mask[(slice(None), *slices)].any(axis=tuple(range(1, mask.ndim)))
    hit = np.flatnonzero(along_0)
    return (slice(int(hit[0]), int(hit[-1]) + 1), *slices)


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code (uint8) of every voxel-corner point of ``mask`` (shape + 1 per axis): the corner
    point q looks at voxels q - 1 .. q along each axis; voxels outside the array count as background."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got shape {mask.shape}")
    padded = np.zeros(tuple(s + 2 for s in mask.shape), dtype=np.uint8)
    padded[1:-1, 1:-1, 1:-1] = mask
    # pair the two voxels along one axis at a time (3 shifts instead of 8): the voxel at offset 0 takes the
    # higher bit, so corner (a, b, c) ends at bit 7 - (4a + 2b + c) as _corner_bit says
    codes = (padded[:, :, :-1] << 1) | padded[:, :, 1:]
    codes = (codes[:, :-1] << 2) | codes[:, 1:]
    return (codes[:-1] << 4) | codes[1:]


def _surface_points(codes: np.ndarray) -> np.ndarray:
    """Corner points whose neighbourhood is neither all outside (code 0) nor all inside (255)."""
    return (codes - np.uint8(1)) < np.uint8(254)   # one comparison: uint8 arithmetic wraps 0 to 255


# Relative costs that choose between the two exact ways of finding the points within a tolerance (measured
# with scipy 1.17 and numpy 2 on one core). They decide only which way runs, never a result.
_EDT_NS_PER_POINT = 150.0       # scipy's exact Euclidean distance transform, per grid point
_PROBE_NS_PER_POINT = 4.0       # one offset probe (gather, test, compress), per point still unmatched
_PROBE_NS_PER_OFFSET = 4000.0   # the fixed cost of one offset probe
_MAX_OFFSETS = 250_000          # more candidate offsets than this: the distance transform is always cheaper
# Offset lengths within this relative band of a tolerance count as possibly tied with it: far wider than any
# rounding difference between two offsets of equal true length, and than the distance transform's own rounding.
_TIE_BAND = 1e-12


def _offset_lengths(offsets: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Length (mm) of integer grid offsets (one column each), computed as scipy's distance_transform_edt
    computes a distance (each component times its spacing, squared, summed in axis order, square root), so
    that ``length <= tolerance`` here decides as a comparison of its distance map would."""
    squares = offsets.astype(np.float64)
    squares *= np.asarray(spacing, dtype=np.float64)[:, None]
    squares *= squares
    return np.sqrt(np.add.reduce(squares, axis=0))


def _distance_map_at(points: np.ndarray, surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Exact distance (mm) from each point (flat index into ``surface.shape``) to the nearest True point of
    ``surface``: scipy's Euclidean distance transform of the whole grid (inf if ``surface`` is empty)."""
    if points.size == 0 or not surface.any():
        return np.full(points.size, np.inf)
    return ndimage.distance_transform_edt(~surface, sampling=[float(s) for s in spacing]).ravel()[points]


@dataclass
class _Probed:
    """What :func:`_probe` found for one set of points."""
    limit: float
    distances: np.ndarray   # length of the shortest offset landing on the surface; inf if none up to the limit
    lengths: np.ndarray     # the lengths of all offsets up to the limit, sorted


def _probe(points: np.ndarray, surface: np.ndarray, spacing: Sequence[float], limit: float) -> _Probed | None:
    """The distance (mm) from each point (flat index into ``surface.shape``) to the nearest True point of
    ``surface`` where it is <= ``limit`` (>= 0), ``inf`` where it is farther; found without a distance map.

    The grid offsets no longer than ``limit`` are probed in order of length, each probe one vectorised gather
    over the points not matched yet, and a point takes the length of the first offset that lands on
    ``surface``. Returns None, to leave the work to the distance transform of the grid, when that is cheaper:
    at once for very many offsets, else as soon as the probes spent pass half its cost while the probes left
    could cost more than all of it (so the work stays within about 1.5 times the cheaper of the two ways).
    """
    shape = surface.shape
    # one step beyond floor(limit / s) guards against rounding; no offset longer than the grid joins two of
    # its points
    radius = [e - 1 if limit >= s * (e - 1) else min(int(limit // s) + 1, e - 1) for s, e in zip(spacing, shape)]
    transform_cost = _EDT_NS_PER_POINT * surface.size
    if np.prod([2 * r + 1 for r in radius], dtype=np.float64) > _MAX_OFFSETS:
        return None
    grid = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in radius), indexing="ij")).reshape(3, -1)
    lengths = _offset_lengths(grid, spacing)
    keep = np.flatnonzero(lengths <= limit)
    keep = keep[np.argsort(lengths[keep], kind="stable")]
    lengths = lengths[keep]
    # flat indices into the surface padded by the radius, where every probe stays inside the array
    padded_shape = [e + 2 * r for e, r in zip(shape, radius)]
    strides = np.array([padded_shape[1] * padded_shape[2], padded_shape[2], 1], dtype=np.int64)
    flat_offsets = strides @ grid[:, keep]
    padded = np.pad(surface, [(r, r) for r in radius]).ravel()
    position = sum((c.astype(np.int64) + r) * s
                   for c, r, s in zip(np.unravel_index(points, shape), radius, strides))
    distances = np.full(points.size, np.inf)
    todo = np.arange(points.size)
    spent = 0.0
    for i, offset in enumerate(flat_offsets):
        probe_cost = _PROBE_NS_PER_OFFSET + _PROBE_NS_PER_POINT * todo.size
        if 2 * spent > transform_cost and probe_cost * (flat_offsets.size - i) > transform_cost:
            return None
        spent += probe_cost
        hit = padded[position + offset]
        if hit.any():
            distances[todo[hit]] = lengths[i]
            miss = ~hit
            todo, position = todo[miss], position[miss]
            if todo.size == 0:
                break
    return _Probed(limit, distances, lengths)


class _SurfacePair:
    """The surfaces of two masks on the corner grid of their common bounding box, computed once and shared
    by both directions and by every tolerance."""

    def __init__(self, codes_gt: np.ndarray, codes_pred: np.ndarray, spacing: Sequence[float]):
        areas = surfel_area_table(spacing)
        self.spacing = tuple(float(s) for s in spacing)
        self.surfaces = (_surface_points(codes_gt), _surface_points(codes_pred))
        self.points = tuple(np.flatnonzero(s) for s in self.surfaces)
        self.areas = tuple(areas[c.ravel()[p]] for c, p in zip((codes_gt, codes_pred), self.points))
        # the longest offset of the grid, rounded as a distance map rounds: rounding is monotonic, so no
        # distance on the grid comes out longer
        self.diameter = float(_offset_lengths(np.array(codes_gt.shape)[:, None] - 1, self.spacing)[0])
        self._exact = [None, None]
        self._probed = [None, None]

    def distances(self, side: int) -> np.ndarray:
        """Exact distances from the surface points of one side (0: gt, 1: pred) to the other surface."""
        if self._exact[side] is None:
            self._exact[side] = _distance_map_at(self.points[side], self.surfaces[1 - side], self.spacing)
        return self._exact[side]

    def within(self, side: int, tolerance: float) -> np.ndarray:
        """Surface points of one side within ``tolerance`` of the other surface: ``distances(side) <=
        tolerance``, decided without the distances where possible."""
        n = self.points[side].size
        if self._exact[side] is not None or not self.points[1 - side].size:
            return self.distances(side) <= tolerance
        if tolerance >= self.diameter:
            return np.ones(n, dtype=bool)
        if not tolerance >= 0:   # negative or nan: no distance passes
            return np.zeros(n, dtype=bool)
        limit = tolerance * (1 + _TIE_BAND)   # the offsets just past the tolerance too, for the tie test below
        probed = self._probed[side]
        if probed is None or probed.limit < limit:   # a search for a larger limit serves every smaller one
            probed = self._probed[side] = _probe(self.points[side], self.surfaces[1 - side], self.spacing, limit)
            if probed is None:
                return self.distances(side) <= tolerance
        # Two offsets of equal true length can round to lengths on either side of the tolerance, and the
        # distance transform may keep either one: then only the transform gives its decisions.
        band = probed.lengths[np.searchsorted(probed.lengths, tolerance * (1 - _TIE_BAND)):
                              np.searchsorted(probed.lengths, limit, side="right")]
        if band.size and band[0] <= tolerance < band[-1]:
            return self.distances(side) <= tolerance
        return probed.distances <= tolerance


class SurfaceDistances:
    """Surfel distances between two masks (unsorted; entries of a side share one order).

    ``distances_gt_to_pred`` (mm, one per surface point of the reference), ``distances_pred_to_gt`` (one per
    surface point of the prediction), ``surfel_areas_gt`` and ``surfel_areas_pred`` (mm^2). From
    :func:`compute_surface_distances` the two distance arrays are computed when first read (exact distance
    transforms); surface Dice reads :meth:`within_tolerance` instead, which finds only which points lie within
    the tolerance and gives the decisions the distance arrays would.
    """

    def __init__(self, distances_gt_to_pred: np.ndarray, distances_pred_to_gt: np.ndarray,
                 surfel_areas_gt: np.ndarray, surfel_areas_pred: np.ndarray):
        self._distances = (np.asarray(distances_gt_to_pred), np.asarray(distances_pred_to_gt))
        self.surfel_areas_gt, self.surfel_areas_pred = np.asarray(surfel_areas_gt), np.asarray(surfel_areas_pred)
        self._pair = None

    @classmethod
    def _of(cls, pair: _SurfacePair) -> "SurfaceDistances":
        sd = cls.__new__(cls)
        sd._distances, sd._pair = None, pair
        sd.surfel_areas_gt, sd.surfel_areas_pred = pair.areas
        return sd

    @property
    def distances_gt_to_pred(self) -> np.ndarray:
        return self._distances[0] if self._pair is None else self._pair.distances(0)

    @property
    def distances_pred_to_gt(self) -> np.ndarray:
        return self._distances[1] if self._pair is None else self._pair.distances(1)

    def within_tolerance(self, tolerance_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """(gt points, pred points) within ``tolerance_mm`` of the other surface: ``distances <= tolerance``."""
        if self._pair is None:
            return self._distances[0] <= tolerance_mm, self._distances[1] <= tolerance_mm
        return self._pair.within(0, tolerance_mm), self._pair.within(1, tolerance_mm)


def compute_surface_distances(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]) \
        -> SurfaceDistances:
    """Distances from each surface point of one mask to the other mask's surface, with surfel areas.

    ``spacing`` is in the array's axis order (for a SimpleITK array: ``image.GetSpacing()[::-1]``). If a mask
    is empty, its own lists are empty and the other side's distances are ``inf``. Only the bounding box of
    the two masks is copied (nonzero voxels are inside); the distances are computed when first read.
    """
    mask_gt, mask_pred = np.asarray(mask_gt), np.asarray(mask_pred)
    if mask_gt.shape != mask_pred.shape or mask_gt.ndim != 3:
        raise ValueError(f"masks must be 3-D and of equal shape, got {mask_gt.shape} and {mask_pred.shape}")
    box = _bounding_box(mask_gt, mask_pred)
    if box is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    return SurfaceDistances._of(_SurfacePair(neighbour_codes(mask_gt[box]), neighbour_codes(mask_pred[box]),
                                             spacing))


def surface_dice_from_distances(sd: SurfaceDistances, tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm`` (distance <= tolerance counts as overlap); nan if both surfaces are
    empty."""
    within_gt, within_pred = sd.within_tolerance(tolerance_mm)
    overlap = sd.surfel_areas_gt[within_gt].sum() + sd.surfel_areas_pred[within_pred].sum()
    total = sd.surfel_areas_gt.sum() + sd.surfel_areas_pred.sum()
    return float(overlap / total) if total > 0 else float("nan")


def surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                 tolerances_mm: float | Sequence[float]):
    """Surface Dice of two masks at one tolerance (float) or several (list of floats)."""
    sd = compute_surface_distances(mask_gt, mask_pred, spacing)
    if np.isscalar(tolerances_mm):
        return surface_dice_from_distances(sd, float(tolerances_mm))
    tolerances = [float(t) for t in tolerances_mm]
    # the largest first: its search serves the smaller ones
    values = {t: surface_dice_from_distances(sd, t) for t in sorted(tolerances, key=lambda t: -t if t == t else 0)}
    return [values[t] for t in tolerances]


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
    box = _bounding_box(points_from, points_to)
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
