"""Box-crop classification pretraining of the backbone (MODEL.BACKBONE_PRETRAIN).

Mask2Former starts from an ImageNet-initialised backbone. Where no such weights can be had
(the synthetic data, a machine without network), a backbone trained from scratch learns the
shape classes very slowly through masked attention (docs/BENCHMARKS.md). This step gives it
an in-domain start from what box supervision already provides, boxes and class labels:
around every GT box of an augmented training image a square window (long box side x U(CONTEXT),
centre jittered) is cut out with RoIAlign, resized to CROP_SIZE, and classified from the
global average of the backbone's last feature map. Masks are never read.

The checkpoint ({"model": {"backbone.*": tensor}, "pretrain": {...}}) is cached under a
fingerprint of everything that determines it, so a second run (and the second benchmark run)
reuses it. The step runs inside saved random states: training afterwards draws the same random
numbers whether the checkpoint came from the cache or was just made.

    path = ensure_pretrained_backbone(cfg)       # make or reuse
    load_pretrained_backbone(model, path)        # strict: every backbone tensor
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import get_detection_dataset_dicts
from detectron2.modeling import build_backbone
from detectron2.structures import ImageList
from detectron2.utils import comm
from torch import nn
from torchvision.ops import roi_align

from ..data.loader import build_positional_train_loader
from ..data.mappers import BoxSupDatasetMapper, build_lsj_augmentation
from ..utils.cache import cache_dir

logger = logging.getLogger("mask2former_sim.engine.backbone_pretrain")  # not __name__: "__main__" under -m

# Bump when a change here changes the weights a given config produces: caches are rebuilt.
PRETRAIN_VERSION = 1
_PREFIX = "backbone."


def default_cache_dir() -> str:
    """``$MASK2FORMER_SIM_CACHE/pretrained``, else ``~/.cache/mask2former_sim/pretrained``."""
    return cache_dir("pretrained")


def check_pretrain_config(cfg) -> None:
    """Errors naming the key for settings the pretraining step cannot honour."""
    bp = cfg.MODEL.BACKBONE_PRETRAIN
    if not bp.ENABLED:
        return
    if cfg.MODEL.WEIGHTS:
        raise ValueError(
            f"MODEL.BACKBONE_PRETRAIN.ENABLED is True and MODEL.WEIGHTS is '{cfg.MODEL.WEIGHTS}': "
            "choose one source of initial weights"
        )
    if bp.ITERS < 1:
        raise ValueError(f"MODEL.BACKBONE_PRETRAIN.ITERS must be >= 1, got {bp.ITERS}")
    if bp.CROP_SIZE < 32:
        raise ValueError(f"MODEL.BACKBONE_PRETRAIN.CROP_SIZE must be >= 32, got {bp.CROP_SIZE}")
    lo, hi = (float(v) for v in bp.CONTEXT)
    if not 1.0 <= lo <= hi:
        raise ValueError(f"MODEL.BACKBONE_PRETRAIN.CONTEXT must be (lo, hi) with 1 <= lo <= hi, got {tuple(bp.CONTEXT)}")
    if not 0.0 <= bp.JITTER < 0.5:
        raise ValueError(f"MODEL.BACKBONE_PRETRAIN.JITTER must be in [0, 0.5), got {bp.JITTER}")


def training_records(cfg) -> List[Dict]:
    """The records of DATASETS.TRAIN, as the trainer loads them."""
    return get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)


def _records_digest(records: Sequence[Dict]) -> str:
    """Hash of what pretraining reads of the data: image names and sizes, boxes, classes.

    So two dataset names over the same images and boxes (synth_train and synth_train_full)
    share one pretrained backbone, and changed data never reuses a stale one.
    """
    h = hashlib.sha1()
    for r in records:
        annos = [(list(map(float, a["bbox"])), int(a["bbox_mode"]), int(a["category_id"])) for a in r.get("annotations", [])]
        h.update(json.dumps([os.path.basename(r["file_name"]), r.get("height"), r.get("width"), annos]).encode("utf-8"))
    return h.hexdigest()


def pretrain_fingerprint(cfg, records: Sequence[Dict]) -> str:
    """Hash of every setting and datum that changes the pretrained weights."""
    m = cfg.MODEL
    aug_keys = ("IMAGE_SIZE", "MIN_SCALE", "MAX_SCALE", "RANDOM_FLIP", "CROP_PAD_VALUE", "FORMAT", "MIN_BOX_SIZE")
    keys = {
        "version": PRETRAIN_VERSION,
        "backbone": m.BACKBONE.NAME,
        "resnets": m.RESNETS,
        "swin": m.SWIN,
        "pixel": [list(m.PIXEL_MEAN), list(m.PIXEL_STD)],
        "num_classes": m.SEM_SEG_HEAD.NUM_CLASSES,
        "pretrain": {k: v for k, v in m.BACKBONE_PRETRAIN.items() if k not in ("ENABLED", "CACHE_DIR")},
        "data": _records_digest(records),
        "input": {k: cfg.INPUT[k] for k in aug_keys},
        "batch": cfg.SOLVER.IMS_PER_BATCH,
        "seed": cfg.SEED,
    }
    text = json.dumps(keys, sort_keys=True, default=lambda o: dict(o) if hasattr(o, "items") else str(o))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def crop_windows(boxes: torch.Tensor, context: tuple, jitter: float, generator: torch.Generator) -> torch.Tensor:
    """Square windows (N, 4) XYXY around boxes (N, 4) XYXY.

    Side = long box side x U(context); the centre moves by U(-jitter, jitter) x side per axis.
    """
    lo, hi = float(context[0]), float(context[1])
    n = boxes.shape[0]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True)
    side = side * (lo + (hi - lo) * torch.rand((n, 1), generator=generator))
    centre = centre + (torch.rand((n, 2), generator=generator) * 2 - 1) * jitter * side
    return torch.cat([centre - side / 2, centre + side / 2], dim=1)


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore torch (CPU and CUDA), numpy and python random states on exit."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class CropClassifier(nn.Module):
    """The backbone plus a linear classifier on its globally pooled last feature map."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        shapes = backbone.output_shape()
        self.feature = max(shapes, key=lambda k: shapes[k].stride)
        self.classifier = nn.Linear(shapes[self.feature].channels, num_classes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(crops)[self.feature].mean(dim=(2, 3)))


