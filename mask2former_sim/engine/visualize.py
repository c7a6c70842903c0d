"""Prediction overlays as PNG (detectron2's Visualizer), for the demo job and demo/demo.py."""
import os
from typing import Iterable, List

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..data.mappers import BoxSupTestMapper, read_image_checked


@torch.no_grad()
def predict_images(model, cfg, image_paths: Iterable[str]) -> List:
    """Run the model in eval mode on image files; returns (rgb image, Instances on CPU) pairs."""
    mapper = BoxSupTestMapper(cfg, is_train=False)
    was_training = model.training
    model.eval()
    out = []
    try:
        for path in image_paths:
            rgb = read_image_checked(path, "RGB")
            record = {"file_name": path, "height": rgb.shape[0], "width": rgb.shape[1], "image_id": path}
            inputs = mapper(record)
            pred = model([inputs])[0]["instances"].to("cpu")
            out.append((rgb, pred))
    finally:
        model.train(was_training)
    return out


def draw_overlay(rgb: np.ndarray, instances, metadata, score_thresh: float, max_per_image: int = 10) -> np.ndarray:
    """The ``max_per_image`` highest-scoring detections with score >= ``score_thresh``."""
    keep = instances[instances.scores >= score_thresh]
    keep = keep[keep.scores.argsort(descending=True)[:max_per_image]]
    vis = Visualizer(rgb, metadata=metadata, scale=2.0, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(keep).get_image()


def write_overlays(model, cfg, image_paths: Iterable[str], out_dir: str, score_thresh: float = 0.5,
                   metadata_name: str = "", max_per_image: int = 10) -> List[str]:
    """Predict and write ``<out_dir>/<name>.png`` overlays; returns the written paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    name = metadata_name or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    metadata = MetadataCatalog.get(name)
    written = []
    for path, (rgb, pred) in zip(image_paths, predict_images(model, cfg, image_paths)):
        overlay = draw_overlay(rgb, pred, metadata, score_thresh, max_per_image)
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(overlay).save(dst)
        written.append(dst)
    return written


# ------------------------------------------------------------------ instance-coloured panels
# Side-by-side figures (tools/compare_predictions.py): every GT instance keeps one colour in
# every panel; a prediction takes the colour of the GT it is matched to, false positives are grey.
INSTANCE_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (255, 100, 100),
)
"""Colour of GT instance ``i``: ``INSTANCE_PALETTE[i % len(INSTANCE_PALETTE)]`` (RGB, no grey)."""
UNMATCHED_COLOR = (150, 150, 150)
"""Colour of a prediction matched to no GT (a false positive)."""


def instance_color(index: int) -> tuple:
    """The palette colour of GT ``index``; ``UNMATCHED_COLOR`` for a negative index."""
    return UNMATCHED_COLOR if index < 0 else INSTANCE_PALETTE[index % len(INSTANCE_PALETTE)]


def match_to_gt(pred_masks, scores, gt_masks, iou_thresh: float = 0.5) -> List[int]:
    """Greedy one-to-one matching of predicted to GT masks, highest score first: each prediction
    takes the still unmatched GT of highest mask IoU if that IoU is >= ``iou_thresh``.

    pred_masks (P, H, W) and gt_masks (G, H, W) boolean (arrays or tensors), scores (P,).
    Returns, for every prediction in input order, the index of its GT or -1 (class-agnostic:
    the colour says which object, the label says which class)."""
    pred = torch.as_tensor(np.asarray(pred_masks), dtype=torch.bool).flatten(1).float()
    gt = torch.as_tensor(np.asarray(gt_masks), dtype=torch.bool).flatten(1).float()
    owner = [-1] * pred.shape[0]
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return owner
    if pred.shape[1] != gt.shape[1]:
        raise ValueError(f"match_to_gt: predicted masks {tuple(np.shape(pred_masks))} and GT masks "
                         f"{tuple(np.shape(gt_masks))} differ in size")
    inter = pred @ gt.T
    union = pred.sum(1, keepdim=True) + gt.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(union))
    taken = torch.zeros(gt.shape[0], dtype=torch.bool)
    for p in torch.as_tensor(np.asarray(scores, dtype=np.float64)).argsort(descending=True).tolist():
        row = iou[p].masked_fill(taken, -1.0)
        g = int(row.argmax())
        if float(row[g]) >= iou_thresh:
            owner[p] = g
            taken[g] = True
    return owner


def _morph(mask: np.ndarray, r: int, dilate: bool) -> np.ndarray:
    """Binary erosion (or dilation) by a (2r+1) square; outside the image counts as background."""
    out = mask.copy()
    h, w = mask.shape
    padded = np.zeros((h + 2 * r, w + 2 * r), dtype=bool)
    padded[r:r + h, r:r + w] = mask
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            window = padded[r + dy:r + dy + h, r + dx:r + dx + w]
            out = (out | window) if dilate else (out & window)
    return out


def _label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: the bitmap font
        return ImageFont.load_default()


def _dashed_rectangle(draw, box, color, width: int, dash: int = 5) -> None:
    x0, y0, x1, y1 = box
    for (ax, ay), (bx, by) in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for k in range(0, steps, 2):
            t0, t1 = k / steps, min(1.0, (k + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=width)


def draw_instances(rgb: np.ndarray, masks, colors, boxes=None, labels=None, dashed=None, size: int = 0,
                   alpha: float = 0.45, line: int = 2) -> np.ndarray:
    """Draw instances in given colours on an RGB image: mask fill blended with ``alpha``, mask
    contour (with a dark rim outside it) and box in the full colour, label text on a dark plate at the box's top-left corner (moved down past the plates already
    drawn where they would overlap).

    masks (N, H, W) bool at the image's resolution; colors N RGB triples; boxes (N, 4) XYXY in
    image pixels (default: the masks' tight boxes); labels N strings; dashed N flags (dashed box
    a 1-pixel contour and a lighter fill, for false positives). Instances are drawn in order (later ones on
    top). ``size`` > 0 scales the image so that its longer side is ``size`` pixels (image
    bilinear, masks nearest). Returns (H', W', 3) uint8."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    scale = float(size) / max(h, w) if size and size > 0 else 1.0
    out_w, out_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    base = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if (out_w, out_h) != (w, h):
        base = base.resize((out_w, out_h), Image.BILINEAR)
    canvas = np.asarray(base).astype(np.float32)
    masks = np.asarray(masks, dtype=bool).reshape(-1, h, w)
    n = len(masks)
    dashed = [False] * n if dashed is None else [bool(d) for d in dashed]
    if not len(colors) == len(dashed) == n or (labels is not None and len(labels) != n):
        raise ValueError(f"draw_instances: {n} masks, {len(colors)} colours, {len(dashed)} dashed flags"
                         + ("" if labels is None else f", {len(labels)} labels"))
    scaled = []
    for m in masks:
        if (out_w, out_h) != (w, h):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((out_w, out_h), Image.NEAREST)) > 127
        scaled.append(m)
    for m, c, d in zip(scaled, colors, dashed):  # fills first: contours and text stay visible on top
        a = alpha * (0.6 if d else 1.0)
        canvas[m] = canvas[m] * (1.0 - a) + np.asarray(c, dtype=np.float32) * a
    for m, c, d in zip(scaled, colors, dashed):
        if not d:  # a dark rim outside the contour: the colour reads on any background
            canvas[_morph(m, 1, True) & ~m] = (0, 0, 0)
        canvas[m & ~_morph(m, 1 if d else max(1, line), False)] = c
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    font = _label_font(max(10, min(16, out_h // 24)))
    if boxes is None:
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else None)
    scaled_boxes = []
    for box, c, d in zip(boxes, colors, dashed):  # every box before any label: no line crosses a label
        if box is None:
            scaled_boxes.append(None)
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
        scaled_boxes.append((x0, y0))
        if d:
            _dashed_rectangle(draw, (x0, y0, x1, y1), tuple(c), 1)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=tuple(c), width=max(1, line // 2))
    placed = []  # label plates drawn so far, (x0, y0, x1, y1)
    for i, (corner, c) in enumerate(zip(scaled_boxes, colors)):
        if corner is None or labels is None or not labels[i]:
            continue
        x0, y0 = corner
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        tw, th = right - left + 7, bottom - top + 3
        tx = min(max(0.0, x0), max(0.0, out_w - tw))
        ty = y0 - th if y0 - th >= 0 else min(y0 + 1, out_h - th)
        for _ in range(len(placed)):  # step down past the labels already placed
            hit = [b for b in placed if tx < b[2] and b[0] < tx + tw and ty < b[3] and b[1] < ty + th]
            if not hit or max(b[3] for b in hit) + 1 + th > out_h:
                break
            ty = max(b[3] for b in hit) + 1
        placed.append((tx, ty, tx + tw, ty + th))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=(0, 0, 0))
        draw.rectangle([tx, ty, tx + 2, ty + th], fill=tuple(c))
        draw.text((tx + 4 - left, ty + 1 - top), labels[i], fill=(255, 255, 255), font=font)
    return np.asarray(img)
