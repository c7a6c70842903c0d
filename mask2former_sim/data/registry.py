"""Registers every dataset a config names: built-in COCO/VOC names and the synthetic set."""
from detectron2.data import DatasetCatalog

from .datasets import register_builtin_datasets


def register_datasets_for(cfg) -> None:
    """Register the datasets in cfg.DATASETS.TRAIN/TEST (synthetic ones are generated on first use)."""
    register_builtin_datasets()
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(n.startswith("synth_") for n in names):
        from .synthetic import register_synthetic_datasets_from_cfg

        register_synthetic_datasets_from_cfg(cfg)
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        raise KeyError(
            f"dataset(s) {missing} are not registered; known: {sorted(DatasetCatalog.list())[:20]}... "
            "register your own json with mask2former_sim.data.datasets.register_coco_json"
        )
