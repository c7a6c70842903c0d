"""Box projection loss and the matcher's projection cost (BoxInst), METHOD.md §1.

Dice(a, b) = 1 - 2 sum(a b) / (sum(a^2) + sum(b^2) + eps), taken over the last dim.
The projection of a (H, W) map onto the x axis is its max over y (a W-vector), onto the
y axis its max over x (an H-vector).
"""
from __future__ import annotations

import torch

__all__ = [
    "dice_coefficient_loss",
    "projection_loss",
    "projection_loss_from_logits",
    "projection_cost",
    "projection_cost_from_logits",
]


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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _axis_projections(maps: torch.Tensor, box_masks: torch.Tensor, name: str, activation):
    """activation(max over y), activation(max over x) of the maps and the same of the boxes."""
    _check_masks(name, maps)
    _check_masks("box_masks", box_masks)
    box_masks = box_masks.to(maps.dtype)
    return (activation(maps.amax(dim=1)), activation(maps.amax(dim=2)), box_masks.amax(dim=1), box_masks.amax(dim=2))


def _loss(maps, box_masks, eps, name, activation):
    if maps.shape != box_masks.shape:
        raise ValueError(f"projection_loss: {name} {tuple(maps.shape)} and box_masks {tuple(box_masks.shape)} differ")
    px, py, bx, by = _axis_projections(maps, box_masks, name, activation)
    return dice_coefficient_loss(px, bx, eps) + dice_coefficient_loss(py, by, eps)


def _cost(maps, box_masks, eps, name, activation):
    if maps.ndim == 3 and box_masks.ndim == 3 and maps.shape[1:] != box_masks.shape[1:]:
        raise ValueError(
            f"projection_cost: grid of {name} {tuple(maps.shape[1:])} differs from box_masks {tuple(box_masks.shape[1:])}"
        )
    px, py, bx, by = _axis_projections(maps, box_masks, name, activation)
    return _pairwise_dice(px, bx, eps) + _pairwise_dice(py, by, eps)


def projection_loss(mask_probs: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Dice(max_y m, max_y B) + Dice(max_x m, max_x B) per pair: (N, H, W) x (N, H, W) -> (N,)."""
    return _loss(mask_probs, box_masks, eps, "mask_probs", _identity)


def projection_loss_from_logits(mask_logits: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """projection_loss(sigmoid(z), B) computed as sigmoid(max z): the same values (sigmoid is
    increasing, so it commutes with the max) on H + W instead of H x W elements per mask, and
    backward keeps no (N, H, W) probability map."""
    return _loss(mask_logits, box_masks, eps, "mask_logits", torch.sigmoid)


def _pairwise_dice(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """(Q, D) x (G, D) -> (Q, G) Dice loss of every row pair, as one matrix product."""
    inter = a @ b.t()
    denom = (a * a).sum(dim=1)[:, None] + (b * b).sum(dim=1)[None, :] + eps
    return 1.0 - 2.0 * inter / denom


def projection_cost(mask_probs: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Projection loss of every (query, GT) pair: (Q, H, W) x (G, H, W) -> (Q, G)."""
    return _cost(mask_probs, box_masks, eps, "mask_probs", _identity)


def projection_cost_from_logits(mask_logits: torch.Tensor, box_masks: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """projection_cost(sigmoid(z), B) with the sigmoid taken after the max (same values)."""
    return _cost(mask_logits, box_masks, eps, "mask_logits", torch.sigmoid)
