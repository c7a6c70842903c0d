"""A user's own COCO json from the config alone: DATASETS.COCO_JSONS, NUM_CLASSES checked or
inferred, iscrowd handling, the README example config, and a one-class dataset end to end."""
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from mask2former_sim.data import registry
from mask2former_sim.data.datasets import load_coco_instances
from mask2former_sim.data.registry import register_datasets_for
from mask2former_sim.data.synthetic import SyntheticSpec, generate_image
from mask2former_sim.engine.setup import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXINST = os.path.join(ROOT, "configs/synthetic/boxinst_R18_synth.yaml")
EXAMPLE = os.path.join(ROOT, "configs/custom/boxinst_R50_custom_example.yaml")


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_one_class_coco(root, split, num_images, size=64, crowd=False):
    """Synthetic images as a user's one-class COCO json (every shape is an "object")."""
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSpec(num_images=num_images, image_size=size, object_size=(12, 30), num_objects=(1, 3))
    images, annotations = [], []
    for i in range(num_images):
        sample = generate_image(spec, split, i)
        Image.fromarray(sample.image).save(img_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": size, "width": size})
        for inst in sample.instances:
            ys, xs = np.nonzero(inst.visible_mask)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(inst.visible_mask.sum()),
                "segmentation": _rle(inst.visible_mask),
            })
        if crowd:
            m = np.zeros((size, size), bool)
            m[:8, :8] = True
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                                "bbox": [0, 0, 8, 8], "area": 64, "segmentation": _rle(m)})
    path = root / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    return str(path), str(img_dir)


def jsons_opt(*entries):
    return ["DATASETS.COCO_JSONS", repr([list(e) for e in entries])]


@pytest.fixture
def data(tmp_path):
    train = write_one_class_coco(tmp_path, "train", 4)
    val = write_one_class_coco(tmp_path, "val", 2, crowd=True)
    return tmp_path, train, val


# ----------------------------------------------------------------------------- registration


def test_coco_jsons_register_box_only_and_with_masks(data):
    _, (tj, ti), (vj, vi) = data
    opts = jsons_opt(("cj_train", tj, ti, "boxes"), ("cj_val", vj, vi, "masks")) + [
        "DATASETS.TRAIN", "('cj_train',)", "DATASETS.TEST", "('cj_val',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1"]
    cfg = build_cfg(BOXINST, opts)
    register_datasets_for(cfg)
    train = DatasetCatalog.get("cj_train")
    assert len(train) == 4 and all("segmentation" not in a for r in train for a in r["annotations"])
    val = DatasetCatalog.get("cj_val")
    assert all("segmentation" in a for r in val for a in r["annotations"])
    assert MetadataCatalog.get("cj_train").box_only is True
    assert MetadataCatalog.get("cj_val").json_file == vj  # the evaluator reads crowd regions from it
    assert MetadataCatalog.get("cj_val").thing_classes == ["object"]
    # the same entries again: nothing re-registered
    loader = DatasetCatalog["cj_train"]
    register_datasets_for(build_cfg(BOXINST, opts))
    assert DatasetCatalog["cj_train"] is loader
    # another json under the same name replaces it
    opts2 = jsons_opt(("cj_train", vj, vi, "boxes"), ("cj_val", vj, vi, "masks")) + opts[2:]
    register_datasets_for(build_cfg(BOXINST, opts2))
    assert len(DatasetCatalog.get("cj_train")) == 2


@pytest.mark.parametrize("entry, match", [
    (("a", "b", "c"), r"COCO_JSONS\[0\].*four non-empty strings"),
    (("cj_x", "{json}", "{images}", "polygons"), r"COCO_JSONS\[0\].*kind must be 'boxes'.*'polygons'"),
    (("coco_2017_train_box", "{json}", "{images}", "boxes"), r"COCO_JSONS\[0\].*built-in dataset name"),
    (("synth_mine", "{json}", "{images}", "boxes"), r"COCO_JSONS\[0\].*built-in dataset name"),
    (("cj_x", "{json}.nope", "{images}", "boxes"), r"COCO_JSONS\[0\].*annotation file not found: .*\.nope"),
    (("cj_x", "{json}", "{images}/nope", "boxes"), r"COCO_JSONS\[0\].*image root is not a directory"),
])
def test_bad_entries_are_named(data, entry, match):
    _, (tj, ti), _ = data
    entry = tuple(v.format(json=tj, images=ti) for v in entry)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        build_cfg(BOXINST, jsons_opt(entry))


