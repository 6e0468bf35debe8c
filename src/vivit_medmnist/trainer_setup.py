"""Setting a training run up: logging, the output folder and its checkpoints, the data, the model and the Trainer.

`vivit-medmnist-train` calls these in order; each raises ValueError/OSError with a message for the user.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import checkpoints, set_verbosity
from .arguments import RESUME_LAST, DataArguments, ModelArguments, RunArguments
from .augmentation import AugmentedDataset, EpochCallback
from .config_overrides import (
    OptionError,
    format_overrides,
    format_value,
    parse_config_overrides,
    same_config_value,
)
from .configuration_vivit_medmnist import VivitMedmnistConfig
from .data import MedMNIST3DCollator, load_medmnist3d
from .hub_files import publishable_files
from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor
from .metrics import compute_metrics
from .mixing import soft_target_loss
from .modeling_vivit_medmnist import VivitMedmnistForVideoClassification
from .resolution import transfer_resolution
from .safe_io import is_inside, lock_folder, same_path
from .sharpness_aware import SharpnessAwareTrainer
from .weight_average import AVERAGE_FILE, WeightAverage

logger = logging.getLogger(__name__)


def setup_logging(training_args: TrainingArguments) -> None:
    """Every module's messages at INFO on the main process (WARNING on the others), through the package's one
    logger (`vivit_medmnist.set_verbosity`); transformers/datasets at `log_level`."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    set_verbosity(logging.INFO if training_args.should_log else logging.WARNING)
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)


def fail(err: Exception) -> NoReturn:
    """End the command with one `error:` line: exit status 2 for an option mistake (`OptionError`), 1 for the
    rest (files, data)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2 if isinstance(err, OptionError) else 1)


def lock_output_dir(run: RunArguments):
    """The lock of `--output_dir` (`safe_io.lock_folder`), taken by the main process; None on the others."""
    return lock_folder(run.output_dir) if run.training.process_index == 0 else None


def describe_device(training_args: TrainingArguments) -> str:
    """e.g. 'world_size=2 device=cpu' (touching `device` also sets up the process group of a distributed run)."""
    return f"world_size={training_args.world_size} device={training_args.device.type}"


def check_output_dir(run: RunArguments, checkpoint: str | None) -> None:
    """ValueError when the run would replace something the user did not ask to replace: a finished model in
    `--output_dir` (its publishable files), in particular the model being fine-tuned. Resuming from a checkpoint
    of that folder's own run (`checkpoint`, inside its checkpoints/) continues that run, so it may replace its
    files; `--overwrite_output_dir` allows a new run to. A checkpoint of another run makes a new run here."""
    folder = run.output_dir
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {folder} is a file; expected a folder to write the model into")
    own_checkpoint = checkpoint is not None and is_inside(checkpoint, run.training.output_dir)
    if run.overwrite_output_dir or own_checkpoint or not folder.is_dir():
        return
    source = run.model.model_name_or_path
    if source is not None and Path(source).is_dir() and same_path(source, folder):
        raise ValueError(
            f"--output_dir {folder} is the model being fine-tuned (--model_name_or_path {source}): training would "
            "replace it. Choose another --output_dir, or pass --overwrite_output_dir to replace it."
        )
    if existing := publishable_files(folder):
        resumed = f" and --resume_from_checkpoint {checkpoint} is another run's" if checkpoint else ""
        raise ValueError(
            f"--output_dir {folder} already holds a model ({', '.join(existing)}){resumed}. Choose another "
            "--output_dir, or pass --overwrite_output_dir to replace it."
        )


def remove_checkpoints(training_args: TrainingArguments) -> None:
    """Delete the checkpoint-* folders of an earlier run (a new run with --overwrite_output_dir), so that they are
    neither mixed with the new run's nor resumed by mistake."""
    folder = Path(training_args.output_dir)
    for checkpoint in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        shutil.rmtree(checkpoint)


