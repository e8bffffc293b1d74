"""MedSeqFT distillation terms against numpy: logits MSE, KL at T (T^2 scaled), features MSE; lists, masks, grads."""
import numpy as np
import pytest
import torch

from nnunet_plugins.training.distillation import (
    FeaturesMSE, KLDistillation, LogitsMSE, build_distillation_loss, features_mse, kl_divergence, logits_mse,
)

RNG = np.random.default_rng(0)


def _np_softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _np_kl(s, t, temp, mask=None):
    ps, pt = _np_softmax(s / temp), _np_softmax(t / temp)
    kl = (pt * (np.log(pt) - np.log(ps))).sum(axis=1)          # (B, *spatial)
    if mask is not None:
        kl = kl[mask]
    return temp ** 2 * kl.mean()


def _np_mse(s, t, mask=None):
    d = (s - t) ** 2
    if mask is not None:
        d = np.moveaxis(d, 1, -1)[mask]                          # (masked voxels, C)
    return d.mean()


def _pyramid(shape):
    """A deep-supervision pair (student, teacher): full and half resolution, numpy."""
    b, c, *sp = shape
    half = [s // 2 for s in sp]
    return ([RNG.normal(size=shape), RNG.normal(size=(b, c, *half))],
            [RNG.normal(size=shape), RNG.normal(size=(b, c, *half))])


def _t(arrays, grad=False):
    return [torch.tensor(a, requires_grad=grad) for a in arrays]


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (1, 2, 4, 6, 8)])
def test_logits_mse_and_kl_single_tensor_against_numpy(shape):
    s, t = RNG.normal(size=shape) * 2, RNG.normal(size=shape) * 2
    ts, tt = torch.tensor(s), torch.tensor(t)
    np.testing.assert_allclose(logits_mse(ts, tt).item(), _np_mse(s, t), rtol=1e-12)
    for temp in (1.0, 2.0, 4.0):
        np.testing.assert_allclose(kl_divergence(ts, tt, temp).item(), _np_kl(s, t, temp), rtol=1e-10)
    assert kl_divergence(ts, ts.clone(), 3.0).item() == pytest.approx(0, abs=1e-12)
    # = PyTorch's KL summed over everything / number of voxels * T^2
    voxels = np.prod(shape) / shape[1]
    ref = torch.nn.functional.kl_div(torch.log_softmax(ts / 2, 1), torch.log_softmax(tt / 2, 1), log_target=True,
                                     reduction="sum") / voxels * 4
    torch.testing.assert_close(kl_divergence(ts, tt, 2.0), ref)


def test_deep_supervision_lists_weights_and_downsampled_mask():
    (s0, s1), (t0, t1) = _pyramid((2, 3, 8, 8))
    mask = RNG.random((2, 8, 8)) < 0.5
    mask[0, 0, 0] = True
    w = [0.7, 0.3]
    ref_mse = w[0] * _np_mse(s0, t0, mask) + w[1] * _np_mse(s1, t1, mask[:, ::2, ::2])
    ref_kl = w[0] * _np_kl(s0, t0, 2.0, mask) + w[1] * _np_kl(s1, t1, 2.0, mask[:, ::2, ::2])
    tm = torch.tensor(mask)
    np.testing.assert_allclose(logits_mse(_t([s0, s1]), _t([t0, t1]), w, tm).item(), ref_mse, rtol=1e-12)
    np.testing.assert_allclose(kl_divergence(_t([s0, s1]), _t([t0, t1]), 2.0, w, tm.unsqueeze(1)).item(), ref_kl,
                               rtol=1e-10)
    # no weights: equal weights summing to 1; a mask per level
    masks = [tm, torch.tensor(mask[:, 1::2, 1::2])]
    ref = 0.5 * _np_mse(s0, t0, mask) + 0.5 * _np_mse(s1, t1, mask[:, 1::2, 1::2])
    np.testing.assert_allclose(LogitsMSE()(_t([s0, s1]), _t([t0, t1]), masks).item(), ref, rtol=1e-12)
    # unmasked voxels do not contribute
    s0b = s0.copy()
    s0b[np.broadcast_to(~mask[:, None], s0.shape)] += 100
    np.testing.assert_allclose(logits_mse(_t([s0b]), _t([t0]), mask=tm).item(), _np_mse(s0, t0, mask), rtol=1e-12)
    # an empty mask: 0, and backward works
    empty = logits_mse(_t([s0], grad=True), _t([t0]), mask=torch.zeros_like(tm))
    assert empty.item() == 0
    empty.backward()


