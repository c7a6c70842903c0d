"""Pseudo-mask quality (IoU of SIM's maps and the student's masks against GT masks) and its panels."""
from .pseudo_masks import (  # noqa: F401
    COLUMNS,
    PseudoMaskAccumulator,
    PseudoMaskEvalHook,
    PseudoMaskEvalMapper,
    add_pseudo_mask_eval_hook,
    collect_pseudo_mask_ious,
    evaluate_pseudo_masks,
    load_model_for_pseudo_masks,
    markdown_table,
    mask_iou,
    pseudo_mask_outputs,
)
from .pseudo_mask_panels import write_pseudo_mask_panels  # noqa: F401
