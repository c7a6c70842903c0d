"""Point-sampled mask losses (Mask2Former style) for full supervision and copy-paste.

Points are continuous (x, y) coordinates in [0, 1] over the whole map (``grid_sample``
with ``align_corners=False``), so predictions on the stride grid and targets at input
resolution are sampled at the same physical locations when both cover the padded image.
Losses are computed in fp32 with autocast disabled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "uniform_points",
    "point_sample",
    "sample_uncertain_points",
    "sigmoid_ce_loss",
    "dice_loss",
    "batch_sigmoid_ce_cost",
    "batch_dice_cost",
    "point_mask_losses",
]


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def uniform_points(shape: tuple[int, ...], device, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) samples on ``device``, drawn from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


def point_sample(features: torch.Tensor, coords: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Bilinear samples of (N, C, H, W) ``features`` at (N, P, 2) xy coords in [0, 1] -> (N, C, P)."""
    if features.ndim != 4:
        raise ValueError(f"point_sample: features must be (N, C, H, W), got {tuple(features.shape)}")
    if coords.ndim != 3 or coords.shape[-1] != 2 or coords.shape[0] != features.shape[0]:
        raise ValueError(
            f"point_sample: coords must be (N, P, 2) with N={features.shape[0]}, got {tuple(coords.shape)}"
        )
    grid = (2.0 * coords - 1.0).to(features.dtype)[:, :, None, :]  # (N, P, 1, 2)
    return F.grid_sample(features, grid, mode="bilinear", align_corners=align_corners)[..., 0]


def sample_uncertain_points(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance point sampling on (N, 1, H, W) mask logits -> (N, num_points, 2) coords.

    Draw ``int(num_points * oversample_ratio)`` uniform points, keep the
    ``int(importance_sample_ratio * num_points)`` most uncertain ones (uncertainty = -|logit|),
    and fill the rest with fresh uniform points. No gradient flows through the choice.
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"sample_uncertain_points: logits must be (N, 1, H, W), got {tuple(logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = logits.shape[0]
    dev = logits.device
    num_over = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    with torch.no_grad():
        cand = uniform_points((n, num_over, 2), dev, generator)
        uncertainty = -point_sample(logits.detach().to(torch.float32), cand)[:, 0].abs()  # (N, num_over)
        idx = uncertainty.topk(num_uncertain, dim=1).indices
        chosen = torch.gather(cand, 1, idx[:, :, None].expand(-1, -1, 2))
        if num_random > 0:
            extra = uniform_points((n, num_random, 2), dev, generator)
            chosen = torch.cat([chosen, extra], dim=1)
    return chosen


def sigmoid_ce_loss(logits: torch.Tensor, labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary CE with logits, mean over points, summed over masks, divided by num_masks."""
    if logits.shape != labels.shape:
        raise ValueError(f"sigmoid_ce_loss: shapes differ, {tuple(logits.shape)} vs {tuple(labels.shape)}")
    ce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return ce.mean(dim=1).sum() / num_masks


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, num_masks: float) -> torch.Tensor:
    """1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per mask, summed, divided by num_masks."""
    if logits.shape != labels.shape:
        raise ValueError(f"dice_loss: shapes differ, {tuple(logits.shape)} vs {tuple(labels.shape)}")
    p = logits.sigmoid()
    t = labels.to(p.dtype)
    num = 2.0 * (p * t).sum(dim=-1)
    den = p.sum(dim=-1) + t.sum(dim=-1)
    return (1.0 - (num + 1.0) / (den + 1.0)).sum() / num_masks


def batch_sigmoid_ce_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary CE of every (prediction, target) row pair: (Q, P) x (G, P) -> (Q, G)."""
    if logits.shape[-1] != labels.shape[-1]:
        raise ValueError(f"batch_sigmoid_ce_cost: point counts differ, {logits.shape[-1]} vs {labels.shape[-1]}")
    labels = labels.to(logits.dtype)
    pos = F.softplus(-logits)  # -log sigmoid(x)
    neg = F.softplus(logits)  # -log (1 - sigmoid(x))
    return (pos @ labels.t() + neg @ (1.0 - labels).t()) / logits.shape[-1]


def batch_dice_cost(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice loss (+1 smoothing) of every (prediction, target) row pair: (Q, P) x (G, P) -> (Q, G)."""
    if logits.shape[-1] != labels.shape[-1]:
        raise ValueError(f"batch_dice_cost: point counts differ, {logits.shape[-1]} vs {labels.shape[-1]}")
    p = logits.sigmoid()
    t = labels.to(p.dtype)
    num = 2.0 * (p @ t.t())
    den = p.sum(dim=-1)[:, None] + t.sum(dim=-1)[None, :]
    return 1.0 - (num + 1.0) / (den + 1.0)


def point_mask_losses(
    mask_logits: torch.Tensor,
    target_masks: torch.Tensor,
    num_masks: float,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid CE, dice) on importance-sampled points for N matched pairs.

    Args:
        mask_logits: (N, Hm, Wm) predicted logits.
        target_masks: (N, Ht, Wt) binary targets covering the same extent (any resolution).
        num_masks: normaliser (global GT count).
    Returns two scalars; zero (with a gradient path) when N == 0.
    """
    if mask_logits.ndim != 3 or target_masks.ndim != 3 or mask_logits.shape[0] != target_masks.shape[0]:
        raise ValueError(
            f"point_mask_losses: need (N, Hm, Wm) logits and (N, Ht, Wt) targets, got "
            f"{tuple(mask_logits.shape)} and {tuple(target_masks.shape)}"
        )
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0
        return zero, zero.clone()
    with _no_autocast(mask_logits):
        logits = mask_logits.to(torch.float32)[:, None]
        coords = sample_uncertain_points(logits, num_points, oversample_ratio, importance_sample_ratio, generator)
        with torch.no_grad():
            labels = point_sample(target_masks.to(device=logits.device, dtype=torch.float32)[:, None], coords)[:, 0]
        point_logits = point_sample(logits, coords)[:, 0]
        return (
            sigmoid_ce_loss(point_logits, labels, num_masks),
            dice_loss(point_logits, labels, num_masks),
        )
