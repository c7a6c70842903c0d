#!/usr/bin/env python
"""Time multi-scale deformable attention: the compiled op against the torch reference.

Default sizes are Mask2Former's pixel decoder on COCO with LSJ 1024 crops: batch 2,
levels 128x128, 64x64, 32x32 (strides 8/16/32), 8 heads x 32 channels, 4 points, and one
query per encoder token (21,504). Forward (no grad) and forward+backward are timed in fp32
and bf16 (value in the dtype; locations and softmax weights fp32, as under autocast), with
the peak memory above the inputs. Prints a markdown table.

    python tools/benchmark_msda.py                      # CUDA, COCO sizes
    python tools/benchmark_msda.py --device cpu --small # smoke check without a GPU

On CPU the op row runs the extension's host code (when it is built); its CUDA kernels need
CUDA tensors.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mask2former_sim  # noqa: E402,F401  (compat shim before detectron2)
import torch  # noqa: E402

from mask2former_sim.modeling.ops import ms_deform_attn_torch  # noqa: E402

msda = importlib.import_module("mask2former_sim.modeling.ops.ms_deform_attn")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
COCO = dict(batch=2, levels=[(128, 128), (64, 64), (32, 32)], heads=8, dim=32, points=4)
SMALL = dict(batch=1, levels=[(16, 16), (8, 8), (4, 4)], heads=8, dim=32, points=4)


def make_inputs(cfg: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(cfg["levels"], dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, s, m, d, p, lv = cfg["batch"], int(sizes.sum()), cfg["heads"], cfg["dim"], cfg["points"], len(cfg["levels"])
    lq = s  # one query per encoder token
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(n, s, m, d, generator=gen).to(device, dtype)
    loc = torch.rand(n, lq, m, lv, p, 2, generator=gen).to(device, cdt)
    attn = torch.randn(n, lq, m, lv * p, generator=gen).softmax(-1).view(n, lq, m, lv, p).to(device, cdt)
    return value, shapes.to(device), starts.to(device), loc, attn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of one call in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], None], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call above what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def bench(op: Callable, inputs, device: torch.device, iters: int, warmup: int) -> dict:
    value, shapes, starts, loc, attn = inputs

    def forward():
        with torch.no_grad():
            op(value, shapes, starts, loc, attn)

    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    with torch.no_grad():
        grad_out = torch.randn_like(op(value, shapes, starts, loc, attn))

    def forward_backward():
        for t in leaves:
            t.grad = None
        op(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad_out)

    row = {
        "fwd": time_ms(forward, device, iters, warmup),
        "fwd_bwd": time_ms(forward_backward, device, iters, warmup),
        "fwd_mem": peak_mib(forward, device),
        "fwd_bwd_mem": peak_mib(forward_backward, device),
    }
    for t in leaves:
        t.grad = None
    return row


def fmt(x: Optional[float], digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes (smoke check)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {sorted(DTYPES)}")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 CUDA, 1 CPU)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False (use --device cpu --small)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    iters = args.iters or (20 if device.type == "cuda" else 3)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    cfg = SMALL if args.small else COCO

    ext = msda._load_ext()
    op_name = "m2fsim_msda" if device.type == "cuda" else "m2fsim_msda (host code)"
    why_no_op = None if ext is not None else f"not built ({msda._ext_state.get('error')})"

    def op(value, shapes, starts, loc, attn):
        return msda._MSDeformAttnFunction.apply(ext, value, shapes, starts, loc, attn)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    s = sum(h * w for h, w in cfg["levels"])
    print(
        f"MSDeformAttn benchmark on {dev_name}, torch {torch.__version__}: batch {cfg['batch']}, "
        f"levels {' '.join(f'{h}x{w}' for h, w in cfg['levels'])}, {cfg['heads']} heads x {cfg['dim']} ch, "
        f"{cfg['points']} points, {s} queries; median of {iters} calls; memory = peak above inputs.\n"
    )
    print("| dtype | implementation | forward ms | fwd+bwd ms | forward MiB | fwd+bwd MiB "
          "| speed-up fwd | speed-up fwd+bwd | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in dtypes:
        dtype = DTYPES[name]
        inputs = make_inputs(cfg, dtype, device)
        ref_row = bench(ms_deform_attn_torch, inputs, device, iters, warmup)
        print(f"| {name} | torch reference | {fmt(ref_row['fwd'])} | {fmt(ref_row['fwd_bwd'])} | "
              f"{fmt(ref_row['fwd_mem'], 1)} | {fmt(ref_row['fwd_bwd_mem'], 1)} | 1.00 | 1.00 | |")
        if why_no_op:
            print(f"| {name} | {op_name} | {why_no_op} | | | | | | |")
            continue
        row = bench(op, inputs, device, iters, warmup)
        with torch.no_grad():
            got = op(*inputs).double()
            want = ms_deform_attn_torch(inputs[0].double(), *inputs[1:]).double()
        diff = ((got - want).abs().max() / want.abs().max()).item()
        print(f"| {name} | {op_name} | {fmt(row['fwd'])} | {fmt(row['fwd_bwd'])} | {fmt(row['fwd_mem'], 1)} | "
              f"{fmt(row['fwd_bwd_mem'], 1)} | {ref_row['fwd'] / row['fwd']:.2f} | "
              f"{ref_row['fwd_bwd'] / row['fwd_bwd']:.2f} | {diff:.1e} |")
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
