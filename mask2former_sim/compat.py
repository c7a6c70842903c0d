"""Compatibility shims for running detectron2 v0.6 on current libraries.

Imported by ``mask2former_sim/__init__.py`` before anything touches detectron2.
"""
from PIL import Image

# detectron2 v0.6 uses Image.LINEAR as a default argument; Pillow 10 removed that alias.
if not hasattr(Image, "LINEAR"):
    Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]
