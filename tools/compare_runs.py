#!/usr/bin/env python
"""Compare training runs (e.g. SIM against the box-only baseline): tables and plots.

    .venv/bin/python tools/compare_runs.py RUN_DIR [RUN_DIR ...] --baseline RUN_DIR --out DIR

Reads each run's ``metrics.json`` (losses, s/iter, peak memory, COCO evaluation results as
detectron2's EvalHook writes them) and ``config.yaml`` (both written by train_net.py into
OUTPUT_DIR) and writes

* ``DIR/comparison.md``: one row per run (config, supervision, backbone, iterations x batch,
  mask AP / AP50 / AP75 / APs / APm / APl, box AP, delta to the baseline, s/iter, peak
  memory, approximate training time); for runs whose configs differ only in SEED, their mean
  ± sample standard deviation (e.g. the runs of ``benchmark_synthetic.py --seeds``); a
  per-class mask AP table with deltas, and the config keys that differ between the runs;
* ``DIR/losses.png`` (one panel per loss family, summed over decoder outputs),
  ``DIR/mask_ap.png`` (mask AP over iterations, when periodic evaluation ran) and
  ``DIR/per_class_delta.png`` (per-class mask AP minus the baseline's).

A run directory without metrics.json or config.yaml, or without an evaluation, is an error
naming it. Run names are the directory names (made unique with their parents if needed).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LOSS_FAMILIES = ("loss_ce", "loss_proj", "loss_pairwise", "loss_pseudo_bce", "loss_pseudo_dice", "loss_mask",
                 "loss_dice", "loss_paste_ce", "loss_paste_dice")
MAIN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class RunError(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="OUTPUT_DIRs of train_net.py runs")
    p.add_argument("--baseline", required=True, help="the run the deltas are taken against (may be one of runs)")
    p.add_argument("--out", required=True, help="directory for comparison.md and the plots")
    p.add_argument("--group-ignore", nargs="*", default=[], metavar="KEY",
                   help="config keys that do not change training (e.g. MODEL.SIM.EVAL_PSEUDO_MASKS), ignored when "
                        "runs are grouped over seeds")
    return p.parse_args(argv)


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(path: str) -> dict:
    """metrics.json rows, flattened config and the derived figures of one run directory."""
    import yaml

    metrics_file, config_file = os.path.join(path, "metrics.json"), os.path.join(path, "config.yaml")
    for f in (metrics_file, config_file):
        if not os.path.isfile(f):
            raise RunError(f"run {path}: no {os.path.basename(f)} (expected {f}, written by train_net.py)")
    rows = []
    with open(metrics_file) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunError(f"run {path}: {metrics_file} line {n} is not json ({e})") from None
    with open(config_file) as f:
        cfg = _flatten(yaml.safe_load(f) or {})
    evals = [r for r in rows if "segm/AP" in r]
    if not evals:
        raise RunError(f"run {path}: {metrics_file} holds no evaluation (no 'segm/AP'; did the run finish?)")
    train = [r for r in rows if "total_loss" in r]
    times = [r["time"] for r in train if "time" in r]
    peak = [r[k] for r in rows for k in ("peak_memory_mib",) if k in r]
    s_iter = statistics.median(times) if times else float("nan")
    iters = int(cfg.get("SOLVER.MAX_ITER", 0))
    return {
        "path": path,
        "rows": rows,
        "train": train,
        "evals": evals,
        "final": evals[-1],
        "cfg": cfg,
        "s_per_iter": s_iter,
        "peak_memory_mib": max(peak) if peak else float("nan"),
        "train_minutes": s_iter * iters / 60.0 if times else float("nan"),
    }


def supervision(cfg) -> str:
    if cfg.get("MODEL.BOXSUP.FULL_MASK_SUPERVISION"):
        return "full masks"
    if cfg.get("MODEL.SIM.ENABLED"):
        return "boxes, SIM" + (" + copy-paste" if cfg.get("MODEL.SIM.COPY_PASTE.ENABLED") else "")
    return "boxes (projection + pairwise)"


def backbone(cfg) -> str:
    name = str(cfg.get("MODEL.BACKBONE.NAME", ""))
    if "swin" in name.lower():
        return f"Swin (embed {cfg.get('MODEL.SWIN.EMBED_DIM', '?')})"
    return f"ResNet-{cfg.get('MODEL.RESNETS.DEPTH', '?')}"


def unique_names(paths):
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    for i, p in enumerate(paths):
        if names.count(names[i]) > 1:
            parts = os.path.normpath(p).split(os.sep)
            names[i] = "/".join(parts[-2:])
    return names


def _fmt(v, digits=1):
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def class_names(run) -> list:
    return sorted(k[len("segm/AP-"):] for k in run["final"] if k.startswith("segm/AP-"))


def differing_keys(runs) -> "OrderedDict[str, list]":
    keys = sorted(set().union(*(r["cfg"] for r in runs)) - {"OUTPUT_DIR"})
    out = OrderedDict()
    for k in keys:
        values = [r["cfg"].get(k, "(unset)") for r in runs]
        if any(v != values[0] for v in values[1:]):
            out[k] = values
    return out


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.1f} ± {std:.1f}"


def seed_groups(runs, ignore=()) -> "OrderedDict[tuple, list]":
    """Runs whose configs are equal but for SEED, OUTPUT_DIR and ``ignore``: {config: [run index, ...]}."""
    skip = {"OUTPUT_DIR", "SEED", *ignore}
    groups = OrderedDict()
    for i, r in enumerate(runs):
        key = tuple(sorted((k, repr(v)) for k, v in r["cfg"].items() if k not in skip))
        groups.setdefault(key, []).append(i)
    return groups


def seed_table(runs, names, base, ignore=()) -> list:
    """Markdown lines of the mean ± sample std over seeds of every group with two or more seeds."""
    groups = seed_groups(runs, ignore)
    multi = [members for members in groups.values() if len({runs[i]["cfg"].get("SEED") for i in members}) > 1]
    if not multi:
        return []
    base_group = next(members for members in groups.values() if any(runs[i] is base for i in members))
    base_mean = statistics.fmean(runs[i]["final"]["segm/AP"] for i in base_group)
    lines = ["", "## Mean ± std over seeds (runs equal but for SEED)", "",
             "| runs | seeds | mask AP | AP50 | AP75 | box AP | Δ mask AP (to the baseline's seeds) | mask AP per seed |",
             "|---|---|---|---|---|---|---|---|"]
    for members in multi:
        finals = [runs[i]["final"] for i in members]
        seeds = [runs[i]["cfg"].get("SEED") for i in members]
        cells = [", ".join(names[i] for i in members), ", ".join(str(x) for x in seeds)]
        cells += [_mean_std([f.get(f"segm/{m}") for f in finals]) for m in ("AP", "AP50", "AP75")]
        cells.append(_mean_std([f.get("bbox/AP") for f in finals]))
        cells.append(f"{statistics.fmean(f['segm/AP'] for f in finals) - base_mean:+.1f}")
        cells.append(", ".join(f"{sd}: {f['segm/AP']:.1f}" for sd, f in zip(seeds, finals)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(runs, names, base, base_name, group_ignore=()) -> str:
    b = base["final"]
    lines = [f"# Run comparison (baseline: {base_name})", "",
             "| run | supervision | backbone | iters x batch | mask AP | AP50 | AP75 | APs | APm | APl | box AP "
             "| Δ mask AP | Δ box AP | s/iter | peak memory (MiB) | train time (min, ≈ s/iter x iters) |",
             "|" + "---|" * 16]
    for r, n in zip(runs, names):
        f, c = r["final"], r["cfg"]
        cells = [n, supervision(c), backbone(c), f"{c.get('SOLVER.MAX_ITER')} x {c.get('SOLVER.IMS_PER_BATCH')}"]
        cells += [_fmt(f.get(f"segm/{m}")) for m in MAIN_METRICS] + [_fmt(f.get("bbox/AP"))]
        cells += [f"{f['segm/AP'] - b['segm/AP']:+.1f}", f"{f.get('bbox/AP', float('nan')) - b.get('bbox/AP', float('nan')):+.1f}"]
        cells += [_fmt(r["s_per_iter"], 3), _fmt(r["peak_memory_mib"], 0), _fmt(r["train_minutes"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += seed_table(runs, names, base, group_ignore)
    classes = class_names(base)
    if classes:
        lines += ["", "## Per-class mask AP (Δ to the baseline)", "",
                  "| run | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for r, n in zip(runs, names):
            cells = []
            for cl in classes:
                v, bv = r["final"].get(f"segm/AP-{cl}"), b.get(f"segm/AP-{cl}")
                cells.append("–" if v is None else (f"{v:.1f}" if r is base or bv is None else f"{v:.1f} ({v - bv:+.1f})"))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    diff = differing_keys(runs)
    lines += ["", "## Config keys that differ", ""]
    if diff:
        lines += ["| key | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| `{k}` | " + " | ".join(f"`{v}`" for v in vals) + " |" for k, vals in diff.items()]
    else:
        lines.append("(none besides OUTPUT_DIR)")
    return "\n".join(lines) + "\n"


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plots(runs, names, base, out_dir) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    families = [fam for fam in LOSS_FAMILIES
                if any(k == fam or (k.startswith(fam + "_") and k[len(fam) + 1:].isdigit())
                       for r in runs for row in r["train"] for k in row)]
    if families:
        fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.2), squeeze=False)
        for ax, fam in zip(axes[0], families):
            for r, n in zip(runs, names):
                xs, ys = [], []
                for row in r["train"]:
                    parts = [v for k, v in row.items() if k == fam or (k.startswith(fam + "_") and k[len(fam) + 1:].isdigit())]
                    if parts:
                        xs.append(row["iteration"])
                        ys.append(sum(parts))
                ax.plot(xs, ys, label=n)
            ax.set_title(f"{fam} (all outputs)")
            ax.set_xlabel("iteration")
        axes[0][0].legend(fontsize=7)
        written.append(_save(plt, fig, os.path.join(out_dir, "losses.png")))
    if any(len(r["evals"]) > 1 for r in runs):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for r, n in zip(runs, names):
            ax.plot([e["iteration"] for e in r["evals"]], [e["segm/AP"] for e in r["evals"]], marker="o", label=n)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mask AP")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, os.path.join(out_dir, "mask_ap.png")))
    classes = class_names(base)
    others = [(r, n) for r, n in zip(runs, names) if r is not base]
    if classes and others:
        fig, ax = plt.subplots(figsize=(min(14.0, max(5.0, 2.0 + 0.35 * len(classes) * len(others))), 3.6))
        width = 0.8 / len(others)
        for i, (r, n) in enumerate(others):
            deltas = [r["final"].get(f"segm/AP-{c}", float("nan")) - base["final"].get(f"segm/AP-{c}", float("nan"))
                      for c in classes]
            ax.bar([j + i * width for j in range(len(classes))], deltas, width, label=n)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))])
        ax.set_xticklabels(classes, rotation=30, fontsize=8)
        ax.set_ylabel("mask AP - baseline")
        ax.legend(fontsize=7)
        written.append(_save(plt, fig, os.path.join(out_dir, "per_class_delta.png")))
    return written


def main(argv=None):
    args = parse_args(argv)
    paths = list(dict.fromkeys([os.path.normpath(p) for p in args.runs]))
    base_path = os.path.normpath(args.baseline)
    if base_path not in paths:
        paths = [base_path] + paths
    errors, runs = [], []
    for p in paths:
        try:
            runs.append(load_run(p))
        except RunError as e:
            errors.append(str(e))
    if errors:
        sys.exit("compare_runs: " + "\n".join(errors))
    names = unique_names(paths)
    base = runs[paths.index(base_path)]
    os.makedirs(args.out, exist_ok=True)
    text = markdown(runs, names, base, names[paths.index(base_path)], args.group_ignore)
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(text)
    written = plots(runs, names, base, args.out)
    print(text)
    print("plots: " + (", ".join(written) if written else "(none)"))
    return {"markdown": text, "plots": written, "runs": runs, "names": names}


if __name__ == "__main__":
    main()
