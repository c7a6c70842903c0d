"""Box-only LSJ mapper: boxes come from annotations (never masks), valid mask from transforms."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from mask2former_sim.data.mappers import BoxSupDatasetMapper, BoxSupTestMapper


def make_record(tmp_path, h=48, w=64, annotations=None):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    if annotations is None:
        # mask and box disagree on purpose: the mask is a small square in the top-left
        # corner, the box is elsewhere. The mapper must output the (transformed) box.
        annotations = [
            {"bbox": [30.0, 10.0, 50.0, 40.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 2,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},
            {"bbox": [5.0, 5.0, 15.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
             "segmentation": [[5, 5, 15, 5, 15, 20, 5, 20]]},
        ]
    return {"file_name": str(path), "height": h, "width": w, "image_id": 1, "annotations": annotations}


def mapper_with(augs, keep_masks=False, **kw):
    return BoxSupDatasetMapper(augmentations=augs, image_format="RGB", keep_masks=keep_masks, **kw)


def test_flip_and_downscale_exact(tmp_path):
    rec = make_record(tmp_path)
    augs = [T.RandomFlip(prob=1.0), T.ResizeScale(0.5, 0.5, 64, 64), T.FixedSizeCrop((64, 64))]
    out = mapper_with(augs)(rec)
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.uint8
    inst = out["instances"]
    assert not inst.has("gt_masks")
    # ResizeScale: scale = min(0.5*64/48, 0.5*64/64) = 0.5 -> 24 x 32 image, flipped first
    expected = np.array([[64 - 50, 10, 64 - 30, 40], [64 - 15, 5, 64 - 5, 20]], dtype=np.float32) * 0.5
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), expected, atol=1e-4)
    assert inst.gt_classes.tolist() == [2, 0]
    valid = out["valid_mask"]
    assert valid.dtype == torch.bool
    assert valid[:24, :32].all() and not valid[24:].any() and not valid[:, 32:].any()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_random_lsj_boxes_equal_transformed_annotations(tmp_path, seed):
    rec = make_record(tmp_path)
    augs = [T.RandomFlip(), T.ResizeScale(0.3, 2.0, 64, 64), T.FixedSizeCrop((64, 64))]
    mapper = mapper_with(augs, skip_empty=False)
    # replay the same random transforms to build the expectation independently
    np.random.seed(seed)
    aug_input = T.AugInput(np.zeros((48, 64, 3), np.uint8))
    tfm = T.AugmentationList(augs)(aug_input)
    boxes = tfm.apply_box(np.array([a["bbox"] for a in rec["annotations"]], dtype=np.float64))
    boxes = boxes.clip(0, 64)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    valid_expected = tfm.apply_segmentation(np.ones((48, 64), np.uint8)) > 0

    np.random.seed(seed)
    out = mapper(rec)
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), boxes[keep], atol=1e-4)
    np.testing.assert_array_equal(out["valid_mask"].numpy(), valid_expected)
    # the valid mask is from transforms, not pixels: padding pixels have the pad value 128,
    # valid ones are the random image; a valid pixel may equal 128 by chance, never mind.
    img = out["image"].permute(1, 2, 0).numpy()
    assert (img[~valid_expected] == 128).all()


def test_box_only_never_reads_masks(tmp_path):
    """Poison the segmentation: the box-only mapper must not touch it."""

    class Poison:
        """Survives the mapper's deepcopy; any other use raises."""

        def __deepcopy__(self, memo):
            return self

        def __getattr__(self, name):
            raise AssertionError(f"box-only mapper touched a mask ({name})")

        def __iter__(self):
            raise AssertionError("box-only mapper iterated a mask")

        def __len__(self):
            raise AssertionError("box-only mapper measured a mask")

    rec = make_record(tmp_path)
    for a in rec["annotations"]:
        a["segmentation"] = Poison()
    augs = [T.ResizeScale(1.0, 1.0, 64, 64), T.FixedSizeCrop((64, 64))]
    out = mapper_with(augs)(rec)
    assert not out["instances"].has("gt_masks")
    assert "annotations" not in out
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy()[0], [30, 10, 50, 40], atol=1e-4)


