"""Pseudo-mask quality evaluation and panels (mask2former_sim/evaluation/, tools/eval_pseudo_masks.py,
tools/visualize_pseudo_masks.py).

- the IoU is right on constructed masks (identity 1, half overlap 1/3, region restriction);
- per-GT figures and their means (overall and per class) equal hand values, GTs without a grid
  cell are left out, the ignored fraction counts in-box W = 0 cells;
- the evaluation mapper resizes boxes and masks together and names a bad annotation;
- on a tiny SIM model: every figure in [0, 1], nothing changes (weights, prototypes, teacher,
  RNG, train mode), the hook writes the figures into metrics.json, the tools run on the
  checkpoint; a box-only model gets the student columns only, matched as in training;
- the panels are valid PNGs with content; both tools answer --help.
"""
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from mask2former_sim.data.registry import register_datasets_for
from mask2former_sim.engine.setup import build_cfg
from mask2former_sim.evaluation.pseudo_masks import (
    BatchPseudoMasks,
    PseudoMaskAccumulator,
    PseudoMaskEvalHook,
    PseudoMaskEvalMapper,
    add_pseudo_mask_eval_hook,
    evaluate_pseudo_masks,
    mask_iou,
    per_gt_figures,
    pseudo_mask_outputs,
)
from mask2former_sim.evaluation.pseudo_mask_panels import weight_bars, write_pseudo_mask_panels

from test_train_e2e import BOXINST, ROOT, tiny_opts

SIM = os.path.join(ROOT, "configs/synthetic/sim_R18_synth.yaml")
TOOLS = os.path.join(ROOT, "tools")
OVERALL = {f"pseudo_mask/miou_{c}" for c in ("semantic", "instance", "combined", "final", "student", "student_image")}
OVERALL |= {"pseudo_mask/ignored_fraction"}
STUDENT = {"pseudo_mask/miou_student", "pseudo_mask/miou_student_image"}


