"""Robustness: padding values, input format, image kinds, unreadable images, and ranks that
agree on errors (two gloo processes)."""
import datetime
import logging
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

import mask2former_sim  # noqa: F401  (first: spawned ranks import this module before detectron2)
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import BoxMode

from mask2former_sim.data.loader import PositionalTrainStream
from mask2former_sim.data.mappers import BoxSupDatasetMapper, ImageDecodeError, read_image_checked
from mask2former_sim.engine.setup import build_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOXINST = os.path.join(ROOT, "configs/synthetic/boxinst_R18_synth.yaml")


# ----------------------------------------------------------------------------- padding value


class PadSegmentationWith255(T.Augmentation):
    """Pads right / bottom to ``size`` with image value 128 and segmentation value 255
    (what newer detectron2's FixedSizeCrop does with its seg_pad_value)."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def get_transform(self, image):
        h, w = image.shape[:2]
        return T.PadTransform(0, 0, self.size - w, self.size - h, w, h, pad_value=128, seg_pad_value=255)


def test_padding_is_never_valid_nor_object_whatever_the_segmentation_pad_value(tmp_path):
    h, w = 20, 30
    path = tmp_path / "img.png"
    Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(path)
    record = {"file_name": str(path), "height": h, "width": w, "image_id": 1, "annotations": [
        # the mask covers the whole image: a pad-value assumption would extend it into the padding
        {"bbox": [0.0, 0.0, 30.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0,
         "segmentation": [[0, 0, 30, 0, 30, 20, 0, 20]]}]}
    mapper = BoxSupDatasetMapper(augmentations=[PadSegmentationWith255(32)], image_format="RGB", keep_masks=True)
    out = mapper(record)
    valid = out["valid_mask"]
    assert valid.shape == (32, 32)
    assert valid[:h, :w].all() and not valid[h:].any() and not valid[:, w:].any()
    mask = out["instances"].gt_masks.tensor[0]
    assert mask.dtype == torch.bool
    assert mask[:h, :w].all() and not mask[h:].any() and not mask[:, w:].any()


# ----------------------------------------------------------------------------- input format


def test_bgr_backbone_input_is_bgr_and_only_the_colour_copy_is_rgb():
    cfg = build_cfg(BOXINST, [
        "INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", "[10.0, 20.0, 30.0]", "MODEL.PIXEL_STD", "[1.0, 2.0, 4.0]",
        "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", "1", "MODEL.MASK_FORMER.DEC_LAYERS", "2",
    ])
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    bgr = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8)
    images, raw, valid = model.preprocess([{"image": bgr}])
    mean = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
    std = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)
    torch.testing.assert_close(images.tensor[0], (bgr.float() - mean) / std)
    torch.testing.assert_close(raw[0], bgr.flip(0).float())  # RGB, for the Lab colours
    assert valid.all()


# ----------------------------------------------------------------------------- image kinds


def _reference(h=4, w=6):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    a = _reference()
    expected = {  # the EXIF spec: the transform that shows the stored pixels upright
        1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2),
        6: np.rot90(a, -1), 7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1),
    }[orientation]
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "exif.png"
    img.save(path, exif=exif)
    np.testing.assert_array_equal(read_image_checked(str(path), "RGB"), expected)
    np.testing.assert_array_equal(read_image_checked(str(path), "BGR"), expected[..., ::-1])


def test_grayscale_rgba_palette_and_16bit_load_as_rgb(tmp_path):
    a = _reference()
    gray = a[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "l.png")
    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 17, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    palette = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 150], [9, 9, 9]], np.uint8)
    index = (np.arange(24).reshape(4, 6) % 4).astype(np.uint8)
    p = Image.fromarray(index, mode="P")
    p.putpalette(palette.flatten().tolist() + [0] * (768 - palette.size))
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "p_transparent.png", transparency=3)
    deep = (np.arange(24).reshape(4, 6) * 2700).astype(np.uint16)  # up to 62100 of 65535
    Image.fromarray(deep).save(tmp_path / "i16.png")
    Image.fromarray(a).convert("CMYK").save(tmp_path / "cmyk.tif")  # PIL's CMYK round trip is exact

    cases = {
        "l.png": np.repeat(gray[..., None], 3, -1),
        "rgba.png": a,
        "p.png": palette[index],
        "p_transparent.png": palette[index],
        "i16.png": np.repeat(np.rint(deep / 257.0).astype(np.uint8)[..., None], 3, -1),
        "cmyk.tif": a,
    }
    for name, expected in cases.items():
        got = read_image_checked(str(tmp_path / name), "RGB")
        assert got.dtype == np.uint8 and got.shape == (4, 6, 3), name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_missing_truncated_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        read_image_checked(str(tmp_path / "gone.png"), "RGB")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated.png"):
        read_image_checked(str(tmp_path / "truncated.png"), "RGB")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageDecodeError, match="text.jpg"):
        read_image_checked(str(tmp_path / "text.jpg"), "RGB")


def test_unreadable_training_image_is_skipped_and_counted(tmp_path, caplog):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    ann = [{"bbox": [2.0, 2.0, 20.0, 20.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}]
    records = [
        {"file_name": str(good), "height": 32, "width": 32, "image_id": 1, "annotations": ann},
        {"file_name": str(tmp_path / "cut.png"), "height": 32, "width": 32, "image_id": 2, "annotations": ann},
    ]
    mapper = BoxSupDatasetMapper(augmentations=[], image_format="RGB", keep_masks=False)
    stream = PositionalTrainStream(records, mapper, batch_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="mask2former_sim.data.mappers"):
        outs = [stream.map_position(p) for p in range(8)]  # every record is drawn in 8 positions
    assert all(o["image_id"] == 1 for o in outs)
    assert mapper.num_skipped_unreadable >= 1
    assert "unreadable training image" in caplog.text and "cut.png" in caplog.text
    # a missing file is not skipped: the run stops naming it
    records[1]["file_name"] = str(tmp_path / "missing.png")
    stream = PositionalTrainStream(records, mapper, batch_size=1, seed=0)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        for p in range(8):
            stream.map_position(p)


# ----------------------------------------------------------------------------- ranks agree


def _rank_worker(rank, world, init_file, case, result_dir):
    """One rank of a 2-process gloo group running a criterion step; rank 1 gets bad input."""
    os.environ["OMP_NUM_THREADS"] = "1"
    outcome = "finished"
    try:
        import torch.distributed as dist

        from mask2former_sim.config import get_default_cfg
        from mask2former_sim.modeling.criterion import BoxSupSetCriterion

        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=30),
        )
        cfg = get_default_cfg()
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
        cfg.MODEL.BOXSUP.PAIRWISE_WARMUP_ITERS = 0
        criterion = BoxSupSetCriterion.from_config(cfg)
        g = torch.Generator().manual_seed(rank)
        logits = torch.randn(1, 4, 4, generator=g)
        masks = torch.randn(1, 4, 8, 8, generator=g)
        labels = torch.tensor([1])
        if rank == 1 and case == "label":
            labels = torch.tensor([7])
        if rank == 1 and case == "nan":
            logits[0, 0, 0] = float("nan")
        targets = [{"labels": labels, "boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0]])}]
        info = {"images": torch.rand(1, 3, 32, 32) * 255, "valid": torch.ones(1, 32, 32, dtype=torch.bool)}
        losses = criterion({"pred_logits": logits, "pred_masks": masks}, targets, info)
        total = sum(losses.values()).detach()
        dist.all_reduce(total)  # stands for DDP's gradient all-reduce
    except Exception as e:  # noqa: BLE001  (the outcome is what the test checks)
        outcome = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.slow  # two spawned interpreters, about 20 s on 2 cores
@pytest.mark.parametrize("case", ["label", "nan"])
def test_a_bad_target_on_one_rank_stops_every_rank(tmp_path, case):
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_worker, args=(r, 2, str(tmp_path / "pg_init"), case, str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} hung"
    out = {r: (tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    if case == "label":
        assert out[1].startswith("ValueError: targets[0]['labels'] has class ids outside [0, 3)"), out[1]
        assert out[0].startswith("ValueError: rank(s) [1] met class ids outside [0, 3)"), out[0]
    else:
        assert out[1].startswith("FloatingPointError: HungarianMatcher: non-finite matching cost"), out[1]
        assert out[0].startswith("RuntimeError: rank(s) [1] met bad targets or non-finite"), out[0]
