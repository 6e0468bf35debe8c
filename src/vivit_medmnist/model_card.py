"""The model card (`README.md` of a model folder): metadata with the measured results, the architecture as the
config says, the training set-up, rendered from the `model_card.md` template with `huggingface_hub.ModelCard`.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arguments import ModelArguments, RunArguments
from .config_overrides import format_overrides, parse_config_overrides, same_config_value
from .dataset_card import DatasetCard, medmnist_dataset_card
from .hub_files import REPO_ID_PLACEHOLDER, check_model_path
from .pipeline_vivit_medmnist import TASK
from .recipe_files import resolve_recipe

if TYPE_CHECKING:
    import datasets
    from transformers import Trainer

# The model-card template (jinja2, rendered by huggingface_hub.ModelCard.from_template), shipped as package data.
MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")


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
    "ece": "ECE (15 bins), raw softmax",
    "calibrated_ece": "ECE, temperature scaled",
    "brier": "Brier score, raw softmax",
    "calibrated_brier": "Brier score, temperature scaled",
}


# Result prefixes -> split. Not "train": the Trainer's train_loss is the running average of the training loss (with
# dropout), not an evaluation of the training split; it is in the training curves.
_SPLIT_PREFIXES = {
    "eval": "validation",
    "validation": "validation",
    "test": "test",
    "train_eval": "training (no augmentation)",
}


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


def hub_id(name: str | None) -> str | None:
    """`name` if it names a model on the Hub (ORG/NAME, not a local folder), else None: a card's `base_model`."""
    if name is None or Path(name).expanduser().exists() or check_model_path(name) is not None:
        return None
    return name if name.count("/") == 1 else None


def _label_names(config) -> list[str]:
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]


def _is_timing(key: str) -> bool:
    return key.endswith(_TIMING_SUFFIXES)


