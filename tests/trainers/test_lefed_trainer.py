"""LeFeDTrainer without subprocesses: K passes with an optimiser step each and the feedback between them,
loss terms, deep-supervision weights, unlabeled targets never used, paper schedule, validation step."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_plugins.architectures.lefed import LeFeDOutput, LeFeDUNet, discrepancy_feedback
from nnunet_plugins.semi.dataloading import UNLABELED_TARGET
from nnunet_plugins.trainers.lefed import LeFeDTrainer, paper_ds_weights
from test_banet_trainer import make_plans, results  # noqa: F401 (the fixture)

LABELS = {"background": 0, "a": 1, "b": 2}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 4, "file_ending": ".nii.gz"}


def make_trainer(cls=LeFeDTrainer, **attributes):
    if attributes:
        cls = type("LeFeDTrainerVariant", (cls,), attributes)
    torch.manual_seed(0)
    trainer = cls(make_plans(3), "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    trainer.num_input_channels = 1
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    return trainer


def make_batch(trainer, seed=0, corrupt_unlabeled=False):
    """2 labeled + 2 unlabeled samples as get_semi_dataloaders gives them (unlabeled targets -1, or corrupted
    with random classes to show they are never used)."""
    rng = np.random.default_rng(seed)
    patch = tuple(trainer.configuration_manager.patch_size)
    data = torch.from_numpy(rng.normal(size=(4, 1, *patch)).astype(np.float32))
    seg = np.zeros((4, 1, *patch), np.int16)
    seg[:, :, 1:6, 3:12, 3:12] = 1
    seg[:, :, 2:5, 5:9, 5:9] = 2
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        size = [int(round(p * s)) for p, s in zip(patch, scale)]
        t = F.interpolate(torch.from_numpy(seg).float(), size=size, mode="nearest").to(torch.int16)
        t[2:] = torch.from_numpy(rng.integers(0, 3, t[2:].shape)).to(torch.int16) if corrupt_unlabeled \
            else UNLABELED_TARGET
        targets.append(t)
    return {"data": data, "target": targets, "keys": ["l0", "l1", "u0", "u1"],
            "labeled": torch.tensor([True, True, False, False])}


def test_network_and_attributes(results):
    trainer = make_trainer()
    assert type(trainer.network) is LeFeDUNet and trainer.network.decoder2 is not None
    assert trainer.passes_per_iteration == 3 and trainer.feedback_scale == 1e-3
    assert trainer.labeled_batch_size == 2 and trainer.unlabeled_batch_size == 2 and trainer.batch_size == 4
    with pytest.raises(ValueError, match="ds_weights"):
        make_trainer(ds_weights="other")


def test_three_passes_each_with_an_optimizer_step_and_feedback(results):
    trainer = make_trainer()
    net = trainer.network
    calls, outputs, steps = [], [], []
    forward = net.forward

    def spy(x, feedback=None, both=False):
        calls.append(feedback)
        out = forward(x, feedback=feedback, both=both)
        outputs.append(out)
        return out

    net.forward = spy
    step = trainer.optimizer.step

    def counting_step(*a, **k):
        steps.append({n: p.detach().clone() for n, p in net.named_parameters()})
        return step(*a, **k)

    trainer.optimizer.step = counting_step
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    log = trainer.train_step(make_batch(trainer))
    assert len(steps) == 3 and len(calls) == 3
    assert calls[0] is None                                   # pass 1 without feedback
    for k in (1, 2):                                          # pass k+1: e of pass k, detached
        expected = discrepancy_feedback(outputs[k - 1].features1, outputs[k - 1].features2, 1e-3)
        assert all(torch.equal(a, b) and a.grad_fn is None for a, b in zip(calls[k], expected))
    # each pass starts from the weights the previous pass's step left
    assert any(not torch.equal(before[n], steps[1][n]) for n in before)
    assert any(not torch.equal(steps[1][n], steps[2][n]) for n in before)
    assert {"loss", "labeled_loss", "unlabeled_loss", "decoder1_loss", "decoder2_loss"} <= set(log)
    assert np.isfinite(log["loss"])


def test_number_of_passes_is_an_attribute(results):
    trainer = make_trainer(num_passes=1)
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer.train_step(make_batch(trainer))
    assert len(steps) == 1


def test_loss_terms(results):
    trainer = make_trainer(decoder2_weight=0.5, consistency_weight=2.0)
    batch = make_batch(trainer)
    out = trainer.network(batch["data"], both=True)
    loss, log = trainer.compute_loss(out, batch)
    lab = slice(0, 2)
    dec1 = trainer.loss([out.seg1[lab], *[s[lab] for s in out.side1]], [t[lab] for t in batch["target"]])
    dec2 = trainer.segmentation_loss(out.seg2[lab], batch["target"][0][lab])
    mse = ((torch.softmax(out.seg1, 1) - torch.softmax(out.seg2, 1)) ** 2).mean()   # all 4 samples
    assert loss.item() == pytest.approx((dec1 + 0.5 * dec2 + 2.0 * mse).item(), rel=1e-5)
    assert log["unlabeled_loss"].item() == pytest.approx(mse.item(), rel=1e-5)
    # gradients of the consistency term reach both decoders
    trainer.network.zero_grad()
    trainer.unlabeled_loss(out, batch)[0].backward()
    assert trainer.network.decoder.seg_layers[-1].weight.grad.abs().sum() > 0
    assert trainer.network.decoder2.seg_head.weight.grad.abs().sum() > 0


def test_unlabeled_targets_never_change_training(results):
    """Bitwise the same weights after a K-pass step whatever the unlabeled samples' targets hold."""
    weights = []
    for corrupt in (False, True):
        trainer = make_trainer()
        trainer.train_step(make_batch(trainer, corrupt_unlabeled=corrupt))
        weights.append(trainer.network.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # a labeled target does change it (the comparison can fail)
    trainer = make_trainer()
    batch = make_batch(trainer)
    batch["target"][0][0] = 2
    trainer.train_step(batch)
    assert any(not torch.equal(weights[0][k], v) for k, v in trainer.network.state_dict().items())


def test_deep_supervision_weights(results):
    nnunet = make_trainer().loss
    assert isinstance(nnunet, DeepSupervisionWrapper)
    expected = np.array([1, 0.5, 0.0])   # nnU-Net's: 1/2^i, the deepest 0, normalised (3 outputs here)
    np.testing.assert_allclose(nnunet.weight_factors, expected / expected.sum())
    paper = make_trainer(ds_weights="paper").loss
    assert list(paper.weight_factors) == [1.0, 0.6, 0.4]
    assert paper_ds_weights(7) == [1.0, 0.6, 0.4, 0.2, 0.1, 0.0, 0.0]
    assert paper_ds_weights(7, ddp=True)[-1] == 1e-6
    assert paper_ds_weights(6, first_side_level=0) == [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]   # the V-Net's side outputs
    assert make_trainer(dice_only=True).segmentation_loss.weight_ce == 0
    assert make_trainer().segmentation_loss.weight_ce == 1


def test_paper_schedule(results):
    trainer = make_trainer(paper_schedule=True)
    trainer.num_iterations_per_epoch = 250
    opt, sched = trainer.configure_optimizers()
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert not group["nesterov"]
    lrs = []
    for epoch in (0, 9, 10, 20):   # 2500 iterations = 10 epochs of 250
        sched.step(epoch)
        lrs.append(group["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.0001])
    default, _ = make_trainer().configure_optimizers()
    assert default.param_groups[0]["nesterov"]   # nnU-Net's


def test_validation_step_reports_decoder1_dice(results):
    trainer = make_trainer()
    batch = make_batch(trainer)
    batch["target"] = [t[:2] for t in batch["target"]]
    batch = {**batch, "data": batch["data"][:2], "labeled": batch["labeled"][:2], "keys": batch["keys"][:2]}
    trainer.network.eval()
    with torch.no_grad():
        out = trainer.validation_step(batch)
    assert out["tp_hard"].shape == (2,) and np.isfinite(out["loss"])
    trainer.network.deep_supervision = False
    with torch.no_grad():   # nnU-Net's final validation and predictor: decoder 1's tensor
        assert trainer.network(batch["data"]).shape == (2, 3, *trainer.configuration_manager.patch_size)


def test_official_vnet_selected_by_the_plans(results):
    from nnunet_plugins.architectures.lefed import LeFeDVNet

    plans = make_plans(3)
    plans["configurations"]["cfg"]["architecture"] = {"network_class_name": LeFeDVNet.network_name(),
                                                      "arch_kwargs": {"n_filters": 4}, "_kw_requires_import": []}
    trainer = LeFeDTrainer.__new__(type("LeFeDTrainerPaperDS", (LeFeDTrainer,), {"ds_weights": "paper"}))
    type(trainer).__init__(trainer, plans, "cfg", 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    assert trainer.configuration_manager.patch_size == [16, 16, 16]    # fitted to the V-Net's divisor
    trainer.num_input_channels = 1
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                                         trainer.label_manager.num_segmentation_heads, True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    assert type(trainer.network) is LeFeDVNet
    assert list(trainer.loss.weight_factors) == [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    log = trainer.train_step(make_batch(trainer))
    assert len(steps) == 3 and np.isfinite(log["loss"]) and log["unlabeled_loss"] > 0
