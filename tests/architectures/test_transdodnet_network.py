"""TransDoDNet network: parameter counts, shapes, task queries, official options, gradients, errors."""
import pytest
import torch

from nnunet_plugins.architectures.transdodnet import TransDoDNet
from nnunet_plugins.architectures.blocks.deformable_attention import MSDeformAttn3D

TINY = dict(stem_channels=8, backbone_planes=(4, 8, 8, 8), backbone_blocks=(1, 1, 2, 1), d_model=24, n_heads=2,
            d_ffn=32, num_encoder_layers=1, num_decoder_layers=2, decoder_channels=(8, 8, 8, 16, 16), head_channels=4)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_official_parameter_count_total_and_parts():
    net = TransDoDNet()  # 1 input channel, 2 classes, 7 tasks
    assert _count(net) == 39_049_941
    parts = {name: _count(child) for name, child in net.named_children()}
    assert parts["backbone"] == 29_025_760
    transformer = sum(parts[k] for k in ("input_proj", "encoder", "query_embed", "reference_points", "decoder_layers"))
    assert transformer == 3_661_251
    # controller MLP 192 -> 192 -> 162 per query; one query (2 x 192: position + content) per task
    assert parts["controller"] == 192 * 192 + 192 + 192 * 162 + 162 == 68_322
    assert parts["query_embed"] == 7 * 2 * 192
    decoder = sum(parts[k] for k in ("memory_proj", "bottleneck_proj", "skip_projs", "upconvs", "decoder_blocks",
                                     "pre_head"))
    assert decoder == 6_294_608
    assert net.num_dynamic_params == 162
    # ResNet-50 layout: bottleneck blocks [3, 4, 6, 3], 1280 channels at the deepest level
    assert [len(s) for s in net.backbone.stages] == [3, 4, 6, 3]
    assert net.backbone.out_channels == [32, 256, 512, 1024, 1280]
    assert net.backbone.stem[0][0].stride == (1, 2, 2)
    assert len(net.encoder.layers) == 3 and len(net.decoder_layers) == 3


def test_official_configuration_runs():
    torch.manual_seed(0)
    net = TransDoDNet().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 64, 64), torch.tensor([4]))
    assert out.shape == (1, 2, 32, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(32, 64, 64), (16, 64, 96)])
def test_shapes_and_forward_is_the_official_output_picked_per_sample(shape):
    torch.manual_seed(0)
    net = TransDoDNet(input_channels=2, num_classes=3, num_tasks=4, **TINY).eval()
    x = torch.randn(2, 2, *shape)
    tasks = torch.tensor([3, 1])
    with torch.no_grad():
        out = net(x, tasks)
        everything = net.forward_all_tasks(x)
    assert out.shape == (2, 3, *shape)
    assert everything.shape == (2, 4, 3, *shape)
    torch.testing.assert_close(out, everything[torch.arange(2), tasks])
    # the queries are different tasks: their heads differ
    assert (everything[:, 0] - everything[:, 1]).abs().max() > 1e-4
    net.deep_supervision = True
    with torch.no_grad():
        ds = net(x, tasks)
    assert isinstance(ds, list) and len(ds) == 1 and ds[0].shape == out.shape


