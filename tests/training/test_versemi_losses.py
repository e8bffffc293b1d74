"""VerSemi loss terms (training/versemi.py) against independent numpy computations and the official formulas."""
import numpy as np
import pytest
import torch

from nnunet_plugins.training.cutmix import cube_mask
from nnunet_plugins.training.versemi import (
    consistency_loss, foreground_probability, labeled_cube_loss, source_terms_loss, synthetic_union_loss,
    task_dice_loss, task_probabilities,
)

S = 1e-5


def np_softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_dice(p, t):
    """The official dice_loss: 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s) over everything."""
    p, t = np.asarray(p, np.float64), np.asarray(t, np.float64)
    return 1 - (2 * (p * t).sum() + S) / ((p * p).sum() + (t * t).sum() + S)


def test_task_probabilities_softmax_over_each_samples_own_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    p = task_probabilities(logits, torch.tensor([2, 4]))
    np.testing.assert_allclose(p[0, :2].numpy(), np_softmax(logits[0:1, :2].numpy())[0])
    assert torch.all(p[0, 2:] == 0)
    np.testing.assert_allclose(p[1].numpy(), np_softmax(logits[1:2].numpy())[0])
    np.testing.assert_allclose(foreground_probability(logits, torch.tensor([2, 4])).numpy(), 1 - p[:, 0].numpy())
    with pytest.raises(ValueError, match="class counts"):
        task_probabilities(logits, 5)


def test_task_dice_binary_is_the_official_dice_and_multiclass_is_the_class_mean():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 3, 4, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randint(0, 2, (3, 1, 4, 6, 6), generator=g)
    # official: dice_loss(softmax(out)[:, 1], lab == 1) on a 2-class task
    ref = np_dice(np_softmax(logits[:, :2].numpy())[:, 1], target[:, 0].numpy() == 1)
    np.testing.assert_allclose(float(task_dice_loss(logits, target, 2)), ref, rtol=1e-10)
    # sample 0 has 3 classes, samples 1 and 2 have 2: class 2 is summed over sample 0 only
    k = torch.tensor([3, 2, 2])
    target3 = target.clone()
    target3[0] = torch.randint(0, 3, (1, 4, 6, 6), generator=g)
    p = np.concatenate([np_softmax(logits[:1].numpy()), np.pad(np_softmax(logits[1:, :2].numpy()),
                                                               ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0)))])
    t = target3[:, 0].numpy()
    d1 = np_dice(p[:, 1], t == 1)
    d2 = np_dice(p[:1, 2], t[:1] == 2)
    np.testing.assert_allclose(float(task_dice_loss(logits, target3, k)), (d1 + d2) / 2, rtol=1e-10)


def test_union_and_source_terms_on_hand_made_volumes():
    shape = (4, 6, 6)
    inside = cube_mask(shape, torch.tensor([[1, 2, 2]]), torch.tensor([[2, 3, 3]]))
    seg_a = torch.zeros(1, 1, *shape, dtype=torch.long)
    seg_b = torch.zeros_like(seg_a)
    seg_a[0, 0, 0, :2, :2] = 1        # outside the box: kept in the union
    seg_a[0, 0, 1, 2, 2] = 2          # inside the box: replaced by B
    seg_b[0, 0, 2, 3, 3] = 5          # inside the box
    seg_b[0, 0, 3, 5, 5] = 5          # outside the box: dropped
    union = np.zeros(shape)
    union[0, :2, :2] = 1
    union[2, 3, 3] = 1
    logits = torch.randn(1, 4, *shape, dtype=torch.float64)
    p_syn = np_softmax(logits[:, :2].numpy())[0, 1]
    np.testing.assert_allclose(float(synthetic_union_loss(logits, seg_a, seg_b, inside)), np_dice(p_syn, union),
                               rtol=1e-10)
    # source terms with local targets (A: 3 classes, B: 2 classes)
    la, lb = torch.zeros_like(seg_a), torch.zeros_like(seg_b)
    la[0, 0, 0, :2, :2] = 1
    lb[0, 0, 2, 3, 3] = 1
    logits_b = torch.randn(1, 4, *shape, dtype=torch.float64)
    pa, pb = np_softmax(logits[:, :3].numpy())[0], np_softmax(logits_b[:, :2].numpy())[0]
    ref_a = (np_dice(pa[1], la[0, 0].numpy() == 1) + np_dice(pa[2], la[0, 0].numpy() == 2)) / 2
    ref = 0.5 * (ref_a + np_dice(pb[1], lb[0, 0].numpy() == 1))
    np.testing.assert_allclose(float(source_terms_loss(logits, logits_b, la, lb, 3, 2)), ref, rtol=1e-10)


def test_stage2_consistency_against_numpy():
    """Dice(p_synthetic, clip(max_k p_k, 0, 1)) over T = 3 task prompts with 2, 3 and 2 classes."""
    g = torch.Generator().manual_seed(2)
    syn = torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tasks = [torch.randn(2, 3, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    counts = [2, 3, 2]
    loss = consistency_loss(syn, tasks, counts)
    fg = [1 - np_softmax(t[:, :k].detach().numpy())[:, 0] for t, k in zip(tasks, counts)]
    target = np.clip(np.max(np.stack(fg), axis=0), 0, 1)
    p = np_softmax(syn[:, :2].detach().numpy())[:, 1]
    np.testing.assert_allclose(float(loss.detach()), np_dice(p, target), rtol=1e-10)
    # official: not detached, the task prompts get gradient too; detach_target stops it
    loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tasks)
    for t in tasks:
        t.grad = None
    consistency_loss(syn, tasks, counts, detach_target=True).backward()
    assert all(t.grad is None for t in tasks)
    with pytest.raises(ValueError, match="each of the T"):
        consistency_loss(syn, tasks, counts[:2])


def test_labeled_cube_term_against_numpy():
    g = torch.Generator().manual_seed(3)
    shape = (4, 8, 8)
    syn = torch.randn(2, 2, *shape, generator=g, dtype=torch.float64)
    seg = torch.randint(0, 4, (2, 1, *shape), generator=g)
    inside = cube_mask(shape, torch.tensor([[0, 1, 2], [1, 0, 0]]), torch.tensor([[2, 4, 4], [3, 8, 5]]))
    m = inside.numpy()
    p = np_softmax(syn.numpy())[:, 1]
    ref = np_dice(p * m, (seg[:, 0].numpy() > 0) * m)
    np.testing.assert_allclose(float(labeled_cube_loss(syn, seg, inside)), ref, rtol=1e-10)
