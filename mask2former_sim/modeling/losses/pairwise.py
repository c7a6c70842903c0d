"""Colour-affinity pairwise loss (BoxInst), METHOD.md §1.

Colour is CIE-Lab (sRGB, D65) of the input image average-pooled to the mask grid; the
neighbourhood of a cell u is the ``kernel_size**2 - 1`` cells at offsets that are
multiples of ``dilation`` (8 neighbours at +-2 cells for the defaults), enumerated
row-major over the kernel with the centre left out. Everything here runs in fp32 with
autocast disabled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "neighbour_offsets",
    "gather_neighbours",
    "rgb_to_lab",
    "image_color_similarity",
    "images_to_color_similarity",
    "pairwise_edge_weights",
    "pairwise_loss",
    "pairwise_loss_weighted",
]

# sRGB (linear) -> XYZ, D65 reference white.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def neighbour_offsets(kernel_size: int, dilation: int) -> list[tuple[int, int]]:
    """(dy, dx) of every neighbour, row-major over the kernel, centre excluded."""
    if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
    if isinstance(dilation, bool) or int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    r = kernel_size // 2
    return [
        (dilation * (ky - r), dilation * (kx - r))
        for ky in range(kernel_size)
        for kx in range(kernel_size)
        if not (ky == r and kx == r)
    ]


def gather_neighbours(x: torch.Tensor, kernel_size: int, dilation: int, fill=0) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, K*K-1, H, W): value of each neighbour, ``fill`` outside the map."""
    if x.ndim != 4:
        raise ValueError(f"gather_neighbours expects a (B, C, H, W) tensor, got {tuple(x.shape)}")
    offsets = neighbour_offsets(kernel_size, dilation)
    b, c, h, w = x.shape
    r = dilation * (kernel_size // 2)
    padded = x.new_full((b, c, h + 2 * r, w + 2 * r), fill)
    padded[:, :, r:r + h, r:r + w] = x
    return torch.stack(
        [padded[:, :, r + dy:r + dy + h, r + dx:r + dx + w] for dy, dx in offsets], dim=2
    )


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in 0..255, (B, 3, H, W) -> CIE-Lab (L in 0..100), fp32, same device.

    Standard formulas: sRGB gamma linearisation, linear RGB -> XYZ (D65), normalisation by
    the white point, f(t) = t^(1/3) above (6/29)^3 else t / (3 (6/29)^2) + 4/29.
    Inputs are clamped to [0, 255].
    """
    if not isinstance(rgb, torch.Tensor) or rgb.ndim != 4 or rgb.shape[1] != 3:
        shape = tuple(rgb.shape) if isinstance(rgb, torch.Tensor) else type(rgb).__name__
        raise ValueError(f"rgb_to_lab expects a (B, 3, H, W) RGB tensor, got {shape}")
    with _no_autocast(rgb):
        c = (rgb.to(torch.float32) / 255.0).clamp(0.0, 1.0)
        lin = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).pow(2.4))
        m = torch.tensor(_RGB_TO_XYZ, dtype=torch.float32, device=rgb.device)
        white = torch.tensor(_WHITE_D65, dtype=torch.float32, device=rgb.device)
        xyz = torch.einsum("ij,bjhw->bihw", m, lin) / white.view(1, 3, 1, 1)
        cut = _DELTA ** 3
        f = torch.where(
            xyz > cut,
            xyz.clamp_min(cut).pow(1.0 / 3.0),
            xyz / (3.0 * _DELTA ** 2) + 4.0 / 29.0,
        )
        fx, fy, fz = f.unbind(dim=1)
        return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=1)


def image_color_similarity(
    lab: torch.Tensor, kernel_size: int = 3, dilation: int = 2, theta: float = 2.0
) -> torch.Tensor:
    """S_uv = exp(-||Lab(u) - Lab(v)||_2 / theta), (B, 3, H, W) -> (B, K*K-1, H, W).

    Neighbours v outside the map get similarity 0.
    """
    if not isinstance(lab, torch.Tensor) or lab.ndim != 4 or lab.shape[1] != 3:
        shape = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
        raise ValueError(f"image_color_similarity expects a (B, 3, H, W) Lab tensor, got {shape}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta!r}")
    with _no_autocast(lab):
        lab = lab.to(torch.float32)
        nb = gather_neighbours(lab, kernel_size, dilation, fill=0.0)  # (B, 3, n, H, W)
        # sqrt of the summed squares: ~10x faster on the CPU than linalg.vector_norm over dim 1
        dist = (lab[:, :, None] - nb).square().sum(dim=1).sqrt()  # (B, n, H, W)
        inside = gather_neighbours(torch.ones_like(lab[:, :1]), kernel_size, dilation, fill=0.0)[:, 0]
        return torch.exp(-dist / theta) * inside


def images_to_color_similarity(
    images: torch.Tensor, stride: int, kernel_size: int = 3, dilation: int = 2, theta: float = 2.0
) -> torch.Tensor:
    """(B, 3, Hp, Wp) RGB 0..255 -> similarity on the stride grid, (B, K*K-1, Hp/s, Wp/s).

    The image is average-pooled (kernel = stride = ``stride``) before conversion to Lab.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, Hp, Wp) RGB tensor, got {shape}")
    hp, wp = images.shape[-2:]
    if hp % stride or wp % stride:
        raise ValueError(f"image size {(hp, wp)} is not a multiple of stride {stride}")
    with _no_autocast(images):
        pooled = F.avg_pool2d(images.to(torch.float32), kernel_size=stride, stride=stride)
        return image_color_similarity(rgb_to_lab(pooled), kernel_size, dilation, theta)


