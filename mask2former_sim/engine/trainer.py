"""detectron2 trainer for box-supervised Mask2Former.

Differences from DefaultTrainer: the positional (exactly resumable) training stream,
AdamW parameter groups with full-model clipping, COCO evaluation without the C++ COCOeval,
RNG states in the checkpoint, and the optional box-crop pretraining of the backbone
(MODEL.BACKBONE_PRETRAIN) on a fresh start, and SIM's EMA teacher (engine/sim_hooks.py):
attached after the weights are loaded, updated after every step, saved in checkpoints.
"""
import logging
import math
import os
import random
import re

import numpy as np
import torch

from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.loader import build_positional_train_loader
from ..data.mappers import BoxSupDatasetMapper, BoxSupTestMapper
from .backbone_pretrain import check_pretrain_config, ensure_pretrained_backbone, load_pretrained_backbone
from . import fault_injection
from .checkpoint import AtomicCheckpointer
from .optimizer import build_optimizer
from .resource_hooks import PeakMemoryHook
from .sim_hooks import BANK_KEY, TEACHER_KEY, TeacherEMAHook, attach_teacher, load_teacher_for_evaluation, unwrap

logger = logging.getLogger(__name__)


def _numpy_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state):
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


_OUTPUT_SUFFIX = re.compile(r"^(.*)_(\d+)$")


