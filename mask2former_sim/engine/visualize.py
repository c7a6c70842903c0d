"""Prediction overlays as PNG (detectron2's Visualizer), for the demo job and demo/demo.py."""
import os
from typing import Iterable, List

import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import ColorMode, Visualizer

from ..data.mappers import BoxSupTestMapper, read_image_checked


@torch.no_grad()
def predict_images(model, cfg, image_paths: Iterable[str]) -> List:
    """Run the model in eval mode on image files; returns (rgb image, Instances on CPU) pairs."""
    mapper = BoxSupTestMapper(cfg, is_train=False)
    was_training = model.training
    model.eval()
    out = []
    try:
        for path in image_paths:
            rgb = read_image_checked(path, "RGB")
            record = {"file_name": path, "height": rgb.shape[0], "width": rgb.shape[1], "image_id": path}
            inputs = mapper(record)
            pred = model([inputs])[0]["instances"].to("cpu")
            out.append((rgb, pred))
    finally:
        model.train(was_training)
    return out


def draw_overlay(rgb: np.ndarray, instances, metadata, score_thresh: float, max_per_image: int = 10) -> np.ndarray:
    """The ``max_per_image`` highest-scoring detections with score >= ``score_thresh``."""
    keep = instances[instances.scores >= score_thresh]
    keep = keep[keep.scores.argsort(descending=True)[:max_per_image]]
    vis = Visualizer(rgb, metadata=metadata, scale=2.0, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(keep).get_image()


def write_overlays(model, cfg, image_paths: Iterable[str], out_dir: str, score_thresh: float = 0.5,
                   metadata_name: str = "", max_per_image: int = 10) -> List[str]:
    """Predict and write ``<out_dir>/<name>.png`` overlays; returns the written paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    name = metadata_name or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    metadata = MetadataCatalog.get(name)
    written = []
    for path, (rgb, pred) in zip(image_paths, predict_images(model, cfg, image_paths)):
        overlay = draw_overlay(rgb, pred, metadata, score_thresh, max_per_image)
        dst = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(overlay).save(dst)
        written.append(dst)
    return written
