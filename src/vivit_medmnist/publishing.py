"""The publishable model folder: what `scripts/train.py` leaves behind and `scripts/publish.py` pushes to the Hub.

```python
from vivit_medmnist.publishing import save_publishable_folder, publishable_files, check_folder

save_publishable_folder("outputs/run", model, image_processor, dataset_name="organmnist3d", size=28,
                        log_history=trainer.state.log_history, test_labels=labels, test_logits=logits,
                        results=test_metrics, training_summary=summary)
publishable_files("outputs/run")  # ['README.md', 'config.json', ..., 'model.safetensors', ...]
check_folder("outputs/run").raise_for_problems()  # files, no pickles, loads without this package
```

A folder holds the weights (safetensors only), `config.json` (with `id2label` and `auto_map`), the model and
processor code that `save_pretrained` copies next to them (so the folder loads with `trust_remote_code=True`
where this package is not installed), `preprocessor_config.json`, a model card `README.md` rendered from the
repository's `model_card.md` template, `training_curves.png`, `confusion_matrix.png` and the `*results.json`
metrics. Training checkpoints (`<folder>/checkpoints/`, holding pickled `optimizer.pt`, `rng_state.pth`,
`training_args.bin`) and anything else outside `PUBLISH_ALLOW_PATTERNS` are never published.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import pipeline_vivit_medmnist as pipeline_module
from .pipeline_vivit_medmnist import CUSTOM_PIPELINES, TASK

__all__ = [
    "MODEL_CARD_TEMPLATE",
    "PUBLISH_ALLOW_PATTERNS",
    "REPO_ID_PLACEHOLDER",
    "REQUIRED_FILES",
    "FolderCheck",
    "build_model_card",
    "check_folder",
    "check_model_path",
    "find_pickled_files",
    "hub_id",
    "load_without_package",
    "plot_confusion_matrix",
    "plot_training_curves",
    "probe_volume",
    "publishable_files",
    "save_publishable_folder",
    "stage_for_upload",
]

# What gets uploaded: matched against the names of the files at the TOP level of the folder only. (huggingface_hub's
# own pattern matching lets `*` cross "/", so "*.safetensors" would also match checkpoints/*/model.safetensors:
# `publishable_files` therefore never looks into subfolders, and `publish.py` uploads a staged copy of exactly
# these files.)
PUBLISH_ALLOW_PATTERNS = [
    "*.safetensors",
    "config.json",
    "preprocessor_config.json",
    "*.py",
    "README.md",
    "*.png",
    "*results.json",
]
# Without these a folder is not a usable model repository.
REQUIRED_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "README.md")
# Extensions of files that torch/pickle write (never published even if an allow pattern matched them).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")

# The model-card template (jinja2, rendered by huggingface_hub.ModelCard.from_template) at the repository root.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "model_card.md"
# The card's "how to load" snippet names the model by this placeholder until `publish.py` knows the repo id.
REPO_ID_PLACEHOLDER = "<hub-user>/<model-name>"

# No `pipeline_tag`: the Hub's tags name stock pipelines, and "video-classification" (PyAV, frame sampling)
# cannot run this model; the folder's own "volume-classification" pipeline runs with trust_remote_code=True.
CARD_TAGS = ["vivit", TASK, "vision-transformer", "medical-imaging", "3d", "medmnist"]
# Trainer's speed metrics (`speed_metrics` in transformers.trainer_utils): not model results.
_TIMING_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time")
# Metric name (after the split prefix) -> (Hub metric id, pretty name) for the model-index.
_INDEX_METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "auc": ("roc_auc", "AUC"),
    "top5_accuracy": ("top_k_accuracy", "top-5 accuracy"),
}
_METRIC_NAMES = {
    "accuracy": "accuracy (ACC)",
    "auc": "AUC",
    "top5_accuracy": "top-5 accuracy",
    "loss": "loss (cross-entropy)",
}
# Result prefixes -> split. Not "train": the Trainer's train_loss is the running average of the training loss (with
# dropout), not an evaluation of the training split; it is in the training curves.
_SPLIT_PREFIXES = {"eval": "validation", "validation": "validation", "test": "test"}

VIVIT_CITATION = """\
@inproceedings{arnab2021vivit,
    title={ViViT: A Video Vision Transformer},
    author={Arnab, Anurag and Dehghani, Mostafa and Heigold, Georg and Sun, Chen and Lu{\\v{c}}i{\\'c}, Mario and
            Schmid, Cordelia},
    booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
    pages={6836--6846},
    year={2021}
}
"""


# --------------------------------------------------------------------------------------------------------------
# What is published
# --------------------------------------------------------------------------------------------------------------


def check_model_path(name: str) -> str | None:
    """An error message when `name` is neither an existing model folder nor shaped like a Hub id ORG/NAME."""
    path = Path(name).expanduser()
    if path.exists():
        return None if path.is_dir() else f"{name} is a file; expected a model folder or a Hub id ORG/NAME"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return f"{name}: no such model folder (and not a Hub id ORG/NAME)"
    return None


def hub_id(name: str | None) -> str | None:
    """`name` if it names a model on the Hub (ORG/NAME, not a local folder), else None: a card's `base_model`."""
    if name is None or Path(name).expanduser().exists() or check_model_path(name) is not None:
        return None
    return name if name.count("/") == 1 else None


def publishable_files(folder: str | os.PathLike) -> list[str]:
    """The names of the files of `folder` that would be uploaded: top-level files matching
    `PUBLISH_ALLOW_PATTERNS` whose extension is not a pickle one, sorted. Subfolders (checkpoints/, runs/) are
    never looked into."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{folder} is not a folder (expected a model folder written by scripts/train.py)"
        )
    names = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.lower().endswith(PICKLE_SUFFIXES):
            continue
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in PUBLISH_ALLOW_PATTERNS):
            names.append(path.name)
    return names


def _is_pickle_bytes(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number; torch.save writes a zip holding data.pkl.
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def find_pickled_files(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Those of `names` (files in `folder`) that are or may be pickles: a pickle extension, pickle/zip magic bytes,
    or a `.safetensors` file whose header safetensors cannot read."""
    from safetensors import safe_open

    found = []
    for name in names:
        path = Path(folder) / name
        if name.lower().endswith(PICKLE_SUFFIXES):
            found.append(name)
        elif name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception:  # noqa: BLE001 -- any failure means "not a safetensors file"
                found.append(name)
        else:
            with open(path, "rb") as f:
                if _is_pickle_bytes(f.read(4)):
                    found.append(name)
    return found


# --------------------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------------------


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
    MedMNIST's; `base_model` is the Hub id of the model that was fine-tuned, if any.
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
    )

    # `pipeline(model=folder, trust_remote_code=True)` reads the task from custom_pipelines and runs the copied file
    model.config.custom_pipelines = CUSTOM_PIPELINES
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    shutil.copyfile(pipeline_module.__file__, output_dir / Path(pipeline_module.__file__).name)
    plot_training_curves(log_history, output_dir / "training_curves.png")
    plot_confusion_matrix(labels, logits, label_names, output_dir / "confusion_matrix.png")
    card.save(output_dir / "README.md")


