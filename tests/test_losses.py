"""Box targets, Lab colour, pairwise / projection / point-sampled losses on hand-made cases."""
import itertools
import math

import mask2former_sim  # noqa: F401  (compat shim before detectron2)
import pytest
import torch

from mask2former_sim.modeling.losses import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    boxes_to_grid_masks,
    dice_coefficient_loss,
    dice_loss,
    downsample_valid,
    image_color_similarity,
    images_to_color_similarity,
    neighbour_offsets,
    pairwise_loss,
    point_mask_losses,
    point_sample,
    projection_cost,
    projection_loss,
    rgb_to_lab,
    sample_uncertain_points,
    sigmoid_ce_loss,
)


# ----------------------------------------------------------------------------- box targets
def test_boxes_to_grid_masks_hand_grid():
    # stride 4 on a 16x16 input: the cells sample pixel centres 2.5, 6.5, 10.5, 14.5
    boxes = torch.tensor(
        [
            [2.5, 6.5, 10.5, 7.0],  # edges exactly on sample centres -> included
            [3.0, 3.0, 6.0, 6.0],  # 3x3 px box between centres (smaller than a cell) -> empty
            [6.0, 6.0, 7.0, 7.0],  # 1x1 px box around centre 6.5 -> one cell
            [2.6, 0.0, 16.0, 2.4],  # x0 just past centre 2.5, y1 just before it -> empty
            [2.6, 0.0, 16.0, 16.0],  # columns 1..3, all rows
        ]
    )
    got = boxes_to_grid_masks(boxes, (4, 4), stride=4)
    expected = torch.zeros(5, 4, 4)
    expected[0, 1, 0:3] = 1
    expected[2, 1, 1] = 1
    expected[4, :, 1:] = 1
    assert got.dtype == torch.float32 and got.shape == (5, 4, 4)
    assert torch.equal(got, expected)


def test_boxes_to_grid_masks_stride2_nonsquare_and_empty():
    # stride 2: centres 1.5, 3.5, 5.5; grid 2 rows x 3 cols (input 4 x 6)
    got = boxes_to_grid_masks(torch.tensor([[1.5, 0.0, 3.5, 1.5]]), (2, 3), stride=2)
    assert torch.equal(got, torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]))
    assert boxes_to_grid_masks(torch.zeros(0, 4), (2, 3), 2).shape == (0, 2, 3)
    with pytest.raises(ValueError, match="boxes"):
        boxes_to_grid_masks(torch.zeros(3, 5), (2, 3), 2)
    with pytest.raises(ValueError, match="stride"):
        boxes_to_grid_masks(torch.zeros(1, 4), (2, 3), 0)


def test_downsample_valid_samples_cell_centres():
    valid = torch.zeros(1, 8, 12, dtype=torch.bool)
    valid[0, :5, :6] = True  # real image 5 x 6 pixels, rest is padding
    got = downsample_valid(valid, 4)  # samples rows 2, 6 and cols 2, 6, 10
    assert torch.equal(got, torch.tensor([[[True, False, False], [False, False, False]]]))
    valid[0, :5, :7] = True  # now column 6 is real
    assert torch.equal(downsample_valid(valid, 4), torch.tensor([[[True, True, False], [False, False, False]]]))
    with pytest.raises(ValueError, match="multiple of stride"):
        downsample_valid(torch.ones(1, 9, 8, dtype=torch.bool), 4)


# ----------------------------------------------------------------------------- Lab
def _lab_reference(r, g, b):
    """Scalar CIE-Lab from the textbook formulas (independent of the torch code)."""

    def lin(c):
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    rl, gl, bl = lin(r), lin(g), lin(b)
    x = (0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl) / 0.95047
    y = (0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl) / 1.0
    z = (0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl) / 1.08883
    d = 6.0 / 29.0

    def f(t):
        return t ** (1.0 / 3.0) if t > d ** 3 else t / (3 * d * d) + 4.0 / 29.0

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def test_rgb_to_lab_reference_values():
    colours = [(255, 0, 0), (255, 255, 255), (0, 0, 0), (128, 128, 128), (0, 255, 0), (0, 0, 255), (3, 2, 1)]
    published = {  # well-known sRGB/D65 values
        (255, 0, 0): (53.24, 80.09, 67.20),
        (255, 255, 255): (100.0, 0.0, 0.0),
        (0, 0, 0): (0.0, 0.0, 0.0),
        (128, 128, 128): (53.59, 0.0, 0.0),
        (0, 255, 0): (87.73, -86.18, 83.18),
        (0, 0, 255): (32.30, 79.19, -107.86),
    }
    rgb = torch.tensor(colours, dtype=torch.float32).t().reshape(1, 3, 1, len(colours))
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape and lab.dtype == torch.float32
    for i, c in enumerate(colours):
        got = lab[0, :, 0, i].tolist()
        ref = _lab_reference(*c)
        assert got == pytest.approx(ref, abs=2e-3), c  # (3,2,1) exercises the linear branches
        if c in published:
            assert got == pytest.approx(published[c], abs=0.01), c


