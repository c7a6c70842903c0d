"""Box-supervised losses (projection, pairwise), box targets and point-sampled mask losses."""
from .box_targets import boxes_to_grid_masks, downsample_valid, grid_sample_centres
from .pairwise import (
    gather_neighbours,
    image_color_similarity,
    images_to_color_similarity,
    neighbour_offsets,
    pairwise_edge_weights,
    pairwise_loss,
    pairwise_loss_weighted,
    rgb_to_lab,
)
from .point_mask import (
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    dice_loss,
    point_mask_losses,
    point_sample,
    sample_uncertain_points,
    sigmoid_ce_loss,
    uniform_points,
)
from .projection import (
    dice_coefficient_loss,
    projection_cost,
    projection_cost_from_logits,
    projection_loss,
    projection_loss_from_logits,
)

__all__ = [
    "boxes_to_grid_masks",
    "downsample_valid",
    "grid_sample_centres",
    "gather_neighbours",
    "image_color_similarity",
    "images_to_color_similarity",
    "neighbour_offsets",
    "pairwise_edge_weights",
    "pairwise_loss",
    "pairwise_loss_weighted",
    "rgb_to_lab",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "dice_loss",
    "point_mask_losses",
    "point_sample",
    "sample_uncertain_points",
    "sigmoid_ce_loss",
    "uniform_points",
    "dice_coefficient_loss",
    "projection_cost",
    "projection_cost_from_logits",
    "projection_loss",
    "projection_loss_from_logits",
]
