"""mask2former-sim: box-supervised instance segmentation (SIM on Mask2Former).

Importing the package registers everything a config can name, as detectron2 projects do:
the meta-architecture, backbones, pixel decoder and transformer decoder (in detectron2's
registries), and every built-in dataset name (COCO / VOC under $DETECTRON2_DATASETS,
synth_train / synth_train_full / synth_val). Dataset registration reads and writes nothing:
the synthetic data is generated on the first ``DatasetCatalog.get``.
"""
from . import compat  # noqa: F401  (must run before detectron2 is imported)

__version__ = "0.1.0"

from . import modeling  # noqa: E402,F401  (registers the model components)
from .data.registry import register_all as _register_all  # noqa: E402

_register_all()