def pairwise_edge_weights(
    similarity: torch.Tensor,
    box_masks: torch.Tensor,
    valid: torch.Tensor,
    color_thresh: float,
    kernel_size: int = 3,
    dilation: int = 2,
) -> torch.Tensor:
    """w_uv = 1[S_uv >= color_thresh] * B(u) * valid(u) * valid(v), as a bool tensor.

    v outside the map is invalid. The weights depend on the image and the GT box only, not on
    the prediction, so the criterion builds them once per step in GT order and indexes them
    at every decoder output.

    Args: similarity (N, K*K-1, H, W); box_masks (N, H, W) in {0, 1}; valid (N, H, W) bool.
    Returns: (N, K*K-1, H, W) bool.
    """
    if similarity.ndim != 4:
        raise ValueError(f"similarity must be (N, K*K-1, H, W), got {tuple(similarity.shape)}")
    n, num_nb, h, w = similarity.shape
    if num_nb != kernel_size * kernel_size - 1:
        raise ValueError(
            f"similarity must be {(n, kernel_size * kernel_size - 1, h, w)} for kernel_size={kernel_size}, "
            f"got {tuple(similarity.shape)}"
        )
    if tuple(box_masks.shape) != (n, h, w):
        raise ValueError(f"box_masks must be {(n, h, w)}, got {tuple(box_masks.shape)}")
    if tuple(valid.shape) != (n, h, w):
        raise ValueError(f"valid must be {(n, h, w)}, got {tuple(valid.shape)}")
    valid = valid.to(torch.bool)
    valid_nb = gather_neighbours(valid[:, None], kernel_size, dilation, fill=False)[:, 0]
    return (similarity >= color_thresh) & valid[:, None] & valid_nb & (box_masks > 0)[:, None]


def _overlap(size: int, d: int) -> tuple[slice, slice]:
    """Cells u with u and u + d both inside [0, size): (slice of u, slice of u + d)."""
    lo, hi = max(0, -d), min(size, size - d)
    return slice(lo, hi), slice(lo + d, hi + d)


class _PairwiseLoss(torch.autograd.Function):
    """sum_k sum_u w_k(u) l(z_u, z_{u+o_k}) / denom, one neighbour offset o_k at a time.

    Neither pass materialises a (N, K*K-1, H, W) tensor: each offset works on the
    overlapping (N, H', W') slices of the logits (an edge that leaves the map has weight 0,
    so the slices are exact), and backward keeps only the logits and recomputes
    d l / d z_u = sigmoid(z_u) - sigmoid(z_u + z_v) (and the same for v) from them.
    The edge weights of the N masks are rows ``rows`` of ``edge_weights`` (indexed one
    offset at a time, never copied whole).
    """

    @staticmethod
    def forward(ctx, z, edge_weights, rows, offsets, denom):
        h, w = z.shape[-2:]
        total = z.new_zeros(())
        for k, (dy, dx) in enumerate(offsets):
            (ys, yn), (xs, xn) = _overlap(h, dy), _overlap(w, dx)
            zu, zv = z[:, ys, xs], z[:, yn, xn]
            weight = edge_weights[rows, k][:, ys, xs]
            edge = F.softplus(zu) + F.softplus(zv) - F.softplus(zu + zv)
            total = total + edge.masked_fill(~weight, 0.0).sum()
        ctx.save_for_backward(z, edge_weights, rows, denom)
        ctx.offsets = offsets
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        z, edge_weights, rows, denom = ctx.saved_tensors
        h, w = z.shape[-2:]
        scale = grad_out / denom
        grad = torch.zeros_like(z)
        sig = torch.sigmoid(z)
        for k, (dy, dx) in enumerate(ctx.offsets):
            (ys, yn), (xs, xn) = _overlap(h, dy), _overlap(w, dx)
            weight = edge_weights[rows, k][:, ys, xs]
            both = torch.sigmoid(z[:, ys, xs] + z[:, yn, xn])
            grad[:, ys, xs] += (sig[:, ys, xs] - both).masked_fill_(~weight, 0.0)
            grad[:, yn, xn] += (sig[:, yn, xn] - both).masked_fill_(~weight, 0.0)
        return grad * scale, None, None, None, None


