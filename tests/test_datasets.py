"""COCO json loading: validation errors name the culprit; box-only drops masks."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from mask2former_sim.data.datasets import (
    DatasetFormatError,
    load_coco_instances,
    register_builtin_datasets,
    register_coco_json,
)


def write_dataset(tmp_path, images=None, annotations=None, categories=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "height": 32, "width": 48},
                  {"id": 2, "file_name": "b.png", "height": 32, "width": 48}]
    for im in images:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(img_dir / im["file_name"])
    if annotations is None:
        annotations = [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 12], "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 15, 2, 15]], "area": 120},
            {"id": 11, "image_id": 1, "category_id": 9, "bbox": [20, 5, 4, 4], "iscrowd": 0,
             "segmentation": [[20, 5, 24, 5, 24, 9]], "area": 8},
        ]
    if categories is None:
        categories = [{"id": 9, "name": "nine"}, {"id": 7, "name": "seven"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(img_dir)


def test_box_only_records_have_no_masks(tmp_path):
    js, root = write_dataset(tmp_path)
    recs = load_coco_instances(js, root, box_only=True)
    anns = [a for r in recs for a in r["annotations"]]
    assert len(anns) == 2
    assert all("segmentation" not in a for a in anns)
    # XYXY, contiguous ids in sorted order of the json ids (7 -> 0, 9 -> 1)
    a0 = next(a for a in anns if a["annotation_id"] == 10)
    assert a0["bbox"] == [2.0, 3.0, 12.0, 15.0]
    assert a0["category_id"] == 0
    full = load_coco_instances(js, root, box_only=False)
    assert all("segmentation" in a for r in full for a in r["annotations"])


def test_register_sets_metadata_and_box_only(tmp_path):
    js, root = write_dataset(tmp_path)
    name = "test_reg_ds"
    try:
        register_coco_json(name, js, root, box_only=True)
        with pytest.raises(ValueError, match="already registered"):
            register_coco_json(name, js, root, box_only=True)
        recs = DatasetCatalog.get(name)
        assert all("segmentation" not in a for r in recs for a in r["annotations"])
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["seven", "nine"]
        assert meta.json_file == js and meta.box_only is True
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_missing_image_file_named(tmp_path):
    js, root = write_dataset(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"b\.png"):
        load_coco_instances(js, root, box_only=True)


def test_negative_bbox_named(tmp_path):
    js, root = write_dataset(tmp_path, annotations=[
        {"id": 42, "image_id": 1, "category_id": 7, "bbox": [2, 3, -4, 5], "iscrowd": 0}])
    with pytest.raises(DatasetFormatError, match=r"annotation 42 .*negative size"):
        load_coco_instances(js, root, box_only=True)


def test_unknown_category_named(tmp_path):
    js, root = write_dataset(tmp_path, annotations=[
        {"id": 43, "image_id": 2, "category_id": 99, "bbox": [2, 3, 4, 5], "iscrowd": 0}])
    with pytest.raises(DatasetFormatError, match=r"annotation 43 .*unknown category_id 99"):
        load_coco_instances(js, root, box_only=True)


def test_unknown_image_named(tmp_path):
    js, root = write_dataset(tmp_path, annotations=[
        {"id": 44, "image_id": 5, "category_id": 7, "bbox": [2, 3, 4, 5], "iscrowd": 0}])
    with pytest.raises(DatasetFormatError, match=r"annotation 44: unknown image_id 5"):
        load_coco_instances(js, root, box_only=True)


def test_malformed_json_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1,')
    with pytest.raises(DatasetFormatError, match=r"broken\.json: malformed json"):
        load_coco_instances(str(path), str(tmp_path), box_only=True)
    path.write_text('{"images": []}')
    with pytest.raises(DatasetFormatError, match=r"missing or non-list 'annotations'"):
        load_coco_instances(str(path), str(tmp_path), box_only=True)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_instances(str(tmp_path / "nope.json"), str(tmp_path), box_only=True)


def test_masks_required_when_asked(tmp_path):
    js, root = write_dataset(tmp_path, annotations=[
        {"id": 45, "image_id": 1, "category_id": 7, "bbox": [2, 3, 4, 5], "iscrowd": 0}])
    assert load_coco_instances(js, root, box_only=True)[0]["annotations"][0]["bbox"] == [2, 3, 6, 8]
    with pytest.raises(DatasetFormatError, match=r"annotation 45 .*no 'segmentation'"):
        load_coco_instances(js, root, box_only=False)


def test_images_without_boxes_are_skipped_with_a_count(tmp_path, caplog):
    js, root = write_dataset(tmp_path)  # image 2 has no annotation
    name = "test_empty_skip_ds"
    try:
        register_coco_json(name, js, root, box_only=True)
        with caplog.at_level(logging.INFO):
            recs = get_detection_dataset_dicts([name], filter_empty=True)
        assert [r["image_id"] for r in recs] == [1]
        assert "Removed 1 images with no usable annotations" in caplog.text
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_builtin_registration_is_lazy_and_idempotent(tmp_path):
    register_builtin_datasets(str(tmp_path))
    register_builtin_datasets(str(tmp_path))
    for name in ("coco_2017_train_box", "coco_2017_val_full", "voc_2012_train_aug_box"):
        assert name in DatasetCatalog.list()
    assert MetadataCatalog.get("coco_2017_train_box").box_only is True
    assert MetadataCatalog.get("coco_2017_val_full").box_only is False
    # nothing on disk: loading names the missing json
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        DatasetCatalog.get("coco_2017_train_box")