def test_full_masks_follow_transforms(tmp_path):
    rec = make_record(tmp_path)
    augs = [T.RandomFlip(prob=1.0), T.ResizeScale(1.0, 1.0, 64, 64), T.FixedSizeCrop((64, 64))]
    out = mapper_with(augs, keep_masks=True)(rec)
    masks = out["instances"].gt_masks.tensor
    assert masks.shape == (2, 64, 64) and masks.dtype == torch.bool
    # mask of annotation 0 was the top-left 4x4 square -> top-right after the flip
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert xs.min() >= 59 and ys.max() <= 4
    # boxes still from annotations, not from the (disagreeing) mask
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy()[0], [14, 10, 34, 40], atol=1e-4)


def test_degenerate_and_outside_boxes_dropped(tmp_path):
    anns = [
        {"bbox": [10.0, 10.0, 10.5, 30.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},  # 0.5 px wide
        {"bbox": [20.0, 20.0, 40.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},  # zero height
        {"bbox": [-30.0, 5.0, -10.0, 15.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1},  # outside
        {"bbox": [50.0, 30.0, 90.0, 70.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 3},  # clipped
        {"bbox": [0.0, 0.0, 8.0, 8.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2},  # XYWH input
    ]
    rec = make_record(tmp_path, annotations=anns)
    augs = [T.ResizeScale(1.0, 1.0, 64, 64), T.FixedSizeCrop((64, 64))]
    out = mapper_with(augs)(rec)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [3, 2]
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [[50, 30, 64, 48], [0, 0, 8, 8]], atol=1e-4)


def test_image_with_no_box_left_is_skipped_and_counted(tmp_path, caplog):
    anns = [{"bbox": [10.0, 10.0, 10.2, 30.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]
    rec = make_record(tmp_path, annotations=anns)
    augs = [T.ResizeScale(1.0, 1.0, 64, 64), T.FixedSizeCrop((64, 64))]
    mapper = mapper_with(augs)
    with caplog.at_level(logging.INFO, logger="mask2former_sim.data.mappers"):
        assert mapper(rec) is None
    assert mapper.num_skipped_empty == 1
    assert "Skipped 1 of 1 training images" in caplog.text
    kept = mapper_with(augs, skip_empty=False)(rec)
    assert len(kept["instances"]) == 0


def test_missing_and_corrupt_image_named(tmp_path):
    rec = make_record(tmp_path)
    augs = [T.ResizeScale(1.0, 1.0, 64, 64), T.FixedSizeCrop((64, 64))]
    bad = dict(rec, file_name=str(tmp_path / "gone.png"))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        mapper_with(augs)(bad)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    # training skips it (None: the loader draws another image) and counts it
    mapper = mapper_with(augs)
    assert mapper(dict(rec, file_name=str(corrupt))) is None
    assert mapper.num_skipped_unreadable == 1
    # evaluation cannot skip an image: the error names the file
    with pytest.raises(ValueError, match="corrupt.png"):
        BoxSupTestMapper(augmentations=[], image_format="RGB")(dict(rec, file_name=str(corrupt)))


def test_mapper_from_config_checks_consistency(cfg):
    cfg.INPUT.IMAGE_SIZE = 64
    m = BoxSupDatasetMapper(cfg, True)
    assert not m.keep_masks
    cfg.MODEL.BOXSUP.FULL_MASK_SUPERVISION = True
    with pytest.raises(ValueError, match="disagrees"):
        BoxSupDatasetMapper(cfg, True)
    cfg.INPUT.DATASET_MAPPER_NAME = "full_mask_lsj"
    assert BoxSupDatasetMapper(cfg, True).keep_masks
    cfg.INPUT.DATASET_MAPPER_NAME = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        BoxSupDatasetMapper(cfg, True)


def test_test_mapper_resizes(tmp_path, cfg):
    rec = make_record(tmp_path)
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 200
    out = BoxSupTestMapper(cfg)(rec)
    assert out["image"].shape == (3, 96, 128)
    assert "annotations" not in out and out["height"] == 48
