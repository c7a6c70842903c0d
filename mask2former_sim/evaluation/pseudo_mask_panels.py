"""One PNG grid per GT instance: what SIM's pseudo labeler makes of it (drawn with NumPy and PIL).

Tiles, left to right, each a crop around the GT box (box drawn in green):

    image        the test-time input, class name in the title
    semantic     S_g, Eq.1 (heat map, 0 dark .. 1 bright); the title gives the IoU of S_g > 0.5 with
                 the GT mask inside the box, as the evaluation computes it (same for the others)
    appearance   A_g, the per-image colour model (only with MODEL.SIM.APPEARANCE.WEIGHT > 0)
    instance     T_g, Eq.6
    combined     R_g, Eq.7
    positives w  the Eq.6 weight of each positive: one bar per decoder output (0 .. L-1, F = final,
                 +k = extra positives), the weight above the bar; a grey x marks a missing positive
    pseudo Y     Y_g = 1 white, ignored in the box (W = 0) grey, confident background black,
                 outside the box dark blue (supervised as background only with
                 MODEL.SIM.OUTSIDE_BOX_NEGATIVES)
    student      the student's matched final-output mask probability (heat map)
    GT mask      when the split has masks

A model without a teacher gets image, student and GT only. Maps live on the loss grid and are
shown with nearest-neighbour upsampling, so one grid cell is one visible block.
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detectron2.data import MetadataCatalog

from .pseudo_masks import BatchPseudoMasks, PseudoMaskEvalMapper, dataset_records, mask_iou, pseudo_mask_outputs

__all__ = ["write_pseudo_mask_panels", "instance_panel", "heat_colors", "weight_bars"]

_TITLE_H = 14
_BACKGROUND = (40, 40, 40)
_BOX = (60, 230, 90)
# anchors of a dark-blue -> magenta -> orange -> yellow ramp
_RAMP = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], dtype=np.float64)


def _font():
    return ImageFont.load_default()


def heat_colors(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] (clipped) -> (H, W, 3) uint8 on a dark-to-bright ramp."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_RAMP) - 2)
    t = (v - lo)[..., None]
    return np.rint(_RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t).astype(np.uint8)


def _pseudo_colors(targets: np.ndarray, weights: np.ndarray, in_box: np.ndarray) -> np.ndarray:
    out = np.zeros((*targets.shape, 3), dtype=np.uint8)
    out[...] = (25, 25, 70)  # outside the box
    out[in_box & (weights > 0)] = (0, 0, 0)
    out[in_box & (weights <= 0)] = (140, 140, 140)
    out[in_box & (targets > 0.5)] = (255, 255, 255)
    return out


def _binary_colors(mask: np.ndarray) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    out[mask.astype(bool)] = (255, 255, 255)
    return out


def weight_bars(weights: Sequence[float], valid: Sequence[bool], names: Sequence[str], height: int = 96) -> np.ndarray:
    """A bar chart of positive weights in [0, 1]: one bar per positive, its value above it, its name
    below; invalid positives are a grey x. Returns (height, width, 3) uint8."""
    if not len(weights) == len(valid) == len(names):
        raise ValueError(f"weight_bars: {len(weights)} weights, {len(valid)} flags and {len(names)} names")
    step, bar = 28, 14
    width = max(height, step * len(weights) + 8)
    img = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font()
    top, bottom = 14, height - 14
    draw.line([(2, bottom), (width - 3, bottom)], fill=(120, 120, 120))
    for i, (w, ok, name) in enumerate(zip(weights, valid, names)):
        x = 6 + i * step
        draw.text((x, bottom + 2), str(name), fill=(220, 220, 220), font=font)
        if not ok:
            draw.line([(x, bottom - 10), (x + bar, bottom)], fill=(130, 130, 130))
            draw.line([(x, bottom), (x + bar, bottom - 10)], fill=(130, 130, 130))
            continue
        w = float(min(max(w, 0.0), 1.0))
        y = bottom - int(round(w * (bottom - top)))
        draw.rectangle([x, y, x + bar, bottom], fill=(250, 170, 60))
        draw.text((x - 4, max(y - 12, 0)), f"{w:.2f}"[1:] if w < 1 else "1.0", fill=(240, 240, 240), font=font)
    return np.asarray(img)


def _positive_names(num_levels: int, num_positives: int) -> List[str]:
    names = [str(i) for i in range(num_levels - 1)] + ["F"]
    return names + [f"+{k + 1}" for k in range(num_positives - num_levels)]


def _crop_window(box: Sequence[float], image_hw: Tuple[int, int], stride: int) -> Tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    margin = 0.15 * max(x1 - x0, y1 - y0) + 2 * stride
    h, w = image_hw
    cx0, cy0 = int(max(0, np.floor(x0 - margin))), int(max(0, np.floor(y0 - margin)))
    cx1, cy1 = int(min(w, np.ceil(x1 + margin))), int(min(h, np.ceil(y1 + margin)))
    return cx0, cy0, max(cx1, cx0 + 1), max(cy1, cy0 + 1)


def _tile(rgb: np.ndarray, window, box, size: int, smooth: bool) -> np.ndarray:
    """Crop ``window`` of an input-resolution RGB array, fit it into size x size, draw ``box``."""
    cx0, cy0, cx1, cy1 = window
    crop = Image.fromarray(np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1]))
    scale = size / max(cx1 - cx0, cy1 - cy0)
    new_w, new_h = max(1, int(round((cx1 - cx0) * scale))), max(1, int(round((cy1 - cy0) * scale)))
    crop = crop.resize((new_w, new_h), Image.BILINEAR if smooth else Image.NEAREST)
    canvas = Image.new("RGB", (size, size), _BACKGROUND)
    ox, oy = (size - new_w) // 2, (size - new_h) // 2
    canvas.paste(crop, (ox, oy))
    x0, y0, x1, y1 = ((float(v) - o) * scale + p for v, o, p in zip(box, (cx0, cy0, cx0, cy0), (ox, oy, ox, oy)))
    ImageDraw.Draw(canvas).rectangle([x0, y0, x1 - 1, y1 - 1], outline=_BOX)
    return np.asarray(canvas)


def _titled(tile: np.ndarray, title: str) -> np.ndarray:
    h, w = tile.shape[:2]
    img = Image.new("RGB", (w, h + _TITLE_H), (0, 0, 0))
    img.paste(Image.fromarray(tile), (0, _TITLE_H))
    ImageDraw.Draw(img).text((2, 1), title, fill=(255, 255, 255), font=_font())
    return np.asarray(img)


def _concat(tiles: List[np.ndarray], gap: int = 4) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    parts = []
    for t in tiles:
        pad = np.zeros((height, t.shape[1] + gap, 3), dtype=np.uint8)
        pad[: t.shape[0], : t.shape[1]] = t
        parts.append(pad)
    return np.concatenate(parts, axis=1)[:, :-gap]


def instance_panel(batch: BatchPseudoMasks, g: int, class_name: str = "", tile: int = 96) -> np.ndarray:
    """The (H, W, 3) uint8 panel of GT ``g`` of ``batch`` (see the module docstring)."""
    s = batch.stride
    b = int(batch.batch_idx[g])
    image = batch.images[b].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    box = batch.boxes[g].tolist()
    window = _crop_window(box, batch.image_sizes[b], s)

    def up(grid: torch.Tensor) -> np.ndarray:  # loss grid -> input resolution, nearest
        return grid.float().cpu().numpy().repeat(s, axis=0).repeat(s, axis=1)

    gt = batch.gt_masks[g] if batch.gt_masks is not None else None
    in_box = batch.in_box[g]

    def iou_note(pred: torch.Tensor) -> str:  # " IoU" with the GT inside the box, as in the evaluation
        if gt is None:
            return ""
        iou = float(mask_iou(pred[None], (gt & in_box)[None], in_box[None])[0])
        return f" {iou:.2f}"

    tiles = [_titled(_tile(image, window, box, tile, True), class_name or f"class {int(batch.labels[g])}")]
    p = batch.pseudo
    if p is not None:
        maps = [("semantic", p.semantic[g])]
        if getattr(p, "appearance", None) is not None:
            maps.append(("appearance", p.appearance[g]))
        maps += [("instance", p.instance[g]), ("combined", p.combined[g])]
        for name, grid in maps:
            tiles.append(_titled(_tile(heat_colors(up(grid)), window, box, tile, False), name + iou_note(grid > 0.5)))
        weights = p.positive_weights[g].tolist()
        valid = p.positive_valid[g].tolist()
        bars = weight_bars(weights, valid, _positive_names(batch.num_levels, len(weights)), tile)
        tiles.append(_titled(bars, "positives w"))
        colors = _pseudo_colors(up(p.targets[g]), up(p.weights[g]), up(in_box) > 0.5)
        tiles.append(_titled(_tile(colors, window, box, tile, False), "pseudo Y" + iou_note(p.targets[g] > 0.5)))
    tiles.append(_titled(_tile(heat_colors(up(batch.student[g])), window, box, tile, False),
                         "student" + iou_note(batch.student[g] > 0.5)))
    if gt is not None:
        tiles.append(_titled(_tile(_binary_colors(up(gt) > 0.5), window, box, tile, False), "GT mask"))
    return _concat(tiles)


def _safe(text) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def write_pseudo_mask_panels(
    model,
    cfg,
    dataset_name: Optional[str],
    out_dir: str,
    max_instances: int = 16,
    *,
    image_ids: Optional[Sequence] = None,
    max_images: Optional[int] = None,
    use_teacher: bool = True,
    tile: int = 96,
    iteration: int = 0,
) -> List[str]:
    """Write ``<out_dir>/<image id>_gt<k>_<class>.png``, one per GT instance, for the images of
    ``dataset_name`` (default DATASETS.TEST[0]) in split order, or those whose ``image_id`` is in
    ``image_ids``, until ``max_instances`` panels are written. GT masks are drawn where the
    split has them. Returns the written paths. Changes no model state."""
    from ..engine.sim_hooks import unwrap

    if int(max_instances) < 1:
        raise ValueError(f"max_instances must be >= 1, got {max_instances}")
    if dataset_name is None:
        if not cfg.DATASETS.TEST:
            raise ValueError("write_pseudo_mask_panels: no dataset_name given and DATASETS.TEST is empty")
        dataset_name = cfg.DATASETS.TEST[0]
    model = unwrap(model)
    records = dataset_records(dataset_name, None if image_ids is not None else max_images, require_masks=False)
    if image_ids is not None:
        wanted = [str(i) for i in image_ids]
        by_id: Dict[str, dict] = {str(r.get("image_id")): r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise KeyError(f"image ids {missing[:10]} are not in dataset '{dataset_name}' (ids look like {list(by_id)[:5]})")
        records = [by_id[i] for i in wanted]
    class_names = MetadataCatalog.get(dataset_name).get("thing_classes")
    mapper = PseudoMaskEvalMapper(cfg, dataset_name, require_masks=False)
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    for record in records:
        inputs = mapper(record)
        if len(inputs["instances"]) == 0:
            continue
        batch = pseudo_mask_outputs(model, [inputs], iteration, use_teacher)
        for g in range(len(batch.labels)):
            c = int(batch.labels[g])
            name = str(class_names[c]) if class_names is not None and c < len(class_names) else f"class{c}"
            panel = instance_panel(batch, g, name, tile)
            path = os.path.join(out_dir, f"{_safe(record.get('image_id', len(written)))}_gt{g:02d}_{_safe(name)}.png")
            Image.fromarray(panel).save(path)
            written.append(path)
            if len(written) >= max_instances:
                return written
    return written
