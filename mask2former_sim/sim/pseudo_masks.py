"""SIM pseudo masks: IoU-weighted positives (Eq.6), self-correction (Eq.7), pseudo targets
and their loss (Eq.8), METHOD.md §2.

Notation (METHOD.md): GT g with box b_g and box indicator B_g(u) on the stride-4 grid Ω;
its positives i ∈ P_g (the query matched to g at each decoder output, optionally extra
top-k queries) with the teacher's mask probabilities m̃_i(u); S_g the semantic map (Eq.1,
``prototypes.semantic_maps``).

Eq.6 (positive weighting, instance map)::

    b̂_i = tight box of {u : m̃_i(u) > 0.5}, in input coordinates
    w_i = IoU(b̂_i, b_g)^γ / Σ_{j ∈ P_g} IoU(b̂_j, b_g)^γ     (uniform if all IoUs are 0)
    T_g(u) = Σ_i w_i m̃_i(u)

Eq.7 (self-correction)::

    R_g(u) = (1 − β) S_g(u) + β T_g(u)

Eq.8 (pseudo mask, weights, loss)::

    Y_g = 1[R_g > τ_h] · B_g
    W_g = (1[R_g > τ_h] + 1[R_g < τ_l]) · B_g
    L_g = BCE_W(z_g, Y_g) + Dice_W(m_g, Y_g),  m_g = sigmoid(z_g)
    BCE_W = Σ_u W ℓ_bce(z, Y) / max(Σ_u W, 1)
    Dice_W = 1 − 2 Σ_u W m Y / (Σ_u W m² + Σ_u W Y² + ε)

Shapes: teacher masks (G, P, H, W) on Ω, ious / weights / valid (G, P), every map (G, H, W),
thresholds scalars or (G,). Everything is computed in fp32, vectorised over GTs,
positives and pixels; nothing syncs with the host.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "mask_boxes",
    "paired_box_iou",
    "positive_weights",
    "instance_maps",
    "self_correct",
    "adaptive_high_thresh",
    "pseudo_targets",
    "pseudo_mask_loss",
]


def mask_boxes(masks: Tensor, stride: float, thresh: float = 0.5) -> Tensor:
    """(..., H, W) probabilities -> (..., 4) XYXY tight boxes of masks > thresh, in input coordinates
    (grid cell (i, j) covers [j*stride, (j+1)*stride) x [i*stride, (i+1)*stride)); all-zero box for an empty
    mask. Vectorised (any/argmax along axes, no nonzero per mask)."""
    if masks.ndim < 2:
        raise ValueError(f"mask_boxes expects (..., H, W), got {tuple(masks.shape)}")
    fg = masks.float() > thresh
    h, w = fg.shape[-2:]
    rows = fg.any(dim=-1).to(torch.uint8)  # (..., H)
    cols = fg.any(dim=-2).to(torch.uint8)  # (..., W)
    y0 = rows.argmax(dim=-1)  # first occupied row (argmax returns the first maximum)
    y1 = h - 1 - rows.flip(-1).argmax(dim=-1)
    x0 = cols.argmax(dim=-1)
    x1 = w - 1 - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1 + 1, y1 + 1], dim=-1).float() * float(stride)
    nonempty = rows.bool().any(dim=-1)
    return torch.where(nonempty[..., None], boxes, torch.zeros_like(boxes))


def paired_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(..., 4), (..., 4) XYXY -> (...) IoU of a[i] with b[i]; 0 where the union is empty
    (and hence 0 for an empty box against anything)."""
    a = a.float()
    b = b.float()
    area_a = (a[..., 2] - a[..., 0]).clamp_min(0) * (a[..., 3] - a[..., 1]).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp_min(0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp_min(0)
    inter = iw * ih
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros_like(union))