def nonfinite_loss_message(loss_dict, iteration: int, resume_point: str = "") -> str:
    """Which loss terms are not finite, at which decoder output (``loss_proj_3``: aux output 3; no
    suffix: the final output) and iteration; and where ``--resume`` would continue from."""
    bad = []
    for key, value in loss_dict.items():
        v = float(value.detach().float().cpu()) if isinstance(value, torch.Tensor) else float(value)
        if math.isfinite(v):
            continue
        m = _OUTPUT_SUFFIX.match(key)
        where = f"decoder output aux_{m.group(2)}" if m else "the final decoder output"
        bad.append(f"{m.group(1) if m else key} = {v} at {where}")
    terms = "; ".join(bad) if bad else "(every term is finite on this process; another rank's is not)"
    return (
        f"non-finite loss at iteration {iteration}: {terms}. Nothing of this step was applied; "
        + (f"--resume continues from {resume_point}" if resume_point else "no checkpoint was written yet")
    )


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # SOLVER.REFERENCE_WORLD_SIZE: scaled here (DefaultTrainer's own call then finds nothing to
        # do), so that self.cfg, the loaders, hooks, model and pretraining all see the scaled cfg
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        # seed before the model is built so that two runs of one config start identically
        seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)
        check_pretrain_config(cfg)
        self._pending_teacher_state = None
        super().__init__(cfg)
        self._trainer._write_metrics = self._checked_write_metrics(self._trainer._write_metrics)

    def _checked_write_metrics(self, write_metrics):
        """detectron2 raises "Loss became infinite or NaN" (before the optimizer step) with every
        term; re-raise naming the non-finite terms, their decoder output and the resume point."""

        def checked(loss_dict, data_time, prefix=""):
            try:
                write_metrics(loss_dict, data_time, prefix)
            except FloatingPointError as e:
                last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else ""
                raise FloatingPointError(nonfinite_loss_message(loss_dict, self.iter, last)) from e

        return checked

    @staticmethod
    def auto_scale_workers(cfg, num_workers: int):
        """detectron2's scaling for a world size other than SOLVER.REFERENCE_WORLD_SIZE (batch and
        BASE_LR x s, MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD, EVAL_PERIOD / s, with
        s = num_workers / REFERENCE_WORLD_SIZE), plus this project's schedules counted in
        iterations of that batch: MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS, MODEL.SIM.WARMUP_ITERS and
        the backbone pretraining (BACKBONE_PRETRAIN.ITERS / s, BACKBONE_PRETRAIN.BASE_LR x s)."""
        reference = cfg.SOLVER.REFERENCE_WORLD_SIZE
        scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
        if scaled is cfg:
            return cfg
        s = num_workers / reference
        frozen = scaled.is_frozen()
        scaled.defrost()
        m = scaled.MODEL
        m.BOXSUP.PAIRWISE_WARMUP_ITERS = int(round(m.BOXSUP.PAIRWISE_WARMUP_ITERS / s))
        m.SIM.WARMUP_ITERS = int(round(m.SIM.WARMUP_ITERS / s))
        m.BACKBONE_PRETRAIN.ITERS = max(1, int(round(m.BACKBONE_PRETRAIN.ITERS / s)))
        m.BACKBONE_PRETRAIN.BASE_LR = m.BACKBONE_PRETRAIN.BASE_LR * s
        if frozen:
            scaled.freeze()
        logger.info(
            "Auto-scaled from %d to %d workers: pairwise warm-up %d, SIM warm-up %d, backbone pretraining "
            "%d iterations at peak LR %g", reference, num_workers, m.BOXSUP.PAIRWISE_WARMUP_ITERS,
            m.SIM.WARMUP_ITERS, m.BACKBONE_PRETRAIN.ITERS, m.BACKBONE_PRETRAIN.BASE_LR,
        )
        return scaled

    @classmethod
    def build_train_loader(cls, cfg, start_iter: int = 0):
        records = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        mapper = BoxSupDatasetMapper(cfg, is_train=True)
        # every rank must draw the same permutation: a fixed seed even when SEED < 0
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        return build_positional_train_loader(
            records,
            mapper,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            seed=seed,
            start_iter=start_iter,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=BoxSupTestMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox", "segm"),
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=False,
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def load_for_evaluation(cls, cfg, model, resume: bool = False) -> None:
        """--eval-only: MODEL.WEIGHTS (or OUTPUT_DIR/last_checkpoint with resume) into ``model``;
        with MODEL.MASK_FORMER.TEST.EVAL_TEACHER also the SIM teacher saved in that checkpoint."""
        extra = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
        if cfg.MODEL.MASK_FORMER.TEST.EVAL_TEACHER:
            load_teacher_for_evaluation(model, extra or {}, cfg.MODEL.WEIGHTS or cfg.OUTPUT_DIR)

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; the
        # PeriodicCheckpointer built below and resume_or_load use the crash-safe one instead
        if not isinstance(self.checkpointer, AtomicCheckpointer):
            old = self.checkpointer
            self.checkpointer = AtomicCheckpointer(old.model, old.save_dir, save_to_disk=old.save_to_disk,
                                                   **old.checkpointables)
        fault_injection.install(self)  # MASK2FORMER_SIM_PAUSE_AT step:N (tests kill the run there); unset: nothing
        hooks = super().build_hooks()
        # peak memory into metrics.json (tools/compare_runs.py), before the writer
        at = next((i for i, h in enumerate(hooks) if type(h).__name__ == "PeriodicWriter"), len(hooks))
        hooks.insert(at, PeakMemoryHook(self.cfg.MODEL.DEVICE))
        if self.cfg.MODEL.SIM.ENABLED:
            # before the checkpointer: the checkpoint of iteration i holds the teacher after step i
            at = next((i for i, h in enumerate(hooks) if type(h).__name__ == "PeriodicCheckpointer"), len(hooks))
            hooks.insert(at, TeacherEMAHook())
            if self.cfg.MODEL.SIM.EVAL_PSEUDO_MASKS:
                from ..evaluation.pseudo_masks import add_pseudo_mask_eval_hook

                hooks = add_pseudo_mask_eval_hook(hooks, self.cfg)
        return hooks

    def resume_or_load(self, resume=True):
        if self.cfg.MODEL.BACKBONE_PRETRAIN.ENABLED and not (resume and self.checkpointer.has_checkpoint()):
            # a fresh start: the backbone begins from the box-crop pretraining (MODEL.WEIGHTS is "")
            load_pretrained_backbone(self.model, ensure_pretrained_backbone(self.cfg))
        super().resume_or_load(resume=resume)
        if self.cfg.MODEL.SIM.ENABLED:
            # after every weight source is in place (pretraining, MODEL.WEIGHTS or the checkpoint)
            attach_teacher(self.model, self._pending_teacher_state)
            self._pending_teacher_state = None
        if self.start_iter > 0:
            # continue the data stream exactly where the checkpointed run stopped
            loader = self._trainer.data_loader
            loader.dataset.start_position = self.start_iter * self.cfg.SOLVER.IMS_PER_BATCH
            self._trainer._data_loader_iter = iter(loader)
            logger.info("Resuming the data stream at iteration %d", self.start_iter)
        if resume and self.start_iter >= self.max_iter and not os.path.isfile(
                os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")):
            # killed while model_final.pth was written (after the last iteration's periodic
            # checkpoint): nothing is left to train, write it from the state just loaded
            logger.info("Writing the missing model_final.pth from the checkpoint of iteration %d", self.iter)
            self.checkpointer.save("model_final", iteration=self.iter)

    def state_dict(self):
        state = super().state_dict()
        # detectron2 v0.6's DefaultTrainer leaves the optimizer (and AMP grad scaler) out
        state["_trainer"] = self._trainer.state_dict()
        state["rng"] = {
            "torch": torch.get_rng_state(),
            # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        teacher = unwrap(self.model).teacher
        if teacher is not None:
            state[TEACHER_KEY] = teacher.state_dict()
        copy_paste = getattr(unwrap(self.model), "copy_paste", None)
        bank = copy_paste.bank_state() if copy_paste is not None else None
        if bank is not None:  # MODEL.SIM.COPY_PASTE.BANK_IN_CHECKPOINT: this process's bank
            state[BANK_KEY] = bank
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.cfg.MODEL.SIM.ENABLED:
            if TEACHER_KEY in state_dict:
                # the teacher is attached after loading (resume_or_load): keep its state until then
                self._pending_teacher_state = state_dict[TEACHER_KEY]
            else:
                logger.warning("checkpoint has no SIM teacher: it restarts from the loaded student")
        copy_paste = getattr(unwrap(self.model), "copy_paste", None)
        if copy_paste is not None and copy_paste.bank_in_checkpoint:
            if BANK_KEY in state_dict:
                copy_paste.load_bank_state(state_dict[BANK_KEY])
                logger.info("copy-paste bank restored from the checkpoint (%d entries)", len(copy_paste.bank))
            else:
                logger.warning("checkpoint has no copy-paste bank: it refills after the warm-up")
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("checkpoint has no optimizer state: the optimizer restarts")
        rng = state_dict.get("rng")
        if rng is None:
            logger.warning("checkpoint has no RNG state: random streams restart")
            return
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
        random.setstate(rng["python"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
