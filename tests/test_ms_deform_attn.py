"""CPU tests of multi-scale deformable attention: the torch reference against a naive
per-sample loop and hand-computed values, the dispatcher, input checks and the autograd
wrapper of the compiled op (driven here by a stand-in extension)."""
import importlib
import math
import types

import mask2former_sim  # noqa: F401  (compat shim before detectron2)
import pytest
import torch

from mask2former_sim.modeling import ops
from mask2former_sim.modeling.ops import cuda_op_available, ms_deform_attn, ms_deform_attn_torch

# the submodule (the package attribute of the same name is the function)
msda_mod = importlib.import_module("mask2former_sim.modeling.ops.ms_deform_attn")


def make_inputs(shapes, n=2, m=3, d=4, lq=5, p=2, seed=0, dtype=torch.float64, lo=-0.3, hi=1.3):
    """Random inputs; locations uniform in [lo, hi] (so some fall outside [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    value = torch.randn(n, s, m, d, generator=gen, dtype=dtype)
    loc = lo + (hi - lo) * torch.rand(n, lq, m, len(shapes), p, 2, generator=gen, dtype=dtype)
    attn = torch.rand(n, lq, m, len(shapes), p, generator=gen, dtype=dtype)
    return value, ss, starts, loc, attn


def naive_msda(value, spatial_shapes, loc, attn):
    """One sample at a time: pixel = loc * size - 0.5, bilinear, zero outside the map."""
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    shapes = spatial_shapes.tolist()
    for b in range(n):
        for q in range(lq):
            for h_ in range(m):
                start = 0
                for lvl, (hh, ww) in enumerate(shapes):
                    for pt in range(n_points):
                        x = float(loc[b, q, h_, lvl, pt, 0]) * ww - 0.5
                        y = float(loc[b, q, h_, lvl, pt, 1]) * hh - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(d, dtype=torch.float64)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < hh and 0 <= xx < ww:
                                wgt = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                sample += wgt * value[b, start + yy * ww + xx, h_].double()
                        out[b, q, h_] += float(attn[b, q, h_, lvl, pt]) * sample
                    start += hh * ww
    return out.reshape(n, lq, m * d)


CASES = [
    dict(shapes=[[5, 7], [3, 2], [1, 1]], n=2, m=3, d=5, lq=4, p=3),  # odd sizes, 1x1 level
    dict(shapes=[[4, 6]], n=1, m=2, d=3, lq=7, p=4),  # one level
    dict(shapes=[[7, 3], [2, 5]], n=3, m=1, d=1, lq=2, p=1),  # one head, one channel, one point
    dict(shapes=[[1, 9], [9, 1], [2, 2]], n=1, m=2, d=2, lq=3, p=2, lo=-1.0, hi=2.0),  # far outside
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_loop(case):
    case = dict(case)
    shapes = case.pop("shapes")
    value, ss, starts, loc, attn = make_inputs(shapes, seed=len(shapes), **case)
    outside = ((loc < 0) | (loc > 1)).any(-1)
    assert outside.any() and (~outside).any()
    got = ms_deform_attn_torch(value, ss, starts, loc, attn)
    torch.testing.assert_close(got, naive_msda(value, ss, loc, attn), rtol=0, atol=1e-12)
    # float32 follows the same semantics
    got32 = ms_deform_attn_torch(value.float(), ss, starts, loc.float(), attn.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), naive_msda(value, ss, loc, attn), rtol=0, atol=1e-5)


def test_hand_computed_values():
    # level 0: 2x2 map [[1, 2], [3, 4]]; level 1: 1x1 map [10]; one head, one channel
    value = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64).view(1, 5, 1, 1)
    ss = torch.tensor([[2, 2], [1, 1]])
    starts = torch.tensor([0, 4])
    # each query uses one point on one level with weight 1 (other level weight 0)
    cases = [  # (level, x, y, expected)
        (0, 0.5, 0.5, 2.5),  # centre of the 2x2 map: mean of the four
        (0, 0.25, 0.25, 1.0),  # pixel centre (0, 0)
        (0, 0.75, 0.25, 2.0),  # pixel centre (x=1, y=0)
        (0, 0.0, 0.25, 0.5),  # x = -0.5: half of pixel (0, 0), half outside
        (0, 1.0, 1.0, 1.0),  # x = y = 1.5: a quarter of pixel (1, 1) = 4
        (0, -0.3, 0.5, 0.0),  # x = -1.1: all four corners outside
        (0, 0.5, 1.3, 0.0),  # y = 2.1: outside
        (1, 0.5, 0.5, 10.0),  # 1x1 level, centre
        (1, 0.75, 0.5, 7.5),  # x = 0.25 on a 1-wide map: 0.75 of the only pixel
    ]
    lq = len(cases)
    loc = torch.zeros(1, lq, 1, 2, 1, 2, dtype=torch.float64)
    attn = torch.zeros(1, lq, 1, 2, 1, dtype=torch.float64)
    for q, (lvl, x, y, _) in enumerate(cases):
        loc[0, q, 0, lvl, 0] = torch.tensor([x, y])
        attn[0, q, 0, lvl, 0] = 1.0
    expected = torch.tensor([c[3] for c in cases], dtype=torch.float64).view(1, lq, 1)
    torch.testing.assert_close(ms_deform_attn_torch(value, ss, starts, loc, attn), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(naive_msda(value, ss, loc, attn), expected, rtol=0, atol=1e-12)
    # two weighted points on level 0: 2 * value(0, 0) - 1 * value(1, 1) = 2 - 4
    loc2 = torch.tensor([[0.25, 0.25], [0.75, 0.75]], dtype=torch.float64).view(1, 1, 1, 1, 2, 2)
    attn2 = torch.tensor([2.0, -1.0], dtype=torch.float64).view(1, 1, 1, 1, 2)
    out2 = ms_deform_attn_torch(value[:, :4], ss[:1], starts[:1], loc2, attn2)
    torch.testing.assert_close(out2, torch.full((1, 1, 1), -2.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_reference_gradcheck():
    value, ss, starts, loc, attn = make_inputs([[3, 4], [2, 1]], n=1, m=2, d=2, lq=3, p=2, seed=3)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_torch(v, ss, starts, l, a), inputs, eps=1e-6, atol=1e-6
    )


def test_dispatch_on_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv(msda_mod.ENV_VAR, raising=False)
    value, ss, starts, loc, attn = make_inputs([[3, 5], [2, 2]], seed=1)
    ref = ms_deform_attn_torch(value, ss, starts, loc, attn)
    torch.testing.assert_close(ms_deform_attn(value, ss, starts, loc, attn), ref, rtol=0, atol=0)
    torch.testing.assert_close(ms_deform_attn(value, ss, starts, loc, attn, impl="torch"), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="CUDA tensors"):
        ms_deform_attn(value, ss, starts, loc, attn, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(value, ss, starts, loc, attn, impl="triton")


def test_env_var_forces_reference(monkeypatch):
    value, ss, starts, loc, attn = make_inputs([[3, 5]], seed=2)
    monkeypatch.setenv(msda_mod.ENV_VAR, "torch")
    # impl="cuda" on CPU tensors would raise; the variable overrides it
    out = ms_deform_attn(value, ss, starts, loc, attn, impl="cuda")
    torch.testing.assert_close(out, ms_deform_attn_torch(value, ss, starts, loc, attn), rtol=0, atol=0)
    monkeypatch.setenv(msda_mod.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MASK2FORMER_SIM_MSDA"):
        ms_deform_attn(value, ss, starts, loc, attn)


def test_bad_inputs_name_the_culprit():
    value, ss, starts, loc, attn = make_inputs([[3, 5], [2, 2]], seed=4)
    cases = [
        ((value[0], ss, starts, loc, attn), ValueError, "value must be"),
        ((value, ss, starts, loc[..., :1], attn), ValueError, "sampling_locations must be"),
        ((value, ss, starts, loc[:, :, :2], attn), ValueError, "heads"),
        ((value, ss, starts, loc, attn[..., :1]), ValueError, "attention_weights must be"),
        ((value, ss[:1], starts, loc, attn), ValueError, "spatial_shapes must be"),
        ((value, ss, starts[:1], loc, attn), ValueError, "level_start_index must be"),
        ((value, ss + 1, starts, loc, attn), ValueError, "cover 33 positions"),
        ((value, ss.double(), starts, loc, attn), TypeError, "spatial_shapes must be an integer"),
        ((value.long(), ss, starts, loc, attn), TypeError, "value must be a floating-point"),
        ((value, ss, starts, loc.to("meta"), attn), ValueError, "sampling_locations is on meta"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            ms_deform_attn(*args)


def _stand_in_extension(calls):
    """Mimics m2fsim_msda's contract (dtypes in and out) with the reference underneath."""

    def forward(value, shapes, starts, loc, attn, out=None):
        calls.append(("forward", value.dtype, loc.dtype, attn.dtype))
        return ms_deform_attn_torch(value.double(), shapes, starts, loc.double(), attn.double()).to(value.dtype)

    def backward(grad_out, value, shapes, starts, loc, attn):
        calls.append(("backward", grad_out.dtype))
        with torch.enable_grad():
            leaves = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
            out = ms_deform_attn_torch(leaves[0], shapes, starts, leaves[1], leaves[2])
            grads = torch.autograd.grad(out, leaves, grad_out.double())
        return [grads[0].to(value.dtype), grads[1].to(loc.dtype), grads[2].to(attn.dtype)]

    return types.SimpleNamespace(forward=forward, backward=backward)