def _split_metrics(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{"test_accuracy": .9, "eval_auc": .8, "test_runtime": 3} -> {"test": {"accuracy": .9}, "validation": ...}."""
    by_split: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        prefix, _, metric = key.partition("_")
        if key.startswith(
            "train_eval_"
        ):  # train.py's score of the final model on its unaugmented training split
            prefix, metric = "train_eval", key[len("train_eval_") :]
        if prefix not in _SPLIT_PREFIXES or not metric or _is_timing(key) or metric == "epoch":
            continue
        if isinstance(value, (bool, str)) or not isinstance(value, (int, float, np.number)):
            continue
        by_split.setdefault(_SPLIT_PREFIXES[prefix], {})[metric] = float(value)
    return by_split


_FLOOR_KEYS = (
    "calibration_ece_floor",
    "calibration_ece_floor_p95",
    "calibration_temperature_p5",
    "calibration_temperature_p95",
    "calibration_validation_volumes",
)


def _calibration_floor(results: Mapping[str, Any]) -> dict[str, str | None]:
    """The ECE floor `calibration.calibrate` records with the validation metrics, formatted for the card's
    calibration section (`calibration_ece_floor` None where the run has none: an older run, or no
    temperature)."""
    if not all(key in results for key in _FLOOR_KEYS):
        return {"calibration_ece_floor": None}
    return {key: _format(results[key]) for key in _FLOOR_KEYS}


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
    feature_size = config.feature_size_for(config.volume_size)
    covered = [(n - 1) * step + k for n, step, k in zip(config.grid_size, config.stride, config.tubelet_size)]
    unread = [size - c for size, c in zip(feature_size, covered)]
    what = "the stem's feature map" if config.conv_stem_channels else "the volume"
    unit = "position" if config.conv_stem_channels else "voxel"
    if config.padding == "same":
        padding = f" ({what} zero-padded so that every {unit} is covered)"
    elif any(unread):
        padding = (
            f" (no padding: the last {', '.join(map(str, unread))} {unit}s along D, H, W are never read)"
        )
    else:
        padding = ""
    text = (
        f"A {' × '.join(map(str, config.volume_size))} volume is read as a video whose frames are its slices along "
        "the first axis. "
    )
    if config.conv_stem_channels:
        stages = len(config.conv_stem_channels)
        text += (
            f"A convolutional stem of {stages} stage(s) (3 × 3 × 3 Conv3d with stride 2, BatchNorm, ReLU; channels "
            f"{', '.join(map(str, config.conv_stem_channels))}{_first_stage(config)}) turns it into a "
            f"{' × '.join(map(str, feature_size))} feature map (early convolutions, Xiao et al. 2021). "
        )
    text += (
        f"A Conv3d whose kernel is the size of a *tubelet* cuts {what} into {overlap} "
        f'spatio-temporal tubelets{padding}, a {grid} grid, and embeds each as one token ("tubelet embedding", '
        "ViViT §3.2); learned position embeddings are added. "
    )
    frames, per_slab = config.grid_size[0], config.num_tokens // config.grid_size[0]
    if config.encoder_type == "factorised_encoder":
        text += (
            f"{config.num_hidden_layers} pre-norm *spatial* Transformer blocks attend within each of the {frames} "
            f"temporal slabs ({per_slab} tokens each); each slab's tokens are layer-normed and averaged into one "
            f"token, learned temporal position embeddings are added, and {config.num_temporal_layers} *temporal* "
            f'blocks attend over those {frames} tokens (ViViT\'s Model 2, "factorised encoder"). '
        )
    elif config.encoder_type == "factorised_self_attention":
        text += (
            f"Each of {config.num_hidden_layers} pre-norm Transformer blocks attends first *spatially*, each token to "
            f"the {per_slab} tokens of its temporal slab (along depth), then *temporally*, each token to the "
            f'{frames} tokens of its spatial position, then applies its MLP (ViViT\'s Model 3, "factorised '
            'self-attention"). '
        )
    elif config.encoder_type == "factorised_dot_product":
        spatial = config.num_attention_heads // 2
        text += (
            f"A stack of {config.num_hidden_layers} pre-norm Transformer blocks whose attention is split by heads: "
            f"{spatial} heads attend within each token's temporal slab ({per_slab} tokens), "
            f"{config.num_attention_heads - spatial} across the slabs at each spatial position ({frames} tokens), "
            'and their outputs are concatenated (ViViT\'s Model 4, "factorised dot-product attention"). '
        )
    else:
        cls = " and a CLS token" if config.pooling == "cls" else ""
        text += (
            f"A stack of {config.num_hidden_layers} pre-norm Transformer blocks attends jointly over all "
            f'{config.num_tokens} tokens{cls} (ViViT\'s Model 1, "spatio-temporal attention"). '
        )
    pooled = "the final state of the CLS token" if config.pooling == "cls" else "the mean over the tokens"
    return text + f"A final LayerNorm, {pooled} and a linear layer give one logit per class."


def _first_stage(config) -> str:
    scale = config.conv_stem_scale
    return f"; the first {3 * scale}³ with stride {2 * scale}" if scale != 1 else ""


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
    frames = config.grid_size[0]
    if config.encoder_type == "factorised_encoder":
        encoder = (
            f"factorised (ViViT Model 2): {config.num_hidden_layers} spatial blocks within each of {frames} "
            f"temporal slabs, slab LayerNorm + mean, then {config.num_temporal_layers} temporal blocks; each a {block}"
        )
        positions += f"; temporal: learned, {frames} positions"
    elif config.encoder_type == "factorised_self_attention":
        encoder = (
            f"factorised self-attention (ViViT Model 3): {config.num_hidden_layers} {block}, each attending within "
            f"the temporal slab, then across the {frames} slabs (a second attention layer and LayerNorm per block)"
        )
    elif config.encoder_type == "factorised_dot_product":
        spatial = config.num_attention_heads // 2
        encoder = (
            f"factorised dot-product attention (ViViT Model 4): {config.num_hidden_layers} {block}; {spatial} heads "
            f"attend within the temporal slab, {config.num_attention_heads - spatial} across the {frames} slabs"
        )
    else:
        encoder = f"joint (ViViT Model 1): {config.num_hidden_layers} {block}"
    regularisation = (
        f"attention dropout {config.attention_probs_dropout_prob:g}, hidden dropout "
        f"{config.hidden_dropout_prob:g}, stochastic depth {config.drop_path_rate:g}"
    )
    rows = [
        (
            "Input",
            f"{d} × {h} × {w} volume, {config.num_channels} channel(s): a video of {d} frames of {h} × {w}",
        )
    ]
    if config.conv_stem_channels:
        feature = " × ".join(map(str, config.feature_size_for(config.volume_size)))
        channels = " → ".join(map(str, [config.num_channels, *config.conv_stem_channels]))
        rows.append(
            (
                "Conv stem",
                f"3×3×3 Conv3d stride 2 + BatchNorm + ReLU per stage{_first_stage(config)}; channels {channels}; "
                + f"{feature} map",
            )
        )
    return rows + [
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
    gallery_method: str | None = None,
    dataset: DatasetCard | None = None,
    preprocessing: str = "`uint8 / 255`, no resizing",
):
    """Render the model card (a `huggingface_hub.ModelCard`) from the jinja2 template; see
    `save_publishable_folder`. The `model-index` holds every test (and validation) metric of `results` among
    accuracy, AUC and top-5 accuracy, with the values given. `dataset` describes the data (default: the
    MedMNIST set `dataset_name` at `size`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .data import MEDMNIST_CITATION

    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"model-card template {template_path} not found (it ships inside the vivit_medmnist package); "
            "pass template_path="
        )
    dataset = dataset or medmnist_dataset_card(dataset_name, size, split_sizes)
    by_split = _split_metrics(results)
    if "test" not in by_split:
        raise ValueError(
            f"results must hold test metrics (test_accuracy, test_auc, ...), got keys {sorted(results)}"
        )
    model_name = f"vivit-medmnist-{dataset.name}" + ("" if size == 28 else f"-{size}")

    eval_results = []
    for split in ("test", "validation"):
        for metric, (metric_type, pretty_metric) in _INDEX_METRICS.items():
            # NaN (e.g. an AUC undefined on a split missing a class) stays in the table, not in the metadata
            if math.isfinite(by_split.get(split, {}).get(metric, math.nan)):
                eval_results.append(
                    EvalResult(
                        task_type=TASK,
                        task_name="Video (3D volume) classification",
                        dataset_type="medmnist" if dataset.medmnist else "volume-folder",
                        dataset_name=f"MedMNIST v2 {dataset.pretty}" if dataset.medmnist else dataset.pretty,
                        dataset_config=dataset.name,
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_value=by_split[split][metric],
                        metric_name=f"{split.capitalize()} {pretty_metric}",
                    )
                )
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        tags=CARD_TAGS + [dataset.name] if dataset.medmnist else [t for t in CARD_TAGS if t != "medmnist"],
        base_model=base_model,
        metrics=["accuracy", "roc_auc"],
        model_name=model_name,
        eval_results=eval_results,
    )

    metrics_order = ["accuracy", "auc", "top5_accuracy", "loss", "ece", "calibrated_ece", "brier", "calibrated_brier"]
    metric_names = sorted(
        {m for split in by_split.values() for m in split},
        key=lambda m: (metrics_order.index(m) if m in metrics_order else len(metrics_order), m),
    )
    splits = [s for s in ("test", "validation", "training (no augmentation)") if s in by_split]
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
        dataset_name=dataset.name,
        dataset_pretty=dataset.pretty,
        dataset_size=size,
        dataset_description=dataset.description,
        dataset_task=dataset.task,
        dataset_license=dataset.license,
        dataset_homepage=dataset.homepage,
        dataset_splits=dataset.splits,
        test_volumes=dataset.test_volumes,
        medmnist=dataset.medmnist,
        splits_made=dataset.splits_made,
        preprocessing=preprocessing,
        label_names=list(enumerate(label_names)),
        training_summary=[(str(k), _format(v)) for k, v in training_summary.items()],
        results_splits=splits,
        results_rows=results_rows,
        calibration_temperature=_format(temperature) if (temperature := model.config.calibration_temperature) else None,
        **_calibration_floor(results),
        test_ece=_format(by_split["test"].get("ece", math.nan)),
        test_calibrated_ece=_format(by_split["test"].get("calibrated_ece", math.nan)),
        gallery_method=gallery_method,
        medmnist_citation=MEDMNIST_CITATION.strip(),
        vivit_citation=VIVIT_CITATION.strip(),
    )


