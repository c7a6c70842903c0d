#!/usr/bin/env python
"""How well do a trained model's masks cover the ground truth? (Evaluation split, with masks.)

    .venv/bin/python tools/diagnose_masks.py --config-file configs/synthetic/boxinst_R18_synth.yaml \
        --weights output/demo/model_final.pth [--images 40] [--score 0.3] [--panel panel.png] [KEY VALUE ...]

For every ground-truth instance of the first ``--images`` images of DATASETS.TEST[0], takes
the prediction (score >= ``--score``) with the highest mask IoU and reports the mean of those
best IoUs, the fractions above 0.5 and 0.75, and how much of its GT box the prediction and
the GT mask fill. Unlike mask AP it separates "masks are found but the wrong shape" from
"objects are missed or misclassified". ``--panel`` writes image | GT masks | best-matching
predicted masks for up to 8 images, side by side.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mask2former_sim  # noqa: E402,F401

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402

import mask2former_sim.modeling  # noqa: E402,F401
from mask2former_sim.data.mappers import annotation_mask  # noqa: E402
from mask2former_sim.data.registry import register_datasets_for  # noqa: E402
from mask2former_sim.engine.setup import build_cfg  # noqa: E402
from mask2former_sim.engine.visualize import predict_images  # noqa: E402


def best_matches(gt_masks: np.ndarray, pred_masks: np.ndarray) -> tuple:
    """(G,H,W), (P,H,W) bool -> best IoU per GT (G,) and the index of that prediction (-1: none)."""
    if len(gt_masks) == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    if len(pred_masks) == 0:
        return np.zeros(len(gt_masks)), np.full(len(gt_masks), -1)
    g = gt_masks.reshape(len(gt_masks), -1).astype(np.float64)
    p = pred_masks.reshape(len(pred_masks), -1).astype(np.float64)
    inter = g @ p.T
    union = g.sum(1)[:, None] + p.sum(1)[None, :] - inter
    iou = inter / np.maximum(union, 1.0)
    return iou.max(1), iou.argmax(1)


def _label_map(masks: list, shape) -> np.ndarray:
    palette = np.array([[230, 80, 60], [80, 200, 90], [70, 110, 230], [230, 200, 60], [190, 80, 210],
                        [60, 200, 210], [240, 140, 40], [150, 150, 150]], dtype=np.uint8)
    out = np.zeros((*shape, 3), dtype=np.uint8)
    for i, m in enumerate(masks):
        out[m] = palette[i % len(palette)]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--score", type=float, default=0.3)
    p.add_argument("--panel", default="")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if not os.path.isfile(args.weights):
        sys.exit(f"--weights: no such file {args.weights}")
    cfg = build_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    register_datasets_for(cfg)
    if not cfg.DATASETS.TEST:
        sys.exit("the config names no DATASETS.TEST split")
    records = DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.images]
    if any("segmentation" not in a for r in records for a in r.get("annotations", [])):
        sys.exit(f"{cfg.DATASETS.TEST[0]} has annotations without masks: nothing to compare with")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(args.weights)
    predictions = predict_images(model, cfg, [r["file_name"] for r in records])

    ious, pred_fill, gt_fill, rows = [], [], [], []
    for record, (rgb, inst) in zip(records, predictions):
        h, w = rgb.shape[:2]
        keep = inst[inst.scores >= args.score]
        pred = keep.pred_masks.numpy().astype(bool) if len(keep) else np.zeros((0, h, w), bool)
        anns = record.get("annotations", [])
        gt = np.stack([annotation_mask(a["segmentation"], h, w).astype(bool) for a in anns]) if anns else np.zeros((0, h, w), bool)
        best, idx = best_matches(gt, pred)
        ious.extend(best.tolist())
        for a, g, j in zip(anns, gt, idx):
            x0, y0, x1, y1 = (int(round(v)) for v in BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS))
            window = (slice(y0, max(y1, y0 + 1)), slice(x0, max(x1, x0 + 1)))
            gt_fill.append(float(g[window].mean()))
            if j >= 0:
                pred_fill.append(float(pred[j][window].mean()))
        if args.panel and len(rows) < 8:
            chosen = [pred[j] for j in idx if j >= 0]
            rows.append(np.concatenate([rgb, _label_map(list(gt), (h, w)), _label_map(chosen, (h, w))], axis=1))

    ious = np.asarray(ious)
    summary = {
        "images": len(records),
        "gt_instances": int(ious.size),
        "mean_best_iou": round(float(ious.mean()), 3) if ious.size else None,
        "frac_iou_over_0.5": round(float((ious > 0.5).mean()), 3) if ious.size else None,
        "frac_iou_over_0.75": round(float((ious > 0.75).mean()), 3) if ious.size else None,
        "pred_fill_of_gt_box": round(float(np.mean(pred_fill)), 3) if pred_fill else None,
        "gt_fill_of_gt_box": round(float(np.mean(gt_fill)), 3) if gt_fill else None,
    }
    if rows:
        from PIL import Image

        os.makedirs(os.path.dirname(os.path.abspath(args.panel)), exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.panel)
        summary["panel"] = args.panel
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