def test_features_mse_list_of_maps_of_different_shapes():
    fs = [RNG.normal(size=(2, 4, 8, 8, 8)), RNG.normal(size=(2, 16, 4, 4, 4))]
    ft = [RNG.normal(size=(2, 4, 8, 8, 8)), RNG.normal(size=(2, 16, 4, 4, 4))]
    ref = 0.25 * _np_mse(fs[0], ft[0]) + 0.75 * _np_mse(fs[1], ft[1])
    np.testing.assert_allclose(features_mse(_t(fs), _t(ft), [0.25, 0.75]).item(), ref, rtol=1e-12)
    np.testing.assert_allclose(FeaturesMSE([0.25, 0.75])(_t(fs), _t(ft)).item(), ref, rtol=1e-12)


@pytest.mark.parametrize("kind", ["logits_mse", "kl", "features_mse"])
def test_gradient_reaches_student_only(kind):
    (s0, s1), (t0, t1) = _pyramid((2, 3, 8, 8))
    student, teacher = _t([s0, s1], grad=True), _t([t0, t1], grad=True)
    loss = build_distillation_loss(kind, temperature=3.0)(student, teacher)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)
    # the analytic gradient of the MSE: 2 w (s - t) / n
    if kind != "kl":
        np.testing.assert_allclose(student[1].grad.numpy(), 2 * 0.5 * (s1 - t1) / s1.size, rtol=1e-12)


def test_factory_and_errors():
    assert isinstance(build_distillation_loss("kl", temperature=4), KLDistillation)
    assert build_distillation_loss("kl", temperature=4).temperature == 4.0
    assert isinstance(build_distillation_loss("logits_mse"), LogitsMSE)
    assert build_distillation_loss("features_mse", weights=[1, 2]).weights == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown KD type 'cosine'"):
        build_distillation_loss("cosine")
    with pytest.raises(ValueError, match="temperature"):
        KLDistillation(0)
    a, b = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        logits_mse(a, b)
    with pytest.raises(ValueError, match="2 outputs, teacher 1"):
        logits_mse([a, a], [a])
    with pytest.raises(ValueError, match="1 weights for 2 outputs"):
        logits_mse([a, a], [a, a], [1.0])
    with pytest.raises(ValueError, match="boolean"):
        logits_mse(a, a, mask=torch.ones(1, 4, 4))


def test_with_a_lora_student_and_a_unet_teacher_only_adapters_learn():
    """The K&G RFT wiring: LoRA student vs frozen teacher, deep-supervision logits and decoder features."""
    import copy

    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from nnunet_plugins.architectures.blocks.lora import add_lora, lora_parameters
    from nnunet_plugins.training.feature_capture import capture_inputs, final_decoder_features_module

    torch.manual_seed(0)
    teacher = PlainConvUNet(1, 3, (4, 8, 8), nn.Conv3d, 3, (1, 2, 2), 1, 2, 1, conv_bias=True,
                            norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                            deep_supervision=True)
    student = add_lora(copy.deepcopy(teacher), rank=2)
    with torch.no_grad():                                   # make the student differ from the teacher
        for p in lora_parameters(student):
            p.normal_(0, 0.1)
    x = torch.randn(2, 1, 8, 8, 8)
    with capture_inputs(final_decoder_features_module(student)) as fs, \
            capture_inputs(final_decoder_features_module(teacher)) as ft:
        out_s, out_t = student(x), teacher(x)
    assert len(out_s) == 2 and fs[0].shape == (2, 4, 8, 8, 8)
    loss = (build_distillation_loss("kl", weights=[2 / 3, 1 / 3])(out_s, out_t)
            + build_distillation_loss("features_mse")(fs[0], ft[0]))
    assert loss.item() > 0
    loss.backward()
    trainable = {id(p) for p in lora_parameters(student)}
    assert all((p.grad is not None) == (id(p) in trainable) for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(student))
    assert all(p.grad is None for p in teacher.parameters())
