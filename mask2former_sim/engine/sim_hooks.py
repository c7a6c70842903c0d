"""Trainer wiring of SIM's EMA teacher: its hook, its place in checkpoints, its loading for evaluation.

The teacher is created from the student *after* the weights are loaded (fresh start:
backbone pretraining and MODEL.WEIGHTS; resume: the checkpoint's student, then the
checkpoint's teacher on top), updated after every optimizer step by ``TeacherEMAHook``
(registered before the periodic checkpointer, so the checkpoint of iteration i holds the
teacher after step i), and saved under ``checkpoint["trainer"]["sim_teacher"]``.
"""
import logging
from typing import Mapping, Optional

from detectron2.engine import HookBase
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

TEACHER_KEY = "sim_teacher"
BANK_KEY = "sim_copy_paste_bank"  # checkpoint["trainer"][BANK_KEY], with BANK_IN_CHECKPOINT


def unwrap(model):
    """The model inside DDP (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class TeacherEMAHook(HookBase):
    """teacher <- m * teacher + (1 - m) * student after every optimizer step (METHOD.md §2); every
    ``period`` steps (the writer's) also the pseudo labeler's statistics of the step into the
    EventStorage: ``sim/pseudo_pos_fraction``, ``sim/pseudo_neg_fraction`` (in-box cells pushed up /
    down) and ``sim/proto_pixels`` (pixels of the prototype update, all processes; with
    MODEL.SIM.BACKGROUND_PROTOTYPES also ``sim/proto_bg_pixels``); with copy-paste
    ``sim/bank_entries``, ``sim/bank_mib``, ``sim/pasted_instances``, ``sim/dropped_originals``."""

    def __init__(self, period: int = 20):
        self._period = int(period)

    def after_step(self):
        model = unwrap(self.trainer.model)
        model.update_teacher()
        it = self.trainer.iter + 1
        if self._period > 0 and (it % self._period == 0 or it == self.trainer.max_iter):
            pseudo = getattr(model.criterion, "last_pseudo", None)
            stats = getattr(pseudo, "stats", None) or {}
            names = {"pseudo_pos_fraction": "sim/pseudo_pos_fraction", "pseudo_neg_fraction": "sim/pseudo_neg_fraction",
                     "num_pixels": "sim/proto_pixels", "bg_pixels": "sim/proto_bg_pixels"}
            values = {names[k]: float(v) for k, v in stats.items() if k in names}
            copy_paste = getattr(model, "copy_paste", None)
            if copy_paste is not None:  # bank size and memory, instances pasted / originals dropped this step
                values.update({f"sim/{k}": v for k, v in copy_paste.last_stats.items()})
            if values:
                self.trainer.storage.put_scalars(**values, smoothing_hint=False)


def attach_teacher(model, state: Optional[Mapping] = None):
    """Create the teacher from the student's current weights; load ``state`` over it when given."""
    model = unwrap(model)
    teacher = model.attach_teacher()
    if state is not None:
        teacher.load_state_dict(state)
        logger.info("SIM teacher restored from the checkpoint")
    else:
        logger.info("SIM teacher created from the student's current weights (momentum %g)", teacher.momentum)
    return teacher


def load_teacher_for_evaluation(model, checkpoint_extra: Mapping, weights: str) -> None:
    """--eval-only with MODEL.MASK_FORMER.TEST.EVAL_TEACHER: the teacher saved in ``weights``."""
    state = (checkpoint_extra.get("trainer") or {}).get(TEACHER_KEY)
    if state is None:
        raise KeyError(
            f"MODEL.MASK_FORMER.TEST.EVAL_TEACHER: {weights} holds no SIM teacher "
            f"(checkpoint['trainer']['{TEACHER_KEY}']); evaluate a checkpoint of a SIM training "
            "(model_final.pth or model_XXXXXXX.pth in its OUTPUT_DIR)"
        )
    attach_teacher(model, state)
