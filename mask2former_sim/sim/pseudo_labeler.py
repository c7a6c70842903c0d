"""SIM's pseudo labels for one training step: from the teacher's outputs and the student's
matches to per-GT pseudo targets, and the prototype update (METHOD.md §2).

This module wires the equation modules together; it holds no equation of its own:

    positives   P_g = {(l, σ_l(g)) : l = 0..L} (+ top-k extra final-layer teacher queries)
    teacher masks m̃ at the positives, on the loss grid          (teacher forward, no grad)
    Eq.6        w = IoU^γ weights, T_g = Σ w m̃                  pseudo_masks.py
    Eq.2-5      prototype update from {T_g > 0.7} ∩ B_g          prototypes.py  (every step)
    Eq.1        S_g from the teacher's f̂ and the prototypes      prototypes.py  (after warm-up)
    (option)    A_g per-image colour model, S' = (1-α) S + α A    appearance.py  (not in the paper)
    Eq.7, 8     R_g = (1-β) S_g + β T_g, Y_g, W_g                pseudo_masks.py (after warm-up)

The student's Hungarian matches (``MatchResult.query_of_gt``, (L+1, G)) choose the positives;
the teacher's masks are read at the same (output, query). S_g uses the prototypes *before*
this step's update, so the update is the last thing a step does with them (DESIGN.md's
"after the step"). Everything is under no_grad and fp32; nothing here syncs with the host,
except the one packed all-reduce of the prototype update on every rank.

Shapes: G GTs of the batch (GT order of the criterion), P = L+1 (+k) positives per GT,
(H, W) the loss grid, D the mask-feature dimension.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .appearance import appearance_maps
from .prototypes import PrototypeMemory, background_cells, center_features, normalize_features
from .pseudo_masks import (
    adaptive_high_thresh,
    instance_maps,
    mask_boxes,
    paired_box_iou,
    positive_weights,
    pseudo_mask_loss,
    pseudo_targets,
    self_correct,
)

__all__ = ["PseudoTargets", "SIMPseudoLabeler"]


@dataclass
class PseudoTargets:
    """One step's pseudo labels, GT order; every map (G, H, W) on the loss grid."""

    targets: Optional[Tensor]  # Y_g (None before the warm-up)
    weights: Optional[Tensor]  # W_g
    instance: Tensor  # T_g
    semantic: Optional[Tensor]  # S_g
    combined: Optional[Tensor]  # R_g
    positive_weights: Tensor  # (G, P) w of Eq.6
    positive_valid: Tensor  # (G, P) bool
    positive_queries: Tensor  # (G, P) teacher query of each positive (-1 when none)
    high_thresh: Optional[Tensor]  # (G,) τ_h
    stats: Dict[str, Tensor]
    appearance: Optional[Tensor] = None  # A_g (MODEL.SIM.APPEARANCE.WEIGHT > 0, after the warm-up)


