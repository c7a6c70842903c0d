"""Backbones. ResNets come from detectron2 ("build_resnet_backbone", torchvision-style with
MODEL.RESNETS.STRIDE_IN_1X1 False); Swin comes from timm ("build_timm_swin_backbone" or
its alias "TimmSwinBackbone"). Importing this package registers the Swin builders."""
from detectron2.modeling import build_resnet_backbone

from .swin import TimmSwinBackbone, build_timm_swin_backbone

__all__ = ["TimmSwinBackbone", "build_timm_swin_backbone", "build_resnet_backbone"]
