"""SemiBatchIterator: L labeled + U unlabeled samples joined, unlabeled targets unusable (fake augmenters)."""
import pytest
import torch

from nnunet_plugins.semi.dataloading import UNLABELED_TARGET, SemiBatchIterator


class FakeAugmenter:
    def __init__(self, n, prefix, target_dtype=torch.int16, scales=(8, 4)):
        self.n, self.prefix, self.dtype, self.scales, self.finished = n, prefix, target_dtype, scales, False
        self.count = 0

    def __next__(self):
        self.count += 1
        target = [torch.ones(self.n, 1, s, s, dtype=self.dtype) for s in self.scales]
        return {"data": torch.full((self.n, 2, 8, 8), float(self.count)), "target": target,
                "keys": [f"{self.prefix}{i}" for i in range(self.n)]}

    def _finish(self):
        self.finished = True


@pytest.mark.parametrize("dtype", [torch.int16, torch.bool])
def test_join(dtype):
    lab, un = FakeAugmenter(2, "l", dtype), FakeAugmenter(3, "u", dtype)
    it = SemiBatchIterator(lab, un)
    b = next(it)
    assert b["data"].shape == (5, 2, 8, 8) and b["keys"] == ["l0", "l1", "u0", "u1", "u2"]
    assert b["labeled"].tolist() == [True, True, False, False, False]
    for t, s in zip(b["target"], (8, 4)):
        assert t.shape == (5, 1, s, s) and t.dtype != torch.bool
        assert (t[:2] == 1).all() and (t[2:] == UNLABELED_TARGET).all()
    it._finish()
    assert lab.finished and un.finished


def test_single_tensor_target_and_labeled_only():
    class One(FakeAugmenter):
        def __next__(self):
            b = super().__next__()
            b["target"] = b["target"][0]
            return b

    b = next(SemiBatchIterator(One(1, "l"), One(2, "u")))
    assert b["target"].shape == (3, 1, 8, 8) and (b["target"][1:] == UNLABELED_TARGET).all()
    only = next(SemiBatchIterator(One(2, "l")))
    assert only["labeled"].tolist() == [True, True] and (only["target"] == 1).all()


def test_extra_entries_joined_and_labeled_only_phase():
    class Tasks(FakeAugmenter):
        def __next__(self):
            b = super().__next__()
            b["task_id"] = torch.arange(self.n)
            return b

    it = SemiBatchIterator(Tasks(2, "l"), FakeAugmenter(3, "u"))
    b = next(it)
    # a multi-task loader's task ids: kept for the labeled samples, -1 (unknown) for the unlabeled ones
    assert b["task_id"].tolist() == [0, 1, -1, -1, -1]
    b = next(SemiBatchIterator(Tasks(2, "l"), Tasks(1, "u")))
    assert b["task_id"].tolist() == [0, 1, 0]
    it.draw_unlabeled = False   # a labeled-only phase draws no unlabeled batch
    count = it.unlabeled.count
    b = next(it)
    assert b["keys"] == ["l0", "l1"] and b["labeled"].all() and it.unlabeled.count == count
