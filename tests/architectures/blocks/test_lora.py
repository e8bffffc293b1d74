"""LoRA: zero-init equality, only adapters train, exact merge (hand computation), names restored, errors."""
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_plugins.architectures.blocks.lora import LoRAConv, LoRALinear, add_lora, lora_parameters, merge_lora
from nnunet_plugins.architectures.cotr import WSConv3d


def _unet():
    return PlainConvUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), 2, 2, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


class _LinearModel(nn.Module):
    """Tokens through linear layers, a Conv1d and an attention block (whose projections stay untouched)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.mix = nn.Conv1d(16, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 3))

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.mlp(h)


def _train_adapters(model, x, steps=5):
    opt = torch.optim.Adam(lora_parameters(model), lr=5e-2)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()


@pytest.mark.parametrize("make,x_shape,targets", [
    (_unet, (2, 1, 8, 16, 16), (nn.Conv3d, nn.Conv2d, nn.Linear)),
    (_LinearModel, (2, 7, 5), (nn.Linear, nn.Conv1d)),
])
def test_adapted_equals_base_at_start_only_lora_trains_and_merge_is_exact(make, x_shape, targets):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*x_shape)
    names = list(model.state_dict().keys())
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = model(x)
    add_lora(model, rank=2, alpha=4.0, targets=targets)
    wrappers = [m for m in model.modules() if isinstance(m, (LoRAConv, LoRALinear))]
    if make is _unet:
        # every Conv3d: 2 x 3 encoder stages + 2 x 1 decoder stages + 2 seg layers = 10 (transposed convs skipped)
        assert len(wrappers) == 10
        assert all(isinstance(m, nn.ConvTranspose3d) for m in model.decoder.transpconvs)
        # the conv aliased as .conv and .all_modules[0] is the same wrapper under both names
        block = model.encoder.stages[0][0].convs[0]
        assert block.conv is block.all_modules[0] and isinstance(block.conv, LoRAConv)
    else:
        assert len(wrappers) == 4 and not isinstance(model.attn.out_proj, LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=1e-6)  # B = 0: the base model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    _train_adapters(model, x)
    # base weights untouched, adapters moved
    for n, p in model.named_parameters():
        if not p.requires_grad:
            original = n.replace(".base.", ".")
            assert torch.equal(p, frozen_before[original]), n
    unused = [model.decoder.seg_layers[0]] if make is _unet else []  # low-res seg layer: no deep supervision
    assert all((w.lora_B.weight.abs().sum() > 0) == (w not in unused) for w in wrappers)
    model.eval()
    # an adapted checkpoint (e.g. nnU-Net's --c) loads into a freshly adapted model of the same kind
    resumed = add_lora(make(), rank=2, alpha=4.0, targets=targets).eval()
    resumed.load_state_dict(model.state_dict())
    with torch.no_grad():
        y_adapted = model(x)
        assert not torch.allclose(y_adapted, y0, atol=1e-3)
        torch.testing.assert_close(resumed(x), y_adapted)
        merge_lora(model)
        y_merged = model(x)
    torch.testing.assert_close(y_merged, y_adapted, rtol=0, atol=1e-5)
    assert not any(isinstance(m, (LoRAConv, LoRALinear)) for m in model.modules())
    assert list(model.state_dict().keys()) == names
    assert all(p.requires_grad for p in model.parameters())  # flags as before add_lora
    # a fresh model loads the merged weights by the original names and computes the same
    fresh = make().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_merged)


def test_merged_conv_weight_equals_hand_computed_composed_kernel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(3, 5, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 6, 6, 6))   # materialise the lazy layer
    model[3] = nn.Linear(model[3].in_features, 4)
    w_conv, w_lin = model[0].weight.detach().clone(), model[3].weight.detach().clone()
    x = torch.randn(2, 3, 6, 6, 6)
    with torch.no_grad():
        y_base = model(x)
    add_lora(model, rank=2, alpha=3.0)
    conv, lin = model[0], model[3]
    with torch.no_grad():
        assert torch.equal(model(x), y_base)  # zero-initialised B: bit-identical at the start
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    a, b = conv.lora_A.weight.detach(), conv.lora_B.weight.detach()
    assert a.shape == (2, 3, 3, 3, 3) and b.shape == (5, 2, 1, 1, 1)
    assert conv.lora_A.stride == (2, 2, 2) and conv.lora_A.padding == (1, 1, 1)
    expected_conv = w_conv + 1.5 * torch.einsum("or,rcxyz->ocxyz", b[:, :, 0, 0, 0], a)
    la, lb = lin.lora_A.weight.detach(), lin.lora_B.weight.detach()
    expected_lin = w_lin + 1.5 * lb @ la
    with torch.no_grad():
        y = model(x)
        merge_lora(model)
        torch.testing.assert_close(model[0].weight, expected_conv)
        torch.testing.assert_close(model[3].weight, expected_lin)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)  # outputs ~1e2: relative rounding
    assert type(model[0]) is nn.Conv3d and type(model[3]) is nn.Linear


def test_grouped_and_2d_conv_merge_exact_and_exclude_patterns():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), nn.Conv2d(6, 6, 1),
                          nn.Sequential(nn.Conv2d(6, 2, 3, padding=1, padding_mode="reflect"))).double()
    add_lora(model, rank=3, exclude=("1",))
    assert isinstance(model[0], LoRAConv) and type(model[1]) is nn.Conv2d and isinstance(model[2][0], LoRAConv)
    assert model[0].lora_A.weight.shape == (6, 2, 3, 3) and model[0].lora_B.weight.shape == (6, 3, 1, 1)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    assert model[0].lora_A.weight.dtype == torch.float64  # adapters follow the layer's dtype
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-10)  # float64: the merge is exact
    unet = add_lora(_unet(), 2, exclude=("decoder.*",))
    # (UNetDecoder also reaches the encoder as decoder.encoder: the encoder's convs keep their adapters)
    assert all(not isinstance(m, LoRAConv) for part in (unet.decoder.stages, unet.decoder.seg_layers)
               for m in part.modules())
    assert isinstance(unet.decoder.encoder.stages[0][0].convs[0].conv, LoRAConv)
    assert any(isinstance(m, LoRAConv) for m in unet.encoder.modules())


def test_dropout_only_in_train_mode():
    torch.manual_seed(3)
    model = add_lora(nn.Sequential(nn.Linear(8, 8)), rank=2, dropout=0.5)
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    x = torch.randn(4, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_errors():
    with pytest.raises(ValueError, match="rank"):
        add_lora(_unet(), 0)
    with pytest.raises(ValueError, match="rank"):
        add_lora(_unet(), 1.5)
    with pytest.raises(ValueError, match="no layer to adapt"):
        add_lora(nn.Sequential(nn.ReLU(), nn.ConvTranspose3d(2, 2, 2, 2), nn.InstanceNorm3d(2)), 2)
    with pytest.raises(ValueError, match="no layer to adapt"):
        add_lora(_unet(), 2, exclude=("*",))
    with pytest.raises(ValueError, match="targets"):
        add_lora(_unet(), 2, targets=(nn.ConvTranspose3d,))
    with pytest.raises(ValueError, match="WSConv3d.*exclude"):
        add_lora(nn.Sequential(WSConv3d(2, 2, 3)), 2)
    with pytest.raises(ValueError, match="container"):
        add_lora(nn.Linear(3, 3), 2)
    with pytest.raises(ValueError, match="dropout"):
        add_lora(_unet(), 2, dropout=1.0)
    model = add_lora(_unet(), 2)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, 2)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(_unet())
