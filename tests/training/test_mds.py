"""MDS selection: patches of a case, scores on a model with known losses, determinism, K, buffer record."""
import json
import os
import zlib

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.training.masked_reconstruction import (
    MaskedReconstruction, ReconstructionNetwork, random_cube_mask,
)
from nnunet_plugins.training.mds import (
    buffer_record, case_patches, mds_scores, preprocessed_images, read_buffer, select_lowest, write_buffer,
)


class MeanInpainter(nn.Module):
    """Reconstructs every voxel as the mean of the non-zero (unmasked, zero fill) voxels of its sample and
    channel: a constant image is reconstructed exactly (loss 0); noise of std s costs about s^2."""

    def forward(self, x):
        keep = x != 0
        dims = tuple(range(2, x.dim()))
        mean = (x * keep).sum(dims, keepdim=True) / keep.sum(dims, keepdim=True).clamp_min(1)
        return mean.expand_as(x)


def _cases(sigmas, shape=(1, 12, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return [(f"case_{i}", 3.0 + s * rng.normal(size=shape)) for i, s in enumerate(sigmas)]


OBJ = MaskedReconstruction(mask_ratio=0.5, cube_size=4)


def test_picks_exactly_the_lowest_loss_cases():
    sigmas = [1.0, 0.0, 2.0, 0.3, 0.0, 0.6]
    cases = _cases(sigmas)
    scores = mds_scores(MeanInpainter(), cases, (8, 16, 16), OBJ, repeats=3, seed=1)
    assert list(scores) == [c for c, _ in cases]
    assert scores["case_1"] == 0 and scores["case_4"] == 0            # constant images: reconstructed exactly
    order = sorted(range(len(sigmas)), key=lambda i: (sigmas[i], i))
    assert select_lowest(scores, 3) == [f"case_{i}" for i in order[:3]] == ["case_1", "case_4", "case_3"]
    # scores grow with the noise (the model's loss is about sigma^2)
    noisy = [i for i in order if sigmas[i] > 0]
    assert [scores[f"case_{i}"] for i in noisy] == sorted(scores[f"case_{i}"] for i in noisy)
    assert 0.7 < scores["case_2"] / 4.0 < 1.3


def test_score_equals_hand_computation_with_the_documented_masks():
    (cid, image), = _cases([1.0], shape=(2, 8, 8, 8))
    score = mds_scores(MeanInpainter(), [(cid, image)], (8, 8, 8), OBJ, repeats=2, seed=5)[cid]
    # documented: the case's generator is seeded with crc32("seed:case id"); one mask per patch, run by run
    gen = torch.Generator().manual_seed(zlib.crc32(f"5:{cid}".encode()))
    runs = []
    for _ in range(2):
        m = random_cube_mask((1, 2, 8, 8, 8), 0.5, 4, gen)[0].numpy()   # (1, 8, 8, 8)
        x = image.astype(np.float32)
        keep = np.broadcast_to(~m, x.shape)
        mean = np.array([x[c][keep[c]].mean() for c in range(2)])[:, None, None, None]
        masked = np.broadcast_to(m, x.shape)
        runs.append(((np.broadcast_to(mean, x.shape) - x)[masked] ** 2).mean())
    np.testing.assert_allclose(score, np.mean(runs), rtol=1e-5)


def _unet():
    torch.manual_seed(0)
    return ReconstructionNetwork(PlainConvUNet(1, 3, (4, 8, 8), nn.Conv3d, 3, (1, 2, 2), 1, 2, 1, conv_bias=True,
                                               norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                                               nonlin=nn.LeakyReLU))


def test_deterministic_under_seed_order_and_batch_size_with_a_real_network():
    net = _unet().train()
    cases = _cases([1.0, 0.5, 0.0], shape=(1, 10, 20, 12))
    kw = dict(objective=OBJ, repeats=2, seed=3, patches="sliding")
    a = mds_scores(net, cases, (8, 8, 8), **kw)
    assert net.training                                                  # mode restored
    b = mds_scores(net, cases[::-1], (8, 8, 8), **kw, batch_size=5)      # order and batch size do not matter
    assert a.keys() == b.keys() and all(abs(a[c] - b[c]) < 1e-5 * a[c] for c in a)
    c = mds_scores(net, cases, (8, 8, 8), OBJ, repeats=2, seed=4, patches="sliding")
    assert all(a[k] != c[k] for k in a)                                  # another seed, other masks
    d = mds_scores(net, cases[:1], (8, 8, 8), **kw)
    assert d["case_0"] == pytest.approx(a["case_0"], rel=1e-6)           # other cases do not matter
    # noise fill: masks and noise are drawn patch by patch, so the batch size does not matter either
    noisy = MaskedReconstruction(mask_ratio=0.5, cube_size=4, fill="noise")
    e = mds_scores(net, cases, (8, 8, 8), noisy, repeats=2, seed=3, patches="sliding", batch_size=1)
    f = mds_scores(net, cases, (8, 8, 8), noisy, repeats=2, seed=3, patches="sliding", batch_size=4)
    assert all(abs(e[k] - f[k]) < 1e-5 * e[k] for k in e) and all(e[k] != a[k] for k in a)


def test_case_patches_centre_sliding_padding_and_2d_slices():
    image = np.arange(2 * 6 * 10 * 5, dtype=np.float32).reshape(2, 6, 10, 5)
    x, v = case_patches(image, (4, 4, 4))
    assert x.shape == (1, 2, 4, 4, 4) and v.all()
    np.testing.assert_array_equal(x[0].numpy(), image[:, 1:5, 3:7, 0:4])
    x, v = case_patches(image, (4, 4, 4), "sliding")
    # nnU-Net's steps at step 1.0: [0, 2], [0, 3, 6], [0, 1]
    assert x.shape == (12, 2, 4, 4, 4)
    np.testing.assert_array_equal(x[-1].numpy(), image[:, 2:6, 6:10, 1:5])
    # padding: centred zeros, marked invalid
    x, v = case_patches(image, (8, 10, 5))
    assert x.shape == (1, 2, 8, 10, 5) and v[0, 0, 1:7].all() and not v[0, 0, 0].any() and not v[0, 0, 7].any()
    np.testing.assert_array_equal(x[0, :, 1:7].numpy(), image)
    # a 2-D patch on a 3-D case: the centre slice, or every slice
    x, _ = case_patches(image, (10, 5))
    np.testing.assert_array_equal(x[0].numpy(), image[:, 3])
    assert case_patches(image, (10, 5), "sliding")[0].shape == (6, 2, 10, 5)
    with pytest.raises(ValueError, match="does not fit"):
        case_patches(image[0, 0], (4, 4, 4))
    with pytest.raises(ValueError, match="patches must be"):
        case_patches(image, (4, 4, 4), "random")


def test_padding_is_never_scored():
    image = np.full((1, 4, 8, 8), 2.0)                    # constant, smaller than the patch along the first axis
    scores = mds_scores(MeanInpainter(), [("small", image)], (8, 8, 8), OBJ, repeats=3)
    assert scores["small"] == 0                           # padded zeros would cost 4 per voxel if scored


def test_k_ties_errors_and_buffer_record(tmp_path):
    scores = {"b": 0.5, "a": 0.5, "c": 0.1, "d": 2.0}
    assert select_lowest(scores, 3) == ["c", "a", "b"]   # tie broken by case id
    assert select_lowest(scores, 10) == ["c", "a", "b", "d"]   # K > cases: all of them
    with pytest.raises(ValueError, match="K"):
        select_lowest(scores, 0)
    with pytest.raises(ValueError, match="'x'"):
        select_lowest({**scores, "x": float("nan")}, 2)
    with pytest.raises(ValueError, match="repeats"):
        mds_scores(MeanInpainter(), _cases([0.0]), (8, 8, 8), repeats=0)
    with pytest.raises(ValueError, match="twice"):
        mds_scores(MeanInpainter(), _cases([0.0]) * 2, (8, 16, 16), OBJ)
    rec = buffer_record(2, scores, 2, repeats=4, seed=7, objective=OBJ, dataset="Dataset502_B")
    path = str(tmp_path / "stage_2" / "mds_buffer.json")
    write_buffer(path, rec)
    assert os.listdir(tmp_path / "stage_2") == ["mds_buffer.json"]
    loaded = read_buffer(path)
    assert loaded == json.loads(json.dumps(rec))
    assert loaded["case_ids"] == ["c", "a"] and loaded["scores"]["d"] == 2.0 and loaded["k"] == 2
    assert loaded["repeats"] == 4 and loaded["seed"] == 7 and loaded["stage"] == 2
    assert loaded["objective"] == {"mask_ratio": 0.5, "cube_size": 4, "fill": "zero", "loss": "mse"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage": 1}))
    with pytest.raises(ValueError, match="bad.json lacks"):
        read_buffer(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_buffer(str(tmp_path / "missing.json"))


def test_preprocessed_images_reads_an_nnunet_folder(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy

    cases = _cases([0.0, 1.0], shape=(1, 4, 6, 5))
    for cid, img in cases:
        nnUNetDatasetNumpy.save_case(img.astype(np.float32), np.zeros((1, 4, 6, 5), np.int8), {}, str(tmp_path / cid))
    got = list(preprocessed_images(str(tmp_path)))
    assert [c for c, _ in got] == ["case_0", "case_1"]
    for (_, a), (_, b) in zip(got, cases):
        np.testing.assert_allclose(a, b.astype(np.float32))
    assert [c for c, _ in preprocessed_images(str(tmp_path), ["case_1"])] == ["case_1"]
    with pytest.raises(ValueError, match="case_9"):
        list(preprocessed_images(str(tmp_path), ["case_9"]))