def _label_names(config) -> list[str]:
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


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


# --------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg backend: no display needed)
# --------------------------------------------------------------------------------------------------------------


def training_log(log_history: list[dict]) -> list[dict]:
    """The entries logged during training: the run's summary entry (with `train_runtime`) ends it, and an
    evaluation after it (the final one of the best model) would be drawn as one more point at the last epoch."""
    ends = [i for i, entry in enumerate(log_history) if "train_runtime" in entry]
    return log_history[: ends[-1] + 1] if ends else log_history


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> None:
    """Training loss at every logging step and validation loss per evaluation (left), validation accuracy/AUC
    per evaluation (right), against the epoch; a note instead of a curve where nothing was logged."""
    from matplotlib.figure import Figure

    log_history = training_log(log_history)

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [
            (entry.get("epoch", entry.get("step", i)), entry[key])
            for i, entry in enumerate(log_history)
            if isinstance(entry.get(key), (int, float)) and math.isfinite(entry[key])
        ]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(11, 4.2), layout="constrained")  # a Figure without pyplot uses the Agg canvas
    ax_loss, ax_metrics = fig.subplots(1, 2)
    x, y = series("loss")
    if x:
        ax_loss.plot(
            x, y, ".-" if len(x) < 50 else "-", label="training loss (per logging step)", markersize=5
        )
    else:  # fewer steps than logging_steps: only the Trainer's run average is logged
        x, y = series("train_loss")
        if x:
            ax_loss.plot(x, y, "s", label="training loss (average over the run)", markersize=5)
    x, y = series("eval_loss")
    if x:
        ax_loss.plot(x, y, "o-", label="validation loss", markersize=4)
    for key, label in (
        ("eval_accuracy", "validation accuracy"),
        ("eval_auc", "validation AUC"),
        ("eval_top5_accuracy", "validation top-5 accuracy"),
    ):
        x, y = series(key)
        if x:
            ax_metrics.plot(x, y, "o-", label=label, markersize=4)
    for ax, title, ylabel in (
        (ax_loss, "Loss", "cross-entropy"),
        (ax_metrics, "Validation metrics", "value"),
    ):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(
                0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
    fig.savefig(path, dpi=100)


def plot_confusion_matrix(labels: np.ndarray, logits: np.ndarray, label_names: list[str], path) -> None:
    """The test confusion matrix (true rows, predicted columns; predictions = argmax of the logits)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    predictions = np.asarray(logits).argmax(axis=-1)
    n = len(label_names)
    side = max(4.5, 0.6 * n + 2.5)
    fig = Figure(figsize=(side + 1.5, side + 0.5), layout="constrained")
    ax = fig.subplots()
    display = ConfusionMatrixDisplay.from_predictions(
        labels,
        predictions,
        labels=list(range(n)),
        display_labels=label_names,
        ax=ax,
        colorbar=True,
        xticks_rotation=45 if n > 3 else "horizontal",
        cmap="Blues",
    )
    accuracy = float((predictions == labels).mean()) if len(labels) else float("nan")
    display.ax_.set_title(f"Test confusion matrix\n{len(labels)} volumes, accuracy {accuracy:.3f}")
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------------------


_SPLIT_KEYS = (("train", "train"), ("validation", "val"), ("test", "test"))  # split -> MedMNIST's name


def _volumes(split_sizes: Mapping[str, int] | None, split: str, total: int) -> str:
    used = (split_sizes or {}).get(split, total)
    return str(total) if used == total else f"{used} of {total}"


def _is_timing(key: str) -> bool:
    return key.endswith(_TIMING_SUFFIXES)


def _split_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"test_accuracy": .9, "eval_auc": .8, "test_runtime": 3} -> {"test": {"accuracy": .9}, "validation": ...}."""
    by_split: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        prefix, _, metric = key.partition("_")
        if prefix not in _SPLIT_PREFIXES or not metric or _is_timing(key) or metric == "epoch":
            continue
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
            continue
        by_split.setdefault(_SPLIT_PREFIXES[prefix], {})[metric] = float(value)
    return by_split


def _format(value: Any) -> str:
    if isinstance(value, enum.Enum):  # TrainingArguments' OptimizerNames, SchedulerType, ...
        value = value.value
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def describe_model(config) -> str:
    """The card's paragraph on how the model reads a volume, from its config (every encoder type and option)."""
    grid = " × ".join(map(str, config.grid_size))
    overlap = "overlapping" if config.stride != config.tubelet_size else "non-overlapping"
    covered = [(n - 1) * step + k for n, step, k in zip(config.grid_size, config.stride, config.tubelet_size)]
    unread = [size - c for size, c in zip(config.volume_size, covered)]
    if config.padding == "same":
        padding = " (the volume zero-padded so that every voxel is covered)"
    elif any(unread):
        padding = f" (no padding: the last {', '.join(map(str, unread))} voxels along D, H, W are never read)"
    else:
        padding = ""
    text = (
        f"A {' × '.join(map(str, config.volume_size))} volume is read as a video whose frames are its slices along "
        f"the first axis. A Conv3d whose kernel is the size of a *tubelet* cuts it into {overlap} "
        f'spatio-temporal tubelets{padding}, a {grid} grid, and embeds each as one token ("tubelet embedding", '
        "ViViT §3.2); learned position embeddings are added. "
    )
    if config.encoder_type == "factorised_encoder":
        frames, per_slab = config.grid_size[0], config.num_tokens // config.grid_size[0]
        text += (
            f"{config.num_hidden_layers} pre-norm *spatial* Transformer blocks attend within each of the {frames} "
            f"temporal slabs ({per_slab} tokens each); each slab's tokens are layer-normed and averaged into one "
            f"token, learned temporal position embeddings are added, and {config.num_temporal_layers} *temporal* "
            f'blocks attend over those {frames} tokens (ViViT\'s Model 2, "factorised encoder"). '
        )
    else:
        cls = " and a CLS token" if config.pooling == "cls" else ""
        text += (
            f"A stack of {config.num_hidden_layers} pre-norm Transformer blocks attends jointly over all "
            f'{config.num_tokens} tokens{cls} (ViViT\'s Model 1, "spatio-temporal attention"). '
        )
    pooled = "the final state of the CLS token" if config.pooling == "cls" else "the mean over the tokens"
    return text + f"A final LayerNorm, {pooled} and a linear layer give one logit per class."


def _architecture(model) -> list[tuple[str, str]]:
    config = model.config
    d, h, w = config.volume_size
    grid = " × ".join(map(str, config.grid_size))
    head_dim = config.hidden_size // config.num_attention_heads
    mlp_out = config.mlp_output_act or "linear"
    kernel, stride = "×".join(map(str, config.tubelet_size)), "×".join(map(str, config.stride))
    pooled = "CLS token" if config.pooling == "cls" else "mean over tokens"
    cls_note = " (incl. a CLS token)" if config.pooling == "cls" else " (no CLS token)"
    embedding = (
        f"Conv3d, kernel {kernel}, stride {stride}, padding `{config.padding}` → {grid} = "
        f"{config.num_tokens} tokens of width {config.hidden_size}"
    )
    block = (
        f"pre-norm Transformer block(s), {config.num_attention_heads} heads of dim {head_dim}, MLP "
        f"{config.hidden_size} → {config.intermediate_size} ({config.hidden_act}) → {config.hidden_size} "
        f"({mlp_out}), LayerNorm eps {config.layer_norm_eps:g}"
    )
    positions = f"learned, {config.sequence_length} positions{cls_note}"
    if config.encoder_type == "factorised_encoder":
        frames = config.grid_size[0]
        encoder = (
            f"factorised (ViViT Model 2): {config.num_hidden_layers} spatial blocks within each of {frames} "
            f"temporal slabs, slab LayerNorm + mean, then {config.num_temporal_layers} temporal blocks; each a {block}"
        )
        positions += f"; temporal: learned, {frames} positions"
    else:
        encoder = f"joint (ViViT Model 1): {config.num_hidden_layers} {block}"
    regularisation = (
        f"attention dropout {config.attention_probs_dropout_prob:g}, hidden dropout "
        f"{config.hidden_dropout_prob:g}, stochastic depth {config.drop_path_rate:g}"
    )
    return [
        (
            "Input",
            f"{d} × {h} × {w} volume, {config.num_channels} channel(s): a video of {d} frames of {h} × {w}",
        ),
        ("Tubelet embedding", embedding),
        ("Position embedding", positions),
        ("Encoder", encoder),
        ("Regularisation", regularisation),
        ("Head", f"final LayerNorm → {pooled} → Linear({config.hidden_size}, {config.num_labels})"),
        ("Parameters", f"{model.num_parameters():,}"),
    ]


def build_model_card(
    model,
    *,
    dataset_name: str,
    size: int,
    results: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    template_path: str | os.PathLike | None = None,
    repo_id: str | None = None,
    split_sizes: Mapping[str, int] | None = None,
    base_model: str | None = None,
):
    """Render the model card (a `huggingface_hub.ModelCard`) from the jinja2 template; see
    `save_publishable_folder`. The `model-index` holds every test (and validation) metric of `results` among
    accuracy, AUC and top-5 accuracy, with the values given."""
    import medmnist
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .data import MEDMNIST_CITATION, MEDMNIST_HOMEPAGE, resolve_dataset

    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model-card template {template_path} not found (it ships at the root of the vivit-medmnist "
            "repository); pass template_path="
        )
    source = resolve_dataset(dataset_name, size)
    dataset_pretty = f"{medmnist.INFO[source.name]['python_class']} ({size}³)"  # e.g. "OrganMNIST3D (28³)"
    by_split = _split_metrics(results)
    if "test" not in by_split:
        raise ValueError(
            f"results must hold test metrics (test_accuracy, test_auc, ...), got keys {sorted(results)}"
        )
    model_name = f"vivit-medmnist-{source.name}" + ("" if size == 28 else f"-{size}")

    eval_results = []
    for split in ("test", "validation"):
        for metric, (metric_type, pretty_metric) in _INDEX_METRICS.items():
            # NaN (e.g. an AUC undefined on a split missing a class) stays in the table, not in the metadata
            if math.isfinite(by_split.get(split, {}).get(metric, math.nan)):
                eval_results.append(
                    EvalResult(
                        task_type=TASK,
                        task_name="Video (3D volume) classification",
                        dataset_type="medmnist",
                        dataset_name=f"MedMNIST v2 {dataset_pretty}",
                        dataset_config=source.name,
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_value=by_split[split][metric],
                        metric_name=f"{split.capitalize()} {pretty_metric}",
                    )
                )
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        tags=CARD_TAGS + [source.name],
        base_model=base_model,
        metrics=["accuracy", "roc_auc"],
        model_name=model_name,
        eval_results=eval_results,
    )

    metrics_order = ["accuracy", "auc", "top5_accuracy", "loss"]
    metric_names = sorted(
        {m for split in by_split.values() for m in split},
        key=lambda m: (metrics_order.index(m) if m in metrics_order else len(metrics_order), m),
    )
    splits = [s for s in ("test", "validation") if s in by_split]
    results_rows = [
        [_METRIC_NAMES.get(m, m.replace("_", " "))]
        + [_format(by_split[s][m]) if m in by_split[s] else "–" for s in splits]
        for m in metric_names
    ]
    label_names = _label_names(model.config)
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        architecture=_architecture(model),
        model_description=describe_model(model.config),
        num_parameters=f"{model.num_parameters():,}",
        volume_size=" × ".join(map(str, model.config.volume_size)),
        dataset_name=source.name,
        dataset_pretty=dataset_pretty,
        dataset_size=size,
        dataset_description=source.description,
        dataset_task=source.task,
        dataset_license=source.license,
        dataset_homepage=MEDMNIST_HOMEPAGE,
        dataset_splits=[
            (split, _volumes(split_sizes, split, source.n_samples[key])) for split, key in _SPLIT_KEYS
        ],
        test_volumes=(split_sizes or {}).get("test", source.n_samples["test"]),
        label_names=list(enumerate(label_names)),
        training_summary=[(str(k), _format(v)) for k, v in training_summary.items()],
        results_splits=splits,
        results_rows=results_rows,
        medmnist_citation=MEDMNIST_CITATION.strip(),
        vivit_citation=VIVIT_CITATION.strip(),
    )


