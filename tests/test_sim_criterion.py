"""The three-step criterion (prepare, match, losses) and SIM's pseudo-mask loss inside it.

- box-only losses and gradients equal (float tolerance), and matches are identical to, the
  per-output path the criterion had before the restructuring (rebuilt here: the matcher one
  output at a time, sigmoid before the projection, the dense pairwise loss that gathers
  every neighbour at once);
- ``query_of_gt`` holds the query matched to every GT at every output;
- the pseudo-mask loss is zero before MODEL.SIM.WARMUP_ITERS and non-zero after, reads the
  teacher's masks at the student's matched queries, and never needs a GT mask.
"""
import pytest
import torch
import torch.nn.functional as F

from mask2former_sim.modeling.criterion import BoxSupSetCriterion
from mask2former_sim.modeling.losses import (
    gather_neighbours,
    images_to_color_similarity,
    pairwise_edge_weights,
    projection_loss,
)
from mask2former_sim.modeling.losses.box_targets import boxes_to_grid_masks, downsample_valid
from mask2former_sim.modeling.matcher import HungarianMatcher
from mask2former_sim.sim.pseudo_labeler import SIMPseudoLabeler

from test_criterion import HM, K, STRIDE, WEIGHTS, make_info, make_outputs, make_targets, _NoMasksDict, _Poison

SIM_WEIGHTS = dict(WEIGHTS, loss_pseudo_bce=5.0, loss_pseudo_dice=5.0)


def dense_pairwise_loss(z, similarity, box, valid, thresh=0.1, k=3, d=2):
    """The pairwise loss as it was before the fused one: all neighbours gathered at once."""
    w = pairwise_edge_weights(similarity, box, valid, thresh, k, d).float()
    z = z[:, None]
    z_nb = gather_neighbours(z, k, d)[:, 0]
    sp = F.softplus(z)
    edge = sp + gather_neighbours(sp, k, d)[:, 0] - F.softplus(z + z_nb)
    return (edge * w).sum() / w.sum().clamp(min=1.0)


def reference_losses(outputs, targets, info, iteration, loss_stride, warmup=100):
    """The per-output criterion of before the three-step restructuring: match, then losses."""
    factor = STRIDE // loss_stride
    matcher = HungarianMatcher(stride=loss_stride)

    def up(m):
        if factor == 1:
            return m
        lead = m.shape[:-2]
        fine = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), scale_factor=factor, mode="bilinear", align_corners=False)
        return fine.reshape(*lead, *fine.shape[-2:])

    grid = (HM * factor, HM * factor)
    prepared = [
        {"labels": t["labels"], "boxes": t["boxes"], "box_masks": boxes_to_grid_masks(t["boxes"], grid, loss_stride)}
        for t in targets
    ]
    num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    similarity = images_to_color_similarity(info["images"], loss_stride, 3, 2, 2.0)
    valid = downsample_valid(info["valid"], loss_stride)
    ramp = min(iteration / warmup, 1.0)
    empty_weight = torch.ones(K + 1)
    empty_weight[-1] = 0.1
    levels = [(f"_{i}", a) for i, a in enumerate(outputs["aux_outputs"])] + [("", outputs)]
    losses, all_indices = {}, []
    for suffix, out in levels:
        with torch.no_grad():
            indices = matcher({"pred_logits": out["pred_logits"], "pred_masks": up(out["pred_masks"])}, prepared)
        all_indices.append(indices)
        b_idx = torch.cat([torch.full_like(s, b) for b, (s, _) in enumerate(indices)])
        q_idx = torch.cat([s for s, _ in indices])
        logits = out["pred_logits"].float()
        classes = torch.full(logits.shape[:2], K, dtype=torch.long)
        classes[b_idx, q_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(prepared, indices)])
        src = up(out["pred_masks"][b_idx, q_idx].float())
        box = torch.cat([t["box_masks"][j] for t, (_, j) in zip(prepared, indices)])
        losses["loss_ce" + suffix] = 2.0 * F.cross_entropy(logits.transpose(1, 2), classes, empty_weight)
        losses["loss_proj" + suffix] = (projection_loss(src.sigmoid(), box).sum() / num_masks) * 5.0
        losses["loss_pairwise" + suffix] = (
            1.0 * dense_pairwise_loss(src, similarity[b_idx], box, valid[b_idx]) * ramp
        )
    return losses, all_indices


