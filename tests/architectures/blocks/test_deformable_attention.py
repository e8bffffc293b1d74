"""3-D multi-scale deformable attention: correctness against an independent reference, axis order,
initialisation, gradients, positional encoding and the encoder stack."""
import math

import pytest
import torch

from nnunet_plugins.architectures.blocks.deformable_attention import (
    DeformableTransformerEncoder3D,
    MSDeformAttn3D,
    flatten_levels,
    level_start_indices,
    ms_deform_attn_3d,
    ms_deform_attn_reference,
    official_transdodnet_offset_normalizer,
    position_encoding_split,
    reference_points_3d,
    sine_position_encoding_3d,
    unflatten_levels,
)

# non-cubic, asymmetric levels: every axis has a different size
SHAPES = [(3, 5, 7), (2, 3, 4)]


def _n_tokens(shapes):
    return sum(d * h * w for d, h, w in shapes)


def _random_inputs(n=2, m=3, dh=4, lq=13, p=3, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    value = torch.randn(n, _n_tokens(shapes), m, dh, generator=g, dtype=torch.float64)
    # include locations outside [0, 1] to exercise zero padding
    loc = torch.rand(n, lq, m, len(shapes), p, 3, generator=g, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=torch.float64)
    return value, loc, w


def _coordinate_volume(shapes, dtype=torch.float64):
    """value (1, S, 1, 3): every voxel holds its own (d, h, w) index + 1 (so zero padding is visible)."""
    parts = []
    for d, h, w in shapes:
        gd, gh, gw = torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([gd, gh, gw], -1).reshape(-1, 3).to(dtype) + 1)
    return torch.cat(parts, 0)[None, :, None, :]


@pytest.mark.parametrize("implementation", ["gather", "grid_sample", "auto"])
@pytest.mark.parametrize("official", [False, True])
def test_vectorised_equals_reference_values_and_gradients(official, implementation):
    value, loc, w = _random_inputs()
    value.requires_grad_(True)
    loc.requires_grad_(True)
    w.requires_grad_(True)
    fast = ms_deform_attn_3d(value, SHAPES, loc, w, official_axis_order=official, implementation=implementation)
    slow = ms_deform_attn_reference(value, SHAPES, loc, w, official_axis_order=official)
    assert fast.shape == (2, 13, 3 * 4)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), (value, loc, w))
    g_slow = torch.autograd.grad((slow * probe).sum(), (value, loc, w))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def _edge_locations(shapes, m, p, dtype):
    """Locations on exact voxel centres and borders, one and several voxels outside every face."""
    g = torch.Generator().manual_seed(3)
    lq = 40
    loc = torch.rand(1, lq, m, len(shapes), p, 3, generator=g, dtype=dtype)
    size = torch.tensor(shapes, dtype=dtype)  # (L, 3)
    # snap half of the coordinates onto voxel centres / faces (integer or half-integer voxel index)
    k = torch.randint(-6, 2 * max(max(s) for s in shapes) + 6, loc.shape, generator=g).to(dtype) / 2
    snapped = (k + 0.5) / size[:, None, :]
    loc = torch.where(torch.rand(loc.shape, generator=g) < 0.5, snapped, loc)
    loc[:, :4] = -3.0   # far outside (all corners padding)
    loc[:, 4:8] = 4.0
    loc[:, 8:10] = 1e12   # beyond the integer range of voxel indices
    loc[:, 10:12] = -1e12
    return loc


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gather_equals_grid_sample_at_edges(dtype):
    """Both implementations agree (values and gradients) also where a trilinear corner falls outside,
    exactly on a face, or far outside: there the gather path's clamped zero border must act as
    grid_sample's zero padding. float32 to 1e-5 (the accuracy training runs at)."""
    g = torch.Generator().manual_seed(4)
    m, p = 3, 2
    loc = _edge_locations(SHAPES, m, p, dtype)
    value = torch.randn(1, _n_tokens(SHAPES), m, 5, generator=g, dtype=dtype)
    w = torch.rand(1, loc.shape[1], m, len(SHAPES), p, generator=g, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for official in (False, True):
        outs, grads = [], []
        for impl in ("gather", "grid_sample"):
            xs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
            out = ms_deform_attn_3d(xs[0], SHAPES, xs[1], xs[2], official_axis_order=official, implementation=impl)
            probe = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
            grads.append(torch.autograd.grad((out * probe).sum(), xs))
            outs.append(out.detach())
        torch.testing.assert_close(outs[0], outs[1], **tol)
        assert outs[0][:, :12].abs().max() == 0   # far outside: zero padding
        # a location component exactly on a voxel index is a kink of the trilinear interpolation: its
        # derivative there is one-sided and rounding decides the side, so compare the others only
        size = torch.tensor(SHAPES, dtype=dtype)
        coord = loc * (size.flip(-1) if official else size)[:, None, :] - 0.5
        smooth = (coord - coord.round()).abs() > 1e-4
        assert 0.2 < smooth.float().mean() < 0.95
        (gv_a, gl_a, gw_a), (gv_b, gl_b, gw_b) = grads
        torch.testing.assert_close(gv_a, gv_b, **tol)
        torch.testing.assert_close(gw_a, gw_b, **tol)
        scale = gl_b.abs().max()   # location gradients scale with the level size
        torch.testing.assert_close(gl_a[smooth] / scale, gl_b[smooth] / scale, **tol)
    with pytest.raises(ValueError, match="implementation"):
        ms_deform_attn_3d(value, SHAPES, loc, w, implementation="cuda_kernel")


def test_axis_orders_differ_on_asymmetric_volume():
    value, loc, w = _random_inputs(seed=1)
    a = ms_deform_attn_3d(value, SHAPES, loc, w)
    b = ms_deform_attn_3d(value, SHAPES, loc, w, official_axis_order=True)
    assert (a - b).abs().max() > 1e-3


def test_zero_offsets_sample_own_voxel_only_in_correct_order():
    value = _coordinate_volume(SHAPES)  # (1, S, 1, 3)
    s = value.shape[1]
    starts = level_start_indices(SHAPES)
    level_of_query = torch.cat([torch.full((d * h * w,), i) for i, (d, h, w) in enumerate(SHAPES)])
    # every query looks at its own normalised position on every level, weight 1 on its own level
    w = torch.nn.functional.one_hot(level_of_query, len(SHAPES)).to(value.dtype)[None, :, None, :, None]
    for official in (False, True):
        ref = reference_points_3d(SHAPES, official_axis_order=official, dtype=value.dtype)  # (S, 3)
        loc = ref[None, :, None, None, None, :].expand(1, s, 1, len(SHAPES), 1, 3)
        out = ms_deform_attn_3d(value, SHAPES, loc, w, official_axis_order=official)[0]  # (S, 3)
        own = value[0, :, 0]
        hits = (out - own).abs().max(-1).values < 1e-9
        if official:
            # only queries whose three normalised coordinates coincide land on themselves
            assert hits.float().mean() < 0.2
        else:
            assert hits.all(), f"{(~hits).sum()} of {s} queries missed their own voxel"
    assert starts == [0, 3 * 5 * 7]


def _identity_attention(official, shape, n_levels=1):
    torch.manual_seed(0)
    c = 6
    attn = MSDeformAttn3D(c, n_levels=n_levels, n_heads=2, n_points=1, official_axis_order=official).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(c))
            lin.bias.zero_()
    return attn


