"""SIM's online copy-paste (METHOD.md §3): bank, Eq.11, sampling, occlusion bookkeeping, the
paste loss (Eq.9) in the criterion, and copy-paste inside SIM training (no GT mask read, the
bank fills and pastes, resume across a paste is exact)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.engine import HookBase
from detectron2.modeling import build_model

from mask2former_sim.engine.setup import build_cfg
from mask2former_sim.engine.sim_hooks import BANK_KEY
from mask2former_sim.modeling.criterion import BoxSupSetCriterion
from mask2former_sim.modeling.matcher import HungarianMatcher
from mask2former_sim.sim.copy_paste import (
    CopyPaste,
    MemoryBank,
    entry_canvas,
    make_entry,
    occlusion_update,
    pack_bits,
    paste_masks_and_scores,
    unpack_bits,
)
from mask2former_sim.sim.pseudo_labeler import SIMPseudoLabeler

from test_criterion import HM, K, STRIDE, make_info, make_outputs
from test_sim_criterion import SIM_WEIGHTS, teacher_outputs_like
from test_train_e2e import ROOT, LossRecorder, StopAfter, tiny_opts, train
from test_sim_training import _load, _poisoned_batch

SIM_CP = os.path.join(ROOT, "configs/synthetic/sim_cp_R18_synth.yaml")
CP_WEIGHTS = dict(SIM_WEIGHTS, loss_paste_ce=5.0, loss_paste_dice=5.0)


def _entry(scores, box_size=6, canvas=32):
    """A bank entry of len(scores) square instances side by side, all pixels masked."""
    n = len(scores)
    boxes = [[i * box_size, 0, (i + 1) * box_size, box_size] for i in range(n)]
    masks = [torch.ones(box_size * box_size, dtype=torch.bool) for _ in range(n)]
    return {
        "boxes": torch.tensor(boxes, dtype=torch.int32),
        "classes": torch.arange(n),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "masks": torch.cat([pack_bits(m) for m in masks]),
        "mask_sizes": torch.tensor([pack_bits(m).numel() for m in masks]),
        "pixels": torch.full((3, n * box_size * box_size), 200, dtype=torch.uint8),
        "pixel_counts": torch.full((n,), box_size * box_size),
        "canvas": torch.tensor([canvas, canvas], dtype=torch.int32),
    }


# --------------------------------------------------------------------------------- bank, Eq.11
def test_pack_bits_round_trip():
    g = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 100, 1023):
        m = torch.rand(numel, generator=g) > 0.5
        packed = pack_bits(m)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel / 8)
        assert torch.equal(unpack_bits(packed, numel), m)


def test_bank_is_a_bounded_fifo():
    bank = MemoryBank(3)
    for i in range(5):
        bank.push({"id": torch.tensor(i)})
    assert len(bank) == 3 and [int(e["id"]) for e in bank.entries] == [2, 3, 4]
    bank.load(bank.state())
    assert [int(e["id"]) for e in bank.entries] == [2, 3, 4]
    with pytest.raises(ValueError, match="BANK_SIZE"):
        MemoryBank(0)
    # the byte bound: the oldest leave first, the newest always stays
    entry = {"x": torch.zeros(100, dtype=torch.uint8)}
    small = MemoryBank(10, max_bytes=250)
    for i in range(4):
        small.push(dict(entry, id=torch.tensor(i, dtype=torch.uint8)))
    assert [int(e["id"]) for e in small.entries] == [2, 3] and small.nbytes() == 202
    tiny = MemoryBank(10, max_bytes=50)
    tiny.push(entry)
    assert len(tiny) == 1


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_paste_mask_of_a_box_crop_equals_the_full_upsampling(stride):
    g = torch.Generator().manual_seed(stride)
    t = torch.rand(12, 10, generator=g)
    full = F.interpolate(t[None, None], scale_factor=stride, mode="bilinear", align_corners=False)[0, 0] if stride > 1 else t
    for box in ([0, 0, 10 * stride, 12 * stride], [3, 5, 17, 19], [1, 2, 2, 3], [7, 0, 10 * stride, 9]):
        x0, y0, x1, y1 = box
        mask, score = paste_masks_and_scores(t, box, stride, 0.6)
        ref = full[y0:y1, x0:x1]
        assert torch.equal(mask, ref > 0.6), box
        assert score.item() == pytest.approx(((ref * (ref > 0.6)).sum() / ((ref > 0.6).sum() + 1)).item(), rel=1e-5)


def test_entry_keeps_masked_pixels_only_and_leaves_padding_out():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 32, 32, generator=g) * 255
    valid = torch.ones(32, 32, dtype=torch.bool)
    valid[:, 24:] = False
    boxes = torch.tensor([[2.0, 2.0, 14.0, 10.0], [16.0, 4.0, 32.0, 20.0], [0.0, 28.0, 4.0, 32.0]])
    maps = torch.zeros(3, 8, 8)
    maps[0, 0:3, 0:4] = 1.0
    maps[1, 1:5, 4:8] = 1.0  # reaches into the padding (x >= 24)
    entry = make_entry(image, valid, boxes, torch.tensor([0, 1, 2]), maps, 4, 0.7)
    assert entry["classes"].tolist() == [0, 1]  # the third GT's map is empty: not stored
    for i in range(2):
        box, mask, crop = entry_canvas(entry, i)
        x0, y0, x1, y1 = box
        assert not (mask & ~valid[y0:y1, x0:x1]).any()
        assert torch.equal(crop[:, mask], image[:, y0:y1, x0:x1].round().to(torch.uint8)[:, mask])
        assert int(entry["pixel_counts"][i]) == int(mask.sum())
    assert entry["pixels"].dtype == torch.uint8 and entry["masks"].dtype == torch.uint8


# --------------------------------------------------------------------------------- sampling
def test_instances_are_drawn_without_replacement_in_proportion_to_their_scores():
    scores = [0.1, 0.2, 0.3, 0.4]
    cp = CopyPaste(bank_size=4, prob=1.0, fraction=0.5, max_instances=3, seed=3)
    cp.bank.push(_entry(scores))
    first = torch.zeros(4)
    draws = 4000
    for it in range(draws):
        e, chosen = cp._draw(cp.generator(it))
        assert e == 0 and len(chosen) == 2 and len(set(chosen)) == 2  # n = clamp(floor(0.25 * 4 ... 0.5 * 4), 1, 3)
        first[chosen[0]] += 1
    expected = torch.tensor(scores) * draws
    chi2 = float(((first - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (first.tolist(), chi2)  # 3 degrees of freedom, p = 0.001
    assert cp._draw(cp.generator(17)) == cp._draw(cp.generator(17))  # seeded by the iteration
    assert CopyPaste(prob=0.0)._draw(cp.generator(0)) == (-1, [])  # empty bank / PROB 0: nothing


@pytest.mark.parametrize("n_inst, fraction, max_inst, expected", [(1, 0.25, 3, 1), (7, 0.25, 3, 1), (8, 0.25, 3, 2),
                                                                   (20, 0.25, 3, 3), (2, 1.0, 3, 2)])
def test_number_of_pasted_instances(n_inst, fraction, max_inst, expected):
    cp = CopyPaste(prob=1.0, fraction=fraction, max_instances=max_inst)
    cp.bank.push(_entry([1.0] * n_inst, box_size=2, canvas=64))
    assert len(cp._draw(cp.generator(0))[1]) == expected


# --------------------------------------------------------------------------------- occlusion
def test_occlusion_update_shrinks_to_the_remainder_and_measures_coverage():
    covered = torch.zeros(40, 40, dtype=torch.bool)
    covered[:, 10:20] = True  # the left half of box 0, all rows
    covered[32:36, 32:36] = True  # a hole inside box 2
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [12.0, 5.0, 18.0, 9.0], [30.5, 30.5, 38.0, 38.0], [2.0, 2.0, 8.0, 8.0]])
    new, frac = occlusion_update(boxes, covered)
    assert new[0].tolist() == [20.0, 10.0, 30.0, 30.0] and frac[0].item() == pytest.approx(0.5)
    assert frac[1].item() == 1.0  # fully covered
    assert new[2].tolist() == boxes[2].tolist() and frac[2].item() == pytest.approx(16 / 64)  # a hole: box kept
    assert new[3].tolist() == boxes[3].tolist() and frac[3].item() == 0.0


def test_paste_drops_covered_originals_respects_padding_and_stacks_pastes():
    cp = CopyPaste(prob=1.0, fraction=1.0, max_instances=3, occluded_drop=1.0)
    cp.bank.push(_entry([1.0, 1.0, 1.0], box_size=8, canvas=32))  # instances at x 0-8, 8-16, 16-24, y 0-8
    raw = torch.zeros(1, 3, 32, 32)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    valid[:, :, 20:] = False  # padding from x = 20
    targets = [{"labels": torch.tensor([0, 1, 2]),
                "boxes": torch.tensor([[2.0, 2.0, 6.0, 6.0], [4.0, 0.0, 12.0, 16.0], [24.0, 24.0, 30.0, 30.0]])}]
    out_raw, out, covered = cp.paste(raw, valid, targets, iteration=0)
    t, rec = out[0], cp.last_records[0]
    assert rec.dropped == [0] and rec.kept == [1, 2]  # box 0 lies inside the pasted instance 0
    assert t["num_pasted"] == 3 and t["labels"][:2].tolist() == [1, 2]
    assert t["boxes"][0].tolist() == [4.0, 8.0, 12.0, 16.0]  # rows 0-8 of box 1 are covered: tight remainder
    masks = t["paste_masks"]
    assert not (masks & ~valid[0]).any() and not (covered[0] & ~valid[0]).any()
    assert int(masks.sum(dim=0).max()) == 1  # pasted masks do not overlap
    assert (out_raw[0, :, :, 20:] == 0).all() and (out_raw[0][:, covered[0]] == 200).all()
    pasted_boxes = t["boxes"][2:]
    assert sorted(b[0] for b in pasted_boxes.tolist()) == [0.0, 8.0, 16.0]
    assert max(b[2] for b in pasted_boxes.tolist()) == 20.0  # cut at the padding
    assert torch.equal(raw, torch.zeros(1, 3, 32, 32))  # the input is not modified in place


def test_bank_state_travels_only_when_asked_and_loads_with_weights_only(tmp_path):
    for keep in (True, False):
        cp = CopyPaste(bank_size=5, bank_in_checkpoint=keep)
        cp.bank.push(_entry([0.5, 0.7]))
        torch.save({"bank": cp.bank_state()}, tmp_path / "bank.pth")
        restored = CopyPaste(bank_size=5, bank_in_checkpoint=keep)
        restored.load_bank_state(torch.load(tmp_path / "bank.pth", weights_only=True)["bank"])
        assert len(restored.bank) == (1 if keep else 0)
        if keep:
            for k, v in cp.bank[0].items():
                assert torch.equal(restored.bank[0][k], v), k


# --------------------------------------------------------------------------------- the criterion
def _cp_criterion():
    labeler = SIMPseudoLabeler(K, feature_dim=8, num_prototypes=2, warmup_iters=0, proto_momentum=0.9)
    return BoxSupSetCriterion(
        K, HungarianMatcher(stride=STRIDE, generator=torch.Generator().manual_seed(0)), CP_WEIGHTS, stride=STRIDE,
        pairwise_warmup_iters=100, losses=("labels", "projection", "pairwise", "pseudo", "paste"),
        pseudo_labeler=labeler, num_points=64,
    )


def _pasted_targets(num_pasted):
    boxes = torch.tensor([[2.0, 2.0, 14.0, 14.0], [16.0, 10.0, 30.0, 28.0], [4.0, 18.0, 12.0, 30.0]])
    masks = torch.zeros(3, HM * STRIDE, HM * STRIDE, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        masks[i, y0:y1, x0:x1] = True
    t = {"labels": torch.tensor([0, 1, 2]), "boxes": boxes, "num_pasted": num_pasted}
    t["paste_masks"] = masks[3 - num_pasted:]
    return [t, {"labels": torch.tensor([1]), "boxes": torch.tensor([[8.0, 8.0, 20.0, 20.0]])}]


def test_paste_loss_counts_pasted_instances_only_and_they_get_no_pseudo_loss():
    outputs = make_outputs(2, num_aux=2)
    info, teacher = make_info(2), teacher_outputs_like(make_outputs(2, num_aux=2))
    crit = _cp_criterion()
    none = crit(outputs, _pasted_targets(0), info, iteration=5, teacher_outputs=teacher)
    assert all(none[k].item() == 0.0 for k in none if "paste" in k) and "loss_paste_ce_1" in none
    crit = _cp_criterion()
    losses, indices = crit(outputs, _pasted_targets(1), info, iteration=5, teacher_outputs=teacher, return_indices=True)
    keys = [k for k in losses if "paste" in k]
    assert sorted(keys) == sorted(f"loss_paste_{t}{s}" for t in ("ce", "dice") for s in ("", "_0", "_1"))
    assert all(losses[k].item() > 0 for k in keys)
    # the gradient of the paste loss reaches the query matched to the pasted GT (GT 2 of image 0) only
    paste_total = sum(losses[k] for k in keys)
    grads = torch.autograd.grad(paste_total, [outputs["pred_masks"]] + [a["pred_masks"] for a in outputs["aux_outputs"]])
    levels = [o for _, o in crit.decoder_outputs(outputs)]
    for level, grad in zip(range(len(levels)), grads[1:] + grads[:1]):
        src, tgt = indices[level][0]
        query = int(src[tgt == 2])
        touched = {(b, q) for b, q in (grad.abs().sum(dim=(2, 3)) > 0).nonzero().tolist()}
        assert touched == {(0, query)}, (level, touched)
    pseudo = crit.last_pseudo
    assert (pseudo.weights[2] == 0).all() and (pseudo.weights[:2].sum(dim=(1, 2)) > 0).all()


# --------------------------------------------------------------------------------- in training
def _cp_cfg(tmp_path, name, **extra):
    opts = {"MODEL.SIM.WARMUP_ITERS": 0, "MODEL.SIM.MODULATION": 1.0, "MODEL.SIM.LOW_THRESH": 0.5,
            "MODEL.SIM.HIGH_THRESH": 0.5, "MODEL.SIM.COPY_PASTE.PROB": 1.0, "MODEL.SIM.COPY_PASTE.MASK_THRESH": 0.0}
    opts.update(extra)
    return build_cfg(SIM_CP, tiny_opts(tmp_path / "data", tmp_path / name, **opts))


def test_copy_paste_training_never_reads_gt_masks(tmp_path):
    model = build_model(_cp_cfg(tmp_path, "out"))
    model.train()
    model.attach_teacher()
    g = torch.Generator().manual_seed(0)
    model(_poisoned_batch(g))  # fills the bank (warm-up 0, every in-box cell above MASK_THRESH 0)
    assert len(model.copy_paste.bank) == 2
    losses = model(_poisoned_batch(g))
    assert model.copy_paste.last_stats["pasted_instances"] > 0
    assert all(losses[k].item() > 0 for k in losses if "paste" in k)
    sum(losses.values()).backward()


def test_copy_paste_requires_sim_with_the_pseudo_loss(tmp_path):
    with pytest.raises(ValueError, match="PSEUDO_LOSS"):
        build_model(_cp_cfg(tmp_path, "x", **{"MODEL.SIM.PSEUDO_LOSS": False}))


class PastedRecorder(HookBase):
    def __init__(self):
        self.counts = {}

    def after_step(self):
        self.counts[self.trainer.iter] = self.trainer.model.copy_paste.last_stats.get("pasted_instances", 0)


@pytest.mark.slow
def test_resume_across_a_paste_gives_the_same_losses_and_bank(tmp_path):
    common = {"SOLVER.MAX_ITER": 5, "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": "()", "MODEL.SIM.WARMUP_ITERS": 1,
              "MODEL.SIM.COPY_PASTE.PROB": 0.5}
    full = LossRecorder()
    trainer_a, _ = train(_cp_cfg(tmp_path, "a", **common), [full])
    assert trainer_a.model.copy_paste.last_stats["bank_entries"] > 0
    cfg_b = _cp_cfg(tmp_path, "b", **common, **{"SOLVER.CHECKPOINT_PERIOD": 2})
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, [StopAfter(1)])  # the bank is filled at iteration 1 (warm-up 1), checkpointed after it
    assert len(_load(tmp_path / "b" / "model_0000001.pth")["trainer"][BANK_KEY]) > 0
    resumed, pasted = LossRecorder(), PastedRecorder()
    train(cfg_b, [resumed, pasted], resume=True)
    assert sorted(resumed.losses) == [2, 3, 4]  # pastes from iteration 2 on, from the restored bank
    assert pasted.counts[2] > 0, pasted.counts
    for it in (2, 3, 4):
        assert resumed.losses[it] == pytest.approx(full.losses[it], rel=1e-6, abs=1e-7), it
    ckpt_a, ckpt_b = _load(tmp_path / "a" / "model_final.pth"), _load(tmp_path / "b" / "model_final.pth")
    a, b = ckpt_a["model"], ckpt_b["model"]
    bank_a, bank_b = ckpt_a["trainer"][BANK_KEY], ckpt_b["trainer"][BANK_KEY]
    assert len(bank_a) == len(bank_b) > 0
    for ea, eb in zip(bank_a, bank_b):
        for k in ea:
            assert torch.equal(ea[k], eb[k]), k
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
