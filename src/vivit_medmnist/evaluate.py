"""Evaluate a saved (or Hub) ViViT-MedMNIST model on one split of a MedMNIST 3D set, with the training metrics.

    vivit-medmnist-evaluate --model_name_or_path outputs/organmnist3d --dataset_name organmnist3d \
        --data_dir ~/.medmnist --split test --output_file test_results.json

The model and its image processor load with the Auto classes (a local folder or a Hub id); the split loads with
`vivit_medmnist.data.load_medmnist3d` (downloaded on first use unless offline). Evaluation is
`Trainer.predict` with the same collator and `compute_metrics` as `vivit-medmnist-train`, so the numbers are the
training run's: on a folder written by `train.py`, `--split test` reproduces its `test_results.json`.

The metric keys are prefixed like the Trainer's: `test_*` for `--split test`, `eval_*` for `--split validation`
(as in the validation metrics logged during training) and `train_*` for `--split train`; e.g. `test_accuracy`,
`test_auc`, `test_loss`, `test_ece`, `test_brier` (plus `test_top5_accuracy` for multi-class sets, the
calibrated `test_calibrated_ece` / `test_calibrated_brier` and `calibration_temperature` for a model with a
temperature, and the Trainer's `test_runtime`, `test_samples_per_second`, `test_steps_per_second`). They are printed as JSON and written to `--output_file`.
Runs on the GPU when there is one, else on the CPU.
"""

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForVideoClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import vivit_medmnist  # noqa: F401 -- registers the model with the Auto classes
from vivit_medmnist.calibration import calibrated_metrics
from vivit_medmnist.cpu_speed import prepare_for_inference
from vivit_medmnist.data import (
    MedMNIST3DCollator,
    dataset_names,
    load_medmnist3d,
    resolve_data_dir,
    resolve_dataset,
)
from vivit_medmnist.hub_files import check_model_path
from vivit_medmnist.metrics import compute_metrics
from vivit_medmnist.safe_io import check_new_output, write_text_atomic

logger = logging.getLogger(__name__)

# --split -> the Trainer's metric_key_prefix
METRIC_PREFIXES = {"test": "test", "validation": "eval", "train": "train"}


@dataclass
class EvaluateArguments:
    model_name_or_path: str = field(
        metadata={"help": "A folder written by vivit-medmnist-train, or a Hub model id."}
    )
    dataset_name: str = field(
        default=None,
        metadata={
            "help": "The MedMNIST 3D set (e.g. organmnist3d), or a datasets dataset (Hub id or save_to_disk folder)."
        },
    )
    size: int = field(default=28, metadata={"help": "The volume size of the MedMNIST file: 28 or 64."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder holding <dataset_name>[_<size>].npz (default: $VIVIT_MEDMNIST_DATA_DIR or the cache)."
        },
    )
    split: Literal["test", "validation", "train"] = field(
        default="test",
        metadata={"help": "The split to evaluate; sets the metric prefix (test_, eval_, train_)."},
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "Where to write the metrics as JSON (a new file, unless overwriting)."},
    )
    overwrite_output_file: bool = field(
        default=False, metadata={"help": "Allow --output_file to replace an existing file."}
    )
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    revision: str = field(
        default="main", metadata={"help": "The Hub revision (branch, tag or commit) of the model."}
    )
    data_folder: str | None = field(
        default=None,
        metadata={"help": "Your own volumes, as train.py's --data_folder (split folders or class folders)."},
    )
    test_dir: str | None = field(default=None, metadata={"help": "A folder of class folders to evaluate."})
    volume_column_name: str = field(default="volume", metadata={"help": "The volume column of --dataset_name."})
    label_column_name: str = field(default="label", metadata={"help": "Its label column (a ClassLabel)."})
    class_names: list[str] | None = field(default=None, metadata={"help": "The class order, as in training."})
    seed: int = field(
        default=42, metadata={"help": "As train.py's --seed: a split cut from the training files is cut again alike."}
    )
    validation_fraction: float = field(default=0.1, metadata={"help": "As train.py's."})
    test_fraction: float = field(default=0.1, metadata={"help": "As train.py's."})
    tta_shift: int = field(
        default=0,
        metadata={
            "help": "Also report test-time augmentation: the softmax averaged over the volume and its shifts by "
            "this many voxels along each axis (7 views), as <prefix>_tta_* metrics beside the plain ones."
        },
    )
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata={
            "help": "auto: bf16 autocast on a CPU where it is faster (cpu_speed.bf16_is_faster), as train.py "
            "evaluates there (so the numbers reproduce its results), else float32."
        },
    )


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def load_model(args: EvaluateArguments):
    if message := check_model_path(args.model_name_or_path):
        fail(message)
    try:
        model = AutoModelForVideoClassification.from_pretrained(
            args.model_name_or_path, revision=args.revision
        )
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, revision=args.revision)
    except Exception as err:  # noqa: BLE001 -- whichever library raised it: one error line
        fail(f"cannot load a model and image processor from {args.model_name_or_path!r}: {err}")
    return model, processor


