#!/usr/bin/env python
"""The main job on the embedded default: synthetic data, CPU training, evaluation, overlays.

    .venv/bin/python tools/demo_job.py [--config-file configs/synthetic/sim_R18_synth_demo.yaml]
                                       [--output-dir output/demo] [KEY VALUE ...]

Generates the synthetic dataset on first use, trains SIM from boxes only (the demo schedule:
shorter than the benchmark's; progress with ETA in the log), evaluates mask and box AP on
synth_val (which has masks), and writes prediction overlays of a few validation images as PNG;
with SIM also the pseudo-mask quality on synth_val (mean IoU with the GT masks) and the
pseudo-mask panels of a few validation instances (tools/visualize_pseudo_masks.py's).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401

from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import mask2former_sim.modeling  # noqa: E402,F401
from mask2former_sim.data.registry import register_datasets_for  # noqa: E402
from mask2former_sim.engine.setup import build_cfg  # noqa: E402
from mask2former_sim.engine.trainer import Trainer  # noqa: E402
from mask2former_sim.engine.visualize import write_overlays  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(ROOT, "configs/synthetic/sim_R18_synth_demo.yaml"))
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output/demo"))
    p.add_argument("--num-overlays", type=int, default=6)
    p.add_argument("--overlay-score", type=float, default=0.15,
                   help="score threshold of the drawn detections (at most 5 per image)")
    p.add_argument("--num-panels", type=int, default=12, help="pseudo-mask panels to write (SIM configs)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)

    try:
        cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", args.output_dir] + args.opts)
    except FileNotFoundError as e:
        p.error(str(e))
    except (KeyError, AssertionError, ValueError) as e:  # yacs names the key
        p.error(f"invalid config ({args.config_file} with overrides {args.opts}): {e}")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR)
    setup_logger(cfg.OUTPUT_DIR, name="mask2former_sim")
    t0 = time.time()
    register_datasets_for(cfg)
    t_data = time.time() - t0

    trainer = Trainer(cfg)
    cfg = trainer.cfg  # scaled by SOLVER.REFERENCE_WORLD_SIZE, when set
    trainer.resume_or_load(resume=False)
    t1 = time.time()
    trainer.train()
    # DefaultTrainer.train() returns the results only when TEST.EXPECTED_RESULTS is set
    results = getattr(trainer, "_last_eval_results", None) or {}
    t_train = time.time() - t1

    val = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.num_overlays]
    overlays = write_overlays(trainer.model, cfg, [r["file_name"] for r in val], os.path.join(cfg.OUTPUT_DIR, "overlays"),
                              score_thresh=args.overlay_score, max_per_image=5)

    pseudo, panels = {}, []
    if cfg.MODEL.SIM.ENABLED:
        from mask2former_sim.evaluation.pseudo_mask_panels import write_pseudo_mask_panels
        from mask2former_sim.evaluation.pseudo_masks import PseudoMaskEvalHook, evaluate_pseudo_masks

        it = cfg.SOLVER.MAX_ITER
        hook = next((h for h in trainer._hooks if isinstance(h, PseudoMaskEvalHook)), None)
        pseudo = hook.last_figures if hook is not None else evaluate_pseudo_masks(
            trainer.model, cfg, cfg.DATASETS.TEST[0], per_class=False, iteration=it)
        panels = write_pseudo_mask_panels(trainer.model, cfg, cfg.DATASETS.TEST[0],
                                          os.path.join(cfg.OUTPUT_DIR, "pseudo_mask_panels"), args.num_panels,
                                          iteration=it)

    summary = {
        "config": os.path.relpath(args.config_file, ROOT),
        "iterations": cfg.SOLVER.MAX_ITER,
        "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "data_seconds": round(t_data, 1),
        "train_and_eval_seconds": round(t_train, 1),
        "results": results,
        "pseudo_mask_quality": pseudo,
        "overlays": overlays,
        "pseudo_mask_panels": panels,
        "output_dir": cfg.OUTPUT_DIR,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    ds = cfg.DATASETS.TEST[0]
    segm, bbox = results.get("segm", {}), results.get("bbox", {})
    print("\n=== mask2former-sim demo job ===")
    print(f"config            {summary['config']}")
    method = "SIM" if cfg.MODEL.SIM.ENABLED else ("full masks" if cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION else "box-only")
    print(f"training          {method}, {cfg.SOLVER.MAX_ITER} iterations x {cfg.SOLVER.IMS_PER_BATCH} images"
          f"{'' if cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION else ' (boxes only)'}")
    print(f"train + eval time {t_train:.0f} s (data preparation {t_data:.0f} s)")
    print(f"{ds} mask AP {segm.get('AP', float('nan')):.1f}  AP50 {segm.get('AP50', float('nan')):.1f}  "
          f"AP75 {segm.get('AP75', float('nan')):.1f}  | box AP {bbox.get('AP', float('nan')):.1f}")
    if pseudo:
        cols = ("semantic", "instance", "combined", "final", "student")
        print("pseudo-mask mIoU  " + "  ".join(f"{c} {pseudo.get(f'pseudo_mask/miou_{c}', float('nan')):.3f}" for c in cols)
              + f"  (in-box, vs GT masks of {ds})")
        print(f"pseudo panels     {os.path.dirname(panels[0]) if panels else '-'} ({len(panels)} PNG)")
    print(f"overlays          {os.path.dirname(overlays[0]) if overlays else '-'} ({len(overlays)} PNG)")
    print(f"metrics           {os.path.join(cfg.OUTPUT_DIR, 'metrics.json')}, TensorBoard events in {cfg.OUTPUT_DIR}")


if __name__ == "__main__":
    main()