def positive_weights(ious: Tensor, gamma: float, valid: Optional[Tensor] = None) -> Tensor:
    """Eq.6 weights. ious (G, P) IoU of each positive's box with its GT box; valid (G, P) bool marks
    real positives (padding when GTs have different numbers of positives). w = IoU^gamma / sum over valid;
    uniform over the valid positives where all their IoU^gamma are 0. gamma = 0 -> plain mean. (G, P).

    Computed as a softmax of γ·log IoU over the valid positives with IoU > 0 (exact, and free
    of underflow for large γ). With γ = 0 every valid positive weighs the same, zero IoUs
    included (0^0 = 1: the official code's plain average). A GT with no valid positive gets
    all-zero weights.
    """
    if ious.ndim != 2:
        raise ValueError(f"positive_weights expects ious of shape (G, P), got {tuple(ious.shape)}")
    gamma = float(gamma)
    if gamma < 0:
        raise ValueError(f"positive_weights gamma must be >= 0, got {gamma}")
    ious = ious.float().clamp(0.0, 1.0)
    valid = torch.ones_like(ious, dtype=torch.bool) if valid is None else valid.to(ious.device).bool()
    if valid.shape != ious.shape:
        raise ValueError(f"valid must have the shape of ious {tuple(ious.shape)}, got {tuple(valid.shape)}")
    uniform = valid.float() / valid.float().sum(dim=1, keepdim=True).clamp_min(1.0)
    if gamma == 0.0:
        return uniform
    usable = valid & (ious > 0)
    logits = torch.where(usable, gamma * torch.log(ious.clamp_min(torch.finfo(torch.float32).tiny)),
                         torch.full_like(ious, float("-inf")))
    any_usable = usable.any(dim=1, keepdim=True)
    logits = torch.where(any_usable, logits, torch.zeros_like(logits))  # avoid all -inf rows
    soft = torch.softmax(logits, dim=1)
    return torch.where(any_usable, soft, uniform)


def instance_maps(teacher_masks: Tensor, weights: Tensor) -> Tensor:
    """T_g(u) = Σ_i w_i m̃_i(u): teacher_masks (G, P, H, W) probabilities, weights (G, P) ->
    (G, H, W)."""
    if teacher_masks.ndim != 4 or weights.shape != teacher_masks.shape[:2]:
        raise ValueError(
            f"instance_maps expects (G, P, H, W) masks and (G, P) weights, got "
            f"{tuple(teacher_masks.shape)} and {tuple(weights.shape)}"
        )
    return torch.einsum("gphw,gp->ghw", teacher_masks.float(), weights.float())