def check_labels(model, label_names: list[str], args: EvaluateArguments) -> None:
    """The model's classes must be the dataset's: same number, same names (unless the model has no names)."""
    config = model.config
    if config.num_labels != len(label_names):
        fail(
            f"the model has {config.num_labels} classes but {args.dataset_name} has {len(label_names)} "
            f"({', '.join(label_names)}): it was not trained on this dataset"
        )
    model_names = [config.id2label[i] for i in range(config.num_labels)]
    if model_names == [f"LABEL_{i}" for i in range(config.num_labels)]:
        logger.warning("the model's config has no label names; assuming the dataset's order: %s", label_names)
    elif model_names != label_names:
        fail(f"the model's labels {model_names} are not {args.dataset_name}'s labels {label_names}")
    volume = [args.size] * 3
    if not own_volumes(args) and list(config.volume_size) != volume:
        fail(f"the model takes volumes of size {config.volume_size}, but --size {args.size} gives {volume}")


def own_volumes(args: EvaluateArguments) -> bool:
    return bool(args.data_folder or args.test_dir) or args.dataset_name.lower() not in dataset_names()


def load_split(args: EvaluateArguments, processor):
    """The split to evaluate: from the MedMNIST file, or the user's volumes prepared by the model's own
    processor (as train.py prepared them; a split cut from the training files is cut again with --seed)."""
    from vivit_medmnist.volume_files import InputError
    from vivit_medmnist.volume_folder import load_volume_dataset, load_volume_folder

    cut = {"seed": args.seed, "validation_fraction": args.validation_fraction, "test_fraction": args.test_fraction}
    try:
        if args.test_dir:  # one folder of class folders, evaluated whole
            return load_volume_folder(
                {"test": args.test_dir}, processor, class_names=args.class_names, make_missing_splits=False
            )["test"]
        if args.data_folder:
            return load_volume_folder(args.data_folder, processor, class_names=args.class_names, **cut)[args.split]
        if own_volumes(args):
            return load_volume_dataset(
                args.dataset_name, processor, volume_column=args.volume_column_name,
                label_column=args.label_column_name, **cut,
            )[args.split]  # fmt: skip
        return load_medmnist3d(args.dataset_name, size=args.size, data_dir=args.data_dir)[args.split]
    except (OSError, ValueError, InputError) as err:
        fail(str(err))


