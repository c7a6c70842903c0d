"""BoxSupSetCriterion: keys, hand values, zero-GT safety, warm-up ramp, no mask reads."""
import math
import subprocess
import sys
import textwrap

import mask2former_sim  # noqa: F401  (compat shim before detectron2)
import pytest
import torch
import torch.nn.functional as F

from mask2former_sim.modeling.criterion import BoxSupSetCriterion
from mask2former_sim.modeling.losses import boxes_to_grid_masks, projection_loss
from mask2former_sim.modeling.matcher import HungarianMatcher

K = 3  # classes
HM = WM = 8  # mask grid; padded input 32 x 32
STRIDE = 4
WEIGHTS = {"loss_ce": 2.0, "loss_proj": 5.0, "loss_pairwise": 1.0, "loss_mask": 5.0, "loss_dice": 5.0}


def box_criterion(**kw):
    kw.setdefault("pairwise_warmup_iters", 100)
    return BoxSupSetCriterion(K, HungarianMatcher(stride=STRIDE), WEIGHTS, stride=STRIDE, **kw)


def make_outputs(batch, queries=5, num_aux=9, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {
            "pred_logits": torch.randn(batch, queries, K + 1, generator=g).requires_grad_(),
            "pred_masks": (torch.randn(batch, queries, HM, WM, generator=g) * 2).requires_grad_(),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(num_aux)]
    return out


def make_targets(batch, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    targets = []
    for b in range(batch):
        n = b % 3 + 1
        xy0 = torch.rand(n, 2, generator=g) * 16
        boxes = torch.cat([xy0, xy0 + 4 + torch.rand(n, 2, generator=g) * 12], dim=1)
        targets.append({"labels": torch.randint(0, K, (n,), generator=g), "boxes": boxes})
    return targets


def make_info(batch, seed=0):
    g = torch.Generator().manual_seed(seed + 200)
    images = torch.rand(batch, 3, HM * STRIDE, WM * STRIDE, generator=g) * 255
    valid = torch.ones(batch, HM * STRIDE, WM * STRIDE, dtype=torch.bool)
    valid[:, :, 28:] = False
    return {"images": images, "valid": valid}


def test_deep_supervision_keys_and_indices_order():
    crit = box_criterion()
    outputs = make_outputs(2)
    # make aux_0 match differently from the final output: swap its queries 0 and 1
    outputs["aux_outputs"][0]["pred_masks"] = outputs["pred_masks"].detach()[:, [1, 0, 2, 3, 4]].clone()
    outputs["aux_outputs"][0]["pred_logits"] = outputs["pred_logits"].detach()[:, [1, 0, 2, 3, 4]].clone()
    targets = make_targets(2)
    losses, indices = crit(outputs, targets, make_info(2), iteration=100, return_indices=True)
    base = {"loss_ce", "loss_proj", "loss_pairwise"}
    assert set(losses) == base | {f"{k}_{i}" for k in base for i in range(9)}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert len(indices) == 10 and all(len(per_out) == 2 for per_out in indices)
    swap = {0: 1, 1: 0, 2: 2, 3: 3, 4: 4}
    for b in range(2):
        final = sorted(zip(indices[-1][b][0].tolist(), indices[-1][b][1].tolist()))
        aux0 = sorted(zip(indices[0][b][0].tolist(), indices[0][b][1].tolist()))
        assert aux0 == sorted((swap[q], g) for q, g in final)
    plain = crit(outputs, targets, make_info(2), iteration=100)
    assert set(plain) == set(losses)


def test_no_aux_and_deep_supervision_off():
    outputs = make_outputs(1, num_aux=0)
    assert set(box_criterion()(outputs, make_targets(1), make_info(1), 5)) == {"loss_ce", "loss_proj", "loss_pairwise"}
    outputs = make_outputs(1, num_aux=3)
    losses, idx = box_criterion(deep_supervision=False)(outputs, make_targets(1), make_info(1), 5, return_indices=True)
    assert set(losses) == {"loss_ce", "loss_proj", "loss_pairwise"} and len(idx) == 1


def test_hand_values_ce_projection_and_num_masks():
    box = torch.tensor([[0.0, 0.0, 11.0, 11.0]])
    grid = boxes_to_grid_masks(box, (HM, WM), STRIDE)[0]
    masks = torch.full((2, 2, HM, WM), -6.0)
    masks[0, 0] = grid * 8 - 4  # image 0, query 0 fills the box (softly); query 1 is empty
    masks[1, 1] = grid * 8 - 4  # image 1, query 1 fills the box
    masks[1, 0, 5:, 5:] = 4.0  # image 1, query 0 fills another region
    logits = torch.tensor([[[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 0.0]]])
    box2 = torch.tensor([[20.0, 20.0, 31.0, 31.0]])
    targets = [
        {"labels": torch.tensor([1]), "boxes": box},
        {"labels": torch.tensor([2, 0]), "boxes": torch.cat([box, box2])},
    ]
    outputs = {"pred_logits": logits, "pred_masks": masks}
    losses, idx = box_criterion()(outputs, targets, make_info(2), 0, return_indices=True)
    assert [sorted(zip(r.tolist(), c.tolist())) for r, c in idx[-1]] == [[(0, 0)], [(0, 1), (1, 0)]]

    # CE: targets [1, no-object] / [0, 2]; weights 1 for classes, 0.1 for no-object
    lsm = logits.log_softmax(-1)
    terms = [(-lsm[0, 0, 1], 1.0), (-lsm[0, 1, 3], 0.1), (-lsm[1, 0, 0], 1.0), (-lsm[1, 1, 2], 1.0)]
    ce = sum(t * w for t, w in terms) / sum(w for _, w in terms)
    assert losses["loss_ce"].item() == pytest.approx(2.0 * ce.item(), rel=1e-5)

    # projection: sum over the 3 matched pairs / num_masks (= 3 GTs), weight 5
    grid2 = boxes_to_grid_masks(box2, (HM, WM), STRIDE)[0]
    src = torch.stack([masks[0, 0], masks[1, 0], masks[1, 1]]).sigmoid()
    tgt = torch.stack([grid, grid2, grid])
    expected = 5.0 * projection_loss(src, tgt).sum().item() / 3
    assert losses["loss_proj"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["loss_pairwise"].item() == 0.0  # iteration 0: ramp 0


def _uniform_case(batch=1):
    """Uniform grey image + zero logits: every counted edge costs exactly log 2."""
    outputs = {"pred_logits": torch.zeros(batch, 3, K + 1), "pred_masks": torch.zeros(batch, 3, HM, WM)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])} for _ in range(batch)]
    info = {"images": torch.full((batch, 3, 32, 32), 90.0), "valid": torch.ones(batch, 32, 32, dtype=torch.bool)}
    return outputs, targets, info