def test_duplicate_names_and_non_list_are_errors(data):
    _, (tj, ti), _ = data
    with pytest.raises(ValueError, match=r"COCO_JSONS\[1\].*appears twice"):
        build_cfg(BOXINST, jsons_opt(("cj_d", tj, ti, "boxes"), ("cj_d", tj, ti, "masks")))
    # a string instead of a list: yacs's type check names the key
    with pytest.raises(ValueError, match="DATASETS.COCO_JSONS"):
        build_cfg(BOXINST, ["DATASETS.COCO_JSONS", "'cj, a, b, boxes'"])


def test_box_only_set_cannot_be_evaluated(data):
    _, (tj, ti), _ = data
    cfg = build_cfg(BOXINST, jsons_opt(("cj_box", tj, ti, "boxes")) + [
        "DATASETS.TRAIN", "('cj_box',)", "DATASETS.TEST", "('cj_box',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1"])
    with pytest.raises(ValueError, match=r"DATASETS.TEST\[0\] 'cj_box' is registered box-only"):
        register_datasets_for(cfg)


# ----------------------------------------------------------------------------- NUM_CLASSES


def test_num_classes_mismatch_names_both_numbers_and_the_dataset(data):
    _, (tj, ti), _ = data
    opts = jsons_opt(("cj_nc", tj, ti, "boxes")) + ["DATASETS.TRAIN", "('cj_nc',)", "DATASETS.TEST", "()"]
    mismatch = r"NUM_CLASSES is 6 but the training set 'cj_nc' .*train\.json.* has 1 categories"
    with pytest.raises(ValueError, match=mismatch):
        build_cfg(BOXINST, opts)
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 3 but the training set 'synth_train'.* has 6 categories"):
        build_cfg(BOXINST, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"])
    with pytest.raises(ValueError, match=r"NUM_CLASSES must be >= 1, or -1"):
        build_cfg(BOXINST, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "0"])


def test_num_classes_minus_one_is_inferred_everywhere(data):
    _, (tj, ti), _ = data
    cfg = build_cfg(BOXINST, jsons_opt(("cj_inf", tj, ti, "boxes")) + [
        "DATASETS.TRAIN", "('cj_inf',)", "DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.DEC_LAYERS", "2"])
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 1
    model = build_model(cfg)
    assert model.num_classes == 1 and model.criterion.num_classes == 1
    assert model.predictor.class_embed.out_features == 2  # one class + no-object
    assert build_cfg(BOXINST, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1"]).MODEL.SEM_SEG_HEAD.NUM_CLASSES == 6


def test_builtin_counts_need_no_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "empty"))
    coco = os.path.join(ROOT, "configs/coco/instance-segmentation/boxinst_R50_bs16_50ep.yaml")
    try:
        assert build_cfg(coco, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1"]).MODEL.SEM_SEG_HEAD.NUM_CLASSES == 80
        with pytest.raises(ValueError, match=r"NUM_CLASSES is 20 .*'coco_2017_train_box'.* has 80 categories"):
            build_cfg(coco, ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "20"])
    finally:
        monkeypatch.undo()
        from mask2former_sim.data.datasets import register_builtin_datasets

        register_builtin_datasets()


def test_unresolved_minus_one_in_a_frozen_config_is_an_error(cfg):
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = -1
    with pytest.raises(ValueError, match="resolve_num_classes"):
        registry.check_num_classes(cfg)


# ----------------------------------------------------------------------------- iscrowd