def evaluate(args: EvaluateArguments) -> dict[str, float]:
    model, processor = load_model(args)
    if own_volumes(args) and processor.size is None:  # a MedMNIST model: volumes at its size
        processor.size, processor.do_resize = list(model.config.volume_size), True
    dataset = load_split(args, processor)
    check_labels(model, dataset.features["label"].names, args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = prepare_for_inference(model, device, args.precision)  # the speed choices train.py makes
    with tempfile.TemporaryDirectory(prefix="vivit-evaluate-") as tmp:  # the Trainer wants an output_dir
        training_args = TrainingArguments(
            output_dir=tmp,
            bf16=bf16,
            per_device_eval_batch_size=args.per_device_eval_batch_size,
            dataloader_num_workers=args.dataloader_num_workers,
            use_cpu=device.type == "cpu",
            remove_unused_columns=False,  # the collator reads the raw "volume" column
            report_to="none",
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            data_collator=MedMNIST3DCollator(processor),
            compute_metrics=compute_metrics,
        )
        prefix = METRIC_PREFIXES[args.split]
        output = trainer.predict(dataset, metric_key_prefix=prefix)
        metrics = output.metrics
        if temperature := getattr(model.config, "calibration_temperature", None):  # as train.py reports them
            metrics.update(calibrated_metrics(output, temperature, prefix))
        if args.tta_shift:  # reported beside the plain metrics, never in their place
            metrics.update(tta_metrics(trainer, dataset, processor, args.tta_shift, prefix))
    # Timing of the Trainer's first-call model preparation: absent from train.py's results, and not a result.
    metrics.pop(f"{prefix}_model_preparation_time", None)
    return metrics


def tta_metrics(trainer, dataset, processor, reach: int, prefix: str) -> dict[str, float]:
    """`<prefix>_tta_*`: the metrics of the softmax averaged over the label-safe shifted views of each volume."""
    import numpy as np
    from scipy.special import softmax

    from vivit_medmnist.augmentation import shift_volume, tta_shifts

    base = trainer.data_collator
    probabilities, labels = 0.0, None
    views = tta_shifts(reach)
    for shifts in views:
        def shifted(rows, shifts=shifts):
            return base([{**row, "volume": shift_volume(np.asarray(row["volume"]), shifts)} for row in rows])

        trainer.data_collator = shifted
        output = trainer.predict(dataset, metric_key_prefix=prefix)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        probabilities = probabilities + softmax(np.asarray(logits, dtype=np.float64), axis=-1) / len(views)
        labels = output.label_ids
    trainer.data_collator = base
    metrics = compute_metrics((np.log(np.clip(probabilities, 1e-12, None)), labels))
    return {f"{prefix}_tta_{key}": value for key, value in metrics.items()} | {f"{prefix}_tta_views": len(views)}


def parse_args(argv: list[str] | None = None) -> EvaluateArguments:
    parser = HfArgumentParser(EvaluateArguments)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.per_device_eval_batch_size < 1:
        parser.error(f"--per_device_eval_batch_size must be >= 1, got {args.per_device_eval_batch_size}")
    if sum(bool(x) for x in (args.dataset_name, args.data_folder, args.test_dir)) != 1:
        parser.error("give one of --dataset_name (MedMNIST or a datasets dataset), --data_folder or --test_dir")
    return args


def check_output_file(args: EvaluateArguments) -> None:
    """Before any work: --output_file is new (or --overwrite_output_file), and neither the model nor the data."""
    inputs = [args.model_name_or_path, *(p for p in (args.data_folder, args.test_dir) if p)]
    if not own_volumes(args):
        try:
            inputs.append(resolve_data_dir(args.data_dir) / resolve_dataset(args.dataset_name, args.size).filename)
        except ValueError as err:
            fail(str(err))
    elif args.dataset_name and Path(args.dataset_name).exists():
        inputs.append(args.dataset_name)
    try:
        check_new_output(args.output_file, args.overwrite_output_file, inputs)
    except FileExistsError as err:
        fail(str(err))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    if args.output_file:
        check_output_file(args)
    metrics = evaluate(args)
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.output_file:
        try:
            write_text_atomic(args.output_file, text + "\n")
        except OSError as err:
            fail(f"cannot write --output_file {args.output_file}: {err}")
        logger.info("wrote %s", args.output_file)


if __name__ == "__main__":
    main()
