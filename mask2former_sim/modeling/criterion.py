"""Set criterion for box-supervised (and fully supervised) Mask2Former training.

Box mode (METHOD.md §1): classification CE + projection loss + colour pairwise loss,
matched with the box-projection Hungarian matcher. Full mode: classification CE +
point-sampled mask CE and dice, matched on mask costs (the fully supervised upper bound).
Every decoder output is matched and supervised (deep supervision); the losses of aux output
i carry the suffix ``_{i}``. Returned losses are already weighted: their sum is the loss.
Box mode never reads ``targets[i]["masks"]``.

``pred_masks`` lie on the ``stride`` grid of the input. With ``loss_stride < stride`` they
are first upsampled bilinearly (factor ``stride // loss_stride``) and everything (matching,
box indicators, colour affinities, valid mask) works on the finer ``loss_stride`` grid. On
small inputs a stride-4 cell is a large part of an object, and the pooled colour of the
cells on its outline differs from both the object and the background; the pairwise loss
then links neither side to the outline, and a hollow outline satisfies both box losses
(docs/BENCHMARKS.md). The finer grid removes that escape.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .losses.box_targets import boxes_to_grid_masks, downsample_valid
from .losses.pairwise import images_to_color_similarity, pairwise_loss
from .losses.point_mask import point_mask_losses
from .losses.projection import projection_loss
from .matcher import HungarianMatcher

__all__ = ["BoxSupSetCriterion"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]

_LOSS_KEYS = {
    "labels": ("loss_ce",),
    "projection": ("loss_proj",),
    "pairwise": ("loss_pairwise",),
    "masks": ("loss_mask", "loss_dice"),
}


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
        empty_weight = torch.ones(self.num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    @classmethod
    def from_config(cls, cfg) -> "BoxSupSetCriterion":
        """Build from MODEL.BOXSUP / MODEL.MASK_FORMER / MODEL.SEM_SEG_HEAD.NUM_CLASSES."""
        bs, mf = cfg.MODEL.BOXSUP, cfg.MODEL.MASK_FORMER
        full = bool(bs.FULL_MASK_SUPERVISION)
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
        }
        return cls(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weight_dict,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=("labels", "masks") if full else ("labels", "projection", "pairwise"),
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
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, losses={self.losses}, weights={self.weight_dict}"

    @property
    def uses_masks(self) -> bool:
        """True when targets must carry "masks" (full supervision)."""
        return "masks" in self.losses or self.matcher.mode == "mask"

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
        """All class ids in [0, num_classes): one host round trip for the whole batch."""
        labels = [t["labels"] for t in targets if t["labels"].numel()]
        if not labels:
            return
        flat = torch.cat([lab.reshape(-1).to(labels[0].device) for lab in labels])
        bad = torch.stack([(flat < 0).any(), (flat >= self.num_classes).any()]).any()
        if bool(bad):
            for b, t in enumerate(targets):
                lab = t["labels"]
                if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
                    raise ValueError(f"targets[{b}]['labels'] has class ids outside [0, {self.num_classes})")

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

    @staticmethod
    def _flat_indices(indices: Indices, device) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx.to(device), src_idx.to(device)

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

    def _match(self, out: Mapping, targets) -> Indices:
        """Hungarian matching of one decoder output on the loss grid (no gradient needed)."""
        if self.loss_grid_factor == 1:
            return self.matcher(out, targets)
        with torch.no_grad():  # the matcher is no_grad itself; so is the upsampling for it
            fine = {"pred_logits": out["pred_logits"], "pred_masks": self._to_loss_grid(out["pred_masks"])}
        return self.matcher(fine, targets)

    # ------------------------------------------------------------------ losses
    def loss_labels(self, out: Mapping, targets, indices: Indices) -> Dict[str, torch.Tensor]:
        logits = out["pred_logits"].to(torch.float32)
        batch_idx, src_idx = self._flat_indices(indices, logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.long, device=logits.device)
        if batch_idx.numel():
            classes[batch_idx, src_idx] = torch.cat(
                [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
            ).to(logits.device)
        weight = self.empty_weight.to(device=logits.device, dtype=torch.float32)
        return {"loss_ce": F.cross_entropy(logits.transpose(1, 2), classes, weight)}

    def _matched(self, out: Mapping, targets, indices: Indices, key: str):
        masks = out["pred_masks"]
        batch_idx, src_idx = self._flat_indices(indices, masks.device)
        # only the matched masks are upsampled to the loss grid (and back-propagated through)
        src = self._to_loss_grid(masks[batch_idx, src_idx].to(torch.float32))
        parts = [t[key][j.to(t[key].device)] for t, (_, j) in zip(targets, indices)]
        tgt = torch.cat(parts) if parts else masks.new_zeros((0, *src.shape[-2:]))
        return src, tgt, batch_idx

    def loss_projection(self, matched, num_masks) -> Dict[str, torch.Tensor]:
        src, box_masks, _ = matched
        loss = projection_loss(src.sigmoid(), box_masks.to(src.device), self.dice_eps).sum() / num_masks
        return {"loss_proj": loss}

    def loss_pairwise(self, matched, context) -> Dict[str, torch.Tensor]:
        similarity, valid_grid = context
        src, box_masks, batch_idx = matched
        loss = pairwise_loss(
            src,
            similarity[batch_idx],
            box_masks.to(src.device),
            valid_grid[batch_idx],
            self.pairwise_color_thresh,
            self.pairwise_size,
            self.pairwise_dilation,
        )
        return {"loss_pairwise": loss}

    def loss_masks(self, out, targets, indices, num_masks) -> Dict[str, torch.Tensor]:
        src, gt, _ = self._matched(out, targets, indices, "masks")
        ce, dice = point_mask_losses(
            src,
            gt.to(src.device),
            num_masks,
            self.num_points,
            self.oversample_ratio,
            self.importance_sample_ratio,
            self.matcher.generator,
        )
        return {"loss_mask": ce, "loss_dice": dice}

    def _output_losses(self, out, targets, indices, num_masks, context, ramp) -> Dict[str, torch.Tensor]:
        raw: Dict[str, torch.Tensor] = {}
        if "labels" in self.losses:
            raw.update(self.loss_labels(out, targets, indices))
        if "projection" in self.losses or "pairwise" in self.losses:
            # gathered (and upsampled to the loss grid) once for both box losses
            box_matched = self._matched(out, targets, indices, "box_masks")
            if "projection" in self.losses:
                raw.update(self.loss_projection(box_matched, num_masks))
            if "pairwise" in self.losses:
                raw.update(self.loss_pairwise(box_matched, context))
        if "masks" in self.losses:
            raw.update(self.loss_masks(out, targets, indices, num_masks))
        weighted = {k: v * self.weight_dict[k] for k, v in raw.items()}
        if "loss_pairwise" in weighted:
            weighted["loss_pairwise"] = weighted["loss_pairwise"] * ramp
        return weighted

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        outputs: Mapping,
        targets: Sequence[Mapping],
        image_info: Optional[Mapping] = None,
        iteration: int = 0,
        return_indices: bool = False,
    ):
        """Weighted losses of every decoder output.

        Returns ``{key: loss}`` (final output unsuffixed, aux output i suffixed ``_{i}``), or
        ``(losses, indices)`` with ``return_indices=True``, where ``indices`` holds the
        matcher's per-image (query, GT) index pairs for each output, ordered
        [aux_0, ..., aux_{L-1}, final].
        """
        self._check_inputs(outputs, targets)
        self._check_label_range(targets)
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        device = logits.device
        grid_hw = tuple(n * self.loss_grid_factor for n in masks.shape[-2:])
        full_hw = (grid_hw[0] * self.loss_stride, grid_hw[1] * self.loss_stride)
        num_masks = self._num_masks(targets, device)

        if self.uses_masks:
            prepared = self._mask_targets(targets, full_hw, device)
            if "projection" in self.losses or "pairwise" in self.losses:
                for entry, t in zip(prepared, self._box_targets(targets, grid_hw, device)):
                    entry["box_masks"] = t["box_masks"]
        else:
            prepared = self._box_targets(targets, grid_hw, device)
        context = None
        ramp = 1.0
        if "pairwise" in self.losses:
            context = self._pairwise_context(image_info, logits.shape[0], grid_hw, device)
            ramp = self.pairwise_ramp(iteration)

        decoder_outputs: List[Tuple[str, Mapping]] = []
        if self.deep_supervision:
            aux_list = outputs.get("aux_outputs", []) or []
            decoder_outputs += [(f"_{i}", aux) for i, aux in enumerate(aux_list)]
        decoder_outputs.append(("", outputs))

        losses: Dict[str, torch.Tensor] = {}
        all_indices: List[Indices] = []
        with torch.autocast(device_type=device.type, enabled=False):
            for suffix, out in decoder_outputs:
                indices = self._match(out, prepared)
                all_indices.append(indices)
                for key, value in self._output_losses(out, prepared, indices, num_masks, context, ramp).items():
                    losses[key + suffix] = value
        if return_indices:
            return losses, all_indices
        return losses