def test_samples_are_independent():
    torch.manual_seed(0)
    net = TransDoDNet(num_tasks=3, **TINY).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        batched = net(x, torch.tensor([0, 2]))
        alone = torch.cat([net(x[:1], 0), net(x[1:], 2)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    net = TransDoDNet(num_tasks=3, **TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    net(x, torch.tensor([0, 1])).square().mean().backward()
    params = dict(net.named_parameters())
    for name in ("backbone.stem.0.0.weight", "backbone.stages.3.0.conv3.weight", "input_proj.0.0.weight",
                 "encoder.level_embed", "encoder.layers.0.self_attn.value_proj.weight",
                 "decoder_layers.1.cross_attn.sampling_offsets.weight", "decoder_layers.0.self_attn.in_proj_weight",
                 "reference_points.weight", "query_embed.weight", "controller.0.weight", "controller.2.bias",
                 "memory_proj.0.weight", "bottleneck_proj.0.weight", "skip_projs.3.0.weight", "upconvs.0.weight",
                 "decoder_blocks.3.conv2.weight", "pre_head.0.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_offset_normaliser_axis_order_and_deepnorm_options():
    default = TransDoDNet(**TINY)
    attn = [m for m in default.modules() if isinstance(m, MSDeformAttn3D)]
    assert len(attn) == 1 + 2  # one per encoder layer, one cross-attention per decoder layer
    assert all(m.fixed_offset_normalizer is None and not m.official_axis_order for m in attn)
    official = TransDoDNet(official_offset_normalizer=True, official_axis_order=True, **TINY)
    attn = [m for m in official.modules() if isinstance(m, MSDeformAttn3D)]
    for m in attn:
        assert m.official_axis_order
        torch.testing.assert_close(m.fixed_offset_normalizer, torch.tensor([[64.0] * 3, [32.0] * 3, [16.0] * 3]))
    # official attention initialisation of TransDoDNet: head 0 (theta = 0) points along the official
    # second component (w); correct order permutes it to our (d, h, w) layout
    bias = TransDoDNet(**TINY).encoder.layers[0].self_attn.sampling_offsets.bias.view(2, 3, 4, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    # DeepNorm residual scales for 3 encoder + 3 decoder layers (official defaults)
    net = TransDoDNet(num_encoder_layers=3, num_decoder_layers=3, **{k: v for k, v in TINY.items()
                                                                   if not k.startswith("num_")})
    assert net.encoder.layers[0].residual_scale == pytest.approx(0.81 * (3 ** 4 * 3) ** (1 / 16))
    assert net.decoder_layers[0].residual_scale == pytest.approx(9 ** 0.25)
    plain = TransDoDNet(deepnorm=False, **TINY)
    assert plain.encoder.layers[0].residual_scale == 1.0 and plain.decoder_layers[0].residual_scale == 1.0
    # plain Deformable DETR init keeps zero offset weights; DeepNorm's Xavier init does not (official)
    assert plain.encoder.layers[0].self_attn.sampling_offsets.weight.abs().sum() == 0
    assert default.encoder.layers[0].self_attn.sampling_offsets.weight.abs().sum() > 0
    x = torch.randn(1, 1, 32, 32, 32)
    for model in (official.eval(), plain.eval()):
        with torch.no_grad():
            assert model(x, 0).shape == (1, 2, 32, 32, 32)


def test_memory_fusion_modes():
    for mode, present, absent in (("cnn", "bottleneck_proj", "memory_proj"),
                                  ("transformer", "memory_proj", "bottleneck_proj")):
        net = TransDoDNet(memory_fusion=mode, **TINY).eval()
        assert hasattr(net, present) and not hasattr(net, absent)
        with torch.no_grad():
            assert net(torch.randn(1, 1, 32, 32, 32), 0).shape == (1, 2, 32, 32, 32)


def test_task_ids_and_input_errors():
    torch.manual_seed(0)
    net = TransDoDNet(num_tasks=3, **TINY).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with pytest.raises(RuntimeError, match="set_inference_task"):
        net(x)
    net.set_inference_task(1)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x, torch.tensor([1])))
    with pytest.raises(ValueError, match="tasks 0..2"):
        net(x, torch.tensor([3]))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 32, 32, 48), 0)
    with pytest.raises(ValueError, match="one voxel"):
        net(torch.randn(1, 1, 16, 32, 32), 0)
    with pytest.raises(ValueError, match="3-D"):
        net(torch.randn(1, 1, 32, 32), 0)
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 2, 32, 32, 32), 0)
    with pytest.raises(ValueError, match="decoder_channels"):
        TransDoDNet(**{**TINY, "decoder_channels": (8, 8, 8)})
    with pytest.raises(ValueError, match="memory_fusion"):
        TransDoDNet(memory_fusion="sum", **TINY)


def test_autocast_bfloat16_trains():
    from nnunet_plugins.training.partial_label_loss import PartialLabelDiceBCELoss

    torch.manual_seed(0)
    net = TransDoDNet(num_tasks=3, **TINY)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.tensor([0, 2]))
        loss = PartialLabelDiceBCELoss()(out, (x > 0).float().expand(-1, 2, -1, -1, -1))
    loss.backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert torch.isfinite(net.controller[2].weight.grad).all() and net.query_embed.weight.grad.abs().sum() > 0
