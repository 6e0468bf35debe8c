"""The command line of `vivit-medmnist-train`: options, `--recipe` files and config overrides.

Arguments follow the Hugging Face example scripts: `HfArgumentParser` over `RunOptions`, `ModelArguments`,
`DataArguments` and `transformers.TrainingArguments`, so every `TrainingArguments` field is an option. On top:

- `--recipe FILE.yaml`: a flat mapping of option names (without `--`) to values; they become the parser's
  defaults, so options given on the command line win. Unknown keys and values of the wrong type are errors.
  `--config_overrides` merges with the recipe's key by key.
- `--resume_from_checkpoint` with no value (or the value `last`) resumes from the newest checkpoint in
  `<output_dir>/checkpoints`; with a path, from that checkpoint.
- `use_cpu` defaults to True when there is no CUDA device (`--use_cpu false` restores the Trainer's own choice),
  and `bf16` (autocast) to True when bf16 is faster on that CPU (`cpu_speed.bf16_is_faster`: native bf16, and
  a matrix product measured faster in bf16 than in float32; `--bf16 false` trains in float32, `--bf16 true` in bf16).
- `--output_dir` (default `outputs/<dataset_name>`) is the publishable folder; the Trainer's checkpoints, which
  hold pickles (`optimizer.pt`, `rng_state.pth`, `training_args.bin`), go to its `checkpoints/` subfolder only.
- A value that cannot mean what the user wants (0 volumes, an axis that does not exist, ...) is a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import HfArgumentParser, TrainingArguments

from .config_overrides import OptionError, override_items, parse_config_overrides
from .cpu_speed import bf16_is_faster
from .recipe_files import load_recipe
from .sharpness_aware import check_sam

CHECKPOINTS = "checkpoints"  # subfolder of --output_dir that holds the Trainer checkpoints (never published)


RESUME_LAST = "last"  # what a bare --resume_from_checkpoint becomes


@dataclass
class RunOptions:
    """What the run starts from, first in `--help`; neither may be set in a recipe."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A YAML file of option defaults, or the name of a recipe shipped with the package "
            "(organmnist3d, adrenalmnist3d, keras_reference); options given here override its values."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow a new run to replace the finished model (and delete the checkpoints) already in "
            "--output_dir; without it such a folder is refused."
        },
    )
    weight_average_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay (e.g. 0.999) and save it "
            "as the model (vivit_medmnist.weight_average); default: the last weights."
        },
    )
    sam_rho: float | None = field(
        default=None,
        metadata={
            "help": "Sharpness-aware minimisation with this radius (e.g. 0.05): each step takes the gradient "
            "at the worst point within RHO of the weights (vivit_medmnist.sharpness_aware); twice a step's "
            "cost. Default: plain steps."
        },
    )


