"""The compiled op (third_party/MSDeformAttn).

- ``compile``: builds the extension with its setup.py into a temporary folder (needs nvcc
  and a CUDA build of torch, no GPU), then checks the extension's host implementation,
  which runs the kernels' sampling code, against the torch reference.
- ``gpu``: the CUDA kernels against the fp64 reference, fp64 gradcheck, fully written
  outputs, dispatch and autocast (skipped without a CUDA device).
"""
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mask2former_sim  # noqa: F401  (compat shim before detectron2)
import pytest
import torch

from mask2former_sim.modeling.ops import ms_deform_attn, ms_deform_attn_torch

msda_mod = importlib.import_module("mask2former_sim.modeling.ops.ms_deform_attn")
SOURCE_DIR = Path(__file__).resolve().parents[1] / "third_party" / "MSDeformAttn"
HAS_GPU = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")


def _cuda_home():
    """A CUDA toolkit root with nvcc and headers (nvcc on PATH may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def _compile_blocker():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if _cuda_home() is None:
        return "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)"
    return None


@pytest.fixture(scope="session")
def built_ext(tmp_path_factory):
    """Compile with setup.py build_ext into a temporary folder; returns (so path, module)."""
    reason = _compile_blocker()
    if reason:
        pytest.skip(f"cannot compile the CUDA op: {reason}")
    out = tmp_path_factory.mktemp("msda_build")
    env = dict(os.environ, CUDA_HOME=_cuda_home(), FORCE_CUDA="1")
    env.setdefault("MAX_JOBS", "2")
    if not HAS_GPU and not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = "8.0"  # one arch keeps the CI build to a couple of minutes
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"),
           "--build-temp", str(out / "tmp")]
    proc = subprocess.run(cmd, cwd=SOURCE_DIR, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        pytest.fail(f"building the extension failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
    found = [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in (out / "lib").glob("m2fsim_msda" + s)]
    assert found, f"no m2fsim_msda extension in {out / 'lib'}: {sorted(os.listdir(out / 'lib'))}"
    spec = importlib.util.spec_from_file_location("m2fsim_msda", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return found[0], module


@pytest.fixture(scope="session")
def gpu_ext(request):
    """The op to test on the GPU: a fresh build of the sources, else an installed one."""
    if not HAS_GPU:
        pytest.skip("needs a CUDA device")
    try:
        return request.getfixturevalue("built_ext")[1]
    except pytest.skip.Exception:
        if msda_mod.cuda_op_available():
            return msda_mod._load_ext()
        raise


def make_inputs(shapes, n=2, m=3, d=4, lq=5, p=2, seed=0, dtype=torch.float64, device="cpu", lo=-0.3, hi=1.3):
    gen = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(n, lq, m, len(shapes), p, 2, generator=gen, dtype=torch.float64)
    attn = torch.rand(n, lq, m, len(shapes), p, generator=gen, dtype=torch.float64)
    loc = keep_off_pixel_edges(loc, ss)
    return tuple(t.to(device) for t in (value.to(dtype), ss, starts, loc, attn))


def keep_off_pixel_edges(loc, ss, margin=1e-3):
    """Move locations whose pixel coordinate is within `margin` of an integer (where the
    location gradient jumps) by 2 * margin pixels, so fp32 rounding or a finite-difference
    step cannot cross a pixel edge; the result is exactly representable in fp32."""
    size = ss.flip(1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)  # (W, H) per level, as (x, y)
    pix = loc * size - 0.5
    frac = pix - pix.floor()
    near = (frac < margin) | (frac > 1 - margin)
    return torch.where(near, (pix + 2 * margin + 0.5) / size, loc).float().double()


def random_case(seed):
    """Random sizes: odd maps, 1-3 levels, channels around and beyond a warp."""
    gen = torch.Generator().manual_seed(1000 + seed)
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    shapes = [[ri(1, 13), ri(1, 13)] for _ in range(ri(1, 3))]
    d = [1, 3, 8, 24, 32, 40, 64, 96][seed % 8]
    return dict(shapes=shapes, n=ri(1, 3), m=ri(1, 4), d=d, lq=ri(1, 40), p=ri(1, 4), seed=seed)


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def ref_grads(value, ss, starts, loc, attn, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_torch(leaves[0], ss, starts, leaves[1], leaves[2])
    return out.detach(), torch.autograd.grad(out, leaves, grad_out.double())


# ---------------------------------------------------------------- compile (CI, no GPU needed)


@pytest.mark.compile
def test_extension_compiles(built_ext):
    path, module = built_ext
    assert path.is_file() and path.stat().st_size > 0
    assert callable(module.forward) and callable(module.backward)


@pytest.mark.compile
def test_dispatcher_finds_an_in_place_build(built_ext, monkeypatch, tmp_path):
    path = built_ext[0]
    shutil.copy(path, tmp_path / path.name)  # as `setup.py build_ext --inplace` leaves it

    def not_installed(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(msda_mod, "_ext_state", {})
    monkeypatch.setattr(msda_mod, "_SOURCE_DIR", tmp_path)
    monkeypatch.setattr(msda_mod.importlib, "import_module", not_installed)
    assert msda_mod.cuda_op_available() and msda_mod._ext_state["error"] is None
    # (a process loads one m2fsim_msda module object: __spec__ tells which file was asked for)
    assert msda_mod._load_ext().__spec__.origin == str(tmp_path / path.name)


@pytest.mark.compile
@pytest.mark.parametrize("seed", range(4))
def test_host_path_matches_reference(built_ext, seed):
    """Forward and all three gradients of the compiled sampling code equal the reference."""
    ext = built_ext[1]
    value, ss, starts, loc, attn = make_inputs(**random_case(seed))
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=torch.float64)
    ref, (g_value, g_loc, g_attn) = ref_grads(value, ss, starts, loc, attn, grad_out)
    torch.testing.assert_close(ext.forward(value, ss, starts, loc, attn), ref, rtol=0, atol=1e-12)
    got = ext.backward(grad_out, value, ss, starts, loc, attn)
    for name, a, b in zip(("value", "loc", "attn"), got, (g_value, g_loc, g_attn)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad {name}")


@pytest.mark.compile
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_host_path_reduced_precision(built_ext, dtype, tol):
    ext = built_ext[1]
    value, ss, starts, loc, attn = make_inputs([[9, 7], [4, 5], [2, 3]], n=2, m=2, d=8, lq=30, p=4, seed=7)
    value = value.to(dtype)
    out = ext.forward(value, ss, starts, loc.float(), attn.float())
    assert out.dtype == dtype
    assert rel_err(out, ms_deform_attn_torch(value.double(), ss, starts, loc, attn)) < tol
    grads = ext.backward(torch.ones_like(out), value, ss, starts, loc.float(), attn.float())
    assert [g.dtype for g in grads] == [dtype, torch.float32, torch.float32]


@pytest.mark.compile
def test_host_path_gradcheck_through_autograd_wrapper(built_ext):
    ext = built_ext[1]
    value, ss, starts, loc, attn = make_inputs([[3, 4], [2, 1]], n=1, m=2, d=3, lq=3, p=2, seed=11)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: msda_mod._MSDeformAttnFunction.apply(ext, v, ss, starts, l, a), inputs, eps=1e-6, atol=1e-6
    )


@pytest.mark.compile
def test_extension_rejects_bad_input(built_ext):
    ext = built_ext[1]
    value, ss, starts, loc, attn = make_inputs([[3, 5], [2, 2]], seed=4, dtype=torch.float32)
    loc, attn = loc.float(), attn.float()
    cases = [
        ((value, ss, starts, loc.half(), attn), "sampling_locations and attention_weights must be Float"),
        ((value, ss, starts, loc.double(), attn.double()), "must be Float"),
        ((value.transpose(0, 1).contiguous().transpose(0, 1), ss, starts, loc, attn), "value must be contiguous"),
        ((value, ss.int(), starts, loc, attn), "must be int64"),
        ((value, ss + 1, torch.tensor([0, 24]), loc, attn), "cover 33 positions but value has S = 19"),
        ((value, ss, starts + 1, loc, attn), r"level_start_index\[0\] = 1, expected 0"),
        ((value[:, :, :2], ss, starts, loc, attn), "batch or heads"),
        ((value.int(), ss, starts, loc, attn), "value must be float64, float32, float16 or bfloat16"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            ext.forward(*args)
    out = ext.forward(value, ss, starts, loc, attn)
    with pytest.raises(RuntimeError, match="grad_output must be"):
        ext.backward(out.double(), value, ss, starts, loc, attn)
    with pytest.raises(RuntimeError, match="out must be"):
        ext.forward(value, ss, starts, loc, attn, out=torch.empty(1))


# ---------------------------------------------------------------- GPU


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(8))
def test_gpu_forward_matches_fp64_reference(gpu_ext, seed):
    value, ss, starts, loc, attn = make_inputs(**random_case(seed), device="cuda")
    ref = ms_deform_attn_torch(value, ss, starts, loc, attn)
    assert rel_err(gpu_ext.forward(value, ss, starts, loc, attn), ref) < 1e-12
    out32 = gpu_ext.forward(value.float(), ss, starts, loc.float(), attn.float())
    assert out32.dtype == torch.float32 and rel_err(out32, ref) < 1e-5
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        low = value.to(dtype)  # reference on the same rounded values: the error is the op's own
        out = gpu_ext.forward(low, ss, starts, loc.float(), attn.float())
        assert out.dtype == dtype
        assert rel_err(out, ms_deform_attn_torch(low.double(), ss, starts, loc, attn)) < tol, dtype


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(8))
def test_gpu_backward_matches_fp64_reference(gpu_ext, seed):
    value, ss, starts, loc, attn = make_inputs(**random_case(seed), device="cuda")
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           dtype=torch.float64, device="cuda")
    _, want = ref_grads(value, ss, starts, loc, attn, grad_out)
    got64 = gpu_ext.backward(grad_out, value, ss, starts, loc, attn)
    got32 = gpu_ext.backward(grad_out.float(), value.float(), ss, starts, loc.float(), attn.float())
    for name, g64, g32, w in zip(("value", "loc", "attn"), got64, got32, want):
        assert rel_err(g64, w) < 1e-10, name
        assert g32.dtype == torch.float32 and rel_err(g32, w) < 1e-4, name
    low = value.bfloat16()
    _, want_low = ref_grads(low, ss, starts, loc, attn, grad_out.bfloat16())
    got_low = gpu_ext.backward(grad_out.bfloat16(), low, ss, starts, loc.float(), attn.float())
    assert [g.dtype for g in got_low] == [torch.bfloat16, torch.float32, torch.float32]
    for name, g, w in zip(("value", "loc", "attn"), got_low, want_low):
        assert rel_err(g, w) < 2e-2, name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("d", [3, 32, 40])  # one partial warp, one full warp, a group over two warps
def test_gpu_gradcheck_fp64(gpu_ext, d):
    value, ss, starts, loc, attn = make_inputs([[4, 5], [3, 2], [1, 1]], n=2, m=2, d=d, lq=3, p=2,
                                               seed=d, device="cuda")
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: msda_mod._MSDeformAttnFunction.apply(gpu_ext, v, ss, starts, l, a),
        inputs, eps=1e-6, atol=1e-6, nondet_tol=1e-10,  # atomics: summation order varies
    )


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gpu_writes_every_output_element(gpu_ext, dtype):
    value, ss, starts, loc, attn = make_inputs([[13, 11], [7, 6], [3, 3]], n=2, m=3, d=24, lq=77, p=3,
                                               seed=5, device="cuda")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    value, loc, attn = value.to(dtype), loc.to(cdt), attn.to(cdt)
    out = torch.full((2, 77, 72), float("nan"), dtype=dtype, device="cuda")
    gpu_ext.forward(value, ss, starts, loc, attn, out=out)
    assert torch.isfinite(out).all()
    # the allocating path too: poison the caching allocator's free blocks first
    junk = torch.full((1 << 22,), float("nan"), dtype=dtype, device="cuda")
    del junk
    fresh = gpu_ext.forward(value, ss, starts, loc, attn)
    assert torch.isfinite(fresh).all() and torch.equal(fresh, out)


@gpu
@pytest.mark.gpu
def test_gpu_empty_queries(gpu_ext):
    value, ss, starts, loc, attn = make_inputs([[3, 3]], lq=0, device="cuda")
    out = gpu_ext.forward(value, ss, starts, loc, attn)
    assert out.shape == (2, 0, 12)
    grads = gpu_ext.backward(out, value, ss, starts, loc, attn)
    assert float(grads[0].abs().sum()) == 0.0 and grads[1].shape == loc.shape


@gpu
@pytest.mark.gpu
def test_gpu_dispatch(gpu_ext, monkeypatch):
    calls = []

    class Counting:
        def forward(self, *args, **kwargs):
            calls.append("forward")
            return gpu_ext.forward(*args, **kwargs)

        def backward(self, *args):
            calls.append("backward")
            return gpu_ext.backward(*args)

    monkeypatch.setattr(msda_mod, "_ext_state", {"module": Counting(), "error": None})
    monkeypatch.delenv(msda_mod.ENV_VAR, raising=False)
    value, ss, starts, loc, attn = make_inputs([[6, 5], [3, 3]], seed=9, dtype=torch.float32, device="cuda")
    loc, attn = loc.float(), attn.float()
    ref = ms_deform_attn_torch(value, ss, starts, loc, attn)
    value.requires_grad_()
    out = ms_deform_attn(value, ss, starts, loc, attn)  # auto + CUDA tensors -> the op
    out.sum().backward()
    assert calls == ["forward", "backward"] and rel_err(out.detach(), ref.double()) < 1e-5
    ms_deform_attn(value, ss, starts, loc, attn, impl="torch")
    monkeypatch.setenv(msda_mod.ENV_VAR, "torch")
    ms_deform_attn(value, ss, starts, loc, attn, impl="cuda")
    assert calls == ["forward", "backward"]  # neither call reached the op
    monkeypatch.delenv(msda_mod.ENV_VAR)
    monkeypatch.setattr(msda_mod, "_ext_state", {"module": None, "error": ImportError("gone")})
    with pytest.raises(RuntimeError, match="build_msda.sh"):
        ms_deform_attn(value, ss, starts, loc, attn, impl="cuda")
    torch.testing.assert_close(ms_deform_attn(value, ss, starts, loc, attn), ref)  # auto falls back


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autocast_keeps_reduced_precision(gpu_ext, monkeypatch, dtype):
    """As in the pixel decoder: Linear value projection and softmax weights under autocast."""
    monkeypatch.setattr(msda_mod, "_ext_state", {"module": gpu_ext, "error": None})
    monkeypatch.delenv(msda_mod.ENV_VAR, raising=False)
    torch.manual_seed(0)
    shapes = [[16, 16], [8, 8], [4, 4]]
    ss = torch.tensor(shapes, device="cuda")
    starts = torch.tensor([0, 256, 320], device="cuda")
    n, s, m, d, lq, p = 2, 336, 8, 32, 336, 4
    proj = torch.nn.Linear(m * d, m * d).cuda()
    feats = torch.randn(n, s, m * d, device="cuda")
    logits = torch.randn(n, lq, m, 3 * p, device="cuda", requires_grad=True)
    loc = torch.rand(n, lq, m, 3, p, 2, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        value = proj(feats).view(n, s, m, d)
        attn = logits.softmax(-1).view(n, lq, m, 3, p)
        assert value.dtype == dtype and attn.dtype == torch.float32
        out = ms_deform_attn(value, ss, starts, loc, attn, impl="cuda")
        assert out.dtype == dtype  # no fp32 round trip
        loss = out.float().square().mean()
    loss.backward()
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert loc.grad.dtype == torch.float32 and torch.isfinite(loc.grad).all()
    assert logits.grad.dtype == torch.float32 and torch.isfinite(logits.grad).all()
    ref = ms_deform_attn_torch(value.detach().double(), ss, starts, loc.detach().double(), attn.detach().double())
    assert rel_err(out.detach(), ref) < 1e-2
