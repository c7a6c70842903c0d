#!/usr/bin/env python
"""Peak memory and time of the decoder heads + criterion at COCO (LSJ 1024) shapes, on the CPU.

    .venv/bin/python tools/benchmark_step_memory.py [--gts 20 100] [--modes boxonly sim] [--amp] \
        [--size 1024] [--batch 2] [--out output/step_memory.md]

What runs, per (mode, GTs per image), each in its own subprocess: the transformer decoder of
the COCO R50 config (100 queries, 10 predictions) on random multi-scale features and random
``mask_features`` of a ``--size`` input (256 x 256 mask grid at 1024), then the criterion
(box-only: CE + projection + pairwise; SIM: the same plus the pseudo-mask loss, with a copy
of the decoder as the teacher) on random boxes, then backward. The backbone and the pixel
decoder are left out: they do not depend on the number of GTs, and their memory is the
same before and after the changes measured here.

Peak memory is what the torch profiler saw allocated on the CPU during forward + backward
(``profile_memory=True``: the running sum of allocation and free events, maximum over the
step), above the inputs that exist before it. Time is the median of ``--repeats`` steps run
without the profiler. With ``--amp`` the step runs under ``torch.autocast("cpu", bfloat16)``
and ``mask_features`` is bf16, as the pixel decoder gives it under AMP. A case that runs out
of memory (the subprocess is killed) is reported as such. Prints a markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = {
    "boxonly": "configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml",
    "sim": "configs/coco/instance-segmentation/sim_R50_bs16_50ep.yaml",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["boxonly", "sim"], choices=sorted(CONFIGS))
    p.add_argument("--gts", nargs="+", type=int, default=[20, 100], help="GT boxes per image")
    p.add_argument("--size", type=int, default=1024, help="padded input side (LSJ: 1024)")
    p.add_argument("--batch", type=int, default=2, help="images per process")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, bf16 mask_features")
    p.add_argument("--repeats", type=int, default=2, help="timed steps (after one untimed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="also write the markdown table here")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # json of one case (internal)
    return p.parse_args(argv)


def _random_targets(torch, batch: int, gts: int, size: int, num_classes: int, gen):
    targets = []
    for _ in range(batch):
        wh = torch.empty(gts, 2).uniform_(0.02, 0.4, generator=gen) * size
        xy = torch.rand(gts, 2, generator=gen) * (size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (gts,), generator=gen)
        targets.append({"labels": labels, "boxes": boxes})
    return targets


def _smooth_images(torch, batch: int, size: int, gen):
    """Piecewise smooth RGB in 0..255 (so colour-similar neighbours exist, as in photos)."""
    import torch.nn.functional as F

    low = torch.rand(batch, 3, max(size // 64, 2), max(size // 64, 2), generator=gen) * 255
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _peak_bytes(prof) -> int:
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def worker(case: dict) -> dict:
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    import mask2former_sim  # noqa: F401
    from detectron2.modeling import build_model

    import mask2former_sim.modeling  # noqa: F401
    from mask2former_sim.engine.setup import build_cfg

    torch.set_num_threads(case["threads"])
    opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE_PRETRAIN.ENABLED", "False", "MODEL.SIM.WARMUP_ITERS", "0",
            "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS", "0"] + case["opts"]
    cfg = build_cfg(os.path.join(ROOT, CONFIGS[case["mode"]]), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    predictor, criterion = model.predictor, model.criterion
    teacher = copy.deepcopy(predictor).eval() if criterion.needs_teacher else None
    gen = torch.Generator().manual_seed(0)
    b, s = case["batch"], case["size"]
    dtype = torch.bfloat16 if case["amp"] else torch.float32
    dim = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    mask_dim = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
    stride = cfg.MODEL.BOXSUP.MASK_STRIDE
    levels = [torch.randn(b, dim, s // r, s // r, generator=gen).to(dtype).requires_grad_() for r in (32, 16, 8)]
    mask_features = torch.randn(b, mask_dim, s // stride, s // stride, generator=gen).to(dtype).requires_grad_()
    targets = _random_targets(torch, b, case["gts"], s, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, gen)
    image_info = {"images": _smooth_images(torch, b, s, gen), "valid": torch.ones(b, s, s, dtype=torch.bool)}
    teacher_outputs = None
    if teacher is not None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["amp"]):
            teacher_outputs = teacher(levels, mask_features)
        teacher_outputs["mask_features"] = mask_features.detach()

    def forward():
        # like the model's forward: only the losses leave it, the decoder outputs are dropped
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case["amp"]):
            outputs = predictor(levels, mask_features)
            return criterion(outputs, targets, image_info, iteration=10 ** 6, teacher_outputs=teacher_outputs)

    def step():
        for t in levels + [mask_features]:
            t.grad = None
        predictor.zero_grad(set_to_none=True)
        loss = sum(forward().values())
        loss.backward()
        return float(loss)

    step()  # untimed: first-call allocations, lazy initialisation
    times = []
    for _ in range(case["repeats"]):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = step()
    return {"peak_mib": _peak_bytes(prof) / 2 ** 20, "s_per_step": statistics.median(times), "loss": loss}


def run_case(case: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(case["threads"]), MKL_NUM_THREADS=str(case["threads"]))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        killed = p.returncode < 0 or p.returncode == 137
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
        return {"error": "out of memory (killed)" if killed else f"failed (exit {p.returncode}): {tail}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    if args.size % 32:
        sys.exit(f"--size must be a multiple of 32, got {args.size}")
    lines = [f"Decoder heads + criterion, forward + backward, batch {args.batch}, input {args.size}², "
             f"{'bf16 autocast' if args.amp else 'fp32'}, {args.threads} threads", "",
             "| mode | GTs per image | peak memory (MiB) | s/step | loss |", "|---|---|---|---|---|"]
    results = []
    for mode in args.modes:
        for gts in args.gts:
            case = {"mode": mode, "gts": gts, "size": args.size, "batch": args.batch, "amp": args.amp,
                    "repeats": args.repeats, "threads": args.threads, "opts": list(args.opts)}
            r = run_case(case)
            results.append(dict(case, **r))
            if "error" in r:
                lines.append(f"| {mode} | {gts} | {r['error']} | – | – |")
            else:
                lines.append(f"| {mode} | {gts} | {r['peak_mib']:.0f} | {r['s_per_step']:.2f} | {r['loss']:.4f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    main()
