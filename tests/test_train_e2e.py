"""End to end on tiny synthetic data: training reduces the loss, evaluation returns AP,
resume continues exactly, box-only training never reads a mask, every config builds."""
import glob
import json
import math
import os

import pytest
import torch

from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import mask2former_sim.modeling  # noqa: F401
from mask2former_sim.data.datasets import register_coco_json
from mask2former_sim.data.registry import register_datasets_for
from mask2former_sim.engine.setup import build_cfg
from mask2former_sim.engine.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXINST = os.path.join(ROOT, "configs/synthetic/boxinst_R18_synth.yaml")
FULLSUP = os.path.join(ROOT, "configs/synthetic/fullsup_R18_synth.yaml")


def tiny_opts(tmp_root, out_dir, **extra):
    opts = {
        "DATASETS.SYNTHETIC.ROOT": str(tmp_root),
        "DATASETS.SYNTHETIC.NUM_TRAIN": 16,
        "DATASETS.SYNTHETIC.NUM_VAL": 6,
        "OUTPUT_DIR": str(out_dir),
        "SOLVER.IMS_PER_BATCH": 2,
        "DATALOADER.NUM_WORKERS": 0,
        "INPUT.IMAGE_SIZE": 64,
        "INPUT.MIN_SIZE_TEST": 64,
        "INPUT.MAX_SIZE_TEST": 64,
        "MODEL.RESNETS.DEPTH": 18,
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
        "MODEL.MASK_FORMER.DEC_LAYERS": 4,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 8,
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256,
        "SOLVER.WARMUP_ITERS": 0,
        "SOLVER.STEPS": (1000,),
        "SOLVER.CHECKPOINT_PERIOD": 1000,
        "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS": 4,
        "MODEL.BACKBONE_PRETRAIN.ENABLED": False,  # tests of it: test_backbone_pretrain.py
    }
    opts.update(extra)
    out = []
    for k, v in opts.items():
        out += [k, str(v)]
    return out


class LossRecorder(HookBase):
    def __init__(self):
        self.losses = {}

    def after_step(self):
        self.losses[self.trainer.iter] = self.trainer.storage.history("total_loss").latest()


class StopAfter(HookBase):
    """Simulates a crash right after iteration ``it`` (after its checkpoint was written)."""

    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise KeyboardInterrupt("simulated interruption")


