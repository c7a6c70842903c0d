"""Pixel decoders (registry ``PIXEL_DECODER``)."""
from typing import Dict

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

PIXEL_DECODER_REGISTRY = Registry("PIXEL_DECODER")
PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of Mask2Former-style models. A registered class is called as
``cls(cfg, input_shape)`` and must provide ``forward_features(features) ->
(mask_features, multi_scale_features)``.
"""


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME on backbone outputs ``input_shape``."""
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    if name not in PIXEL_DECODER_REGISTRY:
        raise KeyError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} is not registered; "
            f"known: {sorted(k for k, _ in PIXEL_DECODER_REGISTRY)}"
        )
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise TypeError(f"pixel decoder {name!r} has no forward_features method")
    return model


# registers MSDeformAttnPixelDecoder (imported after the registry exists)
from .msdeformattn import MSDeformAttn, MSDeformAttnEncoder, MSDeformAttnPixelDecoder  # noqa: E402

__all__ = [
    "PIXEL_DECODER_REGISTRY",
    "build_pixel_decoder",
    "MSDeformAttn",
    "MSDeformAttnEncoder",
    "MSDeformAttnPixelDecoder",
]
