#!/usr/bin/env python
"""Side-by-side predictions of several runs on the same validation images, one PNG per image.

    .venv/bin/python tools/compare_predictions.py RUN_DIR [RUN_DIR ...] --out DIR \
        [--images N | --image-ids ID [ID ...]] [--score-thresh 0.5] [--max-per-image 10] \
        [--weights-name model_final.pth] [--panel-size 320] [--opts KEY VALUE ...]

A RUN_DIR is an OUTPUT_DIR of train_net.py: its config.yaml (the run's full config) plus --opts
builds the model, and its weights are --weights-name (default model_final.pth) or, when that
file is missing, the checkpoint named by last_checkpoint. The images are the first N
(default 4) or the chosen image ids of the FIRST run's DATASETS.TEST[0], a split with GT masks.

DIR/<image id>.png holds one panel per column: "GT" (the GT masks), then one per run, titled
with the run's name (its directory name, as in tools/compare_runs.py), its final mask AP from
metrics.json when there is one, and how many GTs its predictions matched. Every run shows the
predictions with score >= --score-thresh, at most --max-per-image of them, highest first.

Colours follow the instances: GT k has one palette colour in every panel; a prediction takes
the colour of the GT it is matched to (greedy by score, mask IoU >= 0.5, one prediction per
GT, class-agnostic), a prediction matched to no GT (a false positive, or a duplicate) is grey
with a dashed box and a thin contour. Labels are "class score" (GT panel: the class).
Drawing helpers: mask2former_sim/engine/visualize.py (match_to_gt, draw_instances).
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, ROOT)

DEFAULT_IMAGES = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIRs of train_net.py runs")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument("--images", type=int, default=None,
                        help=f"the first N images of the split (default {DEFAULT_IMAGES})")
    chosen.add_argument("--image-ids", nargs="+", default=None, metavar="ID", help="these image_id values instead")
    p.add_argument("--score-thresh", type=float, default=0.5, help="predictions shown: score >= this (default 0.5)")
    p.add_argument("--max-per-image", type=int, default=10, help="at most this many per run and image (default 10)")
    p.add_argument("--weights-name", default="model_final.pth",
                   help="checkpoint file inside each RUN_DIR (default model_final.pth; else last_checkpoint's)")
    p.add_argument("--panel-size", type=int, default=320, help="longer side of each panel in pixels (default 320)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ... applied to every run's config.yaml")
    args = p.parse_args(argv)
    for name in ("images", "max_per_image", "panel_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if len(args.opts) % 2:
        p.error(f"--opts takes KEY VALUE pairs, got an odd number of items: {args.opts}")
    return args


def run_files(run_dir: str, weights_name: str):
    """(config.yaml, weights) paths of a run directory, or an error message naming what is missing."""
    if not os.path.isdir(run_dir):
        return None, f"run {run_dir}: no such directory"
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        return None, f"run {run_dir}: no config.yaml (expected {config}, written by train_net.py)"
    weights = os.path.join(run_dir, weights_name)
    if os.path.isfile(weights):
        return (config, weights), None
    tag = os.path.join(run_dir, "last_checkpoint")
    named = ""
    if os.path.isfile(tag):
        with open(tag) as f:
            named = f.read().strip()
        if named and os.path.isfile(os.path.join(run_dir, named)):
            return (config, os.path.join(run_dir, named)), None
    also = f"; last_checkpoint names {named}, which is missing too" if named else "; no last_checkpoint either"
    return None, f"run {run_dir}: no weights {weights_name} (expected {weights}{also})"


def final_mask_ap(run_dir: str):
    """segm/AP of the last evaluation in the run's metrics.json, or None."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    ap = None
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "segm/AP" in row:
                ap = row["segm/AP"]
    return ap


def run_names(paths):
    """Directory names, made unique as tools/compare_runs.py does (its ``unique_names``)."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    from compare_runs import unique_names

    return unique_names(paths)


def choose_records(records, dataset, images, image_ids):
    if image_ids is None:
        return records[: images or DEFAULT_IMAGES]
    by_id = {str(r.get("image_id")): r for r in records}
    missing = [i for i in image_ids if str(i) not in by_id]
    if missing:
        sys.exit(f"compare_predictions: image id(s) {', '.join(missing)} not in dataset '{dataset}' "
                 f"({len(records)} images; ids look like {', '.join(list(by_id)[:5])})")
    return [by_id[str(i)] for i in image_ids]


def gt_of(record, class_names):
    """(masks (G, H, W) bool, boxes (G, 4) XYXY, labels) of a record's non-crowd annotations."""
    import numpy as np
    from detectron2.structures import BoxMode

    from mask2former_sim.data.mappers import annotation_mask

    h, w = int(record["height"]), int(record["width"])
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    masks = [annotation_mask(a["segmentation"], h, w) > 0 for a in annos]
    boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    labels = [class_label(class_names, int(a["category_id"])) for a in annos]
    masks = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return masks, np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels


def class_label(class_names, c: int) -> str:
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else f"class {c}"


