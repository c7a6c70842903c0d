"""Config set-up shared by train_net.py, the demo job, tools and tests."""
import logging
import os
from typing import Sequence

from detectron2.config import CfgNode
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import get_default_cfg
from ..data.registry import register_datasets_for, resolve_num_classes

logger = logging.getLogger(__name__)


def build_cfg(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """Defaults + yaml + command-line overrides; AMP is switched off on the CPU."""
    cfg = get_default_cfg()
    if config_file and "://" not in config_file and not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.ENABLED = False  # detectron2's AMPTrainer needs CUDA
    resolve_num_classes(cfg)  # registers the config's datasets; NUM_CLASSES -1 -> from the data
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """train_net.py's set-up: config, logging, output dir, dataset registration."""
    cfg = build_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    # default_setup logs "detectron2" and "fvcore" only: our trainer, data and pretraining logs too
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mask2former_sim")
    register_datasets_for(cfg)
    return cfg