def self_correct(semantic: Tensor, instance: Tensor, beta: float) -> Tensor:
    """Eq.7: R = (1 − β) S + β T, (G, H, W) each; β = 0 gives S, β = 1 gives T."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"self_correct beta must be in [0, 1], got {beta}")
    if semantic.shape != instance.shape:
        raise ValueError(f"semantic {tuple(semantic.shape)} and instance {tuple(instance.shape)} maps differ")
    if beta == 0.0:
        return semantic.float().clone()
    if beta == 1.0:
        return instance.float().clone()
    return (1.0 - beta) * semantic.float() + beta * instance.float()


@torch.no_grad()
def adaptive_high_thresh(combined: Tensor, box_masks: Tensor, lo: float = 0.7, hi: float = 0.8, *,
                         instance: Optional[Tensor] = None, count_thresh: float = 0.7) -> Tensor:
    """The official SIM code's adaptive tau_h per GT, clamped to [lo, hi] -> (G,).

    Source: github lslrh/SIM, ``adet/modeling/condinst/dynamic_mask_head.py``,
    ``DynamicMaskHead.__call__`` (the "compute the threshold for pseudo labels" block; the
    same formula in the repository's ``.history/`` snapshots). Read there, written here
    from the formula. In METHOD.md's notation, per GT g::

        n_g   = Σ_u 1[T_g(u) > 0.7] · B_g(u)          (confident instance-map cells in the box)
        r_g   = the values of R_g(u) · B_g(u) over all of Ω, sorted in decreasing order
        τ_h,g = clamp( r_g[min(n_g, |Ω| − 1)], 0.7, 0.8 )   (0-based index)

    i.e. the threshold that keeps about as many cells of the combined map R_g as the
    instance map keeps at 0.7 (ties aside, exactly the n_g largest cells of R_g·B_g lie
    above r_g[n_g]), clamped to [lo, hi]. The official code then averages τ_h over the
    positives of a GT; all of them share T_g there, so that average is a no-op per GT.

    Args:
        combined: R (G, H, W).  box_masks: B (G, H, W), bool or {0, 1}.
        lo, hi: the clamp (official 0.7, 0.8).
        instance: T (G, H, W); **required** — the official count n_g is taken on T_g.
            (A keyword-only argument so that the positional signature stays
            ``(combined, box_masks, lo, hi)``.)
        count_thresh: the 0.7 of n_g.
    """
    if instance is None:
        raise ValueError(
            "adaptive_high_thresh needs instance=T (the instance maps, (G, H, W)): the official "
            "adaptive tau_h ranks R inside the box at n_g = #{T_g > 0.7 and B_g = 1}"
        )
    if not lo <= hi:
        raise ValueError(f"adaptive_high_thresh needs lo <= hi, got lo={lo}, hi={hi}")
    if combined.ndim != 3 or box_masks.shape != combined.shape or instance.shape != combined.shape:
        raise ValueError(
            f"combined, box_masks and instance must all be (G, H, W); got {tuple(combined.shape)}, "
            f"{tuple(box_masks.shape)}, {tuple(instance.shape)}"
        )
    g = combined.shape[0]
    box = box_masks.float().flatten(1)  # (G, HW)
    if box.shape[1] == 0:
        return combined.new_full((g,), float(lo), dtype=torch.float32)
    n = ((instance.float().flatten(1) > count_thresh).float() * box).sum(dim=1).long()
    ranked = torch.sort(combined.float().flatten(1) * box, dim=1, descending=True).values
    n = n.clamp(max=ranked.shape[1] - 1)
    thr = ranked.gather(1, n[:, None]).squeeze(1)
    return thr.clamp(float(lo), float(hi))


@torch.no_grad()
def pseudo_targets(combined: Tensor, box_masks: Tensor, low: float, high: Union[float, Tensor]) -> Tuple[Tensor, Tensor]:
    """Eq.8: Y = 1[R > tau_h] * B; W = (1[R > tau_h] + 1[R < tau_l]) * B; high may be a (G,) tensor.
    Returns (targets, weights), both (G, H, W) float, detached.

    Cells with τ_l ≤ R ≤ τ_h (ambiguous) and every cell outside the box get weight 0.
    Requires τ_l ≤ τ_h (a scalar ``high`` is checked; a tensor is the caller's to keep so).
    """
    if combined.ndim != 3 or box_masks.shape != combined.shape:
        raise ValueError(
            f"combined and box_masks must both be (G, H, W), got {tuple(combined.shape)} and "
            f"{tuple(box_masks.shape)}"
        )
    r = combined.detach().float()
    box = box_masks.detach().float()
    if isinstance(high, Tensor):
        if high.ndim == 0:
            high_t = high.detach().float().to(r.device).reshape(1, 1, 1)
        elif high.shape == (r.shape[0],):
            high_t = high.detach().float().to(r.device).reshape(-1, 1, 1)
        else:
            raise ValueError(f"high must be a float or a ({r.shape[0]},) tensor, got shape {tuple(high.shape)}")
    else:
        if not float(low) <= float(high):
            raise ValueError(f"pseudo_targets needs low <= high, got low={low}, high={high}")
        high_t = float(high)
    pos = r > high_t
    neg = r < float(low)
    targets = pos.float() * box
    weights = (pos | neg).float() * box
    return targets.detach(), weights.detach()


def pseudo_mask_loss(logits: Tensor, targets: Tensor, weights: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Per-GT weighted BCE (with logits, stable) normalised by the GT's sum of W (max with 1), and
    per-GT weighted dice 1 - 2 sum(W m Y) / (sum(W m^2) + sum(W Y^2) + eps) with m = sigmoid(logits).
    Returns (bce (G,), dice (G,)); the caller sums over GTs and divides by the number of GTs.
    A GT whose weights are all zero contributes 0 to both.

    Shapes: logits, targets, weights (G, ...) (any trailing shape, e.g. (G, H, W)).
    Computed in fp32 with autocast disabled.
    """
    if logits.shape != targets.shape or logits.shape != weights.shape:
        raise ValueError(
            f"pseudo_mask_loss: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and "
            f"weights {tuple(weights.shape)} must have the same shape"
        )
    if logits.ndim < 2:
        raise ValueError(f"pseudo_mask_loss expects (G, ...) maps, got shape {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float().flatten(1)  # (G, N)
        y = targets.detach().float().flatten(1)
        w = weights.detach().float().flatten(1)
        w_sum = w.sum(dim=1)
        has_weight = w_sum > 0
        bce_map = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        bce = (w * bce_map).sum(dim=1) / w_sum.clamp_min(1.0)
        m = torch.sigmoid(z)
        num = 2.0 * (w * m * y).sum(dim=1)
        den = (w * m * m).sum(dim=1) + (w * y * y).sum(dim=1) + eps
        dice = torch.where(has_weight, 1.0 - num / den, torch.zeros_like(num))
    return bce, dice
