"""The meta-architecture: backbone -> pixel decoder -> masked-attention decoder -> criterion.

Training returns the criterion's weighted loss dict; inference returns, per image,
``{"instances": Instances}`` with pred_masks (bool, original resolution), pred_boxes
(tight boxes of the masks), scores (class prob x mean mask prob inside the mask) and
pred_classes.

SIM (MODEL.SIM.ENABLED): an EMA teacher of backbone, pixel decoder and transformer decoder
(``mask2former_sim/sim/teacher.py``) runs on the same padded batch in eval mode under
no_grad, and its outputs feed the criterion's pseudo labels. The teacher lives outside this
module's tree (DDP, ``train()``, the optimizer and ``state_dict`` never see it); the trainer
attaches it after the weights are loaded (``attach_teacher``), updates it after every
optimizer step (``update_teacher``) and saves it in the checkpoint.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..utils.boxes import masks_to_boxes
from ..sim.copy_paste import CopyPaste
from ..sim.teacher import EMATeacher
from .criterion import BoxSupSetCriterion
from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder


@META_ARCH_REGISTRY.register()
class BoxSupMaskFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.MODEL.SIM.COPY_PASTE.ENABLED and not (cfg.MODEL.SIM.ENABLED and cfg.MODEL.SIM.PSEUDO_LOSS):
            raise ValueError(
                "MODEL.SIM.COPY_PASTE.ENABLED needs SIM's teacher instance maps: set MODEL.SIM.ENABLED True "
                "and MODEL.SIM.PSEUDO_LOSS True"
            )
        self.backbone = build_backbone(cfg)
        self.pixel_decoder = build_pixel_decoder(cfg, self.backbone.output_shape())
        self.predictor = build_transformer_decoder(cfg, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM)
        self.criterion = BoxSupSetCriterion.from_config(cfg)
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        self.full_mask_supervision = cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION
        self.size_divisibility = max(cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY, self.backbone.size_divisibility)
        self.mask_threshold = cfg.MODEL.MASK_FORMER.TEST.MASK_THRESHOLD
        self.detections_per_image = cfg.MODEL.MASK_FORMER.TEST.DETECTIONS_PER_IMAGE
        self.image_format = cfg.INPUT.FORMAT
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        # iteration used by loss ramps when no detectron2 EventStorage is active (tests, tools)
        self.fallback_iter = 0
        self.sim_enabled = bool(cfg.MODEL.SIM.ENABLED)
        self.teacher_momentum = float(cfg.MODEL.SIM.TEACHER.MOMENTUM)
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ValueError(f"MODEL.SIM.TEACHER.MOMENTUM must be in [0, 1], got {self.teacher_momentum}")
        self.eval_teacher = bool(cfg.MODEL.MASK_FORMER.TEST.EVAL_TEACHER)
        # a plain attribute, not a submodule: see the module docstring
        self._teacher: Optional[EMATeacher] = None
        # SIM's copy-paste (bank and paste, no parameters; the bank is saved with the model's
        # state when MODEL.SIM.COPY_PASTE.BANK_IN_CHECKPOINT)
        self.copy_paste = CopyPaste.from_config(cfg) if cfg.MODEL.SIM.COPY_PASTE.ENABLED else None
        self.sim_warmup_iters = int(cfg.MODEL.SIM.WARMUP_ITERS)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ helpers
    def _current_iter(self) -> int:
        try:
            return get_event_storage().iter
        except AssertionError:
            return self.fallback_iter

    def preprocess(self, batched_inputs: List[Dict]) -> Tuple[ImageList, torch.Tensor, torch.Tensor]:
        """Normalised padded images, raw padded RGB (0..255, pad 0) and padded valid masks.

        The backbone sees the image in INPUT.FORMAT (PIXEL_MEAN/STD are in that order); only
        the raw copy for the Lab colours of the pairwise loss is flipped to RGB.
        """
        inputs = [x["image"].to(self.device, non_blocking=True).float() for x in batched_inputs]
        images = ImageList.from_tensors(
            [(r - self.pixel_mean) / self.pixel_std for r in inputs], self.size_divisibility
        )
        raw = [r.flip(0) for r in inputs] if self.image_format == "BGR" else inputs
        raw_padded = ImageList.from_tensors(raw, self.size_divisibility).tensor
        valid = [
            x.get("valid_mask", torch.ones(r.shape[-2:], dtype=torch.bool)).to(self.device)
            for x, r in zip(batched_inputs, raw)
        ]
        valid_padded = ImageList.from_tensors([v.float() for v in valid], self.size_divisibility).tensor > 0.5
        return images, raw_padded, valid_padded

    # ------------------------------------------------------------------ teacher
    def student_parts(self) -> nn.ModuleDict:
        """The parts the EMA teacher copies (a view: the modules are this model's own)."""
        return nn.ModuleDict({"backbone": self.backbone, "pixel_decoder": self.pixel_decoder, "predictor": self.predictor})

    @property
    def teacher(self) -> Optional[EMATeacher]:
        return self._teacher

    def attach_teacher(self) -> EMATeacher:
        """Create the EMA teacher as a copy of the student's current weights (call after loading)."""
        self._teacher = EMATeacher(self.student_parts(), self.teacher_momentum).to(self.device)
        return self._teacher

    def update_teacher(self) -> None:
        """EMA step of the teacher after an optimizer step (TeacherEMAHook)."""
        if self._teacher is None:
            raise RuntimeError("update_teacher: no teacher attached (attach_teacher after loading weights)")
        self._teacher.update(self.student_parts())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # parameters agree on every rank (DDP averages the gradients), buffers do not: each
            # rank's BN statistics saw its own batch. Rank 0's go to every teacher, one packed call.
            buffers = [b for b in self._teacher.module.buffers() if b.is_floating_point()]
            if buffers:
                flat = torch.cat([b.reshape(-1) for b in buffers])
                dist.broadcast(flat, src=0)
                torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in buffers]), buffers)])

    def _teacher_outputs(self, images: torch.Tensor) -> Dict:
        if self._teacher is None:
            raise RuntimeError(
                "MODEL.SIM.ENABLED: the EMA teacher is missing. It is made from the student after the "
                "weights are loaded: the Trainer does this in resume_or_load; elsewhere call "
                "model.attach_teacher() once the weights are in place"
            )
        # eval mode (EMATeacher keeps it so), no graph; under AMP it inherits the student's autocast
        with torch.no_grad():
            return self.forward_network(images, self._teacher.module)

    def forward_network(self, images: torch.Tensor, parts: Optional[nn.Module] = None) -> Dict:
        """Backbone -> pixel decoder -> decoder of the student, or of ``parts`` (the teacher)."""
        backbone = self.backbone if parts is None else parts["backbone"]
        pixel_decoder = self.pixel_decoder if parts is None else parts["pixel_decoder"]
        predictor = self.predictor if parts is None else parts["predictor"]
        features = backbone(images)
        mask_features, multi_scale_features = pixel_decoder.forward_features(features)
        outputs = predictor(multi_scale_features, mask_features)
        outputs["mask_features"] = mask_features
        return outputs

    def prepare_targets(self, batched_inputs: List[Dict], padded_hw: Tuple[int, int]) -> List[Dict]:
        targets = []
        for x in batched_inputs:
            inst = x["instances"].to(self.device)
            t = {"labels": inst.gt_classes, "boxes": inst.gt_boxes.tensor}
            if self.full_mask_supervision:
                masks = inst.gt_masks.tensor
                h, w = masks.shape[-2:]
                padded = masks.new_zeros((masks.shape[0],) + tuple(padded_hw))
                padded[:, :h, :w] = masks
                t["masks"] = padded
            targets.append(t)
        return targets

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: List[Dict]):
        images, raw, valid = self.preprocess(batched_inputs)
        if not self.training and self.eval_teacher:
            if self._teacher is None:
                raise RuntimeError(
                    "MODEL.MASK_FORMER.TEST.EVAL_TEACHER: no teacher is loaded (evaluate a SIM checkpoint; "
                    "train_net.py --eval-only loads the teacher saved in it)"
                )
            return self.inference(self._teacher_outputs(images.tensor), batched_inputs, images)
        if not self.training:
            return self.inference(self.forward_network(images.tensor), batched_inputs, images)
        iteration = self._current_iter()
        targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
        copy_paste = self.copy_paste is not None and iteration >= self.sim_warmup_iters
        if copy_paste:
            raw, targets, covered = self.copy_paste.paste(raw, valid, targets, iteration)
            images = self._repaint(images, raw, covered)
        outputs = self.forward_network(images.tensor)
        image_info = {"images": raw, "valid": valid}
        teacher_outputs = self._teacher_outputs(images.tensor) if self.criterion.needs_teacher else None
        losses = self.criterion(outputs, targets, image_info, iteration, teacher_outputs=teacher_outputs)
        if copy_paste:
            self.copy_paste.push(raw, valid, targets, self.criterion.last_pseudo.instance, self.criterion.loss_stride)
        return losses

    def _repaint(self, images: ImageList, raw: torch.Tensor, covered: torch.Tensor) -> ImageList:
        """The normalised batch with the pasted pixels (``covered``) taken from ``raw`` (RGB)."""
        pixels = raw.flip(1) if self.image_format == "BGR" else raw
        normalised = (pixels - self.pixel_mean) / self.pixel_std
        tensor = torch.where(covered[:, None], normalised.to(images.tensor.dtype), images.tensor)
        return ImageList(tensor, images.image_sizes)

    @torch.no_grad()
    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        padded_hw = images.tensor.shape[-2:]
        results = []
        for i, x in enumerate(batched_inputs):
            h, w = images.image_sizes[i]
            out_h, out_w = x.get("height", h), x.get("width", w)
            inst = self.instance_inference(
                outputs["pred_logits"][i], outputs["pred_masks"][i], padded_hw, (h, w), (out_h, out_w)
            )
            results.append({"instances": inst})
        return results

    def instance_inference(
        self,
        logits: torch.Tensor,
        mask_logits: torch.Tensor,
        padded_hw: Tuple[int, int],
        image_hw: Tuple[int, int],
        out_hw: Tuple[int, int],
    ) -> Instances:
        """Top-k over queries x classes; masks resized to the original resolution."""
        probs = logits.float().softmax(-1)[:, :-1]
        k = min(self.detections_per_image, probs.numel())
        scores, flat_idx = probs.flatten().topk(k, sorted=True)
        classes = flat_idx % self.num_classes
        query_idx = torch.div(flat_idx, self.num_classes, rounding_mode="floor")
        masks = mask_logits[query_idx].float().unsqueeze(0)
        masks = F.interpolate(masks, size=padded_hw, mode="bilinear", align_corners=False)
        masks = masks[..., : image_hw[0], : image_hw[1]]
        masks = F.interpolate(masks, size=out_hw, mode="bilinear", align_corners=False)[0]
        mask_probs = masks.sigmoid()
        binary = mask_probs > self.mask_threshold
        mean_inside = (mask_probs * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        result = Instances(out_hw)
        result.pred_masks = binary
        result.pred_boxes = Boxes(masks_to_boxes(binary))
        result.scores = scores * mean_inside
        result.pred_classes = classes
        return result
