"""Calibrated probabilities: expected calibration error, Brier score and temperature scaling.

```python
from vivit_medmnist.calibration import expected_calibration_error, brier_score, fit_temperature

temperature = fit_temperature(validation_logits, validation_labels)  # one scalar > 0 (Guo et al. 2017)
probabilities = softmax(test_logits / temperature)
expected_calibration_error(probabilities, test_labels)  # 15 equal-width bins of the top-class confidence
```

`train.py` fits the temperature on the validation split after training and saves it in the model's config
(`calibration_temperature`); the pipeline, `predict.py` and the demo divide the logits by it. The model itself
still returns raw logits: a calibrated probability is `softmax(logits / config.calibration_temperature)`, which
`calibrated_probabilities` computes. Temperature scaling leaves the arg-max (ACC) and every AUC unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

__all__ = [
    "ECE_BINS",
    "FLOOR_DRAWS",
    "brier_score",
    "calibrate",
    "calibrated_metrics",
    "calibrated_probabilities",
    "ece_after_a_fitted_temperature",
    "ece_of_a_calibrated_model",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_bins",
]

ECE_BINS = 15  # Guo et al. 2017's number of bins


def _labels(labels) -> np.ndarray:
    return np.asarray(labels).reshape(-1).astype(np.int64)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Bin i holds confidences in (i / bins, (i + 1) / bins]; a confidence of exactly 0 goes to the first bin."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)


def reliability_bins(probabilities: np.ndarray, labels, bins: int = ECE_BINS) -> list[dict]:
    """The top-class confidence cut into `bins` equal-width bins of (0, 1]: per bin its range, the number of
    volumes, their mean confidence and their accuracy (None for an empty bin)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), _labels(labels)
    confidence = probabilities.max(-1)
    correct = probabilities.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = _bin_index(confidence, bins)
    out = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        out.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return out


def expected_calibration_error(probabilities: np.ndarray, labels, bins: int = ECE_BINS) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): the count-weighted mean |accuracy - confidence| over `bins`
    equal-width bins of the top-class confidence. 0 is perfect."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return float("nan")
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]) / total)


