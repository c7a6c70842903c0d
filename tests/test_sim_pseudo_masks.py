"""Pseudo masks (mask2former_sim/sim/pseudo_masks.py): Eq.6 weighting, Eq.7, Eq.8 and the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from mask2former_sim.sim.pseudo_masks import (
    adaptive_high_thresh,
    instance_maps,
    mask_boxes,
    paired_box_iou,
    positive_weights,
    pseudo_mask_loss,
    pseudo_targets,
    self_correct,
)


# ---------------------------------------------------------------------------- boxes
def test_mask_boxes_constructed():
    m = torch.zeros(4, 8, 8)
    m[1, 2, 5] = 0.9  # one cell: row 2, col 5
    m[2, 1:4, 2:7] = 0.8  # rows 1..3, cols 2..6
    m[2, 6, 0] = 0.5  # exactly the threshold: not foreground
    m[3] = 0.6  # the whole grid
    boxes = mask_boxes(m, stride=4)
    expected = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],
        [20.0, 8.0, 24.0, 12.0],
        [8.0, 4.0, 28.0, 16.0],
        [0.0, 0.0, 32.0, 32.0],
    ])
    assert boxes.dtype == torch.float32
    assert torch.equal(boxes, expected)
    assert torch.equal(mask_boxes(m, stride=1)[1], torch.tensor([5.0, 2.0, 6.0, 3.0]))
    # Leading dims are kept (L, Q, H, W) -> (L, Q, 4); a higher threshold drops the 0.6 / 0.8 masks.
    stacked = mask_boxes(torch.stack([m, m]), stride=4)
    assert stacked.shape == (2, 4, 4) and torch.equal(stacked[1], expected)
    assert torch.equal(mask_boxes(m, stride=4, thresh=0.85)[2:], torch.zeros(2, 4))


def test_paired_box_iou():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 0.0, 6.0, 4.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    iou = paired_box_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([1.0, 8.0 / 24.0, 0.0, 0.0]))
    assert paired_box_iou(a[None], b[None]).shape == (1, 4)


# ---------------------------------------------------------------------------- Eq.6
def _constructed_positives():
    """One GT with box cols/rows 2..5 on an 8x8 grid, and three teacher masks: the box itself
    (IoU 1), a shifted copy (IoU 9/23), and a blob in a corner, outside the box (IoU 0)."""
    h = w = 8
    box = torch.zeros(h, w)
    box[2:6, 2:6] = 1.0
    perfect = box * 0.9
    shifted = torch.zeros(h, w)
    shifted[3:7, 3:7] = 0.8
    corner = torch.zeros(h, w)
    corner[0, 0] = 0.7
    masks = torch.stack([perfect, shifted, corner])[None]  # (G=1, P=3, H, W)
    gt_box = torch.tensor([[8.0, 8.0, 24.0, 24.0]])  # stride 4
    ious = paired_box_iou(mask_boxes(masks, stride=4), gt_box[:, None, :].expand(1, 3, 4))
    return masks, ious


def test_iou_weighting_on_constructed_masks():
    masks, ious = _constructed_positives()
    torch.testing.assert_close(ious[0, 0], torch.tensor(1.0))
    torch.testing.assert_close(ious[0, 1], torch.tensor(9.0 / 23.0))
    assert ious[0, 2] == 0  # disjoint from the box
    # gamma = 0: the plain mean of the positives.
    w0 = positive_weights(ious, gamma=0)
    torch.testing.assert_close(w0, torch.full((1, 3), 1 / 3))
    torch.testing.assert_close(instance_maps(masks, w0), masks.mean(dim=1))
    # gamma = 5: the formula.
    w5 = positive_weights(ious, gamma=5)
    p = ious[0] ** 5
    torch.testing.assert_close(w5[0], p / p.sum())
    # Large gamma: the perfect positive dominates and the instance map is its mask.
    w40 = positive_weights(ious, gamma=40)
    assert w40[0, 0] > 0.999
    torch.testing.assert_close(instance_maps(masks, w40), masks[:, 0], rtol=0, atol=1e-3)
    assert w5[0, 0] < w40[0, 0]


def test_positive_weights_zero_ious_padding_and_underflow():
    ious = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # all zero -> uniform
        [0.5, 0.9, 0.7, 0.0],  # last is padding
        [1e-3, 2e-3, 0.0, 0.0],  # tiny IoUs at large gamma: (1e-3)^100 underflows in a naive pow
        [0.3, 0.2, 0.0, 0.0],  # no valid positive at all
    ])
    valid = torch.tensor([[True] * 4, [True, True, True, False], [True, True, True, False], [False] * 4])
    w = positive_weights(ious, gamma=5, valid=valid)
    torch.testing.assert_close(w[0], torch.full((4,), 0.25))
    assert w[1, 3] == 0
    p = ious[1, :3] ** 5
    torch.testing.assert_close(w[1, :3], p / p.sum())
    assert torch.equal(w[3], torch.zeros(4))
    w100 = positive_weights(ious, gamma=100, valid=valid)
    assert torch.isfinite(w100).all()
    torch.testing.assert_close(w100[2], torch.tensor([0.0, 1.0, 0.0, 0.0]), rtol=0, atol=1e-6)
    # rows with a valid positive sum to 1, padding gets 0 at gamma 0 too
    torch.testing.assert_close(w[:3].sum(dim=1), torch.ones(3))
    w_mean = positive_weights(ious, gamma=0, valid=valid)
    torch.testing.assert_close(w_mean[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    # zero-IoU valid positives get no weight once gamma > 0 (unless all are zero)
    assert w[2, 2] == 0
    with pytest.raises(ValueError):
        positive_weights(ious, gamma=-1)


# ---------------------------------------------------------------------------- Eq.7
def test_self_correct_extremes_and_midpoint():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 4, 5, generator=g)
    t = torch.rand(3, 4, 5, generator=g)
    assert torch.equal(self_correct(s, t, 0.0), s)
    assert torch.equal(self_correct(s, t, 1.0), t)
    torch.testing.assert_close(self_correct(s, t, 0.5), (s + t) / 2)
    torch.testing.assert_close(self_correct(s, t, 0.25), 0.75 * s + 0.25 * t)
    with pytest.raises(ValueError):
        self_correct(s, t, 1.5)


# ---------------------------------------------------------------------------- Eq.8 targets
def test_pseudo_targets_weights_and_box():
    r = torch.tensor([[[0.1, 0.5, 0.9, 0.9, 0.1, 0.3, 0.7]]])  # (G=1, 1, 7)
    box = torch.tensor([[[1, 1, 1, 0, 0, 1, 1]]], dtype=torch.bool)
    y, w = pseudo_targets(r, box, low=0.3, high=0.7)
    assert y.dtype == torch.float32 and w.dtype == torch.float32
    # in-box: 0.1 -> bg (w 1), 0.5 -> ambiguous (w 0), 0.9 -> fg (w 1), 0.3 / 0.7 on the thresholds -> w 0
    assert torch.equal(y, torch.tensor([[[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]]))
    assert torch.equal(w, torch.tensor([[[1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]]))


def test_pseudo_targets_per_gt_high_and_detached():
    r = torch.tensor([[[0.75, 0.2]], [[0.75, 0.2]]], requires_grad=True)
    box = torch.ones(2, 1, 2, requires_grad=True)
    y, w = pseudo_targets(r * 1.0, box * 1.0, low=0.3, high=torch.tensor([0.7, 0.8]))
    assert torch.equal(y, torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]))
    assert torch.equal(w, torch.tensor([[[1.0, 1.0]], [[0.0, 1.0]]]))
    assert not y.requires_grad and not w.requires_grad and y.grad_fn is None and w.grad_fn is None
    with pytest.raises(ValueError):
        pseudo_targets(r, box, low=0.8, high=0.7)


# ---------------------------------------------------------------------------- adaptive tau_h
def test_adaptive_high_thresh_matches_official_rank_rule():
    # 1 x 8 grids, G = 3; box = first 6 cells; n_g = #{T > 0.7 in the box}
    box = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]] * 3, dtype=torch.bool).reshape(3, 1, 8)
    inst = torch.tensor([
        [0.9, 0.8, 0.75, 0.2, 0.1, 0.0, 0.99, 0.99],  # n = 3 (outside-box 0.99s not counted)
        [0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # n = 1
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # n = 6: index 6 lands outside the box -> 0
    ]).reshape(3, 1, 8)
    comb = torch.tensor([
        [0.95, 0.74, 0.9, 0.76, 0.3, 0.1, 1.0, 1.0],  # sorted in box: .95 .9 .76 .74 ...; r[3] = 0.74
        [0.99, 0.95, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0],  # r[1] = 0.95 -> clamped to 0.8
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],  # r[6] = 0 (out-of-box cells are 0) -> 0.7
    ]).reshape(3, 1, 8)
    thr = adaptive_high_thresh(comb, box, 0.7, 0.8, instance=inst)
    torch.testing.assert_close(thr, torch.tensor([0.74, 0.8, 0.7]))
    # Unclamped, the threshold keeps exactly n_g in-box cells of R above it (no ties here).
    y, _ = pseudo_targets(comb[:1], box[:1], low=0.3, high=thr[:1])
    assert int(y.sum()) == 3
    with pytest.raises(ValueError, match="instance"):
        adaptive_high_thresh(comb, box)
    assert adaptive_high_thresh(comb[:0], box[:0], instance=inst[:0]).shape == (0,)


# ---------------------------------------------------------------------------- loss
def test_pseudo_mask_loss_hand_computed():
    z = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.0, 1.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    bce, dice = pseudo_mask_loss(z, y, w)
    assert bce.shape == (2,) and dice.shape == (2,)
    sig2 = 1 / (1 + math.exp(-2.0))
    exp_bce = (math.log(2.0) + math.log(1 + math.exp(2.0))) / 2.0
    exp_dice = 1 - 2 * 0.5 / (0.25 + sig2 ** 2 + 1.0 + 1e-5)
    torch.testing.assert_close(bce[0], torch.tensor(exp_bce))
    torch.testing.assert_close(dice[0], torch.tensor(exp_dice))
    assert bce[1] == 0 and dice[1] == 0  # zero-weight GT contributes nothing
    (bce.sum() + dice.sum()).backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[1], torch.zeros(3))  # ... and no gradient
    assert z.grad[0, 2] == 0  # an ignored cell gets no gradient
    assert z.grad[0, 0] < 0 < z.grad[0, 1]  # push the fg cell up and the bg cell down


def test_pseudo_mask_loss_bce_normalised_by_weight_sum_at_least_one():
    z = torch.zeros(1, 4)
    y = torch.ones(1, 4)
    bce, _ = pseudo_mask_loss(z, y, torch.tensor([[0.25, 0.25, 0.0, 0.0]]))
    torch.testing.assert_close(bce, torch.tensor([0.5 * math.log(2.0)]))  # sum W = 0.5 -> divided by 1
    bce, _ = pseudo_mask_loss(z, y, torch.ones(1, 4))
    torch.testing.assert_close(bce, torch.tensor([math.log(2.0)]))


def test_pseudo_mask_loss_stable_for_large_logits():
    z = torch.tensor([[100.0, -100.0, 100.0, -100.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    w = torch.ones(1, 4)
    bce, dice = pseudo_mask_loss(z, y, w)
    assert torch.isfinite(bce).all() and torch.isfinite(dice).all()
    torch.testing.assert_close(bce, torch.tensor([(100.0 + 100.0) / 4.0]))
    (bce + dice).sum().backward()
    assert torch.isfinite(z.grad).all()
    # matches the stable BCE of torch on the same inputs
    ref = F.binary_cross_entropy_with_logits(z.detach(), y, reduction="mean")
    torch.testing.assert_close(bce[0], ref)


def test_pseudo_mask_loss_shape_check_and_3d():
    z = torch.randn(2, 3, 4)
    y = (torch.rand(2, 3, 4) > 0.5).float()
    w = torch.ones(2, 3, 4)
    bce, dice = pseudo_mask_loss(z, y, w)
    torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(dim=(1, 2)))
    assert ((dice >= 0) & (dice <= 1)).all()
    with pytest.raises(ValueError):
        pseudo_mask_loss(z, y[:1], w)


def test_empty_inputs():
    e = torch.zeros(0, 4, 5)
    bce, dice = pseudo_mask_loss(e, e, e)
    assert bce.shape == (0,) and dice.shape == (0,)
    y, w = pseudo_targets(e, e.bool(), 0.3, 0.7)
    assert y.shape == (0, 4, 5) and w.shape == (0, 4, 5)
    assert mask_boxes(e, stride=4).shape == (0, 4)
    assert positive_weights(torch.zeros(0, 3), gamma=5).shape == (0, 3)
    assert instance_maps(torch.zeros(0, 3, 4, 5), torch.zeros(0, 3)).shape == (0, 4, 5)