def test_pairwise_ramp_and_value():
    crit = box_criterion(pairwise_warmup_iters=100)
    outputs, targets, info = _uniform_case()
    at = {it: crit(outputs, targets, info, it)["loss_pairwise"].item() for it in (0, 50, 100, 1000)}
    assert at[0] == 0.0
    assert at[100] == pytest.approx(math.log(2.0), rel=1e-6)
    assert at[50] == pytest.approx(0.5 * at[100], rel=1e-6)
    assert at[1000] == pytest.approx(at[100], rel=1e-6)
    no_warmup = box_criterion(pairwise_warmup_iters=0)
    assert no_warmup(outputs, targets, info, 0)["loss_pairwise"].item() == pytest.approx(math.log(2.0), rel=1e-6)
    # valid() = False everywhere: no edge survives
    info["valid"][:] = False
    assert crit(outputs, targets, info, 100)["loss_pairwise"].item() == 0.0


@pytest.mark.parametrize("loss_stride", [STRIDE, 2])
def test_zero_gt_batch_is_finite_and_backpropagates(loss_stride):
    crit = box_criterion(loss_stride=loss_stride)
    outputs = make_outputs(2)
    targets = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = crit(outputs, targets, make_info(2), 500)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_proj"].item() == 0.0 and losses["loss_pairwise"].item() == 0.0
    assert losses["loss_ce"].item() > 0
    sum(losses.values()).backward()
    grad = outputs["pred_logits"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


class _Poison:
    def __getattr__(self, name):
        raise AssertionError(f"box mode touched targets['masks'].{name}")

    def __getitem__(self, item):
        raise AssertionError("box mode indexed targets['masks']")

    def __len__(self):
        raise AssertionError("box mode took len(targets['masks'])")


class _NoMasksDict(dict):
    def __getitem__(self, key):
        if key == "masks":
            raise AssertionError("box mode read targets['masks']")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "masks":
            raise AssertionError("box mode read targets['masks']")
        return super().get(key, default)

    def items(self):
        raise AssertionError("box mode iterated over the target dict")

    def values(self):
        raise AssertionError("box mode iterated over the target dict")


def test_box_mode_never_reads_masks():
    crit = box_criterion()
    outputs = make_outputs(2)
    targets = make_targets(2)
    ref = crit(outputs, targets, make_info(2), 60)
    poisoned = [_NoMasksDict(t, masks=_Poison()) for t in targets]
    got = crit(outputs, poisoned, make_info(2), 60)
    nan_masks = [dict(t, masks=torch.full((len(t["labels"]), 32, 32), float("nan"))) for t in targets]
    got_nan = crit(outputs, nan_masks, make_info(2), 60)
    for key, value in ref.items():
        assert got[key].item() == pytest.approx(value.item(), rel=1e-6)
        assert got_nan[key].item() == pytest.approx(value.item(), rel=1e-6)


def test_duplicating_the_batch_keeps_losses():
    crit = box_criterion()
    outputs, targets, info = make_outputs(2, num_aux=2), make_targets(2), make_info(2)
    ref = crit(outputs, targets, info, 70)

    def dup(x):
        return torch.cat([x.detach(), x.detach()])

    doubled = {"pred_logits": dup(outputs["pred_logits"]), "pred_masks": dup(outputs["pred_masks"]),
               "aux_outputs": [{k: dup(v) for k, v in a.items()} for a in outputs["aux_outputs"]]}
    got = crit(doubled, targets + targets, {k: dup(v) for k, v in info.items()}, 70)
    for key, value in ref.items():
        assert got[key].item() == pytest.approx(value.item(), rel=1e-5), key


def _full_case():
    full = torch.zeros(1, 2, 32, 32, dtype=torch.bool)
    full[0, 0, 4:16, 4:16] = True  # aligned to the 4x4 cells
    full[0, 1, 16:28, 8:28] = True
    grid = F.interpolate(full[0, :, None].float(), size=(HM, WM), mode="area")[:, 0]
    good = torch.cat([(grid - 0.5) * 30, torch.full((1, HM, WM), -15.0)])[None]  # q0 ~ GT0, q1 ~ GT1
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[2.0, 2, 14, 14], [10.0, 16, 30, 30]]), "masks": full[0]}]
    return good, targets