def _grads(outputs):
    return [outputs["pred_logits"].grad, outputs["pred_masks"].grad] + [
        a[k].grad for a in outputs["aux_outputs"] for k in ("pred_logits", "pred_masks")
    ]


@pytest.mark.parametrize("loss_stride", [4, 2])
def test_box_losses_equal_the_per_output_path(loss_stride):
    info = make_info(3)
    out_new, out_ref = make_outputs(3, num_aux=4, seed=3), make_outputs(3, num_aux=4, seed=3)
    targets = make_targets(3, seed=3)
    crit = BoxSupSetCriterion(
        K, HungarianMatcher(stride=loss_stride), WEIGHTS, stride=STRIDE, loss_stride=loss_stride, pairwise_warmup_iters=100
    )
    losses, indices = crit(out_new, targets, info, iteration=37, return_indices=True)
    ref, ref_indices = reference_losses(out_ref, targets, info, 37, loss_stride)
    assert set(losses) == set(ref)
    for key in ref:
        torch.testing.assert_close(losses[key], ref[key], rtol=1e-6, atol=1e-7, msg=key)
    for mine, theirs in zip(indices, ref_indices):
        for (q1, g1), (q2, g2) in zip(mine, theirs):
            assert torch.equal(q1, q2) and torch.equal(g1, g2)
    sum(losses.values()).backward()
    sum(ref.values()).backward()
    for g_new, g_ref in zip(_grads(out_new), _grads(out_ref)):
        torch.testing.assert_close(g_new, g_ref, rtol=1e-5, atol=1e-8)


def test_match_holds_every_outputs_query_for_every_gt():
    crit = BoxSupSetCriterion(K, HungarianMatcher(stride=STRIDE), WEIGHTS, stride=STRIDE)
    outputs, targets, info = make_outputs(3, num_aux=3), make_targets(3), make_info(3)
    prepared = crit.prepare(outputs, targets, info, 10)
    levels = [o for _, o in crit.decoder_outputs(outputs)]
    match = crit.match(levels, prepared)
    counts = [len(t["labels"]) for t in targets]
    assert match.query_of_gt.shape == (4, sum(counts))
    assert prepared.batch_idx.tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    offsets = [sum(counts[:b]) for b in range(3)]
    for level, per_image in enumerate(match.indices):
        for b, (src, tgt) in enumerate(per_image):
            for q, g in zip(src.tolist(), tgt.tolist()):
                assert match.query_of_gt[level, offsets[b] + g].item() == q
        # the flat triples list the same pairs
        pairs = set(zip(match.batch_idx[level].tolist(), match.query_idx[level].tolist(), match.gt_idx[level].tolist()))
        assert pairs == {(b, q, offsets[b] + g) for b, (s, t) in enumerate(per_image) for q, g in zip(s.tolist(), t.tolist())}


def test_more_gts_than_queries_leaves_unmatched_gts_at_minus_one():
    crit = BoxSupSetCriterion(K, HungarianMatcher(stride=STRIDE), WEIGHTS, stride=STRIDE)
    outputs = make_outputs(1, queries=2, num_aux=1)
    boxes = torch.tensor([[0.0, 0, 10, 10], [12, 12, 30, 30], [2, 14, 12, 30]])
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": boxes}]
    prepared = crit.prepare(outputs, targets, make_info(1), 10)
    match = crit.match([o for _, o in crit.decoder_outputs(outputs)], prepared)
    assert (match.query_of_gt == -1).sum(dim=1).tolist() == [1, 1]
    assert sorted(q for q in match.query_of_gt[0].tolist() if q >= 0) == [0, 1]


