#!/usr/bin/env python
"""One PNG grid per GT instance of SIM's pseudo labels: image with box, semantic map, instance
map, combined map, positive weights per decoder output, final pseudo mask (ignored cells grey),
the student's mask and the GT mask when the split has one.

    .venv/bin/python tools/visualize_pseudo_masks.py --config-file configs/synthetic/sim_R18_synth.yaml \
        --weights output/sim/model_final.pth --output panels/ [--images N | --image-ids ID,ID,...] \
        [--max-instances 32] [--dataset synth_val] [--student-only] [KEY VALUE ...]

Files are <output>/<image id>_gt<k>_<class>.png; the drawing code is
mask2former_sim/evaluation/pseudo_mask_panels.py (write_pseudo_mask_panels).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401  (Pillow shim before detectron2)


def parse_args(argv=None):
    from mask2former_sim.evaluation.pseudo_masks import add_opts_argument, checkpoint_tool_parser

    p = checkpoint_tool_parser(__doc__)
    p.add_argument("--output", required=True, help="directory for the PNGs")
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--images", type=int, default=8, help="the first N images of the split (default 8)")
    chosen.add_argument("--image-ids", default="", help="comma-separated image_id values instead, e.g. 3,17")
    p.add_argument("--max-instances", type=int, default=32, help="stop after this many panels (default 32)")
    p.add_argument("--tile", type=int, default=96, help="tile size in pixels (default 96)")
    p.add_argument("--student-only", action="store_true", help="ignore the teacher: image, student and GT tiles")
    add_opts_argument(p)
    args = p.parse_args(argv)
    for name in ("images", "max_instances", "tile"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mask2former_sim.evaluation.pseudo_mask_panels import write_pseudo_mask_panels
    from mask2former_sim.evaluation.pseudo_masks import load_for_tool

    image_ids = [i.strip() for i in args.image_ids.split(",") if i.strip()] or None
    cfg, dataset, model, iteration = load_for_tool(args, use_teacher=not args.student_only)
    paths = write_pseudo_mask_panels(
        model, cfg, dataset, args.output, args.max_instances,
        image_ids=image_ids, max_images=None if image_ids else args.images,
        use_teacher=not args.student_only, tile=args.tile, iteration=iteration,
    )
    print(f"wrote {len(paths)} panels to {args.output}")
    return paths


if __name__ == "__main__":
    main()