@pytest.mark.parametrize("official", [False, True])
def test_module_with_zero_offsets_returns_own_value(official):
    shape = (3, 4, 5)
    attn = _identity_attention(official, shape)
    x = torch.randn(2, math.prod(shape), 6, dtype=torch.float64)
    ref = reference_points_3d([shape], official_axis_order=official, dtype=torch.float64)[None]
    out = attn(x, ref, x, [shape])
    if official:
        assert not torch.allclose(out, x, atol=1e-6)
    else:
        torch.testing.assert_close(out, x)


def test_offset_of_one_voxel_and_fixed_normalizer():
    shape = (3, 4, 5)
    x = torch.randn(1, math.prod(shape), 6, dtype=torch.float64)
    ref = reference_points_3d([shape], dtype=torch.float64)[None]
    vol = x[0].reshape(*shape, 6)
    expected = torch.zeros_like(vol)
    expected[:, :, :-1] = vol[:, :, 1:]  # one voxel along +w; the last w slice samples zeros
    expected = expected.reshape(1, -1, 6)

    attn = _identity_attention(False, shape)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([0.0, 0.0, 1.0] * 2))  # (d, h, w) per head
    torch.testing.assert_close(attn(x, ref, x, [shape]), expected)

    fixed = MSDeformAttn3D(6, 1, 2, 1, offset_normalizer=[[2 * s for s in shape]]).double()
    fixed.load_state_dict(attn.state_dict())
    with torch.no_grad():
        fixed.sampling_offsets.bias.copy_(torch.tensor([0.0, 0.0, 2.0] * 2))
    torch.testing.assert_close(fixed(x, ref, x, [shape]), expected)
    assert official_transdodnet_offset_normalizer(3) == [64.0, 32.0, 16.0]
    with pytest.raises(ValueError, match="entries"):
        MSDeformAttn3D(6, 2, 2, 1, offset_normalizer=[16.0])