def resolve_checkpoint(run: RunArguments) -> tuple[str | None, list]:
    """The checkpoint to resume from (None: a new run) and the damaged ones to set aside, see
    `vivit_medmnist.checkpoints.resolve_checkpoint` (a run with a weight average needs it in its checkpoints).
    ValueError when resuming is impossible, or when a new run would mix its checkpoints with another run's."""
    checkpoint_dir = Path(run.training.output_dir)
    requested = run.training.resume_from_checkpoint
    required = (AVERAGE_FILE,) if run.weight_average_decay else ()
    if requested is None:
        existing = sorted(checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) if checkpoint_dir.is_dir() else []
        if existing and not run.overwrite_output_dir:
            raise ValueError(
                f"{checkpoint_dir} already holds checkpoints ({', '.join(p.name for p in existing[-3:])}) of another "
                "run. Continue it with --resume_from_checkpoint, choose another --output_dir, or pass "
                "--overwrite_output_dir to start afresh (the old checkpoints are deleted)."
            )
        return None, []
    return checkpoints.resolve_checkpoint(checkpoint_dir, requested, RESUME_LAST, required)


def load_data(data_args: DataArguments, image_processor=None, seed: int = 42) -> datasets.DatasetDict:
    """The train/validation/test splits, cut to the --max_*_samples first volumes, read as uint8 (the collator's
    input as stored: no widening to int64 and back on every row): a MedMNIST file, or the user's volumes (a
    folder, `vivit_medmnist.volume_folder.load_volume_folder`; a datasets dataset, `load_volume_dataset`),
    preprocessed by `image_processor` with missing splits cut with `seed`."""
    from .volume_folder import load_volume_dataset, load_volume_folder

    own = {
        "seed": seed,
        "validation_fraction": data_args.validation_fraction,
        "test_fraction": data_args.test_fraction,
        "num_proc": data_args.preprocessing_num_workers,
    }
    if data_args.data_folder or data_args.train_dir:
        source = data_args.data_folder or {
            split: folder
            for split, folder in (
                ("train", data_args.train_dir),
                ("validation", data_args.validation_dir),
                ("test", data_args.test_dir),
            )
            if folder
        }
        data = load_volume_folder(source, image_processor, class_names=data_args.class_names, **own)
    elif data_args.own_volumes():
        data = load_volume_dataset(
            data_args.dataset_name,
            image_processor,
            volume_column=data_args.volume_column_name,
            label_column=data_args.label_column_name,
            **own,
        )
    else:
        data = load_medmnist3d(data_args.dataset_name, size=data_args.size, data_dir=data_args.data_dir)
    splits_made = getattr(data, "splits_made", {})
    data = data.with_format("numpy", dtype=np.uint8)
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_test_samples,
    }
    for split, limit in limits.items():
        if limit is not None:
            data[split] = data[split].select(range(min(limit, len(data[split]))))
    data.splits_made = splits_made
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


def speed_up(model, device: torch.device, bf16: bool = False) -> None:
    """The run's speed choices, made once here and never saved with the model. On a CPU:
    `cpu_speed.speed_up_for_cpu` (the `vivit_cpu` attention, the conv stem channels-last) and
    `cpu_speed.keep_freed_memory`; bf16 autocast is `bf16` (`--bf16`, on by default where bf16 is faster on this
    CPU: `arguments.build_parser`), logged with the rest. On a GPU the model's default SDPA. Measured in
    benchmarks/README.md."""
    if device.type != "cpu":
        return
    from .cpu_speed import bf16_is_faster, keep_freed_memory, speed_up_for_cpu

    changed = speed_up_for_cpu(model)
    if keep_freed_memory():
        changed.append("freed memory kept (glibc)")
    precision = "bf16 autocast" if bf16 else "float32"
    if bf16 != bf16_is_faster():
        precision += " (as --bf16 says; the other precision is the faster on this CPU)"
    logger.info(f"CPU speed choices: {', '.join(changed) or 'none'}, {precision}")