def test_rgb_to_lab_rejects_bad_shape():
    with pytest.raises(ValueError, match="rgb_to_lab"):
        rgb_to_lab(torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------- similarity
def test_neighbour_offsets_order():
    assert neighbour_offsets(3, 2) == [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]
    with pytest.raises(ValueError, match="kernel_size"):
        neighbour_offsets(2, 1)


def test_color_similarity_two_colours():
    a = torch.tensor([50.0, 0.0, 0.0])
    b = torch.tensor([50.0, 3.0, 4.0])  # ||a - b|| = 5
    lab = b.view(1, 3, 1, 1).repeat(1, 1, 5, 5)
    lab[:, :, :, :2] = a.view(1, 3, 1, 1)  # columns 0, 1 colour a; columns 2..4 colour b
    sim = image_color_similarity(lab, kernel_size=3, dilation=2, theta=2.0)
    assert sim.shape == (1, 8, 5, 5)
    s_ab = math.exp(-5.0 / 2.0)
    # u = (2, 2) (colour b): all 8 neighbours inside; left column (x=0) has colour a
    expected_centre = [s_ab, 1.0, 1.0, s_ab, 1.0, s_ab, 1.0, 1.0]
    assert sim[0, :, 2, 2].tolist() == pytest.approx(expected_centre, abs=1e-6)
    # u = (0, 0) (colour a): only (0,2) [b], (2,0) [a], (2,2) [b] are inside the map
    expected_corner = [0, 0, 0, 0, s_ab, 0, 1.0, s_ab]
    assert sim[0, :, 0, 0].tolist() == pytest.approx(expected_corner, abs=1e-6)
    # u = (4, 3) (colour b): neighbours at dy=+2 or dx=+2 are outside -> 0
    expected_edge = [s_ab, 1.0, 0.0, s_ab, 0.0, 0.0, 0.0, 0.0]
    assert sim[0, :, 4, 3].tolist() == pytest.approx(expected_edge, abs=1e-6)


def test_images_to_color_similarity_average_pools_before_lab():
    img = torch.full((1, 3, 8, 8), 127.5)
    img[0, :, 0:4, 0:2] = 0.0  # left half of the top-left 4x4 cell black, right half white
    img[0, :, 0:4, 2:4] = 255.0  # -> mean 127.5, same as the rest
    sim = images_to_color_similarity(img, stride=4, kernel_size=3, dilation=1, theta=2.0)
    assert sim.shape == (1, 8, 2, 2)
    # cell (0,0)'s neighbours inside the 2x2 grid: (0,1) -> idx 4, (1,0) -> idx 6, (1,1) -> idx 7
    assert sim[0, [4, 6, 7], 0, 0].tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="multiple of stride"):
        images_to_color_similarity(torch.zeros(1, 3, 6, 8), stride=4)


# ----------------------------------------------------------------------------- pairwise
def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _edge(zu, zv):
    mu, mv = _sig(zu), _sig(zv)
    return -math.log(mu * mv + (1 - mu) * (1 - mv))


