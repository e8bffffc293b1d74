"""Task-balanced sampling: one task per batch, balance over a round, determinism, single task, workers."""
from collections import Counter

import numpy as np
import pytest
import torch
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_plugins.training.sampling import MultiTaskDataLoader, TaskBalancedSampler


def test_every_task_gets_its_batches_in_each_round():
    case_tasks = [0, 0, 1, 2, 2, 2]
    s = TaskBalancedSampler(case_tasks, 3, batches_per_task_per_round=5)
    assert s.batches_per_round == 15
    np.random.seed(0)
    for _ in range(4):  # four rounds
        tasks = []
        for _ in range(15):
            t, idx = s.next_batch(2)
            tasks.append(t)
            assert all(case_tasks[i] == t for i in idx), "a batch holds cases of one task only"
        assert Counter(tasks) == {0: 5, 1: 5, 2: 5}


def test_tasks_are_drawn_uniformly_among_those_left():
    s = TaskBalancedSampler([0, 1, 2, 3], 4, batches_per_task_per_round=2)
    np.random.seed(1)
    firsts, lasts = Counter(), Counter()
    for _ in range(2000):
        round_tasks = [s.next_task() for _ in range(8)]
        firsts[round_tasks[0]] += 1
        lasts[round_tasks[-1]] += 1
    for counts in (firsts, lasts):  # 500 expected each; 5 binomial standard deviations ~ 97
        assert all(abs(counts[t] - 500) < 100 for t in range(4)), counts


def test_schedule_is_reproducible_with_numpy_seed():
    def draw(seed):
        np.random.seed(seed)
        s = TaskBalancedSampler([0, 0, 1, 1, 1, 2], 3, 4)
        return [(t, tuple(i)) for t, i in (s.next_batch(3) for _ in range(30))]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_single_task_and_tasks_without_cases():
    s = TaskBalancedSampler([0, 0, 0], 1, batches_per_task_per_round=3)
    assert [s.next_task() for _ in range(10)] == [0] * 10
    # task 1 has no case in this split: it is skipped, the others stay balanced
    s = TaskBalancedSampler([0, 2, 2], 3, batches_per_task_per_round=2)
    tasks = [s.next_task() for _ in range(8)]
    assert Counter(tasks) == {0: 4, 2: 4}
    with pytest.raises(ValueError, match="0..2"):
        TaskBalancedSampler([0, 3], 3)


class FakeDataset:
    """Stands in for nnU-Net's preprocessed dataset: identifiers + load_case."""

    def __init__(self, cases: dict, shape=(8, 24, 24), channels=2):
        self.identifiers = list(cases)
        rng = np.random.default_rng(0)
        self.items = {}
        for k, label in cases.items():
            seg = np.zeros((1, *shape), dtype=np.int16)
            seg[0, 2:6, 8:16, 8:16] = label
            locs = {label: np.argwhere(seg == label)}
            self.items[k] = (rng.normal(size=(channels, *shape)).astype(np.float32), seg, None,
                             {"class_locations": locs})

    def load_case(self, k):
        data, seg, prev, props = self.items[k]
        return data.copy(), seg.copy(), prev, props


CASES = {"A_0": 1, "A_1": 2, "B_0": 3, "B_1": 4, "B_2": 5}
TASK = {"A_0": 0, "A_1": 0, "B_0": 1, "B_1": 1, "B_2": 1}
LABELS = LabelManager({"background": 0, **{f"s{i}": i for i in range(1, 6)}}, None)


def _loader(transforms=None, batches=3):
    return MultiTaskDataLoader(FakeDataset(CASES), 2, (8, 16, 16), (8, 16, 16), LABELS, TASK, 2, batches,
                               oversample_foreground_percent=0.5, transforms=transforms)


def test_loader_batches_carry_task_ids_through_nnunet_transforms():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    transforms = nnUNetTrainer.get_training_transforms(
        (8, 16, 16), (0, 0), [[1, 1, 1], [1, 0.5, 0.5]], (1, 2), False, use_mask_for_norm=[False, False],
        foreground_labels=LABELS.foreground_labels)
    dl = _loader(transforms)
    np.random.seed(0)
    counts = Counter()
    for _ in range(12):
        batch = next(dl)
        tid = batch["task_id"]
        assert tid.dtype == torch.long and tid.shape == (2,)
        assert len(set(tid.tolist())) == 1 and tid.tolist() == [TASK[k] for k in batch["keys"]]
        assert isinstance(batch["target"], list) and batch["target"][1].shape[-1] == 8  # deep supervision
        present = set(torch.unique(batch["target"][0]).tolist()) - {0}
        assert all((v < 3) == (tid[0].item() == 0) for v in present), "labels of the batch's own task only"
        counts[tid[0].item()] += 1
    assert counts == {0: 6, 1: 6}


# batchgenerators' augmenters can race at shutdown (the results thread unpickles a tensor whose worker has
# already exited); that is their teardown, not the batches under test
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_loader_works_with_worker_processes_and_seeds():
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

    # nnU-Net's augmenter (nnUNet_n_proc_DA > 0): every batch one task, ids consistent with the keys
    mt = NonDetMultiThreadedAugmenter(_loader(), None, 2, 2, None, False, 0.002)
    try:
        for _ in range(10):
            batch = next(mt)
            assert len(set(batch["task_id"].tolist())) == 1
            assert batch["task_id"].tolist() == [TASK[k] for k in batch["keys"]]
    finally:
        mt._finish()

    # with batchgenerators' per-worker seeds the schedule is reproducible
    def run():
        aug = MultiThreadedAugmenter(_loader(), None, 2, 1, seeds=[11, 12])
        try:
            return [tuple(next(aug)["keys"]) for _ in range(8)]
        finally:
            aug._finish()

    first = run()
    assert first == run()


def test_tasks_per_batch_groups_draw_one_task_each():
    dl = MultiTaskDataLoader(FakeDataset(CASES), 4, (8, 16, 16), (8, 16, 16), LABELS, TASK, 2, 3,
                             tasks_per_batch=2)
    assert dl.group_sizes == [2, 2]
    np.random.seed(0)
    halves = Counter()
    for _ in range(12):
        batch = next(dl)
        tid = batch["task_id"].tolist()
        assert tid == [TASK[k] for k in batch["keys"]]
        assert tid[0] == tid[1] and tid[2] == tid[3], "each half is one task"
        halves[tid[0], tid[2]] += 1
    # the halves follow the round schedule: 24 draws, 12 per task, mostly different tasks within a batch
    assert sum(n for (a, b), n in halves.items() if a != b) >= 6
    assert MultiTaskDataLoader(FakeDataset(CASES), 1, (8, 16, 16), (8, 16, 16), LABELS, TASK, 2, 3,
                               tasks_per_batch=2).group_sizes == [1]
    with pytest.raises(ValueError, match="tasks_per_batch"):
        MultiTaskDataLoader(FakeDataset(CASES), 2, (8, 16, 16), (8, 16, 16), LABELS, TASK, 2, 3, tasks_per_batch=0)
