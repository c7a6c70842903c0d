"""SIM's online weakly-supervised copy-paste (METHOD.md §3: Eq.11 and the bank; Eq.9 is the
criterion's ``loss_paste_*``).

    Eq.11   M_g = 1[T_g↑ > MASK_THRESH] · B_g      (T_g: the teacher's instance map, upsampled
            s_g = Σ T_g↑ M_g / (Σ M_g + 1)          bilinearly from the loss grid to pixels)
    bank    FIFO of BANK_SIZE entries per process (and at most MAX_BANK_MIB: the oldest
            leave first), one per training image, filled after the warm-up with every
            original GT whose M_g is not empty
    paste   with probability PROB per image: an entry drawn uniformly, n = clamp(⌊FRACTION ·
            n_inst⌋, 1, MAX_INSTANCES) of its instances drawn ∝ s_g without replacement, pasted
            at their place on the canvas, never into padding; each original GT loses the pasted
            pixels of its box and takes the tight box of what remains, and is dropped when more
            than OCCLUDED_DROP of its box is covered (1.0: when nothing is left); a pasted
            instance carries its mask (a later paste may cover part of it) and its tight box

An entry keeps what pasting needs and no more: per instance the pixel box (x0, y0, x1, y1,
end-exclusive), the class, s_g, the mask inside the box bit-packed, and the RGB values of the
masked pixels only (uint8), all CPU tensors (a checkpoint loads them with weights_only).
Draws come from a generator seeded by (seed, iteration, rank): a resumed run pastes what an
uninterrupted one would (with the bank saved in the checkpoint, MODEL.SIM.COPY_PASTE.
BANK_IN_CHECKPOINT: the trainer stores ``bank_state()`` next to the teacher).

Images here are the model's padded raw RGB batch (B, 3, H, W), values 0..255; targets are the
meta-architecture's {"labels", "boxes"} per image (boxes XYXY in padded-input pixels).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "pack_bits",
    "unpack_bits",
    "pixel_boxes",
    "paste_masks_and_scores",
    "make_entry",
    "make_entries",
    "entry_instance",
    "entry_canvas",
    "MemoryBank",
    "occlusion_update",
    "PasteRecord",
    "CopyPaste",
]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Flattened bool mask -> uint8, 8 cells a byte (zero-padded to a multiple of 8)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of pack_bits: the first ``numel`` cells as a flat bool tensor."""
    bits = (packed[:, None] & _BIT_WEIGHTS.to(packed.device)) > 0
    return bits.reshape(-1)[:numel]