def sim_criterion(warmup=5, **labeler_kw):
    labeler = SIMPseudoLabeler(K, feature_dim=8, num_prototypes=2, warmup_iters=warmup, proto_momentum=0.9, **labeler_kw)
    return BoxSupSetCriterion(
        K, HungarianMatcher(stride=STRIDE), SIM_WEIGHTS, stride=STRIDE, pairwise_warmup_iters=100,
        losses=("labels", "projection", "pairwise", "pseudo"), pseudo_labeler=labeler,
    )


def teacher_outputs_like(outputs, seed=7, feature_dim=8):
    g = torch.Generator().manual_seed(seed)

    def one(o):
        return {"pred_logits": torch.randn(o["pred_logits"].shape, generator=g),
                "pred_masks": torch.randn(o["pred_masks"].shape, generator=g) * 3}

    t = one(outputs)
    t["aux_outputs"] = [one(a) for a in outputs["aux_outputs"]]
    b = outputs["pred_logits"].shape[0]
    t["mask_features"] = torch.randn(b, feature_dim, HM, HM, generator=g)
    return t


def test_pseudo_loss_is_zero_before_the_warmup_and_active_after():
    crit = sim_criterion(warmup=5)
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    before = crit(outputs, targets, info, iteration=4, teacher_outputs=teacher)
    pseudo_keys = [k for k in before if "pseudo" in k]
    assert sorted(pseudo_keys) == sorted(f"loss_pseudo_{t}{s}" for t in ("bce", "dice") for s in ("", "_0", "_1"))
    assert all(before[k].item() == 0.0 for k in pseudo_keys)
    after = crit(outputs, targets, info, iteration=5, teacher_outputs=teacher)
    assert all(after[k].item() > 0.0 for k in pseudo_keys)
    for key in before:  # the other losses do not depend on the pseudo labels (pairwise: its ramp moved)
        if "pseudo" not in key and "pairwise" not in key:
            assert torch.equal(before[key], after[key]), key
    sum(after.values()).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0


def test_pseudo_loss_needs_the_teacher_and_never_reads_gt_masks():
    crit = sim_criterion(warmup=0)
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    with pytest.raises(ValueError, match="teacher"):
        crit(outputs, targets, info, iteration=3)
    teacher = teacher_outputs_like(outputs)
    ref = crit(outputs, targets, info, iteration=3, teacher_outputs=teacher)
    poisoned = [_NoMasksDict(t, masks=_Poison()) for t in targets]
    got = crit(outputs, poisoned, info, iteration=3, teacher_outputs=teacher)
    for key in ref:
        assert torch.isfinite(got[key]) and got[key].item() == pytest.approx(ref[key].item(), rel=1e-5, abs=1e-7), key


def test_pseudo_targets_come_from_the_teacher_masks_at_the_matched_queries():
    # beta = 1 (instance map only), gamma = 0 (plain mean over the L+1 positives)
    crit = sim_criterion(warmup=0, modulation=1.0, iou_gamma=0.0)
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    pseudo = crit.last_pseudo
    prepared = crit.prepare(outputs, targets, info, 0)
    match = crit.match([o for _, o in crit.decoder_outputs(outputs)], prepared)
    levels = [o for _, o in crit.decoder_outputs(teacher)]
    expected = torch.stack(
        [lvl["pred_masks"][prepared.batch_idx, match.query_of_gt[i]].sigmoid() for i, lvl in enumerate(levels)]
    ).mean(0)
    assert torch.allclose(pseudo.instance, expected, atol=1e-6)
    box = prepared.box_masks > 0
    assert torch.equal(pseudo.targets > 0, (expected > 0.7) & box)
    assert torch.equal(pseudo.weights > 0, ((expected > 0.7) | (expected < 0.3)) & box)


def test_prototypes_move_every_step_also_before_the_warmup():
    crit = sim_criterion(warmup=1000)
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    for lvl in [teacher] + teacher["aux_outputs"]:
        lvl["pred_masks"] = torch.full_like(lvl["pred_masks"], 6.0)  # confident everywhere: pixels in every box
    before = crit.pseudo_labeler.memory.prototypes.clone()
    crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    after = crit.pseudo_labeler.memory.prototypes
    assert not torch.equal(before, after)
    assert torch.allclose(after.norm(dim=-1), torch.ones(after.shape[:2]), atol=1e-5)
    present = sorted({int(c) for t in targets for c in t["labels"]})
    moved = (before - after).abs().amax(dim=(1, 2)) > 0
    assert [c for c in range(K) if moved[c]] == present


