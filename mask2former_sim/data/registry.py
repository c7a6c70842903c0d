"""Dataset names: the built-in ones, the config's own COCO jsons, and the class count.

* ``register_all()`` runs on ``import mask2former_sim``: COCO / VOC names under
  $DETECTRON2_DATASETS and ``synth_train`` / ``synth_train_full`` / ``synth_val`` with the
  default settings. Registration reads and writes nothing; synthetic data is generated on
  the first ``DatasetCatalog.get``.
* ``register_datasets_for(cfg)`` registers what a config asks for: the built-in names again
  (for the current $DETECTRON2_DATASETS), the synthetic names with DATASETS.SYNTHETIC, every
  entry of DATASETS.COCO_JSONS; then checks DATASETS.TRAIN / TEST and NUM_CLASSES.
* ``resolve_num_classes(cfg)`` runs in ``engine.setup.build_cfg`` before the config is
  frozen: MODEL.SEM_SEG_HEAD.NUM_CLASSES -1 becomes the number of categories of
  DATASETS.TRAIN[0]; any other value is checked against the training sets.

DATASETS.COCO_JSONS entries are ``[name, json_file, image_root, kind]``; kind "boxes"
registers the json box-only (segmentation is never loaded: training), "masks" with masks
(evaluation, or the fully supervised upper bound). Relative paths are taken from the
working directory.
"""
import logging
import os
from typing import List, NamedTuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .datasets import BUILTIN_NAMES, dataset_num_classes, register_builtin_datasets, register_coco_json

logger = logging.getLogger(__name__)

_KINDS = {"boxes": True, "masks": False}
_SYNTH_PREFIX = "synth_"


class CocoJsonEntry(NamedTuple):
    name: str
    json_file: str
    image_root: str
    box_only: bool


# name -> entry, for the names this module registered from DATASETS.COCO_JSONS
_config_registered: dict = {}


def register_all() -> None:
    """Register every built-in name (COCO, VOC, synthetic with default settings); lazy."""
    from .synthetic import register_synthetic_datasets

    register_builtin_datasets()
    register_synthetic_datasets()


def coco_json_entries(cfg) -> List[CocoJsonEntry]:
    """DATASETS.COCO_JSONS, validated; errors name the entry."""
    entries = cfg.DATASETS.COCO_JSONS
    if not isinstance(entries, (list, tuple)):
        raise ValueError(
            "DATASETS.COCO_JSONS must be a list of [name, json_file, image_root, 'boxes' | 'masks'], "
            f"got {entries!r}"
        )
    out: List[CocoJsonEntry] = []
    for i, entry in enumerate(entries):
        where = f"DATASETS.COCO_JSONS[{i}] {list(entry) if isinstance(entry, (list, tuple)) else entry!r}"
        if not (
            isinstance(entry, (list, tuple)) and len(entry) == 4
            and all(isinstance(v, str) and v.strip() for v in entry)
        ):
            raise ValueError(
                f"{where}: expected [name, json_file, image_root, 'boxes' | 'masks'] (four non-empty strings)"
            )
        name, json_file, image_root, kind = entry
        if kind not in _KINDS:
            raise ValueError(
                f"{where}: kind must be 'boxes' (box-only: training) or 'masks' (with masks: "
                f"evaluation, full supervision), got {kind!r}"
            )
        if name in BUILTIN_NAMES or name.startswith(_SYNTH_PREFIX):
            raise ValueError(f"{where}: '{name}' is a built-in dataset name; choose another")
        if any(e.name == name for e in out):
            raise ValueError(f"{where}: name '{name}' appears twice in DATASETS.COCO_JSONS")
        json_file = os.path.expanduser(json_file)
        image_root = os.path.expanduser(image_root)
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"{where}: annotation file not found: {json_file}")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"{where}: image root is not a directory: {image_root}")
        out.append(CocoJsonEntry(name, json_file, image_root, _KINDS[kind]))
    return out