def test_autograd_wrapper_dtypes_and_gradients():
    calls = []
    ext = _stand_in_extension(calls)
    value, ss, starts, loc, attn = make_inputs([[3, 4], [2, 2]], n=1, m=2, d=3, lq=4, p=2, seed=5)
    # bf16 value, fp16 locations, fp64 weights: the op sees bf16 value and fp32 locations/weights
    v = value.bfloat16().requires_grad_()
    lo = loc.half().requires_grad_()
    a = attn.clone().requires_grad_()
    out = msda_mod._MSDeformAttnFunction.apply(ext, v, ss, starts, lo, a)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 6)
    out.float().pow(2).sum().backward()
    assert calls[0] == ("forward", torch.bfloat16, torch.float32, torch.float32)
    assert calls[1] == ("backward", torch.bfloat16)
    assert (v.grad.dtype, lo.grad.dtype, a.grad.dtype) == (torch.bfloat16, torch.float16, torch.float64)
    # fp64 end to end: gradients for value, locations and weights are the reference's
    inputs = tuple(t.clone().requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda vv, ll, aa: msda_mod._MSDeformAttnFunction.apply(ext, vv, ss, starts, ll, aa),
        inputs, eps=1e-6, atol=1e-6,
    )


def test_extension_lookup_is_lazy_and_cached(monkeypatch, tmp_path):
    imports = []

    def fake_import(name):
        imports.append(name)
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(msda_mod, "_ext_state", {})
    monkeypatch.setattr(msda_mod, "_SOURCE_DIR", tmp_path)  # no in-place build there
    monkeypatch.setattr(msda_mod.importlib, "import_module", fake_import)
    assert imports == []  # nothing imported before the first question
    assert cuda_op_available() is False and ops.cuda_op_available() is False
    assert imports == ["m2fsim_msda"]  # asked once, answer cached
    assert "m2fsim_msda" in str(msda_mod._ext_state["error"])

    module = types.ModuleType("m2fsim_msda")
    monkeypatch.setattr(msda_mod, "_ext_state", {})
    monkeypatch.setattr(msda_mod.importlib, "import_module", lambda name: module)
    assert cuda_op_available() is True and msda_mod._load_ext() is module
