"""Setting a training run up: logging, the output folder and its checkpoints, the data, the model and the Trainer.

`vivit-medmnist-train` calls these in order; each raises ValueError/OSError with a message for the user.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForVideoClassification,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import (
    RESUME_LAST,
    DataArguments,
    ModelArguments,
    RunArguments,
    format_overrides,
    format_value,
    parse_config_overrides,
    same_config_value,
)
from .augmentation import AugmentedDataset, EpochCallback
from .configuration_vivit_medmnist import VivitMedmnistConfig
from .data import MedMNIST3DCollator, load_medmnist3d
from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor
from .metrics import compute_metrics
from .modeling_vivit_medmnist import VivitMedmnistForVideoClassification
from .publishing import publishable_files
from .resolution import transfer_resolution
from .safe_io import same_path

logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    """Our messages at INFO on the main process (WARNING on the others); transformers/datasets at `log_level`."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)


def describe_device(training_args: TrainingArguments) -> str:
    """e.g. 'world_size=2 device=cpu' (touching `device` also sets up the process group of a distributed run)."""
    return f"world_size={training_args.world_size} device={training_args.device.type}"


def check_output_dir(run: RunArguments) -> None:
    """ValueError when the run would replace something the user did not ask to replace: a finished model in
    `--output_dir` (its publishable files), in particular the model being fine-tuned. Resuming continues the
    run that folder belongs to, so it may replace its files; `--overwrite_output_dir` allows a new run to."""
    folder = run.output_dir
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {folder} is a file; expected a folder to write the model into")
    if run.overwrite_output_dir or run.training.resume_from_checkpoint is not None or not folder.is_dir():
        return
    source = run.model.model_name_or_path
    if source is not None and Path(source).is_dir() and same_path(source, folder):
        raise ValueError(
            f"--output_dir {folder} is the model being fine-tuned (--model_name_or_path {source}): training would "
            "replace it. Choose another --output_dir, or pass --overwrite_output_dir to replace it."
        )
    if existing := publishable_files(folder):
        raise ValueError(
            f"--output_dir {folder} already holds a model ({', '.join(existing)}). Choose another --output_dir, "
            "or pass --overwrite_output_dir to replace it."
        )


def remove_checkpoints(training_args: TrainingArguments) -> None:
    """Delete the checkpoint-* folders of an earlier run (a new run with --overwrite_output_dir), so that they are
    neither mixed with the new run's nor resumed by mistake."""
    folder = Path(training_args.output_dir)
    for checkpoint in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        shutil.rmtree(checkpoint)


