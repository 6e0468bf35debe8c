"""Classification metrics as MedMNIST defines them, for `Trainer(compute_metrics=...)`.

- `accuracy`: the fraction of volumes whose arg-max class is the label (MedMNIST "ACC").
- `auc` (MedMNIST "AUC"): for two classes, the ROC AUC of the positive-class (label 1) softmax probability; for
  more, the mean one-vs-rest ROC AUC over the classes (`roc_auc_score(..., multi_class="ovr",
  average="macro")`, which is MedMNIST's `getAUC`). It is NaN when it is undefined (a class with no example in
  the evaluated split), as scikit-learn reports it.
- `top5_accuracy`: the fraction whose label is among the 5 most probable classes, for tasks with more than 5
  classes (with 5 or fewer it is 1 by definition, so it is not reported).
- `ece` and `brier`: how well the softmax probabilities are calibrated (`vivit_medmnist.calibration`): the
  expected calibration error over 15 bins of the top-class confidence, and the multi-class Brier score.

The task is read from the logits: `logits.shape[-1] == 2` is binary. The Trainer prefixes the keys (`eval_`,
`test_`).
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, roc_auc_score, top_k_accuracy_score

from .calibration import brier_score, expected_calibration_error

TOP_K = 5


def compute_metrics(eval_pred) -> dict[str, float]:
    """`eval_pred`: a `transformers.EvalPrediction` (or a `(logits, labels)` pair) of (N, C) logits, (N,) labels."""
    logits, labels = eval_pred[0], eval_pred[1]
    # the model may also return hidden states/attentions: the logits come first
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits (N, num_classes) for N={labels.shape[0]} labels, got {logits.shape}"
        )
    n_classes = logits.shape[-1]
    probs = softmax(logits, axis=-1)
    metrics = {"accuracy": float(accuracy_score(labels, logits.argmax(-1)))}
    if n_classes == 2:
        metrics["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    else:
        classes = np.arange(n_classes)
        metrics["auc"] = float(
            roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=classes)
        )
        if n_classes > TOP_K:
            metrics["top5_accuracy"] = float(top_k_accuracy_score(labels, probs, k=TOP_K, labels=classes))
    metrics["ece"] = expected_calibration_error(probs, labels)
    metrics["brier"] = brier_score(probs, labels)
    return metrics