# --------------------------------------------------------------------------------------------------------------
# Checking a folder before upload
# --------------------------------------------------------------------------------------------------------------

# Run in a fresh interpreter where `vivit_medmnist` cannot be imported (what a Hub user without the package has):
# load model and processor through the Auto classes with trust_remote_code=True and run one volume.
_LOAD_SCRIPT = r"""
import json, sys
sys.modules["vivit_medmnist"] = None  # any `import vivit_medmnist` now raises ImportError
import numpy as np, torch
from transformers import AutoImageProcessor, AutoModelForVideoClassification
folder = sys.argv[1]
model = AutoModelForVideoClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
shape = tuple(model.config.volume_size)
volume = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)  # = probe_volume(shape)
with torch.no_grad():
    logits = model(**processor(volume, return_tensors="pt")).logits
top = None
if getattr(model.config, "custom_pipelines", None):  # the folder's own pipeline, as pipeline() finds it
    from transformers import pipeline
    top = pipeline(model=folder, trust_remote_code=True)(volume)
print(json.dumps({
    "pipeline": top,
    "model_class": type(model).__module__ + "." + type(model).__name__,
    "processor_class": type(processor).__module__ + "." + type(processor).__name__,
    "num_labels": model.config.num_labels,
    "id2label": {str(k): v for k, v in model.config.id2label.items()},
    "logits": logits[0].tolist(),
}))
"""


