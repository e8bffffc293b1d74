"""Atomic outputs: a file or a whole folder appears complete or not at all.

Everything the package writes for a user (datasets, plans, splits, weights, predictions, summaries)
goes through here, so an interrupted run never leaves a half-written file that a rerun or nnU-Net
would take for finished.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager

#: prefix of temporary files next to their destination (``remove_temporaries`` in dataset_conversion)
TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_output(path: str):
    """Yield a temporary path in ``path``'s folder (same name ending, so writers that go by the
    extension pick the right format); move it to ``path`` on success, remove it on failure."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(obj, path: str, indent: int = 2) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False)


def torch_save(obj, path: str) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


@contextmanager
def atomic_directory(parent: str, name: str):
    """Yield a temporary folder in ``parent``; on success it replaces ``parent/name`` (an existing
    folder of that name is removed first), on failure it is deleted."""
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        target = os.path.join(parent, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