def test_full_mode_uses_masks():
    def crit():
        matcher = HungarianMatcher(mode="mask", num_points=256, generator=torch.Generator().manual_seed(0))
        return BoxSupSetCriterion(K, matcher, WEIGHTS, losses=("labels", "masks"), stride=STRIDE,
                                  num_points=256, oversample_ratio=3.0, importance_sample_ratio=0.75)

    good, targets = _full_case()
    logits = torch.zeros(1, 3, K + 1)
    outputs = {"pred_logits": logits, "pred_masks": good.clone().requires_grad_(),
               "aux_outputs": [{"pred_logits": logits, "pred_masks": good.clone()}]}
    losses, idx = crit()(outputs, targets, None, 0, return_indices=True)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert sorted(zip(idx[-1][0][0].tolist(), idx[-1][0][1].tolist())) == [(0, 0), (1, 1)]
    # the same predictions against swapped GT masks: mask losses grow a lot
    swapped = [dict(targets[0], masks=targets[0]["masks"][[1, 0]], labels=torch.tensor([0, 0]))]
    swapped[0]["masks"][:] = ~swapped[0]["masks"]  # complement: nothing matches well
    bad = crit()(outputs, swapped, None, 0)
    # (importance sampling puts 3/4 of the points on the boundary band, where even the
    # good prediction is uncertain, so the good losses are not near 0)
    assert bad["loss_mask"] > 10 * losses["loss_mask"] and bad["loss_dice"] > 3 * losses["loss_dice"]
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0
    with pytest.raises(KeyError, match="masks"):
        crit()(outputs, [{"labels": targets[0]["labels"], "boxes": targets[0]["boxes"]}], None, 0)