def test_centred_features_feed_the_semantic_maps_and_the_prototype_update():
    """MODEL.SIM.CENTER_FEATURES: S (Eq.1) and the Eq.2-5 update read the teacher features minus
    each image's mean over its valid cells; off, they read the plain normalised features."""
    from mask2former_sim.sim.prototypes import center_features, normalize_features, semantic_maps

    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    teacher["mask_features"] = teacher["mask_features"] + 4.0  # a component every pixel shares
    results = {}
    for centred in (False, True):
        crit = sim_criterion(warmup=0, center_features=centred)
        protos = crit.pseudo_labeler.memory.prototypes.clone()
        crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
        prepared = crit.prepare(outputs, targets, info, 0)
        feats = normalize_features(teacher["mask_features"])
        assert tuple(feats.shape[-2:]) == tuple(prepared.box_masks.shape[-2:])
        if centred:
            feats = center_features(feats, prepared.valid_grid)
        expected = semantic_maps(feats, protos, prepared.batch_idx, prepared.labels, temperature=1.0)
        torch.testing.assert_close(crit.last_pseudo.semantic, expected, rtol=0, atol=1e-6)
        results[centred] = (crit.last_pseudo.semantic, crit.pseudo_labeler.memory.prototypes.clone())
    assert not torch.allclose(results[False][0], results[True][0], atol=1e-3)
    assert not torch.allclose(results[False][1], results[True][1], atol=1e-4)


