#!/usr/bin/env python
"""Why do SIM's pseudo masks help or hurt? Separation statistics of a SIM checkpoint's maps.

    .venv/bin/python tools/diagnose_pseudo_masks.py --config-file configs/synthetic/sim_R18_synth.yaml \
        --weights output/sim/model_final.pth [--dataset synth_val] [--max-images 60] [KEY VALUE ...]

On a split with GT masks, with the test-time input and the training matching (the same
pipeline as tools/eval_pseudo_masks.py), per GT and inside its box on the loss grid:

* ``pos``, ``neg``: fraction of the box's cells that the pseudo loss labels foreground
  (Y = 1) and background (W = 1, Y = 0); the rest is ignored;
* ``pos prec`` / ``pos rec``: precision and recall of the positives against the GT mask;
  ``neg on fg``: fraction of the GT mask labelled background (harmful negatives);
* ``S fg`` / ``S bg`` (and A, T, R, student): mean of the semantic map S, the appearance map A
  (MODEL.SIM.APPEARANCE only), instance map T, combined map R and the student's mask probability over the GT-mask cells and over the
  other cells of the box;
* ``AUC S`` (T, R, student): how well each map ranks the box's GT-mask cells above its
  background cells (0.5 = no information, 1 = perfect), independent of any threshold or
  temperature.

Means over GTs, per class and overall, as a markdown table.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)

MAPS = ("S", "A", "T", "R", "student")  # A: with MODEL.SIM.APPEARANCE only


def parse_args(argv=None):
    from mask2former_sim.evaluation.pseudo_masks import add_opts_argument, checkpoint_tool_parser

    p = checkpoint_tool_parser(__doc__, what="checkpoint (.pth) of a SIM training")
    p.add_argument("--max-images", type=int, default=None, help="first N images of the split (default: all)")
    add_opts_argument(p)
    args = p.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        p.error(f"--max-images must be >= 1, got {args.max_images}")
    return args


def rank_auc(scores, labels):
    """Mann-Whitney AUC of 1-D scores for bool labels (ties get the mean rank); None if one class is empty."""
    import torch

    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return None
    order = scores.argsort()
    ranks = torch.empty_like(scores, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(scores, return_inverse=True)  # mean rank of tied values
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    r = mean_rank[inverse]
    return float((r[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def gt_rows(batch):
    """One dict of figures per GT of a BatchPseudoMasks (GTs without a GT-mask cell left out)."""
    p = batch.pseudo
    rows = []
    for g in range(len(batch.labels)):
        box = batch.in_box[g]
        fg = batch.gt_masks[g] & box
        bg = box & ~batch.gt_masks[g]
        if not fg.any():
            continue
        y = (p.targets[g] > 0.5) & box
        neg = (p.weights[g] > 0) & ~y & box
        n_box, n_fg = float(box.sum()), float(fg.sum())
        row = {
            "class": int(batch.labels[g]),
            "pos": float(y.sum()) / n_box,
            "neg": float(neg.sum()) / n_box,
            "pos prec": float((y & fg).sum()) / max(float(y.sum()), 1.0),
            "pos rec": float((y & fg).sum()) / n_fg,
            "neg on fg": float((neg & fg).sum()) / n_fg,
        }
        maps = {"S": p.semantic[g], "T": p.instance[g], "R": p.combined[g], "student": batch.student[g]}
        if getattr(p, "appearance", None) is not None:  # MODEL.SIM.APPEARANCE: the per-image colour model
            maps["A"] = p.appearance[g]
        for name, m in maps.items():
            row[f"{name} fg"] = float(m[fg].mean())
            row[f"{name} bg"] = float(m[bg].mean()) if bg.any() else float("nan")
            row[f"AUC {name}"] = rank_auc(m[box].double(), fg[box])
        rows.append(row)
    return rows


def table(rows, class_names):
    import math

    keys = [k for k in rows[0] if k != "class"]
    lines = ["| class | GTs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    groups = [("all", rows)] + [
        (class_names[c] if class_names and c < len(class_names) else f"class{c}", [r for r in rows if r["class"] == c])
        for c in sorted({r["class"] for r in rows})
    ]
    for name, sel in groups:
        cells = []
        for k in keys:
            vals = [r[k] for r in sel if r[k] is not None and not math.isnan(r[k])]
            cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
        lines.append(f"| {name} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data import MetadataCatalog

    from mask2former_sim.engine.setup import build_cfg
    from mask2former_sim.evaluation.pseudo_masks import (
        PseudoMaskEvalMapper,
        dataset_records,
        load_for_tool,
        pseudo_mask_outputs,
    )

    if not build_cfg(args.config_file, args.opts).MODEL.SIM.ENABLED:
        sys.exit(f"{args.config_file}: MODEL.SIM.ENABLED is False; this tool reads SIM's teacher and prototypes")
    cfg, dataset, model, iteration = load_for_tool(args)
    mapper = PseudoMaskEvalMapper(cfg, dataset)
    rows = []
    for record in dataset_records(dataset, args.max_images):
        inputs = mapper(record)
        if len(inputs["instances"]):
            rows += gt_rows(pseudo_mask_outputs(model, [inputs], iteration))
    if not rows:
        sys.exit(f"no GT of {dataset} covers a cell of the loss grid")
    print(f"{args.weights} (iteration {iteration}) on {dataset}: {len(rows)} GTs, inside their boxes\n")
    text = table(rows, MetadataCatalog.get(dataset).get("thing_classes"))
    print(text)
    return rows


if __name__ == "__main__":
    main()
