"""Assertions shared by the end-to-end tests (imported as a plain module; pytest puts tests/ on sys.path)."""
import numpy as np


def assert_same_geometry(image, reference):
    """``image`` (SimpleITK) has the size, spacing, origin and direction of ``reference``."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def dice(reference_mask, predicted_mask):
    """Dice of two boolean masks (0 when both are empty)."""
    return 2.0 * np.logical_and(reference_mask, predicted_mask).sum() / max(1, reference_mask.sum()
                                                                             + predicted_mask.sum())
