#!/usr/bin/env python
"""Synthetic accuracy benchmark: each config trained and evaluated at the same budget.

    .venv/bin/python tools/benchmark_synthetic.py [--configs A.yaml B.yaml ...] [--out output/bench]
                                                  [--opts KEY VALUE ...]

Runs tools/demo_job.py once per config (a fresh process each, same iterations, batch and
seed unless overridden) and prints a markdown table: mask AP, AP50, AP75, box AP, wall time.
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
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
