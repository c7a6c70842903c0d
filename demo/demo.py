#!/usr/bin/env python
"""Images in, prediction overlays out.

    python demo/demo.py --config-file configs/synthetic/boxinst_R18_synth.yaml \
        --input img1.png img2.png --output out_dir --opts MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mask2former_sim  # noqa: E402,F401

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import mask2former_sim.modeling  # noqa: E402,F401
from mask2former_sim.data.registry import register_datasets_for  # noqa: E402
from mask2former_sim.engine.setup import build_cfg  # noqa: E402
from mask2former_sim.engine.visualize import write_overlays  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    p.add_argument("--output", required=True, help="directory for the overlays")
    p.add_argument("--confidence-threshold", type=float, default=0.5)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    cfg = build_cfg(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        sys.exit("no weights: pass --opts MODEL.WEIGHTS path/to/model_final.pth")
    if "://" not in cfg.MODEL.WEIGHTS and not os.path.isfile(cfg.MODEL.WEIGHTS):
        sys.exit(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}")
    paths = sorted({f for pattern in args.input for f in (glob.glob(os.path.expanduser(pattern)) or [pattern])})
    missing = [f for f in paths if not os.path.isfile(f)]
    if missing:
        sys.exit(f"input file(s) not found: {missing}")
    register_datasets_for(cfg)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    for dst in write_overlays(model, cfg, paths, args.output, args.confidence_threshold):
        print(dst)


if __name__ == "__main__":
    main()
