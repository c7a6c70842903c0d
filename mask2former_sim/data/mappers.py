"""Dataset mappers: large-scale-jitter training mapper (box-only or full-mask) and test mapper.

Training output per image (dict):
    image        uint8 tensor (3, S, S) in cfg.INPUT.FORMAT
    instances    Instances with gt_boxes (Boxes, XYXY), gt_classes (int64) and, only under
                 full supervision, gt_masks (BitMasks)
    valid_mask   bool tensor (S, S): True on pixels that come from the image, False on the
                 crop's padding; built by applying the transforms to an all-ones map
    height, width, file_name, image_id   copied from the record

Boxes are the annotated boxes, transformed and clipped: never derived from masks. The
training mapper returns None (the loader draws another image; both are counted in the log)
for an image whose crop keeps no box and for a corrupt or truncated image file; a missing
file is an error naming it.
"""
import copy
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
from PIL import Image
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
from detectron2.utils.logger import log_every_n_seconds

logger = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # unreadable EXIF block: no orientation, as detectron2's reader does
        orientation = 1
    method = _UPRIGHT.get(orientation)
    return img.transpose(method) if method is not None else img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer grayscale scaled to 0..255 (PIL's convert would clip at 255)."""
    if img.mode.startswith("I;16") or (img.mode == "I" and (img.getextrema()[1] or 0) > 255):
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img


def read_image_checked(file_name: str, image_format: str) -> np.ndarray:
    """Read an image upright (EXIF orientation applied) as uint8 HWC in ``image_format``.

    Grayscale, 16-bit grayscale, RGBA / LA (alpha dropped), palette and CMYK files become
    RGB (then BGR or L if asked). A missing file raises FileNotFoundError naming it; a file
    that cannot be decoded (corrupt, truncated) raises ``ImageDecodeError`` naming it.
    """
    if not os.path.isfile(file_name):
        raise FileNotFoundError(f"image file not found: {file_name}")
    try:
        with Image.open(file_name) as img:
            img.load()  # decode everything now: a truncated file fails here
            img = _to_8bit(_exif_upright(img))
            if image_format in ("RGB", "BGR") and img.mode != "RGB":
                img = img.convert("RGB")
            image = utils.convert_PIL_to_numpy(img, image_format)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL raises UnidentifiedImageError (an OSError), OSError("image file is truncated"), ...
        raise ImageDecodeError(f"cannot decode image {file_name}: {e}") from e
    return np.ascontiguousarray(image)


def annotation_mask(segm, height: int, width: int) -> np.ndarray:
    """Decode a COCO polygon list or RLE into a uint8 (height, width) mask."""
    if isinstance(segm, list):
        rles = mask_util.frPyObjects(segm, height, width)
        rle = mask_util.merge(rles)
    elif isinstance(segm, dict):
        rle = segm
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(rle, height, width)
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    return mask_util.decode(rle).astype(np.uint8)


def build_lsj_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """Random flip, random resize of scale [MIN_SCALE, MAX_SCALE] x IMAGE_SIZE, fixed-size crop."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    size = cfg.INPUT.IMAGE_SIZE
    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augs.append(T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, size, size))
    augs.append(T.FixedSizeCrop(crop_size=(size, size), pad_value=cfg.INPUT.CROP_PAD_VALUE))
    return augs


class BoxSupDatasetMapper:
    """LSJ training mapper; box-only unless ``keep_masks`` (the fully supervised upper bound)."""

    @configurable
    def __init__(
        self,
        *,
        augmentations: List[T.Augmentation],
        image_format: str,
        keep_masks: bool,
        min_box_size: float = 1.0,
        skip_empty: bool = True,
    ):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.keep_masks = keep_masks
        self.min_box_size = min_box_size
        self.skip_empty = skip_empty
        self.num_seen = 0
        self.num_skipped_empty = 0
        self.num_skipped_unreadable = 0
        logger.info(
            "BoxSupDatasetMapper (%s): %s", "full masks" if keep_masks else "boxes only", augmentations
        )

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        mapper_name = cfg.INPUT.DATASET_MAPPER_NAME
        if mapper_name not in ("box_only_lsj", "full_mask_lsj"):
            raise ValueError(f"INPUT.DATASET_MAPPER_NAME: unknown mapper '{mapper_name}'")
        keep_masks = bool(cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION)
        if keep_masks != (mapper_name == "full_mask_lsj"):
            raise ValueError(
                f"INPUT.DATASET_MAPPER_NAME '{mapper_name}' disagrees with "
                f"MODEL.BOXSUP.FULL_MASK_SUPERVISION={keep_masks}: full supervision uses "
                "'full_mask_lsj', box supervision 'box_only_lsj'"
            )
        return {
            "augmentations": build_lsj_augmentation(cfg, is_train=True),
            "image_format": cfg.INPUT.FORMAT,
            "keep_masks": keep_masks,
            "min_box_size": cfg.INPUT.MIN_BOX_SIZE,
            "skip_empty": cfg.INPUT.SKIP_EMPTY_CROPS,
        }

    def __call__(self, dataset_dict: Dict) -> Optional[Dict]:
        record = copy.deepcopy(dataset_dict)
        annos = record.pop("annotations", [])
        try:
            image = read_image_checked(record["file_name"], self.image_format)
        except ImageDecodeError as e:
            # a corrupt or truncated file: skip it (the loader draws another image) and count
            # it; a missing file is not skipped (FileNotFoundError names it)
            self.num_seen += 1
            self.num_skipped_unreadable += 1
            message = (
                f"Skipped {self.num_skipped_unreadable} unreadable training image(s) of "
                f"{self.num_seen} seen (a fresh image is drawn instead); latest: {e}"
            )
            if self.num_skipped_unreadable <= 20:
                logger.warning(message)
            else:
                log_every_n_seconds(logging.WARNING, message, n=60, name=__name__)
            return None
        utils.check_image_size(record, image)
        orig_h, orig_w = image.shape[:2]

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        h, w = image.shape[:2]
        # == 1, not > 0: padding of segmentations may be any value (newer detectron2 pads them
        # with 255 in FixedSizeCrop), only pixels that came from the image carry the 1
        valid = transforms.apply_segmentation(np.ones((orig_h, orig_w), dtype=np.uint8)) == 1

        boxes = np.zeros((0, 4), dtype=np.float64)
        if annos:
            boxes = np.array(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
                dtype=np.float64,
            )
            # annotations may overhang the image; the part outside it is not object
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, orig_w)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, orig_h)
            boxes = transforms.apply_box(boxes)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_box_size) & (
            (boxes[:, 3] - boxes[:, 1]) >= self.min_box_size
        )
        keep_idx = np.nonzero(keep)[0]

        self.num_seen += 1
        if len(keep_idx) == 0 and self.skip_empty:
            self.num_skipped_empty += 1
            log_every_n_seconds(
                logging.INFO,
                f"Skipped {self.num_skipped_empty} of {self.num_seen} training images "
                "whose crop kept no box (a fresh image is drawn instead)",
                n=60,
                name=__name__,
            )
            return None

        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[keep_idx], dtype=torch.float32))
        instances.gt_classes = torch.as_tensor(
            [annos[i]["category_id"] for i in keep_idx], dtype=torch.int64
        )
        if self.keep_masks:
            masks = []
            for i in keep_idx:
                if "segmentation" not in annos[i]:
                    raise ValueError(
                        f"{record['file_name']}: annotation {annos[i].get('annotation_id', i)} has no "
                        "segmentation, but full-mask supervision was asked for"
                    )
                m = annotation_mask(annos[i]["segmentation"], orig_h, orig_w)
                masks.append(transforms.apply_segmentation(m) == 1)  # padding is not object
            mask_tensor = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.bool)
            )
            instances.gt_masks = BitMasks(mask_tensor)

        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["valid_mask"] = torch.from_numpy(np.ascontiguousarray(valid))
        record["instances"] = instances
        return record


class BoxSupTestMapper:
    """Test-time mapper: shortest-edge resize, image only (evaluation reads the json)."""

    @configurable
    def __init__(self, *, augmentations: List[T.Augmentation], image_format: str):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        return {
            "augmentations": build_lsj_augmentation(cfg, is_train=False),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        record = copy.deepcopy(dataset_dict)
        record.pop("annotations", None)
        image = read_image_checked(record["file_name"], self.image_format)
        utils.check_image_size(record, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        image = aug_input.image
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["valid_mask"] = torch.ones(image.shape[:2], dtype=torch.bool)
        return record