def test_official_initialisation():
    attn = MSDeformAttn3D(24, n_levels=2, n_heads=6, n_points=4)
    off = MSDeformAttn3D(24, n_levels=2, n_heads=6, n_points=4, official_axis_order=True)
    bias = attn.sampling_offsets.bias.detach().view(6, 2, 4, 3)
    # point i sits at (i + 1) x a unit-max-norm direction, identical for all levels
    torch.testing.assert_close(bias.abs().amax(-1), torch.arange(1.0, 5.0).expand(6, 2, 4))
    torch.testing.assert_close(bias[:, 0], bias[:, 1])
    # head 0 (theta = 0) points along depth only; directions differ between heads
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.unique(bias[:, 0, 0], dim=0).shape[0] == 6
    # same direction per axis NAME in both orders: official (d, w, h) = ours (d, h, w) permuted
    torch.testing.assert_close(off.sampling_offsets.bias.detach().view(6, 2, 4, 3)[..., [0, 2, 1]], bias)
    assert attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    tdd = MSDeformAttn3D(24, 3, 8, 4, offset_bias_init="transdodnet").sampling_offsets.bias.view(8, 3, 4, 3)
    assert not torch.allclose(tdd[:6, :2], bias)


def test_gradients_reach_inputs_and_all_parameters():
    torch.manual_seed(0)
    attn = MSDeformAttn3D(12, n_levels=2, n_heads=3, n_points=2).double()
    # non-trivial offset/attention weights so every path carries gradient
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 0.1)
        attn.attention_weights.weight.normal_(0, 0.1)
    s = _n_tokens(SHAPES)
    x = torch.randn(2, s, 12, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 9, 12, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(2, 9, 3, dtype=torch.float64, requires_grad=True)
    out = attn(q, ref, x, SHAPES)
    assert out.shape == (2, 9, 12)
    (out * torch.randn_like(out)).sum().backward()
    for name, t in [("value input", x), ("query", q), ("reference points", ref)] + list(attn.named_parameters()):
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_padding_mask_hides_values():
    torch.manual_seed(0)
    attn = MSDeformAttn3D(12, n_levels=2, n_heads=3, n_points=2).double()
    s = _n_tokens(SHAPES)
    x = torch.randn(1, s, 12, dtype=torch.float64)
    q = torch.randn(1, 5, 12, dtype=torch.float64)
    ref = torch.rand(1, 5, 3, dtype=torch.float64)
    mask = torch.zeros(1, s, dtype=torch.bool)
    mask[:, ::2] = True
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), 12, dtype=torch.float64)
    torch.testing.assert_close(attn(q, ref, x, SHAPES, mask), attn(q, ref, x2, SHAPES, mask))
    assert not torch.allclose(attn(q, ref, x, SHAPES), attn(q, ref, x2, SHAPES))


