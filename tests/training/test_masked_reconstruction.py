"""Masked-volume reconstruction (MedSeqFT pre-training): cube masks, fill, masked-only loss, head on a U-Net."""
import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.architectures.blocks.lora import add_lora, lora_parameters
from nnunet_plugins.training.masked_reconstruction import (
    MaskedReconstruction, ReconstructionHead, ReconstructionNetwork, apply_mask, cube_size_voxels,
    masked_reconstruction_loss, random_cube_mask,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _blocks_constant(mask, cube):
    """Every grid cell of ``mask`` (B, 1, *spatial) is all-True or all-False."""
    m = mask[:, 0].numpy()
    for b in range(m.shape[0]):
        idx = np.indices(m.shape[1:])
        cell = sum(((idx[a] // cube[a]) * (10 ** (2 * a))) for a in range(len(cube)))
        for c in np.unique(cell):
            vals = m[b][cell == c]
            if not (vals.all() or not vals.any()):
                return False
    return True


def test_mask_exact_on_hand_made_2d_case():
    # 8x8 patch, cubes of 4 -> 2x2 = 4 cells; ratio 0.5 -> exactly 2 cells = 32 voxels per sample
    mask = random_cube_mask((3, 2, 8, 8), 0.5, 4, _gen(0))
    assert mask.shape == (3, 1, 8, 8) and mask.dtype == torch.bool
    assert mask.sum(dim=(1, 2, 3)).tolist() == [32, 32, 32]
    assert _blocks_constant(mask, (4, 4))
    # the same masks as counting cells by hand
    cells = mask[:, 0, ::4, ::4]
    assert cells.sum(dim=(1, 2)).tolist() == [2, 2, 2]
    torch.testing.assert_close(mask[:, 0], cells.repeat_interleave(4, 1).repeat_interleave(4, 2))


def test_mask_3d_per_axis_cube_ratio_and_determinism():
    shape = (4, 1, 8, 12, 4)
    mask = random_cube_mask(shape, 0.25, (4, 4, 2), _gen(1))   # grid 2x3x2 = 12 cells, 3 masked
    assert mask.shape == (4, 1, 8, 12, 4)
    assert mask.sum(dim=(1, 2, 3, 4)).tolist() == [3 * 32] * 4
    assert _blocks_constant(mask, (4, 4, 2))
    assert torch.equal(mask, random_cube_mask(shape, 0.25, (4, 4, 2), _gen(1)))
    assert not torch.equal(mask, random_cube_mask(shape, 0.25, (4, 4, 2), _gen(2)))
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1     # samples get their own masks


def test_mask_partial_border_cells_fraction_and_errors():
    mask = random_cube_mask((2, 1, 10, 10), 0.5, 4, _gen(3))    # grid 3x3 (last cells 2 wide), 4 or 5 cells
    cells = mask[:, 0, ::4, ::4]
    assert cells.sum(dim=(1, 2)).tolist() == [4, 4]           # round(0.5 * 9) = 4 (banker's rounding)
    assert _blocks_constant(mask, (4, 4))
    assert cube_size_voxels(0.25, (16, 32)) == (4, 8)
    assert cube_size_voxels([2, 0.5], (16, 32)) == (2, 16)
    assert cube_size_voxels(64, (16, 32)) == (16, 32)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_cube_mask((1, 1, 8, 8), 1.0, 4)
    with pytest.raises(ValueError, match="smaller cubes"):
        random_cube_mask((1, 1, 8, 8), 0.5, 8)                 # one cell: nothing or everything
    with pytest.raises(ValueError, match="2 axes"):
        cube_size_voxels((2, 2, 2), (8, 8))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        cube_size_voxels(1.5, (8, 8))


def test_apply_mask_zero_and_noise():
    x = torch.randn(2, 3, 8, 8) + 5
    mask = random_cube_mask(x.shape, 0.5, 4, _gen(4))
    z = apply_mask(x, mask, "zero")
    m = mask.expand_as(x)
    assert torch.all(z[m] == 0) and torch.equal(z[~m], x[~m]) and torch.all(x[m] != 0)
    n1, n2 = apply_mask(x, mask, "noise", _gen(5)), apply_mask(x, mask, "noise", _gen(5))
    assert torch.equal(n1, n2) and torch.equal(n1[~m], x[~m])
    assert abs(n1[m].mean().item()) < 0.3 and abs(n1[m].std().item() - 1) < 0.3   # N(0, 1), not x's mean 5
    with pytest.raises(ValueError, match="fill"):
        apply_mask(x, mask, "mean")


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_loss_equals_hand_computation_on_masked_voxels_only(kind):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 2, 6, 6))
    target = rng.normal(size=(2, 2, 6, 6))
    mask = rng.random((2, 1, 6, 6)) < 0.4
    err = (pred - target) ** 2 if kind == "mse" else np.abs(pred - target)
    full = np.broadcast_to(mask, err.shape)
    ref_mean = err[full].mean()
    ref_each = [err[b][full[b]].mean() for b in range(2)]
    tp, tt, tm = torch.tensor(pred), torch.tensor(target), torch.tensor(mask)
    loss = masked_reconstruction_loss(tp, tt, tm, kind)
    np.testing.assert_allclose(loss.item(), ref_mean, rtol=1e-12)
    np.testing.assert_allclose(masked_reconstruction_loss(tp, tt, tm, kind, "none").numpy(), ref_each, rtol=1e-12)
    # unmasked voxels do not contribute, whatever their value (even non-finite)
    changed = tp.clone()
    changed[~tm.expand_as(tp)] = float("inf")
    assert masked_reconstruction_loss(changed, tt, tm, kind).item() == loss.item()
    changed.requires_grad_(True)
    masked_reconstruction_loss(changed, tt, tm, kind).backward()
    assert torch.all(changed.grad[~tm.expand_as(tp)] == 0) and torch.isfinite(changed.grad).all()
    with pytest.raises(ValueError, match="no masked voxel"):
        masked_reconstruction_loss(tp, tt, torch.zeros_like(tm))


def _unet(dim, ds=False, cin=2):
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dim]
    norm = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    return PlainConvUNet(cin, 3, (4, 8, 16), conv, 3, (1, 2, 2), 1, 3, 1, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=ds)


@pytest.mark.parametrize("dim,shape", [(2, (16, 16)), (3, (8, 16, 8))])
def test_reconstruction_network_on_plain_unet_gradients_and_features(dim, shape):
    torch.manual_seed(0)
    unet = _unet(dim)
    net = ReconstructionNetwork(unet)
    assert isinstance(net.head, ReconstructionHead) and net.head.conv.in_channels == 4
    assert net.head.conv.out_channels == 2 and isinstance(net.head.conv, {2: nn.Conv2d, 3: nn.Conv3d}[dim])
    x = torch.randn(2, 2, *shape)
    rec, seg = net(x, return_segmentation=True)
    assert rec.shape == x.shape and seg.shape == (2, 3, *shape)
    # the head runs on the input of decoder.seg_layers[-1]: seg = seg_layer(features) reproduces the output
    feats, _ = net.features(x)
    torch.testing.assert_close(unet.decoder.seg_layers[-1](feats), seg)
    torch.testing.assert_close(net.head(feats), rec)
    assert not unet.decoder.seg_layers[-1]._forward_pre_hooks      # no hook left on the U-Net
    # same features with deep supervision on
    unet.decoder.deep_supervision = True
    torch.testing.assert_close(net(x), rec)
    unet.decoder.deep_supervision = False
    objective = MaskedReconstruction(mask_ratio=0.5, cube_size=4)
    objective(net, x, _gen(0)).backward()
    assert unet.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert unet.decoder.stages[-1].convs[0].conv.weight.grad.abs().sum() > 0
    assert unet.decoder.transpconvs[0].weight.grad.abs().sum() > 0
    assert net.head.conv.weight.grad.abs().sum() > 0 and net.head.conv.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.decoder.seg_layers.parameters())
    assert set(k.split(".")[0] for k in net.state_dict()) == {"network", "head"}
    assert len(net.state_dict()) == len(unet.state_dict()) + 2


