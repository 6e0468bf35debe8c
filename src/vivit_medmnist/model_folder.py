"""Writing the publishable model folder that `vivit-medmnist-train` leaves and `vivit-medmnist-publish` pushes.

```python
from vivit_medmnist.model_folder import save_publishable_folder

save_publishable_folder("outputs/run", model, image_processor, dataset_name="organmnist3d", size=28,
                        log_history=trainer.state.log_history, test_labels=labels, test_logits=logits,
                        results=test_metrics, training_summary=summary)
```

A folder holds the weights (safetensors only), `config.json` (with `id2label`, `auto_map` and the pipeline in
`custom_pipelines`), the model, processor and pipeline code (so the folder loads with `trust_remote_code=True`
where this package is not installed), `preprocessor_config.json`, the model card `README.md`,
`training_curves.png`, `confusion_matrix.png`, `reliability_diagram.png` and the `*results.json` metrics. Write it through
`vivit_medmnist.safe_io.staged_files` to replace a folder's files all at once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import pipeline_vivit_medmnist as pipeline_module
from .calibration import calibrated_probabilities
from .dataset_card import DatasetCard, describe_preprocessing
from .explain import DEFAULT_METHOD, evidence_gallery
from .model_card import _label_names, build_model_card
from .pipeline_vivit_medmnist import CUSTOM_PIPELINES
from .plots import (
    plot_confusion_matrix,
    plot_evidence_gallery,
    plot_reliability_diagram,
    plot_training_curves,
)


def save_publishable_folder(
    output_dir: str | os.PathLike,
    model,
    image_processor,
    *,
    dataset_name: str,
    size: int,
    log_history: list[dict],
    test_labels: np.ndarray,
    test_logits: np.ndarray,
    results: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    template_path: str | os.PathLike | None = None,
    repo_id: str | None = None,
    split_sizes: Mapping[str, int] | None = None,
    base_model: str | None = None,
    test_volumes: np.ndarray | None = None,
    dataset: DatasetCard | None = None,
    splits_made: Mapping | None = None,
) -> None:
    """Write everything that gets published into `output_dir` (created if needed; other files are left alone).

    - `model.safetensors`, `config.json` and the model code (`model.save_pretrained`; the package registers the
      classes for the Auto classes, so `auto_map` is written and the code copied), `preprocessor_config.json` and
      the processor code (`image_processor.save_pretrained`);
    - `README.md`: the model card, from `template_path` (default: the repository's `model_card.md`), with YAML
      metadata (licenses, dataset, tags, pipeline tag and a `model-index` holding the test metrics of `results`);
    - `training_curves.png` from `log_history` (the Trainer's `state.log_history`);
    - `confusion_matrix.png` from `test_labels` (N,) and `test_logits` (N, num_labels), with the label names of
      `model.config.id2label`.

    `results` holds the measured metrics (`test_accuracy`, `test_auc`, `test_loss`, maybe `test_top5_accuracy`
    and `eval_*`); `training_summary` is a flat dict describing the training setup, shown as a table in the card.
    `repo_id` (optional) names the model in the card's loading example; `publish.py` fills it in otherwise.
    `split_sizes` ({"train": n, "validation": n, "test": n}) are the volumes the run used, where they differ from
    MedMNIST's; `base_model` is the Hub id of the model that was fine-tuned, if any. With `test_volumes` (the
    raw test volumes, in the order of `test_labels`), `evidence_gallery.png` shows a correctly and a wrongly
    classified test volume of each class with the evidence for its prediction (`explain.DEFAULT_METHOD`).
    `dataset` describes the user's own data for the card (default: the MedMNIST set `dataset_name`);
    `splits_made` (the splits cut from the training files) is written as `splits.json`, which is not published.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    label_names = _label_names(model.config)
    labels, logits = _check_predictions(test_labels, test_logits, len(label_names))
    # The card first: it validates `results` and the template before anything is written.
    card = build_model_card(
        model,
        dataset_name=dataset_name,
        size=size,
        results=results,
        training_summary=training_summary,
        template_path=template_path,
        repo_id=repo_id,
        split_sizes=split_sizes,
        base_model=base_model,
        gallery_method=DEFAULT_METHOD if test_volumes is not None else None,
        dataset=dataset,
        preprocessing=describe_preprocessing(image_processor),
    )

    # `pipeline(model=folder, trust_remote_code=True)` reads the task from custom_pipelines and runs the copied file
    model.config.custom_pipelines = CUSTOM_PIPELINES
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    shutil.copyfile(pipeline_module.__file__, output_dir / Path(pipeline_module.__file__).name)
    plot_training_curves(log_history, output_dir / "training_curves.png")
    plot_confusion_matrix(labels, logits, label_names, output_dir / "confusion_matrix.png")
    temperature = getattr(model.config, "calibration_temperature", None)
    plot_reliability_diagram(labels, logits, temperature, output_dir / "reliability_diagram.png")
    if test_volumes is not None:
        probabilities = calibrated_probabilities(logits, temperature)
        rows = evidence_gallery(model, image_processor, np.asarray(test_volumes), labels, probabilities)
        plot_evidence_gallery(rows, DEFAULT_METHOD, output_dir / "evidence_gallery.png")
    card.save(output_dir / "README.md")
    if splits_made:
        (output_dir / "splits.json").write_text(json.dumps(splits_made, indent=2))


def _check_predictions(labels, logits, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    logits = np.asarray(logits, dtype=np.float64)
    if labels.ndim == 2 and labels.shape[1] == 1:  # MedMNIST's (N, 1)
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"test_labels must be integer class ids of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if logits.shape != (labels.shape[0], num_labels):
        raise ValueError(
            f"test_logits must have shape (N, num_labels) = {(labels.shape[0], num_labels)} to match test_labels "
            f"and the model's {num_labels} labels, got {logits.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"test_labels must be in 0..{num_labels - 1}, got values in [{labels.min()}, {labels.max()}]"
        )
    return labels, logits


def save_results(output_dir: Path, **metrics_by_split: Mapping[str, Any]) -> dict[str, Any]:
    """Write <split>_results.json for each split and all_results.json (their union); return the union."""
    output_dir.mkdir(parents=True, exist_ok=True)
    everything = {}
    for split, metrics in metrics_by_split.items():
        (output_dir / f"{split}_results.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
        everything.update(metrics)
    (output_dir / "all_results.json").write_text(json.dumps(everything, indent=2, sort_keys=True))
    return everything
