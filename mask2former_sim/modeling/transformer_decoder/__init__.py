"""Transformer decoders (registry ``TRANSFORMER_DECODER``)."""
from detectron2.utils.registry import Registry
from torch import nn

TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders of Mask2Former-style models. A registered class is called as
``cls(cfg, in_channels)`` and returns an ``nn.Module``.
"""


def build_transformer_decoder(cfg, in_channels: int) -> nn.Module:
    """Build cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME for ``in_channels``-channel features."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        raise KeyError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not registered; "
            f"known: {sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)}"
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels)


# registers MultiScaleMaskedTransformerDecoder (imported after the registry exists)
from .masked_attention_decoder import MultiScaleMaskedTransformerDecoder  # noqa: E402
from .position_encoding import PositionEmbeddingSine  # noqa: E402

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "PositionEmbeddingSine",
]
