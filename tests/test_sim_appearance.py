"""The per-image colour model (sim/appearance.py, MODEL.SIM.APPEARANCE; not in the paper):
colour bins, histograms of cell sets, A_g on a constructed image, the no-information cases, and
its wiring into Eq.7 through the pseudo labeler (off: the paper's maps unchanged)."""
import pytest
import torch

from mask2former_sim.sim.appearance import appearance_maps, colour_bins, colour_histograms
from mask2former_sim.sim.prototypes import background_cells
from mask2former_sim.sim.pseudo_masks import self_correct

from test_criterion import make_info, make_outputs, make_targets
from test_sim_criterion import sim_criterion, teacher_outputs_like

RED, BLUE, DARK_RED = (220.0, 30.0, 30.0), (30.0, 40.0, 200.0), (200.0, 20.0, 40.0)


def paint(h, w, colour):
    return torch.tensor(colour)[:, None, None].expand(3, h, w).clone()


def test_colour_bins_cut_each_channel_into_equal_intervals():
    img = torch.zeros(1, 3, 1, 4)
    img[0, :, 0, 0] = torch.tensor([0.0, 0.0, 0.0])
    img[0, :, 0, 1] = torch.tensor([255.0, 255.0, 255.0])
    img[0, :, 0, 2] = torch.tensor([63.9, 64.0, 128.0])  # levels 4: intervals of 64
    img[0, :, 0, 3] = torch.tensor([300.0, -5.0, 191.0])  # out of range: clamped
    bins = colour_bins(img, 4)
    assert bins.shape == (1, 4)
    assert bins.tolist() == [[0, 63, (0 * 4 + 1) * 4 + 2, (3 * 4 + 0) * 4 + 2]]
    for bad in (1, 257, 2.5):
        with pytest.raises(ValueError, match="levels"):
            colour_bins(img, bad)
    with pytest.raises(ValueError, match="RGB"):
        colour_bins(img[:, :2], 4)


def test_colour_histograms_count_sum_to_one_and_smooth_to_neighbouring_bins():
    bins = torch.tensor([[0, 0, 5, 7], [1, 1, 1, 2]])  # 2 images, 4 cells, levels 2 (8 bins)
    cells = torch.tensor([[True, True, True, False], [False, False, False, False], [True, False, True, True]])
    owner = torch.tensor([0, 0, 1])
    h = colour_histograms(bins, cells, owner, 2, smooth=False)
    assert h.shape == (3, 8)
    torch.testing.assert_close(h[0], torch.tensor([2, 0, 0, 0, 0, 1, 0, 0]) / 3.0)
    assert torch.equal(h[1], torch.zeros(8))  # empty set: all zeros, not NaN
    torch.testing.assert_close(h[2], torch.tensor([0, 2, 1, 0, 0, 0, 0, 0]) / 3.0)
    # weights instead of a set
    hw = colour_histograms(bins, torch.tensor([[0.5, 0.0, 1.5, 0.0]]), torch.tensor([0]), 2, smooth=False)
    torch.testing.assert_close(hw[0], torch.tensor([0.25, 0, 0, 0, 0, 0.75, 0, 0]))
    # smoothing: one occupied bin of a 4-level cube spreads to its 26 neighbours, sums to 1
    one = torch.tensor([[(1 * 4 + 1) * 4 + 1]])
    s = colour_histograms(one, torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), 4, smooth=True)[0].reshape(4, 4, 4)
    assert s.sum().item() == pytest.approx(1.0)
    assert (s[:3, :3, :3] > 0).all() and s[3].sum() == 0 and s[:, 3].sum() == 0 and s[:, :, 3].sum() == 0
    with pytest.raises(ValueError, match="owner"):
        colour_histograms(bins, cells, owner[:2], 2)


def test_appearance_map_separates_the_object_from_its_image_background_inside_the_box():
    """A blue star-like object in a box on a red background: the box's background cells (red, the
    'concavities') score low even though the teacher's confident cells include a few of them; cells
    of the object's colour score high; a colour seen nowhere scores 0.5."""
    h = w = 16
    img = paint(h, w, RED)
    img[:, 4:12, 6:10] = paint(8, 4, BLUE)  # the object: a bar inside the box
    img[:, 0, 0] = torch.tensor([0.0, 255.0, 0.0])  # a green cell outside the box: unseen by the object
    box = torch.zeros(1, h, w, dtype=torch.bool)
    box[0, 3:13, 3:13] = True
    confident = torch.zeros(1, h, w, dtype=torch.bool)
    confident[0, 4:12, 6:10] = True
    confident[0, 3, 3:6] = True  # contamination: 3 background cells of the box
    background = background_cells(box.float(), torch.tensor([0]), 1)
    a = appearance_maps(img[None], confident, background, torch.tensor([0]), levels=16)
    assert a.shape == (1, h, w)
    obj, box_bg = a[0, 4:12, 6:10], a[0][box[0] & (img[0] > 100)]  # red cells inside the box
    assert obj.min() > 0.95
    assert box_bg.max() < 0.1
    # a colour nowhere in the object's histogram and once in the background's: low, not high
    assert a[0, 0, 0] < 0.5
    # a dark red (next bin of red) is background-like thanks to the smoothing, 0.5 without it
    img2 = img.clone()
    img2[:, 12, 3:6] = torch.tensor(DARK_RED)[:, None]
    smooth = appearance_maps(img2[None], confident, background, torch.tensor([0]), levels=16, smooth=True)
    raw = appearance_maps(img2[None], confident, background, torch.tensor([0]), levels=16, smooth=False)
    assert smooth[0, 12, 3:6].max() < 0.1
    torch.testing.assert_close(raw[0, 12, 3:6], torch.full((3,), 0.5))