def resolve_checkpoint(training_args: TrainingArguments, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from (None: a new run). ValueError when resuming is impossible or unsafe."""
    checkpoint_dir = Path(training_args.output_dir)
    existing = get_last_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    requested = training_args.resume_from_checkpoint
    if requested is None:
        if existing is not None and not overwrite:
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints (newest: {existing}) of another run. Continue it with "
                "--resume_from_checkpoint, choose another --output_dir, or pass --overwrite_output_dir to start "
                "afresh (the old checkpoints are deleted)."
            )
        return None
    if requested == RESUME_LAST:
        if existing is None:
            raise ValueError(
                f"--resume_from_checkpoint: no checkpoint-* folder in {checkpoint_dir} to resume from. "
                "Drop the flag to start a new run."
            )
        return existing
    if not Path(requested).is_dir():
        raise ValueError(f"--resume_from_checkpoint: {requested} is not a checkpoint folder")
    return requested


def load_data(data_args: DataArguments) -> datasets.DatasetDict:
    """The train/validation/test splits, cut to the --max_*_samples first volumes, read as uint8 (the collator's
    input as stored: no widening to int64 and back on every row)."""
    data = load_medmnist3d(data_args.dataset_name, size=data_args.size, data_dir=data_args.data_dir)
    data = data.with_format("numpy", dtype=np.uint8)
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_test_samples,
    }
    for split, limit in limits.items():
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    return data


# Config fields that change how a model trains or initialises a new head, not the shape or meaning of a saved
# weight: the only overrides that apply to a model loaded for fine-tuning, whose saved config is its architecture.
TRAINING_ONLY_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
    "initialization",
    "initializer_range",
)


def attention_for(device: torch.device) -> str:
    """The attention implementation a run on `device` trains with: on CPU the eager one, faster there than torch's
    SDPA for this model's short sequences and with attention dropout (benchmarks/README.md); SDPA elsewhere. It is
    the run's choice only: a saved model loads with the default (SDPA) wherever it goes."""
    return "eager" if device.type == "cpu" else "sdpa"


def build_model(
    model_args: ModelArguments,
    label_names: Sequence[str],
    size: int,
    recipe_override_keys: frozenset[str] = frozenset(),
    attn_implementation: str | None = None,
):
    """A new model for `size`^3 volumes, or the saved one to fine-tune (a new head if the label count differs).

    Fine-tuning keeps the saved architecture: `config_overrides` of `TRAINING_ONLY_FIELDS` apply; another value
    for an architecture field is skipped (with a log line) when it comes from the recipe (`recipe_override_keys`),
    which describes a model to build, and refused when the user gave it on the command line. A saved model of
    another volume size than `size` is transferred to it (`vivit_medmnist.resolution.transfer_resolution`), with
    the `tubelet_size` and `conv_stem_scale` overrides, if any, as its new tubelet size and stem scale.

    `attn_implementation` ("eager", "sdpa", ...) is set on the built model when given.

    Raises ValueError (bad or refused overrides, volume size mismatch, unreadable model).
    """
    model = _build_model(model_args, label_names, size, recipe_override_keys)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
        logger.info(f"attention implementation: {attn_implementation}")
    return model


def _build_model(model_args, label_names, size, recipe_override_keys):
    labels = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }
    overrides = parse_config_overrides(model_args.config_overrides)
    path = model_args.model_name_or_path
    if path is None:
        if overrides:
            logger.info(f"config overrides: {format_overrides(overrides)}")
        try:
            return VivitMedmnistForVideoClassification(
                VivitMedmnistConfig(volume_size=size, **labels, **overrides)
            )
        except (StrictDataclassError, TypeError) as err:  # the config's type checks
            raise ValueError(f"invalid model configuration: {err}") from err
    try:
        saved = AutoConfig.from_pretrained(path)
        # another volume size: a resolution transfer, whose tubelet size may change too
        transfer = list(getattr(saved, "volume_size", [size] * 3)) != [size] * 3
        transfer_args = (
            {key: overrides.pop(key) for key in ("tubelet_size", "conv_stem_scale") if key in overrides}
            if transfer
            else {}
        )
        overrides = _fine_tuning_overrides(saved, overrides, recipe_override_keys, path)
        new_head = saved.num_labels != len(label_names)
        model = AutoModelForVideoClassification.from_pretrained(
            path, ignore_mismatched_sizes=new_head, **labels, **overrides
        )
    except (OSError, ValueError, StrictDataclassError) as err:
        if isinstance(err, RefusedOverrides):
            raise
        raise ValueError(f"--model_name_or_path {path}: cannot load a model: {err}") from err
    if new_head:
        logger.info(f"fine-tuning {path}: a new classification head for {len(label_names)} classes")
    if transfer:
        try:
            model = transfer_resolution(model, size, **transfer_args)
        except ValueError as err:
            raise ValueError(f"--model_name_or_path {path} to --size {size}: {err}") from err
    return model


class RefusedOverrides(ValueError):
    """Command-line config overrides that would change the architecture of the model being fine-tuned."""


def _fine_tuning_overrides(saved, overrides: dict, recipe_override_keys: frozenset[str], path: str) -> dict:
    """The overrides that apply to the saved model `path` (config `saved`); see `build_model`."""
    applied, skipped, refused = {}, {}, {}
    for key, value in overrides.items():
        if key in TRAINING_ONLY_FIELDS:
            applied[key] = value
        elif same_config_value(getattr(saved, key, None), value):
            continue  # what the saved model already has
        elif key in recipe_override_keys:
            skipped[key] = value
        else:
            refused[key] = value
    if refused:
        current = {key: getattr(saved, key, None) for key in refused}
        raise RefusedOverrides(
            f"--config_overrides {format_overrides(refused)} would change the architecture of the model being "
            f"fine-tuned ({path}: {format_overrides(current)}); fine-tuning keeps the saved architecture. "
            f"Only {', '.join(TRAINING_ONLY_FIELDS)} apply to a saved model; drop --model_name_or_path to "
            "train a new model of that architecture."
        )
    for key, value in skipped.items():
        logger.info(
            f"the recipe's {key}={format_value(value)} does not apply: fine-tuning keeps the saved model's "
            f"{key}={format_value(getattr(saved, key, None))}"
        )
    if applied:
        logger.info(f"fine-tuning {path} with config overrides {format_overrides(applied)}")
    return applied


def build_image_processor(model_args: ModelArguments):
    """The saved model's processor when fine-tuning, else the default (uint8 / 255, as the reference)."""
    if model_args.model_name_or_path is None:
        return VivitMedmnistImageProcessor()
    return AutoImageProcessor.from_pretrained(model_args.model_name_or_path)


def build_trainer(model, image_processor, data: datasets.DatasetDict, run: RunArguments) -> Trainer:
    train = AugmentedDataset(data["train"], seed=run.training.seed, **run.data.augmentation())
    return Trainer(
        model=model,
        args=run.training,
        train_dataset=train,
        eval_dataset=data["validation"],
        data_collator=MedMNIST3DCollator(image_processor),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        callbacks=[EpochCallback(train)],
    )


def finish_distributed(wait: bool = True) -> None:
    """Tear the process group down at exit (without it, some gloo runs abort at interpreter shutdown).

    `wait`: first wait for the other processes (the normal end; not on an error, which may be one process's).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
