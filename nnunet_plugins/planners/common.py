"""Helpers shared by the package's experiment planners."""
from __future__ import annotations

from typing import Sequence

import numpy as np

# the package's one patch fitter lives with the network contract; re-exported for the planners' callers
from nnunet_plugins.architectures.contract import fit_to_divisor

__all__ = ["fit_to_divisor", "patch_for_voxel_budget"]


def patch_for_voxel_budget(spacing: Sequence[float], median_shape: Sequence[float], voxel_budget: float,
                           divisor: Sequence[int]) -> list[int]:
    """A patch of about ``voxel_budget`` voxels, isotropic in millimetres, that fits the median image.

    The patch starts with the aspect ratio of a cube in physical space (as nnU-Net's planner does),
    is capped at the median image size (rounded up to the divisor), the budget freed by capped axes
    goes to the others, and every axis ends as a multiple of ``divisor``.
    """
    spacing = np.asarray(spacing, dtype=float)
    divisor = np.asarray(divisor, dtype=int)
    cap = np.ceil(np.asarray(median_shape, dtype=float) / divisor) * divisor
    patch = (1.0 / spacing) * (voxel_budget / np.prod(1.0 / spacing)) ** (1.0 / len(spacing))
    for _ in range(len(spacing)):
        patch = np.minimum(patch, cap)
        free = patch < cap
        if not free.any():
            break
        scale = (voxel_budget / np.prod(patch)) ** (1.0 / free.sum())
        if scale <= 1.0:
            break
        patch[free] *= scale
    patch = np.minimum(patch, cap)
    return fit_to_divisor([float(p) for p in patch], [int(d) for d in divisor])

