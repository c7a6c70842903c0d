"""Model components; importing this registers backbones, pixel decoder, decoder and meta-arch."""
from . import backbone  # noqa: F401
from .meta_arch import BoxSupMaskFormer

__all__ = ["BoxSupMaskFormer"]