def ece_of_a_calibrated_model(
    probabilities: np.ndarray, volumes: int, draws: int = 2000, bins: int = ECE_BINS, seed: int = 0
) -> dict[str, float]:
    """The ECE that a perfectly calibrated model would show on `volumes` volumes, whose top-class confidences are
    drawn (with replacement) from those of `probabilities` (N, classes): each volume is classified correctly with
    probability equal to its confidence, so any ECE measured is sampling noise. Returns the mean and the 5th and
    95th percentiles over `draws` simulated sets. An ECE measured on a set of that size is only evidence of
    miscalibration where it lies well above this."""
    confidence = np.asarray(probabilities, dtype=np.float64).max(-1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        drawn = rng.choice(confidence, size=volumes, replace=True)
        correct = rng.random(volumes) < drawn
        index = _bin_index(drawn, bins)  # the bins of expected_calibration_error
        count = np.bincount(index, minlength=bins)
        gap = np.bincount(index, weights=correct - drawn, minlength=bins)  # per bin: count * (accuracy - confidence)
        values.append(float(np.abs(gap).sum() / count.sum()))
    values = np.asarray(values)
    return {
        "mean": float(values.mean()),
        "p5": float(np.percentile(values, 5)),
        "p95": float(np.percentile(values, 95)),
    }


def ece_after_a_fitted_temperature(
    logits: np.ndarray,
    temperature: float,
    validation_volumes: int,
    test_volumes: int,
    draws: int = 500,
    bins: int = ECE_BINS,
    seed: int = 0,
) -> dict[str, float]:
    """The test ECE that temperature scaling leaves when its temperature is fitted on `validation_volumes`
    volumes, for a model that one temperature makes exactly right: volumes are drawn (with replacement) from
    `logits` (N, classes), each volume's label is drawn from `softmax(logits / temperature)` (so `temperature`
    is the right one by construction), T is fitted on a validation set of `validation_volumes` such volumes
    (`fit_temperature`) and the ECE of `softmax(logits / T)` is measured on a test set of `test_volumes`. This
    is `ece_of_a_calibrated_model`'s noise plus that of a temperature fitted on a small split: the floor of
    train.py's protocol. Returns the mean and the 5th and 95th percentiles of the ECE over `draws` simulated
    pairs of splits, and the 5th and 95th percentiles of the fitted T."""
    logits = np.asarray(logits, dtype=np.float64)
    right = softmax(logits / temperature, axis=-1)
    rng = np.random.default_rng(seed)

    def draw(volumes: int) -> tuple[np.ndarray, np.ndarray]:
        index = rng.integers(0, len(logits), volumes)
        # one draw from each row's softmax: the number of cumulative probabilities below a uniform number
        labels = (rng.random((volumes, 1)) > right[index].cumsum(-1)).sum(-1)
        return logits[index], np.minimum(labels, logits.shape[-1] - 1)  # (rounding can leave the cumsum < 1)

    eces, fitted = [], []
    for _ in range(draws):
        validation, test = draw(validation_volumes), draw(test_volumes)
        fitted.append(fit_temperature(*validation))
        eces.append(expected_calibration_error(calibrated_probabilities(test[0], fitted[-1]), test[1], bins))
    return {
        "mean": float(np.mean(eces)),
        "p5": float(np.percentile(eces, 5)),
        "p95": float(np.percentile(eces, 95)),
        "temperature_p5": float(np.percentile(fitted, 5)),
        "temperature_p95": float(np.percentile(fitted, 95)),
    }


def brier_score(probabilities: np.ndarray, labels) -> float:
    """The multi-class Brier score (Brier 1950): the mean over volumes of the squared distance between the
    probability vector and the one-hot label, summed over classes (0 is perfect, 2 the worst; for two classes it
    is twice the binary Brier score of the positive class)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), _labels(labels)
    one_hot = np.eye(probabilities.shape[-1])[labels]
    return float(((probabilities - one_hot) ** 2).sum(-1).mean())


def fit_temperature(logits: np.ndarray, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T > 0 that minimises the negative log-likelihood of `softmax(logits / T)` on `labels`
    (temperature scaling, Guo et al. 2017), searched over log T within `bounds`."""
    logits, labels = np.asarray(logits, dtype=np.float64), _labels(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"expected logits (N, classes) for N = {len(labels)} labels, got {logits.shape}")

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=-1)[np.arange(len(labels)), labels].mean())

    found = minimize_scalar(nll, bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def calibrated_probabilities(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(logits / temperature) (temperature None: 1, the raw softmax)."""
    return softmax(np.asarray(logits, dtype=np.float64) / (temperature or 1.0), axis=-1)


FLOOR_DRAWS = 200  # simulated (validation, test) pairs behind the floor train.py records: about a second


def calibrate(config, validation, test) -> tuple[dict, dict]:
    """Fit the temperature on the validation predictions (`Trainer.predict` outputs), store it in `config`
    (`calibration_temperature`), and return the calibrated ECE and Brier score of validation (where T was
    fitted: optimistic) and of test (held out), as `eval_calibrated_*` and `test_calibrated_*` metrics; the
    temperature is in both. With the validation metrics (it reads no test volume, only the test split's size),
    what the split sizes allow (`ece_after_a_fitted_temperature`): `calibration_ece_floor` and
    `calibration_ece_floor_p95`, the test ECE that a model one temperature makes exactly right would show with
    T fitted on as many volumes, and `calibration_temperature_p5` / `_p95`, the spread of T so fitted."""
    logits = _logits(validation.predictions)
    temperature = fit_temperature(logits, validation.label_ids)
    config.calibration_temperature = temperature
    floor = ece_after_a_fitted_temperature(
        logits, temperature, len(logits), len(_logits(test.predictions)), draws=FLOOR_DRAWS
    )
    validation_metrics = {
        **calibrated_metrics(validation, temperature, "eval"),
        "calibration_ece_floor": floor["mean"],
        "calibration_ece_floor_p95": floor["p95"],
        "calibration_temperature_p5": floor["temperature_p5"],
        "calibration_temperature_p95": floor["temperature_p95"],
        "calibration_validation_volumes": len(logits),
    }
    return validation_metrics, calibrated_metrics(test, temperature, "test")


def calibrated_metrics(output, temperature: float, prefix: str) -> dict[str, float]:
    """`<prefix>_calibrated_ece` and `<prefix>_calibrated_brier` of a `Trainer.predict` output with the
    probabilities `softmax(logits / temperature)`, and `calibration_temperature`."""
    probabilities = calibrated_probabilities(_logits(output.predictions), temperature)
    return {
        f"{prefix}_calibrated_ece": expected_calibration_error(probabilities, output.label_ids),
        f"{prefix}_calibrated_brier": brier_score(probabilities, output.label_ids),
        "calibration_temperature": temperature,
    }


def _logits(predictions) -> np.ndarray:
    return np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
