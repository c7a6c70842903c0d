"""tools/diagnose_masks.py: best-IoU matching of predicted to GT masks."""
import os
import sys

import numpy as np

import mask2former_sim  # noqa: F401  (Pillow shim before detectron2)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

from diagnose_masks import best_matches  # noqa: E402


def _square(y0, x0, size, shape=(20, 20)):
    m = np.zeros(shape, dtype=bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_best_matches_picks_the_highest_iou_prediction_per_gt():
    gt = np.stack([_square(0, 0, 10), _square(10, 10, 10)])
    outline = _square(10, 10, 10) & ~_square(11, 11, 8)  # hollow: IoU 36/100
    pred = np.stack([outline, _square(0, 0, 10), _square(0, 0, 5)])
    best, idx = best_matches(gt, pred)
    assert idx.tolist() == [1, 0]
    assert np.allclose(best, [1.0, 0.36])


def test_best_matches_without_predictions_or_gts():
    gt = np.stack([_square(0, 0, 4)])
    best, idx = best_matches(gt, np.zeros((0, 20, 20), dtype=bool))
    assert best.tolist() == [0.0] and idx.tolist() == [-1]
    best, idx = best_matches(np.zeros((0, 20, 20), dtype=bool), gt)
    assert best.size == 0 and idx.size == 0