def build_model(
    model_args: ModelArguments,
    label_names: Sequence[str],
    size: int,
    recipe_override_keys: frozenset[str] = frozenset(),
):
    """A new model for `size`^3 volumes, or the saved one to fine-tune (a new head if the label count differs).

    Fine-tuning keeps the saved architecture: `config_overrides` of `TRAINING_ONLY_FIELDS` apply; another value
    for an architecture field is skipped (with a log line) when it comes from the recipe (`recipe_override_keys`),
    which describes a model to build, and refused when the user gave it on the command line. A saved model of
    another volume size than `size` is transferred to it (`vivit_medmnist.resolution.transfer_resolution`), with
    the `tubelet_size` and `conv_stem_scale` overrides, if any, as its new tubelet size and stem scale.

    Raises ValueError (bad or refused overrides, volume size mismatch, unreadable model).
    """
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
        except (StrictDataclassError, TypeError, ValueError) as err:  # the config's checks
            raise OptionError(f"--config_overrides: invalid model configuration: {err}") from err
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
    except RefusedOverrides:
        raise
    except Exception as err:
        raise ValueError(f"--model_name_or_path {path}: cannot load a model: {err}") from err
    if new_head:
        logger.info(f"fine-tuning {path}: a new classification head for {len(label_names)} classes")
    if transfer:
        try:
            model = transfer_resolution(model, size, **transfer_args)
        except ValueError as err:
            raise ValueError(f"--model_name_or_path {path} to --size {size}: {err}") from err
    return model


class RefusedOverrides(OptionError):
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


def build_image_processor(model_args: ModelArguments, data_args: DataArguments):
    """The saved model's processor when fine-tuning; else for MedMNIST the default (uint8 / 255, as the
    reference), for the user's own volumes one that resizes them to `--size` with their intensity and aspect
    options (saved with the model, so that predict.py and the pipeline repeat them)."""
    if model_args.model_name_or_path is not None:
        try:
            return AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        except Exception as err:
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path}: cannot load a model (its image processor): {err}"
            ) from err
    if data_args.own_volumes():
        return VivitMedmnistImageProcessor(**data_args.preprocessing())
    return VivitMedmnistImageProcessor()


def build_trainer(
    model, image_processor, data: datasets.DatasetDict, run: RunArguments, checkpoint: str | None = None
) -> Trainer:
    """The Trainer of a run: augmented (and with `--mixup_alpha` / `--cutmix_alpha` mixed) training data, the
    collator, MedMNIST's metrics, and the callbacks (the epoch for the augmentation; the weight average with
    `--weight_average_decay`, resumed from `checkpoint`); a sharpness-aware Trainer with `--sam_rho`."""
    mixing = run.data.mixing()
    train = AugmentedDataset(
        data["train"], run.training.seed, mixing, model.config.num_labels, **run.data.augmentation()
    )
    callbacks = [EpochCallback(train)]
    if run.weight_average_decay:
        callbacks.append(WeightAverage(run.weight_average_decay, checkpoint))
    # the stored volumes are preprocessed already (uint8 at the model's size): the collator only scales them;
    # the saved processor (`image_processor`) is what raw volumes go through at inference
    stored = VivitMedmnistImageProcessor() if run.data.own_volumes() else image_processor
    # with --sam_rho every step is a sharpness-aware one (two forward and backward passes)
    trainer_class = functools.partial(SharpnessAwareTrainer, sam_rho=run.sam_rho) if run.sam_rho else Trainer
    return trainer_class(
        model=model,
        args=run.training,
        train_dataset=train,
        eval_dataset=data["validation"],
        data_collator=MedMNIST3DCollator(stored),
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
        # mixed volumes carry class weights, not a class: a loss for both (with the same label smoothing)
        compute_loss_func=soft_target_loss(run.training.label_smoothing_factor) if mixing else None,
    )


def finish_distributed(wait: bool = True) -> None:
    """Tear the process group down at exit (without it, some gloo runs abort at interpreter shutdown).

    `wait`: first wait for the other processes (the normal end; not on an error, which may be one process's).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
