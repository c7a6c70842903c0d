#!/usr/bin/env python
"""Training-step cost of SIM against the box-only step: same model, same batches, one invocation.

    .venv/bin/python tools/benchmark_sim_cost.py [--configs A.yaml B.yaml] [--steps 12] [--rounds 2]
                                                 [--threads 2] [KEY VALUE ...]

Every config runs in its own subprocess (so that peak memory is its own), in alternating rounds
(A B A B ...), each on the same training batches of the synthetic train split: a few warm-up
steps, then ``--steps`` timed steps of the whole training step (forward, criterion, backward,
clipping + AdamW step, and with SIM the teacher forward, pseudo labels, prototype update and
the teacher's EMA update). The SIM warm-up is set to 0 so that the pseudo-mask loss is on (its
full cost). Reported per config: median s/step over the rounds, the mean seconds of the parts
(student network, teacher network, criterion incl. pseudo labels, of which the pseudo labeler and
the prototype update, backward, optimizer, EMA), and peak resident memory (max RSS of the
subprocess, MiB); and the ratios to the first config. Prints a markdown table.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ["configs/synthetic/boxinst_R18_synth.yaml", "configs/synthetic/sim_R18_synth.yaml"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="configs to compare (first = reference)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per round")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (each config once per round)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each subprocess")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (every config)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup_steps < 0:
        p.error("--steps and --rounds must be >= 1, --warmup-steps >= 0")
    return args


def build_training_parts(cfg):
    """The model of ``cfg`` in training mode (seed 0; SIM: with its EMA teacher attached, as the
    trainer does after loading weights) and its optimizer. Shared with benchmark_train_step.py."""
    import torch

    import mask2former_sim  # noqa: F401  (compat shim, registrations)
    from detectron2.modeling import build_model

    from mask2former_sim.engine.optimizer import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    if cfg.MODEL.SIM.ENABLED:
        model.attach_teacher()
    return model, build_optimizer(cfg, model)


def training_step(model, optimizer, batch, it: int, parts=None, autocast=None):
    """One whole training step on ``batch`` at iteration ``it``: forward (student, and with SIM the
    teacher and pseudo labels) and criterion, under ``autocast()`` when given (e.g. bf16 AMP);
    backward, clipping + optimizer step, and SIM's teacher EMA update, outside it. Returns the
    total loss (a tensor). ``parts``, a dict, gets the wall seconds of backward / optimizer /
    teacher EMA added (host time: meaningful on the CPU)."""
    import contextlib

    from detectron2.utils.events import EventStorage

    def add(name, t):
        if parts is not None:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t

    with EventStorage(it):
        with (autocast or contextlib.nullcontext)():
            losses = model(batch)
            loss = sum(losses.values())
        optimizer.zero_grad()
        t = time.perf_counter()
        loss.backward()
        add("backward", t)
        t = time.perf_counter()
        optimizer.step()
        add("optimizer", t)
        if model.teacher is not None:
            t = time.perf_counter()
            model.update_teacher()
            add("teacher EMA", t)
    return loss.detach()


def worker(config: str, args) -> dict:
    """One config: build, run the steps, return the timings (runs in the subprocess)."""
    import torch

    import mask2former_sim  # noqa: F401
    from mask2former_sim.data.registry import register_datasets_for
    from mask2former_sim.engine.setup import build_cfg
    from mask2former_sim.engine.trainer import Trainer

    torch.set_num_threads(args.threads)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE_PRETRAIN.ENABLED", "False", "MODEL.SIM.WARMUP_ITERS", "0",
            "DATALOADER.NUM_WORKERS", "0"] + list(args.opts)
    cfg = build_cfg(os.path.join(ROOT, config) if not os.path.isabs(config) else config, opts)
    register_datasets_for(cfg)
    model, optimizer = build_training_parts(cfg)
    sim = model.teacher is not None
    loader = iter(Trainer.build_train_loader(cfg))
    batches = [next(loader) for _ in range(args.warmup_steps + args.steps)]

    parts = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    crit = model.criterion
    student_network = model.forward_network
    model.forward_network = lambda images, p=None: (
        timed("student network", student_network)(images) if p is None else student_network(images, p))
    crit.forward = timed("criterion (incl. pseudo labels)", crit.forward)
    if sim:
        model._teacher_outputs = timed("teacher network", model._teacher_outputs)
        crit.pseudo_labeler.forward = timed("pseudo labeler", crit.pseudo_labeler.forward)
        crit.pseudo_labeler.memory.update = timed("prototype update", crit.pseudo_labeler.memory.update)

    def step(batch, it):
        training_step(model, optimizer, batch, it, parts=parts)

    for i in range(args.warmup_steps):
        step(batches[i], i)
    parts.clear()
    start = time.perf_counter()
    for i in range(args.warmup_steps, len(batches)):
        step(batches[i], i)
    total = time.perf_counter() - start
    return {
        "config": config,
        "s_per_step": total / args.steps,
        "parts": {k: v / args.steps for k, v in parts.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)))
        return None
    runs = {c: [] for c in args.configs}
    for r in range(args.rounds):
        for c in args.configs:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", c, "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads)] + list(args.opts)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                sys.exit(f"benchmark of {c} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            runs[c].append(res)
            print(f"round {r + 1}: {c}: {res['s_per_step']:.3f} s/step, peak RSS {res['peak_rss_mib']:.0f} MiB",
                  flush=True)
    ref = args.configs[0]
    summary = {}
    for c, rs in runs.items():
        names = sorted({k for r in rs for k in r["parts"]})
        summary[c] = {
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "parts": {k: statistics.mean(r["parts"].get(k, 0.0) for r in rs) for k in names},
        }
    print()
    print(f"| config | s/step (median of {args.rounds}) | x ref | peak RSS (MiB) | x ref | parts (s/step) |")
    print("|---|---|---|---|---|---|")
    for c, s in summary.items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in s["parts"].items())
        print(f"| {os.path.basename(c)} | {s['s_per_step']:.3f} | {s['s_per_step'] / summary[ref]['s_per_step']:.2f} | "
              f"{s['peak_rss_mib']:.0f} | {s['peak_rss_mib'] / summary[ref]['peak_rss_mib']:.2f} | {parts} |")
    return summary


if __name__ == "__main__":
    main()
