"""VerSemi CutMix: cube geometry, mixed images and targets, union target, consistency term (numpy references)."""
import numpy as np
import pytest
import torch

from nnunet_plugins.training.cutmix import (
    Cubes, consistency_target, cube_mask, cutmix, draw_cubes, soft_dice_loss, source_targets, union_target,
)


def _np_mask(shape, start, side):
    """Independent reference: numpy slicing per sample (clips at the border like the official code)."""
    out = np.zeros((len(start), *shape), dtype=bool)
    for b, (st, sd) in enumerate(zip(start, side)):
        out[(b, *[slice(s, s + d) for s, d in zip(st, sd)])] = True
    return out


def test_cube_mask_hand_made_position_side_and_border_clipping():
    start = torch.tensor([[1, 2, 3], [3, 4, 5], [0, 0, 0]])
    side = torch.tensor([[2, 2, 2], [3, 3, 3], [4, 5, 6]])
    m = cube_mask((4, 5, 6), start, side)
    assert m.shape == (3, 4, 5, 6) and m.dtype == torch.bool
    # sample 0: exactly the voxels [1:3, 2:4, 3:5]
    assert m[0].sum() == 8 and m[0, 1:3, 2:4, 3:5].all()
    # sample 1 reaches past every far border: clipped to the single corner voxel
    assert m[1].sum() == 1 and m[1, 3, 4, 5]
    assert m[2].all()  # a box as large as the volume
    rng = np.random.default_rng(0)
    st = rng.integers(0, 7, size=(20, 2))
    sd = rng.integers(0, 7, size=(20, 2))
    np.testing.assert_array_equal(cube_mask((6, 5), torch.from_numpy(st), torch.from_numpy(sd)).numpy(),
                                  _np_mask((6, 5), st, sd))
    with pytest.raises(ValueError, match=">= 0"):
        cube_mask((4, 4), torch.tensor([[-1, 0]]), torch.tensor([[2, 2]]))
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        cube_mask((4, 4, 4), torch.tensor([[0, 0]]), torch.tensor([[2, 2]]))


def test_draw_cubes_side_is_floor_of_ratio_times_patch_and_boxes_stay_inside():
    c = draw_cubes(4, (96, 96, 96), 2 / 3, generator=torch.Generator().manual_seed(0))
    assert (c.side == 64).all()  # official int(96 * 2/3)
    c = draw_cubes(3, (48, 30, 9), 2 / 3, generator=torch.Generator().manual_seed(0))
    assert c.side.tolist() == [[32, 20, 6]] * 3
    assert ((c.start >= 0) & (c.start + c.side <= torch.tensor([48, 30, 9]))).all()
    assert draw_cubes(1, (5, 1), 0.5).side.tolist() == [[2, 1]]  # floor 2.5 -> 2; never below 1 voxel
    # the mask covers exactly the box volume
    m = c.mask((48, 30, 9))
    assert (m.flatten(1).sum(1) == 32 * 20 * 6).all()


def test_draw_cubes_start_ranges_default_and_official():
    g = torch.Generator().manual_seed(1)
    default = draw_cubes(4000, (10, 7), 0.6, generator=g)        # sides 6, 4
    assert default.side[0].tolist() == [6, 4]
    assert set(default.start[:, 0].tolist()) == set(range(0, 5))  # 0 .. size - side
    assert set(default.start[:, 1].tolist()) == set(range(0, 4))
    official = draw_cubes(4000, (10, 7), 0.6, generator=g, official_placement=True)
    assert set(official.start[:, 0].tolist()) == set(range(0, 4))  # numpy randint(0, size - side)
    assert set(official.start[:, 1].tolist()) == set(range(0, 3))
    full = draw_cubes(50, (8,), 1.0, generator=g, official_placement=True)
    assert (full.start == 0).all() and (full.side == 8).all()


