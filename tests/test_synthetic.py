"""Synthetic shapes dataset: determinism, annotation exactness, the two knobs, caching, registration."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import mask2former_sim  # noqa: F401  (Pillow shim before detectron2)
from detectron2.data import DatasetCatalog, MetadataCatalog

from mask2former_sim.data import synthetic
from mask2former_sim.data.synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    _make_shape,
    default_root,
    ensure_synthetic_dataset,
    generate_image,
    register_synthetic_datasets,
)


def _files(split_dir):
    out = {}
    for dirpath, _, names in os.walk(split_dir):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, split_dir)] = f.read()
    return out


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1 - int(xs.min()), int(ys.max()) + 1 - int(ys.min())]


# ----------------------------------------------------------------------------- rasterisation


def test_shapes_rasterise_to_hand_computed_pixels():
    # circle r=3 at (8, 8): pixel centres (x+.5, y+.5) with (dx^2 + dy^2) <= 9, dx, dy in {±.5, ±1.5, ±2.5}
    m = _make_shape(CLASS_NAMES.index("circle"), 6.0, 8.0, 8.0, {"angle": 0.0}).rasterize(16)
    assert m.sum() == 32  # 4 * |{(a, b) in {.5,1.5,2.5}^2 : a^2 + b^2 <= 9}| = 4 * 8
    assert _tight_box(m) == [5, 5, 6, 6]
    # axis-aligned rectangle: long side 10, aspect .5 -> x in [3, 13], y in [5.5, 10.5] (inclusive)
    r = _make_shape(CLASS_NAMES.index("rectangle"), 10.0, 8.0, 8.0, {"angle": 0.0, "aspect": 0.5}).rasterize(16)
    assert r.sum() == 10 * 6 and _tight_box(r) == [3, 5, 10, 6]
    # ring: the centre pixel is background, a pixel on the annulus is inside
    ring = _make_shape(CLASS_NAMES.index("ring"), 20.0, 16.0, 16.0, {"angle": 0.0, "inner": 0.5}).rasterize(32)
    assert not ring[15, 15] and ring[15, 23] and not ring[15, 27]
    # cross: centre in, box corner out, arm tip in
    cross = _make_shape(CLASS_NAMES.index("cross"), 20.0, 16.0, 16.0, {"angle": 0.0, "arm": 0.3}).rasterize(32)
    assert cross[15, 15] and not cross[8, 8] and cross[15, 7] and cross[7, 15]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = SyntheticSpec(num_images=8, seed=7)
    a = ensure_synthetic_dataset(str(tmp_path / "a"), "train", spec)
    b = ensure_synthetic_dataset(str(tmp_path / "b"), "train", spec)
    fa, fb = _files(os.path.dirname(a[0])), _files(os.path.dirname(b[0]))
    assert len(fa) == 8 + 2 and fa == fb
    c = ensure_synthetic_dataset(str(tmp_path / "c"), "train", SyntheticSpec(num_images=8, seed=8))
    fc = _files(os.path.dirname(c[0]))
    assert fc["annotations.json"] != fa["annotations.json"]
    assert sum(fc[k] != fa[k] for k in fa if k.endswith(".png")) == 8
    # an image does not depend on how many are generated; val is another stream than train
    d = ensure_synthetic_dataset(str(tmp_path / "d"), "train", SyntheticSpec(num_images=3, seed=7))
    fd = _files(os.path.dirname(d[0]))
    for k in ("images/000001.png", "images/000002.png", "images/000003.png"):
        assert fd[k] == fa[k]
    assert not np.array_equal(generate_image(spec, "train", 0).image, generate_image(spec, "val", 0).image)


# ----------------------------------------------------------------------------- annotations


def test_annotations_are_exact_visible_masks(tmp_path):
    spec = SyntheticSpec(num_images=12, seed=3)
    json_file, image_root = ensure_synthetic_dataset(str(tmp_path), "val", spec)
    data = json.load(open(json_file))
    assert [c["id"] for c in data["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert len(data["categories"]) >= 4 and [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
    assert len(data["images"]) == 12
    anns_by_image = {}
    for ann in data["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    for index, img in enumerate(data["images"]):
        assert img["id"] == index + 1 and img["file_name"] == f"{index + 1:06d}.png"
        assert (img["height"], img["width"]) == (128, 128)
        pixels = np.asarray(Image.open(os.path.join(image_root, img["file_name"])))
        assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
        anns = anns_by_image.get(img["id"], [])
        assert spec.num_objects[0] <= len(anns) <= spec.num_objects[1]
        union = np.zeros((128, 128), dtype=np.int32)
        sample = generate_image(spec, "val", index)
        assert np.array_equal(sample.image, pixels)
        for ann, inst in zip(anns, sample.instances):
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            m = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(m, inst.visible_mask)
            assert ann["bbox"] == _tight_box(m)
            assert ann["area"] == int(m.sum()) >= spec.min_visible_area
            assert m.sum() >= spec.min_visible_fraction * inst.full_mask.sum()
            assert not np.any(m & ~inst.full_mask)
            assert ann["category_id"] == inst.category_id
            union += m
        assert union.max() <= 1  # visible masks are disjoint
        # every painted object pixel is annotated: union of full shapes == union of visible masks
        painted = np.zeros((128, 128), dtype=bool)
        for inst in sample.instances:
            painted |= inst.full_mask
        assert np.array_equal(painted, union.astype(bool))
        assert len(anns) == len(sample.instances)


# ----------------------------------------------------------------------------- knobs


def _overlapping_pairs(spec, n):
    same = other = 0
    for i in range(n):
        inst = generate_image(spec, "train", i).instances
        for a in range(len(inst)):
            for b in range(a + 1, len(inst)):
                if np.any(inst[a].full_mask & inst[b].full_mask):
                    if inst[a].category_id == inst[b].category_id:
                        same += 1
                    else:
                        other += 1
    return same, other


def test_same_class_overlap_knob():
    spec_on = SyntheticSpec(same_class_overlap_rate=1.0, cross_class_overlap_rate=0.0, seed=1)
    same, _ = _overlapping_pairs(spec_on, 10)
    assert same >= 10  # every non-first object overlaps an earlier instance of its class
    for i in range(10):
        sample = generate_image(spec_on, "train", i)
        for inst in sample.instances[1:]:
            if inst.overlaps is not None:
                partner = sample.instances[inst.overlaps]
                assert partner.category_id == inst.category_id
                assert np.any(inst.full_mask & partner.full_mask)  # occludes part of its partner
    spec_off = SyntheticSpec(same_class_overlap_rate=0.0, cross_class_overlap_rate=0.0, seed=1)
    assert _overlapping_pairs(spec_off, 10) == (0, 0)


def _color_gap(sample, inst):
    """L-inf distance of mean colour of visible pixels vs background pixels in the 4-px grown box."""
    union = np.zeros(inst.visible_mask.shape, dtype=bool)
    for other in sample.instances:
        union |= other.full_mask
    ys, xs = np.nonzero(inst.visible_mask)
    win = np.zeros_like(union)
    win[max(ys.min() - 4, 0):ys.max() + 5, max(xs.min() - 4, 0):xs.max() + 5] = True
    ring = win & ~union
    if ring.sum() < 10:
        return None
    img = sample.image.astype(np.float64)
    return float(np.abs(img[inst.visible_mask].mean(0) - img[ring].mean(0)).max())


def test_close_color_knob():
    gaps = {}
    for frac in (0.0, 1.0):
        spec = SyntheticSpec(close_color_fraction=frac, seed=2)
        samples = [generate_image(spec, "train", i) for i in range(15)]
        assert all(inst.close_color == bool(frac) for s in samples for inst in s.instances)
        g = [_color_gap(s, inst) for s in samples for inst in s.instances]
        gaps[frac] = np.array([x for x in g if x is not None])
        assert len(gaps[frac]) >= 20
    # close: within close_color_delta (24) of the local background, up to texture/noise/border effects
    assert np.median(gaps[1.0]) <= 24 and np.percentile(gaps[1.0], 90) <= 30
    # otherwise: at least min_color_contrast (64) away in one channel, minus the same effects
    assert gaps[0.0].min() >= 45 and np.median(gaps[0.0]) >= 80


# ----------------------------------------------------------------------------- caching


def test_spec_change_regenerates_and_up_to_date_is_reused(tmp_path, monkeypatch):
    root = str(tmp_path)
    json_file, _ = ensure_synthetic_dataset(root, "train", SyntheticSpec(num_images=3))
    assert len(json.load(open(json_file))["images"]) == 3

    def boom(*a, **k):
        raise AssertionError("should not regenerate")

    with monkeypatch.context() as m:
        m.setattr(synthetic, "_write_split", boom)
        assert ensure_synthetic_dataset(root, "train", SyntheticSpec(num_images=3))[0] == json_file

    ensure_synthetic_dataset(root, "train", SyntheticSpec(num_images=5))
    assert len(json.load(open(json_file))["images"]) == 5
    assert sorted(os.listdir(os.path.join(root, "train", "images"))) == [f"{i:06d}.png" for i in range(1, 6)]
    ensure_synthetic_dataset(root, "train", SyntheticSpec(num_images=5, same_class_overlap_rate=0.9))
    marker = json.load(open(os.path.join(root, "train", "spec.json")))
    assert marker["spec"]["same_class_overlap_rate"] == 0.9 and marker["split"] == "train"

    # a tampered marker means "not this spec": regenerate
    with open(os.path.join(root, "train", "spec.json"), "w") as f:
        f.write("{}")
    ensure_synthetic_dataset(root, "train", SyntheticSpec(num_images=2))
    assert len(json.load(open(json_file))["images"]) == 2
    assert sorted(os.listdir(root)) == ["train"]  # no temp or old directories left


def test_crash_during_generation_leaves_previous_data_and_no_temp(tmp_path, monkeypatch):
    root = str(tmp_path)
    good = SyntheticSpec(num_images=2)
    ensure_synthetic_dataset(root, "val", good)
    before = _files(os.path.join(root, "val"))

    real = synthetic.generate_image

    def crash_at_2(spec, split, index):
        if index == 2:
            raise RuntimeError("simulated crash")
        return real(spec, split, index)

    monkeypatch.setattr(synthetic, "generate_image", crash_at_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_synthetic_dataset(root, "val", SyntheticSpec(num_images=4))
    assert sorted(os.listdir(root)) == ["val"]
    assert _files(os.path.join(root, "val")) == before  # still complete, still the old spec

    # a crash on a first generation leaves nothing that could look complete
    with pytest.raises(RuntimeError):
        ensure_synthetic_dataset(str(tmp_path / "fresh"), "val", SyntheticSpec(num_images=4))
    assert os.listdir(tmp_path / "fresh") == []


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="object_size"):
        SyntheticSpec(object_size=(30, 20))
    with pytest.raises(ValueError, match="close_color_fraction"):
        SyntheticSpec(close_color_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        ensure_synthetic_dataset("/tmp", "a/b", SyntheticSpec(num_images=1))
    with pytest.raises(TypeError, match="colour_fraction"):
        register_synthetic_datasets("/tmp/unused", colour_fraction=0.1)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MASK2FORMER_SIM_CACHE", str(tmp_path))
    assert default_root() == os.path.join(str(tmp_path), "synthetic")
    monkeypatch.delenv("MASK2FORMER_SIM_CACHE")
    assert default_root() == os.path.join(os.path.expanduser("~"), ".cache", "mask2former_sim", "synthetic")


# ----------------------------------------------------------------------------- registration


def _unregister():
    for name in (synthetic.TRAIN_NAME, synthetic.VAL_NAME):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
    synthetic._registered.clear()


@pytest.fixture
def clean_catalog():
    _unregister()
    yield
    _unregister()


def test_registration(tmp_path, clean_catalog):
    root = str(tmp_path)
    register_synthetic_datasets(root, num_train=6, num_val=4)
    train = DatasetCatalog.get("synth_train")
    val = DatasetCatalog.get("synth_val")
    assert len(train) == 6 and len(val) == 4
    assert all("segmentation" not in a for r in train for a in r["annotations"])
    assert all("segmentation" in a for r in val for a in r["annotations"])
    assert sum(len(r["annotations"]) for r in train) >= 12
    for name, box_only in (("synth_train", True), ("synth_val", False)):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(CLASS_NAMES)
        assert meta.box_only is box_only and os.path.isfile(meta.json_file)
    # train and val are different streams
    assert open(os.path.join(root, "train", "images", "000001.png"), "rb").read() != \
        open(os.path.join(root, "val", "images", "000001.png"), "rb").read()

    loader = DatasetCatalog["synth_train"]
    mtime = os.path.getmtime(os.path.join(root, "train", "annotations.json"))
    register_synthetic_datasets(root, num_train=6, num_val=4)  # no-op
    assert DatasetCatalog["synth_train"] is loader
    assert os.path.getmtime(os.path.join(root, "train", "annotations.json")) == mtime

    register_synthetic_datasets(root, num_train=3, num_val=4)  # different: re-registered
    assert DatasetCatalog["synth_train"] is not loader
    assert len(DatasetCatalog.get("synth_train")) == 3
    assert MetadataCatalog.get("synth_train").thing_classes == list(CLASS_NAMES)


def test_cli_writes_splits_and_preview(tmp_path):
    preview = tmp_path / "preview.png"
    synthetic.main(["--root", str(tmp_path / "data"), "--num-train", "2", "--num-val", "3",
                    "--seed", "4", "--preview", str(preview)])
    assert len(json.load(open(tmp_path / "data" / "train" / "annotations.json"))["images"]) == 2
    assert len(json.load(open(tmp_path / "data" / "val" / "annotations.json"))["images"]) == 3
    w, h = Image.open(preview).size
    assert (w, h) == (2 * (3 * 128 + 4 * 4), 2 * (2 * 128 + 3 * 4))
