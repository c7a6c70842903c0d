"""mask2former-sim: box-supervised instance segmentation (SIM on Mask2Former)."""
from . import compat  # noqa: F401  (must run before detectron2 is imported)

__version__ = "0.1.0"
