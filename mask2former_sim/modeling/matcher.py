"""Hungarian matching of queries to GT instances, per image, for one or all decoder outputs.

mode "box" (box supervision, METHOD.md §1):
    C(q, g) = cost_class * (-p_q(c_g)) + cost_proj * projection_cost(sigmoid(z_q), B_g)
mode "mask" (fully supervised upper bound, Mask2Former style):
    C(q, g) = cost_class * (-p_q(c_g)) + cost_mask * CE + cost_dice * Dice,
    CE / Dice on the same uniformly drawn points for all predictions and GT masks.
Costs are computed densely in fp32 with autocast off, under no_grad; the assignment is
scipy's ``linear_sum_assignment`` on the CPU, one call per image and output; the costs of all
outputs reach the host in one transfer (``match_outputs``). sigmoid is taken after the
max-projection (the same values, sigmoid being increasing).
"""
from __future__ import annotations

from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .losses.box_targets import boxes_to_grid_masks
from .losses.point_mask import batch_dice_cost, batch_sigmoid_ce_cost, point_sample, uniform_points
from .losses.projection import projection_cost_from_logits
from ..utils.distributed import flagged_ranks, other_rank_error

__all__ = ["HungarianMatcher"]

_MODES = ("box", "mask")


class HungarianMatcher(nn.Module):
    """One-to-one assignment per image; returns (query indices, GT indices) int64 CPU tensors."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_proj: float = 5.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        mode: str = "box",
        num_points: int = 12544,
        stride: int = 4,
        dice_eps: float = 1e-5,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"HungarianMatcher: mode must be one of {_MODES}, got {mode!r}")
        if mode == "box" and cost_class == 0 and cost_proj == 0:
            raise ValueError("HungarianMatcher: all costs are 0 in box mode")
        if mode == "mask" and cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0 in mask mode")
        if mode == "mask" and num_points < 1:
            raise ValueError(f"HungarianMatcher: num_points must be >= 1, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_proj = float(cost_proj)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.mode = mode
        self.num_points = int(num_points)
        self.stride = int(stride)
        self.dice_eps = float(dice_eps)
        self.generator = generator

    def extra_repr(self) -> str:
        if self.mode == "box":
            return f"mode=box, cost_class={self.cost_class}, cost_proj={self.cost_proj}"
        return (
            f"mode=mask, cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )

    # ------------------------------------------------------------------ costs
    def _box_masks(self, target: Mapping, index: int, grid_hw: tuple[int, int], device) -> torch.Tensor:
        num_gt = len(target["labels"])
        if "box_masks" in target:
            bm = target["box_masks"]
            if tuple(bm.shape) != (num_gt, *grid_hw):
                raise ValueError(
                    f"targets[{index}]['box_masks'] must be {(num_gt, *grid_hw)}, got {tuple(bm.shape)}"
                )
            return bm.to(device=device, dtype=torch.float32)
        boxes = target["boxes"]
        if tuple(boxes.shape) != (num_gt, 4):
            raise ValueError(f"targets[{index}]['boxes'] must be ({num_gt}, 4), got {tuple(boxes.shape)}")
        return boxes_to_grid_masks(boxes.to(device), grid_hw, self.stride)

    def _mask_cost(self, pred_masks: torch.Tensor, target: Mapping, index: int) -> torch.Tensor:
        gt = target["masks"]
        num_gt = len(target["labels"])
        if gt.ndim != 3 or gt.shape[0] != num_gt:
            raise ValueError(f"targets[{index}]['masks'] must be ({num_gt}, H, W), got {tuple(gt.shape)}")
        num_q = pred_masks.shape[0]
        dev = pred_masks.device
        coords = uniform_points((1, self.num_points, 2), dev, self.generator)
        out = point_sample(pred_masks[:, None], coords.expand(num_q, -1, -1))[:, 0]
        tgt = point_sample(gt.to(device=dev, dtype=torch.float32)[:, None], coords.expand(num_gt, -1, -1))[:, 0]
        return self.cost_mask * batch_sigmoid_ce_cost(out, tgt) + self.cost_dice * batch_dice_cost(out, tgt)

    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, target: Mapping, index: int = 0):
        """Dense (Q, G) fp32 cost of one image: pred_logits (Q, K+1), pred_masks (Q, Hm, Wm)."""
        labels = target["labels"]
        num_classes = pred_logits.shape[-1] - 1
        if labels.ndim != 1:
            raise ValueError(f"targets[{index}]['labels'] must be 1-D, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{index}]['labels'] has class ids outside [0, {num_classes}): "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        return self._cost(pred_logits, pred_masks, target, index)

    def _cost(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, target: Mapping, index: int):
        """cost_matrix without the label check (done once per batch by the caller): no host sync."""
        labels = target["labels"].to(device=pred_logits.device, dtype=torch.long)
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            prob = pred_logits.to(torch.float32).softmax(dim=-1)
            cost = -self.cost_class * prob[:, labels]
            masks = pred_masks.to(torch.float32)
            if self.mode == "box":
                bm = self._box_masks(target, index, tuple(masks.shape[-2:]), masks.device)
                cost = cost + self.cost_proj * projection_cost_from_logits(masks, bm, self.dice_eps)
            else:
                cost = cost + self._mask_cost(masks, target, index)
        return cost

    @staticmethod
    def _label_error(targets: Sequence[Mapping], num_classes: int):
        """(exception type, message) for the first image with bad labels, else None (one host sync)."""
        for b, t in enumerate(targets):
            if t["labels"].ndim != 1:
                return ValueError, f"targets[{b}]['labels'] must be 1-D, got {tuple(t['labels'].shape)}"
        labels = [t["labels"] for t in targets if t["labels"].numel()]
        if not labels:
            return None
        flat = torch.cat([lab.to(labels[0].device) for lab in labels])
        if not bool(((flat < 0) | (flat >= num_classes)).any()):
            return None
        for b, t in enumerate(targets):
            lab = t["labels"]
            if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
                return ValueError, (
                    f"targets[{b}]['labels'] has class ids outside [0, {num_classes}): "
                    f"min {int(lab.min())}, max {int(lab.max())}"
                )
        return None

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Match one decoder output {"pred_logits": (B,Q,K+1), "pred_masks": (B,Q,Hm,Wm)}.

        Under torch.distributed this is a collective (one all-reduced error flag): every rank
        must call it the same number of times.
        """
        return self.match_outputs([outputs], targets)[0]

    @torch.no_grad()
    def match_outputs(
        self,
        outputs: Sequence[Mapping[str, torch.Tensor]],
        targets: Sequence[Mapping],
        labels_checked: bool = False,
        mask_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> List[List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Match several decoder outputs of one batch: per output, per image (queries, GTs).

        The cost matrices of every output and image reach the host in ONE transfer (scipy
        needs them there); the labels are checked once (one host sync), or not at all with
        ``labels_checked=True`` when the caller has done it. ``mask_transform`` maps one image's
        (Q, Hm, Wm) mask logits to the grid of the targets (the criterion's upsampling to its
        loss grid), one image at a time. Under torch.distributed this is
        a collective (one all-reduced error flag): every rank must call it the same number of
        times, as the criterion does (once per step).
        """
        for i, out in enumerate(outputs):
            for key in ("pred_logits", "pred_masks"):
                if key not in out:
                    raise KeyError(f"HungarianMatcher: outputs[{i}] lack {key!r}")
            logits, masks = out["pred_logits"], out["pred_masks"]
            if logits.ndim != 3 or masks.ndim != 4 or logits.shape[:2] != masks.shape[:2]:
                raise ValueError(
                    f"HungarianMatcher: pred_logits must be (B, Q, K+1) and pred_masks (B, Q, Hm, Wm) "
                    f"with equal B, Q; got {tuple(logits.shape)} and {tuple(masks.shape)}"
                )
            if len(targets) != logits.shape[0]:
                raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]}")
        # Checks on the data (labels, finite costs) decide on every rank together (an
        # all-reduced flag): one rank raising alone would leave the others in the next
        # all-reduce (DDP's gradients) until the NCCL timeout.
        error = None
        if not labels_checked and outputs:
            error = self._label_error(targets, outputs[0]["pred_logits"].shape[-1] - 1)
        costs = []  # (output, image, cost or None), output-major (the order of the mask mode's point draws)
        if error is None:
            for level, out in enumerate(outputs):
                for b, target in enumerate(targets):
                    cost = None
                    if len(target["labels"]):
                        masks = out["pred_masks"][b]
                        cost = self._cost(out["pred_logits"][b], masks if mask_transform is None else mask_transform(masks), target, b)
                    costs.append((level, b, cost))
        present = [c for _, _, c in costs if c is not None]
        host_costs: List[torch.Tensor] = []
        if present:
            flat = torch.cat([c.flatten() for c in present]).cpu()
            host_costs = list(flat.split([c.numel() for c in present]))
            if not torch.isfinite(flat).all():
                bad = next(i for i, c in enumerate(host_costs) if not torch.isfinite(c).all())
                level, b, _ = [entry for entry in costs if entry[2] is not None][bad]
                where = f"image {b}" + (f" of decoder output {level}" if len(outputs) > 1 else "")
                error = (FloatingPointError, f"HungarianMatcher: non-finite matching cost for {where}")
        bad_ranks = flagged_ranks(error is not None)
        if error is not None:
            raise error[0](error[1])
        if bad_ranks:
            raise RuntimeError(other_rank_error(bad_ranks, "bad targets or non-finite matching costs"))
        host = iter(host_costs)
        indices: List[List[Tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in outputs]
        for level, b, cost in costs:
            if cost is None:
                empty = torch.empty(0, dtype=torch.int64)
                indices[level].append((empty, empty.clone()))
                continue
            rows, cols = linear_sum_assignment(next(host).view(cost.shape).numpy())
            indices[level].append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
