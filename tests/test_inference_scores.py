"""Inference scores against a hand-computed case: top-k over queries x classes by class
probability (sorted), score = class prob x mean mask prob inside the binary mask."""
import math
from types import SimpleNamespace

import pytest
import torch

from mask2former_sim.modeling.meta_arch import BoxSupMaskFormer


def logit(p):
    return math.log(p / (1 - p))


def run(detections):
    # 2 queries, 2 classes (+ no-object); logits = log-probabilities, so softmax gives them back
    probs = torch.tensor([[0.6, 0.3, 0.1],   # query 0
                          [0.2, 0.5, 0.3]])  # query 1
    mask_probs = torch.tensor([
        [[0.9, 0.7], [0.2, 0.4]],  # query 0: inside (> 0.5) 0.9, 0.7 -> mean 0.8
        [[0.6, 0.1], [0.3, 0.3]],  # query 1: inside 0.6 -> mean 0.6
    ])
    mask_logits = mask_probs.clone().apply_(logit)
    stub = SimpleNamespace(num_classes=2, detections_per_image=detections, mask_threshold=0.5)
    # same padded, image and output size: the resizes are identities
    return BoxSupMaskFormer.instance_inference(stub, probs.log(), mask_logits, (2, 2), (2, 2), (2, 2))


def test_scores_classes_masks_and_order_by_hand():
    out = run(detections=3)
    # class probs over (query, class): (0,0) 0.6, (1,1) 0.5, (0,1) 0.3, (1,0) 0.2 -> top 3
    assert out.pred_classes.tolist() == [0, 1, 1]
    expected = [0.6 * 0.8, 0.5 * 0.6, 0.3 * 0.8]
    assert out.scores.tolist() == pytest.approx(expected, rel=1e-4)
    assert out.pred_masks.tolist() == [
        [[True, True], [False, False]],   # query 0
        [[True, False], [False, False]],  # query 1
        [[True, True], [False, False]],   # query 0 again, for class 1
    ]
    # tight boxes of the masks, XYXY
    assert out.pred_boxes.tensor.tolist() == [[0, 0, 2, 1], [0, 0, 1, 1], [0, 0, 2, 1]]


def test_all_pairs_when_fewer_than_the_detection_limit():
    out = run(detections=100)
    assert len(out) == 4
    assert out.scores.tolist() == pytest.approx([0.48, 0.30, 0.24, 0.2 * 0.6], rel=1e-4)
    assert out.pred_classes.tolist() == [0, 1, 1, 0]


def test_empty_mask_scores_zero():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    stub = SimpleNamespace(num_classes=2, detections_per_image=1, mask_threshold=0.5)
    out = BoxSupMaskFormer.instance_inference(stub, probs.log(), torch.full((1, 2, 2), -5.0), (2, 2), (2, 2), (2, 2))
    assert out.scores.tolist() == [0.0] and not out.pred_masks.any()
