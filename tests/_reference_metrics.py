"""Straightforward reference computations for the metric tests (explicit point lists, all pairwise distances)."""
import numpy as np

from nnunet_plugins.evaluation import surface as S


def surfels(mask, spacing):
    """(points in mm, areas) of the corner-grid surface of ``mask``."""
    areas = S.surfel_area_table(spacing)
    codes = S.neighbour_codes(mask)
    idx = np.argwhere((codes != 0) & (codes != 255))
    return idx * np.asarray(spacing, dtype=float), areas[codes[tuple(idx.T)]]


def surface_dice(gt, pred, spacing, tol):
    pg, ag = surfels(gt, spacing)
    pp, ap = surfels(pred, spacing)
    if len(pg) == 0 or len(pp) == 0:
        return 0.0
    d = np.sqrt(((pg[:, None, :] - pp[None, :, :]) ** 2).sum(-1))
    return float((ag[d.min(1) <= tol].sum() + ap[d.min(0) <= tol].sum()) / (ag.sum() + ap.sum()))


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def hd_avd(points_a, points_b):
    d = np.sqrt(((points_a[:, None, :] - points_b[None, :, :]) ** 2).sum(-1))
    return max(d.min(1).max(), d.min(0).max()), (d.min(1).mean() + d.min(0).mean()) / 2
