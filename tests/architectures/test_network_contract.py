"""The networks' contract with nnU-Net (architectures/contract.py): from_plans, divisor, patch fitting,
deep-supervision scales and the conv feature-map size the planner uses."""
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

import nnunet_plugins.architectures.dodnet as dodnet_module
import nnunet_plugins.architectures.transdodnet as transdodnet_module
from nnunet_plugins.architectures.banet import BANetPlainConvUNet, BANetResidualEncoderUNet, BANetUNet
from nnunet_plugins.architectures.contract import fit_patch, fit_to_divisor, network_name, total_stride
from nnunet_plugins.architectures.cotr import CoTr
from nnunet_plugins.architectures.dodnet import DoDNet
from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.architectures.uniseg import UniSeg

COTR_TINY = dict(stage_channels=(8, 24, 48, 48), blocks_per_stage=(2, 1, 1), num_heads=4, ffn_dim=32,
                 num_encoder_layers=1)
DOD_TINY = dict(features_per_stage=(4, 8, 8), blocks_per_stage=(1, 2, 1), strides=(1, (1, 2, 2), 2), norm_groups=4,
                head_channels=4)
TD_TINY = dict(stem_channels=8, backbone_planes=(4, 8, 8), backbone_blocks=(1, 2, 1), d_model=24, n_heads=2, d_ffn=32,
               num_encoder_layers=1, num_decoder_layers=1, n_levels=2, decoder_channels=(8, 8, 8, 16), head_channels=4)


def hooked_conv_elements(net, x, *args, dynamic_head_module=None, monkeypatch=None):
    """Independent count: output elements of every conv / transposed-conv module in one forward pass
    (batch 1), plus the generated dynamic-head layers (functional convolutions)."""
    total = []
    hooks = [m.register_forward_hook(lambda m, i, o: total.append(o.numel()))
             for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))]
    if dynamic_head_module is not None:
        original = dynamic_head_module.apply_dynamic_head

        def counting(features, params, layer_sizes):
            total.append(sum(c_out for _, c_out in layer_sizes) * features[0, 0].numel())
            return original(features, params, layer_sizes)

        monkeypatch.setattr(dynamic_head_module, "apply_dynamic_head", counting)
    with torch.no_grad():
        net.eval()(x, *args)
    for h in hooks:
        h.remove()
    return sum(total)


@pytest.mark.parametrize("deep_supervision,size", [(True, (16, 32, 32)), (False, (8, 32, 64))])
def test_cotr_feature_map_size_counts_every_conv_output(deep_supervision, size):
    net = CoTr(1, 3, patch_size=size, deep_supervision=deep_supervision, **COTR_TINY)
    assert net.compute_conv_feature_map_size(size) == hooked_conv_elements(net, torch.randn(1, 1, *size))


@pytest.mark.parametrize("conv_op,size", [(nn.Conv3d, (8, 16, 16)), (nn.Conv2d, (16, 32))])
def test_dodnet_feature_map_size_counts_every_conv_output(conv_op, size, monkeypatch):
    kwargs = dict(DOD_TINY, strides=(1, 2, 2)) if conv_op is nn.Conv2d else DOD_TINY
    net = DoDNet(2, 2, 3, conv_op=conv_op, **kwargs)
    expected = hooked_conv_elements(net, torch.randn(1, 2, *size), torch.tensor([1]),
                                    dynamic_head_module=dodnet_module, monkeypatch=monkeypatch)
    assert net.compute_conv_feature_map_size(size) == expected


@pytest.mark.parametrize("memory_fusion", ["both", "cnn"])
def test_transdodnet_feature_map_size_counts_every_conv_output(memory_fusion, monkeypatch):
    net = TransDoDNet(1, 2, 3, memory_fusion=memory_fusion, **TD_TINY)
    size = (16, 32, 32)
    expected = hooked_conv_elements(net, torch.randn(1, 1, *size), torch.tensor([2]),
                                    dynamic_head_module=transdodnet_module, monkeypatch=monkeypatch)
    assert net.compute_conv_feature_map_size(size) == expected


def test_feature_map_size_grows_with_the_input():
    net = DoDNet(1, 2, 3, **DOD_TINY)
    controller = net.num_dynamic_params   # the controller's output is one voxel whatever the input
    assert (net.compute_conv_feature_map_size((16, 32, 32)) - controller
            == 8 * (net.compute_conv_feature_map_size((8, 16, 16)) - controller))


# ---- plans -----------------------------------------------------------------------------------------
def configuration(patch, network_class_name, arch_kwargs=None, req_import=()):
    plans = {"dataset_name": "Dataset999_Test", "plans_name": "P", "configurations": {"c": {
        "patch_size": list(patch), "batch_size": 2,
        "architecture": {"network_class_name": network_class_name, "arch_kwargs": arch_kwargs or {},
                         "_kw_requires_import": list(req_import)}}}}
    pm = PlansManager(plans)
    return pm, pm.get_configuration("c")


PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
UNET = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
IMPORTS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def test_divisors_and_patch_fitting_come_from_the_network():
    _, stock = configuration((20, 40, 56), PLAIN, UNET, IMPORTS)
    assert CoTr.plans_divisor(stock) == (8, 16, 16)
    assert DoDNet.plans_divisor(stock) == (16, 16, 16)          # official strides on stock plans
    assert TransDoDNet.plans_divisor(stock) == (16, 32, 32)     # ResNet-50 backbone
    assert UniSeg.plans_divisor(stock) == (2, 4, 4) == BANetUNet.plans_divisor(stock)   # the plans' U-Net
    assert DoDNet.fit_patch([20, 40, 56], stock) == [16, 32, 64]
    assert TransDoDNet.fit_patch([16, 32, 32], stock) == [16, 32, 64], "one deepest voxel is refused"
    assert DoDNet.fit_patch([16, 16, 16], stock) == [16, 16, 16], "DoDNet's group norm handles one voxel"
    _, dod = configuration((7, 30, 17), network_name(DoDNet), {"strides": [1, [1, 2, 2], 2]})
    assert DoDNet.plans_divisor(dod) == (2, 4, 4) and DoDNet.fit_patch([7, 30, 17], dod) == [8, 32, 16]
    assert CoTr.fit_patch([8, 16, 16]) == [8, 16, 32]           # the network's defaults without plans
    assert fit_to_divisor([3, 70, 190], [8, 16, 16]) == [8, 64, 192]
    assert fit_patch([16, 16], (16, 16), avoid_single_voxel=True) == [16, 32]
    assert total_stride([1, [1, 2, 2], 2], 3) == (2, 4, 4)
    with pytest.raises(ValueError, match="does not match"):
        total_stride([[1, 2]], 3)


def test_deep_supervision_scales():
    _, stock = configuration((8, 32, 32), PLAIN, UNET, IMPORTS)
    assert CoTr.plans_deep_supervision_scales(stock) == [list(s) for s in CoTr.deep_supervision_scales]
    assert DoDNet.plans_deep_supervision_scales(stock) is None and TransDoDNet.plans_deep_supervision_scales(stock) is None
    expected = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5]]   # nnU-Net's: cumulative pooling, the deepest dropped
    assert [list(map(float, s)) for s in UniSeg.plans_deep_supervision_scales(stock)] == expected
    assert [list(map(float, s)) for s in BANetUNet.plans_deep_supervision_scales(stock)] == expected


def test_from_plans_builds_the_plans_network_and_checks_them():
    pm, stock = configuration((8, 32, 32), PLAIN, UNET, IMPORTS)
    net = BANetUNet.from_plans(pm, stock, 1, 3, True)
    assert type(net) is BANetPlainConvUNet and net.official_v1_layout and net.deep_supervision
    resenc = dict(UNET, n_blocks_per_stage=[1, 1, 1])
    resenc.pop("n_conv_per_stage")
    pm_r, cm_r = configuration((8, 32, 32), "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                               resenc, IMPORTS)
    assert type(BANetUNet.from_plans(pm_r, cm_r, 1, 3, False)) is BANetResidualEncoderUNet
    uniseg = UniSeg.from_plans(pm, stock, 2, 3, False, num_tasks=2, task_input_channels=[1, 2])
    assert uniseg.official_generic_unet is False and uniseg.patch_size == (8, 32, 32) and not uniseg.deep_supervision
    pm_d, cm_d = configuration((8, 16, 16), network_name(DoDNet), DOD_TINY)
    dod = DoDNet.from_plans(pm_d, cm_d, 1, 2, False, num_tasks=4)
    assert dod.num_tasks == 4 and dod.required_divisor == (2, 4, 4) and dod.conv_op is nn.Conv3d
    pm_2d, cm_2d = configuration((32, 32), PLAIN, UNET, IMPORTS)
    assert DoDNet.from_plans(pm_2d, cm_2d, 1, 2, False).conv_op is nn.Conv2d
    with pytest.raises(ValueError, match="CoTr is a 3-D network"):
        CoTr.from_plans(pm_2d, cm_2d, 1, 2)
    pm_bad, cm_bad = configuration((8, 16, 16), network_name(DoDNet), {**DOD_TINY, "num_tasks": 3})
    with pytest.raises(ValueError, match="num_tasks"):
        DoDNet.from_plans(pm_bad, cm_bad, 1, 2)
    with pytest.raises(ValueError, match="cannot be imported"):
        pm_i, cm_i = configuration((8, 16, 16), network_name(DoDNet), {"conv_op": "torch.nn.NoSuchConv"}, ["conv_op"])
        DoDNet.from_plans(pm_i, cm_i, 1, 2)