def test_crowd_annotations_are_left_out_and_counted(data, caplog):
    _, _, (vj, vi) = data
    with caplog.at_level(logging.INFO, logger="mask2former_sim.data.datasets"):
        records = load_coco_instances(vj, vi, box_only=True)
    raw = json.load(open(vj))["annotations"]
    crowd_ids = {a["id"] for a in raw if a["iscrowd"]}
    assert len(crowd_ids) == 2
    kept = [a["annotation_id"] for r in records for a in r["annotations"]]
    assert len(kept) == len(raw) - 2 and not crowd_ids & set(kept)
    assert "Left out 2 iscrowd annotations" in caplog.text


def test_evaluation_treats_crowd_regions_as_coco_does(data, tmp_path):
    """Exact masks for every instance plus a top-scored detection on each crowd region:
    COCO ignores detections matched to crowd, so AP stays 100."""
    _, _, (vj, vi) = data
    cfg = build_cfg(BOXINST, jsons_opt(("cj_crowd", vj, vi, "masks")) + [
        "DATASETS.TRAIN", "('cj_crowd',)", "DATASETS.TEST", "('cj_crowd',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1"])
    register_datasets_for(cfg)
    records = DatasetCatalog.get("cj_crowd")
    raw = json.load(open(vj))
    evaluator = COCOEvaluator("cj_crowd", tasks=("segm",), distributed=False,
                              output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for rec in records:
        anns = [a for a in raw["annotations"] if a["image_id"] == rec["image_id"]]
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
        scores = [1.0 if a["iscrowd"] else 0.9 for a in anns]
        inst = Instances((rec["height"], rec["width"]))
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        inst.pred_boxes = Boxes(torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32))
        inst.scores = torch.tensor(scores)
        inst.pred_classes = torch.zeros(len(anns), dtype=torch.int64)
        evaluator.process([{"image_id": rec["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=1e-6)


# ----------------------------------------------------------------------------- example + e2e


def test_readme_example_config_loads_and_builds(data):
    _, (tj, ti), (vj, vi) = data
    cfg = build_cfg(EXAMPLE, jsons_opt(("my_train_box", tj, ti, "boxes"), ("my_val", vj, vi, "masks")) + [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    assert list(cfg.DATASETS.TRAIN) == ["my_train_box"] and list(cfg.DATASETS.TEST) == ["my_val"]
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 1
    register_datasets_for(cfg)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    assert out[0]["instances"].pred_classes.max() == 0


def test_one_class_dataset_trains_with_finite_losses_and_evaluates(data, tmp_path):
    from detectron2.engine import HookBase

    from mask2former_sim.engine.trainer import Trainer

    _, (tj, ti), (vj, vi) = data

    class Losses(HookBase):
        def __init__(self):
            self.values = []

        def after_step(self):
            self.values.append({k: v.latest() for k, v in self.trainer.storage.histories().items()
                                if k.startswith("loss") or k == "total_loss"})

    opts = jsons_opt(("one_train", tj, ti, "boxes"), ("one_val", vj, vi, "masks")) + [
        "DATASETS.TRAIN", "('one_train',)", "DATASETS.TEST", "('one_val',)",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "-1", "OUTPUT_DIR", str(tmp_path / "out"),
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.STEPS", "(1000,)", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS", "2",
        "MODEL.BACKBONE_PRETRAIN.ENABLED", "False",
    ]
    cfg = build_cfg(BOXINST, opts)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 1
    register_datasets_for(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    hook = Losses()
    trainer.register_hooks([hook])
    trainer.train()
    assert len(hook.values) == 4
    for step in hook.values:
        assert {"loss_ce", "loss_proj", "loss_pairwise"} <= set(step)
        assert all(math.isfinite(v) for v in step.values()), step
    results = trainer._last_eval_results
    assert set(results) >= {"segm", "bbox"}
    for task in ("segm", "bbox"):
        assert 0.0 <= results[task]["AP"] <= 100.0, results[task]  # a number: NaN fails too


def test_readme_shows_the_example_config():
    import re

    import yaml

    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### Train on your own boxes"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load(open(EXAMPLE))