def test_bad_inputs_raise():
    value, loc, w = _random_inputs()
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn_3d(value[:, :-1], SHAPES, loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_3d(value, SHAPES, loc, w[..., :-1])
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn3D(10, 2, 3, 4)
    attn = MSDeformAttn3D(12, 2, 3, 2)
    with pytest.raises(ValueError, match="levels"):
        attn(torch.randn(1, 4, 12), torch.rand(1, 4, 3), torch.randn(1, 105, 12), [(3, 5, 7)])


def _pe_by_formula(shape, d_model, temperature=10000.0):
    """Per-element evaluation of the documented CoTr 'v2' encoding (independent of the vectorised one)."""
    splits = position_encoding_split(d_model)
    d, h, w = shape
    out = torch.zeros(d_model, d, h, w, dtype=torch.float64)
    for z in range(d):
        for y in range(h):
            for x in range(w):
                c = 0
                for coord, size, n in ((z, d, splits[0]), (y, h, splits[1]), (x, w, splits[2])):
                    t = (coord + 0.5) / (size + 1e-6) * 2 * math.pi
                    for j in range(n):
                        arg = t / temperature ** (3 * (j // 3) / n)
                        out[c, z, y, x] = math.sin(arg) if j % 2 == 0 else math.cos(arg)
                        c += 1
    return out


def test_sine_position_encoding_matches_formula_and_splits():
    pe = sine_position_encoding_3d((2, 3, 4), 24, dtype=torch.float64)
    assert pe.shape == (24, 2, 3, 4)
    torch.testing.assert_close(pe, _pe_by_formula((2, 3, 4), 24), rtol=0, atol=1e-5)
    assert position_encoding_split(384) == (128, 128, 128)
    assert position_encoding_split(192) == (64, 64, 64)
    assert position_encoding_split(26) == (10, 8, 8)  # remainder goes to depth (official split)
    with pytest.raises(ValueError, match="multiple of 6"):
        position_encoding_split(256)
    with pytest.raises(ValueError, match="multiple of 6"):
        DeformableTransformerEncoder3D(d_model=256, n_heads=8)


def test_flatten_unflatten_roundtrip_and_reference_points():
    feats = [torch.randn(2, 5, *s) for s in SHAPES]
    tokens, shapes = flatten_levels(feats)
    assert tokens.shape == (2, _n_tokens(SHAPES), 5) and shapes == SHAPES
    for a, b in zip(unflatten_levels(tokens, shapes), feats):
        torch.testing.assert_close(a, b)
    # token order: row-major (d, h, w) -> token 1 of level 0 is voxel (0, 0, 1)
    torch.testing.assert_close(tokens[:, 1], feats[0][:, :, 0, 0, 1])
    ref = reference_points_3d(SHAPES)
    torch.testing.assert_close(ref[1], torch.tensor([0.5 / 3, 0.5 / 5, 1.5 / 7]))
    torch.testing.assert_close(reference_points_3d(SHAPES, official_axis_order=True)[1],
                               torch.tensor([0.5 / 3, 1.5 / 7, 0.5 / 5]))
    with pytest.raises(ValueError, match="tokens"):
        unflatten_levels(tokens[:, 1:], shapes)


def test_encoder_shapes_gradients_and_reuse_configuration():
    torch.manual_seed(0)
    enc = DeformableTransformerEncoder3D(d_model=24, n_heads=2, num_layers=2, d_ffn=32, n_levels=2, n_points=2)
    # at the official initialisation the queries (hence pos + level embeddings) only act through the
    # zero-initialised offset / attention-weight matrices; perturb them as one SGD step would
    with torch.no_grad():
        for layer in enc.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.05)
            layer.self_attn.attention_weights.weight.normal_(0, 0.05)
    feats = [torch.randn(2, 24, *s, requires_grad=True) for s in SHAPES]
    out = enc(feats)
    assert [tuple(o.shape) for o in out] == [(2, 24, *s) for s in SHAPES]
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    assert all(f.grad.abs().sum() > 0 for f in feats)
    # each level's embedding differs (learnable level embedding added to the sine encoding)
    emb = enc.embeddings(SHAPES, "cpu", torch.float32)
    assert emb.shape == (1, _n_tokens(SHAPES), 24)
    # TransDoDNet configuration: 3 levels, d_model 192, 8 heads, FFN 768, fixed normaliser
    tdd = DeformableTransformerEncoder3D(d_model=192, n_heads=8, num_layers=3, d_ffn=768, activation="relu",
                                         n_levels=3, offset_normalizer=official_transdodnet_offset_normalizer(3),
                                         offset_bias_init="transdodnet", official_axis_order=True)
    per_layer = (192 * 288 + 288) + (192 * 96 + 96) + 2 * (192 * 192 + 192) + 2 * 384 + (192 * 768 + 768) + (768 * 192 + 192)
    assert sum(p.numel() for p in tdd.parameters()) == 3 * per_layer + 3 * 192
    tokens, shapes, pos = tdd.encode_tokens([torch.randn(1, 192, 4, 4, 4), torch.randn(1, 192, 2, 2, 2),
                                             torch.randn(1, 192, 1, 2, 2)])
    assert tokens.shape == (1, 64 + 8 + 4, 192) and pos.shape == (1, 76, 192)
    with pytest.raises(ValueError, match="levels"):
        enc(feats[:1])


def test_encoder_gather_and_grid_sample_give_equal_outputs_and_gradients():
    """The whole DeTrans stack (float32, as trained) with either sampler: equal outputs and parameter gradients."""
    torch.manual_seed(0)
    enc = DeformableTransformerEncoder3D(d_model=24, n_heads=2, num_layers=2, d_ffn=32, n_levels=2, n_points=2,
                                         dropout=0.0)
    with torch.no_grad():   # offsets away from the initial grid pattern, so sampling is off-voxel
        for layer in enc.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0, 0.2)
            layer.self_attn.attention_weights.weight.normal_(0, 0.2)
    feats = [torch.randn(2, 24, *s) for s in SHAPES]
    results = []
    for impl in ("gather", "grid_sample"):
        for mod in enc.modules():
            if isinstance(mod, MSDeformAttn3D):
                mod.implementation = impl
        enc.zero_grad()
        xs = [f.clone().requires_grad_(True) for f in feats]
        outs = enc(xs)
        sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
        results.append(([o.detach() for o in outs], [x.grad for x in xs],
                        {n: p.grad.clone() for n, p in enc.named_parameters()}))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    for a, b in zip(out_a + gx_a, out_b + gx_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert gp_a.keys() == gp_b.keys()
    for name in gp_a:
        scale = gp_b[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(gp_a[name] / scale, gp_b[name] / scale, rtol=1e-5, atol=1e-5, msg=name)