def load_run(run_dir, config, weights, opts, dataset):
    """(cfg, dataset, model) of one run, through the pseudo-mask tools' loader; a config or
    checkpoint problem exits with a message naming the run."""
    from mask2former_sim.evaluation.pseudo_masks import load_for_tool

    ns = argparse.Namespace(config_file=config, opts=list(opts), dataset=dataset, weights=weights)
    try:
        cfg, dataset, model, _ = load_for_tool(ns, use_teacher=False)
    except (FileNotFoundError, KeyError, ValueError, AssertionError, RuntimeError) as e:
        sys.exit(f"compare_predictions: run {run_dir}: cannot load {config} + {weights}: {e}")
    return cfg, dataset, model


def predictions(model, cfg, records, score_thresh, max_per_image):
    """Per record: the kept predictions as numpy (masks, boxes, scores, classes), highest score first."""
    from mask2former_sim.engine.visualize import predict_images

    out = []
    for _, inst in predict_images(model, cfg, [r["file_name"] for r in records]):
        inst = inst[inst.scores >= score_thresh]
        inst = inst[inst.scores.argsort(descending=True)[:max_per_image]]
        out.append({
            "masks": inst.pred_masks.numpy().astype(bool),
            "boxes": inst.pred_boxes.tensor.numpy(),
            "scores": inst.scores.numpy(),
            "classes": inst.pred_classes.numpy(),
        })
    return out


def main(argv=None):
    args = parse_args(argv)
    paths = list(dict.fromkeys(os.path.normpath(p) for p in args.runs))
    files, problems = [], []
    for p in paths:
        found, problem = run_files(p, args.weights_name)
        files.append(found)
        if problem:
            problems.append(problem)
    if problems:
        sys.exit("compare_predictions: " + "\n".join(problems))
    names = run_names(paths)

    import gc

    import numpy as np
    from PIL import Image

    import mask2former_sim  # noqa: F401  (Pillow shim before detectron2)
    from detectron2.data import MetadataCatalog

    from mask2former_sim.data.mappers import read_image_checked
    from mask2former_sim.engine.visualize import draw_instances, instance_color, match_to_gt
    from mask2former_sim.evaluation.pseudo_mask_panels import _concat, _safe, _titled
    from mask2former_sim.evaluation.pseudo_masks import dataset_records

    dataset, records, class_names, per_run = "", None, None, []
    for p, (config, weights) in zip(paths, files):
        cfg, ds, model = load_run(p, config, weights, args.opts, dataset)
        if records is None:  # the first run names the split
            dataset = ds
            try:
                all_records = dataset_records(dataset, None, require_masks=True)
            except (KeyError, ValueError) as e:
                sys.exit(f"compare_predictions: run {p}: {e}")
            records = choose_records(all_records, dataset, args.images, args.image_ids)
            class_names = MetadataCatalog.get(dataset).get("thing_classes")
            if not records:
                sys.exit(f"compare_predictions: dataset '{dataset}' has no images")
        print(f"{names[len(per_run)]}: {weights} on {len(records)} image(s) of {dataset}", flush=True)
        per_run.append(predictions(model, cfg, records, args.score_thresh, args.max_per_image))
        del model
        gc.collect()

    aps = [final_mask_ap(p) for p in paths]
    os.makedirs(args.out, exist_ok=True)
    written = []
    for i, record in enumerate(records):
        rgb = read_image_checked(record["file_name"], "RGB")
        gt_masks, gt_boxes, gt_labels = gt_of(record, class_names)
        order = np.argsort(-gt_masks.reshape(len(gt_masks), -1).sum(1), kind="stable")  # small GTs on top
        gt_panel = draw_instances(rgb, gt_masks[order], [instance_color(int(g)) for g in order],
                                  gt_boxes[order], [gt_labels[g] for g in order], size=args.panel_size)
        tiles = [_titled(gt_panel, f"GT ({len(gt_masks)} instances)")]
        for name, ap, preds in zip(names, aps, per_run):
            pred = preds[i]
            owner = match_to_gt(pred["masks"], pred["scores"], gt_masks)
            draw = list(range(len(owner)))[::-1]  # lowest score first: the best on top
            panel = draw_instances(
                rgb, pred["masks"][draw], [instance_color(owner[k]) for k in draw], pred["boxes"][draw],
                [f"{class_label(class_names, int(pred['classes'][k]))} {pred['scores'][k]:.2f}" for k in draw],
                dashed=[owner[k] < 0 for k in draw], size=args.panel_size)
            matched = sum(o >= 0 for o in owner)
            title = name + ("" if ap is None else f"  mask AP {ap:.1f}")
            title += f"  {matched}/{len(gt_masks)} GT matched, {len(owner) - matched} FP"
            tiles.append(_titled(panel, title))
        image_id = record.get("image_id")
        stem = _safe(image_id) if image_id is not None else _safe(os.path.splitext(os.path.basename(record["file_name"]))[0])
        header = (f"image {image_id if image_id is not None else stem} of {dataset}: score >= {args.score_thresh:g}, "
                  f"at most {args.max_per_image} per run; grey dashed = matched to no GT (mask IoU < 0.5)")
        figure = _titled(_concat(tiles, gap=6), header)
        path = os.path.join(args.out, f"{stem}.png")
        Image.fromarray(figure).save(path)
        written.append(path)
        print(path, flush=True)
    print(f"wrote {len(written)} PNG(s) to {args.out}")
    return written


if __name__ == "__main__":
    main()