def test_background_prototypes_contrast_the_semantic_map_and_learn_from_outside_the_boxes():
    """MODEL.SIM.BACKGROUND_PROTOTYPES: the memory has a row C for the background; S_g is
    sigmoid((class cosine - background cosine) / tau_s); the background row is updated (Eq.2-5,
    one group per image) from the valid cells outside every GT box of the image, the class rows
    exactly as without it."""
    from mask2former_sim.sim.prototypes import PrototypeMemory, background_cells, normalize_features, semantic_scores

    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    plain = sim_criterion(warmup=0)
    crit = sim_criterion(warmup=0, background_prototypes=True, proto_temperature=0.5)
    memory = crit.pseudo_labeler.memory
    assert memory.prototypes.shape[0] == K + 1
    plain.pseudo_labeler.memory.prototypes.copy_(memory.prototypes[:K])
    before = memory.prototypes.clone()
    crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    plain(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    prepared = crit.prepare(outputs, targets, info, 0)
    feats = normalize_features(teacher["mask_features"])
    bi, labels = prepared.batch_idx, prepared.labels
    expected = torch.sigmoid(
        (semantic_scores(feats, before, bi, labels) - semantic_scores(feats, before, bi, torch.full_like(labels, K))) / 0.5
    )
    torch.testing.assert_close(crit.last_pseudo.semantic, expected, rtol=0, atol=1e-6)
    # class rows: as without background prototypes; background row: its own update
    torch.testing.assert_close(memory.prototypes[:K], plain.pseudo_labeler.memory.prototypes, rtol=0, atol=1e-6)
    cells = background_cells(prepared.box_masks, bi, 2, prepared.valid_grid)
    assert cells.any() and not cells.all()
    ref = PrototypeMemory(K + 1, 2, 8, momentum=0.9)
    ref.prototypes.copy_(before)
    ref.update(feats, cells, torch.arange(2), torch.full((2,), K), [1, 1])
    assert not torch.equal(before[K], memory.prototypes[K])
    torch.testing.assert_close(memory.prototypes[K], ref.prototypes[K], rtol=0, atol=1e-6)
    assert int(crit.last_pseudo.stats["bg_pixels"]) == int(cells.sum())


def test_background_cells_are_valid_cells_outside_every_box_of_their_image():
    from mask2former_sim.sim.prototypes import background_cells

    boxes = torch.zeros(3, 4, 5)
    boxes[0, :2, :2] = 1  # image 0
    boxes[1, 1:3, 3:] = 1  # image 0
    boxes[2, :, :] = 1  # image 2: the whole image
    valid = torch.ones(3, 4, 5, dtype=torch.bool)
    valid[0, :, 4] = False
    out = background_cells(boxes, torch.tensor([0, 0, 2]), 3, valid)
    expect0 = torch.ones(4, 5, dtype=torch.bool)
    expect0[:2, :2] = False
    expect0[1:3, 3:] = False
    expect0[:, 4] = False
    assert torch.equal(out[0], expect0)
    assert out[1].all()  # image 1 has no GT: all background
    assert not out[2].any()
    assert torch.equal(background_cells(boxes, torch.tensor([0, 0, 2]), 3)[1], torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        background_cells(boxes, torch.tensor([0, 0, 2]), 3, valid[:2])


def test_outside_box_negatives_weight_every_valid_cell_outside_the_box_as_background():
    """MODEL.SIM.OUTSIDE_BOX_NEGATIVES: Eq.8's targets and weights inside the box are unchanged; every
    valid cell outside the GT's box gets weight 1 and target 0; padding keeps weight 0; the loss changes."""
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    paper, crit = sim_criterion(warmup=0), sim_criterion(warmup=0, outside_box_negatives=True)
    lp = paper(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    lo = crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    p, ref = crit.last_pseudo, paper.last_pseudo
    prepared = crit.prepare(outputs, targets, info, 0)
    box = prepared.box_masks > 0
    valid = prepared.valid_grid[prepared.batch_idx]
    assert torch.equal(p.targets, ref.targets)
    assert torch.equal(p.weights[box], ref.weights[box])
    assert (~box & valid).any() and (~valid).any()
    assert torch.equal(p.weights[~box & valid], torch.ones(int((~box & valid).sum())))
    assert torch.equal(p.weights[~box & ~valid], torch.zeros(int((~box & ~valid).sum())))
    assert lo["loss_pseudo_bce"].item() != lp["loss_pseudo_bce"].item()
    assert lo["loss_ce"].item() == lp["loss_ce"].item()
    # the logged shares stay shares of the box's cells
    assert torch.equal(p.stats["pseudo_neg_fraction"], ref.stats["pseudo_neg_fraction"])


def test_balanced_outside_negatives_weigh_as_much_as_the_box_together():
    """MODEL.SIM.OUTSIDE_BOX_BALANCED: in the box nothing changes; the valid outside cells of a GT share
    one weight whose sum equals the GT's in-box weight sum; padding keeps weight 0; needs the negatives."""
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    plain = sim_criterion(warmup=0, outside_box_negatives=True)
    crit = sim_criterion(warmup=0, outside_box_negatives=True, outside_box_balanced=True)
    lp = plain(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    lb = crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    p, ref = crit.last_pseudo, plain.last_pseudo
    prepared = crit.prepare(outputs, targets, info, 0)
    box = prepared.box_masks > 0
    outside = ~box & prepared.valid_grid[prepared.batch_idx]
    assert torch.equal(p.targets, ref.targets)
    assert torch.equal(p.weights[box], ref.weights[box])
    assert not p.weights[~box & ~outside].any()
    weighted = 0
    for g in range(p.weights.shape[0]):
        w_out = p.weights[g][outside[g]]
        in_box_sum = p.weights[g][box[g]].sum()
        assert outside[g].any()
        assert torch.allclose(w_out, w_out[0].expand_as(w_out))
        torch.testing.assert_close(w_out.sum(), in_box_sum)  # a GT whose box is all ignored: 0 outside too
        weighted += int(in_box_sum > 0)
    assert weighted > 0
    assert lb["loss_pseudo_bce"].item() != lp["loss_pseudo_bce"].item()
    with pytest.raises(ValueError, match="OUTSIDE_BOX_NEGATIVES"):
        sim_criterion(warmup=0, outside_box_balanced=True)
