"""Box projection loss and the matcher's projection cost (BoxInst), METHOD.md §1.

Dice(a, b) = 1 - 2 sum(a b) / (sum(a^2) + sum(b^2) + eps), taken over the last dim.
The projection of a (H, W) map onto the x axis is its max over y (a W-vector), onto the
y axis its max over x (an H-vector).
"""
from __future__ import annotations

import torch

__all__ = ["dice_coefficient_loss", "projection_loss", "projection_cost"]


def dice_coefficient_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Row-wise squared-denominator Dice loss over the last dim: (..., D) x (..., D) -> (...)."""
    if a.shape != b.shape:
        raise ValueError(f"dice_coefficient_loss: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    inter = (a * b).sum(dim=-1)
    denom = (a * a).sum(dim=-1) + (b * b).sum(dim=-1) + eps
    return 1.0 - 2.0 * inter / denom


def _check_masks(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (N, H, W) tensor, got {shape}")


def projection_loss(mask_probs: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dice(max_y m, max_y B) + Dice(max_x m, max_x B) per pair: (N, H, W) x (N, H, W) -> (N,)."""
    _check_masks("mask_probs", mask_probs)
    _check_masks("box_masks", box_masks)
    if mask_probs.shape != box_masks.shape:
        raise ValueError(
            f"projection_loss: mask_probs {tuple(mask_probs.shape)} and box_masks "
            f"{tuple(box_masks.shape)} differ"
        )
    box_masks = box_masks.to(mask_probs.dtype)
    loss_x = dice_coefficient_loss(mask_probs.amax(dim=1), box_masks.amax(dim=1), eps)
    loss_y = dice_coefficient_loss(mask_probs.amax(dim=2), box_masks.amax(dim=2), eps)
    return loss_x + loss_y


def _pairwise_dice(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G) Dice loss of every row pair, as one matrix product."""
    inter = a @ b.t()
    denom = (a * a).sum(dim=1)[:, None] + (b * b).sum(dim=1)[None, :] + eps
    return 1.0 - 2.0 * inter / denom


def projection_cost(mask_probs: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Projection loss of every (query, GT) pair: (Q, H, W) x (G, H, W) -> (Q, G)."""
    _check_masks("mask_probs", mask_probs)
    _check_masks("box_masks", box_masks)
    if mask_probs.shape[1:] != box_masks.shape[1:]:
        raise ValueError(
            f"projection_cost: grid of mask_probs {tuple(mask_probs.shape[1:])} differs from "
            f"box_masks {tuple(box_masks.shape[1:])}"
        )
    box_masks = box_masks.to(mask_probs.dtype)
    cost_x = _pairwise_dice(mask_probs.amax(dim=1), box_masks.amax(dim=1), eps)
    cost_y = _pairwise_dice(mask_probs.amax(dim=2), box_masks.amax(dim=2), eps)
    return cost_x + cost_y