@dataclass
class ModelArguments:
    """Which model to train: a new one (the Keras reference architecture, changed by `config_overrides`) or a
    saved one to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved model folder or Hub id to fine-tune; a new classification head is made when its "
            "number of labels differs from the dataset's. Default: a new model."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config changes, e.g. 'hidden_size=64,num_hidden_layers=2,tubelet_size=[4,4,8]' "
            "(values parsed as YAML; a list may also be a single int)."
        },
    )


@dataclass
class DataArguments:
    """Which data and how it is augmented (all augmentation is off by default)."""

    dataset_name: str = field(
        default="organmnist3d",
        metadata={
            "help": "A MedMNIST 3D set (e.g. organmnist3d), or any datasets dataset: a Hub id or a folder saved "
            "with save_to_disk (with --volume_column_name and --label_column_name)."
        },
    )
    size: int = field(
        default=28,
        metadata={"help": "Volume edge length of the model: 28 or 64 for MedMNIST; any for your own volumes."},
    )
    data_folder: str | None = field(
        default=None,
        metadata={
            "help": "Your own volumes: DIR/<class>/* or DIR/{train,validation,test}/<class>/* (.nii, .nii.gz, "
            ".npy, .npz). Missing splits are cut from the training files, stratified, with --seed."
        },
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "A folder of training volumes, one subfolder per class (as transformers' examples)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "The same for validation."})
    test_dir: str | None = field(default=None, metadata={"help": "The same for test."})
    volume_column_name: str = field(
        default="volume", metadata={"help": "The volume column of a datasets dataset (--dataset_name)."}
    )
    label_column_name: str = field(
        default="label", metadata={"help": "Its label column: a ClassLabel."}
    )
    class_names: list[str] | None = field(
        default=None,
        metadata={"help": "The order of the classes of a folder (default: the folder names, sorted)."},
    )
    intensity_window: list[float] | None = field(
        default=None,
        metadata={
            "help": "Your own volumes: clip raw intensities to LOW HIGH and map to [0, 1] (CT: e.g. -160 240 "
            "Hounsfield units). Saved with the model's image processor."
        },
    )
    percentile_window: list[float] | None = field(
        default=None,
        metadata={"help": "Your own volumes: per-volume percentiles LOW HIGH mapped to [0, 1] (MRI: e.g. 0.5 99.5)."},
    )
    keep_aspect_ratio: bool = field(
        default=False,
        metadata={
            "help": "Your own volumes: pad to a cube (in physical units, with NIfTI voxel spacing) before "
            "resizing to --size, instead of stretching."
        },
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "The share of the training volumes cut out for a missing validation split."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "The share cut out for a missing test split."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that preprocess your own volumes (once; then cached)."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder holding <dataset_name>[_64].npz (downloaded there if missing and online)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training volumes."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation volumes."}
    )
    max_test_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N test volumes."}
    )
    flip_axes: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Volume axes (0=D, 1=H, 2=W) each flipped with probability 1/2; give no value for none."
        },
    )
    max_rotation: float = field(
        default=0.0,
        metadata={
            "help": "Rotate volumes about their centre by up to N degrees about each axis (zero fill)."
        },
    )
    rotation_interpolation: str = field(
        default="linear",
        metadata={
            "help": "How rotated volumes are resampled: linear (intensities, e.g. CT) or nearest (keeps binary "
            "masks binary).",
            "choices": ["linear", "nearest"],
        },
    )
    max_shift: int = field(
        default=0, metadata={"help": "Shift volumes by up to N voxels per axis (zero fill)."}
    )
    intensity_scale: float = field(
        default=0.0, metadata={"help": "Multiply intensities by a factor drawn from [1 - s, 1 + s]."}
    )
    intensity_shift: float = field(
        default=0.0, metadata={"help": "Add an offset drawn from [-o, o] times 255 to the intensities."}
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Mixup of training volumes and labels with weights ~ Beta(a, a); 0: off (vivit_medmnist.mixing)."
        },
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={"help": "Cutmix in 3D (a box of another training volume pasted in) with Beta(a, a); 0: off."},
    )
    mix_prob: float = field(
        default=1.0, metadata={"help": "With mixup or cutmix on: the probability that a training volume is mixed."}
    )

    def own_volumes(self) -> bool:
        """Whether the data are the user's (a folder or a datasets dataset), not a MedMNIST file."""
        from .data import dataset_names

        return bool(self.data_folder or self.train_dir) or self.dataset_name.lower() not in dataset_names()

    def preprocessing(self) -> dict[str, Any]:
        """The image processor's options for the user's volumes: resized to the model's size."""
        return {
            "do_resize": True,
            "size": self.size,
            "intensity_window": self.intensity_window,
            "percentile_window": self.percentile_window,
            "keep_aspect_ratio": self.keep_aspect_ratio,
        }

    def mixing(self) -> dict[str, Any]:
        """The keyword arguments of `mixing.mix_volumes` ({}: no mixing)."""
        from .mixing import mixing_options

        return mixing_options(self.mixup_alpha, self.cutmix_alpha, self.mix_prob)

    def augmentation(self) -> dict[str, Any]:
        """The keyword arguments of `augment_volume`."""
        return {
            "flip_axes": tuple(self.flip_axes),
            "max_rotation": self.max_rotation,
            "rotation_interpolation": self.rotation_interpolation,
            "max_shift": self.max_shift,
            "intensity_scale": self.intensity_scale,
            "intensity_shift": self.intensity_shift,
        }