def pixel_boxes(boxes: Tensor, hw: Tuple[int, int]) -> Tensor:
    """XYXY float boxes -> int64 pixel boxes (floor x0, floor y0, ceil x1, ceil y1) on the canvas."""
    h, w = hw
    out = torch.stack([boxes[:, 0].floor(), boxes[:, 1].floor(), boxes[:, 2].ceil(), boxes[:, 3].ceil()], dim=1)
    out = out.to(torch.int64)
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def paste_masks_and_scores(
    instance_map: Tensor, box: Sequence[int], stride: int, thresh: float, valid: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Eq.11 for one GT: (M_g inside its pixel box (y1-y0, x1-x0) bool, s_g scalar).

    ``instance_map`` (h, w) on the loss grid of ``stride``; ``box`` the GT's pixel box. T_g is
    upsampled only on the grid cells around the box (one cell of margin): bilinear with
    align_corners=False reads at most the next cell, so the crop equals the full upsampling.
    ``valid`` (y1-y0, x1-x0): padding cells are never part of M_g.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    gh, gw = instance_map.shape[-2:]
    gx0, gy0 = max(x0 // stride - 1, 0), max(y0 // stride - 1, 0)
    gx1, gy1 = min(-(-x1 // stride) + 1, gw), min(-(-y1 // stride) + 1, gh)
    crop = instance_map[gy0:gy1, gx0:gx1].float()[None, None]
    up = F.interpolate(crop, scale_factor=stride, mode="bilinear", align_corners=False)[0, 0] if stride > 1 else crop[0, 0]
    t = up[y0 - gy0 * stride:y1 - gy0 * stride, x0 - gx0 * stride:x1 - gx0 * stride]
    mask = t > thresh
    if valid is not None:
        mask = mask & valid
    score = (t * mask).sum() / (mask.sum() + 1.0)
    return mask, score


def make_entries(
    images: Sequence[Tensor],
    valids: Sequence[Tensor],
    boxes: Sequence[Tensor],
    classes: Sequence[Tensor],
    instance_maps: Sequence[Tensor],
    stride: int,
    thresh: float,
) -> List[Optional[Dict[str, Tensor]]]:
    """Bank entries (CPU tensors) of the images of one batch: per image an entry, or None when
    none of its GTs has a paste mask.

    Per image: image (3, H, W) RGB 0..255 (one canvas size for all), valid (H, W) bool, boxes
    (n, 4) XYXY pixels, classes (n,), instance_maps (n, h, w) the teacher's T_g on the loss
    grid of ``stride``. Three transfers to the host for the whole batch, whatever it holds:
    the pixel boxes with the classes, the box crops (RGB and M_g as a fourth channel, uint8)
    and the scores; the masked pixels are selected on the host (no per-GT device sync).
    """
    if not images:
        return []
    hw = tuple(images[0].shape[-2:])
    counts = [len(c) for c in classes]
    if not sum(counts):
        return [None] * len(images)
    all_boxes = torch.cat([b.float() for b in boxes])
    meta = torch.cat([pixel_boxes(all_boxes, hw), torch.cat(list(classes)).to(torch.int64)[:, None]], dim=1)
    meta = meta.cpu().tolist()  # (G, 5): crop bounds and class, on the host
    owner = [b for b, n in enumerate(counts) for _ in range(n)]
    local = [i for n in counts for i in range(n)]
    index, crops, scores = [], [], []
    for g, (x0, y0, x1, y1, _) in enumerate(meta):
        if x1 <= x0 or y1 <= y0:
            continue
        b = owner[g]
        mask, score = paste_masks_and_scores(instance_maps[b][local[g]], (x0, y0, x1, y1), stride, thresh,
                                             valids[b][y0:y1, x0:x1])
        pix = images[b][:, y0:y1, x0:x1].round().clamp(0, 255).to(torch.uint8)
        crops.append(torch.cat([pix, mask[None].to(torch.uint8)]).flatten(1))
        scores.append(score)
        index.append(g)
    per_image: List[List[Tuple[int, Tensor, Tensor, float]]] = [[] for _ in images]
    if index:
        flat = torch.cat(crops, dim=1).cpu()
        scores_h = torch.stack(scores).float().cpu().tolist()
        sizes = [(meta[g][2] - meta[g][0]) * (meta[g][3] - meta[g][1]) for g in index]
        for g, part, score in zip(index, flat.split(sizes, dim=1), scores_h):
            m = part[3] > 0
            if m.any():
                per_image[owner[g]].append((g, m, part[:3, m], score))
    entries: List[Optional[Dict[str, Tensor]]] = []
    for kept in per_image:
        if not kept:
            entries.append(None)
            continue
        masks = [pack_bits(m) for _, m, _, _ in kept]
        entries.append({
            "boxes": torch.tensor([meta[g][:4] for g, _, _, _ in kept], dtype=torch.int32),
            "classes": torch.tensor([meta[g][4] for g, _, _, _ in kept], dtype=torch.int64),
            "scores": torch.tensor([sc for _, _, _, sc in kept], dtype=torch.float32),
            "masks": torch.cat(masks),
            "mask_sizes": torch.tensor([m.numel() for m in masks], dtype=torch.int64),
            "pixels": torch.cat([p for _, _, p, _ in kept], dim=1).contiguous(),
            "pixel_counts": torch.tensor([p.shape[1] for _, _, p, _ in kept], dtype=torch.int64),
            "canvas": torch.tensor(hw, dtype=torch.int32),
        })
    return entries


def make_entry(image: Tensor, valid: Tensor, boxes: Tensor, classes: Tensor, instance_maps: Tensor,
               stride: int, thresh: float) -> Optional[Dict[str, Tensor]]:
    """The bank entry of one training image (``make_entries`` of a batch of one)."""
    return make_entries([image], [valid], [boxes], [classes], [instance_maps], stride, thresh)[0]


def entry_canvas(entry: Dict[str, Tensor], i: int) -> Tuple[List[int], Tensor, Tensor]:
    """(pixel box, mask (h, w) bool, RGB crop (3, h, w) uint8, zero outside the mask) of
    instance i of an entry, on the host."""
    box, mask, pixels = entry_instance(entry, i)
    crop = torch.zeros((3,) + tuple(mask.shape), dtype=torch.uint8)
    crop[:, mask] = pixels
    return box, mask, crop


def entry_instance(entry: Dict[str, Tensor], i: int) -> Tuple[List[int], Tensor, Tensor]:
    """(pixel box, mask (h, w) bool, pixels (3, area) uint8) of instance i of an entry."""
    box = entry["boxes"][i].tolist()
    h, w = box[3] - box[1], box[2] - box[0]
    m_off = int(entry["mask_sizes"][:i].sum())
    p_off = int(entry["pixel_counts"][:i].sum())
    mask = unpack_bits(entry["masks"][m_off:m_off + int(entry["mask_sizes"][i])], h * w).view(h, w)
    pixels = entry["pixels"][:, p_off:p_off + int(entry["pixel_counts"][i])]
    return box, mask, pixels


def entry_nbytes(entry: Dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


class MemoryBank:
    """FIFO of at most ``size`` entries and ``max_bytes`` bytes (the oldest leave first; the
    newest entry always stays)."""

    def __init__(self, size: int, max_bytes: Optional[int] = None):
        if isinstance(size, bool) or int(size) != size or size < 1:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.BANK_SIZE must be a positive integer, got {size!r}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.MAX_BANK_MIB must be positive, got {max_bytes / 2 ** 20}")
        self.size = int(size)
        self.max_bytes = max_bytes
        self.entries: Deque[Dict[str, Tensor]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return self.entries[i]

    def push(self, entry: Dict[str, Tensor]) -> None:
        self.entries.append(entry)
        self._bytes += entry_nbytes(entry)
        while len(self.entries) > self.size or (
                self.max_bytes is not None and self._bytes > self.max_bytes and len(self.entries) > 1):
            self._bytes -= entry_nbytes(self.entries.popleft())

    def nbytes(self) -> int:
        return self._bytes

    def state(self) -> List[Dict[str, Tensor]]:
        return list(self.entries)

    def load(self, entries: Sequence[Dict[str, Tensor]]) -> None:
        self.entries, self._bytes = deque(), 0
        for e in entries:
            self.push(dict(e))


def _first_last(hits: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(first index, last index + 1, any) of True along the last dim of a bool tensor."""
    n = hits.shape[-1]
    idx = torch.arange(n, device=hits.device)
    first = torch.where(hits, idx, n).amin(dim=-1)
    last = torch.where(hits, idx, -1).amax(dim=-1) + 1
    return first, last, hits.any(dim=-1)


def occlusion_update(boxes: Tensor, covered: Tensor) -> Tuple[Tensor, Tensor]:
    """What pasted pixels leave of each original GT: (new boxes (n, 4), covered fraction (n,)).

    boxes (n, 4) XYXY float pixels; covered (H, W) bool, the union of the pasted masks. The
    remainder of a box is its pixel box minus ``covered``; its tight box replaces an edge of
    the box only where whole rows / columns at that edge are covered (so an untouched box
    keeps its exact float coordinates). Vectorised over the GTs (no host sync).
    """
    h, w = covered.shape
    n = boxes.shape[0]
    if n == 0:
        return boxes, boxes.new_zeros(0)
    pb = pixel_boxes(boxes, (h, w))
    free = (~covered).to(torch.int32)
    row_cum = F.pad(free.cumsum(dim=1), (1, 0))  # (H, W+1): free cells of row y in [0, x)
    col_cum = F.pad(free.cumsum(dim=0), (0, 0, 1, 0))  # (H+1, W)
    x0, y0, x1, y1 = pb.unbind(dim=1)
    ys = torch.arange(h, device=covered.device)
    xs = torch.arange(w, device=covered.device)
    row_free = (row_cum[:, x1] - row_cum[:, x0]).t()  # (n, H): free cells of each row inside [x0, x1)
    row_free = row_free * ((ys[None] >= y0[:, None]) & (ys[None] < y1[:, None]))
    col_free = (col_cum[y1] - col_cum[y0])  # (n, W)
    col_free = col_free * ((xs[None] >= x0[:, None]) & (xs[None] < x1[:, None]))
    area = ((x1 - x0) * (y1 - y0)).float()
    visible = row_free.sum(dim=1).float()
    ty0, ty1, _ = _first_last(row_free > 0)
    tx0, tx1, _ = _first_last(col_free > 0)
    new = boxes.clone()
    new[:, 0] = torch.where(tx0 > x0, tx0.to(boxes.dtype), boxes[:, 0])
    new[:, 1] = torch.where(ty0 > y0, ty0.to(boxes.dtype), boxes[:, 1])
    new[:, 2] = torch.where(tx1 < x1, tx1.to(boxes.dtype), boxes[:, 2])
    new[:, 3] = torch.where(ty1 < y1, ty1.to(boxes.dtype), boxes[:, 3])
    # a box of no pixel area has nothing to cover: fraction 0
    return new, torch.where(area > 0, 1.0 - visible / area.clamp(min=1.0), torch.zeros_like(area))


@dataclass
class PasteRecord:
    """What one image received (for logs, tests and tools/visualize_copy_paste.py)."""

    entry: int = -1  # bank index drawn (-1: nothing pasted)
    chosen: List[int] = field(default_factory=list)  # instances of the entry, in paste order
    kept: List[int] = field(default_factory=list)  # original GTs kept
    dropped: List[int] = field(default_factory=list)  # original GTs dropped (occluded)
    old_boxes: Optional[Tensor] = None  # (n_orig, 4) before, CPU
    new_boxes: Optional[Tensor] = None  # (n_orig, 4) after (dropped ones included), CPU


class CopyPaste(nn.Module):
    """The bank, the paste of a training batch, and the push of its instances (no parameters)."""

    def __init__(
        self,
        bank_size: int = 100,
        prob: float = 0.5,
        fraction: float = 0.25,
        max_instances: int = 3,
        mask_thresh: float = 0.7,
        occluded_drop: float = 1.0,
        bank_in_checkpoint: bool = False,
        seed: int = 0,
        max_bank_mib: Optional[float] = 64.0,
    ):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.PROB must be in [0, 1], got {prob}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.FRACTION must be in [0, 1], got {fraction}")
        if isinstance(max_instances, bool) or int(max_instances) != max_instances or max_instances < 1:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.MAX_INSTANCES must be a positive integer, got {max_instances!r}")
        if not 0.0 <= mask_thresh < 1.0:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.MASK_THRESH must be in [0, 1), got {mask_thresh}")
        if not 0.0 <= occluded_drop <= 1.0:
            raise ValueError(f"MODEL.SIM.COPY_PASTE.OCCLUDED_DROP must be in [0, 1], got {occluded_drop}")
        self.bank = MemoryBank(bank_size, None if not max_bank_mib else int(max_bank_mib * 2 ** 20))
        self.prob = float(prob)
        self.fraction = float(fraction)
        self.max_instances = int(max_instances)
        self.mask_thresh = float(mask_thresh)
        self.occluded_drop = float(occluded_drop)
        self.bank_in_checkpoint = bool(bank_in_checkpoint)
        self.seed = int(seed)
        self.last_records: List[PasteRecord] = []
        self.last_stats: Dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg) -> "CopyPaste":
        cp = cfg.MODEL.SIM.COPY_PASTE
        return cls(
            bank_size=cp.BANK_SIZE,
            prob=cp.PROB,
            fraction=cp.FRACTION,
            max_instances=cp.MAX_INSTANCES,
            mask_thresh=cp.MASK_THRESH,
            occluded_drop=cp.OCCLUDED_DROP,
            bank_in_checkpoint=cp.BANK_IN_CHECKPOINT,
            seed=max(int(cfg.SEED), 0),
            max_bank_mib=cp.MAX_BANK_MIB,
        )

    def extra_repr(self) -> str:
        return (f"bank_size={self.bank.size}, max_bank_mib={self.bank.max_bytes and self.bank.max_bytes / 2 ** 20}, prob={self.prob}, fraction={self.fraction}, "
                f"max_instances={self.max_instances}, mask_thresh={self.mask_thresh}, occluded_drop={self.occluded_drop}")

    # ------------------------------------------------------------------ checkpoint
    def bank_state(self) -> Optional[List[Dict[str, Tensor]]]:
        """The bank for a checkpoint (tensors only), or None unless BANK_IN_CHECKPOINT."""
        return self.bank.state() if self.bank_in_checkpoint else None

    def load_bank_state(self, entries: Optional[Sequence[Dict[str, Tensor]]]) -> None:
        if entries is not None:
            self.bank.load(entries)

    # ------------------------------------------------------------------ draws
    def generator(self, iteration: int) -> torch.Generator:
        """The draws of one step: seeded by (seed, iteration, rank)."""
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        return torch.Generator().manual_seed((self.seed * 1_000_003 + int(iteration)) * 1_009 + rank)

    def _draw(self, gen: torch.Generator) -> Tuple[int, List[int]]:
        """(entry, chosen instances) for one image, or (-1, []) when it receives nothing."""
        if not len(self.bank) or torch.rand((), generator=gen).item() >= self.prob:
            return -1, []
        e = int(torch.randint(len(self.bank), (), generator=gen))
        scores = self.bank[e]["scores"].double().clamp_min(1e-12)
        n_inst = scores.numel()
        n = min(max(math.floor(self.fraction * n_inst), 1), self.max_instances, n_inst)
        return e, torch.multinomial(scores, n, replacement=False, generator=gen).tolist()

    # ------------------------------------------------------------------ paste
    @torch.no_grad()
    def paste(self, raw: Tensor, valid: Tensor, targets: List[Dict[str, Tensor]], iteration: int):
        """Paste bank instances into the batch.

        Returns (raw with the pastes, targets with "num_pasted" and "paste_masks" (n_p, H, W)
        bool, the pasted instances appended after the kept originals, and covered (B, H, W)
        bool, the pasted pixels). ``raw`` and the targets are not modified in place.
        """
        gen = self.generator(iteration)
        raw = raw.clone()
        b_size, _, h, w = raw.shape
        covered = torch.zeros((b_size, h, w), dtype=torch.bool, device=raw.device)
        out_targets, records = [], []
        pasted_total = 0
        pending = []  # per image: (pasted masks (n_p, H, W), classes) before the one host sync
        for b, t in enumerate(targets):
            e, chosen = self._draw(gen)
            record = PasteRecord(entry=e, chosen=chosen)
            masks, classes = [], []
            if e >= 0:
                entry = self.bank[e]
                for i in chosen:
                    box, mask, crop = entry_canvas(entry, i)
                    x0, y0, x1, y1 = box
                    cx1, cy1 = min(x1, w), min(y1, h)  # an entry from a larger canvas is cut
                    if cx1 <= x0 or cy1 <= y0:
                        continue
                    mask, crop = (_to_device(t[..., :cy1 - y0, :cx1 - x0], raw.device) for t in (mask, crop))
                    m = mask & valid[b, y0:cy1, x0:cx1]  # never into padding
                    region = raw[b, :, y0:cy1, x0:cx1]
                    raw[b, :, y0:cy1, x0:cx1] = torch.where(m, crop.to(raw.dtype), region)
                    full = torch.zeros((h, w), dtype=torch.bool, device=raw.device)
                    full[y0:cy1, x0:cx1] = m
                    masks = [prev & ~full for prev in masks] + [full]
                    covered[b] |= full
                    classes.append(int(entry["classes"][i]))
            pending.append((masks, classes))
            records.append(record)
        # the occlusion bookkeeping of every image, then one host transfer for the decisions
        updates = []
        for b, t in enumerate(targets):
            boxes = t["boxes"].to(torch.float32)
            new_boxes, frac = occlusion_update(boxes, covered[b])
            masks, _ = pending[b]
            pasted = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool, device=raw.device)
            updates.append((new_boxes, frac, pasted, pasted.flatten(1).any(dim=1)))
        flat = [torch.cat([frac, nonempty.float()]) for _, frac, _, nonempty in updates]
        host = torch.cat(flat).cpu() if flat else torch.zeros(0)
        offset = 0
        for b, t in enumerate(targets):
            new_boxes, frac, pasted, _ = updates[b]
            n, n_p = frac.numel(), pasted.shape[0]
            frac_h, nonempty_h = host[offset:offset + n], host[offset + n:offset + n + n_p] > 0.5
            offset += n + n_p
            drop = (frac_h >= 1.0) | (frac_h > self.occluded_drop)
            keep = (~drop).nonzero().flatten().tolist()
            rec = records[b]
            rec.kept, rec.dropped = keep, drop.nonzero().flatten().tolist()
            rec.old_boxes, rec.new_boxes = t["boxes"].detach().cpu(), new_boxes.detach().cpu()
            keep_p = nonempty_h.nonzero().flatten().tolist()
            pasted = pasted[keep_p]
            labels_p = torch.tensor([pending[b][1][i] for i in keep_p], dtype=torch.long).to(t["labels"].device)
            out = dict(t)
            keep_idx = torch.tensor(keep, dtype=torch.long, device=t["labels"].device)
            out["labels"] = torch.cat([t["labels"][keep_idx], labels_p])
            out["boxes"] = torch.cat([new_boxes[keep_idx].to(t["boxes"].dtype), _tight_boxes(pasted).to(t["boxes"].dtype)])
            out["num_pasted"] = len(keep_p)
            out["paste_masks"] = pasted
            pasted_total += len(keep_p)
            out_targets.append(out)
        self.last_records = records
        self.last_stats = {"pasted_instances": float(pasted_total), "bank_entries": float(len(self.bank)),
                           "bank_mib": self.bank.nbytes() / 2 ** 20,
                           "dropped_originals": float(sum(len(r.dropped) for r in records))}
        return raw, out_targets, covered

    # ------------------------------------------------------------------ push
    @torch.no_grad()
    def push(self, raw: Tensor, valid: Tensor, targets: List[Dict[str, Tensor]], instance_maps: Tensor, stride: int):
        """One bank entry per image from its original GTs (pasted ones are left out).

        instance_maps (G, h, w): the teacher's T_g of the batch's GTs in target order (the
        criterion's GT order: all GTs of image 0, then image 1, ...).
        """
        images, valids, boxes, classes, maps = [], [], [], [], []
        offset = 0
        for b, t in enumerate(targets):
            n = len(t["labels"])
            n_orig = n - int(t.get("num_pasted", 0))
            images.append(raw[b])
            valids.append(valid[b])
            boxes.append(t["boxes"][:n_orig])
            classes.append(t["labels"][:n_orig])
            maps.append(instance_maps[offset:offset + n_orig])
            offset += n
        for entry in make_entries(images, valids, boxes, classes, maps, stride, self.mask_thresh):
            if entry is not None:
                self.bank.push(entry)
        self.last_stats = dict(self.last_stats, bank_entries=float(len(self.bank)), bank_mib=self.bank.nbytes() / 2 ** 20)


def _to_device(t: Tensor, device) -> Tensor:
    t = t.contiguous()
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tight_boxes(masks: Tensor) -> Tensor:
    """(n, H, W) bool -> (n, 4) XYXY float pixel boxes, end-exclusive (zeros for an empty mask)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    y0, y1, _ = _first_last(masks.any(dim=2))
    x0, x1, _ = _first_last(masks.any(dim=1))
    return torch.stack([x0, y0, x1, y1], dim=1).float()
