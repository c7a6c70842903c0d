#!/usr/bin/env python
"""Synthetic accuracy benchmark: each config trained and evaluated at the same budget.

    .venv/bin/python tools/benchmark_synthetic.py [--configs A.yaml B.yaml ...] [--out output/bench]
                                                  [--opts KEY VALUE ...]

Runs tools/demo_job.py once per config (a fresh process each, same iterations, batch and
seed unless overridden) and prints a markdown table: mask AP, AP50, AP75, box AP, wall time.
Configs with MODEL.BACKBONE_PRETRAIN.ENABLED first get their pretrained backbone made (with
all threads, one config at a time; configs over the same images share it), and its time is
reported beside the table: a run's budget is the pretraining plus its own wall time.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = [
    "configs/synthetic/fullsup_R18_synth.yaml",
    "configs/synthetic/boxinst_R18_synth.yaml",
]


def start_one(config: str, out_dir: str, opts, threads: int):
    cmd = [sys.executable, os.path.join(ROOT, "tools/demo_job.py"), "--config-file", config,
           "--output-dir", out_dir, "--num-overlays", "4"] + list(opts)
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = open(out_dir + ".log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env), time.time()


def pretrain_first(config: str, opts) -> dict:
    """Make (or find) the config's cached pretrained backbone, if it asks for one; its stats."""
    cmd = [sys.executable, "-m", "mask2former_sim.engine.backbone_pretrain", "--config-file", config,
           "--if-enabled"] + list(opts)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"backbone pretraining for {config} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finish_one(config: str, out_dir: str, proc, t0: float):
    rc = proc.wait()
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{config} failed (exit {rc}); see {out_dir}.log")
    with open(os.path.join(out_dir, "demo_summary.json")) as f:
        summary = json.load(f)
    return summary, wall


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--out", default=os.path.join(ROOT, "output/bench"))
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time; each gets cpu_count/jobs threads (2 on 2 cores: one thread each)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    pretrained = {config: pretrain_first(config, args.opts) for config in args.configs}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    pending = list(args.configs)
    while pending:
        wave, pending = pending[: args.jobs], pending[args.jobs:]
        started = []
        for config in wave:
            name = os.path.splitext(os.path.basename(config))[0]
            out_dir = os.path.join(args.out, name)
            started.append((config, name, out_dir) + start_one(config, out_dir, args.opts, threads))
        for config, name, out_dir, proc, t0 in started:
            summary, wall = finish_one(config, out_dir, proc, t0)
            segm, bbox = summary["results"].get("segm", {}), summary["results"].get("bbox", {})
            rows.append((name, summary["iterations"], summary["images_per_batch"], segm, bbox, wall))
            print(f"done {name}: mask AP {segm.get('AP', float('nan')):.1f} in {wall:.0f} s", flush=True)

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{args.jobs} run(s) at a time ({threads or 'all'} thread(s) each); "
        f"command: `{' '.join(['python', 'tools/benchmark_synthetic.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        "",
        "| config | iters x batch | mask AP | AP50 | AP75 | box AP | wall time (train + eval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, iters, bs, segm, bbox, wall in rows:
        lines.append(
            f"| {name} | {iters} x {bs} | {segm.get('AP', float('nan')):.1f} | {segm.get('AP50', float('nan')):.1f} | "
            f"{segm.get('AP75', float('nan')):.1f} | {bbox.get('AP', float('nan')):.1f} | {wall / 60:.1f} min |"
        )
    made = {}
    for config, stats in pretrained.items():
        if stats.get("path"):
            made.setdefault(stats["path"], (stats, []))[1].append(os.path.splitext(os.path.basename(config))[0])
    for stats, names in made.values():
        lines.append("")
        lines.append(
            f"Backbone pretraining (MODEL.BACKBONE_PRETRAIN, shared by {', '.join(names)}): "
            f"{stats['iters']} iterations in {stats['seconds'] / 60:.1f} min (all threads), "
            f"final crop accuracy {stats['final_crop_accuracy']:.2f}; a run's budget is this plus its wall time."
        )
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