def probe_volume(volume_size) -> np.ndarray:
    """The volume `load_without_package` feeds the model (to compare its logits with another load)."""
    shape = tuple(volume_size)
    return (np.arange(int(np.prod(shape))) % 251).astype(np.uint8).reshape(shape)


def load_without_package(folder: str | os.PathLike, timeout: float = 600, name: str | None = None) -> dict:
    """Load `folder` with `AutoModelForVideoClassification`/`AutoImageProcessor` (`trust_remote_code=True`) in a
    subprocess where `vivit_medmnist` is not importable, run `probe_volume`, and return what it reported:
    `model_class`, `processor_class`, `num_labels`, `id2label`, `logits`. Raises RuntimeError (with the
    subprocess's error output) if the folder does not load or run; `name` is how messages call the folder. Where
    the folder names a pipeline (`custom_pipelines`), `pipeline` holds what `pipeline(model=folder,
    trust_remote_code=True)(probe_volume)` answered, else None."""
    folder = Path(folder).resolve()
    name = name or str(folder)
    with tempfile.TemporaryDirectory(prefix="vivit-load-check-") as tmp:
        env = dict(os.environ, HF_MODULES_CACHE=tmp, HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _LOAD_SCRIPT, str(folder)],
                check=False,
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"loading {name} without vivit_medmnist took more than {timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(
            f"{name} does not load with trust_remote_code=True where vivit_medmnist is not installed:\n{tail}"
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["model_class"].startswith("transformers_modules."):
        raise RuntimeError(
            f"the model was not loaded from the folder's own code but from {report['model_class']}"
        )
    return report