def test_appearance_map_is_uninformative_without_object_cells_or_background():
    h = w = 8
    imgs = torch.stack([paint(h, w, RED), paint(h, w, BLUE)])
    imgs[0, :, 2:6, 2:6] = paint(4, 4, BLUE)  # GT 0's object
    boxes = torch.zeros(3, h, w)
    boxes[0, 2:6, 2:6] = 1  # image 0
    boxes[1, 1:4, 1:4] = 1  # image 0, no confident cell
    boxes[2] = 1  # image 1: the box covers the whole image, no background cell
    batch_idx = torch.tensor([0, 0, 1])
    confident = boxes.bool().clone()
    confident[1] = False
    a = appearance_maps(imgs, confident, background_cells(boxes, batch_idx, 2), batch_idx, levels=8)
    assert not torch.allclose(a[0], torch.full((h, w), 0.5))
    torch.testing.assert_close(a[1], torch.full((h, w), 0.5))
    torch.testing.assert_close(a[2], torch.full((h, w), 0.5))
    # a batch (or a rank) without any GT: an empty map, no error
    none = appearance_maps(imgs, confident[:0], torch.ones(2, h, w, dtype=torch.bool), batch_idx[:0], levels=8)
    assert none.shape == (0, h, w)
    with pytest.raises(ValueError, match="do not match"):
        appearance_maps(imgs[:, :, :4], confident, background_cells(boxes, batch_idx, 2), batch_idx)


def test_labeler_mixes_the_appearance_map_into_eq7_and_weight_zero_is_the_paper():
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    teacher = teacher_outputs_like(outputs)
    paper = sim_criterion(warmup=0)
    paper(outputs, targets, info, iteration=0, teacher_outputs=teacher)
    assert paper.last_pseudo.appearance is None
    assert paper.prepare(outputs, targets, info, 0).grid_images is None  # nothing pooled when off
    for alpha in (1.0, 0.4):
        crit = sim_criterion(warmup=0, appearance_weight=alpha, appearance_levels=8)  # same seeded prototypes
        crit(outputs, targets, info, iteration=0, teacher_outputs=teacher)
        p, ref = crit.last_pseudo, paper.last_pseudo
        torch.testing.assert_close(p.semantic, ref.semantic)  # Eq.1 untouched
        torch.testing.assert_close(p.instance, ref.instance)
        prepared = crit.prepare(outputs, targets, info, 0)
        in_box = (prepared.box_masks > 0) & prepared.valid_grid[prepared.batch_idx]
        expected_a = appearance_maps(
            prepared.grid_images, (p.instance > 0.7) & in_box,
            background_cells(prepared.box_masks, prepared.batch_idx, 2, prepared.valid_grid),
            prepared.batch_idx, levels=8,
        )
        torch.testing.assert_close(p.appearance, expected_a)
        mixed = (1 - alpha) * p.semantic + alpha * p.appearance
        torch.testing.assert_close(p.combined, self_correct(mixed, p.instance, 0.5))
        assert prepared.grid_images.shape == (2, 3, *prepared.grid_hw)
        torch.testing.assert_close(prepared.grid_images, torch.nn.functional.avg_pool2d(info["images"], 4))
    crit = sim_criterion(warmup=0, appearance_weight=1.0)
    grid_hw = crit.prepare(outputs, targets, info, 0).grid_hw
    for bad_info in ({"valid": info["valid"]}, {"images": info["images"][:, :, :8]}, None):
        with pytest.raises(ValueError, match="MODEL.SIM.APPEARANCE needs image_info"):
            crit._grid_images(bad_info, 2, grid_hw, "cpu")
    for bad in ({"appearance_weight": 1.5}, {"appearance_weight": -0.1}, {"appearance_levels": 1}):
        with pytest.raises(ValueError, match="MODEL.SIM.APPEARANCE"):
            sim_criterion(**bad)