def test_draw_cubes_ratio_ranges_per_batch_per_sample_and_reproducible():
    g = torch.Generator().manual_seed(2)
    per_batch = draw_cubes(16, (100, 100, 100), (0.3, 0.6), generator=g)
    assert len(set(map(tuple, per_batch.side.tolist()))) == 1  # one r per batch, as official
    sides = torch.cat([draw_cubes(16, (100, 100, 100), (0.3, 0.6), generator=g, per_sample_ratio=True).side
                       for _ in range(20)])
    assert sides.min() >= 30 and sides.max() <= 59 and len(set(sides[:, 0].tolist())) > 10
    assert (sides[:, 0] == sides[:, 1]).all()  # one r per sample, the same on every axis
    a = draw_cubes(5, (20, 20), (0.3, 0.6), generator=torch.Generator().manual_seed(7), per_sample_ratio=True)
    b = draw_cubes(5, (20, 20), (0.3, 0.6), generator=torch.Generator().manual_seed(7), per_sample_ratio=True)
    assert torch.equal(a.start, b.start) and torch.equal(a.side, b.side)
    for bad in (0.0, 1.5, (0.6, 0.3), (0.1,)):
        with pytest.raises(ValueError, match="ratio"):
            draw_cubes(2, (8, 8), bad)


def test_cutmix_images_inside_from_b_outside_from_a():
    torch.manual_seed(3)
    a, b = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 4, 5, 6)
    start, side = np.array([[0, 1, 2], [2, 3, 4]]), np.array([[2, 2, 2], [5, 5, 5]])
    inside = cube_mask((4, 5, 6), torch.from_numpy(start), torch.from_numpy(side))
    mixed = cutmix(a, b, inside)
    ref = a.numpy().copy()
    for n in range(2):  # independent: paste B's box into A by slicing
        sl = tuple(slice(s, s + d) for s, d in zip(start[n], side[n]))
        ref[(n, slice(None), *sl)] = b.numpy()[(n, slice(None), *sl)]
    np.testing.assert_array_equal(mixed.numpy(), ref)
    # official formula: a * mask + b * (1 - mask) with mask = 1 OUTSIDE the box
    outside = (~inside).float().unsqueeze(1)
    torch.testing.assert_close(mixed, a * outside + b * (1 - outside))
    # label maps without a channel axis
    assert torch.equal(cutmix(a[:, 0], b[:, 0], inside), mixed[:, 0])
    with pytest.raises(ValueError, match="one shape"):
        cutmix(a, b[:, :2], inside)