def pairwise_loss_weighted(
    mask_logits: torch.Tensor,
    edge_weights: torch.Tensor,
    kernel_size: int = 3,
    dilation: int = 2,
    rows: torch.Tensor | None = None,
    edge_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(w * l) / max(sum(w), 1) over N masks with precomputed (bool) edge weights w.

    l_uv = -log(m(u) m(v) + (1 - m(u))(1 - m(v))) with m = sigmoid(z), evaluated as
    softplus(z_u) + softplus(z_v) - softplus(z_u + z_v) (the same quantity as
    -logsumexp(logsig(z_u) + logsig(z_v), logsig(-z_u) + logsig(-z_v)), stable for any z).
    Memory: backward keeps the (N, H, W) logits only (``_PairwiseLoss``).

    Args: mask_logits (N, H, W); edge_weights (N, K*K-1, H, W) from pairwise_edge_weights,
    or (G, K*K-1, H, W) with ``rows`` (N,) saying which row belongs to each mask (the
    criterion passes all GTs of the batch once and the matched GT of each mask);
    ``edge_counts`` (G,): optional precomputed ``edge_weights.flatten(1).sum(1)``.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be (N, H, W), got {tuple(mask_logits.shape)}")
    n, h, w = mask_logits.shape
    num_nb = kernel_size * kernel_size - 1
    if rows is None:
        if tuple(edge_weights.shape) != (n, num_nb, h, w):
            raise ValueError(f"edge_weights must be {(n, num_nb, h, w)}, got {tuple(edge_weights.shape)}")
        rows = torch.arange(n, device=mask_logits.device)
    elif edge_weights.ndim != 4 or tuple(edge_weights.shape[1:]) != (num_nb, h, w) or tuple(rows.shape) != (n,):
        raise ValueError(
            f"edge_weights must be (G, {num_nb}, {h}, {w}) and rows ({n},), "
            f"got {tuple(edge_weights.shape)} and {tuple(rows.shape)}"
        )
    if edge_counts is None:
        edge_counts = edge_weights.flatten(1).sum(1)
    with _no_autocast(mask_logits):
        z = mask_logits if mask_logits.dtype == torch.float64 else mask_logits.to(torch.float32)
        denom = edge_counts[rows].sum().to(z.dtype).clamp(min=1.0)
        offsets = tuple(neighbour_offsets(kernel_size, dilation))
        return _PairwiseLoss.apply(z, edge_weights.to(torch.bool), rows, offsets, denom)


def pairwise_loss(
    mask_logits: torch.Tensor,
    similarity: torch.Tensor,
    box_masks: torch.Tensor,
    valid: torch.Tensor,
    color_thresh: float,
    kernel_size: int = 3,
    dilation: int = 2,
) -> torch.Tensor:
    """Colour-gated pairwise loss over N matched pairs -> scalar.

    pairwise_edge_weights followed by pairwise_loss_weighted (see both).
    Args: mask_logits (N, H, W); similarity (N, K*K-1, H, W); box_masks (N, H, W) in
    {0, 1}; valid (N, H, W) bool.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be (N, H, W), got {tuple(mask_logits.shape)}")
    weights = pairwise_edge_weights(similarity, box_masks, valid, color_thresh, kernel_size, dilation)
    return pairwise_loss_weighted(mask_logits, weights, kernel_size, dilation)