def _box(h, w, y0, y1, x0, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------- IoU and aggregation
def test_mask_iou_identity_half_overlap_and_region():
    gt = _box(4, 4, 0, 4, 0, 2)[None]  # columns 0-1: 8 cells
    assert mask_iou(gt, gt).item() == 1.0
    shifted = _box(4, 4, 0, 4, 1, 3)[None]  # columns 1-2: 4 shared of 12
    assert mask_iou(shifted, gt).item() == pytest.approx(1 / 3)
    # only column 1 counts: there both masks agree
    assert mask_iou(shifted, gt, _box(4, 4, 0, 4, 1, 2)[None]).item() == 1.0
    # rows 0-1 of columns 0-2: pred has 4 cells, gt 4, shared 2 -> 2 / 6
    assert mask_iou(shifted, gt, _box(4, 4, 0, 2, 0, 3)[None]).item() == pytest.approx(1 / 3)
    empty = torch.zeros_like(gt)
    assert mask_iou(empty, gt).item() == 0.0
    assert mask_iou(empty, empty).item() == 1.0  # both empty: they agree
    with pytest.raises(ValueError, match="mask_iou"):
        mask_iou(gt, gt[:, :2])


def _constructed_batch():
    """3 GTs on a 4 x 4 grid: GT 0 (class 0) and GT 1 (class 2) with masks, GT 2 (class 0) with an
    empty GT mask (left out of every mean)."""
    h = w = 4
    in_box = torch.stack([_box(h, w, 0, 4, 0, 4), _box(h, w, 0, 2, 0, 4), _box(h, w, 2, 4, 0, 4)])
    gt = torch.stack([_box(h, w, 0, 4, 0, 2), _box(h, w, 0, 2, 0, 2), torch.zeros(h, w, dtype=torch.bool)])
    student = torch.stack([_box(h, w, 0, 4, 0, 2), _box(h, w, 0, 4, 0, 4), _box(h, w, 2, 4, 0, 4)]).float() * 0.9
    semantic = torch.stack([_box(h, w, 0, 4, 1, 3), _box(h, w, 0, 2, 0, 2), _box(h, w, 0, 4, 0, 4)]).float()
    weights = torch.ones(3, h, w)
    weights[0, :, 3] = 0  # GT 0: 4 of its 16 in-box cells ignored
    weights[1, 0, :] = 0  # GT 1: 4 of 8
    pseudo = SimpleNamespace(
        semantic=semantic,
        instance=semantic * 0.4,  # never > 0.5: empty -> IoU 0
        combined=semantic * 0.6,
        targets=(semantic > 0.5).float() * in_box,
        weights=weights,
    )
    return BatchPseudoMasks(
        labels=torch.tensor([0, 2, 0]), batch_idx=torch.zeros(3, dtype=torch.long), boxes=torch.zeros(3, 4),
        in_box=in_box, valid=torch.ones(3, h, w, dtype=torch.bool), student=student,
        student_query=torch.tensor([0, 1, 2]), gt_masks=gt, pseudo=pseudo, images=torch.zeros(1, 3, 8, 8),
        image_sizes=[(8, 8)], stride=2, num_levels=2,
    )


def test_per_gt_figures_and_means_hand_values():
    batch = _constructed_batch()
    fig = per_gt_figures(batch)
    assert fig["counted"].tolist() == [True, True, False]
    assert fig["student"][:2].tolist() == pytest.approx([1.0, 0.5])  # GT 1: 4 of the 8 in-box cells
    assert fig["student_image"][:2].tolist() == pytest.approx([1.0, 0.25])  # GT 1: 4 of all 16 cells
    assert fig["semantic"][:2].tolist() == pytest.approx([1 / 3, 1.0])
    assert fig["instance"][:2].tolist() == [0.0, 0.0]
    assert fig["ignored"][:2].tolist() == pytest.approx([0.25, 0.5])

    acc = PseudoMaskAccumulator()
    acc.add(batch)
    assert acc.counts()["gts"] == 2 and acc.counts()["skipped_gts"] == 1
    out = acc.summarize(["a", "b", "c"], per_class=True)
    assert out["pseudo_mask/miou_student"] == pytest.approx(0.75)
    assert out["pseudo_mask/miou_semantic"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert out["pseudo_mask/miou_final"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert out["pseudo_mask/ignored_fraction"] == pytest.approx(0.375)
    assert out["pseudo_mask/miou_student/a"] == pytest.approx(1.0)
    assert out["pseudo_mask/miou_student_image/c"] == pytest.approx(0.25)
    assert not any(k.endswith("/b") for k in out)  # class without GTs: no figure
    assert set(acc.summarize(None, per_class=False)) == OVERALL
    assert PseudoMaskAccumulator().summarize() == {}


def test_weight_bars_draw_every_valid_bar():
    img = weight_bars([0.1, 0.7, 0.2], [True, True, False], ["0", "1", "F"], height=96)
    assert img.shape[0] == 96 and img.dtype == np.uint8
    orange = (img[..., 0] > 200) & (img[..., 1] > 140) & (img[..., 1] < 200) & (img[..., 2] < 100)
    heights = [orange[:, 6 + 28 * i: 6 + 28 * i + 14].any(1).sum() for i in range(3)]
    assert heights[1] > 3 * heights[0] > 0 and heights[2] == 0
    with pytest.raises(ValueError, match="weight_bars"):
        weight_bars([0.1], [True, False], ["0"])


# ---------------------------------------------------------------------- mapper
def _record(tmp_path, annotations):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
    return {"file_name": str(path), "height": 32, "width": 32, "image_id": 7, "annotations": annotations}


def test_eval_mapper_resizes_boxes_and_masks_together_and_names_bad_annotations(cfg, tmp_path):
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 64
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    poly = [[8.0, 4.0, 20.0, 4.0, 20.0, 12.0, 8.0, 12.0]]  # x 8..20, y 4..12
    ann = {"bbox": [8.0, 4.0, 12.0, 8.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "segmentation": poly}
    out = PseudoMaskEvalMapper(cfg, "toy")(_record(tmp_path, [ann]))
    assert tuple(out["image"].shape) == (3, 64, 64) and "annotations" not in out
    inst = out["instances"]
    assert inst.gt_boxes.tensor.tolist() == [[16.0, 8.0, 40.0, 24.0]]
    assert inst.gt_classes.tolist() == [2]
    mask = inst.gt_masks.tensor[0]
    ys, xs = np.nonzero(mask.numpy())
    # the polygon rasterised at 32 px then resized x2: within a pixel of the doubled box
    assert abs(xs.min() - 16) <= 2 and abs(xs.max() + 1 - 40) <= 2 and abs(ys.min() - 8) <= 2 and abs(ys.max() + 1 - 24) <= 2

    no_mask = dict(ann, id=99)
    del no_mask["segmentation"]
    with pytest.raises(ValueError, match=r"dataset 'toy', image 7: annotation\(s\) \[99\] have no 'segmentation'"):
        PseudoMaskEvalMapper(cfg, "toy")(_record(tmp_path, [no_mask]))
    kept = PseudoMaskEvalMapper(cfg, "toy", require_masks=False)(_record(tmp_path, [no_mask]))
    assert not kept["instances"].has("gt_masks")
    with pytest.raises(ValueError, match=r"category ids \[5\] outside \[0, 3\)"):
        PseudoMaskEvalMapper(cfg, "toy")(_record(tmp_path, [dict(ann, category_id=5)]))


def test_hook_is_inserted_before_the_writer(cfg):
    cfg.DATASETS.TEST = ("synth_val",)
    cfg.TEST.EVAL_PERIOD = 50

    class PeriodicWriter:
        pass

    hooks = add_pseudo_mask_eval_hook([object(), PeriodicWriter()], cfg)
    assert isinstance(hooks[1], PseudoMaskEvalHook) and isinstance(hooks[2], PeriodicWriter)
    assert hooks[1]._period == 50 and hooks[1]._dataset == "synth_val"
    cfg.DATASETS.TEST = ()
    assert len(add_pseudo_mask_eval_hook([object()], cfg)) == 1
    with pytest.raises(ValueError, match="TEST.EVAL_PERIOD"):
        PseudoMaskEvalHook(-1, cfg, "synth_val")


@pytest.mark.parametrize("tool", ["eval_pseudo_masks.py", "visualize_pseudo_masks.py"])
def test_tools_answer_help(tool):
    res = subprocess.run([sys.executable, os.path.join(TOOLS, tool), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--weights" in res.stdout and "--config-file" in res.stdout


# ---------------------------------------------------------------------- tiny models
def _state(model):
    out = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.teacher is not None:
        out.update({"teacher." + k: v.detach().clone() for k, v in model.teacher.module.state_dict().items()})
    out["rng"] = torch.get_rng_state()
    return out


def _assert_same(before, after):
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


@pytest.fixture(scope="module")
def sim_run(module_tmp):
    """A tiny SIM training of 2 iterations with the pseudo-mask hook (period 1), its checkpoint."""
    from mask2former_sim.engine.trainer import Trainer

    root = module_tmp
    opts = tiny_opts(root / "data", root / "out", **{
        "SOLVER.MAX_ITER": 2, "MODEL.SIM.WARMUP_ITERS": 1, "DATASETS.TEST": "()", "SOLVER.BASE_LR": 0.0005,
    })
    cfg = build_cfg(SIM, opts)
    register_datasets_for(cfg)

    class WithPseudoMaskHook(Trainer):  # the trainer's one-line registration
        def build_hooks(self):
            return add_pseudo_mask_eval_hook(super().build_hooks(), self.cfg, "synth_val", period=1)

    trainer = WithPseudoMaskHook(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, PseudoMaskEvalHook))
    return SimpleNamespace(cfg=cfg, opts=opts, model=trainer.model, hook=hook, out=root / "out", root=root)


@pytest.mark.slow
def test_sim_figures_in_unit_range_and_nothing_changes(sim_run):
    model = sim_run.model
    model.train()
    before = _state(model)
    figures = evaluate_pseudo_masks(model, sim_run.cfg, "synth_val")
    _assert_same(before, _state(model))
    assert model.training  # mode restored
    assert OVERALL <= set(figures)
    assert any(k.startswith("pseudo_mask/miou_final/") for k in figures)  # per class
    assert all(0.0 <= v <= 1.0 for v in figures.values()), figures
    # something was measured: the maps are not all empty against non-empty GT masks
    assert figures["pseudo_mask/miou_semantic"] > 0 and figures["pseudo_mask/miou_student"] > 0
    # the hook wrote the same keys through the EventStorage at both evaluations
    lines = [json.loads(x) for x in open(sim_run.out / "metrics.json")]
    written = {x["iteration"]: x for x in lines if "pseudo_mask/miou_final" in x}
    # after step 0 (period 1), and after training, at iteration MAX_ITER as detectron2's EvalHook
    assert sorted(written) == [0, 2]
    assert OVERALL <= set(written[2])
    assert written[2]["pseudo_mask/miou_semantic"] == pytest.approx(sim_run.hook.last_figures["pseudo_mask/miou_semantic"])


@pytest.mark.slow
def test_box_only_model_gets_the_student_columns_matched_as_in_training(sim_run):
    cfg = build_cfg(BOXINST, sim_run.opts)
    register_datasets_for(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = _state(model)
    figures = evaluate_pseudo_masks(model, cfg, "synth_val", per_class=False)
    _assert_same(before, _state(model))
    assert set(figures) == STUDENT
    assert all(0.0 <= v <= 1.0 for v in figures.values())

    # the evaluator's matched query of every GT is the criterion's own final-output match
    from detectron2.data import DatasetCatalog

    inputs = [PseudoMaskEvalMapper(cfg, "synth_val")(r) for r in DatasetCatalog.get("synth_val")[:2]]
    batch = pseudo_mask_outputs(model, inputs)
    model.eval()
    with torch.no_grad():
        images, raw, valid = model.preprocess(inputs)
        outputs = model.forward_network(images.tensor)
        targets = model.prepare_targets(inputs, images.tensor.shape[-2:])
        _, indices = model.criterion(outputs, targets, {"images": raw, "valid": valid}, 0, return_indices=True)
    expected = torch.cat([src[tgt.argsort()] for src, tgt in indices[-1]])
    assert torch.equal(batch.student_query.cpu(), expected)


@pytest.mark.slow
def test_panels_are_png_grids_with_content(sim_run, tmp_path):
    paths = write_pseudo_mask_panels(sim_run.model, sim_run.cfg, "synth_val", str(tmp_path / "p"), 3)
    assert len(paths) == 3
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape[0] >= 96 and arr.shape[1] >= 8 * 96  # 8 tiles: image .. GT mask
        assert arr.std() > 10
    student_only = write_pseudo_mask_panels(sim_run.model, sim_run.cfg, "synth_val", str(tmp_path / "s"), 1,
                                            use_teacher=False)
    with Image.open(student_only[0]) as im:
        assert 3 * 96 <= im.size[0] < 4 * 96  # image, student, GT mask
    with pytest.raises(KeyError, match="image ids"):
        write_pseudo_mask_panels(sim_run.model, sim_run.cfg, "synth_val", str(tmp_path / "x"), image_ids=["nope"])


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tools_run_on_the_sim_checkpoint(sim_run, tmp_path, capsys):
    weights = str(sim_run.out / "model_final.pth")
    out = tmp_path / "r.json"
    result = _tool("eval_pseudo_masks").main(
        ["--config-file", SIM, "--weights", weights, "--dataset", "synth_val", "--out", str(out), *sim_run.opts])
    printed = capsys.readouterr().out
    assert "| **all** |" in printed and "| semantic |" in printed
    saved = json.loads(out.read_text())
    assert saved["teacher"] and saved["iteration"] == 1 and saved["counts"]["gts"] > 0
    # the checkpoint's student, teacher and prototypes are those of the end of training
    assert saved["figures"] == pytest.approx(sim_run.hook.last_figures)
    paths = _tool("visualize_pseudo_masks").main(
        ["--config-file", SIM, "--weights", weights, "--dataset", "synth_val", "--output", str(tmp_path / "v"),
         "--image-ids", "1,3",
         "--max-instances", "2", *sim_run.opts])
    assert len(paths) == 2 and all(os.path.basename(p).startswith("1_gt") for p in paths)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        _tool("eval_pseudo_masks").main(
            ["--config-file", SIM, "--weights", str(tmp_path / "none.pth"), "--dataset", "synth_val", *sim_run.opts])
