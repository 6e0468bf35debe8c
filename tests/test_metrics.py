"""compute_metrics against hand-computed ACC / AUC / top-5 values."""

import math

import numpy as np
import pytest
from transformers import EvalPrediction

from vivit_medmnist.metrics import compute_metrics


def logits_for(probs) -> np.ndarray:
    """Logits whose softmax is `probs` (log-probabilities)."""
    return np.log(np.asarray(probs, dtype=np.float64))


def test_binary_auc_uses_positive_class_probability():
    # P(class 1) = 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1: of the 4 (positive, negative) pairs, 3 are ranked
    # right ((0.35, 0.1), (0.8, 0.1), (0.8, 0.4)) and one wrong ((0.35, 0.4)): AUC = 3/4.
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    logits = logits_for(np.stack([1 - p1, p1], axis=1))
    metrics = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 0, 1, 1])))
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.75)  # predictions 0, 0, 0, 1
    assert "top5_accuracy" not in metrics


def test_binary_auc_is_rank_based_not_threshold_based():
    # every volume predicted class 0 (accuracy 1/2) but the positive ones ranked higher: AUC 1
    p1 = np.array([0.1, 0.2, 0.3, 0.4])
    metrics = compute_metrics((logits_for(np.stack([1 - p1, p1], 1)), np.array([[0], [0], [1], [1]])))
    assert metrics == {
        "accuracy": pytest.approx(0.5),
        "auc": pytest.approx(1.0),
        # confidences 0.9, 0.8 (right), 0.7, 0.6 (wrong): |1-0.9|, |1-0.8|, |0-0.7|, |0-0.6| in four bins
        "ece": pytest.approx((0.1 + 0.2 + 0.7 + 0.6) / 4),
        "brier": pytest.approx(np.mean([2 * 0.1**2, 2 * 0.2**2, 2 * 0.7**2, 2 * 0.6**2])),
    }


def test_multiclass_auc_is_mean_one_vs_rest():
    probs = np.array(
        [
            [0.6, 0.3, 0.1],  # label 0
            [0.2, 0.5, 0.3],  # label 1
            [0.5, 0.2, 0.3],  # label 2
            [0.3, 0.3, 0.4],  # label 0
        ]
    )
    labels = np.array([0, 1, 2, 0])
    # class 0: positives (0.6, 0.3) vs negatives (0.2, 0.5): 0.6 beats both, 0.3 beats 0.2 only -> 3/4
    # class 1: positive 0.5 vs negatives 0.3, 0.2, 0.3 -> 3/3 = 1
    # class 2: positive 0.3 vs negatives 0.1, 0.3, 0.4 -> (1 + 0.5 (tie) + 0) / 3 = 0.5
    expected_auc = (0.75 + 1.0 + 0.5) / 3
    metrics = compute_metrics(EvalPrediction(predictions=logits_for(probs), label_ids=labels))
    assert metrics["auc"] == pytest.approx(expected_auc)
    assert metrics["accuracy"] == pytest.approx(0.5)  # predictions 0, 1, 0, 2: the last two are wrong
    assert "top5_accuracy" not in metrics  # 3 classes: top-5 would be 1 by definition


def test_top5_accuracy_for_more_than_five_classes():
    # 7 classes; the label's rank (1 = most probable) is 1, 5, 6, 7 -> top-5 hits 2 of 4, top-1 hits 1 of 4
    order_probs = np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.06, 0.04])  # descending, sums to 1
    classes = np.arange(7)
    logits, labels = [], []
    for rank in (1, 5, 6, 7):
        logits.append(logits_for(order_probs))
        labels.append(classes[rank - 1])
    with pytest.warns(Warning, match="Only one class"):  # classes 1-3 never occur: their AUC is undefined
        metrics = compute_metrics(EvalPrediction(predictions=np.stack(logits), label_ids=np.array(labels)))
    assert metrics["top5_accuracy"] == pytest.approx(0.5)
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert math.isnan(metrics["auc"])


def test_tuple_predictions_and_undefined_auc():
    # the model may return (logits, hidden_states); a split with one class only has no AUC (NaN, as sklearn says)
    logits = logits_for([[0.7, 0.3], [0.4, 0.6]])
    with pytest.warns(Warning, match="Only one class"):
        metrics = compute_metrics(((logits, np.zeros((2, 3, 4))), np.array([1, 1])))
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert math.isnan(metrics["auc"])


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="expected logits"):
        compute_metrics((np.zeros((3, 2)), np.zeros(4)))