def _box_only_mapper(cfg) -> BoxSupDatasetMapper:
    return BoxSupDatasetMapper(
        augmentations=build_lsj_augmentation(cfg, is_train=True),
        image_format=cfg.INPUT.FORMAT,
        keep_masks=False,  # boxes and labels only, whatever the config supervises with
        min_box_size=cfg.INPUT.MIN_BOX_SIZE,
        skip_empty=True,
    )


def _batch_crops(batch: List[Dict], cfg, generator: torch.Generator, device) -> tuple:
    """Normalised crops (N, 3, S, S) and labels (N,) of every box of a mapped batch, cut by
    one RoIAlign over the batch (images zero-padded, after normalisation, to a common size)."""
    bp = cfg.MODEL.BACKBONE_PRETRAIN
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(3, 1, 1)
    # in INPUT.FORMAT, as the detector's backbone sees them (meta_arch.preprocess)
    images = [r["image"].to(device).float() for r in batch]
    padded = ImageList.from_tensors([(im - mean) / std for im in images]).tensor
    windows = [
        crop_windows(r["instances"].gt_boxes.tensor, tuple(bp.CONTEXT), bp.JITTER, generator).to(device)
        for r in batch  # per image: the generator's draws follow the image order
    ]
    crops = roi_align(padded, windows, bp.CROP_SIZE, 1.0, 2, True)
    labels = torch.cat([r["instances"].gt_classes for r in batch]).to(device)
    return crops, labels


def pretrain_backbone(cfg, records: Optional[Sequence[Dict]] = None) -> Dict:
    """Run the pretraining on ``records`` (default: DATASETS.TRAIN's); returns
    {"model": backbone state (prefixed), "pretrain": stats}."""
    check_pretrain_config(cfg)
    records = training_records(cfg) if records is None else records
    bp = cfg.MODEL.BACKBONE_PRETRAIN
    device = torch.device(cfg.MODEL.DEVICE)
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    torch.manual_seed(seed)
    net = CropClassifier(build_backbone(cfg), cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES).to(device).train()
    loader = build_positional_train_loader(
        records, _box_only_mapper(cfg), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        seed=seed, num_workers=cfg.DATALOADER.NUM_WORKERS, rank=0, world_size=1,  # main process only
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=bp.BASE_LR, weight_decay=bp.WEIGHT_DECAY, foreach=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=bp.BASE_LR, total_steps=bp.ITERS, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    log_period = 100
    # sums over the current log window stay on the device: one host sync per window
    window = torch.zeros(3, device=device)  # loss sum, correct crops, crops
    window_iters = 0
    final_loss = final_acc = float("nan")
    for it, batch in zip(range(bp.ITERS), loader):
        crops, labels = _batch_crops(batch, cfg, generator, device)
        logits = net(crops)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            window += torch.stack([loss.detach(), (logits.argmax(1) == labels).sum().float(),
                                   torch.tensor(float(labels.numel()), device=device)])
        window_iters += 1
        done = it + 1
        if done % log_period == 0 or done == bp.ITERS:
            loss_sum, correct, count = window.tolist()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"backbone pretraining: non-finite loss in iterations {done - window_iters + 1}-{done}"
                )
            final_loss, final_acc = loss_sum / window_iters, correct / max(count, 1.0)
            elapsed = time.perf_counter() - start
            logger.info(
                "backbone pretraining: iter %d/%d  loss %.3f  crop accuracy %.3f (last %d iterations)  eta %s",
                done, bp.ITERS, final_loss, final_acc, window_iters,
                time.strftime("%M:%S", time.gmtime(elapsed / done * (bp.ITERS - done))),
            )
            window.zero_()
            window_iters = 0
    stats = {
        "fingerprint": pretrain_fingerprint(cfg, records),
        "iters": int(bp.ITERS),
        "final_loss": final_loss,
        "final_crop_accuracy": final_acc,
        "seconds": float(time.perf_counter() - start),
    }
    state = {_PREFIX + k: v.detach().cpu() for k, v in net.backbone.state_dict().items()}
    return {"model": state, "pretrain": stats}


