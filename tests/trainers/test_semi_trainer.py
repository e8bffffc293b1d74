"""SemiSupervisedTrainer's loss hooks: the labeled loss sees the labeled samples only, the unlabeled loss sees
every sample and no target, the total is their weighted sum; loaders shut down at the end (no dataset)."""
import pytest
import torch

from nnunet_plugins.semi.dataloading import UNLABELED_TARGET, SemiBatchIterator
from nnunet_plugins.trainers.semi import SemiSupervisedTrainer, select_samples


def _batch():
    labeled = torch.tensor([True, True, False, False])
    data = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 1, 2, 2, 2).clone()
    target = [torch.ones(4, 1, 2, 2, 2), torch.ones(4, 1, 1, 1, 1)]
    for t in target:
        t[2:] = UNLABELED_TARGET
    return {"data": data, "target": target, "keys": ["a", "b", "u1", "u2"], "labeled": labeled}


class Recording(SemiSupervisedTrainer):
    def unlabeled_loss(self, output, batch):
        self.seen_unlabeled = (output, batch)
        return output[0].mean() * 0 + 3.0, {"consistency": torch.tensor(3.0)}


def _trainer(cls=Recording, weight=0.5):
    trainer = cls.__new__(cls)   # the hooks need no plans
    trainer.unlabeled_loss_weight = weight
    seen = []

    def loss(output, target):
        seen.append((output, target))
        return sum(o.sum() for o in output) * 0 + 1.0

    trainer.loss = loss
    return trainer, seen


def test_labeled_loss_sees_labeled_samples_only():
    trainer, seen = _trainer()
    batch = _batch()
    output = [batch["data"] * 10, batch["data"][:, :, :1, :1, :1] * 10]
    loss, log = trainer.compute_loss(output, batch)
    (out, target), = seen
    assert [o.shape[0] for o in out] == [2, 2] and torch.equal(out[0], output[0][:2])
    assert all((t == 1).all() for t in target)   # no unlabeled target reached the supervised loss
    out_un, batch_un = trainer.seen_unlabeled
    assert "target" not in batch_un and out_un[0].shape[0] == 4 and batch_un["labeled"].tolist() == [1, 1, 0, 0]
    assert loss.item() == pytest.approx(1.0 + 0.5 * 3.0)
    assert log["labeled_loss"].item() == 1.0 and log["unlabeled_loss"].item() == 3.0 and "consistency" in log


def test_without_unlabeled_loss_and_all_labeled():
    trainer, seen = _trainer(SemiSupervisedTrainer)
    batch = _batch()
    batch["labeled"][:] = True
    output = [batch["data"], batch["data"]]
    loss, log = trainer.compute_loss(output, batch)
    assert seen[0][0] is output and loss.item() == 1.0 and "unlabeled_loss" not in log
    part_out, part = SemiSupervisedTrainer.labeled_part(output, _batch())
    assert part["keys"] == ["a", "b"] and part["data"].shape[0] == 2 and part["labeled"].all()


def test_select_samples_structures():
    from nnunet_plugins.architectures.lefed import LeFeDOutput

    mask = torch.tensor([False, True])
    x = torch.arange(2.0)
    out = LeFeDOutput(x, x + 1, [x], [x], [x + 2])
    sel = select_samples(out, mask)
    assert isinstance(sel, LeFeDOutput) and sel.seg2.tolist() == [2.0] and sel.features2[0].tolist() == [3.0]
    with pytest.raises(TypeError):
        select_samples({"a": x}, mask)


@pytest.mark.parametrize("trainer_class", ["SemiSupervisedTrainer", "VerSemiTrainer"])
def test_train_end_finishes_both_streams(monkeypatch, trainer_class):
    class Stream:
        finished = False

        def _finish(self):
            self.finished = True

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    monkeypatch.setattr(nnUNetTrainer, "on_train_end", lambda self: None)
    import nnunet_plugins.trainers as trainers

    cls = getattr(trainers, trainer_class)
    trainer = cls.__new__(cls)
    streams = [Stream() for _ in range(3)]
    trainer.dataloader_train = SemiBatchIterator(streams[0], streams[1])
    trainer.dataloader_val = SemiBatchIterator(streams[2])
    trainer.on_train_end()
    assert all(s.finished for s in streams)