def register_coco_jsons_from_cfg(cfg) -> None:
    """Register every DATASETS.COCO_JSONS entry (lazily: the json is read on first use).

    Registering the same entry again does nothing; an entry whose json, image root or kind
    changed replaces the earlier registration of that name. A name registered by other code
    (``register_coco_json``) is an error.
    """
    for i, entry in enumerate(coco_json_entries(cfg)):
        if entry.name in DatasetCatalog.list():
            if _config_registered.get(entry.name) == entry:
                continue
            if entry.name not in _config_registered:
                raise ValueError(
                    f"DATASETS.COCO_JSONS[{i}]: dataset '{entry.name}' is already registered by other "
                    "code; choose another name"
                )
            DatasetCatalog.remove(entry.name)
            MetadataCatalog.remove(entry.name)
        register_coco_json(entry.name, entry.json_file, entry.image_root, box_only=entry.box_only)
        _config_registered[entry.name] = entry
        logger.info(
            "Registered %s (%s) from %s, images in %s", entry.name,
            "boxes only" if entry.box_only else "with masks", entry.json_file, entry.image_root,
        )


def _register_cfg_names(cfg) -> None:
    register_builtin_datasets()
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith(_SYNTH_PREFIX) for n in names):
        from .synthetic import register_synthetic_datasets_from_cfg

        register_synthetic_datasets_from_cfg(cfg)
    register_coco_jsons_from_cfg(cfg)


def _describe(name: str, where: str = "") -> str:
    json_file = MetadataCatalog.get(name).get("json_file")
    details = [d for d in (where, f"json {json_file}" if json_file else "") if d]
    return f"'{name}' ({', '.join(details)})" if details else f"'{name}'"


def check_num_classes(cfg) -> None:
    """MODEL.SEM_SEG_HEAD.NUM_CLASSES equals the category count of every registered training
    set whose count can be told without loading it (error names both numbers and the set)."""
    n = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if n == -1:
        raise ValueError(
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES is -1 (take it from the data) in a frozen config: "
            "resolve it before freezing with mask2former_sim.data.registry.resolve_num_classes "
            "(mask2former_sim.engine.setup.build_cfg does)"
        )
    if n < 1:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES must be >= 1, or -1 to take it from the data; got {n}")
    for i, name in enumerate(cfg.DATASETS.TRAIN):
        if name not in DatasetCatalog.list():
            continue
        count = dataset_num_classes(name)
        if count is not None and count != n:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {n} but the training set "
                f"{_describe(name, f'DATASETS.TRAIN[{i}]')} has {count} categories: set NUM_CLASSES "
                f"{count}, or -1 to take it from the data"
            )


def resolve_num_classes(cfg) -> None:
    """Before freezing: NUM_CLASSES -1 -> number of categories of DATASETS.TRAIN[0] (of
    DATASETS.TEST[0] when there is no training set); any other value is checked against the
    training sets. Registers the config's datasets it can (built-in, synthetic, COCO_JSONS);
    names registered later by other code are checked by ``register_datasets_for``."""
    _register_cfg_names(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    if head.NUM_CLASSES == -1:
        source = (list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST) or [None])[0]
        if source is None:
            raise ValueError(
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES -1 takes the count from DATASETS.TRAIN[0], but no dataset is named"
            )
        if source not in DatasetCatalog.list():
            raise KeyError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES -1: dataset '{source}' is not registered, so its "
                "categories cannot be counted (list it in DATASETS.COCO_JSONS)"
            )
        count = dataset_num_classes(source)
        if count is None:
            raise FileNotFoundError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES -1: cannot count the categories of {_describe(source)}: "
                "its json is not there"
            )
        head.NUM_CLASSES = count
        logger.info("MODEL.SEM_SEG_HEAD.NUM_CLASSES = %d (the categories of '%s')", count, source)
    check_num_classes(cfg)


def register_datasets_for(cfg) -> None:
    """Register the datasets cfg names (synthetic ones are generated on first use) and check
    them: every name of DATASETS.TRAIN / TEST registered, evaluation sets with masks, and
    NUM_CLASSES equal to the training sets' category count."""
    _register_cfg_names(cfg)
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        raise KeyError(
            f"dataset(s) {missing} are not registered; known: {sorted(DatasetCatalog.list())[:20]}... "
            "list your own COCO json in DATASETS.COCO_JSONS ([name, json_file, image_root, "
            "'boxes' | 'masks']) or register it with mask2former_sim.data.datasets.register_coco_json"
        )
    for i, name in enumerate(cfg.DATASETS.TEST):
        if MetadataCatalog.get(name).get("box_only", False):
            raise ValueError(
                f"DATASETS.TEST[{i}] '{name}' is registered box-only, but mask AP needs its masks: "
                "evaluate on a dataset registered with masks (kind 'masks' in DATASETS.COCO_JSONS)"
            )
    check_num_classes(cfg)

