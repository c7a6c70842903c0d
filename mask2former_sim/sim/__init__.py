"""SIM components (METHOD.md §2): one module per equation family.

- ``teacher``: the EMA teacher (a copy outside the student's module tree).
- ``prototypes``: class prototypes, semantic maps (Eq.1) and their update (Eq.2-5).
- ``pseudo_masks``: IoU-weighted positives (Eq.6), self-correction (Eq.7), pseudo targets
  and loss (Eq.8).
- ``appearance``: not in the paper, a per-image colour model of each GT against its image's
  background (MODEL.SIM.APPEARANCE), mixed into Eq.7's semantic term.

These import only torch; the criterion, meta-architecture and trainer wire them.
"""
from .appearance import appearance_maps, colour_bins, colour_histograms
from .prototypes import PrototypeMemory, center_features, normalize_features, semantic_maps, sinkhorn
from .pseudo_masks import (
    adaptive_high_thresh,
    instance_maps,
    mask_boxes,
    paired_box_iou,
    positive_weights,
    pseudo_mask_loss,
    pseudo_targets,
    self_correct,
)
from .teacher import EMATeacher

__all__ = [
    "appearance_maps",
    "colour_bins",
    "colour_histograms",
    "EMATeacher",
    "PrototypeMemory",
    "normalize_features",
    "center_features",
    "semantic_maps",
    "sinkhorn",
    "adaptive_high_thresh",
    "instance_maps",
    "mask_boxes",
    "paired_box_iou",
    "positive_weights",
    "pseudo_mask_loss",
    "pseudo_targets",
    "self_correct",
]
