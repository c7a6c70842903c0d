"""Multi-scale deformable attention (MSDA): the sampling core of the pixel decoder.

``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights, impl="auto")`` chooses an implementation:

- ``impl="auto"`` (config key ``MODEL.SEM_SEG_HEAD.MSDA_IMPL``): the compiled CUDA op
  (extension ``m2fsim_msda`` from third_party/MSDeformAttn) for CUDA tensors when it
  imports, the pure-torch reference ``ms_deform_attn_torch`` otherwise (CPU always works);
- ``impl="torch"``: always the reference;
- ``impl="cuda"``: the compiled op, or an error that says how to build it.

The environment variable ``MASK2FORMER_SIM_MSDA=torch`` forces the reference whatever
``impl`` says (``auto`` or unset: no effect; anything else is an error).

The extension is looked up once, lazily: first as an installed module
(``pip install --no-build-isolation third_party/MSDeformAttn`` or ``tools/build_msda.sh``),
then as an in-place build in third_party/MSDeformAttn (``setup.py build_ext --inplace``).

Dtypes with the CUDA op: ``value`` may be float64, float32, float16 or bfloat16 and the
output has value's dtype. Locations and weights are used in value's accumulation dtype,
float64 for float64 value and float32 otherwise (they are cast when needed; fp16/bf16
locations would cost up to half a pixel on a 128-wide map); all sums run in that dtype.
The op is an autocast ``custom_fwd`` that keeps the input dtypes, so under autocast a
half/bf16 ``value`` stays half/bf16 (no fp32 round trip). Gradients come back in each
input's own dtype.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["ms_deform_attn", "ms_deform_attn_torch", "cuda_op_available", "ENV_VAR", "EXT_NAME"]

ENV_VAR = "MASK2FORMER_SIM_MSDA"
EXT_NAME = "m2fsim_msda"
_IMPLS = ("auto", "torch", "cuda")
_SOURCE_DIR = Path(__file__).resolve().parents[3] / "third_party" / "MSDeformAttn"
_BUILD_HINT = (
    "build it with `tools/build_msda.sh` (needs nvcc and a CUDA build of torch; here "
    "CUDA_HOME=/usr/local/cuda FORCE_CUDA=1), or "
    "`pip install --no-build-isolation third_party/MSDeformAttn`"
)

_ext_state: dict[str, Any] = {}


def _load_ext() -> Optional[ModuleType]:
    """The compiled extension, or None; looked up on the first call only."""
    if "module" in _ext_state:
        return _ext_state["module"]
    module: Optional[ModuleType] = None
    error: Optional[BaseException] = None
    try:
        module = importlib.import_module(EXT_NAME)
    except ImportError as exc:
        error = exc
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = _SOURCE_DIR / (EXT_NAME + suffix)
            if not path.is_file():
                continue
            try:
                spec = importlib.util.spec_from_file_location(EXT_NAME, path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                error = None
            except (ImportError, OSError) as exc2:
                module, error = None, exc2
            break
    _ext_state["module"] = module
    _ext_state["error"] = error
    return module


def cuda_op_available() -> bool:
    """True when the compiled extension ``m2fsim_msda`` imports (it still needs CUDA tensors)."""
    return _load_ext() is not None


def _check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Shape / dtype / device checks shared by both implementations (no device sync)."""
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, heads, dim), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (N, Lq, heads, levels, points, 2), got shape "
            f"{tuple(sampling_locations.shape)}"
        )
    n, _, m, _ = value.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} disagrees with value "
            f"{tuple(value.shape)} on batch (dim 0) or heads (dim 2)"
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:5]):
        raise ValueError(
            f"attention_weights must be (N, Lq, heads, levels, points) = "
            f"{tuple(sampling_locations.shape[:5])}, got {tuple(attention_weights.shape)}"
        )
    levels = sampling_locations.shape[3]
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(f"spatial_shapes must be (levels={levels}, 2), got {tuple(spatial_shapes.shape)}")
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"level_start_index must be (levels={levels},), got {tuple(level_start_index.shape)}"
        )
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}")
    if spatial_shapes.device.type == "cpu":  # on the GPU this would synchronise
        covered = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()) if levels else 0
        if covered != value.shape[1]:
            raise ValueError(
                f"spatial_shapes {spatial_shapes.tolist()} cover {covered} positions but value "
                f"has S = {value.shape[1]}"
            )


