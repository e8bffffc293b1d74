"""Task-balanced sampling for nnU-Net's data loading (UniSeg's sampling rule, for any multi-task trainer).

Rule (UniSeg, Ye et al. 2023; official ``DataLoader3D_UniSeg``): training runs in ROUNDS; in a round
every task contributes ``batches_per_task_per_round`` batches. Each batch holds cases of ONE task; the
task of the next batch is drawn uniformly among the tasks that still have batches left in the round;
when none has, a new round starts. Cases of the drawn task are drawn uniformly with replacement and
their patches are cropped, oversampled and augmented exactly as by ``nnUNetDataLoader``. Tasks without
cases in the current split are skipped (so a fold in which a small task has no training case still
trains), and a dataset with a single task is simply one task per round (the official loader crashes
there).

Randomness comes from numpy's global generator, the one nnU-Net's loader uses for cropping: seeding
``np.random`` (or batchgenerators' per-worker seeds) makes the schedule reproducible. With
``nnUNet_n_proc_DA > 0`` every worker process holds its own copy of the loader and runs its own rounds
(independently seeded by batchgenerators): every batch still holds one task and each worker is
balanced round by round; no shared state or locks between processes are needed, unlike the official
code.

``tasks_per_batch`` > 1 (VerSemi, whose CutMix pairs the first half of a batch with the second half and
needs the halves from different tasks, as the official loader shuffles all datasets together): the batch
is split into that many consecutive groups of (nearly) equal size and each group is one draw of the
schedule (one task, its cases), so with several tasks the groups mostly hold different tasks.

Every batch carries ``batch['task_id']``: a LongTensor (B,) with the task id of each sample (one id per
batch, or per group). It is added after nnU-Net's per-sample transforms, so the
transforms never see (or drop) it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class TaskBalancedSampler:
    """Round-based task schedule: which task the next batch holds, and which cases.

    ``case_tasks[i]`` is the task id of case ``i``. ``rng`` is anything with numpy's ``randint`` and
    ``choice`` (default: the ``np.random`` module, i.e. numpy's global state).
    """

    def __init__(self, case_tasks: Sequence[int], num_tasks: int, batches_per_task_per_round: int = 50):
        case_tasks = np.asarray(case_tasks, dtype=np.int64)
        if case_tasks.ndim != 1 or len(case_tasks) == 0:
            raise ValueError("the sampler needs at least one case")
        if case_tasks.min() < 0 or case_tasks.max() >= num_tasks:
            raise ValueError(f"case task ids must be in 0..{num_tasks - 1}, got {sorted(set(case_tasks.tolist()))}")
        if batches_per_task_per_round < 1:
            raise ValueError(f"batches_per_task_per_round must be >= 1, got {batches_per_task_per_round}")
        self.num_tasks = int(num_tasks)
        self.batches_per_task_per_round = int(batches_per_task_per_round)
        self.cases_of_task = [np.flatnonzero(case_tasks == t) for t in range(self.num_tasks)]
        self.active_tasks = np.asarray([t for t in range(self.num_tasks) if len(self.cases_of_task[t])], dtype=np.int64)
        self.remaining = np.zeros(self.num_tasks, dtype=np.int64)

    @property
    def batches_per_round(self) -> int:
        return self.batches_per_task_per_round * len(self.active_tasks)

    def start_round(self) -> None:
        self.remaining[:] = 0
        self.remaining[self.active_tasks] = self.batches_per_task_per_round

    def next_task(self, rng=np.random) -> int:
        candidates = np.flatnonzero(self.remaining > 0)
        if len(candidates) == 0:
            self.start_round()
            candidates = np.flatnonzero(self.remaining > 0)
        task = int(candidates[rng.randint(len(candidates))])
        self.remaining[task] -= 1
        return task

    def next_batch(self, batch_size: int, rng=np.random) -> tuple[int, np.ndarray]:
        """(task id, case indices) of the next batch."""
        task = self.next_task(rng)
        return task, rng.choice(self.cases_of_task[task], batch_size, replace=True)


class MultiTaskDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose batches follow ``TaskBalancedSampler`` and carry ``task_id``.

    ``case_tasks`` maps each identifier of ``data`` to its task id (``MultiTaskSpec.task_of_case``).
    Everything else (patch cropping, foreground oversampling, padding, transforms) is nnU-Net's.
    """

    def __init__(self, data, batch_size: int, patch_size, final_patch_size, label_manager, case_tasks: dict,
                 num_tasks: int, batches_per_task_per_round: int = 50, oversample_foreground_percent: float = 0.0,
                 pad_sides=None, probabilistic_oversampling: bool = False, transforms=None, tasks_per_batch: int = 1):
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=oversample_foreground_percent, sampling_probabilities=None,
                         pad_sides=pad_sides, probabilistic_oversampling=probabilistic_oversampling,
                         transforms=transforms)
        self.indices = list(self.indices)
        missing = [k for k in self.indices if k not in case_tasks]
        if missing:
            raise KeyError(f"no task known for cases {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.case_tasks = {k: int(case_tasks[k]) for k in self.indices}
        self.sampler = TaskBalancedSampler([self.case_tasks[k] for k in self.indices], num_tasks,
                                           batches_per_task_per_round)
        # group sizes: batch_size split into tasks_per_batch consecutive, nearly equal parts (empty ones dropped)
        self.group_sizes = [len(g) for g in np.array_split(np.arange(batch_size), tasks_per_batch) if len(g)]

    def get_indices(self):
        idx = np.concatenate([self.sampler.next_batch(n)[1] for n in self.group_sizes])
        return [self.indices[i] for i in idx]

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        batch["task_id"] = torch.as_tensor([self.case_tasks[k] for k in batch["keys"]], dtype=torch.long)
        return batch
