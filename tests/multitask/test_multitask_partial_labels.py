"""Partial labels: a structure a task does not annotate is never trained as background."""
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from multitask_helpers import toy_spec
from nnunet_plugins.multitask.partial_labels import TaskLabelMapper, task_grouped_loss


def nnunet_loss():
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


SPEC = toy_spec(channels=(1, 2), classes=(3, 4))   # A: combined 1, 2; B: combined 3, 4, 5
MAPPER = TaskLabelMapper(SPEC)


def local_channels(task):          # UniSeg-style outputs: max(K_t) channels, the task's first K_t
    return list(range(SPEC.tasks[task].num_classes))


def union_channels(task):          # one output per combined structure
    return list(SPEC.tasks[task].combined_labels)


def _target_of_task_a():
    # a case of task A: A's structures labelled (1, 2); a structure of task B is visible in the image
    # but NOT annotated here, so it is 0 in this case's label map
    target = torch.zeros(2, 1, 4, 8, 8, dtype=torch.int16)
    target[:, :, 1:3, 1:4, 1:4] = 1
    target[:, :, 1:3, 5:7, 5:7] = 2
    unannotated = torch.zeros(2, 1, 4, 8, 8, dtype=torch.bool)
    unannotated[:, :, 0, :3, 5:] = True    # where B's structure is in this image
    return target, unannotated


@pytest.mark.parametrize("layout", ["local", "union"])
def test_unannotated_structure_predicted_as_foreground_costs_nothing(layout):
    torch.manual_seed(0)
    target, where_b = _target_of_task_a()
    task_id = torch.zeros(2, dtype=torch.long)
    channels_of = local_channels if layout == "local" else union_channels
    n_out = 4 if layout == "local" else SPEC.num_combined_labels
    other = [c for c in range(n_out) if c not in channels_of(0)]   # channels that are not task A's
    logits = torch.randn(2, n_out, 4, 8, 8, requires_grad=True)
    loss = task_grouped_loss(nnunet_loss(), logits, target, task_id, channels_of, MAPPER)
    loss.backward()
    assert logits.grad[:, other].abs().max() == 0, "other tasks' channels must get no gradient from task A"
    assert logits.grad[:, channels_of(0)].abs().max() > 0

    # predict B's structure (not annotated by A) with high confidence where it is: the loss is unchanged
    confident = logits.detach().clone()
    for c in other:
        confident[:, c][where_b[:, 0]] = 50.0
    again = task_grouped_loss(nnunet_loss(), confident, target, task_id, channels_of, MAPPER)
    assert torch.allclose(again, loss.detach())

    # the naive alternative (full softmax over all channels, unannotated = background) does penalise it,
    # so this test would catch a loss that trains B's structure as A's background
    # (A's combined values 1, 2 are also its local indices, so `target` serves both layouts)
    naive = nnunet_loss()
    assert naive(confident, target) > naive(logits.detach(), target) + 0.1


def test_targets_are_converted_to_the_tasks_local_classes():
    target = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int16).view(1, 1, 6)
    assert MAPPER.to_local(target, 0).view(-1).tolist() == [0, 1, 2, 0, 0, 0]
    assert MAPPER.to_local(target, 1).view(-1).tolist() == [0, 0, 0, 1, 2, 3]
    # nnU-Net's padding marker -1 counts as background
    assert MAPPER.to_local(torch.tensor([-1, 3]), 1).tolist() == [0, 1]
    assert MAPPER.to_combined(torch.tensor([0, 1, 2, 3]), 1).tolist() == [0, 3, 4, 5]


def test_mixed_task_batch_is_the_size_weighted_mean_of_per_task_losses():
    torch.manual_seed(1)
    logits = [torch.randn(3, 4, 4, 8, 8), torch.randn(3, 4, 2, 4, 4)]
    target = [torch.randint(0, 3, (3, 1, 4, 8, 8)), torch.randint(0, 3, (3, 1, 2, 4, 4))]
    target[0][2] = target[0][2] + 2 * (target[0][2] > 0)   # sample 2 belongs to task B (values 3, 4)
    target[1][2] = target[1][2] + 2 * (target[1][2] > 0)
    task_id = torch.tensor([0, 0, 1])
    loss_fn = DeepSupervisionWrapper(nnunet_loss(), [0.6, 0.4])
    mixed = task_grouped_loss(loss_fn, logits, target, task_id, local_channels, MAPPER)
    a = task_grouped_loss(loss_fn, [o[:2] for o in logits], [t[:2] for t in target], task_id[:2], local_channels,
                          MAPPER)
    b = task_grouped_loss(loss_fn, [o[2:] for o in logits], [t[2:] for t in target], task_id[2:], local_channels,
                          MAPPER)
    assert torch.allclose(mixed, (2 * a + b) / 3)
