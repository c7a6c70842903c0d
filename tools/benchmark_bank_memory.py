#!/usr/bin/env python
"""Memory of SIM's copy-paste bank (METHOD.md §3) at COCO training size, per process.

    .venv/bin/python tools/benchmark_bank_memory.py [--size 1024] [--entries 100] [--samples N]
        [--seed 0] [--min-objects A] [--max-objects B] [--object-size MIN MAX] [--thresh 0.7]
        [--stride 4] [--budget-mib 64]

Fills a ``MemoryBank(--entries)`` from ``--samples`` synthetic ``--size``² training samples
(default: --entries + 20, so the FIFO has dropped its oldest entries) exactly as the model's
forward does after the warm-up: ``make_entry(image, valid, boxes, classes, instance_maps,
stride, thresh)`` then ``bank.push``. The images come from mask2former_sim/data/synthetic.py
(its generator renders at most 512²: a larger --size is rendered at size / k, k = ceil(size /
512), with the object sizes of its default spec scaled to that canvas, then upsampled, image
bilinear and masks nearest). Every pixel is valid (a full LSJ crop, no padding: the worst case).

Each GT's "teacher instance map" is its visible mask average-pooled to the ``--stride`` loss grid
(the fraction of the cell inside the mask), so ``T_g↑ > thresh`` gives back roughly the mask: the
bank holds what a confident teacher would give it. Reported as a markdown table: bank bytes
(``bank.nbytes()``, MiB), entries, instances per entry, masked pixels per instance, the share of
the GT mask that the paste mask keeps, the bytes' split between RGB pixels and packed masks, and
the time of one make_entry + push. A crowded case: ``--max-objects 20 --object-size 48 160``.
"""
import argparse
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GENERATOR_MAX_SIZE = 512  # SyntheticSpec.image_size is 32..512
DEFAULT_SPEC_SIZE = 128  # the size SyntheticSpec's default object_size is meant for


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="square training canvas in pixels (default 1024, LSJ)")
    p.add_argument("--entries", type=int, default=100, help="bank size, MODEL.SIM.COPY_PASTE.BANK_SIZE (default 100)")
    p.add_argument("--samples", type=int, default=0, help="samples pushed (default: --entries + 20)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    p.add_argument("--min-objects", type=int, default=0, help="objects per image, min (default: the generator's, 2)")
    p.add_argument("--max-objects", type=int, default=0,
                   help="objects per image, max, <= 20 (default: the generator's, 5); 20 for a crowded case")
    p.add_argument("--object-size", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="object extent in pixels of --size (default: the generator's default scaled, "
                        "20..56 of 128 -> 160..448 at 1024)")
    p.add_argument("--thresh", type=float, default=0.7, help="MODEL.SIM.COPY_PASTE.MASK_THRESH (default 0.7)")
    p.add_argument("--stride", type=int, default=4, help="loss grid stride of the instance maps (default 4)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="per-process budget the bank is checked against")
    args = p.parse_args(argv)
    if args.size < 32:
        p.error(f"--size must be >= 32, got {args.size}")
    if args.entries < 1:
        p.error(f"--entries must be >= 1, got {args.entries}")
    if args.samples < 0:
        p.error(f"--samples must be >= 0, got {args.samples}")
    if args.stride < 1 or args.size % args.stride:
        p.error(f"--stride must be a positive divisor of --size {args.size}, got {args.stride}")
    if not 0.0 <= args.thresh < 1.0:
        p.error(f"--thresh must be in [0, 1), got {args.thresh}")
    if args.max_objects and not 1 <= args.max_objects <= 20:
        p.error(f"--max-objects must be in 1..20 (the generator's limit), got {args.max_objects}")
    args.samples = args.samples or args.entries + 20
    return args


def make_spec(args):
    """(SyntheticSpec at the render size, render size, upsampling factor)."""
    from mask2former_sim.data.synthetic import SyntheticSpec

    k = math.ceil(args.size / GENERATOR_MAX_SIZE)
    render = args.size // k
    default = SyntheticSpec()
    lo, hi = default.num_objects
    hi = args.max_objects or hi
    lo = min(args.min_objects or lo, hi)
    if args.object_size:
        osz = tuple(max(1, round(v / k)) for v in args.object_size)
    else:
        osz = tuple(round(v * render / DEFAULT_SPEC_SIZE) for v in default.object_size)
    cap = int(0.6 * render)
    osz = (max(8, min(osz[0], cap)), max(8, min(osz[1], cap)))
    osz = (min(osz), max(osz))
    try:
        spec = SyntheticSpec(num_images=args.samples, seed=args.seed, image_size=render, num_objects=(lo, hi),
                             object_size=osz)
    except ValueError as e:
        sys.exit(f"benchmark_bank_memory: {e}")
    return spec, render, args.size / render


def sample(spec, index, size):
    """(image (3, S, S) float 0..255, boxes (n, 4) XYXY, classes (n,), masks (n, S, S) bool) of
    training image ``index``, upsampled to ``size``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mask2former_sim.data.synthetic import generate_image

    s = generate_image(spec, "train", index)
    image = torch.from_numpy(np.ascontiguousarray(s.image)).permute(2, 0, 1).float()[None]
    vis = [inst.visible_mask for inst in s.instances if inst.visible_mask.any()]
    classes = torch.tensor([inst.category_id - 1 for inst in s.instances if inst.visible_mask.any()],
                           dtype=torch.int64)
    masks = torch.from_numpy(np.stack(vis)) if vis else torch.zeros((0,) + s.image.shape[:2], dtype=torch.bool)
    if image.shape[-1] != size:
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[None].float(), size=(size, size), mode="nearest")[0] > 0.5
    image = image[0].clamp(0, 255)
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return image, boxes, classes, masks


def run(args):
    import torch
    import torch.nn.functional as F

    from mask2former_sim.sim.copy_paste import MemoryBank, make_entry

    torch.set_num_threads(1)
    spec, render, scale = make_spec(args)
    bank = MemoryBank(args.entries)
    push_s, kept_share = [], []
    skipped = 0
    gen_s = 0.0
    valid = torch.ones((args.size, args.size), dtype=torch.bool)
    for i in range(args.samples):
        t = time.perf_counter()
        image, boxes, classes, masks = sample(spec, i, args.size)
        gen_s += time.perf_counter() - t
        maps = F.avg_pool2d(masks[:, None].float(), args.stride)[:, 0] if len(masks) else masks.float()
        t = time.perf_counter()
        entry = make_entry(image, valid, boxes, classes, maps, stride=args.stride, thresh=args.thresh)
        if entry is not None:
            bank.push(entry)
        push_s.append(time.perf_counter() - t)
        if entry is None:
            skipped += 1
            continue
        gt_px = masks.flatten(1).sum(1).double()
        # entry instances are the GTs whose paste mask is not empty: match them by box
        for b, n in zip(entry["boxes"].tolist(), entry["pixel_counts"].tolist()):
            j = [k for k, bb in enumerate(boxes.tolist()) if [int(math.floor(bb[0])), int(math.floor(bb[1])),
                                                                  int(math.ceil(bb[2])), int(math.ceil(bb[3]))] == b]
            if j:
                kept_share.append(n / max(float(gt_px[j[0]]), 1.0))
    entries = list(bank.entries)
    n_inst = [int(e["classes"].numel()) for e in entries]
    px = [int(c) for e in entries for c in e["pixel_counts"].tolist()]
    field_bytes = {}
    for e in entries:
        for k, v in e.items():
            field_bytes[k] = field_bytes.get(k, 0) + v.numel() * v.element_size()
    total = bank.nbytes()
    return {
        "render": render, "scale": scale, "spec": spec, "bank": bank, "total": total, "entries": len(entries),
        "n_inst": n_inst, "px": px, "kept_share": kept_share, "field_bytes": field_bytes, "push_s": push_s,
        "skipped": skipped, "gen_s": gen_s,
    }


def report(args, r) -> str:
    mib = r["total"] / 2 ** 20
    n_inst, px, fb = r["n_inst"], r["px"], r["field_bytes"]
    pix_share = fb.get("pixels", 0) / max(r["total"], 1)
    mask_share = fb.get("masks", 0) / max(r["total"], 1)
    spec = r["spec"]
    lines = [
        f"Bank of {args.entries} entries filled from {args.samples} synthetic {args.size}² samples "
        f"(rendered at {r['render']}² x{r['scale']:g}, {spec.num_objects[0]}..{spec.num_objects[1]} objects of "
        f"{round(spec.object_size[0] * r['scale'])}..{round(spec.object_size[1] * r['scale'])} px, seed {args.seed}; "
        f"stride {args.stride}, thresh {args.thresh})",
        "",
        "| size | samples | entries | bank MiB | MiB / entry | inst / entry (mean, max) | masked px / inst (mean) "
        "| paste mask / GT mask | RGB pixels | packed masks | ms / push (median, max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| {} | {} | {} | {:.2f} | {:.3f} | {:.2f}, {} | {:,.0f} | {:.3f} | {:.1%} | {:.1%} | {:.1f}, {:.1f} |".format(
            args.size, args.samples, r["entries"], mib, mib / max(r["entries"], 1),
            statistics.mean(n_inst) if n_inst else 0.0, max(n_inst) if n_inst else 0,
            statistics.mean(px) if px else 0.0,
            statistics.mean(r["kept_share"]) if r["kept_share"] else 0.0, pix_share, mask_share,
            1e3 * statistics.median(r["push_s"]), 1e3 * max(r["push_s"])),
        "",
        f"{'within' if mib <= args.budget_mib else 'OVER'} the {args.budget_mib:g} MiB per-process budget "
        f"({mib:.2f} MiB); {r['skipped']} samples gave no entry; rendering took {r['gen_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    import mask2former_sim  # noqa: F401  (compat shim before detectron2)

    r = run(args)
    text = report(args, r)
    print(text)
    return r


if __name__ == "__main__":
    main()