class RunArguments(NamedTuple):
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments  # its output_dir is <output_dir>/checkpoints
    output_dir: Path  # the publishable folder
    recipe: str | None  # the --recipe file, if any
    overwrite_output_dir: bool = False  # the user allows replacing a finished model in output_dir
    recipe_override_keys: frozenset[str] = frozenset()  # config_overrides keys set by the recipe alone
    weight_average_decay: float | None = None  # an exponential moving average of the weights is the model
    sam_rho: float | None = None  # sharpness-aware minimisation's radius
    extra: Any = None  # the options of another command's `extra_options` dataclass (parse_args), if any


def build_parser(extra_options: type | None = None, description: str | None = None) -> HfArgumentParser:
    """The options of `vivit-medmnist-train`, plus those of `extra_options` (a dataclass) for a command that
    takes training's options and its own (`vivit-medmnist-pretrain`)."""
    extra = (extra_options,) if extra_options is not None else ()
    parser = HfArgumentParser((RunOptions, ModelArguments, DataArguments, TrainingArguments, *extra))
    parser.description = description or "Train ViViT on a MedMNIST 3D set and write a publishable model folder."
    # the generated usage would list every TrainingArguments option before each error message
    parser.usage = "%(prog)s [--recipe FILE.yaml] [--output_dir DIR] [OPTIONS]   (every option: --help)"
    for action in parser._actions:
        if action.dest == "flip_axes":
            action.nargs = (
                "*"  # HfArgumentParser makes lists nargs="+": allow `--flip_axes` alone to mean none
            )
        elif action.dest == "output_dir":
            action.help = (
                "The publishable model folder (default outputs/<dataset_name>); the Trainer's checkpoints go to "
                "its checkpoints/ subfolder and are never published."
            )
    # No CUDA: train on the CPU without being told (otherwise the Trainer may pick e.g. MPS, or each process of an
    # `accelerate launch` on a CPU machine trains alone).
    # Every parameter takes part in every forward: DDP need not search for unused ones (the Trainer would).
    # Progress bars only on a terminal: in a log file they are control characters.
    # Where bf16 is faster on this CPU, it trains about 1.35x faster under bf16 autocast (benchmarks/README.md).
    cpu_only = not torch.cuda.is_available()
    parser.set_defaults(
        use_cpu=cpu_only,
        bf16=cpu_only and bf16_is_faster(),
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,  # the raw "volume" column is no argument of forward(): the collator reads it
        output_dir="",
        disable_tqdm=not sys.stderr.isatty(),
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, extra_options: type | None = None, description: str | None = None
) -> RunArguments:
    """Parse the command line (`sys.argv[1:]` if None) into the three dataclasses, after applying `--recipe`;
    with `extra_options` (see `build_parser`) its values are `RunArguments.extra`."""
    argv = _bare_resume_flag(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(extra_options, description)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config_overrides")
    given = pre.parse_known_args(argv)[0]
    recipe, recipe_values = given.recipe, {}
    if recipe is not None:
        recipe_values = load_recipe(recipe, parser)
        parser.set_defaults(**recipe_values)
    try:
        options, model_args, data_args, training_args, *extra, unknown = (
            parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False, return_remaining_strings=True)
        )
    except ValueError as err:  # TrainingArguments' own checks of option combinations
        parser.error(str(err))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if problem := _invalid_option(data_args, training_args):
        parser.error(problem)
    if options.weight_average_decay is not None:
        if not 0 < options.weight_average_decay < 1:
            parser.error(f"--weight_average_decay must be in (0, 1), got {options.weight_average_decay}")
        if training_args.load_best_model_at_end:
            parser.error("--weight_average_decay keeps the averaged weights: it cannot go with --load_best_model_at_end")
    if options.sam_rho is not None:
        try:
            check_sam(options.sam_rho, training_args.gradient_accumulation_steps)
        except ValueError as err:
            parser.error(str(err))
    if missing := _missing_integrations(training_args.report_to):
        parser.error(
            f"--report_to {' '.join(missing)}: not installed; pip install 'vivit-medmnist[{missing[0]}]' "
            "(or the integration's own package), or choose another --report_to"
        )
    if training_args.push_to_hub:
        parser.error(
            "--push_to_hub would upload the Trainer's checkpoint folder (pickles, no model code or card); train, "
            "then upload the finished folder with vivit-medmnist-publish OUTPUT_DIR --repo_id ORG/NAME"
        )
    # config_overrides merge key by key: the command line's keys replace the recipe's, the recipe's others stay
    from_recipe = override_items(recipe_values.get("config_overrides"))
    from_command_line = override_items(given.config_overrides)
    model_args.config_overrides = ",".join({**from_recipe, **from_command_line}.values()) or None
    try:
        parse_config_overrides(model_args.config_overrides)  # a malformed one is a usage error, found now
    except OptionError as err:
        parser.error(str(err))
    default_name = Path(data_args.data_folder or data_args.train_dir or data_args.dataset_name).name
    output_dir = Path(training_args.output_dir or Path("outputs") / default_name)
    training_args.output_dir = str(output_dir / CHECKPOINTS)
    return RunArguments(
        model_args,
        data_args,
        training_args,
        output_dir,
        recipe,
        options.overwrite_output_dir,
        frozenset(from_recipe.keys() - from_command_line.keys()),
        options.weight_average_decay,
        options.sam_rho,
        extra[0] if extra else None,
    )