def training_summary(
    run: RunArguments, trainer: Trainer, data: datasets.DatasetDict, train_seconds: float
) -> dict:
    """The training set-up, flat, for the model card."""
    args = run.training
    augmentation = {k: v for k, v in run.data.augmentation().items() if v}
    if not run.data.max_rotation:
        augmentation.pop("rotation_interpolation")
    augmentation.update({k: v for k, v in run.data.mixing().items() if v})  # mixup / cutmix, when on
    # the precision that ran: `accelerate launch --mixed_precision bf16` sets it without --bf16
    mixed = trainer.accelerator.mixed_precision
    precision = mixed if mixed in ("bf16", "fp16", "fp8") else "fp32"
    return {
        "recipe": resolve_recipe(run.recipe).name if run.recipe else "none (command-line options)",
        "initialisation": run.model.model_name_or_path or f"new ({trainer.model.config.initialization})",
        "config overrides": applied_overrides(run.model, trainer.model),
        "parameters": trainer.model.num_parameters(),
        "train / validation / test volumes": f"{len(data['train'])} / {len(data['validation'])} / {len(data['test'])}",
        "epochs": args.num_train_epochs,
        "batch size (per device x devices x accumulation)": (
            f"{args.per_device_train_batch_size} x {args.world_size} x {args.gradient_accumulation_steps}"
        ),
        "optimizer": (
            f"{getattr(args.optim, 'value', args.optim)}, sharpness-aware (rho {run.sam_rho})"
            if run.sam_rho
            else args.optim
        ),
        "learning rate": args.learning_rate,
        "adam betas / epsilon": f"{args.adam_beta1}, {args.adam_beta2} / {args.adam_epsilon}",
        "weight decay": args.weight_decay,
        "lr schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, warmup {args.warmup_steps}",
        "gradient clipping": args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else "none",
        "label smoothing": args.label_smoothing_factor or "none",
        "augmentation": ", ".join(f"{k}={v}" for k, v in augmentation.items()) or "none",
        "model selection": (
            f"best validation {args.metric_for_best_model}"
            if args.load_best_model_at_end
            else f"weight average, decay {run.weight_average_decay}"
            if run.weight_average_decay
            else "last epoch"
        ),
        "seed": args.seed,
        "device": args.device.type,
        "world size": args.world_size,
        "precision": precision,
        "attention": trainer.model.config._attn_implementation,
        "train time (s)": round(train_seconds, 1),
    }


def applied_overrides(model_args: ModelArguments, model) -> str:
    """The config overrides that the trained model has (a fine-tuned model keeps its saved architecture, so a
    recipe's architecture overrides may not apply), for the model card."""
    overrides = parse_config_overrides(model_args.config_overrides)
    return format_overrides(
        {k: v for k, v in overrides.items() if same_config_value(getattr(model.config, k, None), v)}
    )
