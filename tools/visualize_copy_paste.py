#!/usr/bin/env python
"""Training samples after SIM's online copy-paste (METHOD.md §3), one PNG per image.

    .venv/bin/python tools/visualize_copy_paste.py --config-file configs/synthetic/sim_cp_R18_synth.yaml \
        --weights output/sim_cp/model_final.pth --output cp_panels/ [--images 4] [--steps 4] \
        [--panel-size 384] [--opts KEY VALUE ...]

Builds the model of the config with the checkpoint's student, SIM teacher (and, with
MODEL.SIM.COPY_PASTE.BANK_IN_CHECKPOINT, the bank saved in it), in training mode. ``--steps`` forward passes
on training batches (no gradient, no optimizer step, at an iteration past MODEL.SIM.WARMUP_ITERS)
fill the bank the way training does: the model's forward pushes one entry per image from the
teacher's instance maps. Then every image receives a paste (PROB forced to 1.0):
``model.copy_paste.paste`` on further preprocessed training batches, and each PNG shows

    left   the image as loaded, with its GT boxes (one palette colour per GT)
    right  the image with the pastes: every pasted mask (fill + contour, its tight box, label
           "+class"), the originals' updated boxes (solid, the GT's colour) and the originals
           dropped as occluded (dashed box in the GT's colour and a red cross)

Files are <output>/<k>_<image id>.png; the drawing comes from mask2former_sim/engine/visualize.py
(draw_instances) and the tiling from mask2former_sim/evaluation/pseudo_mask_panels.py.
DATALOADER.NUM_WORKERS is set to 0. KEY VALUE overrides may follow --opts or stand alone.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DROP_COLOR = (255, 0, 0)


def parse_args(argv=None):
    from mask2former_sim.evaluation.pseudo_masks import add_opts_argument, checkpoint_tool_parser

    p = checkpoint_tool_parser(__doc__, what="checkpoint (.pth) of a copy-paste SIM training (train_net.py)")
    p.add_argument("--output", required=True, help="directory for the PNGs")
    p.add_argument("--images", type=int, default=4, help="pasted training images to draw (default 4)")
    p.add_argument("--steps", type=int, default=4, help="forward passes that fill the bank first (default 4)")
    p.add_argument("--panel-size", type=int, default=384, help="longer side of each panel in pixels (default 384)")
    p.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=[],
                   help="config overrides KEY VALUE ... (the same as giving them without --opts)")
    add_opts_argument(p)
    args = p.parse_args(argv)
    for name in ("images", "panel_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    args.opts = list(args.opts) + list(args.opts_flag)
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got an odd number of items: {args.opts}")
    if not os.path.isfile(args.config_file):
        p.exit(2, f"{p.prog}: error: --config-file: no such config file {args.config_file!r}\n")
    if not os.path.isfile(args.weights):
        p.exit(2, f"{p.prog}: error: --weights: no such checkpoint file {args.weights!r}\n")
    return args


def _hwc(image):
    return image.permute(1, 2, 0).clamp(0, 255).round().byte().cpu().numpy()


def draw_sample(raw, raw_pasted, target, pasted_target, record, class_names, panel):
    """(H', W', 3) uint8: the original (left) and the pasted image (right) of one training image."""
    import numpy as np
    from PIL import Image, ImageDraw

    from mask2former_sim.engine.visualize import draw_instances, instance_color
    from mask2former_sim.evaluation.pseudo_mask_panels import _concat, _titled

    def name(c):
        c = int(c)
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    h, w = raw.shape[-2:]
    labels = target["labels"].tolist()
    n = len(labels)
    old_boxes = target["boxes"].detach().float().cpu()
    empty = np.zeros((n, h, w), dtype=bool)
    left = draw_instances(_hwc(raw), empty, [instance_color(i) for i in range(n)], boxes=old_boxes.tolist(),
                          labels=[name(c) for c in labels], size=panel)

    kept, dropped = list(record.kept), list(record.dropped)
    new_boxes = record.new_boxes if record.new_boxes is not None else old_boxes
    n_p = int(pasted_target.get("num_pasted", 0))
    p_masks = pasted_target.get("paste_masks")
    p_masks = p_masks.cpu().numpy() if p_masks is not None and n_p else np.zeros((0, h, w), dtype=bool)
    p_boxes = pasted_target["boxes"][len(pasted_target["labels"]) - n_p:].detach().float().cpu().tolist()
    p_labels = pasted_target["labels"][len(pasted_target["labels"]) - n_p:].tolist()
    masks = np.concatenate([np.zeros((len(kept) + len(dropped), h, w), dtype=bool), p_masks.reshape(-1, h, w)])
    colors = [instance_color(i) for i in kept] + [instance_color(i) for i in dropped] \
        + [instance_color(n + j) for j in range(n_p)]
    boxes = [new_boxes[i].tolist() for i in kept] + [old_boxes[i].tolist() for i in dropped] + p_boxes
    dashed = [False] * len(kept) + [True] * len(dropped) + [False] * n_p
    texts = [name(labels[i]) for i in kept] + [name(labels[i]) + " (dropped)" for i in dropped] \
        + ["+" + name(c) for c in p_labels]
    right = draw_instances(_hwc(raw_pasted), masks, colors, boxes=boxes, labels=texts, dashed=dashed, size=panel)
    if dropped:
        img = Image.fromarray(right)
        draw = ImageDraw.Draw(img)
        scale = right.shape[1] / w
        for i in dropped:
            x0, y0, x1, y1 = (float(v) * scale for v in old_boxes[i].tolist())
            x1, y1 = max(x0, x1 - 1), max(y0, y1 - 1)
            draw.line([(x0, y0), (x1, y1)], fill=DROP_COLOR, width=2)
            draw.line([(x0, y1), (x1, y0)], fill=DROP_COLOR, width=2)
        right = np.asarray(img)
    source = f"entry {record.entry}" if record.entry >= 0 else "no entry"
    return _concat([
        _titled(left, f"original: {n} GT"),
        _titled(right, f"pasted ({source}): +{n_p}, kept {len(kept)}, dropped {len(dropped)}"),
    ])


def main(argv=None):
    args = parse_args(argv)
    import mask2former_sim  # noqa: F401  (compat shim before detectron2)
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.utils.events import EventStorage
    from PIL import Image

    from mask2former_sim.engine.trainer import Trainer
    from mask2former_sim.evaluation.pseudo_masks import load_for_tool

    args.opts = args.opts + ["DATALOADER.NUM_WORKERS", "0"]
    try:
        cfg, _, model, ckpt_iter = load_for_tool(args, use_teacher=True)
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"visualize_copy_paste.py: {e.args[0] if e.args else e}")
    if model.copy_paste is None:
        sys.exit(f"visualize_copy_paste.py: {args.config_file} trains without copy-paste "
                 "(MODEL.SIM.COPY_PASTE.ENABLED False): give a copy-paste config, e.g. "
                 "configs/synthetic/sim_cp_R18_synth.yaml")
    model.train()  # the teacher is no submodule: it stays in eval mode
    cp = model.copy_paste
    if cp.bank_in_checkpoint:  # train_net.py saves it in checkpoint["trainer"] (load_for_tool leaves it)
        from mask2former_sim.engine.sim_hooks import BANK_KEY

        try:
            ckpt = torch.load(args.weights, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip checkpoint: no mmap
            ckpt = torch.load(args.weights, map_location="cpu", weights_only=True)
        cp.load_bank_state((ckpt.get("trainer") or {}).get(BANK_KEY))
        del ckpt
    loaded = len(cp.bank)
    it = max(int(cfg.MODEL.SIM.WARMUP_ITERS), ckpt_iter + 1)
    loader = iter(Trainer.build_train_loader(cfg, start_iter=it))
    with torch.no_grad():
        for _ in range(args.steps):
            with EventStorage(it):
                model(next(loader))  # pastes (PROB of the config) and pushes, as in training
            it += 1
    if not len(cp.bank):
        sys.exit(f"visualize_copy_paste.py: the bank is still empty after {args.steps} steps: no GT's teacher "
                 f"instance map exceeds MODEL.SIM.COPY_PASTE.MASK_THRESH {cp.mask_thresh} (raise --steps, give "
                 "a better-trained checkpoint, or lower the threshold with --opts)")
    print(f"bank: {len(cp.bank)} entries ({loaded} from the checkpoint), {cp.bank.nbytes() / 2 ** 20:.2f} MiB")

    meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None
    class_names = list(getattr(meta, "thing_classes", None) or [])
    cp.prob = 1.0
    os.makedirs(args.output, exist_ok=True)
    rows, written = [], []
    with torch.no_grad():
        while len(written) < args.images:
            batch = next(loader)
            images, raw, valid = model.preprocess(batch)
            targets = model.prepare_targets(batch, images.tensor.shape[-2:])
            raw_p, targets_p, _ = cp.paste(raw, valid, targets, it)
            it += 1
            for b, rec in enumerate(cp.last_records):
                if len(written) >= args.images:
                    break
                panel = draw_sample(raw[b], raw_p[b], targets[b], targets_p[b], rec, class_names, args.panel_size)
                image_id = batch[b].get("image_id", b)
                path = os.path.join(args.output, f"{len(written):03d}_{image_id}.png")
                Image.fromarray(panel).save(path)
                written.append(path)
                rows.append((os.path.basename(path), rec.entry, targets_p[b]["num_pasted"], len(rec.kept),
                             len(rec.dropped)))
                print(f"wrote {path}")
    print("\n| file | bank entry | pasted | kept | dropped |\n|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {} | {} |".format(*r))
    print(f"\nwrote {len(written)} images to {args.output}")
    return written


if __name__ == "__main__":
    main()