class SIMPseudoLabeler(nn.Module):
    """Pseudo targets of SIM (Eq.1-8) and the prototype memory (a persistent buffer)."""

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        num_prototypes: int = 10,
        proto_temperature: float = 1.0,
        center_features: bool = False,
        background_prototypes: bool = False,
        outside_box_negatives: bool = False,
        outside_box_balanced: bool = False,
        appearance_weight: float = 0.0,
        appearance_levels: int = 32,
        appearance_smooth: bool = True,
        proto_momentum: float = 0.999,
        proto_pixel_thresh: float = 0.7,
        sinkhorn_eps: float = 0.05,
        sinkhorn_iters: int = 3,
        iou_gamma: float = 5.0,
        num_extra_positives: int = 0,
        modulation: float = 0.5,
        low_thresh: float = 0.3,
        high_thresh: float = 0.7,
        adaptive_high_thresh: bool = False,
        adaptive_high_range: Sequence[float] = (0.7, 0.8),
        warmup_iters: int = 10000,
        dice_eps: float = 1e-5,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= modulation <= 1.0:
            raise ValueError(f"MODEL.SIM.MODULATION (beta) must be in [0, 1], got {modulation}")
        if not 0.0 <= low_thresh <= high_thresh <= 1.0:
            raise ValueError(
                f"MODEL.SIM.LOW_THRESH / HIGH_THRESH must satisfy 0 <= low <= high <= 1, got {low_thresh}, {high_thresh}"
            )
        if len(adaptive_high_range) != 2 or not low_thresh <= adaptive_high_range[0] <= adaptive_high_range[1]:
            raise ValueError(
                f"MODEL.SIM.ADAPTIVE_HIGH_RANGE must be [lo, hi] with LOW_THRESH <= lo <= hi, got {list(adaptive_high_range)}"
            )
        if iou_gamma < 0:
            raise ValueError(f"MODEL.SIM.IOU_GAMMA must be >= 0, got {iou_gamma}")
        if num_extra_positives < 0:
            raise ValueError(f"MODEL.SIM.NUM_EXTRA_POSITIVES must be >= 0, got {num_extra_positives}")
        if warmup_iters < 0:
            raise ValueError(f"MODEL.SIM.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        if proto_temperature <= 0:
            raise ValueError(f"MODEL.SIM.PROTO_TEMPERATURE must be > 0, got {proto_temperature}")
        if not 0.0 <= appearance_weight <= 1.0:
            raise ValueError(f"MODEL.SIM.APPEARANCE.WEIGHT must be in [0, 1], got {appearance_weight}")
        if int(appearance_levels) != appearance_levels or not 2 <= appearance_levels <= 256:
            raise ValueError(f"MODEL.SIM.APPEARANCE.LEVELS must be an integer in [2, 256], got {appearance_levels}")
        if outside_box_balanced and not outside_box_negatives:
            raise ValueError("MODEL.SIM.OUTSIDE_BOX_BALANCED needs MODEL.SIM.OUTSIDE_BOX_NEGATIVES True")
        self.outside_box_negatives = bool(outside_box_negatives)
        self.outside_box_balanced = bool(outside_box_balanced)
        self.appearance_weight = float(appearance_weight)
        self.appearance_levels = int(appearance_levels)
        self.appearance_smooth = bool(appearance_smooth)
        self.num_classes = int(num_classes)
        self.background_prototypes = bool(background_prototypes)
        # with background prototypes the memory's last class row (index C) is the background
        self.memory = PrototypeMemory(
            self.num_classes + int(self.background_prototypes), num_prototypes, feature_dim, proto_momentum, sinkhorn_eps, sinkhorn_iters, seed
        )
        self.proto_temperature = float(proto_temperature)
        self.center_features = bool(center_features)
        self.proto_pixel_thresh = float(proto_pixel_thresh)
        self.iou_gamma = float(iou_gamma)
        self.num_extra_positives = int(num_extra_positives)
        self.modulation = float(modulation)
        self.low_thresh = float(low_thresh)
        self.high_thresh = float(high_thresh)
        self.adaptive_high_thresh = bool(adaptive_high_thresh)
        self.adaptive_high_range = (float(adaptive_high_range[0]), float(adaptive_high_range[1]))
        self.warmup_iters = int(warmup_iters)
        self.dice_eps = float(dice_eps)

    @classmethod
    def from_config(cls, cfg) -> "SIMPseudoLabeler":
        sim = cfg.MODEL.SIM
        return cls(
            num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            feature_dim=cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            num_prototypes=sim.NUM_PROTOTYPES,
            proto_temperature=sim.PROTO_TEMPERATURE,
            center_features=sim.CENTER_FEATURES,
            background_prototypes=sim.BACKGROUND_PROTOTYPES,
            outside_box_negatives=sim.OUTSIDE_BOX_NEGATIVES,
            outside_box_balanced=sim.OUTSIDE_BOX_BALANCED,
            appearance_weight=sim.APPEARANCE.WEIGHT,
            appearance_levels=sim.APPEARANCE.LEVELS,
            appearance_smooth=sim.APPEARANCE.SMOOTH,
            proto_momentum=sim.PROTO_MOMENTUM,
            proto_pixel_thresh=sim.PROTO_PIXEL_THRESH,
            sinkhorn_eps=sim.SINKHORN_EPS,
            sinkhorn_iters=sim.SINKHORN_ITERS,
            iou_gamma=sim.IOU_GAMMA,
            num_extra_positives=sim.NUM_EXTRA_POSITIVES,
            modulation=sim.MODULATION,
            low_thresh=sim.LOW_THRESH,
            high_thresh=sim.HIGH_THRESH,
            adaptive_high_thresh=sim.ADAPTIVE_HIGH_THRESH,
            adaptive_high_range=tuple(sim.ADAPTIVE_HIGH_RANGE),
            warmup_iters=sim.WARMUP_ITERS,
            dice_eps=cfg.MODEL.BOXSUP.DICE_EPS,
            seed=sim.PROTO_SEED,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.iou_gamma}, beta={self.modulation}, tau_l={self.low_thresh}, tau_h={self.high_thresh}"
            f"{' (adaptive ' + str(self.adaptive_high_range) + ')' if self.adaptive_high_thresh else ''}, "
            f"extra_positives={self.num_extra_positives}, warmup={self.warmup_iters}"
            f"{', centred features' if self.center_features else ''}"
            f"{', background prototypes' if self.background_prototypes else ''}"
            f"{f', appearance {self.appearance_weight}' if self.uses_appearance else ''}"
            f"{', negatives outside the box' if self.outside_box_negatives else ''}"
            f"{' (balanced)' if self.outside_box_balanced else ''}"
        )

    @property
    def uses_appearance(self) -> bool:
        """Whether the per-image colour model is on (the criterion then pools the images to the loss grid)."""
        return self.appearance_weight > 0

    def active(self, iteration: int) -> bool:
        """Whether the pseudo-mask loss is on at this (trainer) iteration."""
        return int(iteration) >= self.warmup_iters

    # ------------------------------------------------------------------ positives
    def _positives(self, teacher_levels: Sequence[Mapping], batch_idx: Tensor, labels: Tensor,
                   gt_boxes: Tensor, query_of_gt: Tensor, stride: int, to_loss_grid: Callable):
        """Teacher mask probabilities at the positives: (G, P, H, W), valid (G, P), queries (G, P)."""
        levels = len(teacher_levels)
        if query_of_gt.shape[0] != levels:
            raise ValueError(
                f"{query_of_gt.shape[0]} matched student outputs but {levels} teacher outputs: "
                "teacher and student must have the same decoder (deep supervision on both)"
            )
        queries = query_of_gt.t()  # (G, L+1)
        valid = queries >= 0
        picked = torch.stack(
            [lvl["pred_masks"][batch_idx, queries[:, i].clamp(min=0)] for i, lvl in enumerate(teacher_levels)],
            dim=1,
        )  # (G, L+1, Hm, Wm)
        probs = to_loss_grid(picked.float()).sigmoid()
        if self.num_extra_positives:
            extra_q, extra_probs = self._extra_positives(
                teacher_levels[-1], batch_idx, labels, gt_boxes, queries[:, -1], stride, to_loss_grid
            )
            probs = torch.cat([probs, extra_probs], dim=1)
            queries = torch.cat([queries, extra_q], dim=1)
            valid = torch.cat([valid, extra_q >= 0], dim=1)
        return probs, valid, queries

    def _extra_positives(self, final: Mapping, batch_idx: Tensor, labels: Tensor, gt_boxes: Tensor,
                         matched: Tensor, stride: int, to_loss_grid: Callable):
        """Top-k final-layer teacher queries of each GT by IoU(box of m̃_q, b_g) * p̃_q(c_g),
        the query matched at the final output left out."""
        k = self.num_extra_positives
        logits, masks = final["pred_logits"].float(), final["pred_masks"]
        num_q = logits.shape[1]
        probs = to_loss_grid(masks.float()).sigmoid()  # (B, Q, H, W)
        boxes = mask_boxes(probs, stride)  # (B, Q, 4)
        cls_prob = logits.softmax(-1)[batch_idx, :, labels]  # (G, Q)
        ious = paired_box_iou(boxes[batch_idx], gt_boxes[:, None, :].expand(-1, num_q, -1))  # (G, Q)
        score = ious * cls_prob
        score = score.scatter(1, matched.clamp(min=0)[:, None], -1.0)
        k = min(k, num_q - 1)
        top = score.topk(k, dim=1)
        chosen = torch.where(top.values > 0, top.indices, torch.full_like(top.indices, -1))  # (G, k)
        gathered = probs[batch_idx[:, None], chosen.clamp(min=0)]  # (G, k, H, W)
        return chosen, gathered

    # ------------------------------------------------------------------ semantic maps
    def _semantic(self, feats: Tensor, batch_idx: Tensor, labels: Tensor, per_image) -> Tensor:
        """S_g of Eq.1; with background prototypes (not in the paper) the class cosine minus the
        background cosine: S_g(u) = sigmoid((max_k <f, P_{c_g,k}> - max_k <f, P_{bg,k}>) / tau_s)."""
        if not self.background_prototypes:
            return self.memory.semantic_maps(feats, batch_idx, labels, self.proto_temperature, per_image)
        score = self.memory.semantic_scores(feats, batch_idx, labels, per_image)
        bg = self.memory.semantic_scores(feats, batch_idx, torch.full_like(labels, self.num_classes), per_image)
        return torch.sigmoid((score - bg) / self.proto_temperature)

    def _update_background(self, feats: Tensor, box_masks: Tensor, batch_idx: Tensor, valid_grid) -> Dict[str, Tensor]:
        """Eq.2-5 for the background row: each image's cells outside all its GT boxes, one group per image."""
        num_images = feats.shape[0]
        cells = background_cells(box_masks, batch_idx, num_images, valid_grid)
        images = torch.arange(num_images, device=feats.device)
        stats = self.memory.update(feats, cells, images, torch.full_like(images, self.num_classes), [1] * num_images)
        return {"bg_pixels": stats["num_pixels"]}

    def _appearance(self, prepared, instance: Tensor, in_box: Tensor) -> Tensor:
        """A_g of appearance.py: the GT's confident cells (the pixel set of Eq.2-5) against its image's
        cells outside every GT box."""
        if prepared.grid_images is None:
            raise ValueError("MODEL.SIM.APPEARANCE needs the criterion's grid images (PreparedTargets.grid_images)")
        background = background_cells(
            prepared.box_masks, prepared.batch_idx, prepared.grid_images.shape[0], prepared.valid_grid
        )
        return appearance_maps(
            prepared.grid_images, (instance > self.proto_pixel_thresh) & in_box, background, prepared.batch_idx,
            self.appearance_levels, self.appearance_smooth,
        )

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        teacher_levels: Sequence[Mapping],
        teacher_mask_features: Tensor,
        prepared,
        match,
        iteration: int,
        stride: int,
        to_loss_grid: Callable[[Tensor], Tensor],
        update_prototypes: bool = True,
        force_targets: bool = False,
    ) -> PseudoTargets:
        """Instance maps and the prototype update every step; pseudo targets after the warm-up.

        ``prepared`` / ``match`` are the criterion's PreparedTargets / MatchResult; ``stride`` is
        the loss grid's stride in input pixels; ``to_loss_grid`` upsamples (..., Hm, Wm) logits
        to the loss grid. Before the warm-up the pseudo loss is off and ``targets`` is None
        (``force_targets`` builds them anyway: evaluation and visualisation tools).
        ``update_prototypes=False`` leaves the memory untouched (tools; training always updates).
        """
        if prepared.boxes is None:
            raise ValueError("SIM needs the GT boxes (targets[i]['boxes']) to weight the positives by IoU")
        batch_idx, labels, box_masks = prepared.batch_idx, prepared.labels, prepared.box_masks
        per_image = prepared.counts  # GTs per image (host ints; the GTs are ordered by image)
        grid_hw = tuple(box_masks.shape[-2:])
        feats = normalize_features(teacher_mask_features.float())
        if tuple(feats.shape[-2:]) != grid_hw:  # loss grid finer than the feature grid
            feats = normalize_features(F.interpolate(feats, size=grid_hw, mode="bilinear", align_corners=False))
        if self.center_features:  # the same f̂ feeds S (Eq.1) and the prototype update (Eq.2-5)
            feats = center_features(feats, prepared.valid_grid)

        probs, valid, queries = self._positives(
            teacher_levels, batch_idx, labels, prepared.boxes, match.query_of_gt, stride, to_loss_grid
        )
        num_pos = probs.shape[1]
        ious = paired_box_iou(mask_boxes(probs, stride), prepared.boxes[:, None, :].expand(-1, num_pos, -1))
        weights = positive_weights(ious, self.iou_gamma, valid)
        instance = instance_maps(probs, weights)  # (G, H, W)

        in_box = box_masks > 0
        if prepared.valid_grid is not None:
            in_box = in_box & prepared.valid_grid[batch_idx]
        semantic = appearance = combined = targets = loss_weights = high = None
        if self.active(iteration) or force_targets:
            semantic = self._semantic(feats, batch_idx, labels, per_image)
            semantic_term = semantic
            if self.uses_appearance:
                appearance = self._appearance(prepared, instance, in_box)
                semantic_term = (1.0 - self.appearance_weight) * semantic + self.appearance_weight * appearance
            combined = self_correct(semantic_term, instance, self.modulation)
            if self.adaptive_high_thresh:
                high = adaptive_high_thresh(combined, in_box, *self.adaptive_high_range, instance=instance)
            else:
                high = combined.new_full((combined.shape[0],), self.high_thresh)
            targets, loss_weights = pseudo_targets(combined, in_box, self.low_thresh, high)
            if self.outside_box_negatives:  # Y = 0 there already; W > 0 on the valid cells outside B_g
                outside = box_masks <= 0
                if prepared.valid_grid is not None:
                    outside = outside & prepared.valid_grid[batch_idx]
                outside = outside.float()
                if self.outside_box_balanced:  # together as heavy as the box's weights
                    share = loss_weights.flatten(1).sum(1) / outside.flatten(1).sum(1).clamp_min(1.0)
                    outside = outside * share[:, None, None]
                loss_weights = loss_weights + outside
        stats: Dict[str, Tensor] = {}
        if update_prototypes:
            stats = self.memory.update(feats, (instance > self.proto_pixel_thresh) & in_box, batch_idx, labels, per_image)
            if self.background_prototypes:
                stats.update(self._update_background(feats, box_masks, batch_idx, prepared.valid_grid))
        if targets is not None:
            # the share of in-box cells the pseudo loss pushes up / down (the rest is ignored): a
            # positive-only loss (negatives ~0) inflates masks, docs/BENCHMARKS.md
            cells = in_box.sum().clamp_min(1).float()
            stats["pseudo_pos_fraction"] = targets.sum() / cells
            stats["pseudo_neg_fraction"] = ((loss_weights > 0) & (targets <= 0) & in_box).sum() / cells
        return PseudoTargets(
            targets=targets,
            weights=loss_weights,
            instance=instance,
            semantic=semantic,
            combined=combined,
            positive_weights=weights,
            positive_valid=valid,
            positive_queries=queries,
            high_thresh=high,
            stats=stats,
            appearance=appearance,
        )

    def loss(self, logits: Tensor, targets: Tensor, weights: Tensor):
        """Per-GT (weighted BCE, weighted dice) of Eq.8 for (M, H, W) student logits."""
        return pseudo_mask_loss(logits, targets, weights, self.dice_eps)
