"""Class prototypes of SIM: semantic maps (Eq.1) and their online update (Eq.2-5), METHOD.md §2.

Notation (METHOD.md): f̂(u) ∈ R^D the teacher's ``mask_features`` at cell u of the stride-4
grid Ω, L2-normalised over channels; P ∈ R^{C×K×D} the prototype buffer, K sub-centres per
class, unit rows; GT g has image b_g and class c_g.

Eq.1 (semantic map of a GT)::

    S_{c,k}(u) = sigmoid(⟨f̂(u), P_{c,k}⟩ / τ_s)        S_g(u) = max_k S_{c_g,k}(u)

Since sigmoid is increasing and τ_s > 0, S_g(u) = sigmoid(max_k ⟨f̂(u), P_{c_g,k}⟩ / τ_s), which
is how it is computed (bit-identical to the max of the sigmoids).

Eq.2-5 (update, every iteration, no_grad, fp32). For every image b and class c present:

    X_{b,c} = {u : T_g(u) > 0.7 and B_g(u) = 1 for some GT g of image b and class c}
    A = P_c f̂(X_{b,c})ᵀ                                  (K × N_{b,c}) scores
    Q = Sinkhorn(A; ε, iters)                              (see ``sinkhorn``)
    k*(u) = argmax_k Q_{k,u}                               hard assignment
    p̄_{c,k} = normalize( Σ_{b, u ∈ X_{b,c}, k*(u)=k} f̂(u) / n_{c,k} )
    P_{c,k} ← normalize( μ P_{c,k} + (1 − μ) p̄_{c,k} )     only where n_{c,k} > 0

with the per-(c, k) sums Σ f̂ and counts n_{c,k} summed over the images of this process
and then over all processes in ONE packed all-reduce, issued on every call by every rank
(zeros where a rank has no pixels), so all ranks hold identical prototypes and none hangs.

Not in the paper (both off by default, docs/BENCHMARKS.md): ``center_features``
(MODEL.SIM.CENTER_FEATURES) subtracts each image's mean f̂ before Eq.1 and Eq.2-5;
``background_cells`` is the pixel set of a background row P_bg (MODEL.SIM.BACKGROUND_PROTOTYPES,
wired by the pseudo labeler): the cells outside every GT box, which boxes alone label.

Shapes: features (B, D, H, W); pixel masks (G, H, W) bool; batch_idx, classes (G,) long;
prototypes (C, K, D). Nothing loops over GTs, classes or pixels; the only Python loops
are over the B images of the batch and the Sinkhorn iterations; nothing syncs with the
host (the all-reduce is a device collective).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "sinkhorn", "semantic_scores", "semantic_maps", "background_cells", "normalize_features", "center_features",
    "PrototypeMemory",
]

_TINY = torch.finfo(torch.float32).tiny


def normalize_features(mask_features: Tensor) -> Tensor:
    """(B, D, H, W) -> f̂: L2-normalised over D, fp32."""
    if mask_features.ndim != 4:
        raise ValueError(f"normalize_features expects (B, D, H, W), got {tuple(mask_features.shape)}")
    return F.normalize(mask_features.float(), p=2.0, dim=1)


def center_features(features: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """f̂ (B, D, H, W) -> f̂ minus its image's mean over the valid cells, L2-normalised again.

    Not in the paper (MODEL.SIM.CENTER_FEATURES, off by default): a component shared by every
    pixel of an image makes cos(f̂, p) high everywhere and the semantic map flat
    (docs/BENCHMARKS.md, "Why"); removing the image mean keeps only what differs between its
    pixels. ``valid`` (B, H, W) bool excludes padding from the mean (None: every cell); an image
    without a valid cell keeps its features (mean 0).
    """
    if features.ndim != 4:
        raise ValueError(f"center_features expects (B, D, H, W), got {tuple(features.shape)}")
    features = features.float()
    if valid is None:
        mean = features.mean(dim=(2, 3), keepdim=True)
    else:
        if valid.shape != (features.shape[0], *features.shape[2:]):
            raise ValueError(
                f"center_features: valid {tuple(valid.shape)} does not match features {tuple(features.shape)}"
            )
        w = valid[:, None].to(features.dtype)
        mean = (features * w).sum(dim=(2, 3), keepdim=True) / w.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    return F.normalize(features - mean, p=2.0, dim=1)


def sinkhorn(scores: Tensor, group: Tensor, num_groups: int, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Grouped Sinkhorn-Knopp. scores (N, K): pixel n's score against the K sub-centres of its group
    (a group = one (image, class) pixel set X_c of METHOD.md Eq.2-4); group (N,) long in [0, num_groups).
    Per group: Q = exp(A/eps) (max subtracted first, per group), normalised to sum 1, then `iters` times:
    rows (sub-centres) to 1/K, columns (pixels) to 1/N_group; finally each column sums to 1.
    Returns Q (N, K), fp32. Vectorised over groups with scatter/index_add (no loop over groups).

    Exact properties of the result: every column (pixel) sums to 1; within a group, the row
    (sub-centre) sums tend to N_group / K as ``iters`` grows (after a finite number of
    iterations they are only approximately N_group / K, since the last step scales columns).
    Each group's result depends on that group's scores only.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn expects scores of shape (N, K), got {tuple(scores.shape)}")
    if group.shape != scores.shape[:1]:
        raise ValueError(f"sinkhorn: group must have shape ({scores.shape[0]},), got {tuple(group.shape)}")
    if not eps > 0:
        raise ValueError(f"sinkhorn eps must be > 0, got {eps}")
    if int(iters) != iters or iters < 0:
        raise ValueError(f"sinkhorn iters must be a non-negative integer, got {iters}")
    a = scores.float()
    n, k = a.shape
    if n == 0:
        return a.new_zeros(0, k)
    group = group.long()
    gmax = a.new_full((num_groups,), float("-inf")).scatter_reduce(
        0, group, a.amax(dim=1), reduce="amax", include_self=True
    )
    q = torch.exp((a - gmax[group, None]) / eps)
    total = a.new_zeros(num_groups).index_add_(0, group, q.sum(dim=1))
    q = q / total.clamp_min(_TINY)[group, None]
    group_size = a.new_zeros(num_groups).index_add_(0, group, a.new_ones(n))  # N_group
    for _ in range(int(iters)):
        rows = a.new_zeros(num_groups, k).index_add_(0, group, q)  # (num_groups, K)
        q = q / (rows.clamp_min(_TINY) * k)[group]
        cols = q.sum(dim=1, keepdim=True)
        q = q / (cols.clamp_min(_TINY) * group_size[group, None])
    return q / q.sum(dim=1, keepdim=True).clamp_min(_TINY)


def _check_gt_inputs(features: Tensor, batch_idx: Tensor, classes: Tensor) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be (B, D, H, W), got {tuple(features.shape)}")
    if batch_idx.ndim != 1 or classes.shape != batch_idx.shape:
        raise ValueError(
            f"batch_idx and classes must both be (G,), got {tuple(batch_idx.shape)} and {tuple(classes.shape)}"
        )


def _image_slices(batch_idx: Tensor, num_images: int, gts_per_image: Optional[Sequence[int]]):
    """(image, GT slice) pairs when ``gts_per_image`` (GTs per image, host ints, GTs ordered by image as the
    criterion orders them) is given; else None (callers then mask per image)."""
    if gts_per_image is None:
        return None
    counts = [int(n) for n in gts_per_image]
    if len(counts) != num_images or sum(counts) != batch_idx.shape[0]:
        raise ValueError(
            f"counts {counts} must give the number of GTs of each of the {num_images} images "
            f"({batch_idx.shape[0]} GTs in all)"
        )
    out, start = [], 0
    for b, n in enumerate(counts):
        if n:
            out.append((b, slice(start, start + n)))
        start += n
    return out


def _gt_scores(flat: Tensor, protos_of_gt: Tensor, batch_idx: Tensor, max_over_k: bool,
               gts_per_image: Optional[Sequence[int]] = None) -> Tensor:
    """⟨f̂_{b_g}(u), P_{c_g,k}⟩ for every GT g: flat (B, D, N), protos_of_gt (G, K, D) ->
    (G, K, N), or (G, N) with the max over k. A loop over images, not GTs, with no host sync:
    with ``gts_per_image`` (GTs ordered by image) one (G_b·K, D) x (D, N) product for the G_b GTs of
    image b; without, one (G·K, D) x (D, N) product per image, kept for the GTs of that image."""
    b_count = flat.shape[0]
    g, k, _ = protos_of_gt.shape
    n = flat.shape[2]
    slices = _image_slices(batch_idx, b_count, gts_per_image)
    if slices is not None:
        parts = [torch.matmul(protos_of_gt[sl], flat[b]) for b, sl in slices]  # (G_b, K, N)
        if not parts:
            return flat.new_zeros((g, n) if max_over_k else (g, k, n))
        out = torch.cat(parts)
        return out.amax(dim=1) if max_over_k else out
    out = flat.new_zeros((g, n) if max_over_k else (g, k, n))
    for b in range(b_count):
        s = torch.matmul(protos_of_gt, flat[b])  # (G, K, N)
        if max_over_k:
            s = s.amax(dim=1)
            out = torch.where((batch_idx == b)[:, None], s, out)
        else:
            out = torch.where((batch_idx == b)[:, None, None], s, out)
    return out


def semantic_scores(features: Tensor, prototypes: Tensor, batch_idx: Tensor, classes: Tensor,
                    gts_per_image: Optional[Sequence[int]] = None) -> Tensor:
    """max_k <f(u), P_{c_g,k}> for every GT g: features (B, D, H, W) f-hat, prototypes (C, K, D) unit
    rows -> (G, H, W), the cosine inside Eq.1's sigmoid. (Do not build the (B, C, H, W) map of all
    classes: COCO has 80 classes.) ``gts_per_image`` (GTs ordered by image) lets each image's product
    cover its own GTs only."""
    _check_gt_inputs(features, batch_idx, classes)
    if prototypes.ndim != 3 or prototypes.shape[2] != features.shape[1]:
        raise ValueError(
            f"prototypes must be (C, K, D={features.shape[1]}), got {tuple(prototypes.shape)}"
        )
    b, d, h, w = features.shape
    flat = features.float().reshape(b, d, h * w)
    protos = prototypes.float()[classes.long()]  # (G, K, D)
    best = _gt_scores(flat, protos, batch_idx.long(), max_over_k=True, gts_per_image=gts_per_image)  # (G, HW)
    return best.reshape(-1, h, w)


def semantic_maps(features: Tensor, prototypes: Tensor, batch_idx: Tensor, classes: Tensor,
                  temperature: float = 1.0, gts_per_image: Optional[Sequence[int]] = None) -> Tensor:
    """Eq.1 for the GTs only: S_g(u) = max_k sigmoid(<f(u), P_{c_g,k}> / tau) = sigmoid(semantic_scores / tau),
    (G, H, W); arguments as ``semantic_scores``."""
    if not temperature > 0:
        raise ValueError(f"semantic_maps temperature must be > 0, got {temperature}")
    return torch.sigmoid(semantic_scores(features, prototypes, batch_idx, classes, gts_per_image) / temperature)


def background_cells(box_masks: Tensor, batch_idx: Tensor, num_images: int,
                     valid: Optional[Tensor] = None) -> Tensor:
    """(B, H, W) bool: the cells of each image outside every GT box of that image (and inside the
    image: ``valid`` (B, H, W), None = every cell). box_masks (G, H, W) > 0 inside GT g's box,
    batch_idx (G,). Boxes say these cells are background: the pixel set of the background
    prototypes (MODEL.SIM.BACKGROUND_PROTOTYPES)."""
    if box_masks.ndim != 3 or batch_idx.shape != box_masks.shape[:1]:
        raise ValueError(
            f"background_cells: box_masks (G, H, W) and batch_idx (G,), got {tuple(box_masks.shape)} "
            f"and {tuple(batch_idx.shape)}"
        )
    h, w = box_masks.shape[-2:]
    covered = torch.zeros(num_images, h * w, device=box_masks.device)
    covered.index_add_(0, batch_idx.long(), (box_masks > 0).reshape(-1, h * w).float())
    out = (covered == 0).reshape(num_images, h, w)
    if valid is not None:
        if valid.shape != out.shape:
            raise ValueError(f"background_cells: valid {tuple(valid.shape)}, expected {tuple(out.shape)}")
        out = out & valid.bool()
    return out


class PrototypeMemory(nn.Module):
    """The C x K x D buffer `prototypes` (persistent buffer, so it is in the state_dict and checkpoints),
    unit rows, initialised with random unit vectors from a torch.Generator seeded by `seed` (identical on
    every rank without any communication).

    Args:
        num_classes: C.  num_prototypes: K sub-centres per class.  dim: D (MASK_DIM).
        momentum: μ of the EMA P ← normalize(μ P + (1 − μ) p̄).
        sinkhorn_eps, sinkhorn_iters: ε and the number of iterations of ``sinkhorn``.
        seed: seed of the initial random unit vectors.
    """

    prototypes: Tensor

    def __init__(self, num_classes: int, num_prototypes: int = 10, dim: int = 256, momentum: float = 0.999,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, seed: int = 0):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("num_prototypes", num_prototypes), ("dim", dim)):
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"PrototypeMemory {name} must be a positive integer, got {v!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"PrototypeMemory momentum must be in [0, 1], got {momentum}")
        if not sinkhorn_eps > 0:
            raise ValueError(f"PrototypeMemory sinkhorn_eps must be > 0, got {sinkhorn_eps}")
        self.num_classes = int(num_classes)
        self.num_prototypes = int(num_prototypes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = int(sinkhorn_iters)
        gen = torch.Generator().manual_seed(int(seed))
        init = torch.randn(self.num_classes, self.num_prototypes, self.dim, generator=gen)
        self.register_buffer("prototypes", F.normalize(init, p=2.0, dim=-1), persistent=True)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, dim={self.dim}, "
                f"momentum={self.momentum}, sinkhorn_eps={self.sinkhorn_eps}, "
                f"sinkhorn_iters={self.sinkhorn_iters}")

    def semantic_maps(self, features: Tensor, batch_idx: Tensor, classes: Tensor,
                      temperature: float = 1.0, gts_per_image: Optional[Sequence[int]] = None) -> Tensor:
        """Eq.1 with this memory's prototypes; see the module function ``semantic_maps``."""
        return semantic_maps(features, self.prototypes, batch_idx, classes, temperature, gts_per_image)

    def semantic_scores(self, features: Tensor, batch_idx: Tensor, classes: Tensor,
                        gts_per_image: Optional[Sequence[int]] = None) -> Tensor:
        """max_k cosine with this memory's prototypes; see the module function ``semantic_scores``."""
        return semantic_scores(features, self.prototypes, batch_idx, classes, gts_per_image)

    def _local_sums(self, features: Tensor, pixel_masks: Tensor, batch_idx: Tensor,
                    classes: Tensor, gts_per_image: Optional[Sequence[int]] = None):
        """Per-(c, k) feature sums (C, K, D) and pixel counts (C, K) of this process, and the
        number of pixels used."""
        c, k, d = self.prototypes.shape
        device = self.prototypes.device
        sums = torch.zeros(c, k, d, device=device)
        counts = torch.zeros(c, k, device=device)
        g = batch_idx.shape[0]
        if g == 0:
            return sums, counts, torch.zeros((), device=device)
        b, _, h, w = features.shape
        hw = h * w
        flat = F.normalize(features.float(), p=2.0, dim=1).reshape(b, d, hw)  # f̂ (idempotent)
        masks = pixel_masks.reshape(g, hw).to(device=device, dtype=torch.float32)
        batch_idx = batch_idx.to(device).long()
        classes = classes.to(device).long()

        # X_{b,c}: union of the masks of GTs of the same (image, class), kept at the first GT
        # of the group ("representative"), so a pixel is counted once per group.
        group_key = batch_idx * c + classes
        idx = torch.arange(g, device=device)
        same = group_key[:, None] == group_key[None, :]  # (G, G)
        rep = torch.where(same, idx[None, :], g).amin(dim=1)  # (G,) first GT of g's group
        union = torch.zeros(g, hw, device=device).index_add_(0, rep, masks) > 0  # (G, HW)

        scores = _gt_scores(flat, self.prototypes.float()[classes], batch_idx, max_over_k=False, gts_per_image=gts_per_image)  # (G,K,HW)
        # Every (GT, cell) is a row; cells outside X go to one dummy group (index G), ignored.
        rows = scores.permute(0, 2, 1).reshape(g * hw, k)
        pix_group = torch.where(union, idx[:, None], g).reshape(g * hw)
        q = sinkhorn(rows, pix_group, g + 1, eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
        onehot = F.one_hot(q.argmax(dim=1), k).float().reshape(g, hw, k)
        onehot = onehot * union[:, :, None].float()  # (G, HW, K), zero outside X

        slices = _image_slices(batch_idx, b, gts_per_image)
        if slices is not None:  # (G_b, K, HW) x (HW, D) per image
            per_gt_sums = torch.cat([torch.matmul(onehot[sl].transpose(1, 2), flat[bi].t()) for bi, sl in slices])
        else:
            per_gt_sums = torch.zeros(g, k, d, device=device)
            for bi in range(b):
                sel = onehot * (batch_idx == bi)[:, None, None].float()
                per_gt_sums = per_gt_sums + torch.matmul(sel.transpose(1, 2), flat[bi].t())  # (G, K, D)
        sums.index_add_(0, classes, per_gt_sums)
        counts.index_add_(0, classes, onehot.sum(dim=1))
        return sums, counts, union.sum().float()

    @torch.no_grad()
    def update(self, features: Tensor, pixel_masks: Tensor, batch_idx: Tensor, classes: Tensor,
               gts_per_image: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """Eq.2-5. features (B, D, H, W) f-hat; pixel_masks (G, H, W) bool = confident pixels of each GT
        (the caller passes T_g > 0.7 and B_g = 1); batch_idx/classes (G,). Pixel set X_c per (image,
        class) = union of the masks of that image's GTs of class c (a pixel counted once per group).
        Scores = <f-hat(u), P_{c,k}>, grouped Sinkhorn, hard argmax over k, per-(c, k) feature sums and
        pixel counts; then ONE packed all-reduce (sums and counts in one tensor, SUM) when
        torch.distributed is initialised, on EVERY call, also when this rank has no pixels (G = 0 or all
        masks empty: it must still join the collective with zeros); centroid = normalize(sum / count);
        P <- normalize(mu P + (1 - mu) centroid) only where count > 0. Returns small stats for logging
        as tensors (e.g. number of pixels used, number of sub-centres updated) without syncing.

        Stats (0-dim tensors): ``num_pixels`` (all processes), ``num_pixels_local`` (this
        process), ``num_updated`` (sub-centres that received pixels, all processes).
        """
        _check_gt_inputs(features, batch_idx, classes)
        if features.shape[1] != self.dim:
            raise ValueError(f"features have D={features.shape[1]}, the prototypes D={self.dim}")
        if pixel_masks.ndim != 3 or pixel_masks.shape[0] != batch_idx.shape[0] \
                or pixel_masks.shape[1:] != features.shape[2:]:
            raise ValueError(
                f"pixel_masks must be (G={batch_idx.shape[0]}, H, W={tuple(features.shape[2:])}), "
                f"got {tuple(pixel_masks.shape)}"
            )
        c, k, d = self.prototypes.shape
        sums, counts, local_pixels = self._local_sums(features, pixel_masks, batch_idx, classes, gts_per_image)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([sums.reshape(-1), counts.reshape(-1)])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            sums = packed[: c * k * d].reshape(c, k, d)
            counts = packed[c * k * d:].reshape(c, k)
        hit = counts > 0  # (C, K)
        centroid = F.normalize(sums / counts.clamp_min(1.0)[:, :, None], p=2.0, dim=-1)
        old = self.prototypes.float()
        new = F.normalize(self.momentum * old + (1.0 - self.momentum) * centroid, p=2.0, dim=-1)
        self.prototypes.copy_(torch.where(hit[:, :, None], new, old))
        return {
            "num_pixels": counts.sum(),
            "num_pixels_local": local_pixels,
            "num_updated": hit.sum(),
        }
