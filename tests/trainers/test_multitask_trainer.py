"""MultiTaskTrainer / UniSegTrainer pieces that need no nnU-Net folders: network from plans, hooks, steps."""
import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from multitask_helpers import toy_spec
from nnunet_plugins.architectures.uniseg import UniSeg
from nnunet_plugins.multitask.partial_labels import TaskLabelMapper
from nnunet_plugins.trainers import MultiTaskTrainer, UniSegTrainer

SPEC = toy_spec(channels=(1, 2), classes=(3, 4))   # A: combined 1, 2 / B: combined 3, 4, 5
ARCH = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}


def plans(with_tasks=True):
    p = {"dataset_name": "Dataset020_Uni", "plans_name": "nnUNetPlans",
         "configurations": {"3d_fullres": {"patch_size": [8, 32, 32], "batch_size": 2,
                                           "architecture": {"network_class_name":
                                                            "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                                            "arch_kwargs": ARCH,
                                                            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                                    "nonlin"]}}}}
    if with_tasks:
        p["multitask"] = SPEC.to_plans_entry()
    return p


def test_network_is_built_from_plans_and_task_metadata():
    pm = PlansManager(plans())
    net = UniSegTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 6, True)
    assert isinstance(net, UniSeg)
    assert net.num_tasks == 2 and net.num_classes == 4       # the largest task (B) has 4 classes
    assert net.task_input_channels.tolist() == [1, 2]
    assert sorted(net.encoder.stages[0][0].convs[0].conv.convs) == ["1", "2"]
    assert [o.shape[1] for o in net(torch.randn(1, 2, 8, 32, 32), torch.tensor([1]))] == [4, 4]
    # inference builds the same network (deep supervision off) and loads the weights strictly
    inf = UniSegTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 6, False)
    inf.load_state_dict(net.state_dict())
    with pytest.raises(RuntimeError, match="MultiTaskTrainer"):
        pm2 = PlansManager(plans(with_tasks=False))
        UniSegTrainer.build_network_architecture(pm2, pm2.get_configuration("3d_fullres"), 2, 6, False)
    with pytest.raises(NotImplementedError, match="base class"):
        MultiTaskTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 6, False)


def test_default_hooks():
    assert UniSegTrainer.task_output_channels(SPEC, 1) == [0, 1, 2, 3]
    lm = UniSegTrainer.task_label_manager(SPEC, 0)
    assert lm.num_segmentation_heads == 3 and not lm.has_regions
    assert lm.label_dict == {"background": 0, "s1": 1, "s2": 2}


class Spy(nn.Module):
    """Records the task ids the trainer passes to the network."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, task_id=None):
        self.seen.append(task_id.clone())
        return self.net(x, task_id)


def make_trainer():
    torch.manual_seed(0)
    pm = PlansManager(plans())
    net = Spy(UniSegTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 6, True))
    tr = object.__new__(UniSegTrainer)   # the step methods under test, without nnU-Net's folders
    tr.device, tr.network, tr.grad_scaler = torch.device("cpu"), net, None
    tr.optimizer = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True)
    tr.loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                    {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                    dice_class=MemoryEfficientSoftDiceLoss), [2 / 3, 1 / 3])
    tr.task_spec, tr.task_label_mapper = SPEC, TaskLabelMapper(SPEC)
    return tr


def batch_of_task(task):
    target = torch.zeros(2, 1, 8, 32, 32, dtype=torch.int16)
    values = SPEC.tasks[task].combined_labels
    target[:, :, 2:6, 4:12, 4:12] = values[1]
    target[:, :, 2:6, 18:26, 18:26] = values[2]
    return {"data": torch.randn(2, 2, 8, 32, 32), "target": [target, target[:, :, :, ::2, ::2]],
            "task_id": torch.full((2,), task, dtype=torch.long), "keys": ["x", "y"]}


def test_train_step_passes_task_ids_and_trains_the_prompt():
    tr = make_trainer()
    prompt = tr.network.net.universal_prompt.detach().clone()
    out = tr.train_step(batch_of_task(1))
    assert np.isfinite(out["loss"])
    assert tr.network.seen[-1].tolist() == [1, 1]
    assert not torch.equal(prompt, tr.network.net.universal_prompt)


def test_validation_step_counts_only_the_tasks_own_structures():
    tr = make_trainer()
    with torch.no_grad():
        out = tr.validation_step(batch_of_task(0))
    assert tr.network.seen[-1].tolist() == [0, 0]
    # one entry per combined structure (5); task A's batch can only touch A's two structures
    for key in ("tp_hard", "fp_hard", "fn_hard"):
        assert out[key].shape == (5,)
        assert not out[key][2:].any(), f"{key} of task B's structures must be 0 in a task-A batch"
    assert out["fn_hard"][:2].sum() + out["tp_hard"][:2].sum() == 2 * 2 * 4 * 8 * 8   # all A voxels accounted
    with pytest.raises(KeyError, match="task_id"):
        tr.validation_step({k: v for k, v in batch_of_task(0).items() if k != "task_id"})