def test_pairwise_loss_single_edge_exact():
    # 1 x 1 x 3 map, dilation 1: u = (0,0) in the box, its only in-map neighbour is (0,1)
    z = torch.tensor([[[2.0, -1.0, 5.0]]])
    sim = torch.ones(1, 8, 1, 3)
    box = torch.tensor([[[1.0, 0.0, 0.0]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    got = pairwise_loss(z, sim, box, valid, color_thresh=0.1, kernel_size=3, dilation=1)
    assert got.item() == pytest.approx(_edge(2.0, -1.0), rel=1e-6)
    z0 = torch.zeros(1, 1, 3)
    assert pairwise_loss(z0, sim, box, valid, 0.1, 3, 1).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_pairwise_loss_3x3_hand_example_with_padding_and_box():
    z = torch.tensor([[[0.5, -1.0, 2.0], [1.5, 0.0, -2.0], [3.0, -0.5, 1.0]]])
    box = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]])  # column 2 outside
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, 2, :] = False  # bottom row is padding
    offsets = neighbour_offsets(3, 1)
    sim = torch.ones(1, 8, 3, 3)
    sim[0, offsets.index((0, 1)), 0, 0] = 0.05  # edge (0,0)->(0,1): colours too different
    tau = 0.1

    num, den = 0.0, 0
    for i, j in itertools.product(range(3), range(3)):
        if box[0, i, j] == 0 or not valid[0, i, j]:
            continue
        for n, (dy, dx) in enumerate(offsets):
            y, x = i + dy, j + dx
            if not (0 <= y < 3 and 0 <= x < 3) or not valid[0, y, x] or sim[0, n, i, j] < tau:
                continue
            num += _edge(z[0, i, j].item(), z[0, y, x].item())
            den += 1
    # u in {(0,0),(0,1),(1,0),(1,1)} with 3-1, 5, 3, 5 valid in-map neighbours (the
    # dissimilar edge dropped; neighbours outside the box still count as v)
    assert den == 2 + 5 + 3 + 5
    got = pairwise_loss(z, sim, box, valid, tau, kernel_size=3, dilation=1)
    assert got.item() == pytest.approx(num / den, rel=1e-6)

    # padding contributes nothing, whatever its logits
    z2 = z.clone()
    z2[0, 2, :] = torch.tensor([-30.0, 40.0, 7.0])
    assert pairwise_loss(z2, sim, box, valid, tau, 3, 1).item() == pytest.approx(got.item(), rel=1e-6)
    # no box pixel -> no edge -> 0
    assert pairwise_loss(z, sim, torch.zeros_like(box), valid, tau, 3, 1).item() == 0.0


def test_pairwise_loss_default_dilation_and_stability():
    # dilation 2 on 1x3x3: u=(0,0) has neighbours (0,2), (2,0), (2,2) only
    z = torch.zeros(1, 3, 3)
    z[0, 0, 0] = 100.0
    z[0, 0, 2] = -100.0
    z[0, 2, 0] = -100.0
    z[0, 2, 2] = 100.0
    box = torch.zeros(1, 3, 3)
    box[0, 0, 0] = 1
    z.requires_grad_(True)
    loss = pairwise_loss(z, torch.ones(1, 8, 3, 3), box, torch.ones(1, 3, 3, dtype=torch.bool), 0.1)
    # two disagreeing edges: -log(2 e^-100) = 100 - log 2; one agreeing edge ~ 0
    assert loss.item() == pytest.approx((2 * (100 - math.log(2.0)) + 0.0) / 3, rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_pairwise_loss_empty_and_shape_errors():
    z = torch.zeros(0, 4, 4, requires_grad=True)
    loss = pairwise_loss(z, torch.zeros(0, 8, 4, 4), torch.zeros(0, 4, 4), torch.zeros(0, 4, 4, dtype=torch.bool), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="similarity"):
        pairwise_loss(torch.zeros(1, 4, 4), torch.zeros(1, 7, 4, 4), torch.zeros(1, 4, 4),
                      torch.ones(1, 4, 4, dtype=torch.bool), 0.1)


# ----------------------------------------------------------------------------- projection
def test_projection_loss_perfect_and_missing_column():
    box = boxes_to_grid_masks(torch.tensor([[0.0, 0.0, 11.0, 11.0]]), (4, 4), 4)  # rows/cols 0..2
    assert torch.equal(box[0, :3, :3], torch.ones(3, 3)) and box.sum() == 9
    eps = 1e-5
    assert projection_loss(box.clone(), box, eps).item() == pytest.approx(0.0, abs=1e-5)
    mask = box.clone()
    mask[0, :, 2] = 0  # one column missing
    # x-projection: mask [1,1,0,0] vs box [1,1,1,0]; y-projection identical ([1,1,1,0])
    expected = (1 - 2 * 2 / (2 + 3 + eps)) + (1 - 2 * 3 / (3 + 3 + eps))
    got = projection_loss(mask, box, eps)
    assert got.shape == (1,) and got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.2, abs=1e-4)


def test_projection_loss_soft_values():
    box = torch.zeros(1, 2, 3)
    box[0, 0, :2] = 1  # x-proj [1,1,0], y-proj [1,0]
    mask = torch.tensor([[[0.5, 0.2, 0.1], [0.9, 0.3, 0.0]]])
    # x-proj of mask: [0.9, 0.3, 0.1]; y-proj: [0.5, 0.9]
    eps = 1e-5
    dx = 1 - 2 * (0.9 + 0.3) / (0.81 + 0.09 + 0.01 + 2 + eps)
    dy = 1 - 2 * 0.5 / (0.25 + 0.81 + 1 + eps)
    assert projection_loss(mask, box, eps).item() == pytest.approx(dx + dy, rel=1e-6)