def _save_atomic(obj: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for every user of the machine
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def ensure_pretrained_backbone(cfg) -> str:
    """Path of the cached pretrained backbone for ``cfg``, made first if missing.

    The main process makes it; the others wait and read it. Random states are preserved.
    """
    check_pretrain_config(cfg)
    records = training_records(cfg)
    cache_dir = cfg.MODEL.BACKBONE_PRETRAIN.CACHE_DIR or default_cache_dir()
    path = os.path.join(
        os.path.abspath(os.path.expanduser(cache_dir)), f"backbone_{pretrain_fingerprint(cfg, records)}.pth"
    )
    if comm.is_main_process() and not os.path.isfile(path):
        logger.info("Pretraining the backbone on box crops (%d iterations) -> %s", cfg.MODEL.BACKBONE_PRETRAIN.ITERS, path)
        with preserved_random_state():
            result = pretrain_backbone(cfg, records)
        _save_atomic(result, path)
        logger.info("backbone pretraining done: %s", json.dumps(result["pretrain"]))
    elif comm.is_main_process():
        logger.info("Using the cached pretrained backbone %s", path)
    comm.synchronize()
    return path


def load_pretrained_backbone(model: nn.Module, path: str) -> Dict:
    """Load every backbone tensor of ``path`` into ``model.backbone`` (strict); returns its stats."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained backbone checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path}: not a backbone checkpoint (no 'model' entry)")
    state = {k[len(_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(_PREFIX)}
    target = model.module if hasattr(model, "module") else model
    expected = target.backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} does not fit the configured backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    target.backbone.load_state_dict(state, strict=True)
    stats = ckpt.get("pretrain", {})
    logger.info("Loaded the pretrained backbone %s (%s)", path, json.dumps(stats))
    return stats


__all__ = [
    "check_pretrain_config",
    "crop_windows",
    "default_cache_dir",
    "ensure_pretrained_backbone",
    "load_pretrained_backbone",
    "pretrain_backbone",
    "pretrain_fingerprint",
    "preserved_random_state",
    "training_records",
]


def main(argv=None) -> str:
    """``python -m mask2former_sim.engine.backbone_pretrain --config-file X.yaml [KEY VALUE ...]``:
    make (or find) the cached pretrained backbone of a config; the last line printed is a
    json object with its path and its pretraining stats (iterations, seconds, loss, accuracy)."""
    import argparse

    from detectron2.utils.logger import setup_logger

    from .setup import build_cfg
    from ..data.registry import register_datasets_for

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--if-enabled", action="store_true",
                        help="do nothing unless the config sets MODEL.BACKBONE_PRETRAIN.ENABLED")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    setup_logger(name="mask2former_sim")
    force = [] if args.if_enabled else ["MODEL.BACKBONE_PRETRAIN.ENABLED", "True"]
    cfg = build_cfg(args.config_file, force + list(args.opts))
    if not cfg.MODEL.BACKBONE_PRETRAIN.ENABLED:
        print(json.dumps({"path": None}))
        return ""
    register_datasets_for(cfg)
    path = ensure_pretrained_backbone(cfg)
    stats = torch.load(path, map_location="cpu", weights_only=True).get("pretrain", {})
    print(json.dumps({"path": path, **stats}))  # last line: what was made or found
    return path


if __name__ == "__main__":
    main()