def test_objective_masks_input_and_reconstructs_original_and_trains():
    torch.manual_seed(1)
    net = ReconstructionNetwork(_unet(2, cin=1))
    x = torch.randn(2, 1, 16, 16)
    seen = {}
    net.register_forward_pre_hook(lambda m, a: seen.__setitem__("input", a[0]))
    objective = MaskedReconstruction(mask_ratio=0.5, cube_size=4, fill="zero")
    loss = objective(net, x, _gen(7))
    masked, mask = objective.mask_input(x, _gen(7))
    torch.testing.assert_close(seen["input"], masked)        # the network sees the masked input ...
    ref = masked_reconstruction_loss(net(masked), x, mask)    # ... and is scored against the original
    torch.testing.assert_close(loss, ref)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    first = None
    for step in range(30):
        opt.zero_grad()
        loss = objective(net, x, _gen(step))
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_reconstruction_after_lora_and_errors():
    torch.manual_seed(2)
    unet = _unet(3, cin=1)
    net = ReconstructionNetwork(unet)
    x = torch.randn(1, 1, 8, 8, 8)
    before = net(x)
    add_lora(unet, rank=2)              # the wrapped seg layer still hands its input to the head
    torch.testing.assert_close(net(x), before)
    assert lora_parameters(unet)
    with pytest.raises(ValueError, match="seg_layers"):
        ReconstructionNetwork(nn.Sequential(nn.Conv2d(1, 2, 3)))
    bare = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net2 = ReconstructionNetwork(bare, feature_module=bare[2])
    assert net2(torch.randn(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="was not called"):
        ReconstructionNetwork(bare, feature_module=nn.Conv2d(4, 2, 1))(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="fill"):
        MaskedReconstruction(fill="blur")
