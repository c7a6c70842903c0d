"""Dataset registration: COCO-format json, box-only for training, with masks for evaluation.

Box-only registration drops ``segmentation`` at load time, so no training path can read a
mask unless a config registers (and asks for) the dataset with masks.

    register_coco_json("my_train", "ann.json", "images/", box_only=True)

Names registered by ``register_builtin_datasets`` (paths under $DETECTRON2_DATASETS,
default ./datasets):

    coco_2017_train_box      coco/annotations/instances_train2017.json   boxes only
    coco_2017_train_full     same json, with masks (fully supervised upper bound)
    coco_2017_val_full       coco/annotations/instances_val2017.json     with masks
    voc_2012_train_aug_box   VOC2012/annotations/voc_2012_train_aug_cocostyle.json, boxes only
    voc_2012_val_full        VOC2012/annotations/voc_2012_val_cocostyle.json, with masks
"""
import json
import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)


class DatasetFormatError(ValueError):
    """A COCO json or one of its records is malformed; the message names the culprit."""


def _fail(json_file: str, what: str) -> None:
    raise DatasetFormatError(f"{json_file}: {what}")


def load_coco_instances(
    json_file: str,
    image_root: str,
    *,
    box_only: bool,
    check_files: bool = True,
    dataset_name: Optional[str] = None,
) -> List[Dict]:
    """Read a COCO instances json into detectron2 records (BoxMode.XYXY_ABS boxes).

    Validates what training relies on and raises ``DatasetFormatError`` naming the file,
    image or annotation: malformed json, missing keys, bbox with negative/degenerate size,
    unknown category id, annotation for an unknown image, missing image file (when
    ``check_files``). Images left with no annotation are kept (the dataloader's
    FILTER_EMPTY_ANNOTATIONS drops them for training with a logged count).

    With ``box_only`` the records carry no ``segmentation``; otherwise every annotation
    must have one (polygons or RLE).
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_file}: malformed json ({e})") from e
    if not isinstance(data, dict):
        _fail(json_file, "top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            _fail(json_file, f"missing or non-list '{key}'")

    categories = sorted(data["categories"], key=lambda c: c["id"])
    if not categories:
        _fail(json_file, "no categories")
    cat_ids = [int(c["id"]) for c in categories]
    if len(set(cat_ids)) != len(cat_ids):
        _fail(json_file, "duplicate category ids")
    id_map = {cid: i for i, cid in enumerate(cat_ids)}
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.set(
            thing_classes=[str(c["name"]) for c in categories],
            thing_dataset_id_to_contiguous_id=id_map,
        )

    images: Dict[int, Dict] = {}
    for img in data["images"]:
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                _fail(json_file, f"image {img.get('id', img)!r} lacks '{key}'")
        if int(img["id"]) in images:
            _fail(json_file, f"duplicate image id {img['id']}")
        file_name = os.path.join(image_root, img["file_name"])
        if check_files and not os.path.isfile(file_name):
            _fail(json_file, f"image id {img['id']}: image file not found: {file_name}")
        images[int(img["id"])] = {
            "file_name": file_name,
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": int(img["id"]),
            "annotations": [],
        }

    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        image_id = ann.get("image_id")
        if image_id not in images:
            _fail(json_file, f"annotation {ann_id}: unknown image_id {image_id!r}")
        if ann.get("category_id") not in id_map:
            _fail(json_file, f"annotation {ann_id} (image {image_id}): unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            _fail(json_file, f"annotation {ann_id} (image {image_id}): bbox must be [x, y, w, h], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            _fail(json_file, f"annotation {ann_id} (image {image_id}): bbox {bbox} has negative size")
        if ann.get("iscrowd", 0):
            continue  # crowd regions are not instances; COCO training ignores them
        record = {
            "bbox": [x, y, x + w, y + h],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": id_map[ann["category_id"]],
            "annotation_id": ann_id,
        }
        if not box_only:
            seg = ann.get("segmentation")
            if seg is None:
                _fail(json_file, f"annotation {ann_id} (image {image_id}): no 'segmentation' but masks were asked for")
            if isinstance(seg, list):
                seg = [p for p in seg if len(p) % 2 == 0 and len(p) >= 6]
                if not seg:
                    _fail(json_file, f"annotation {ann_id} (image {image_id}): no valid polygon")
            record["segmentation"] = seg
        images[image_id]["annotations"].append(record)

    records = list(images.values())
    n_ann = sum(len(r["annotations"]) for r in records)
    logger.info(
        "Loaded %d images, %d instances (%s) from %s", len(records), n_ann,
        "boxes only" if box_only else "with masks", json_file,
    )
    return records


def register_coco_json(
    name: str,
    json_file: str,
    image_root: str,
    *,
    box_only: bool,
    check_files: bool = True,
    **metadata,
) -> None:
    """Register a COCO-format json as detectron2 dataset ``name`` (loaded lazily).

    Boxes suffice: with ``box_only=True`` annotations need no ``segmentation``.
    """
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset '{name}' is already registered")
    DatasetCatalog.register(
        name,
        lambda: load_coco_instances(
            json_file, image_root, box_only=box_only, check_files=check_files, dataset_name=name
        ),
    )
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        box_only=box_only,
        **metadata,
    )


_BUILTIN = {
    "coco_2017_train_box": ("coco/train2017", "coco/annotations/instances_train2017.json", True),
    "coco_2017_train_full": ("coco/train2017", "coco/annotations/instances_train2017.json", False),
    "coco_2017_val_full": ("coco/val2017", "coco/annotations/instances_val2017.json", False),
    "voc_2012_train_aug_box": ("VOC2012/JPEGImages", "VOC2012/annotations/voc_2012_train_aug_cocostyle.json", True),
    "voc_2012_val_full": ("VOC2012/JPEGImages", "VOC2012/annotations/voc_2012_val_cocostyle.json", False),
}


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """Register COCO 2017 and VOC 2012 (aug) under ``root`` ($DETECTRON2_DATASETS). Idempotent."""
    root = root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    for name, (image_dir, json_rel, box_only) in _BUILTIN.items():
        if name in DatasetCatalog.list():
            continue
        # large datasets: checking 118k files at every load costs seconds; the mapper
        # raises a clear error on a missing image instead
        register_coco_json(
            name, os.path.join(root, json_rel), os.path.join(root, image_dir),
            box_only=box_only, check_files=False,
        )
