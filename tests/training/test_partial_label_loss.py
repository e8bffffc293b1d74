"""Partial-label binary Dice + BCE loss (DoDNet/TransDoDNet) and task channel targets."""
import numpy as np
import pytest
import torch

from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss, TaskChannelTargets


def _numpy_reference(logits, target, annotated, smooth=1.0):
    """Official semantics, written with explicit loops in numpy (float64)."""
    z, t, m = logits.double().numpy(), target.double().numpy(), annotated.numpy()
    b, c = z.shape[:2]
    dice_per_channel, bce_per_channel = [], []
    for ch in range(c):
        dices, bces = [], []
        for s in range(b):
            if not m[s, ch]:
                continue
            zz, tt = z[s, ch].ravel(), t[s, ch].ravel()
            p = 1.0 / (1.0 + np.exp(-zz))
            dices.append(1.0 - 2.0 * np.sum(p * tt) / (np.sum(p) + np.sum(tt) + smooth))
            bce = np.maximum(zz, 0) - zz * tt + np.log1p(np.exp(-np.abs(zz)))
            bces.append(bce.mean())
        if dices:
            dice_per_channel.append(np.mean(dices))
            bce_per_channel.append(np.mean(bces))
    if not dice_per_channel:
        return 0.0
    return float(np.mean(dice_per_channel) + np.mean(bce_per_channel))


def _batch(seed=0, b=3, c=2, shape=(4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, *shape, generator=g) * 2
    target = (torch.rand(b, c, *shape, generator=g) > 0.7).float()
    return logits, target


@pytest.mark.parametrize("annotated", [
    [[True, True], [True, True], [True, True]],
    [[True, False], [False, True], [True, True]],
    [[True, False], [True, False], [True, False]],   # tumour channel annotated by nobody: left out
    [[False, False], [False, False], [False, False]],
])
def test_values_match_independent_computation(annotated):
    logits, target = _batch()
    annotated = torch.tensor(annotated)
    loss = PartialLabelDiceBCELoss()(logits, target, annotated)
    assert loss.item() == pytest.approx(_numpy_reference(logits, target, annotated), rel=1e-5, abs=1e-6)


def test_2d_and_default_all_annotated():
    logits, target = _batch(seed=3, b=2, c=3, shape=(7, 9))
    loss = PartialLabelDiceBCELoss()(logits, target)
    assert loss.item() == pytest.approx(_numpy_reference(logits, target, torch.ones(2, 3, dtype=torch.bool)), rel=1e-5)


def test_unannotated_structure_predicted_as_foreground_costs_nothing():
    """A spleen-task sample (organ annotated, tumour not): whatever the tumour channel predicts, the loss
    and the gradient are those of the organ channel alone."""
    logits, target = _batch(seed=1, b=2)
    annotated = torch.tensor([[True, False], [True, True]])
    loss_fn = PartialLabelDiceBCELoss()
    reference = loss_fn(logits, target, annotated)
    confident_tumour = logits.clone()
    confident_tumour[0, 1] = 20.0           # the unannotated channel says "tumour everywhere"
    garbage_target = target.clone()
    garbage_target[0, 1] = -1.0             # the official 'unannotated' marker is never read
    z = confident_tumour.requires_grad_(True)
    loss = loss_fn(z, garbage_target, annotated)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert z.grad[0, 1].abs().sum() == 0
    assert z.grad[0, 0].abs().sum() > 0 and z.grad[1].abs().sum() > 0
    # treating the channel as background instead (what partial labels must avoid) would cost a lot
    as_background = target.clone()
    as_background[0, 1] = 0.0
    assert loss_fn(confident_tumour.detach(), as_background, torch.ones(2, 2, dtype=torch.bool)) > reference + 1.0


def test_perfect_prediction_is_low_and_wrong_is_high():
    target = torch.zeros(1, 2, 8, 8, 8)
    target[:, :, 2:6, 2:6, 2:6] = 1.0
    good = (target * 2 - 1) * 30.0
    loss_fn = PartialLabelDiceBCELoss()
    assert loss_fn(good, target).item() < 0.02
    assert loss_fn(-good, target).item() > 10.0


def test_nothing_annotated_is_zero_and_differentiable():
    logits, target = _batch()
    z = logits.requires_grad_(True)
    loss = PartialLabelDiceBCELoss()(z, target, torch.zeros(3, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad.abs().sum() == 0


def test_deep_supervision_list_uses_full_resolution():
    logits, target = _batch()
    loss_fn = PartialLabelDiceBCELoss()
    assert loss_fn([logits, logits[:, :, ::2]], [target, target[:, :, ::2]]).item() == \
        pytest.approx(loss_fn(logits, target).item())


def test_loss_errors():
    logits, target = _batch()
    with pytest.raises(ValueError, match="same shape"):
        PartialLabelDiceBCELoss()(logits, target[:, :1])
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        PartialLabelDiceBCELoss()(logits, target, torch.ones(3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
MOTS_LIKE = [
    [[1, 2], [2]],     # liver: 1 organ, 2 tumour (organ includes tumour)
    [[1], None],       # spleen: organ only
    [None, [1]],       # colon: tumour only
]


def test_task_channel_targets_mixed_batch():
    mapper = TaskChannelTargets(MOTS_LIKE)
    seg = torch.tensor([[[0, 1, 2, -1]], [[0, 1, 2, 1]], [[1, 0, 1, 3]]])[:, :, None, :]  # (3, 1, 1, 4)
    target, annotated = mapper(seg, torch.tensor([0, 1, 2]))
    assert target.shape == (3, 2, 1, 4) and target.dtype == torch.float32
    assert target[0, 0, 0].tolist() == [0, 1, 1, 0]     # -1 (padding) -> background
    assert target[0, 1, 0].tolist() == [0, 0, 1, 0]
    assert target[1, 0, 0].tolist() == [0, 1, 0, 1]     # spleen task: value 2 is not the organ
    assert target[1, 1, 0].tolist() == [0, 0, 0, 0]
    assert target[2, 1, 0].tolist() == [1, 0, 1, 0]     # colon: value 3 unknown -> background
    assert annotated.tolist() == [[True, True], [True, False], [False, True]]
    # independent per-voxel computation for a random batch
    g = torch.Generator().manual_seed(0)
    seg = torch.randint(-1, 4, (4, 1, 3, 5, 2), generator=g)
    tasks = torch.tensor([2, 0, 1, 0])
    target, annotated = mapper(seg, tasks)
    for b in range(4):
        for c in range(2):
            values = MOTS_LIKE[tasks[b]][c]
            expected = torch.zeros_like(seg[b, 0], dtype=torch.float32)
            if values is not None:
                for v in values:
                    expected[seg[b, 0] == v] = 1.0
            assert torch.equal(target[b, c], expected)
            assert annotated[b, c] == (values is not None)


def test_task_channel_targets_errors():
    with pytest.raises(ValueError, match="same"):
        TaskChannelTargets([[[1], [2]], [[1]]])
    with pytest.raises(ValueError, match="non-negative"):
        TaskChannelTargets([[[-1], [2]]])
    mapper = TaskChannelTargets(MOTS_LIKE)
    with pytest.raises(ValueError, match="0..2"):
        mapper(torch.zeros(1, 1, 2, 2), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        mapper(torch.zeros(2, 1, 2, 2), torch.tensor([0]))
