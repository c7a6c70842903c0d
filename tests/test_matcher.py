"""Hungarian matcher: constructed assignments, optimality vs brute force, empty images."""
import itertools

import mask2former_sim  # noqa: F401  (compat shim before detectron2)
import pytest
import torch

from mask2former_sim.modeling.losses import boxes_to_grid_masks
from mask2former_sim.modeling.matcher import HungarianMatcher

STRIDE = 4
HM = WM = 8  # padded input 32 x 32
BOXES = torch.tensor([[0.0, 0.0, 12.0, 12.0], [16.0, 0.0, 31.0, 8.0], [4.0, 18.0, 28.0, 31.0]])


def _query_logits_filling(boxes, extra_queries=2):
    """Mask logits +10 inside each box's grid cells, -10 outside, plus background-only queries."""
    grid = boxes_to_grid_masks(boxes, (HM, WM), STRIDE)
    masks = torch.cat([grid, torch.zeros(extra_queries, HM, WM)]) * 20.0 - 10.0
    return masks


def _pairs(indices):
    return sorted(zip(indices[0].tolist(), indices[1].tolist()))


def test_box_mode_obvious_assignment_with_permuted_gts():
    masks = _query_logits_filling(BOXES)  # query q fills box q; queries 3, 4 empty
    perm = [2, 0, 1]  # GT g is box perm[g]
    outputs = {"pred_logits": torch.zeros(1, 5, 4), "pred_masks": masks[None]}
    targets = [{"labels": torch.tensor([1, 0, 2]), "boxes": BOXES[perm]}]
    out = HungarianMatcher(mode="box", stride=STRIDE)(outputs, targets)
    assert len(out) == 1
    assert out[0][0].dtype == torch.int64 and out[0][1].dtype == torch.int64
    assert _pairs(out[0]) == [(0, 1), (1, 2), (2, 0)]


def test_box_mode_class_cost_breaks_ties():
    masks = _query_logits_filling(BOXES[:1], extra_queries=0).repeat(2, 1, 1)  # 2 identical masks
    logits = torch.zeros(1, 2, 3)
    logits[0, 1, 1] = 5.0  # query 1 is confident in class 1
    targets = [{"labels": torch.tensor([1]), "boxes": BOXES[:1]}]
    out = HungarianMatcher(stride=STRIDE)({"pred_logits": logits, "pred_masks": masks[None]}, targets)
    assert _pairs(out[0]) == [(1, 0)]


def _reference_cost(logits, masks, labels, box_masks, w_cls=2.0, w_proj=5.0, eps=1e-5):
    """Per-pair loops: -p(c) and the two 1-D Dice terms written out."""
    prob = logits.softmax(-1)
    probs = masks.sigmoid()
    cost = torch.zeros(masks.shape[0], len(labels))
    for q in range(masks.shape[0]):
        for g in range(len(labels)):
            total = 0.0
            for dim in (0, 1):
                a, b = probs[q].amax(dim=dim), box_masks[g].amax(dim=dim)
                total += 1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum() + eps)
            cost[q, g] = -w_cls * prob[q, labels[g]] + w_proj * total
    return cost


def _brute_force_min(cost):
    q, g = cost.shape
    best = float("inf")
    if q >= g:
        for rows in itertools.permutations(range(q), g):
            best = min(best, sum(cost[r, c].item() for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(g), q):
            best = min(best, sum(cost[r, c].item() for r, c in enumerate(cols)))
    return best


@pytest.mark.parametrize("seed,num_q,num_g", [(0, 5, 3), (1, 4, 3), (2, 5, 2), (3, 3, 3), (4, 2, 3), (5, 5, 1)])
def test_box_mode_agrees_with_brute_force(seed, num_q, num_g):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, num_q, 4, generator=g) * 2
    masks = torch.randn(1, num_q, HM, WM, generator=g) * 3
    xy0 = torch.rand(num_g, 2, generator=g) * 20
    wh = torch.rand(num_g, 2, generator=g) * 12 + 1
    boxes = torch.cat([xy0, xy0 + wh], dim=1)
    labels = torch.randint(0, 3, (num_g,), generator=g)
    out = HungarianMatcher(stride=STRIDE)({"pred_logits": logits, "pred_masks": masks}, [{"labels": labels, "boxes": boxes}])
    rows, cols = out[0]
    assert len(rows) == min(num_q, num_g)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    cost = _reference_cost(logits[0], masks[0], labels, boxes_to_grid_masks(boxes, (HM, WM), STRIDE))
    total = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
    assert total == pytest.approx(_brute_force_min(cost), abs=1e-4)


def test_zero_gt_images_and_batch():
    masks = _query_logits_filling(BOXES)
    outputs = {"pred_logits": torch.zeros(3, 5, 4), "pred_masks": masks[None].repeat(3, 1, 1, 1)}
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([0, 1]), "boxes": BOXES[[1, 0]]},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    out = HungarianMatcher(stride=STRIDE)(outputs, targets)
    assert [len(r) for r, _ in out] == [0, 2, 0]
    assert out[0][0].dtype == torch.int64 and out[0][1].dtype == torch.int64
    assert _pairs(out[1]) == [(0, 1), (1, 0)]


def test_precomputed_box_masks_take_precedence():
    masks = _query_logits_filling(BOXES)
    grid = boxes_to_grid_masks(BOXES, (HM, WM), STRIDE)
    # boxes say "box 0 then box 1", box_masks say "box 1 then box 0": box_masks must win
    targets = [{"labels": torch.tensor([0, 0]), "boxes": BOXES[[0, 1]], "box_masks": grid[[1, 0]]}]
    out = HungarianMatcher(stride=STRIDE)({"pred_logits": torch.zeros(1, 5, 2), "pred_masks": masks[None]}, targets)
    assert _pairs(out[0]) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="box_masks"):
        bad = [{"labels": torch.tensor([0, 0]), "box_masks": grid[:2, :4]}]
        HungarianMatcher(stride=STRIDE)({"pred_logits": torch.zeros(1, 5, 2), "pred_masks": masks[None]}, bad)


def test_mask_mode_obvious_assignment():
    full = torch.zeros(3, 32, 32, dtype=torch.bool)  # GT masks at input resolution
    full[0, 0:12, 0:12] = True
    full[1, 2:10, 16:31] = True
    full[2, 18:31, 4:28] = True
    grid = torch.nn.functional.interpolate(full[:, None].float(), size=(HM, WM), mode="area")[:, 0]
    pred = torch.cat([(grid - 0.5) * 20, torch.full((1, HM, WM), -10.0)])  # query q ~ GT q, query 3 empty
    perm = [1, 2, 0]
    targets = [{"labels": torch.tensor([0, 0, 0]), "masks": full[perm]}]
    matcher = HungarianMatcher(mode="mask", num_points=400, generator=torch.Generator().manual_seed(0))
    out = matcher({"pred_logits": torch.zeros(1, 4, 2), "pred_masks": pred[None]}, targets)
    assert _pairs(out[0]) == [(0, 2), (1, 0), (2, 1)]


def test_bad_inputs_raise():
    m = HungarianMatcher(stride=STRIDE)
    outputs = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": torch.zeros(1, 3, HM, WM)}
    with pytest.raises(ValueError, match="class ids outside"):
        m(outputs, [{"labels": torch.tensor([2]), "boxes": BOXES[:1]}])  # K = 2 classes
    with pytest.raises(ValueError, match="targets"):
        m(outputs, [])
    with pytest.raises(ValueError, match="mode"):
        HungarianMatcher(mode="points")
