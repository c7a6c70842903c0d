"""Swin Transformer backbone through timm (``features_only``), as a detectron2 Backbone.

Outputs res2..res5 (strides 4/8/16/32), each followed by its own LayerNorm as in
Mask2Former's Swin. Differences from timm's classifier settings, on purpose:
- ``always_partition=True``: every stage keeps its window size and shifts every other
  block, whatever the input size (Mask2Former's detection Swin does the same; timm's
  default would drop the shift in stages whose 224-px grid fits one window).
- ``dynamic_img_size=True``: any input size whose sides are multiples of the patch size
  works; timm pads each stage to whole windows and builds the shift masks per forward.
Weights are never downloaded (pretrained=False); MODEL.WEIGHTS supplies them.
"""
from typing import Dict, List, Optional, Sequence

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

_STAGE_NAMES = ("res2", "res3", "res4", "res5")


class TimmSwinBackbone(Backbone):
    """timm Swin as a detectron2 Backbone. Input (B, 3, H, W), H and W multiples of 4; the
    meta-architecture pads to ``size_divisibility`` = 32 so that every stride divides
    exactly. Returns {name: (B, C, ceil(H/s), ceil(W/s))} for ``out_features``.

    Submodules: ``model`` (timm FeatureListNet: patch_embed, layers_0..layers_3) and
    ``out_norms`` (ModuleDict res2..res5 of LayerNorm) for checkpoint converters.
    """

    def __init__(
        self,
        timm_name: str,
        out_features: Sequence[str] = _STAGE_NAMES,
        img_size: int = 224,
        window_size: int = 7,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        always_partition: bool = True,
    ):
        super().__init__()
        bad = [f for f in out_features if f not in _STAGE_NAMES]
        if bad or not out_features:
            raise ValueError(f"TimmSwinBackbone: out_features {list(out_features)} must be a non-empty subset of {_STAGE_NAMES}")
        if not timm.is_model(timm_name) or "swin" not in timm_name:
            raise ValueError(f"TimmSwinBackbone: {timm_name!r} is not a timm Swin model name (MODEL.SWIN.TIMM_NAME)")
        self.model = timm.create_model(
            timm_name,
            pretrained=False,
            features_only=True,
            out_indices=(0, 1, 2, 3),
            img_size=img_size,
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            always_partition=always_partition,
        )
        if use_checkpoint:
            self.model.set_grad_checkpointing(True)
        channels: List[int] = self.model.feature_info.channels()
        strides: List[int] = self.model.feature_info.reduction()
        if strides != [4, 8, 16, 32]:
            raise ValueError(f"TimmSwinBackbone: {timm_name} has strides {strides}, expected [4, 8, 16, 32]")
        self.timm_name = timm_name
        self._out_features = [f for f in _STAGE_NAMES if f in out_features]
        self._out_feature_channels = {n: c for n, c in zip(_STAGE_NAMES, channels)}
        self._out_feature_strides = {n: s for n, s in zip(_STAGE_NAMES, strides)}
        self.out_norms = nn.ModuleDict({n: nn.LayerNorm(self._out_feature_channels[n]) for n in self._out_features})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"TimmSwinBackbone expects (B, 3, H, W) images, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"TimmSwinBackbone: input size {h}x{w} must be divisible by the patch size 4")
        feats = self.model(x)  # NHWC maps, stride 4 first
        out = {}
        for name, f in zip(_STAGE_NAMES, feats):
            if name in self.out_norms:
                out[name] = self.out_norms[name](f).permute(0, 3, 1, 2).contiguous()
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32


def _check_swin_cfg(cfg, model: TimmSwinBackbone) -> None:
    """Fail loudly when MODEL.SWIN's architecture keys disagree with the timm model."""
    sw = cfg.MODEL.SWIN
    stages = [getattr(model.model, f"layers_{i}") for i in range(4)]
    got = {
        "EMBED_DIM": model._out_feature_channels["res2"],
        "DEPTHS": [len(s.blocks) for s in stages],
        "NUM_HEADS": [s.blocks[0].attn.num_heads for s in stages],
        "MLP_RATIO": stages[0].blocks[0].mlp.fc1.out_features / model._out_feature_channels["res2"],
    }
    want = {
        "EMBED_DIM": sw.EMBED_DIM,
        "DEPTHS": list(sw.DEPTHS),
        "NUM_HEADS": list(sw.NUM_HEADS),
        "MLP_RATIO": float(sw.MLP_RATIO),
    }
    wrong = [f"MODEL.SWIN.{k}={want[k]} but {sw.TIMM_NAME} has {got[k]}" for k in got if got[k] != want[k]]
    if wrong:
        raise ValueError("TimmSwinBackbone config mismatch: " + "; ".join(wrong))


@BACKBONE_REGISTRY.register()
def build_timm_swin_backbone(cfg, input_shape: Optional[ShapeSpec] = None) -> TimmSwinBackbone:
    """MODEL.BACKBONE.NAME "build_timm_swin_backbone" (alias "TimmSwinBackbone")."""
    if input_shape is not None and input_shape.channels not in (None, 3):
        raise ValueError(f"TimmSwinBackbone needs 3 input channels, got {input_shape.channels}")
    sw = cfg.MODEL.SWIN
    model = TimmSwinBackbone(
        sw.TIMM_NAME,
        out_features=list(sw.OUT_FEATURES),
        img_size=sw.PRETRAIN_IMG_SIZE,
        window_size=sw.WINDOW_SIZE,
        drop_path_rate=sw.DROP_PATH_RATE,
        use_checkpoint=sw.USE_CHECKPOINT,
    )
    _check_swin_cfg(cfg, model)
    return model


def _timm_swin_alias(cfg, input_shape: Optional[ShapeSpec] = None) -> TimmSwinBackbone:
    return build_timm_swin_backbone(cfg, input_shape)


# MODEL.BACKBONE.NAME "TimmSwinBackbone" builds the same thing
_timm_swin_alias.__name__ = "TimmSwinBackbone"
BACKBONE_REGISTRY.register(_timm_swin_alias)