def test_dice_eps_behaviour():
    zeros = torch.zeros(1, 4)
    assert dice_coefficient_loss(zeros, zeros, 1e-5).item() == pytest.approx(1.0)  # no NaN on empty
    one = torch.ones(1, 1)
    assert dice_coefficient_loss(one, one, 1.0).item() == pytest.approx(1 - 2 / 3)
    assert dice_coefficient_loss(one, one, 0.0).item() == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice_coefficient_loss(torch.zeros(2), torch.zeros(3))


def test_projection_cost_matches_per_pair_loss():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 6, 7, generator=g)
    boxes = (torch.rand(3, 6, 7, generator=g) > 0.5).float()
    cost = projection_cost(probs, boxes)
    assert cost.shape == (5, 3)
    for q in range(5):
        for k in range(3):
            ref = projection_loss(probs[q:q + 1], boxes[k:k + 1])[0]
            assert cost[q, k].item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------- point losses
def test_point_sample_bilinear_on_normalised_coords():
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5]]])
    assert point_sample(feat, coords)[0, 0].tolist() == pytest.approx([1.0, 2.0, 3.0, 2.5])


def test_point_losses_hand_values():
    logits = torch.zeros(2, 3)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert sigmoid_ce_loss(logits, labels, num_masks=4.0).item() == pytest.approx(2 * math.log(2) / 4)
    # p = 0.5 everywhere: mask 0: 1 - (2*1 + 1)/(1.5 + 2 + 1); mask 1: 1 - 1/(1.5 + 1)
    expected = (1 - 3 / 4.5) + (1 - 1 / 2.5)
    assert dice_loss(logits, labels, num_masks=2.0).item() == pytest.approx(expected / 2)


def test_batch_point_costs_match_pairwise_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 20, generator=g)
    labels = (torch.rand(3, 20, generator=g) > 0.5).float()
    ce, dice = batch_sigmoid_ce_cost(logits, labels), batch_dice_cost(logits, labels)
    for q in range(4):
        for k in range(3):
            assert ce[q, k].item() == pytest.approx(sigmoid_ce_loss(logits[q:q + 1], labels[k:k + 1], 1).item(), rel=1e-5)
            assert dice[q, k].item() == pytest.approx(dice_loss(logits[q:q + 1], labels[k:k + 1], 1).item(), rel=1e-5)


def test_uncertain_points_prefer_the_decision_boundary():
    # logits grow linearly with x: |logit| is smallest near x = 0.5
    xs = torch.linspace(-8, 8, 32)
    logits = xs.view(1, 1, 1, 32).expand(1, 1, 16, 32).contiguous()
    g = torch.Generator().manual_seed(0)
    pts = sample_uncertain_points(logits, num_points=40, oversample_ratio=5.0, importance_sample_ratio=1.0, generator=g)
    assert pts.shape == (1, 40, 2)
    assert (pts[0, :, 0] - 0.5).abs().max().item() < 0.2  # 200 candidates, 40 closest to the boundary
    mixed = sample_uncertain_points(logits, 40, 3.0, 0.5, generator=g)
    assert mixed.shape == (1, 40, 2) and (mixed >= 0).all() and (mixed < 1).all()


def test_point_mask_losses_good_vs_bad_and_empty():
    gt = torch.zeros(2, 32, 32)
    gt[0, 4:20, 4:20] = 1
    gt[1, 10:30, 0:12] = 1
    good = (torch.nn.functional.interpolate(gt[:, None], size=(8, 8), mode="area")[:, 0] - 0.5) * 40
    g = torch.Generator().manual_seed(0)
    ce_good, dice_good = point_mask_losses(good, gt, 2.0, 256, 3.0, 0.75, g)
    ce_bad, dice_bad = point_mask_losses(-good, gt, 2.0, 256, 3.0, 0.75, g)
    assert ce_good < ce_bad and dice_good < dice_bad
    assert dice_bad.item() > 0.8
    empty = torch.zeros(0, 8, 8, requires_grad=True)
    ce0, dice0 = point_mask_losses(empty, torch.zeros(0, 32, 32), 1.0, 16, 3.0, 0.75)
    assert ce0.item() == 0.0 and dice0.item() == 0.0 and ce0.requires_grad
