#!/usr/bin/env python
"""Seconds per training step and peak memory of box-only and SIM Mask2Former, AMP off and on.

    python tools/benchmark_train_step.py                         # CUDA: R50, LSJ 1024², batch 2, 20 steps
    python tools/benchmark_train_step.py --device cpu --tiny     # smoke check: R18, 128², 2 steps
    python tools/benchmark_train_step.py --configs A.yaml --amp bf16 --steps 50 [KEY VALUE ...]

Each (config, AMP) pair runs in its own subprocess, so that its peak memory is its own: the
model is built from the config with random weights (MODEL.WEIGHTS "", no backbone
pretraining, no dataset read; SIM's pseudo-mask loss on from the first step), then
``--warmup-steps`` untimed and ``--steps`` timed training steps run on synthetic batches of
``--batch`` images of ``--image-size``² (smooth random colours, ``--boxes`` random GT boxes
each), already in the shape the LSJ mapper emits. A step is the whole training step of
tools/benchmark_sim_cost.py's ``training_step``: forward, criterion (with SIM: teacher forward,
pseudo labels, prototype update), backward, full-model clipping + AdamW step, teacher EMA.
``--amp bf16`` runs forward and criterion under ``torch.autocast(dtype=torch.bfloat16)``
(no grad scaler needed; the trainer's SOLVER.AMP.ENABLED is detectron2's fp16 AMPTrainer).
s/iter is the mean over the timed steps (CUDA synchronised around each step); peak memory is
torch.cuda.max_memory_allocated over warm-up and timed steps on CUDA, the subprocess's max
RSS on the CPU. Prints a markdown table (``--markdown PATH`` also writes it there).
"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

DEFAULT_CONFIGS = [
    "configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml",
    "configs/coco/instance-segmentation/sim_R50_bs16_50ep.yaml",
]
AMP_CHOICES = ("off", "bf16")
# --tiny: a model small enough for a 2-core CPU in seconds (overrides come before the user's)
TINY_OPTS = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.SEM_SEG_HEAD.DIM_FEEDFORWARD", "256",
    "MODEL.MASK_FORMER.DEC_LAYERS", "4", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "256", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
]
TINY = {"image_size": 128, "boxes": 4, "steps": 2, "warmup_steps": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configs to time")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="off,bf16", help=f"comma list of {', '.join(AMP_CHOICES)} (default both)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2, one GPU of the bs16 recipe)")
    p.add_argument("--image-size", type=int, default=None, help="square image side (default 1024; --tiny 128)")
    p.add_argument("--boxes", type=int, default=None, help="GT boxes per image (default 20; --tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny 2)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    p.add_argument("--tiny", action="store_true", help="R18, 1 encoder layer, 8 queries, 128 px: a smoke check")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of each subprocess (0: torch's default)")
    p.add_argument("--markdown", default="", help="also write the table to this file")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (every config)")
    args = p.parse_args(argv)
    for name, tiny_value, default in (("image_size", TINY["image_size"], 1024), ("boxes", TINY["boxes"], 20),
                                      ("steps", TINY["steps"], 20), ("warmup_steps", TINY["warmup_steps"], 3)):
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if args.tiny else default)
    args.amp = [a.strip() for a in args.amp.split(",") if a.strip()]
    if not args.amp or any(a not in AMP_CHOICES for a in args.amp):
        p.error(f"--amp: comma list of {', '.join(AMP_CHOICES)}, got {','.join(args.amp) or 'nothing'}")
    if args.steps < 1 or args.warmup_steps < 0 or args.batch < 1 or args.boxes < 1 or args.image_size < 32:
        p.error("--steps, --batch, --boxes must be >= 1, --warmup-steps >= 0, --image-size >= 32")
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        p.error(f"--device: cuda or cpu, got {args.device}")
    return args


def synthetic_batches(count: int, batch: int, image_size: int, boxes: int, num_classes: int, seed: int = 0):
    """``count`` training batches as the box-only LSJ mapper emits them: uint8 CHW images (random
    colours, smooth over 16 px), an all-true valid mask, ``boxes`` random XYXY GT boxes per image
    (3 % to 40 % of the side) with random classes; no masks."""
    import torch
    import torch.nn.functional as F
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    s = image_size
    out = []
    for _ in range(count):
        records = []
        for _ in range(batch):
            coarse = torch.rand(1, 3, max(2, s // 16), max(2, s // 16), generator=g) * 255
            image = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)[0]
            wh = (0.03 + 0.37 * torch.rand(boxes, 2, generator=g)) * s
            xy = torch.rand(boxes, 2, generator=g) * (s - wh)
            inst = Instances((s, s))
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            inst.gt_classes = torch.randint(0, num_classes, (boxes,), generator=g)
            records.append({"image": image.round().to(torch.uint8), "valid_mask": torch.ones(s, s, dtype=torch.bool),
                            "instances": inst, "height": s, "width": s})
        out.append(records)
    return out


def describe(cfg) -> str:
    """'box-only R50' / 'SIM R50' / 'full masks R50' (Swin: the timm name)."""
    if cfg.MODEL.SIM.ENABLED:
        kind = "SIM"
    elif cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION:
        kind = "full masks"
    else:
        kind = "box-only"
    if "resnet" in cfg.MODEL.BACKBONE.NAME:
        return f"{kind} R{cfg.MODEL.RESNETS.DEPTH}"
    return f"{kind} {cfg.MODEL.SWIN.TIMM_NAME}"


def worker(config: str, amp: str, args) -> dict:
    """Build one config, run its steps, return the timings (runs in the subprocess)."""
    import torch

    import mask2former_sim  # noqa: F401  (compat shim before detectron2)
    from mask2former_sim.engine.setup import build_cfg
    from mask2former_sim.modeling.ops import cuda_op_available

    from benchmark_sim_cost import build_training_parts, training_step

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    opts = (["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", "MODEL.BACKBONE_PRETRAIN.ENABLED", "False",
             "MODEL.SIM.WARMUP_ITERS", "0", "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS", "0"]
            + (TINY_OPTS if args.tiny else []) + list(args.opts))
    cfg = build_cfg(config if os.path.isabs(config) else os.path.join(ROOT, config), opts)
    model, optimizer = build_training_parts(cfg)
    batches = synthetic_batches(args.warmup_steps + args.steps, args.batch, args.image_size, args.boxes,
                                cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if amp == "bf16" else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i, batch in enumerate(batches):
        sync()
        t = time.perf_counter()
        loss = training_step(model, optimizer, batch, i, autocast=autocast)
        sync()
        if i >= args.warmup_steps:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "max RSS"
    return {
        "config": config,
        "name": describe(cfg),
        "amp": amp,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "msda": "CUDA op" if device.type == "cuda" and cuda_op_available() else "torch reference",
        "params": sum(p.numel() for p in model.parameters()),
        "s_per_iter": statistics.mean(times),
        "s_per_iter_median": statistics.median(times),
        "peak_mib": peak,
        "peak_kind": peak_kind,
        "losses": losses,
        "finite": all(math.isfinite(v) for v in losses),
    }


def table(results, args) -> str:
    first = results[0]
    lines = [
        f"Training step on {first['device']} (torch {first['torch']}, MSDeformAttn: {first['msda']}): batch "
        f"{args.batch} x {args.image_size}² synthetic images, {args.boxes} boxes each, random init; mean of "
        f"{args.steps} steps after {args.warmup_steps} warm-up; AMP bf16 = torch.autocast(bfloat16).",
        "",
        f"| config | AMP | s/iter | peak memory (MiB, {first['peak_kind']}) |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} ({os.path.basename(r['config'])}) | {r['amp']} | {r['s_per_iter']:.3f} | "
                     f"{r['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.amp[0], args)), flush=True)
        return 0
    results = []
    for config in args.configs:
        for amp in args.amp:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--amp", amp, "--device", args.device,
                   "--batch", str(args.batch), "--image-size", str(args.image_size), "--boxes", str(args.boxes),
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads)]
            cmd += ["--tiny"] if args.tiny else []
            t = time.perf_counter()
            p = subprocess.run(cmd + list(args.opts), cwd=ROOT, capture_output=True, text=True)
            found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not found:
                sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
                print(f"benchmark of {config} with AMP {amp} failed (exit {p.returncode})", file=sys.stderr)
                return 1
            r = json.loads(found[-1][len("RESULT "):])
            results.append(r)
            print(f"{r['name']} AMP {amp}: {r['s_per_iter']:.3f} s/iter (median {r['s_per_iter_median']:.3f}), "
                  f"peak {r['peak_mib']:.0f} MiB ({r['peak_kind']}), {r['params']:,} parameters, losses "
                  f"{' '.join(f'{v:.3f}' for v in r['losses'])}; {time.perf_counter() - t:.0f} s in all", flush=True)
            if not r["finite"]:
                print(f"non-finite loss in {config} with AMP {amp}", file=sys.stderr)
                return 1
    text = table(results, args)
    print()
    print(text, end="")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
