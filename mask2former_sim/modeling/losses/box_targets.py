"""Box indicators B_g and the valid-pixel mask on the stride grid of ``pred_masks``.

Sampling rule (METHOD.md §1): fill the box at input resolution and keep the centre
pixel of every ``stride x stride`` cell. Grid cell (i, j) samples input pixel
(row ``stride*i + stride//2``, column ``stride*j + stride//2``). A pixel p covers the
continuous interval [p, p + 1), so its centre is p + 0.5; the pixel is inside an XYXY
box when its centre lies in the closed box [x0, x1] x [y0, y1]. A box that contains no
sample centre (e.g. one smaller than a cell, between two centres) yields an empty mask.
"""
from __future__ import annotations

import torch

__all__ = ["grid_sample_centres", "boxes_to_grid_masks", "downsample_valid"]


def _check_stride(stride: int) -> int:
    if isinstance(stride, bool) or int(stride) != stride or int(stride) < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return int(stride)


def grid_sample_centres(n: int, stride: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Continuous input coordinate (pixel centre) sampled by each of ``n`` grid cells."""
    stride = _check_stride(stride)
    idx = torch.arange(n, device=device, dtype=dtype)
    return idx * stride + (stride // 2) + 0.5


def boxes_to_grid_masks(boxes: torch.Tensor, grid_hw: tuple[int, int], stride: int) -> torch.Tensor:
    """Rasterise XYXY boxes (input pixels) onto the stride grid.

    Args:
        boxes: (G, 4) float, XYXY in padded-input pixel coordinates.
        grid_hw: (Hm, Wm), the grid of ``pred_masks``.
        stride: input pixels per grid cell.
    Returns:
        (G, Hm, Wm) float32 in {0, 1} on ``boxes.device`` (see the module docstring).
    """
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a (G, 4) tensor in XYXY format, got {shape}")
    hm, wm = (int(v) for v in grid_hw)
    if hm < 0 or wm < 0:
        raise ValueError(f"grid_hw must be non-negative, got {grid_hw!r}")
    boxes = boxes.detach().to(torch.float32)
    ys = grid_sample_centres(hm, stride, device=boxes.device)
    xs = grid_sample_centres(wm, stride, device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    in_x = (xs[None, :] >= x0[:, None]) & (xs[None, :] <= x1[:, None])  # (G, Wm)
    in_y = (ys[None, :] >= y0[:, None]) & (ys[None, :] <= y1[:, None])  # (G, Hm)
    return (in_y[:, :, None] & in_x[:, None, :]).to(torch.float32)


def downsample_valid(valid: torch.Tensor, stride: int) -> torch.Tensor:
    """Sample a (B, Hp, Wp) bool valid mask at the cell centres -> (B, Hp/stride, Wp/stride)."""
    stride = _check_stride(stride)
    if not isinstance(valid, torch.Tensor) or valid.ndim != 3:
        shape = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a (B, Hp, Wp) tensor, got {shape}")
    hp, wp = valid.shape[-2:]
    if hp % stride or wp % stride:
        raise ValueError(f"valid size {(hp, wp)} is not a multiple of stride {stride}")
    off = stride // 2
    return valid[:, off::stride, off::stride].to(torch.bool)
