#!/usr/bin/env python
"""Pseudo-mask quality of a checkpoint: mean IoU against the GT masks of a split with masks.

    .venv/bin/python tools/eval_pseudo_masks.py --config-file configs/synthetic/sim_R18_synth.yaml \
        --weights output/sim/model_final.pth [--dataset synth_val] [--max-images N] \
        [--out results.json] [--student-only] [KEY VALUE ...]

Columns (mask2former_sim/evaluation/pseudo_masks.py has the definitions): the semantic map
S > 0.5, the instance map T > 0.5, the combined map R > 0.5, the final pseudo mask Y, the
student's own matched mask (inside the box, and over the whole image), and the fraction of
in-box cells the pseudo loss ignores; compared on the loss grid, per GT, then averaged over
GTs (per class and overall). With SIM on, the teacher comes from
checkpoint["trainer"]["sim_teacher"]; a box-only or fully supervised model (or
--student-only) gets the student columns only. Prints a markdown table; --out writes
{"figures": {...}, "counts": {...}, ...} as json.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)


def parse_args(argv=None):
    from mask2former_sim.evaluation.pseudo_masks import add_opts_argument, checkpoint_tool_parser

    p = checkpoint_tool_parser(__doc__)
    p.add_argument("--max-images", type=int, default=None, help="first N images of the split (default: all)")
    p.add_argument("--out", default="", help="write the figures and counts to this json file")
    p.add_argument("--student-only", action="store_true", help="ignore the teacher: student columns only")
    p.add_argument("--no-per-class", action="store_true", help="the overall row only")
    add_opts_argument(p)
    args = p.parse_args(argv)
    if args.max_images is not None and args.max_images < 1:
        p.error(f"--max-images must be >= 1, got {args.max_images}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from detectron2.data import MetadataCatalog

    from mask2former_sim.evaluation.pseudo_masks import collect_pseudo_mask_ious, load_for_tool, markdown_table

    cfg, dataset, model, iteration = load_for_tool(args, use_teacher=not args.student_only)
    acc = collect_pseudo_mask_ious(model, cfg, dataset, args.max_images, iteration, use_teacher=not args.student_only)
    class_names = MetadataCatalog.get(dataset).get("thing_classes")
    per_class = not args.no_per_class
    figures = acc.summarize(class_names, per_class)
    result = {
        "config_file": args.config_file,
        "weights": args.weights,
        "iteration": iteration,
        "dataset": dataset,
        "teacher": model.teacher is not None and not args.student_only,
        "counts": acc.counts(),
        "figures": figures,
    }
    print(f"Pseudo-mask quality on {dataset} ({args.weights}, iteration {iteration}); "
          f"mean IoU with the GT mask on the loss grid (stride {model.criterion.loss_stride}), inside the GT box "
          "except student_image; counts: " + json.dumps(acc.counts()))
    print()
    print(markdown_table(acc, class_names, per_class) if acc.num_gts else "(no GT covers a cell of the loss grid)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
