#!/usr/bin/env python
"""Run the training data pipeline end to end and print a summary (no model involved).

    .venv/bin/python tools/inspect_data.py [--config-file configs/synthetic/boxinst_R18_synth.yaml]
                                           [--batches 20] [KEY VALUE ...]

Registers (and for synthetic data, generates) the datasets the config names, draws batches
from the exact training stream, and reports instances, boxes, the valid-pixel fraction,
whether any mask reached the batch, and the throughput.
"""
import argparse
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from mask2former_sim.data.registry import register_datasets_for  # noqa: E402
from mask2former_sim.engine.setup import build_cfg  # noqa: E402
from mask2former_sim.engine.trainer import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(ROOT, "configs/synthetic/boxinst_R18_synth.yaml"))
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    setup_logger(name="mask2former_sim")
    cfg = build_cfg(args.config_file, args.opts)
    t0 = time.time()
    register_datasets_for(cfg)
    t_reg = time.time() - t0
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        recs = DatasetCatalog.get(name)
        n_inst = sum(len(r["annotations"]) for r in recs)
        has_masks = any("segmentation" in a for r in recs for a in r["annotations"])
        print(f"{name:24s} {len(recs):6d} images {n_inst:7d} instances  masks in records: {has_masks}")

    loader = Trainer.build_train_loader(cfg)
    t1 = time.time()
    n_img = n_inst = 0
    valid_frac, widths, heights, masks_seen = [], [], [], False
    for batch in itertools.islice(loader, args.batches):
        for d in batch:
            inst = d["instances"]
            n_img += 1
            n_inst += len(inst)
            masks_seen |= inst.has("gt_masks")
            valid_frac.append(d["valid_mask"].float().mean().item())
            wh = inst.gt_boxes.tensor[:, 2:] - inst.gt_boxes.tensor[:, :2]
            widths += wh[:, 0].tolist()
            heights += wh[:, 1].tolist()
    dt = time.time() - t1
    mapper = loader.dataset.mapper
    print(f"\ntraining stream: {args.batches} batches x {cfg.SOLVER.IMS_PER_BATCH} = {n_img} images, "
          f"{n_inst} boxes ({n_inst / max(n_img, 1):.2f} per image)")
    print(f"image size {cfg.INPUT.IMAGE_SIZE}, box width {min(widths):.1f}..{max(widths):.1f}, "
          f"height {min(heights):.1f}..{max(heights):.1f} px")
    print(f"valid-pixel fraction mean {sum(valid_frac) / len(valid_frac):.3f} "
          f"(min {min(valid_frac):.3f}, max {max(valid_frac):.3f})")
    print(f"masks in the batch: {masks_seen} (full supervision: {cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION})")
    print(f"skipped crops with no box (main-process mapper): {mapper.num_skipped_empty}")
    print(f"registration/generation {t_reg:.1f} s, pipeline {n_img / dt:.1f} images/s")


if __name__ == "__main__":
    main()
