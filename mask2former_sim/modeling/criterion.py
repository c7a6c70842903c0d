"""Set criterion for box-supervised (and fully supervised) Mask2Former training.

Box mode (METHOD.md §1): classification CE + projection loss + colour pairwise loss,
matched with the box-projection Hungarian matcher. Full mode: classification CE +
point-sampled mask CE and dice, matched on mask costs (the fully supervised upper bound).
SIM (METHOD.md §2, §4): box mode plus the pseudo-mask loss on targets built from the EMA
teacher's outputs (``mask2former_sim/sim/pseudo_labeler.py``). Copy-paste (§3, Eq.9): GTs
pasted by ``sim/copy_paste.py`` (the last ``num_pasted`` of an image, with ``paste_masks``)
are matched and take the CE, projection and pairwise losses like any GT, get no pseudo-mask
loss, and get the point-sampled mask loss ``loss_paste_ce`` / ``loss_paste_dice`` against
their paste masks.
Every decoder output is matched and supervised (deep supervision); the losses of aux output
i carry the suffix ``_{i}``. Returned losses are already weighted: their sum is the loss.
Box mode never reads ``targets[i]["masks"]``.

One call runs in three steps, because SIM's instance map of a GT needs the matches of
*every* decoder output before any pseudo target exists:

1. ``prepare``: targets once per step, in GT order (all GTs of image 0, then image 1, ...):
   labels, box masks on the loss grid, boxes, the valid grid and the pairwise edge weights
   (they depend on the image and the box only, so they are the same at every output);
2. ``match``: every decoder output, into GT-ordered device tensors (``query_of_gt``,
   (L+1, G)) plus the flat (image, query, GT) triples of each output, moved to the device
   in one transfer;
3. the losses of each output (and, with SIM, the pseudo targets built once from step 2).

``pred_masks`` lie on the ``stride`` grid of the input. With ``loss_stride < stride`` they
are first upsampled bilinearly (factor ``stride // loss_stride``) and everything (matching,
box indicators, colour affinities, valid mask, pseudo targets) works on the finer
``loss_stride`` grid. On small inputs a stride-4 cell is a large part of an object, and the
pooled colour of the cells on its outline differs from both the object and the background;
the pairwise loss then links neither side to the outline, and a hollow outline satisfies
both box losses (docs/BENCHMARKS.md). The finer grid removes that escape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..utils.distributed import flagged_ranks, other_rank_error
from .losses.box_targets import boxes_to_grid_masks, downsample_valid
from .losses.pairwise import images_to_color_similarity, pairwise_edge_weights, pairwise_loss_weighted
from .losses.point_mask import point_mask_losses
from .losses.projection import projection_loss_from_logits
from .matcher import HungarianMatcher

__all__ = ["BoxSupSetCriterion", "PreparedTargets", "MatchResult"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]

_LOSS_KEYS = {
    "labels": ("loss_ce",),
    "projection": ("loss_proj",),
    "pairwise": ("loss_pairwise",),
    "masks": ("loss_mask", "loss_dice"),
    "pseudo": ("loss_pseudo_bce", "loss_pseudo_dice"),
    "paste": ("loss_paste_ce", "loss_paste_dice"),
}


@dataclass
class PreparedTargets:
    """Step 1: the targets of one batch, once per step. G = GTs of the whole batch."""

    per_image: List[Dict[str, torch.Tensor]]  # the matcher's view: labels, box_masks[, boxes, masks]
    labels: torch.Tensor  # (G,) long
    batch_idx: torch.Tensor  # (G,) image of each GT
    counts: List[int]  # GTs per image
    box_masks: torch.Tensor  # (G, H, W) float {0, 1} on the loss grid
    boxes: Optional[torch.Tensor]  # (G, 4) XYXY padded-input pixels (None when only box masks were given)
    masks: Optional[torch.Tensor]  # (G, Hp, Wp) full supervision only
    grid_hw: Tuple[int, int]  # loss grid
    num_masks: float  # GTs per rank, averaged over ranks, >= 1
    edge_weights: Optional[torch.Tensor]  # (G, K*K-1, H, W) bool, pairwise loss only
    valid_grid: Optional[torch.Tensor]  # (B, H, W) bool on the loss grid
    ramp: float  # pairwise warm-up ramp
    edge_counts: Optional[torch.Tensor] = None  # (G,) edges per GT (the pairwise loss's normaliser)
    # copy-paste (sim/copy_paste.py): the last num_pasted[b] GTs of image b were pasted
    num_pasted: Optional[List[int]] = None  # per image (host ints)
    pasted: Optional[torch.Tensor] = None  # (G,) bool
    paste_index: Optional[torch.Tensor] = None  # (G,) row of each pasted GT in paste_masks, -1 for originals
    paste_masks: Optional[torch.Tensor] = None  # (P, Hp, Wp) bool, padded-input pixels
    # SIM's appearance maps (MODEL.SIM.APPEARANCE): the input RGB (0..255) average-pooled to the loss grid
    grid_images: Optional[torch.Tensor] = None  # (B, 3, H, W)


@dataclass
class MatchResult:
    """Step 2: Hungarian matches of every decoder output (ordered aux_0 .. aux_{L-1}, final)."""

    indices: List[Indices]  # per output, per image (query ids, GT ids within the image), CPU int64
    batch_idx: torch.Tensor  # (L+1, M) image of each matched pair, on the device
    query_idx: torch.Tensor  # (L+1, M) query of each matched pair
    gt_idx: torch.Tensor  # (L+1, M) GT (index into the batch's G GTs) of each matched pair
    query_of_gt: torch.Tensor  # (L+1, G) query matched to each GT, -1 where none (more GTs than queries)
    num_paste_pairs: Optional[List[int]] = None  # per output: the first n pairs have a pasted GT


class BoxSupSetCriterion(nn.Module):
    """Hungarian-matched losses over all decoder outputs; returns weighted losses."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        eos_coef: float = 0.1,
        losses: Sequence[str] = ("labels", "projection", "pairwise"),
        stride: int = 4,
        loss_stride: Optional[int] = None,
        pairwise_size: int = 3,
        pairwise_dilation: int = 2,
        pairwise_theta: float = 2.0,
        pairwise_color_thresh: float = 0.1,
        pairwise_warmup_iters: int = 10000,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        dice_eps: float = 1e-5,
        deep_supervision: bool = True,
        pseudo_labeler: Optional[nn.Module] = None,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        losses = tuple(losses)
        unknown = [name for name in losses if name not in _LOSS_KEYS]
        if unknown:
            raise ValueError(f"unknown losses {unknown}; choose from {sorted(_LOSS_KEYS)}")
        for name in losses:
            for key in _LOSS_KEYS[name]:
                if key not in weight_dict:
                    raise ValueError(f"weight_dict lacks {key!r} needed by loss {name!r}")
        if pairwise_warmup_iters < 0:
            raise ValueError(f"pairwise_warmup_iters must be >= 0, got {pairwise_warmup_iters}")
        if ("pseudo" in losses) != (pseudo_labeler is not None):
            raise ValueError("the 'pseudo' loss and a pseudo_labeler come together (SIM)")
        self.num_classes = int(num_classes)
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = losses
        self.stride = int(stride)
        self.loss_stride = self.stride if loss_stride is None else int(loss_stride)
        if self.loss_stride < 1 or self.stride % self.loss_stride:
            raise ValueError(
                f"loss_stride (MODEL.BOXSUP.LOSS_STRIDE) must be a positive divisor of the mask stride {self.stride}, got {loss_stride!r}"
            )
        self.pairwise_size = int(pairwise_size)
        self.pairwise_dilation = int(pairwise_dilation)
        self.pairwise_theta = float(pairwise_theta)
        self.pairwise_color_thresh = float(pairwise_color_thresh)
        self.pairwise_warmup_iters = int(pairwise_warmup_iters)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.dice_eps = float(dice_eps)
        self.deep_supervision = bool(deep_supervision)
        self.pseudo_labeler = pseudo_labeler
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "BoxSupSetCriterion":
        """Build from MODEL.BOXSUP / MODEL.MASK_FORMER / MODEL.SIM / MODEL.SEM_SEG_HEAD.NUM_CLASSES."""
        bs, mf, sim = cfg.MODEL.BOXSUP, cfg.MODEL.MASK_FORMER, cfg.MODEL.SIM
        full = bool(bs.FULL_MASK_SUPERVISION)
        if sim.ENABLED and full:
            raise ValueError(
                "MODEL.SIM.ENABLED needs box supervision: set MODEL.BOXSUP.FULL_MASK_SUPERVISION False "
                "(SIM builds pseudo masks because there are no GT masks)"
            )
        matcher = HungarianMatcher(
            cost_class=bs.MATCHER_CLASS_WEIGHT,
            cost_proj=bs.MATCHER_PROJ_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            mode="mask" if full else "box",
            num_points=mf.TRAIN_NUM_POINTS,
            stride=bs.LOSS_STRIDE,
            dice_eps=bs.DICE_EPS,
        )
        weight_dict = {
            "loss_ce": mf.CLASS_WEIGHT,
            "loss_proj": bs.PROJECTION_WEIGHT,
            "loss_pairwise": bs.PAIRWISE_WEIGHT,
            "loss_mask": mf.MASK_WEIGHT,
            "loss_dice": mf.DICE_WEIGHT,
            "loss_pseudo_bce": sim.PSEUDO_WEIGHT * sim.PSEUDO_BCE_WEIGHT,
            "loss_pseudo_dice": sim.PSEUDO_WEIGHT * sim.PSEUDO_DICE_WEIGHT,
            "loss_paste_ce": sim.COPY_PASTE.WEIGHT * sim.COPY_PASTE.CE_WEIGHT,
            "loss_paste_dice": sim.COPY_PASTE.WEIGHT * sim.COPY_PASTE.DICE_WEIGHT,
        }
        losses = ("labels", "masks") if full else ("labels", "projection", "pairwise")
        pseudo_labeler = None
        if sim.ENABLED:
            from ..sim.pseudo_labeler import SIMPseudoLabeler

            pseudo_labeler = SIMPseudoLabeler.from_config(cfg)
            if sim.PSEUDO_LOSS:
                losses = losses + ("pseudo",)
            else:
                pseudo_labeler = None
            if sim.COPY_PASTE.ENABLED:
                losses = losses + ("paste",)
        return cls(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=losses,
            stride=bs.MASK_STRIDE,
            loss_stride=bs.LOSS_STRIDE,
            pairwise_size=bs.PAIRWISE_SIZE,
            pairwise_dilation=bs.PAIRWISE_DILATION,
            pairwise_theta=bs.PAIRWISE_THETA,
            pairwise_color_thresh=bs.PAIRWISE_COLOR_THRESH,
            pairwise_warmup_iters=bs.PAIRWISE_WARMUP_ITERS,
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
            dice_eps=bs.DICE_EPS,
            deep_supervision=mf.DEEP_SUPERVISION,
            pseudo_labeler=pseudo_labeler,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, losses={self.losses}, weights={self.weight_dict}"

    @property
    def uses_masks(self) -> bool:
        """True when targets must carry "masks" (full supervision)."""
        return "masks" in self.losses or self.matcher.mode == "mask"

    @property
    def needs_teacher(self) -> bool:
        """True when forward() needs the EMA teacher's outputs (SIM)."""
        return self.pseudo_labeler is not None

    # ------------------------------------------------------------------ helpers
    def pairwise_ramp(self, iteration: int) -> float:
        """min(iteration / warm-up, 1); 1 when the warm-up is 0."""
        if self.pairwise_warmup_iters == 0:
            return 1.0
        return min(max(float(iteration), 0.0) / self.pairwise_warmup_iters, 1.0)

    @staticmethod
    def _num_masks(targets: Sequence[Mapping], device) -> float:
        count = torch.tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
        )
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            world = dist.get_world_size()
        return float(torch.clamp(count / world, min=1.0).item())

    def _check_inputs(self, outputs: Mapping, targets: Sequence[Mapping]) -> None:
        for key in ("pred_logits", "pred_masks"):
            if key not in outputs:
                raise KeyError(f"BoxSupSetCriterion: outputs lack {key!r}")
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        if logits.ndim != 3 or logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"pred_logits must be (B, Q, {self.num_classes + 1}), got {tuple(logits.shape)}"
            )
        if masks.ndim != 4 or masks.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"pred_masks must be (B, Q, Hm, Wm) matching pred_logits {tuple(logits.shape[:2])}, "
                f"got {tuple(masks.shape)}"
            )
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} images")
        for aux_i, aux in enumerate(outputs.get("aux_outputs", []) or []):
            if aux["pred_logits"].shape != logits.shape or aux["pred_masks"].shape != masks.shape:
                raise ValueError(
                    f"aux_outputs[{aux_i}] shapes {tuple(aux['pred_logits'].shape)}, "
                    f"{tuple(aux['pred_masks'].shape)} differ from the final output's"
                )
        for b, t in enumerate(targets):
            labels = t["labels"]
            if labels.ndim != 1:
                raise ValueError(f"targets[{b}]['labels'] must be 1-D, got {tuple(labels.shape)}")

    def _check_label_range(self, targets: Sequence[Mapping]) -> None:
        """All class ids in [0, num_classes): one host round trip for the whole batch.

        Every rank reaches the same decision (an all-reduced flag): a rank that raised alone
        would leave the others waiting in the next all-reduce until the NCCL timeout.
        """
        labels = [t["labels"] for t in targets if t["labels"].numel()]
        bad = False
        if labels:
            flat = torch.cat([lab.reshape(-1).to(labels[0].device) for lab in labels])
            bad = bool(torch.stack([(flat < 0).any(), (flat >= self.num_classes).any()]).any())
        bad_ranks = flagged_ranks(bad)
        if bad:
            for b, t in enumerate(targets):
                lab = t["labels"]
                if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                    raise ValueError(
                        f"targets[{b}]['labels'] has class ids outside [0, {self.num_classes}): "
                        f"min {int(lab.min())}, max {int(lab.max())}"
                    )
        if bad_ranks:
            raise ValueError(other_rank_error(bad_ranks, f"class ids outside [0, {self.num_classes})"))

    def _box_targets(self, targets: Sequence[Mapping], grid_hw, device) -> List[Dict[str, torch.Tensor]]:
        """Per image {"labels", "boxes", "box_masks"} on ``device``; never touches "masks"."""
        out = []
        for b, t in enumerate(targets):
            labels = t["labels"].to(device=device, dtype=torch.long)
            if "box_masks" in t:
                bm = t["box_masks"].to(device=device, dtype=torch.float32)
                if tuple(bm.shape) != (len(labels), *grid_hw):
                    raise ValueError(
                        f"targets[{b}]['box_masks'] must be {(len(labels), *grid_hw)}, got {tuple(bm.shape)}"
                    )
                boxes = t["boxes"].to(device) if "boxes" in t else None
            else:
                boxes = t["boxes"].to(device)
                if tuple(boxes.shape) != (len(labels), 4):
                    raise ValueError(
                        f"targets[{b}]['boxes'] must be ({len(labels)}, 4) XYXY, got {tuple(boxes.shape)}"
                    )
                bm = boxes_to_grid_masks(boxes, grid_hw, self.loss_stride)
            entry = {"labels": labels, "box_masks": bm}
            if boxes is not None:
                entry["boxes"] = boxes
            out.append(entry)
        return out

    def _mask_targets(self, targets: Sequence[Mapping], full_hw, device) -> List[Dict[str, torch.Tensor]]:
        out = []
        for b, t in enumerate(targets):
            if "masks" not in t:
                raise KeyError(f"targets[{b}] lacks 'masks', required under full mask supervision")
            masks = t["masks"]
            if masks.ndim != 3 or masks.shape[0] != len(t["labels"]) or tuple(masks.shape[-2:]) != tuple(full_hw):
                raise ValueError(
                    f"targets[{b}]['masks'] must be ({len(t['labels'])}, {full_hw[0]}, {full_hw[1]}) "
                    f"(padded input size = loss stride x mask grid), got {tuple(masks.shape)}"
                )
            entry = dict(t)
            entry["labels"] = t["labels"].to(device=device, dtype=torch.long)
            entry["masks"] = masks.to(device)
            out.append(entry)
        return out

    def _pairwise_context(self, image_info: Optional[Mapping], batch: int, grid_hw, device):
        if image_info is None or "images" not in image_info or "valid" not in image_info:
            raise ValueError("the pairwise loss needs image_info with 'images' and 'valid'")
        images, valid = image_info["images"], image_info["valid"]
        full_hw = (grid_hw[0] * self.loss_stride, grid_hw[1] * self.loss_stride)
        if images.ndim != 4 or tuple(images.shape) != (batch, 3, *full_hw):
            raise ValueError(
                f"image_info['images'] must be ({batch}, 3, {full_hw[0]}, {full_hw[1]}) "
                f"(loss stride {self.loss_stride} x loss grid), got {tuple(images.shape)}"
            )
        if tuple(valid.shape) != (batch, *full_hw):
            raise ValueError(
                f"image_info['valid'] must be ({batch}, {full_hw[0]}, {full_hw[1]}), got {tuple(valid.shape)}"
            )
        with torch.no_grad():
            similarity = images_to_color_similarity(
                images.to(device),
                self.loss_stride,
                self.pairwise_size,
                self.pairwise_dilation,
                self.pairwise_theta,
            )
            valid_grid = downsample_valid(valid.to(device), self.loss_stride)
        return similarity, valid_grid

    @property
    def loss_grid_factor(self) -> int:
        """How many loss-grid cells per ``pred_masks`` cell along each side."""
        return self.stride // self.loss_stride

    def _to_loss_grid(self, masks: torch.Tensor) -> torch.Tensor:
        """(..., Hm, Wm) mask logits -> (..., Hm*f, Wm*f), bilinear; unchanged when f = 1."""
        factor = self.loss_grid_factor
        if factor == 1:
            return masks
        lead = masks.shape[:-2]
        flat = masks.reshape(-1, 1, *masks.shape[-2:])
        fine = F.interpolate(flat, scale_factor=factor, mode="bilinear", align_corners=False)
        return fine.reshape(*lead, *fine.shape[-2:])

    # ------------------------------------------------------------------ step 1: prepare
    def prepare(
        self, outputs: Mapping, targets: Sequence[Mapping], image_info: Optional[Mapping], iteration: int
    ) -> PreparedTargets:
        """Targets of the batch in GT order, box masks, edge weights and valid grid, once per step."""
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        device = logits.device
        grid_hw = tuple(n * self.loss_grid_factor for n in masks.shape[-2:])
        full_hw = (grid_hw[0] * self.loss_stride, grid_hw[1] * self.loss_stride)
        num_masks = self._num_masks(targets, device)

        if self.uses_masks:
            per_image = self._mask_targets(targets, full_hw, device)
            if "projection" in self.losses or "pairwise" in self.losses:
                for entry, t in zip(per_image, self._box_targets(targets, grid_hw, device)):
                    entry["box_masks"] = t["box_masks"]
        else:
            per_image = self._box_targets(targets, grid_hw, device)
        counts = [len(t["labels"]) for t in per_image]
        labels = torch.cat([t["labels"] for t in per_image]) if per_image else torch.zeros(0, dtype=torch.long)
        batch_idx = torch.repeat_interleave(
            torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
        )
        box_masks = (
            torch.cat([t["box_masks"] for t in per_image])
            if per_image and "box_masks" in per_image[0]
            else masks.new_zeros((0, *grid_hw), dtype=torch.float32)
        )
        boxes = None
        if per_image and all("boxes" in t for t in per_image):
            boxes = torch.cat([t["boxes"].reshape(-1, 4).to(torch.float32) for t in per_image])
        gt_masks = torch.cat([t["masks"] for t in per_image]) if self.uses_masks else None

        edge_weights = valid_grid = edge_counts = None
        ramp = 1.0
        if "pairwise" in self.losses:
            similarity, valid_grid = self._pairwise_context(image_info, logits.shape[0], grid_hw, device)
            with torch.no_grad():
                edge_weights = pairwise_edge_weights(
                    similarity[batch_idx],
                    box_masks,
                    valid_grid[batch_idx],
                    self.pairwise_color_thresh,
                    self.pairwise_size,
                    self.pairwise_dilation,
                )
                edge_counts = edge_weights.flatten(1).sum(1)
            ramp = self.pairwise_ramp(iteration)
        elif image_info is not None and "valid" in image_info:
            valid_grid = downsample_valid(image_info["valid"].to(device), self.loss_stride)
        grid_images = None
        if self.pseudo_labeler is not None and self.pseudo_labeler.uses_appearance:
            grid_images = self._grid_images(image_info, logits.shape[0], grid_hw, device)
        num_pasted = pasted = paste_index = paste_masks = None
        if "paste" in self.losses and any(int(t.get("num_pasted", 0)) for t in targets):
            num_pasted = [int(t.get("num_pasted", 0)) for t in targets]
            flags = [i >= n - p for n, p in zip(counts, num_pasted) for i in range(n)]
            pasted = torch.tensor(flags, dtype=torch.bool).to(device)
            paste_index = (torch.cumsum(pasted.long(), 0) - 1).masked_fill(~pasted, -1)
            paste_masks = torch.cat([t["paste_masks"].to(device) for t, p in zip(targets, num_pasted) if p])
        return PreparedTargets(
            per_image=per_image,
            labels=labels.to(device),
            batch_idx=batch_idx,
            counts=counts,
            box_masks=box_masks,
            boxes=boxes,
            masks=gt_masks,
            grid_hw=grid_hw,
            num_masks=num_masks,
            edge_weights=edge_weights,
            valid_grid=valid_grid,
            ramp=ramp,
            edge_counts=edge_counts,
            num_pasted=num_pasted,
            pasted=pasted,
            paste_index=paste_index,
            paste_masks=paste_masks,
            grid_images=grid_images,
        )

    def _grid_images(self, image_info: Optional[Mapping], batch: int, grid_hw, device) -> torch.Tensor:
        """(B, 3, H, W): the input RGB average-pooled to the loss grid (MODEL.SIM.APPEARANCE)."""
        images = None if image_info is None else image_info.get("images")
        full_hw = (grid_hw[0] * self.loss_stride, grid_hw[1] * self.loss_stride)
        if images is None or images.ndim != 4 or tuple(images.shape) != (batch, 3, *full_hw):
            raise ValueError(
                f"MODEL.SIM.APPEARANCE needs image_info['images'] of shape ({batch}, 3, {full_hw[0]}, {full_hw[1]}), "
                f"got {None if images is None else tuple(images.shape)}"
            )
        with torch.no_grad():
            return F.avg_pool2d(images.to(device).float(), self.loss_stride)

    # ------------------------------------------------------------------ step 2: match
    def match(self, decoder_outputs: Sequence[Mapping], prepared: PreparedTargets) -> MatchResult:
        """Match every decoder output: the costs of all outputs go to the host in one transfer
        (labels were checked in forward), the indices come back in one (non-blocking on CUDA)."""
        indices = self.matcher.match_outputs(
            decoder_outputs, prepared.per_image, labels_checked=True,
            mask_transform=self._to_loss_grid if self.loss_grid_factor > 1 else None,
        )
        offsets = [0]
        for n in prepared.counts:
            offsets.append(offsets[-1] + n)
        num_gt = offsets[-1]
        triples = []  # per output: (3, M) rows image, query, GT
        query_of_gt = torch.full((len(indices), num_gt), -1, dtype=torch.int64)
        # with copy-paste, the pairs of pasted GTs come first (their count per output is known
        # here, on the host), so the paste loss slices them without a device sync
        first_pasted = [n - p for n, p in zip(prepared.counts, prepared.num_pasted)] if prepared.num_pasted else None
        num_paste_pairs = [] if first_pasted else None
        for level, per_image in enumerate(indices):
            rows, pasted_rows = [], []
            for b, (src, tgt) in enumerate(per_image):
                row = torch.stack([torch.full_like(src, b), src, tgt + offsets[b]])
                if first_pasted:
                    is_pasted = tgt >= first_pasted[b]
                    pasted_rows.append(row[:, is_pasted])
                    row = row[:, ~is_pasted]
                rows.append(row)
                query_of_gt[level, tgt + offsets[b]] = src
            if first_pasted:
                num_paste_pairs.append(sum(r.shape[1] for r in pasted_rows))
                rows = pasted_rows + rows
            triples.append(torch.cat(rows, dim=1) if rows else torch.zeros((3, 0), dtype=torch.int64))
        packed = torch.cat([torch.stack(triples), query_of_gt[:, None].expand(-1, 3, -1)], dim=2)
        device = prepared.labels.device
        packed = packed.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else packed.to(device)
        m = triples[0].shape[1] if triples else 0
        flat, qog = packed[:, :, :m], packed[:, 0, m:]
        return MatchResult(
            indices=indices, batch_idx=flat[:, 0], query_idx=flat[:, 1], gt_idx=flat[:, 2], query_of_gt=qog,
            num_paste_pairs=num_paste_pairs,
        )

    # ------------------------------------------------------------------ step 3: losses
    def loss_labels(self, out: Mapping, prepared: PreparedTargets, level: int, match: MatchResult):
        logits = out["pred_logits"].to(torch.float32)
        batch_idx, src_idx = match.batch_idx[level], match.query_idx[level]
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        if batch_idx.numel():
            classes[batch_idx, src_idx] = prepared.labels[match.gt_idx[level]]
        weight = self.empty_weight.to(device=logits.device, dtype=torch.float32)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, weight)}

    def _matched_logits(self, out: Mapping, level: int, match: MatchResult) -> torch.Tensor:
        """(M, H, W) fp32 mask logits of the matched queries on the loss grid, in match order."""
        masks = out["pred_masks"]
        # only the matched masks are upsampled to the loss grid (and back-propagated through)
        return self._to_loss_grid(masks[match.batch_idx[level], match.query_idx[level]].to(torch.float32))

    def loss_projection(self, src, prepared: PreparedTargets, gt_idx) -> Dict[str, torch.Tensor]:
        loss = projection_loss_from_logits(src, prepared.box_masks[gt_idx], self.dice_eps).sum() / prepared.num_masks
        return {"loss_proj": loss}

    def loss_pairwise(self, src, prepared: PreparedTargets, gt_idx) -> Dict[str, torch.Tensor]:
        loss = pairwise_loss_weighted(
            src, prepared.edge_weights, self.pairwise_size, self.pairwise_dilation,
            rows=gt_idx, edge_counts=prepared.edge_counts,
        )
        return {"loss_pairwise": loss}

    def loss_masks(self, out, prepared: PreparedTargets, level: int, match: MatchResult):
        src = self._matched_logits(out, level, match)
        gt = prepared.masks[match.gt_idx[level]]
        ce, dice = point_mask_losses(
            src,
            gt.to(src.device),
            prepared.num_masks,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            self.matcher.generator,
        )
        return {"loss_mask": ce, "loss_dice": dice}

    def loss_pseudo(self, src, prepared: PreparedTargets, gt_idx, pseudo) -> Dict[str, torch.Tensor]:
        if pseudo is None or pseudo.targets is None:  # before the warm-up: the terms exist and are 0
            zero = src.sum() * 0.0
            return {"loss_pseudo_bce": zero, "loss_pseudo_dice": zero}
        bce, dice = self.pseudo_labeler.loss(src, pseudo.targets[gt_idx], pseudo.weights[gt_idx])
        return {"loss_pseudo_bce": bce.sum() / prepared.num_masks, "loss_pseudo_dice": dice.sum() / prepared.num_masks}

    def loss_paste(self, out, prepared: PreparedTargets, level: int, match: MatchResult) -> Dict[str, torch.Tensor]:
        """Eq.9: point-sampled CE + dice against the paste masks, pasted GTs only, normalised
        by the number of pasted GTs of this process's batch."""
        if prepared.paste_masks is None or not match.num_paste_pairs[level]:
            zero = out["pred_masks"].sum() * 0.0  # the terms exist (and are 0) when nothing was pasted
            return {"loss_paste_ce": zero, "loss_paste_dice": zero}
        m = match.num_paste_pairs[level]
        b, q, g = match.batch_idx[level][:m], match.query_idx[level][:m], match.gt_idx[level][:m]
        target = prepared.paste_masks[prepared.paste_index[g]]
        ce, dice = point_mask_losses(
            out["pred_masks"][b, q].to(torch.float32),
            target,
            float(max(sum(prepared.num_pasted), 1)),
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            self.matcher.generator,
        )
        return {"loss_paste_ce": ce, "loss_paste_dice": dice}

    def _output_losses(self, out, prepared: PreparedTargets, level: int, match: MatchResult, pseudo):
        raw: Dict[str, torch.Tensor] = {}
        gt_idx = match.gt_idx[level]
        if "labels" in self.losses:
            raw.update(self.loss_labels(out, prepared, level, match))
        if any(name in self.losses for name in ("projection", "pairwise", "pseudo")):
            # gathered (and upsampled to the loss grid) once for all box and pseudo losses
            src = self._matched_logits(out, level, match)
            if "projection" in self.losses:
                raw.update(self.loss_projection(src, prepared, gt_idx))
            if "pairwise" in self.losses:
                raw.update(self.loss_pairwise(src, prepared, gt_idx))
            if "pseudo" in self.losses:
                raw.update(self.loss_pseudo(src, prepared, gt_idx, pseudo))
        if "masks" in self.losses:
            raw.update(self.loss_masks(out, prepared, level, match))
        if "paste" in self.losses:
            raw.update(self.loss_paste(out, prepared, level, match))
        weighted = {k: v * self.weight_dict[k] for k, v in raw.items()}
        if "loss_pairwise" in weighted:
            weighted["loss_pairwise"] = weighted["loss_pairwise"] * prepared.ramp
        return weighted

    def decoder_outputs(self, outputs: Mapping) -> List[Tuple[str, Mapping]]:
        """(suffix, output) of every supervised decoder output: aux_0 .. aux_{L-1}, then the final."""
        out: List[Tuple[str, Mapping]] = []
        if self.deep_supervision:
            aux_list = outputs.get("aux_outputs", []) or []
            out += [(f"_{i}", aux) for i, aux in enumerate(aux_list)]
        out.append(("", outputs))
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        outputs: Mapping,
        targets: Sequence[Mapping],
        image_info: Optional[Mapping] = None,
        iteration: int = 0,
        return_indices: bool = False,
        teacher_outputs: Optional[Mapping] = None,
    ):
        """Weighted losses of every decoder output.

        Returns ``{key: loss}`` (final output unsuffixed, aux output i suffixed ``_{i}``), or
        ``(losses, indices)`` with ``return_indices=True``, where ``indices`` holds the
        matcher's per-image (query, GT) index pairs for each output, ordered
        [aux_0, ..., aux_{L-1}, final]. With SIM, ``teacher_outputs`` are the EMA teacher's
        outputs on the same padded batch (same structure as ``outputs``, plus "mask_features").
        """
        self._check_inputs(outputs, targets)
        self._check_label_range(targets)
        if self.needs_teacher and teacher_outputs is None:
            raise ValueError("SIM's pseudo-mask loss needs the EMA teacher's outputs (teacher_outputs)")
        device = outputs["pred_logits"].device
        decoder_outputs = self.decoder_outputs(outputs)
        with torch.autocast(device_type=device.type, enabled=False):
            prepared = self.prepare(outputs, targets, image_info, iteration)
            match = self.match([out for _, out in decoder_outputs], prepared)
            pseudo = None
            if self.needs_teacher:
                teacher_levels = [out for _, out in self.decoder_outputs(teacher_outputs)]
                pseudo = self.pseudo_labeler(
                    teacher_levels, teacher_outputs["mask_features"], prepared, match, iteration,
                    stride=self.loss_stride, to_loss_grid=self._to_loss_grid,
                )
                if prepared.pasted is not None and pseudo.weights is not None:
                    # pasted instances have a known mask (the paste loss): no pseudo-mask loss
                    pseudo.weights = pseudo.weights * (~prepared.pasted)[:, None, None]
            self.last_pseudo = pseudo
            losses: Dict[str, torch.Tensor] = {}
            for level, (suffix, out) in enumerate(decoder_outputs):
                for key, value in self._output_losses(out, prepared, level, match, pseudo).items():
                    losses[key + suffix] = value
        if return_indices:
            return losses, match.indices
        return losses