@dataclass
class FolderCheck:
    """The result of `check_folder`: the files that would be uploaded (name -> bytes) and what is wrong."""

    folder: Path
    files: dict[str, int]
    problems: list[str] = field(default_factory=list)
    load_report: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            raise ValueError(f"{self.folder} is not ready to publish:\n- " + "\n- ".join(self.problems))


def check_folder(folder: str | os.PathLike, *, load_check: bool = True) -> FolderCheck:
    """Check what would be uploaded from `folder`: the `REQUIRED_FILES` are there, nothing is (or looks) pickled,
    `README.md` has valid model-card metadata, and (`load_check`) the published files alone load and run with
    `trust_remote_code=True` without this package (on a staged copy of exactly those files)."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    names = publishable_files(folder)
    check = FolderCheck(folder, {name: (folder / name).stat().st_size for name in names})
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        check.problems.append(
            f"missing {', '.join(missing)} (expected the output folder of scripts/train.py)"
        )
    pickled = find_pickled_files(folder, names)
    if pickled:
        check.problems.append(
            f"pickled (or unreadable safetensors) files would be uploaded: {', '.join(pickled)}"
        )
    if "README.md" in names:
        try:
            card = ModelCard.load(folder / "README.md")
            if not card.data.to_dict().get("license"):
                check.problems.append("README.md has no model-card metadata (license, tags, model-index)")
        except Exception as err:  # noqa: BLE001 -- any parse error is reported, not raised
            check.problems.append(f"README.md metadata does not parse: {err}")
    if load_check and not missing and not pickled:
        with tempfile.TemporaryDirectory(prefix="vivit-publish-") as tmp:
            stage_for_upload(folder, tmp)
            try:
                check.load_report = load_without_package(tmp, name=f"the publishable files of {folder}")
            except RuntimeError as err:
                check.problems.append(str(err))
    return check


def stage_for_upload(
    folder: str | os.PathLike, staging_dir: str | os.PathLike, repo_id: str | None = None
) -> list[str]:
    """Copy exactly the `publishable_files` of `folder` into `staging_dir`, filling `repo_id` into the model
    card's loading example when given. Returns the names copied."""
    folder, staging_dir = Path(folder), Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    names = publishable_files(folder)
    for name in names:
        if name == "README.md" and repo_id:
            text = (folder / name).read_text(encoding="utf-8").replace(REPO_ID_PLACEHOLDER, repo_id)
            (staging_dir / name).write_text(text, encoding="utf-8")
        else:
            shutil.copyfile(folder / name, staging_dir / name)
    return names
