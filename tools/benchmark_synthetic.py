#!/usr/bin/env python
"""Synthetic accuracy benchmark: each config trained and evaluated at the same budget.

    .venv/bin/python tools/benchmark_synthetic.py [--configs A.yaml B.yaml ...] [--out output/bench]
                                                  [--seeds 0 1 2] [--opts KEY VALUE ...]

Runs tools/demo_job.py once per config (a fresh process each, same iterations, batch and
seed unless overridden) and prints a markdown table: mask AP, AP50, AP75, box AP, wall time.
Configs with MODEL.BACKBONE_PRETRAIN.ENABLED first get their pretrained backbone made (with
all threads, one config at a time; configs over the same images share it), and its time is
reported beside the table: a run's budget is the pretraining plus its own wall time.
With ``--seeds``, every config runs once per seed (``SEED s``: initialisation, data order and
the pretraining) into OUT/<config>/seed<s>, and the table gives mean ± standard deviation over
the seeds (and each seed's mask AP).
"""
import statistics
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
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run every config once per seed (SEED s) and report mean and standard deviation")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for every run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    seeds = args.seeds or [None]
    runs = [(config, seed) for config in args.configs for seed in seeds]

    def run_opts(seed):
        return list(args.opts) + ([] if seed is None else ["SEED", str(seed)])

    pretrained = {(config, seed): pretrain_first(config, run_opts(seed)) for config, seed in runs}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    results = {}  # config name -> list of (seed, iters, batch, segm, bbox, wall)
    pending = list(runs)
    while pending:
        wave, pending = pending[: args.jobs], pending[args.jobs:]
        started = []
        for config, seed in wave:
            name = os.path.splitext(os.path.basename(config))[0]
            out_dir = os.path.join(args.out, name) if seed is None else os.path.join(args.out, name, f"seed{seed}")
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            started.append((config, seed, name, out_dir) + start_one(config, out_dir, run_opts(seed), threads))
        for config, seed, name, out_dir, proc, t0 in started:
            summary, wall = finish_one(config, out_dir, proc, t0)
            segm, bbox = summary["results"].get("segm", {}), summary["results"].get("bbox", {})
            results.setdefault(name, []).append((seed, summary["iterations"], summary["images_per_batch"], segm, bbox, wall))
            print(f"done {name}{'' if seed is None else f' seed {seed}'}: mask AP {segm.get('AP', float('nan')):.1f} "
                  f"in {wall:.0f} s", flush=True)

    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{args.jobs} run(s) at a time ({threads or 'all'} thread(s) each); "
        f"command: `{' '.join(['python', 'tools/benchmark_synthetic.py'] + (argv if argv is not None else sys.argv[1:]))}`",
        "",
        "| config | iters x batch | mask AP | AP50 | AP75 | box AP | wall time (train + eval) |"
        + (" mask AP per seed |" if args.seeds else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if args.seeds else ""),
    ]

    def cell(values, digits=1):
        values = [v for v in values if v == v]  # drop NaN
        if not values:
            return "nan"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    for name, per_seed in results.items():
        _, iters, bs = per_seed[0][:3]
        metric = lambda task, key: [(segm if task == "segm" else bbox).get(key, float("nan"))  # noqa: E731
                                    for _, _, _, segm, bbox, _ in per_seed]
        line = (f"| {name} | {iters} x {bs} | {cell(metric('segm', 'AP'))} | {cell(metric('segm', 'AP50'))} | "
                f"{cell(metric('segm', 'AP75'))} | {cell(metric('bbox', 'AP'))} | "
                f"{cell([w / 60 for *_, w in per_seed])} min |")
        if args.seeds:
            line += " " + ", ".join(f"{seed}: {segm.get('AP', float('nan')):.1f}" for seed, _, _, segm, _, _ in per_seed) + " |"
        lines.append(line)
    made = {}
    for (config, seed), stats in pretrained.items():
        if stats.get("path"):
            label = os.path.splitext(os.path.basename(config))[0] + ("" if seed is None else f" (seed {seed})")
            made.setdefault(stats["path"], (stats, []))[1].append(label)
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
