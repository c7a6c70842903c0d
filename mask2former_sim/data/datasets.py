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
from typing import Callable, Dict, List, Optional

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

    ``iscrowd: 1`` annotations are left out of the records (they never become box targets)
    and counted in the log; COCO evaluation reads them from the json itself, as ignore regions.

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

    num_crowd = 0
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            _fail(json_file, f"annotation {ann!r} is not an object")
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
            num_crowd += 1  # crowd regions are not instances: never a box target
            continue
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
    if num_crowd:
        logger.info(
            "Left out %d iscrowd annotations of %s (never box targets; COCO evaluation treats "
            "them as ignore regions)", num_crowd, json_file,
        )
    return records


_categories_cache: Dict[tuple, List[Dict]] = {}


def read_coco_categories(json_file: str) -> List[Dict]:
    """The ``categories`` of a COCO json, sorted by id (cached by path, size and mtime).

    Raises FileNotFoundError / DatasetFormatError naming the file, like ``load_coco_instances``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    st = os.stat(json_file)
    key = (os.path.abspath(json_file), st.st_size, st.st_mtime_ns)
    if key not in _categories_cache:
        try:
            with open(json_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{json_file}: malformed json ({e})") from e
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not cats:
            _fail(json_file, "missing, empty or non-list 'categories'")
        for c in cats:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                _fail(json_file, f"category {c!r} lacks 'id' or 'name'")
        _categories_cache[key] = sorted(cats, key=lambda c: c["id"])
    return _categories_cache[key]


def register_coco_json(
    name: str,
    json_file: str,
    image_root: str,
    *,
    box_only: bool,
    check_files: bool = True,
    prepare: Optional[Callable[[], object]] = None,
    **metadata,
) -> None:
    """Register a COCO-format json as detectron2 dataset ``name`` (loaded lazily).

    Boxes suffice: with ``box_only=True`` annotations need no ``segmentation``. ``prepare``,
    if given, runs before every load (e.g. generates the files on first use).
    """
    if name in DatasetCatalog.list():
        raise ValueError(f"dataset '{name}' is already registered")

    def load() -> List[Dict]:
        if prepare is not None:
            prepare()
        return load_coco_instances(
            json_file, image_root, box_only=box_only, check_files=check_files, dataset_name=name
        )

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        box_only=box_only,
        **metadata,
    )


# name: (image dir, json, box_only, number of categories), paths under the datasets root
_BUILTIN = {
    "coco_2017_train_box": ("coco/train2017", "coco/annotations/instances_train2017.json", True, 80),
    "coco_2017_train_full": ("coco/train2017", "coco/annotations/instances_train2017.json", False, 80),
    "coco_2017_val_full": ("coco/val2017", "coco/annotations/instances_val2017.json", False, 80),
    "voc_2012_train_aug_box": ("VOC2012/JPEGImages", "VOC2012/annotations/voc_2012_train_aug_cocostyle.json", True, 20),
    "voc_2012_val_full": ("VOC2012/JPEGImages", "VOC2012/annotations/voc_2012_val_cocostyle.json", False, 20),
}
BUILTIN_NAMES = tuple(_BUILTIN)

_builtin_registered: Dict[str, tuple] = {}


def register_builtin_datasets(root: Optional[str] = None) -> None:
    """Register COCO 2017 and VOC 2012 (aug) under ``root`` (default $DETECTRON2_DATASETS, else
    ./datasets). Lazy: nothing is read before ``DatasetCatalog.get``.

    Calling again with the same root does nothing; with another root the names are registered
    again there. A name that someone else registered first is left alone.
    """
    root = os.path.expanduser(root or os.getenv("DETECTRON2_DATASETS", "datasets"))
    for name, (image_dir, json_rel, box_only, num_categories) in _BUILTIN.items():
        key = (os.path.join(root, json_rel), os.path.join(root, image_dir), box_only)
        if name in DatasetCatalog.list():
            if name not in _builtin_registered or _builtin_registered[name] == key:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # large datasets: checking 118k files at every load costs seconds; the mapper
        # raises a clear error on a missing image instead
        register_coco_json(
            name, key[0], key[1], box_only=box_only, check_files=False, num_categories=num_categories,
        )
        _builtin_registered[name] = key


def dataset_num_classes(name: str) -> Optional[int]:
    """Number of categories of registered dataset ``name`` without loading its records:
    from its metadata (thing_classes, or the built-in count), else from the categories of
    its json (read once and cached). None when it cannot be told (the json is not there yet).
    """
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is not None:
        return len(meta.thing_classes)
    if meta.get("num_categories") is not None:
        return int(meta.num_categories)
    json_file = meta.get("json_file")
    if json_file and os.path.isfile(json_file):
        return len(read_coco_categories(json_file))
    return None
