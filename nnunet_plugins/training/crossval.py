"""Cross-validation splits written as nnU-Net v2's ``splits_final.json``, without scikit-learn.

``kfold_split`` reproduces ``sklearn.model_selection.KFold(n_splits, shuffle=True, random_state=seed)``
exactly: the indices ``0..n-1`` are shuffled in place by ``numpy.random.RandomState(seed).shuffle``; the
first ``n % n_splits`` folds get ``n // n_splits + 1`` validation cases and the others ``n // n_splits``,
taken consecutively from the shuffled order; both the validation and the training indices of a fold are
returned in ascending order (sklearn selects them with a boolean mask). The legacy ``RandomState`` stream is frozen by NumPy, so the split is the same on every
NumPy version. nnU-Net v2's own ``generate_crossval_split`` (5 folds, seed 12345) gives the same lists.

BA-Net's official KiPA22 protocol is 4-fold: ``KFold(4, shuffle=True, random_state=12345)`` on the sorted
case identifiers (official ``nnUNetTrainerV2_4Fold.do_split``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KIPA_FOLDS = 4
KIPA_SEED = 12345


def kfold_split(identifiers: Sequence[str], n_splits: int = 5, seed: int = 12345) -> list[dict]:
    """[{'train': [...], 'val': [...]}, ...] in sklearn's KFold(shuffle=True) order (see module docstring)."""
    ids = list(identifiers)
    n = len(ids)
    if n_splits < 2:
        raise ValueError(f"a cross-validation needs at least 2 folds, got {n_splits}")
    if n < n_splits:
        raise ValueError(f"cannot split {n} cases into {n_splits} folds")
    if len(set(ids)) != n:
        raise ValueError("case identifiers are not unique")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_splits, n // n_splits, dtype=int)
    sizes[: n % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val_idx = order[start:start + size]
        start += size
        in_val = np.zeros(n, dtype=bool)
        in_val[val_idx] = True
        # like sklearn's split(): both index lists in ascending order (it yields boolean-mask selections)
        splits.append({"train": [ids[i] for i in np.flatnonzero(~in_val)], "val": [ids[i] for i in np.flatnonzero(in_val)]})
    return splits
