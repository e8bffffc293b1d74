"""VerSemiTrainer without nnU-Net folders: network from plans, stage schedule, one forward per step, CutMix inputs,
unlabeled labels never read, the stage-2 consistency term against numpy, gradients reaching the synthetic prompt."""
import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from multitask_helpers import toy_spec
from nnunet_plugins.architectures.versemi import VerSemiUNet
from nnunet_plugins.multitask.partial_labels import TaskLabelMapper
from nnunet_plugins.semi.dataloading import UNLABELED_TARGET
from nnunet_plugins.trainers.versemi import VerSemiTrainer

SPEC = toy_spec(channels=(1, 1), classes=(3, 2))   # A: combined 1, 2 / B: combined 3
ARCH = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}
PATCH = (4, 16, 16)


def _plans():
    return {"dataset_name": "Dataset030_Vs", "plans_name": "nnUNetPlans", "multitask": SPEC.to_plans_entry(),
            "configurations": {"3d_fullres": {"patch_size": list(PATCH), "batch_size": 2, "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": ARCH, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


class Spy(nn.Module):
    """Records every call's input and task ids."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, task_id=None):
        self.calls.append((x.detach().clone(), task_id.clone()))
        return self.net(x, task_id)


def make_trainer(epoch=0, stage2=1, official_stage1_only=False):
    torch.manual_seed(0)
    pm = PlansManager(_plans())
    net = VerSemiTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 4, True)
    tr = object.__new__(VerSemiTrainer)   # the hooks under test, without nnU-Net's folders
    tr.device, tr.network, tr.grad_scaler = torch.device("cpu"), Spy(net), None
    tr.optimizer = torch.optim.Adam(net.parameters(), 1e-3, betas=(0.5, 0.999))
    tr.loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                    {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                    dice_class=MemoryEfficientSoftDiceLoss), [2 / 3, 1 / 3])
    tr.task_spec, tr.task_label_mapper = SPEC, TaskLabelMapper(SPEC)
    tr.current_epoch, tr.stage2_start_epoch, tr.official_stage1_only = epoch, stage2, official_stage1_only
    tr.synthetic_task, tr._one_sample_warned = SPEC.num_tasks, False
    tr.enable_deep_supervision = True
    tr.print_to_log_file = lambda *a, **k: None
    return tr


def _target(task, n, g):
    values = torch.as_tensor(SPEC.tasks[task].combined_labels)
    return values[torch.randint(0, len(values), (n, 1, *PATCH), generator=g)].to(torch.int16)


def semi_batch(n_un=2, seed=0):
    """2 labeled samples (task A, then task B: the two halves) + n_un unlabeled ones."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.cat([_target(0, 1, g), _target(1, 1, g)])
    target = torch.cat([lab, torch.full((n_un, 1, *PATCH), UNLABELED_TARGET, dtype=torch.int16)])
    return {"data": torch.randn(2 + n_un, 1, *PATCH, generator=g), "target": [target, target[:, :, :, ::2, ::2]],
            "task_id": torch.tensor([0, 1] + [-1] * n_un), "keys": [f"k{i}" for i in range(2 + n_un)],
            "labeled": torch.tensor([True, True] + [False] * n_un)}


def test_network_from_plans_has_the_synthetic_task():
    pm = PlansManager(_plans())
    net = VerSemiTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 4, True)
    assert isinstance(net, VerSemiUNet) and net.num_real_tasks == 2 and net.synthetic_task == 2
    assert net.num_classes == 3 and net.controller.conv.in_channels == 16 + 3
    assert VerSemiUNet.plans_divisor(pm.get_configuration("3d_fullres")) == (2, 4, 4)


def test_stage_schedule_and_official_stage1_only():
    assert make_trainer(epoch=0, stage2=1).stage == 1
    assert make_trainer(epoch=1, stage2=1).stage == 2
    assert make_trainer(epoch=5, stage2=1, official_stage1_only=True).stage == 1


def test_stage1_one_forward_with_mix_and_prompts():
    tr = make_trainer(epoch=0)
    batch = semi_batch(n_un=0)
    out = tr.train_step(batch)
    assert np.isfinite(out["loss"]) and {"sup_loss", "union_loss", "source_loss"} <= set(out)
    (x, tasks), = tr.network.calls
    # [labeled (2), mix x synthetic (1), mix x task A (1), mix x task B (1)]
    assert tasks.tolist() == [0, 1, 2, 0, 1]
    a, b = batch["data"][0], batch["data"][1]
    mix = x[2]
    torch.testing.assert_close(x[3], mix)
    torch.testing.assert_close(x[4], mix)
    from_b = (mix == b) & (mix != a)
    # inside the box from B, outside from A: a box of side floor(2/3 * patch) per axis
    idx = torch.nonzero(from_b[0])
    side = (idx.max(0).values - idx.min(0).values + 1).tolist()
    assert side == [int(2 / 3 * s) for s in PATCH]
    assert torch.equal(mix[(mix != a) & (mix != b)], torch.empty(0))


def test_stage2_unlabeled_labels_never_used_and_unlabeled_images_are():
    def loss_and_grads(batch):
        tr = make_trainer(epoch=1)
        torch.manual_seed(123)      # the same boxes
        out = tr.forward(batch)
        loss, log = tr.compute_loss(out, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in tr.network.parameters() if p.grad is not None], tr

    batch = semi_batch()
    loss, grads, tr = loss_and_grads(batch)
    (x, tasks), = tr.network.calls
    # [labeled (2), LL mix x synthetic (1), UL mix (2) x {synthetic, task 0, task 1}]
    assert tasks.tolist() == [0, 1, 2, 2, 2, 0, 0, 1, 1]
    # the unlabeled-labeled mix: unlabeled outside the box, labeled inside
    ul = x[3:5]
    un, lab = batch["data"][2:], batch["data"][:2]
    assert bool(((ul == un) | (ul == lab)).all()) and bool((ul == lab).any()) and bool((ul == un).any())
    # garbage in the unlabeled samples' targets (any class values): same loss, same gradients
    other = semi_batch()
    for t in other["target"]:
        t[2:] = torch.randint(0, 4, t[2:].shape, dtype=t.dtype)
    loss2, grads2, _ = loss_and_grads(other)
    assert loss2 == loss and all(torch.equal(g1, g2) for g1, g2 in zip(grads, grads2))
    # the unlabeled images do enter the loss
    changed = semi_batch()
    changed["data"][2:] = torch.randn_like(changed["data"][2:])
    assert loss_and_grads(changed)[0] != loss


def test_stage2_consistency_term_against_numpy():
    tr = make_trainer(epoch=1)
    batch = semi_batch()
    out = tr.forward(batch)
    _, log = tr.compute_loss(out, batch)
    weights = [2 / 3, 1 / 3]
    ref = 0.0
    for w, part in zip(weights, out["parts"]):
        syn, t0, t1 = (part[i].detach().double().numpy() for i in (2, 3, 4))

        def softmax(z):
            e = np.exp(z - z.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)

        fg0 = 1 - softmax(t0[:, :3])[:, 0]          # task A: 3 classes
        fg1 = 1 - softmax(t1[:, :2])[:, 0]          # task B: 2 classes
        target = np.clip(np.maximum(fg0, fg1), 0, 1)
        p = softmax(syn[:, :2])[:, 1]
        ref += w * (1 - (2 * (p * target).sum() + 1e-5) / ((p * p).sum() + (target * target).sum() + 1e-5))
    np.testing.assert_allclose(float(log["consistency_loss"].detach()), ref / sum(weights), rtol=1e-5)


def test_stage2_step_trains_the_synthetic_prompt_and_errors_without_unlabeled():
    tr = make_trainer(epoch=1)
    net = tr.network.net
    before = net.controller.conv.weight.detach().clone()
    out = tr.train_step(semi_batch())
    assert {"consistency_loss", "cube_loss", "union_loss", "sup_loss"} <= set(out)
    # one-hot columns of the controller: the synthetic task's column (16 + 2) was trained
    assert not torch.equal(before[:, 18], net.controller.conv.weight[:, 18])
    with pytest.raises(RuntimeError, match="without unlabeled"):
        tr.train_step(semi_batch(n_un=0))


def test_one_labeled_sample_is_mixed_with_itself():
    tr = make_trainer(epoch=0)
    batch = semi_batch(n_un=0)
    one = {k: (v[:1] if torch.is_tensor(v) else [t[:1] for t in v] if isinstance(v, list) and torch.is_tensor(v[0])
               else v[:1]) for k, v in batch.items()}
    assert np.isfinite(tr.train_step(one)["loss"])
    (x, tasks), = tr.network.calls
    assert tasks.tolist() == [0, 2, 0, 0]
    torch.testing.assert_close(x[1], x[0])   # an image mixed with itself is the image