def test_bad_inputs_raise():
    crit = box_criterion()
    outputs = make_outputs(1, num_aux=0)
    with pytest.raises(ValueError, match="images"):
        crit(outputs, make_targets(1), {"images": torch.zeros(1, 3, 30, 32), "valid": torch.ones(1, 30, 32, dtype=torch.bool)}, 0)
    with pytest.raises(ValueError, match="image_info"):
        crit(outputs, make_targets(1), None, 0)
    with pytest.raises(ValueError, match="pred_logits"):
        crit({"pred_logits": torch.zeros(1, 5, K + 2), "pred_masks": torch.zeros(1, 5, HM, WM)}, make_targets(1), make_info(1), 0)
    with pytest.raises(ValueError, match="weight_dict"):
        BoxSupSetCriterion(K, HungarianMatcher(), {"loss_ce": 1.0})
    # a class id out of range names the image, whichever image of the batch holds it
    for bad in (K, -1):
        targets = make_targets(3)
        targets[2]["labels"][0] = bad
        with pytest.raises(ValueError, match=r"targets\[2\]\['labels'\] has class ids outside"):
            crit(make_outputs(3, num_aux=0), targets, make_info(3), 0)


def test_from_config_modes():
    from mask2former_sim.config import get_default_cfg

    cfg = get_default_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    crit = BoxSupSetCriterion.from_config(cfg)
    assert crit.losses == ("labels", "projection", "pairwise") and crit.matcher.mode == "box"
    assert crit.num_classes == 7 and crit.empty_weight[-1].item() == pytest.approx(0.1)
    assert crit.weight_dict["loss_proj"] == 5.0 and crit.weight_dict["loss_ce"] == 2.0
    assert crit.pairwise_color_thresh == pytest.approx(0.1) and crit.pairwise_warmup_iters == 10000
    cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION = True
    full = BoxSupSetCriterion.from_config(cfg)
    assert full.losses == ("labels", "masks") and full.matcher.mode == "mask"
    assert full.matcher.num_points == 112 * 112


_DIST_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    import mask2former_sim
    from mask2former_sim.modeling.criterion import BoxSupSetCriterion

    def run(rank, port, out):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        n = 3 if rank == 0 else 0
        targets = [{"labels": torch.zeros(n, dtype=torch.long)}]
        value = BoxSupSetCriterion._num_masks(targets, torch.device("cpu"))
        open(f"{out}.{rank}", "w").write(repr(value))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2, start_method="fork")
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses the fork start method")
def test_num_masks_all_reduced_across_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "dist_num_masks.py"
    script.write_text(_DIST_SCRIPT)
    out = tmp_path / "num_masks"
    proc = subprocess.run([sys.executable, str(script), str(port), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # (3 + 0) / world size 2 on both ranks; a rank with no GT still joins the all-reduce
    assert [float((tmp_path / f"num_masks.{r}").read_text()) for r in (0, 1)] == [1.5, 1.5]


# ---------------------------------------------------------------- LOSS_STRIDE (finer loss grid)
def _outline_scene():
    """A 48 px image: a flat square object on a flat background whose edges cut stride-4 cells.

    Returns the image info, the target and two stride-4 logit maps: the hollow outline (the
    cells the object only partly covers) and the filled object.
    """
    size = 48
    obj = torch.zeros(size, size)
    obj[10:38, 10:38] = 1.0
    background = torch.tensor([40.0, 160.0, 60.0]).view(1, 3, 1, 1)
    colour = torch.tensor([200.0, 40.0, 200.0]).view(1, 3, 1, 1)
    images = background * (1 - obj) + colour * obj
    info = {"images": images, "valid": torch.ones(1, size, size, dtype=torch.bool)}
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[10.0, 10.0, 38.0, 38.0]])}]
    frac = F.avg_pool2d(obj[None, None], STRIDE)[0, 0]
    outline = torch.where((frac > 0) & (frac < 1), 6.0, -6.0)
    filled = torch.where(frac > 0, 6.0, -6.0)
    return info, target, outline, filled