def test_union_and_source_targets_hand_made():
    # 1-D "volumes" of 8 voxels keep the hand computation readable; box = voxels 2..5
    seg_a = torch.tensor([[[1, 1, 1, 0, 0, 0, 2, 0]], [[0, 0, 1, 1, 0, 0, 1, 1]]])   # (B=2, 1, 8), labels of A
    seg_b = torch.tensor([[[0, 3, 3, 3, 0, 0, 0, 3]], [[1, 1, 0, 1, 1, 0, 0, 0]]])
    inside = cube_mask((8,), torch.tensor([[2], [2]]), torch.tensor([[4], [4]]))
    assert inside[0].tolist() == [False, False, True, True, True, True, False, False]
    # union: A's foreground outside (voxels 0,1,6,7), B's inside (2..5)
    assert union_target(seg_a, seg_b, inside)[:, 0].tolist() == [[1, 1, 1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0, 1, 1]]
    y_a, y_b = source_targets(seg_a, seg_b, inside)
    assert y_a[:, 0].tolist() == [[1, 1, 0, 0, 0, 0, 2, 0], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert y_b[:, 0].tolist() == [[0, 0, 3, 3, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    # same task in sample 1: both heads see the whole mixed label map
    y_a, y_b = source_targets(seg_a, seg_b, inside, torch.tensor([0, 1]), torch.tensor([2, 1]))
    assert y_a[0, 0].tolist() == [1, 1, 0, 0, 0, 0, 2, 0] and y_b[0, 0].tolist() == [0, 0, 3, 3, 0, 0, 0, 0]
    assert y_a[1, 0].tolist() == y_b[1, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    with pytest.raises(ValueError, match="both"):
        source_targets(seg_a, seg_b, inside, torch.tensor([0, 1]))


def test_union_is_the_union_of_the_masked_source_foregrounds_random():
    g = torch.Generator().manual_seed(4)
    seg_a = torch.randint(0, 3, (3, 1, 6, 7, 8), generator=g)
    seg_b = torch.randint(0, 3, (3, 1, 6, 7, 8), generator=g)
    inside = draw_cubes(3, (6, 7, 8), (0.3, 0.6), generator=g, per_sample_ratio=True).mask((6, 7, 8))
    y_a, y_b = source_targets(seg_a, seg_b, inside)
    u = union_target(seg_a, seg_b, inside)
    np.testing.assert_array_equal(u.numpy(), ((y_a.numpy() > 0) | (y_b.numpy() > 0)).astype(np.int64))
    assert not ((y_a > 0) & (y_b > 0)).any()  # disjoint halves


def test_consistency_target_and_dice_against_numpy():
    rng = np.random.default_rng(5)
    probs = rng.random((4, 2, 5, 6, 7))          # K = 4 task prompts
    probs[0, 0, 0, 0, 0] = 1.0
    target = consistency_target([torch.from_numpy(p) for p in probs])
    ref = np.clip(np.max(probs, axis=0), 0.0, 1.0)
    np.testing.assert_allclose(target.numpy(), ref)
    torch.testing.assert_close(consistency_target(torch.from_numpy(probs)), target)
    p_syn = torch.from_numpy(rng.random((2, 5, 6, 7))).requires_grad_(True)
    loss = soft_dice_loss(p_syn, target)
    ps = p_syn.detach().numpy()
    np.testing.assert_allclose(loss.item(), 1 - (2 * (ps * ref).sum() + 1e-5) / ((ps ** 2).sum() + (ref ** 2).sum()
                                                                                  + 1e-5))
    # gradients reach the synthetic prediction and (official: no detach) the task predictions
    tp = torch.from_numpy(probs).requires_grad_(True)
    soft_dice_loss(p_syn, consistency_target(tp)).backward()
    assert p_syn.grad.abs().sum() > 0 and tp.grad.abs().sum() > 0
    # region (labeled cube term): both sides restricted to the box
    region = torch.from_numpy(rng.random((2, 5, 6, 7)) > 0.5)
    y = torch.from_numpy(rng.random((2, 5, 6, 7)) > 0.7)
    r, yn = region.numpy(), y.numpy().astype(float)
    expect = 1 - (2 * (ps * r * yn * r).sum() + 1e-5) / (((ps * r) ** 2).sum() + ((yn * r) ** 2).sum() + 1e-5)
    np.testing.assert_allclose(soft_dice_loss(p_syn.detach(), y, region).item(), expect)
    assert soft_dice_loss(torch.ones(2, 3), torch.ones(2, 3)).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        soft_dice_loss(p_syn, y[:1])


def test_cubes_dataclass_and_device():
    c = Cubes(torch.tensor([[1, 1]]), torch.tensor([[2, 2]]))
    assert c.mask((4, 4))[0].nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]


def test_mask_at_scale_mixes_nnunet_deep_supervision_targets_like_the_mixed_target():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from nnunet_plugins.training.cutmix import mask_at_scale
    g = torch.Generator().manual_seed(6)
    shape = (10, 12, 9)
    seg_a = torch.randint(0, 3, (2, 1, *shape), generator=g).to(torch.uint8)
    seg_b = torch.randint(0, 3, (2, 1, *shape), generator=g).to(torch.uint8)
    inside = draw_cubes(2, shape, (0.3, 0.6), generator=g, per_sample_ratio=True).mask(shape)
    ds = DownsampleSegForDSTransform([(1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.5, 0.5)])

    def down(seg):  # nnU-Net's transform works on one sample (C, *spatial)
        per_sample = [ds(segmentation=s)["segmentation"] for s in seg]
        return [torch.stack([p[k] for p in per_sample]) for k in range(3)]

    mixed_then_down = down(cutmix(seg_a, seg_b, inside))
    for k, (da, db) in enumerate(zip(down(seg_a), down(seg_b))):
        m = mask_at_scale(inside, da.shape[2:])
        assert torch.equal(cutmix(da, db, m), mixed_then_down[k]), k
    assert mask_at_scale(inside, shape) is inside