def train(cfg, hooks=(), resume=False):
    register_datasets_for(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.register_hooks(list(hooks))
    trainer.train()
    # DefaultTrainer.train() returns the results only when TEST.EXPECTED_RESULTS is set
    results = getattr(trainer, "_last_eval_results", None) or {}
    return trainer, results


@pytest.mark.slow
def test_training_reduces_loss_and_evaluation_returns_ap(tmp_path):
    cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out", **{
        "SOLVER.MAX_ITER": 80, "SOLVER.BASE_LR": 0.0005}))
    rec = LossRecorder()
    trainer, results = train(cfg, [rec])
    losses = [rec.losses[i] for i in sorted(rec.losses)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.9 * first, (first, last)
    assert "segm" in results and "bbox" in results
    # floors an untrained model cannot reach: on this setting the untrained model scores
    # segm AP 0.0 / bbox AP 0.0 (seeds 0, 1, 2); after these 80 iterations 0.58 / 2.7 (seed 0;
    # seeds 1, 2: 0.65 / 1.1, 1.7 / 2.7; measured 2026-12-06). 40 iterations were too few: the
    # same code scored 0.25 / 1.2 on 2026-11 and 0.02 / 0.6 with the 2026-12 package versions
    # (seeds 1, 2: 0.10 / 1.3, 0.19 / 1.5), below the floor on seed 0
    assert 0.1 <= results["segm"]["AP"] <= 100.0, results["segm"]
    assert 0.3 <= results["bbox"]["AP"] <= 100.0, results["bbox"]
    # detectron2's writers: metrics.json and TensorBoard events
    assert os.path.isfile(tmp_path / "out" / "metrics.json")
    assert glob.glob(str(tmp_path / "out" / "events.out.tfevents.*"))
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


@pytest.mark.slow
@pytest.mark.parametrize("config", [BOXINST, FULLSUP], ids=["boxinst", "fullsup"])
def test_resume_gives_the_same_next_step_loss(tmp_path, config):
    common = {"SOLVER.MAX_ITER": 5, "TEST.EVAL_PERIOD": 0, "DATASETS.TEST": "()"}
    full = LossRecorder()
    cfg_a = build_cfg(config, tiny_opts(tmp_path / "data", tmp_path / "a", **common))
    train(cfg_a, [full])

    cfg_b = build_cfg(config, tiny_opts(tmp_path / "data", tmp_path / "b", **common, **{"SOLVER.CHECKPOINT_PERIOD": 3}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b, [StopAfter(2)])
    assert os.path.isfile(tmp_path / "b" / "model_0000002.pth")
    resumed = LossRecorder()
    train(cfg_b, [resumed], resume=True)
    assert sorted(resumed.losses) == [3, 4]
    for it in (3, 4):
        assert resumed.losses[it] == pytest.approx(full.losses[it], rel=1e-5, abs=1e-6), it


class PoisonMasks:
    """Stands in for gt_masks / segmentation: any use other than moving it raises."""

    def __init__(self, n):
        self.n = n

    def to(self, *args, **kwargs):
        return self

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        raise AssertionError(f"box-only training touched a GT mask ({name})")


def test_box_only_training_never_reads_gt_masks(tmp_path):
    cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out"))
    register_datasets_for(cfg)
    model = build_model(cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        inst = Instances((64, 64))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 20.0, 60.0, 50.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        inst._fields["gt_masks"] = PoisonMasks(2)
        batch.append({"image": torch.randint(0, 255, (3, 64, 64), generator=g, dtype=torch.uint8),
                      "valid_mask": torch.ones(64, 64, dtype=torch.bool), "instances": inst,
                      "height": 64, "width": 64})
    losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert {"loss_ce", "loss_proj", "loss_pairwise"} <= set(losses)
    assert not any("mask" in k or "dice" in k for k in losses)


def register_poisoned_val(data_root, json_path, name, box_only):
    """Register synth_val (already generated under ``data_root``) as ``name`` with every
    segmentation replaced by garbage: reading one would fail."""
    src = DatasetCatalog.get("synth_val")
    meta_json = json.load(open(os.path.join(str(data_root), "val", "annotations.json")))
    for a in meta_json["annotations"]:
        a["segmentation"] = "POISON"
    json_path.write_text(json.dumps(meta_json))
    register_coco_json(name, str(json_path), os.path.dirname(src[0]["file_name"]), box_only=box_only)


def test_box_only_dataset_with_poisoned_segmentation_trains(tmp_path):
    """A dataset whose json masks are garbage still trains box-only: they are never loaded."""
    cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out"))
    register_datasets_for(cfg)
    name = "poisoned_box_train"
    register_poisoned_val(tmp_path / "data", tmp_path / "poisoned.json", name, box_only=True)
    try:
        cfg2 = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out2", **{
            "SOLVER.MAX_ITER": 2, "DATASETS.TEST": "()", "DATASETS.TRAIN": f"('{name}',)"}))
        rec = LossRecorder()
        train(cfg2, [rec])
        assert len(rec.losses) == 2 and all(math.isfinite(v) for v in rec.losses.values())
    finally:
        DatasetCatalog.remove(name)


def test_inference_outputs_instances_at_original_size(tmp_path):
    cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out"))
    model = build_model(cfg).eval()
    image = torch.randint(0, 255, (3, 64, 48), dtype=torch.uint8)
    with torch.no_grad():
        out = model([{"image": image, "height": 128, "width": 96}])[0]["instances"]
    assert out.image_size == (128, 96)
    assert out.pred_masks.shape[1:] == (128, 96) and out.pred_masks.dtype == torch.bool
    k = min(cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE, 8 * 6)
    assert len(out) == k
    assert (out.scores[:-1] >= 0).all() and out.pred_classes.max() < 6
    # boxes are the tight boxes of the masks
    for i in range(len(out)):
        m = out.pred_masks[i]
        if m.any():
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert out.pred_boxes.tensor[i].tolist() == [xs.min().item(), ys.min().item(),
                                                         xs.max().item() + 1, ys.max().item() + 1]


COCO_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "coco", "**", "*.yaml"), recursive=True))
COCO_CONFIGS = [c for c in COCO_CONFIGS if not os.path.basename(c).startswith("Base-")]


@pytest.mark.slow
@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_builds_and_runs(path):
    cfg = build_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    assert len(out[0]["instances"]) == cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE


def test_copy_paste_without_sim_is_rejected_not_ignored(tmp_path):
    cfg = build_cfg(BOXINST, tiny_opts(tmp_path / "data", tmp_path / "out", **{"MODEL.SIM.COPY_PASTE.ENABLED": True}))
    with pytest.raises(ValueError, match="MODEL.SIM.ENABLED True"):
        build_model(cfg)
