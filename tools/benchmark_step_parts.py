#!/usr/bin/env python
"""Micro-benchmarks behind two CPU speed choices (synthetic-config sizes, random inputs).

    .venv/bin/python tools/benchmark_step_parts.py [--threads 1] [--repeats 10] [--parts optimizer colour criterion appearance]

1. Optimizer step + full-model gradient clipping of the synthetic model's parameters:
   per-parameter loop (foreach=False) vs multi-tensor (foreach=True).
2. Lab colour distance to the 8 neighbours on a stride-2 grid of 8 images (64 x 64):
   torch.linalg.vector_norm over the channel dim vs sqrt of the summed squares.
3. BoxSupSetCriterion forward and backward (8 images, 20 queries, 7 decoder outputs,
   32 x 32 mask grid of a 128 px input, 3 boxes per image) at MODEL.BOXSUP.LOSS_STRIDE 4, 2, 1.
4. SIM's appearance maps (MODEL.SIM.APPEARANCE, sim/appearance.py, 32 levels per channel) at the
   synthetic step's size (8 images, 64 x 64 loss grid, 3 GTs each) and at one COCO GPU's (2 images of
   1024 px, 256 x 256 grid, 20 GTs each).
Prints a markdown table of mean seconds per call.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mask2former_sim  # noqa: E402,F401

from detectron2.modeling import build_model  # noqa: E402

import mask2former_sim.modeling  # noqa: E402,F401
from mask2former_sim.engine.setup import build_cfg  # noqa: E402
from mask2former_sim.modeling.criterion import BoxSupSetCriterion  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/synthetic/boxinst_R18_synth.yaml")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def optimizer_rows(cfg, repeats: int):
    params = [p for p in build_model(cfg).parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    for foreach in (False, True):
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 0.01, foreach=foreach)
            opt.step()

        yield f"AdamW step + clipping, foreach={foreach} ({len(params)} tensors)", timed(step, repeats)


def colour_distance_rows(repeats: int):
    from mask2former_sim.modeling.losses.pairwise import gather_neighbours

    lab = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 30
    nb = gather_neighbours(lab, 3, 2)
    yield "colour distance, linalg.vector_norm(dim=1)", timed(lambda: torch.linalg.vector_norm(lab[:, :, None] - nb, dim=1), repeats)
    yield "colour distance, square().sum(1).sqrt()", timed(lambda: (lab[:, :, None] - nb).square().sum(1).sqrt(), repeats)


def criterion_rows(cfg, repeats: int):
    g = torch.Generator().manual_seed(0)
    batch, queries, classes = 8, cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES

    def output():
        return {"pred_logits": torch.randn(batch, queries, classes + 1, generator=g).requires_grad_(),
                "pred_masks": torch.randn(batch, queries, 32, 32, generator=g).requires_grad_()}

    outputs = output()
    outputs["aux_outputs"] = [output() for _ in range(cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(3, 2, generator=g) * 80
        targets.append({"labels": torch.randint(0, classes, (3,), generator=g),
                        "boxes": torch.cat([xy, xy + 10 + torch.rand(3, 2, generator=g) * 30], 1)})
    info = {"images": torch.rand(batch, 3, 128, 128, generator=g) * 255,
            "valid": torch.ones(batch, 128, 128, dtype=torch.bool)}
    for stride in (4, 2, 1):
        cfg_s = cfg.clone()
        cfg_s.defrost()
        cfg_s.MODEL.BOXSUP.LOSS_STRIDE = stride
        crit = BoxSupSetCriterion.from_config(cfg_s)
        yield f"criterion forward, LOSS_STRIDE {stride}", timed(lambda: crit(outputs, targets, info, 10**6), repeats)
        yield f"criterion forward + backward, LOSS_STRIDE {stride}", timed(
            lambda: sum(crit(outputs, targets, info, 10**6).values()).backward(), repeats)


def appearance_rows(repeats: int):
    from mask2former_sim.sim.appearance import appearance_maps
    from mask2former_sim.sim.prototypes import background_cells

    g = torch.Generator().manual_seed(0)
    for name, batch, grid, per_image in (("synthetic step", 8, 64, 3), ("COCO, one GPU", 2, 256, 20)):
        gts = batch * per_image
        images = torch.rand(batch, 3, grid, grid, generator=g) * 255
        xy = (torch.rand(gts, 2, generator=g) * grid * 0.7).long()
        size = (torch.rand(gts, 2, generator=g) * grid * 0.3).long() + 2
        ys, xs = torch.arange(grid)[None, :, None], torch.arange(grid)[None, None, :]
        boxes = ((ys >= xy[:, 1, None, None]) & (ys < (xy[:, 1] + size[:, 1])[:, None, None])
                 & (xs >= xy[:, 0, None, None]) & (xs < (xy[:, 0] + size[:, 0])[:, None, None]))
        confident = boxes & (torch.rand(gts, grid, grid, generator=g) > 0.5)
        batch_idx = torch.arange(batch).repeat_interleave(per_image)
        background = background_cells(boxes.float(), batch_idx, batch)
        yield f"appearance maps, {name} ({gts} GTs, {grid} x {grid} grid)", timed(
            lambda: appearance_maps(images, confident, background, batch_idx, levels=32), repeats)


PARTS = {"optimizer": lambda cfg, r: optimizer_rows(cfg, r), "colour": lambda cfg, r: colour_distance_rows(r),
         "criterion": lambda cfg, r: criterion_rows(cfg, r), "appearance": lambda cfg, r: appearance_rows(r)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS), help="which micro-benchmarks (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = build_cfg(CONFIG, ["MODEL.BACKBONE_PRETRAIN.ENABLED", "False"])
    print(f"| what ({args.threads} thread(s), mean of {args.repeats}) | seconds per call |\n|---|---|")
    for part in args.parts:
        for name, seconds in PARTS[part](cfg, args.repeats):
            print(f"| {name} | {seconds:.4f} |", flush=True)


if __name__ == "__main__":
    main()