def _invalid_option(data: DataArguments, training: TrainingArguments) -> str | None:
    """The first option whose value cannot mean what the user wants (so the run would crash late or silently
    do something else), as a message naming it; None when all are sound."""
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        if (value := getattr(data, name)) is not None and value < 1:
            return f"--{name} must be a positive number of volumes, got {value}"
    if data.data_folder and (data.train_dir or data.validation_dir or data.test_dir):
        return "give --data_folder (one folder with split folders or class folders) or --train_dir and friends, not both"
    if (data.validation_dir or data.test_dir) and not data.train_dir:
        return "--validation_dir and --test_dir need --train_dir"
    for name in ("intensity_window", "percentile_window"):
        value = getattr(data, name)
        if value is not None and (len(value) != 2 or not value[0] < value[1]):
            return f"--{name} takes two numbers LOW HIGH with LOW < HIGH, got {value}"
    if data.intensity_window and data.percentile_window:
        return "give --intensity_window (CT) or --percentile_window (MRI), not both"
    if data.percentile_window and not (0 <= data.percentile_window[0] and data.percentile_window[1] <= 100):
        return f"--percentile_window takes percentiles in [0, 100], got {data.percentile_window}"
    for name in ("validation_fraction", "test_fraction"):
        if not 0 < getattr(data, name) < 0.5:
            return f"--{name} must be in (0, 0.5), got {getattr(data, name)}"
    if data.size < 4:
        return f"--size must be at least 4 voxels, got {data.size}"
    if bad := [axis for axis in data.flip_axes if axis not in (0, 1, 2)]:
        return f"--flip_axes takes volume axes 0 (D), 1 (H) and 2 (W), got {bad}"
    ranges = {  # option: (lowest, highest, whether highest is allowed)
        "max_shift": (0, data.size - 1, True),
        "max_rotation": (0, 180, True),
        "intensity_scale": (0, 1, False),
        "intensity_shift": (0, 1, True),
        "mixup_alpha": (0, float("inf"), False),
        "cutmix_alpha": (0, float("inf"), False),
        "mix_prob": (0, 1, True),
    }
    for name, (low, high, closed) in ranges.items():
        value = getattr(data, name)
        if not (low <= value <= high and (closed or value < high)):
            return f"--{name} must be in [{low}, {high}{']' if closed else ')'}, got {value}"
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if (value := getattr(training, name)) < 1:
            return f"--{name} must be >= 1, got {value}"
    if training.max_steps <= 0 and not training.num_train_epochs > 0:
        return f"--num_train_epochs must be > 0 (or give --max_steps), got {training.num_train_epochs}"
    if not training.learning_rate >= 0:
        return f"--learning_rate must be >= 0, got {training.learning_rate}"
    return None


def _missing_integrations(report_to: list[str] | str | None) -> list[str]:
    """The `--report_to` integrations that the Trainer could not start because their package is missing."""
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = set(get_available_reporting_integrations())
    return [name for name in names if name not in ("all", "none") and name not in available]


def _bare_resume_flag(argv: list[str]) -> list[str]:
    """argparse needs a value after --resume_from_checkpoint: give a bare flag the value `last`."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
        if arg in ("--resume_from_checkpoint", "--resume-from-checkpoint") and bare:
            out.append(RESUME_LAST)
    return out