def _single_query_outputs(mask_logits):
    logits = torch.tensor([[[5.0, -5.0, -5.0, -5.0]]])
    return {"pred_logits": logits, "pred_masks": mask_logits[None, None].clone()}


def _box_losses(loss_stride, mask_logits, info, target):
    crit = BoxSupSetCriterion(
        K, HungarianMatcher(stride=loss_stride), WEIGHTS, stride=STRIDE, loss_stride=loss_stride,
        pairwise_warmup_iters=0, deep_supervision=False,
    )
    losses = crit(_single_query_outputs(mask_logits), target, info, iteration=0)
    return float(losses["loss_proj"]), float(losses["loss_pairwise"])


def test_stride4_box_losses_cannot_tell_an_outline_from_the_filled_object():
    info, target, outline, filled = _outline_scene()
    assert _box_losses(STRIDE, outline, info, target) == pytest.approx(
        _box_losses(STRIDE, filled, info, target), rel=1e-3, abs=1e-5
    )


@pytest.mark.parametrize("loss_stride", [2, 1])
def test_finer_loss_grid_penalises_the_hollow_outline(loss_stride):
    info, target, outline, filled = _outline_scene()
    proj_o, pair_o = _box_losses(loss_stride, outline, info, target)
    proj_f, pair_f = _box_losses(loss_stride, filled, info, target)
    assert pair_f < 0.01 and pair_o > 0.3 and pair_o > 30 * pair_f
    assert proj_f <= proj_o + 1e-6


def test_loss_stride_upsamples_every_output_before_matching_and_losses():
    crit = box_criterion(loss_stride=1)
    outputs = make_outputs(2, num_aux=2)
    targets = make_targets(2)
    info = make_info(2)
    losses, indices = crit(outputs, targets, info, iteration=100, return_indices=True)

    # the same losses by hand: upsample, then a stride-1 criterion on the upsampled maps
    def up(out):
        masks = F.interpolate(out["pred_masks"], scale_factor=STRIDE, mode="bilinear", align_corners=False)
        return {"pred_logits": out["pred_logits"], "pred_masks": masks}

    fine = up(outputs)
    fine["aux_outputs"] = [up(a) for a in outputs["aux_outputs"]]
    ref = BoxSupSetCriterion(K, HungarianMatcher(stride=1), WEIGHTS, stride=1, pairwise_warmup_iters=100)
    ref_losses, ref_indices = ref(fine, targets, info, iteration=100, return_indices=True)
    assert set(losses) == set(ref_losses)
    for key in losses:
        assert torch.allclose(losses[key], ref_losses[key], atol=1e-6), key
    for mine, theirs in zip(indices, ref_indices):
        for (q1, g1), (q2, g2) in zip(mine, theirs):
            assert q1.tolist() == q2.tolist() and g1.tolist() == g2.tolist()
    sum(losses.values()).backward()
    assert outputs["pred_masks"].grad is not None and outputs["pred_masks"].grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [3, 0, 8])
def test_loss_stride_must_divide_the_mask_stride(bad):
    with pytest.raises(ValueError, match="LOSS_STRIDE"):
        box_criterion(loss_stride=bad)