def ms_deform_attn_torch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure-torch reference (bilinear sampling with grid_sample, zeros outside).

    value: (N, S, M, D) with S = sum_l H_l * W_l, levels flattened row-major in order.
    spatial_shapes: (L, 2) long, (H_l, W_l). level_start_index: (L,) long (unused here
    beyond consistency; kept for the CUDA signature).
    sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1] per level.
    attention_weights: (N, Lq, M, L, P).
    Returns (N, Lq, M * D) in value's dtype. Levels are accumulated one at a time, so the
    peak extra memory is one level's samples rather than all of them stacked.
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != s:
        raise ValueError(f"spatial_shapes {shapes} cover {sum(sizes)} positions but value has S = {s}")
    value_list = value.split(sizes, dim=1)
    # grid_sample works on [-1, 1] with align_corners=False: pixel centres at (i + 0.5) / W
    # (N, Lq, M, L, P, 2) -> L x (N*M, Lq, P, 2); unbind keeps the backward a single stack
    grids = (2 * sampling_locations - 1).to(value.dtype).transpose(1, 2).flatten(0, 1).unbind(2)
    # (N, Lq, M, L, P) -> L x (N*M, 1, Lq, P)
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(n * m, 1, lq, n_levels, n_points).unbind(3)
    out: Optional[torch.Tensor] = None
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        sampled = F.grid_sample(v, grids[lvl], mode="bilinear", padding_mode="zeros", align_corners=False)
        # (N*M, D, Lq, P) weighted by (N*M, 1, Lq, P), summed over points
        part = (sampled * weights[lvl]).sum(-1)
        out = part if out is None else out + part
    if out is None:  # no levels
        return value.new_zeros(n, lq, m * d)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


try:  # torch >= 2.4
    _custom_fwd = torch.amp.custom_fwd(device_type="cuda")
    _custom_bwd = torch.amp.custom_bwd(device_type="cuda")
except AttributeError:  # pragma: no cover - older torch
    _custom_fwd = torch.cuda.amp.custom_fwd
    _custom_bwd = torch.cuda.amp.custom_bwd


def _compute_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Dtype of locations, weights and accumulation for a given value dtype."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled op; ``ext`` is the extension module to call."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, ext, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        if value.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"the CUDA op supports float64/float32/float16/bfloat16 value, got {value.dtype}")
        compute = _compute_dtype(value.dtype)
        value_c = value.contiguous()
        shapes = spatial_shapes.to(device=value.device, dtype=torch.long).contiguous()
        starts = level_start_index.to(device=value.device, dtype=torch.long).contiguous()
        loc = sampling_locations.to(compute).contiguous()
        attn = attention_weights.to(compute).contiguous()
        out = ext.forward(value_c, shapes, starts, loc, attn)
        ctx.ext = ext
        ctx.in_dtypes = (sampling_locations.dtype, attention_weights.dtype)
        ctx.save_for_backward(value_c, shapes, starts, loc, attn)
        return out

    @staticmethod
    @once_differentiable
    @_custom_bwd
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = ctx.ext.backward(
            grad_out.to(value.dtype).contiguous(), value, shapes, starts, loc, attn
        )
        loc_dtype, attn_dtype = ctx.in_dtypes
        return None, grad_value, None, None, grad_loc.to(loc_dtype), grad_attn.to(attn_dtype)


def _resolve_impl(impl: str) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env not in ("", "auto", "torch"):
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected 'torch' (force the reference) or 'auto'")
    return "torch" if env == "torch" else impl


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Dispatching entry point (see module docstring). ``impl``: "auto" | "torch" | "cuda".

    Shapes as in ``ms_deform_attn_torch``; returns (N, Lq, heads * dim).
    """
    impl = _resolve_impl(impl)
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if impl == "cuda":
        if not value.is_cuda:
            raise ValueError(f"impl='cuda' needs CUDA tensors, but value is on {value.device}")
        if not cuda_op_available():
            raise RuntimeError(
                f"impl='cuda' but the extension {EXT_NAME} is not importable "
                f"({_ext_state.get('error')}); {_BUILD_HINT}, or use impl='auto'/'torch'"
            )
    use_op = impl == "cuda" or (impl == "auto" and value.is_cuda and cuda_op_available())
    if use_op:
        return _MSDeformAttnFunction.apply(
            _load_ext(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_torch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
