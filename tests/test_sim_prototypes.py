"""Prototypes (mask2former_sim/sim/prototypes.py): grouped Sinkhorn, Eq.1 maps, Eq.2-5 update,
including the two-process all-reduce with a rank that has no pixels."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mask2former_sim.sim.prototypes import (
    PrototypeMemory,
    center_features,
    normalize_features,
    semantic_maps,
    sinkhorn,
)


def _grouped_scores(sizes, k, seed=0):
    """Random cosine-like scores for groups of the given sizes, rows interleaved at random."""
    g = torch.Generator().manual_seed(seed)
    group = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    perm = torch.randperm(group.numel(), generator=g)
    group = group[perm]
    scores = torch.rand(group.numel(), k, generator=g) * 2 - 1
    return scores, group


def _dense_reference(a, eps, iters):
    """Single-group Sinkhorn on Q = (K, N), written the plain way."""
    q = torch.exp((a - a.max()) / eps).t().double()  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iters):
        for r in range(k):
            q[r] = q[r] / q[r].sum() / k
        for c in range(n):
            q[:, c] = q[:, c] / q[:, c].sum() / n
    for c in range(n):
        q[:, c] = q[:, c] / q[:, c].sum()
    return q.t().float()


# ---------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("k", [4, 10])
def test_sinkhorn_marginals(k):
    sizes = [1, 5, 17, 40]
    scores, group = _grouped_scores(sizes, k)
    q = sinkhorn(scores, group, num_groups=len(sizes), eps=0.05, iters=3)
    assert q.dtype == torch.float32 and q.shape == scores.shape
    assert torch.isfinite(q).all() and (q >= 0).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(len(group)), rtol=0, atol=1e-5)
    # Rows of a group sum to N_group / K in the limit of many iterations.
    q_conv = sinkhorn(scores, group, num_groups=len(sizes), eps=0.5, iters=500)
    torch.testing.assert_close(q_conv.sum(dim=1), torch.ones(len(group)), rtol=0, atol=1e-5)
    for i, n in enumerate(sizes):
        rows = q_conv[group == i].sum(dim=0)
        torch.testing.assert_close(rows, torch.full((k,), n / k), rtol=1e-3, atol=1e-4)
    # A single-pixel group is spread evenly after the row step, whatever its scores.
    torch.testing.assert_close(q[group == 0], torch.full((1, k), 1.0 / k), rtol=0, atol=1e-6)


def test_sinkhorn_matches_dense_reference_per_group():
    k, eps, iters = 5, 0.05, 3
    sizes = [3, 8, 20]
    scores, group = _grouped_scores(sizes, k, seed=1)
    q = sinkhorn(scores, group, num_groups=len(sizes), eps=eps, iters=iters)
    for i in range(len(sizes)):
        ref = _dense_reference(scores[group == i], eps, iters)
        torch.testing.assert_close(q[group == i], ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_grouped_equals_each_group_alone():
    k = 6
    sizes = [7, 0, 12, 1, 30]  # group 1 is empty
    scores, group = _grouped_scores(sizes, k, seed=2)
    scores[group == 4] += 3.0  # a group whose scores sit far above the others
    q = sinkhorn(scores, group, num_groups=len(sizes))
    for i, n in enumerate(sizes):
        if n == 0:
            continue
        alone = sinkhorn(scores[group == i], torch.zeros(n, dtype=torch.long), num_groups=1)
        torch.testing.assert_close(q[group == i], alone, rtol=1e-5, atol=1e-7)


def test_sinkhorn_empty_and_validation():
    assert sinkhorn(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2).shape == (0, 3)
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError):
        sinkhorn(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), 1, eps=0.0)


# ---------------------------------------------------------------------------- Eq.1
def test_semantic_maps_against_loop():
    g = torch.Generator().manual_seed(3)
    b, d, h, w, c, k, tau = 2, 6, 3, 4, 4, 3, 0.5
    feats = normalize_features(torch.randn(b, d, h, w, generator=g))
    protos = F.normalize(torch.randn(c, k, d, generator=g), dim=-1)
    batch_idx = torch.tensor([0, 1, 1, 0, 1])
    classes = torch.tensor([2, 0, 2, 3, 3])
    out = semantic_maps(feats, protos, batch_idx, classes, temperature=tau)
    assert out.shape == (5, h, w) and out.dtype == torch.float32
    ref = torch.empty(5, h, w)
    for gi in range(5):
        for y in range(h):
            for x in range(w):
                f = feats[batch_idx[gi], :, y, x]
                ref[gi, y, x] = max(torch.sigmoid(f @ protos[classes[gi], kk] / tau) for kk in range(k))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert semantic_maps(feats, protos, batch_idx[:0], classes[:0]).shape == (0, h, w)


def test_per_image_slices_give_the_same_maps_and_update():
    """gts_per_image (the criterion's GT counts, GTs ordered by image) only changes how the work is
    split: the semantic maps and the prototype update equal the per-image masking path's; wrong counts
    are an error."""
    g = torch.Generator().manual_seed(5)
    b, d, h, w, c, k = 3, 8, 5, 6, 4, 3
    feats = normalize_features(torch.randn(b, d, h, w, generator=g))
    batch_idx = torch.tensor([0, 0, 2, 2, 2])  # image 1 has no GT
    classes = torch.tensor([1, 3, 1, 1, 0])
    per_image = [2, 0, 3]
    masks = torch.rand(5, h, w, generator=g) > 0.4
    a, bm = PrototypeMemory(c, k, d, momentum=0.5, seed=1), PrototypeMemory(c, k, d, momentum=0.5, seed=1)
    torch.testing.assert_close(a.semantic_maps(feats, batch_idx, classes, 0.5),
                               bm.semantic_maps(feats, batch_idx, classes, 0.5, per_image), rtol=0, atol=1e-6)
    sa = a.update(feats, masks, batch_idx, classes)
    sb = bm.update(feats, masks, batch_idx, classes, per_image)
    torch.testing.assert_close(a.prototypes, bm.prototypes, rtol=0, atol=1e-6)
    assert int(sa["num_updated"]) == int(sb["num_updated"]) > 0
    with pytest.raises(ValueError, match="number of GTs of each"):
        bm.update(feats, masks, batch_idx, classes, [2, 3])


def test_normalize_features_unit_norm_fp32():
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64) * 7
    y = normalize_features(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 3, 3))


def test_center_features_removes_the_image_mean_over_valid_cells():
    """MODEL.SIM.CENTER_FEATURES: unit rows again; a vector shared by every valid cell of one image is
    gone (cosines against any prototype unchanged); padding cells do not enter the mean; an image
    with no valid cell keeps its features."""
    g = torch.Generator().manual_seed(9)
    b, d, h, w = 3, 6, 4, 5
    raw = torch.randn(b, d, h, w, generator=g)
    valid = torch.ones(b, h, w, dtype=torch.bool)
    valid[1, :, 3:] = False  # image 1: right two columns are padding
    valid[2] = False  # image 2: nothing valid
    out = center_features(raw, valid)
    assert out.shape == raw.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(b, h, w))
    for i in range(2):
        cells = raw[i][:, valid[i]]  # (D, N)
        ref = F.normalize(raw[i] - cells.mean(dim=1)[:, None, None], dim=0)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2], F.normalize(raw[2], dim=0), rtol=0, atol=1e-6)
    # a shared offset on the valid cells of image 0 (padding of image 1 changed freely) changes nothing
    shifted = raw.clone()
    shifted[0] += 5 * torch.randn(d, generator=g)[:, None, None]
    shifted[1][:, ~valid[1]] = 100.0
    moved = center_features(shifted, valid)
    assert not torch.allclose(normalize_features(shifted)[0], normalize_features(raw)[0], atol=1e-2)
    torch.testing.assert_close(moved[0], out[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(moved[1][:, valid[1]], out[1][:, valid[1]], rtol=0, atol=1e-5)
    # None: every cell is valid
    torch.testing.assert_close(center_features(raw), center_features(raw, torch.ones(b, h, w, dtype=torch.bool)))
    with pytest.raises(ValueError, match="does not match"):
        center_features(raw, valid[:, :3])
    with pytest.raises(ValueError, match="expects"):
        center_features(raw[0])


# ---------------------------------------------------------------------------- memory
def test_memory_init_seeded_unit_rows_in_state_dict():
    a = PrototypeMemory(5, num_prototypes=3, dim=8, seed=11)
    b = PrototypeMemory(5, num_prototypes=3, dim=8, seed=11)
    c = PrototypeMemory(5, num_prototypes=3, dim=8, seed=12)
    assert a.prototypes.shape == (5, 3, 8)
    assert torch.equal(a.prototypes, b.prototypes) and not torch.equal(a.prototypes, c.prototypes)
    torch.testing.assert_close(a.prototypes.norm(dim=-1), torch.ones(5, 3))
    assert "prototypes" in a.state_dict()
    assert list(a.parameters()) == []
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.prototypes, a.prototypes)


def _random_batch(seed, b=2, d=8, h=6, w=7, g=5, c=3, p=0.4):
    gen = torch.Generator().manual_seed(seed)
    feats = normalize_features(torch.randn(b, d, h, w, generator=gen))
    masks = torch.rand(g, h, w, generator=gen) < p
    batch_idx = torch.randint(0, b, (g,), generator=gen)
    classes = torch.randint(0, c, (g,), generator=gen)
    return feats, masks, batch_idx, classes


def test_prototypes_stay_unit_norm_after_updates():
    mem = PrototypeMemory(3, num_prototypes=4, dim=8, momentum=0.5)
    for step in range(5):
        before = mem.prototypes.clone()
        stats = mem.update(*_random_batch(step))
        torch.testing.assert_close(mem.prototypes.norm(dim=-1), torch.ones(3, 4), rtol=0, atol=1e-6)
        assert int(stats["num_updated"]) > 0
        assert not torch.equal(before, mem.prototypes)


def test_subcentre_without_pixels_is_unchanged():
    mem = PrototypeMemory(3, num_prototypes=3, dim=4, momentum=0.5)
    before = mem.prototypes.clone()
    feats = normalize_features(torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)))
    masks = torch.zeros(1, 2, 2, dtype=torch.bool)
    masks[0, 1, 0] = True  # a single pixel of class 1: exactly one of its 3 sub-centres moves
    stats = mem.update(feats, masks, torch.tensor([0]), torch.tensor([1]))
    changed = (mem.prototypes != before).any(dim=-1)  # (C, K)
    assert changed[1].sum() == 1
    assert not changed[0].any() and not changed[2].any()
    assert torch.equal(mem.prototypes[0], before[0]) and torch.equal(mem.prototypes[2], before[2])
    assert int(stats["num_updated"]) == 1 and int(stats["num_pixels"]) == 1


def test_ema_against_hand_computation_one_pixel_per_subcentre():
    mu = 0.5
    mem = PrototypeMemory(2, num_prototypes=2, dim=3, momentum=mu)
    e = torch.eye(3)
    with torch.no_grad():
        mem.prototypes.copy_(torch.stack([e[:2], e[1:]]))  # class 0: e0, e1; class 1: e1, e2
    before = mem.prototypes.clone()
    fa = F.normalize(torch.tensor([1.0, 0.3, 0.1]), dim=0)  # nearest e0
    fb = F.normalize(torch.tensor([0.2, 1.0, -0.2]), dim=0)  # nearest e1
    fc = F.normalize(torch.tensor([0.0, 0.0, 1.0]), dim=0)  # never in a mask
    feats = torch.stack([fa, fb, fc], dim=1).reshape(1, 3, 1, 3)
    # Two GTs of class 0 in the same image whose masks overlap at pixel a: X = {a, b}, a once.
    masks = torch.tensor([[[True, False, False]], [[True, True, False]]])
    stats = mem.update(feats, masks, torch.tensor([0, 0]), torch.tensor([0, 0]))
    exp0 = F.normalize(mu * e[0] + (1 - mu) * fa, dim=0)
    exp1 = F.normalize(mu * e[1] + (1 - mu) * fb, dim=0)
    torch.testing.assert_close(mem.prototypes[0, 0], exp0, rtol=0, atol=1e-6)
    torch.testing.assert_close(mem.prototypes[0, 1], exp1, rtol=0, atol=1e-6)
    assert torch.equal(mem.prototypes[1], before[1])
    assert int(stats["num_pixels"]) == 2 and int(stats["num_pixels_local"]) == 2
    assert int(stats["num_updated"]) == 2
    assert all(isinstance(v, torch.Tensor) for v in stats.values())


def test_same_class_in_two_images_is_two_groups():
    """X_c is per (image, class): the centroid averages the pixels of both images."""
    mem = PrototypeMemory(1, num_prototypes=1, dim=2, momentum=0.0)
    feats = torch.zeros(2, 2, 1, 1)
    feats[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    feats[1, :, 0, 0] = torch.tensor([0.0, 1.0])
    masks = torch.ones(2, 1, 1, dtype=torch.bool)
    mem.update(feats, masks, torch.tensor([0, 1]), torch.tensor([0, 0]))
    torch.testing.assert_close(mem.prototypes[0, 0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))


def test_update_with_no_gts_changes_nothing():
    mem = PrototypeMemory(3, num_prototypes=4, dim=8)
    before = mem.prototypes.clone()
    feats = normalize_features(torch.randn(2, 8, 5, 5))
    stats = mem.update(feats, torch.zeros(0, 5, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long))
    assert torch.equal(mem.prototypes, before)
    assert int(stats["num_pixels"]) == 0 and int(stats["num_updated"]) == 0
    # GTs whose masks are all empty: also nothing.
    stats = mem.update(feats, torch.zeros(2, 5, 5, dtype=torch.bool), torch.tensor([0, 1]), torch.tensor([1, 2]))
    assert torch.equal(mem.prototypes, before)
    assert int(stats["num_updated"]) == 0


def test_update_validates_shapes():
    mem = PrototypeMemory(3, num_prototypes=4, dim=8)
    feats = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError):
        mem.update(feats, torch.zeros(1, 4, 5, dtype=torch.bool), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError):
        mem.update(torch.randn(1, 6, 5, 5), torch.zeros(1, 5, 5, dtype=torch.bool), torch.tensor([0]),
                   torch.tensor([0]))


# ---------------------------------------------------------------------------- two processes
_C, _K, _D, _H, _W = 3, 4, 8, 4, 5
# Per call: for each rank, (number of images, [(image, class, mask empty?), ...]).
_CASES = [
    # rank 1 has GTs but no pixels for class 2 (empty mask) and no GT of class 1 at all
    {0: (2, [(0, 0, False), (0, 0, False), (1, 1, False), (1, 2, False)]), 1: (1, [(0, 0, False), (0, 2, True)])},
    # rank 1 has no GTs at all
    {0: (1, [(0, 1, False), (0, 2, False)]), 1: (1, [])},
    # rank 1 has GTs whose masks are all empty
    {0: (1, [(0, 0, False)]), 1: (2, [(1, 1, True), (0, 2, True)])},
]


def _rank_data(call, rank):
    n_img, gts = _CASES[call][rank]
    gen = torch.Generator().manual_seed(1000 * call + rank)
    feats = normalize_features(torch.randn(n_img, _D, _H, _W, generator=gen))
    masks = torch.rand(len(gts), _H, _W, generator=gen) < 0.5
    for i, (_, _, empty) in enumerate(gts):
        if empty:
            masks[i] = False
    batch_idx = torch.tensor([gt[0] for gt in gts], dtype=torch.long)
    classes = torch.tensor([gt[1] for gt in gts], dtype=torch.long)
    return feats, masks, batch_idx, classes


def _dist_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        mem = PrototypeMemory(_C, num_prototypes=_K, dim=_D, momentum=0.5, seed=0)
        results = []
        for call in range(len(_CASES)):
            stats = mem.update(*_rank_data(call, rank))
            results.append((mem.prototypes.clone(), {k: v.clone() for k, v in stats.items()}))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_identical_prototypes_and_no_hang(tmp_path):
    ctx = mp.spawn(_dist_worker, args=(2, str(tmp_path / "dist_init"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the two-process prototype update hung (a rank skipped the collective?)")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    ref = PrototypeMemory(_C, num_prototypes=_K, dim=_D, momentum=0.5, seed=0)
    prev = ref.prototypes.clone()
    for call in range(len(_CASES)):
        f0, m0, b0, c0 = _rank_data(call, 0)
        f1, m1, b1, c1 = _rank_data(call, 1)
        stats = ref.update(torch.cat([f0, f1]), torch.cat([m0, m1]), torch.cat([b0, b1 + f0.shape[0]]),
                           torch.cat([c0, c1]))
        (p0, s0), (p1, s1) = r0[call], r1[call]
        assert torch.equal(p0, p1), f"call {call}: ranks disagree"
        torch.testing.assert_close(p0, ref.prototypes, rtol=0, atol=1e-5)
        assert not torch.equal(p0, prev), f"call {call}: nothing was updated (vacuous case)"
        prev = ref.prototypes.clone()
        assert int(s0["num_pixels"]) == int(s1["num_pixels"]) == int(stats["num_pixels"])
        assert int(s0["num_updated"]) == int(s1["num_updated"]) == int(stats["num_updated"])
        assert int(s0["num_pixels_local"]) + int(s1["num_pixels_local"]) == int(stats["num_pixels_local"])
    assert int(r1[1][1]["num_pixels_local"]) == 0 and int(r1[2][1]["num_pixels_local"]) == 0
