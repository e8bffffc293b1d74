"""Dynamic heads (DoDNet/TransDoDNet) and the task-id convention of multi-task networks."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_plugins.architectures.blocks.dynamic_head import (
    TaskConditionedNetwork, apply_dynamic_head, dynamic_head_layer_sizes, num_dynamic_params, split_dynamic_params,
)


def test_official_head_has_162_parameters_split_64_64_16_and_8_8_2():
    sizes = dynamic_head_layer_sizes()
    assert sizes == [(8, 8), (8, 8), (8, 2)]
    assert num_dynamic_params(sizes) == 162
    params = torch.arange(2 * 162, dtype=torch.float32).view(2, 162)
    (w0, b0), (w1, b1), (w2, b2) = split_dynamic_params(params, sizes)
    assert [w.shape[1] * w.shape[2] for w in (w0, w1, w2)] == [64, 64, 16]
    assert [b.shape[1] for b in (b0, b1, b2)] == [8, 8, 2]
    # official layout: all weights (row-major (out, in)) first, then all biases
    for n in range(2):
        base = 162 * n
        assert torch.equal(w0[n], torch.arange(base, base + 64, dtype=torch.float32).view(8, 8))
        assert torch.equal(w1[n], torch.arange(base + 64, base + 128, dtype=torch.float32).view(8, 8))
        assert torch.equal(w2[n], torch.arange(base + 128, base + 144, dtype=torch.float32).view(2, 8))
        assert torch.equal(b0[n], torch.arange(base + 144, base + 152, dtype=torch.float32))
        assert torch.equal(b1[n], torch.arange(base + 152, base + 160, dtype=torch.float32))
        assert torch.equal(b2[n], torch.arange(base + 160, base + 162, dtype=torch.float32))


def _loop_reference(features, params, widths, conv):
    """Each sample alone, kernels cut out of its parameter vector by explicit offsets."""
    outs = []
    pairs = list(zip(widths[:-1], widths[1:]))
    n_w = sum(ci * co for ci, co in pairs)
    for b in range(features.shape[0]):
        x = features[b:b + 1]
        w_off, b_off = 0, n_w
        for i, (ci, co) in enumerate(pairs):
            weight = params[b, w_off:w_off + ci * co].view(co, ci, *([1] * (features.dim() - 2)))
            bias = params[b, b_off:b_off + co]
            x = conv(x, weight, bias)
            if i < len(pairs) - 1:
                x = torch.relu(x)
            w_off += ci * co
            b_off += co
        outs.append(x)
    return torch.cat(outs)


@pytest.mark.parametrize("spatial,conv", [((3, 4, 5), F.conv3d), ((6, 5), F.conv2d)])
def test_grouped_dynamic_conv_equals_per_sample_loop(spatial, conv):
    torch.manual_seed(0)
    sizes = dynamic_head_layer_sizes(8, 8, 3, 2)
    feats = torch.randn(3, 8, *spatial, dtype=torch.float64)
    params = torch.randn(3, 162, dtype=torch.float64)
    out = apply_dynamic_head(feats, params, sizes)
    assert out.shape == (3, 2, *spatial)
    torch.testing.assert_close(out, _loop_reference(feats, params, [8, 8, 8, 2], conv))


def test_other_head_shapes_and_gradients():
    torch.manual_seed(1)
    sizes = dynamic_head_layer_sizes(4, 6, 2, 3)
    assert sizes == [(4, 6), (6, 3)] and num_dynamic_params(sizes) == 4 * 6 + 6 + 6 * 3 + 3
    feats = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    params = torch.randn(2, num_dynamic_params(sizes), dtype=torch.float64, requires_grad=True)
    out = apply_dynamic_head(feats, params, sizes)
    torch.testing.assert_close(out, _loop_reference(feats, params, [4, 6, 3], F.conv3d))
    out.sum().backward()
    assert params.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    # sample 0's output does not depend on sample 1's parameters
    params.grad = None
    apply_dynamic_head(feats, params, sizes)[0].sum().backward()
    assert params.grad[1].abs().sum() == 0 and params.grad[0].abs().sum() > 0


def test_dynamic_head_bad_inputs():
    sizes = dynamic_head_layer_sizes()
    with pytest.raises(ValueError, match="162"):
        split_dynamic_params(torch.zeros(2, 100), sizes)
    with pytest.raises(ValueError, match="input channels"):
        apply_dynamic_head(torch.zeros(2, 4, 3, 3, 3), torch.zeros(2, 162), sizes)
    with pytest.raises(ValueError, match="batch of 2"):
        apply_dynamic_head(torch.zeros(2, 8, 3, 3, 3), torch.zeros(3, 162), sizes)
    with pytest.raises(ValueError, match="layer"):
        dynamic_head_layer_sizes(8, 8, 0, 2)


class _Toy(TaskConditionedNetwork):
    num_tasks = 3

    def forward(self, x, task_id=None):
        return self.task_ids(x, task_id)


def test_task_id_convention():
    net, x = _Toy(), torch.zeros(2, 1, 4)
    with pytest.raises(RuntimeError, match="set_inference_task"):
        net(x)
    assert net(x, torch.tensor([2, 0])).tolist() == [2, 0]
    assert net(x, 1).tolist() == [1, 1]
    assert net(x, torch.tensor(2)).tolist() == [2, 2]
    net.set_inference_task(2)
    assert net.inference_task == 2 and net(x).tolist() == [2, 2]
    assert net(x, torch.tensor([0, 1])).tolist() == [0, 1]  # an explicit task wins
    net.set_inference_task(None)
    with pytest.raises(RuntimeError):
        net(x)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="tasks 0..2"):
            net.set_inference_task(bad)
        with pytest.raises(ValueError, match="tasks 0..2"):
            net(x, torch.tensor([0, bad]))
    with pytest.raises(ValueError, match="integer"):
        net(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        net(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        net(x, "liver")
    with pytest.raises(ValueError):
        net(x, True)


def test_parallel_outputs_official_versemi_layout_180_values():
    # VerSemi official head: 8 -> 8 -> 8 -> (2, 2): weights 64 + 64 + 16 + 16, then biases 8 + 8 + 2 + 2
    sizes = dynamic_head_layer_sizes(8, 8, 3, 2, parallel_outputs=2)
    assert sizes == [(8, 8), (8, 8), (8, 2), (8, 2)] and num_dynamic_params(sizes) == 180
    torch.manual_seed(3)
    feats = torch.randn(3, 8, 3, 4, 5, dtype=torch.float64)
    params = torch.randn(3, 180, dtype=torch.float64)
    out = apply_dynamic_head(feats, params, sizes, parallel_outputs=2)
    assert out.shape == (3, 4, 3, 4, 5)
    # independent reference: explicit offsets into the official layout, each sample alone
    for b in range(3):
        p = params[b]
        x = feats[b:b + 1]
        x = torch.relu(F.conv3d(x, p[0:64].view(8, 8, 1, 1, 1), p[160:168]))
        x = torch.relu(F.conv3d(x, p[64:128].view(8, 8, 1, 1, 1), p[168:176]))
        first = F.conv3d(x, p[128:144].view(2, 8, 1, 1, 1), p[176:178])
        second = F.conv3d(x, p[144:160].view(2, 8, 1, 1, 1), p[178:180])
        torch.testing.assert_close(out[b:b + 1, :2], first)
        torch.testing.assert_close(out[b:b + 1, 2:], second)
    # parallel_outputs=1 on the same sizes treats the 4 entries as 4 sequential layers: 8->8->8->2->8?
    # not a valid chain: the last layer reads 8 channels but gets 2, which conv rejects
    with pytest.raises(RuntimeError):
        apply_dynamic_head(feats, params, sizes)
    with pytest.raises(ValueError, match="parallel"):
        apply_dynamic_head(feats, torch.zeros(3, 162, dtype=torch.float64), dynamic_head_layer_sizes(), 4)
    with pytest.raises(ValueError, match="output"):
        dynamic_head_layer_sizes(parallel_outputs=0)


def test_task_controller_pools_concatenates_one_hot_and_projects():
    from nnunet_plugins.architectures.blocks.dynamic_head import TaskController
    torch.manual_seed(4)
    ctrl = TaskController(6, 3, 10, torch.nn.Conv3d, pre=torch.nn.ReLU()).double()
    assert ctrl.conv.weight.shape == (10, 9, 1, 1, 1)
    bott = torch.randn(2, 6, 2, 3, 4, dtype=torch.float64)
    tid = torch.tensor([2, 0])
    out = ctrl(bott, tid)
    pooled = torch.relu(bott).mean(dim=(2, 3, 4))
    onehot = torch.tensor([[0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    ref = torch.cat([pooled, onehot], 1) @ ctrl.conv.weight.view(10, 9).T + ctrl.conv.bias
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="positive"):
        TaskController(6, 0, 10)
