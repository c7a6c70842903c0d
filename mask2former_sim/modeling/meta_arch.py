"""The meta-architecture: backbone -> pixel decoder -> masked-attention decoder -> criterion.

Training returns the criterion's weighted loss dict; inference returns, per image,
``{"instances": Instances}`` with pred_masks (bool, original resolution), pred_boxes
(tight boxes of the masks), scores (class prob x mean mask prob inside the mask) and
pred_classes.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage

from ..utils.boxes import masks_to_boxes
from .criterion import BoxSupSetCriterion
from .pixel_decoder import build_pixel_decoder
from .transformer_decoder import build_transformer_decoder


@META_ARCH_REGISTRY.register()
class BoxSupMaskFormer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.MODEL.SIM.ENABLED or cfg.MODEL.SIM.COPY_PASTE.ENABLED:
            raise NotImplementedError(
                "MODEL.SIM.ENABLED / MODEL.SIM.COPY_PASTE.ENABLED: the SIM components (prototypes, "
                "pseudo-mask loss, teacher, copy-paste) are not implemented yet; this build trains "
                "the box-only baseline and the fully supervised upper bound"
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
        """Normalised padded images, raw padded RGB (0..255, pad 0) and padded valid masks."""
        raw = [x["image"].to(self.device, non_blocking=True).float() for x in batched_inputs]
        if self.image_format == "BGR":
            raw = [r.flip(0) for r in raw]
        images = ImageList.from_tensors([(r - self.pixel_mean) / self.pixel_std for r in raw], self.size_divisibility)
        raw_padded = ImageList.from_tensors(raw, self.size_divisibility).tensor
        valid = [
            x.get("valid_mask", torch.ones(r.shape[-2:], dtype=torch.bool)).to(self.device)
            for x, r in zip(batched_inputs, raw)
        ]
        valid_padded = ImageList.from_tensors([v.float() for v in valid], self.size_divisibility).tensor > 0.5
        return images, raw_padded, valid_padded

    def forward_network(self, images: torch.Tensor) -> Dict:
        features = self.backbone(images)
        mask_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        outputs = self.predictor(multi_scale_features, mask_features)
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
        outputs = self.forward_network(images.tensor)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.tensor.shape[-2:])
            image_info = {"images": raw, "valid": valid}
            return self.criterion(outputs, targets, image_info, self._current_iter())
        return self.inference(outputs, batched_inputs, images)

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
