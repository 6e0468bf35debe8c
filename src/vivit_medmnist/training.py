"""The pieces of `scripts/train.py`: arguments (with `--recipe` files), data, augmentation, model and Trainer.

Arguments follow the Hugging Face example scripts: `HfArgumentParser` over `ModelArguments`, `DataArguments` and
`transformers.TrainingArguments`, so every `TrainingArguments` field is a command-line option. On top of that:

- `--recipe FILE.yaml`: a flat mapping of option names (without `--`) to values; they become the parser's
  defaults, so options given on the command line win. Unknown keys and values of the wrong type are errors.
- `--resume_from_checkpoint` with no value (or the value `last`) resumes from the newest checkpoint in
  `<output_dir>/checkpoints`; with a path, from that checkpoint. Asking to resume when there is no checkpoint is an
  error (training silently from scratch instead would surprise), and so is starting a new run over a folder
  that already holds checkpoints (they would be mixed up with the new run's).
- `use_cpu` defaults to True when there is no CUDA device (`--use_cpu false` restores the Trainer's own choice).
- `--output_dir` (default `outputs/<dataset_name>`) is the publishable folder; the Trainer's checkpoints, which
  hold pickles (`optimizer.pt`, `rng_state.pth`, `training_args.bin`), go to its `checkpoints/` subfolder only.

Augmentation is seeded by (seed, epoch, volume index), never by a global RNG, so a run resumed from a checkpoint
(even one saved mid-epoch) sees exactly the volumes the uninterrupted run saw.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import transformers
import yaml
from huggingface_hub.errors import StrictDataclassError
from scipy import ndimage
from scipy.spatial.transform import Rotation
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForVideoClassification,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .configuration_vivit_medmnist import VivitMedmnistConfig
from .data import VOLUME_COLUMN, MedMNIST3DCollator, load_medmnist3d
from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor
from .metrics import compute_metrics
from .modeling_vivit_medmnist import VivitMedmnistForVideoClassification
from .publishing import publishable_files
from .safe_io import same_path

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # subfolder of --output_dir that holds the Trainer checkpoints (never published)
RESUME_LAST = "last"  # what a bare --resume_from_checkpoint becomes


@dataclass
class RunOptions:
    """What the run starts from, first in `--help`; neither may be set in a recipe."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "A YAML file of option defaults, e.g. recipes/organmnist3d.yaml (options override them)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow a new run to replace the finished model (and delete the checkpoints) already in "
            "--output_dir; without it such a folder is refused."
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
        default="organmnist3d", metadata={"help": "A MedMNIST 3D set, e.g. organmnist3d."}
    )
    size: int = field(default=28, metadata={"help": "Volume edge length: 28 or 64."})
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


# --------------------------------------------------------------------------------------------------------------
# Command line: recipe defaults < command-line options
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((RunOptions, ModelArguments, DataArguments, TrainingArguments))
    parser.description = "Train ViViT on a MedMNIST 3D set and write a publishable model folder."
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
    parser.set_defaults(
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,  # the raw "volume" column is no argument of forward(): the collator reads it
        output_dir="",
        disable_tqdm=not sys.stderr.isatty(),
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> RunArguments:
    """Parse the command line (`sys.argv[1:]` if None) into the three dataclasses, after applying `--recipe`."""
    argv = _bare_resume_flag(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    pre.add_argument("--config_overrides")
    given = pre.parse_known_args(argv)[0]
    recipe, recipe_values = given.recipe, {}
    if recipe is not None:
        recipe_values = load_recipe(recipe, parser)
        parser.set_defaults(**recipe_values)
    try:
        options, model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
    except ValueError as err:  # TrainingArguments' own checks of option combinations
        parser.error(str(err))
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if problem := _invalid_option(data_args, training_args):
        parser.error(problem)
    if missing := _missing_integrations(training_args.report_to):
        parser.error(
            f"--report_to {' '.join(missing)}: not installed; pip install 'vivit-medmnist[{missing[0]}]' "
            "(or the integration's own package), or choose another --report_to"
        )
    if training_args.push_to_hub:
        parser.error(
            "--push_to_hub would upload the Trainer's checkpoint folder (pickles, no model code or card); train, "
            "then upload the finished folder with scripts/publish.py OUTPUT_DIR --repo_id ORG/NAME"
        )
    # config_overrides merge key by key: the command line's keys replace the recipe's, the recipe's others stay
    from_recipe = _override_items(recipe_values.get("config_overrides"))
    from_command_line = _override_items(given.config_overrides)
    model_args.config_overrides = ",".join({**from_recipe, **from_command_line}.values()) or None
    output_dir = Path(training_args.output_dir or Path("outputs") / data_args.dataset_name)
    training_args.output_dir = str(output_dir / CHECKPOINTS)
    return RunArguments(
        model_args,
        data_args,
        training_args,
        output_dir,
        recipe,
        options.overwrite_output_dir,
        frozenset(from_recipe.keys() - from_command_line.keys()),
    )


def _invalid_option(data: DataArguments, training: TrainingArguments) -> str | None:
    """The first option whose value cannot mean what the user wants (so the run would crash late or silently
    do something else), as a message naming it; None when all are sound."""
    for name in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        if (value := getattr(data, name)) is not None and value < 1:
            return f"--{name} must be a positive number of volumes, got {value}"
    if bad := [axis for axis in data.flip_axes if axis not in (0, 1, 2)]:
        return f"--flip_axes takes volume axes 0 (D), 1 (H) and 2 (W), got {bad}"
    ranges = {  # option: (lowest, highest, whether highest is allowed)
        "max_shift": (0, data.size - 1, True),
        "max_rotation": (0, 180, True),
        "intensity_scale": (0, 1, False),
        "intensity_shift": (0, 1, True),
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


def load_recipe(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe: a flat YAML mapping of option name -> value, checked against `parser`'s options.

    Values are converted with the option's own type, as if given on the command line, so a recipe cannot hold
    anything the command line would refuse. Errors go through `parser.error` (usage + message, exit status 2).
    """
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"cannot read recipe {path}: {err}")
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        parser.error(
            f"recipe {path} must be a mapping of option names to values, got {type(recipe).__name__}"
        )
    not_in_recipes = ("help", "recipe", "overwrite_output_dir")  # a recipe may not replace what a user has
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in not_in_recipes}
    unknown = [key for key in recipe if key not in actions]
    if unknown:
        hints = [
            f"{key!r}"
            + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, actions)) else "")
            for key in unknown
        ]
        parser.error(f"recipe {path}: unknown key(s) {', '.join(hints)}; keys are option names without '--'")
    defaults = {}
    for key, value in recipe.items():
        try:
            defaults[key] = _convert_recipe_value(actions[key], value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            parser.error(f"recipe {path}: invalid value {value!r} for {key!r}: {err}")
    return defaults


def _convert_recipe_value(action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        return [_convert_one(action, item) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise TypeError("expected a single value, got a list")
    return _convert_one(action, value)


def _convert_one(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, dict):
        value = json.dumps(value)  # dict options (e.g. lr_scheduler_kwargs) take JSON on the command line
    elif isinstance(value, bool) and action.type is not string_to_bool:
        raise TypeError("expected a value of the option's type, got a boolean")
    elif isinstance(value, (list, tuple)):
        raise TypeError("expected a single value, got a list")
    converted = action.type(str(value)) if action.type is not None else str(value)
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {list(action.choices)}")
    return converted


def _split_overrides(text: str) -> list[str]:
    return re.split(r",(?![^\[]*\])", text)  # commas outside [...]


def _override_items(text: str | None) -> dict[str, str]:
    """'a=1,b=[2,3]' -> {'a': 'a=1', 'b': 'b=[2,3]'} (the text of each item by its key; checked later)."""
    return {
        item.partition("=")[0].strip(): item.strip() for item in _split_overrides(text or "") if item.strip()
    }


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """'hidden_size=64,tubelet_size=[4,4,8],pooling=cls' -> a dict of config fields, values parsed as YAML.

    Keys must be `VivitMedmnistConfig` attributes; a value is coerced to float where the default is a float (YAML
    reads `1e-6` as a string). The config itself validates the values.
    """
    if not text:
        return {}
    defaults = VivitMedmnistConfig()
    overrides = {}
    for item in _split_overrides(text):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if key == "volume_size":
            raise ValueError(
                "--config_overrides: volume_size comes from the data: use --size 28 or --size 64"
            )
        if not sep or not key or key.startswith("_") or not hasattr(defaults, key):
            raise ValueError(
                f"--config_overrides: {item.strip()!r} is not 'field=value' with a VivitMedmnistConfig field "
                f"(e.g. hidden_size=64,num_hidden_layers=2,tubelet_size=4)"
            )
        value = yaml.safe_load(raw) if raw else raw
        if (
            isinstance(getattr(defaults, key), float)
            and isinstance(value, (str, int))
            and not isinstance(value, bool)
        ):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"--config_overrides: {key} must be a number, got {raw!r}") from None
        overrides[key] = value
    return overrides


# --------------------------------------------------------------------------------------------------------------
# Run set-up: logging, device, checkpoints
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Data and augmentation
# --------------------------------------------------------------------------------------------------------------


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


def augment_volume(
    volume: np.ndarray,
    rng: np.random.Generator,
    *,
    flip_axes: Sequence[int] = (),
    max_rotation: float = 0.0,
    rotation_interpolation: str = "linear",
    max_shift: int = 0,
    intensity_scale: float = 0.0,
    intensity_shift: float = 0.0,
) -> np.ndarray:
    """A randomly flipped, rotated, shifted and intensity-jittered copy of a uint8 volume (D, H, W), drawn from
    `rng`. Each step draws from `rng` only when it is on, so a set-up without rotation draws exactly what it drew
    before rotation existed."""
    out = volume
    for axis in flip_axes:
        if rng.random() < 0.5:
            out = np.flip(out, axis=axis)
    if max_rotation > 0:
        angles = rng.uniform(-max_rotation, max_rotation, size=3)
        out = rotate_volume(out, angles, rotation_interpolation)
    if max_shift > 0:
        shifts = rng.integers(-max_shift, max_shift + 1, size=3)
        padded = np.pad(out, max_shift)  # zero fill: nothing wraps around to the opposite side
        starts = max_shift - shifts
        out = padded[tuple(slice(s, s + n) for s, n in zip(starts, out.shape))]
    if intensity_scale > 0 or intensity_shift > 0:
        scale = rng.uniform(1 - intensity_scale, 1 + intensity_scale)
        offset = rng.uniform(-intensity_shift, intensity_shift) * 255
        out = np.clip(np.rint(out.astype(np.float32) * scale + offset), 0, 255)
    return np.ascontiguousarray(out, dtype=np.uint8)


_INTERPOLATION_ORDER = {"nearest": 0, "linear": 1}  # scipy.ndimage spline orders


def rotate_volume(volume: np.ndarray, angles: Sequence[float], interpolation: str = "linear") -> np.ndarray:
    """`volume` (D, H, W) rotated about its centre by `angles` degrees about the D, H and W axes in turn, with
    voxels from outside the volume set to 0."""
    if interpolation not in _INTERPOLATION_ORDER:
        raise ValueError(
            f"rotation_interpolation must be one of {sorted(_INTERPOLATION_ORDER)}, got {interpolation!r}"
        )
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    centre = (np.asarray(volume.shape) - 1) / 2
    # affine_transform maps each output voxel o to the input point rotation @ o + offset: keep the centre fixed.
    out = ndimage.affine_transform(
        volume.astype(np.float32),
        rotation,
        offset=centre - rotation @ centre,
        order=_INTERPOLATION_ORDER[interpolation],
        mode="grid-constant",  # zero beyond the edges, and edge voxels are interpolated like any other
        cval=0.0,
    )
    if np.issubdtype(volume.dtype, np.integer):  # round, not truncate, back to the input's type
        info = np.iinfo(volume.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(volume.dtype)


class AugmentedDataset(torch.utils.data.Dataset):
    """A dataset whose item i in epoch e is row i augmented with `np.random.default_rng([seed, e, i])`.

    Being a function of (seed, epoch, index) only, the augmentation does not depend on which process reads the row,
    on data-loader workers, or on whether the run was resumed. `set_epoch` is called by `EpochCallback` (accelerate's
    data loader calls it too, but not for every sampler set-up, e.g. not under DDP).
    """

    def __init__(self, dataset, seed: int, **augmentation):
        self.dataset = dataset
        self.seed = seed
        self.augmentation = augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.dataset[int(index)])
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        row[VOLUME_COLUMN] = augment_volume(np.asarray(row[VOLUME_COLUMN]), rng, **self.augmentation)
        return row


class EpochCallback(TrainerCallback):
    """Tells the dataset the epoch that starts: `state.epoch` counts finished epochs (fractional after a
    mid-epoch checkpoint, e.g. 1.5 when resuming in the middle of the second epoch)."""

    def __init__(self, dataset: AugmentedDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch))


# --------------------------------------------------------------------------------------------------------------
# Model and Trainer
# --------------------------------------------------------------------------------------------------------------


# Config fields that change how a model trains or initialises a new head, not the shape or meaning of a saved
# weight: the only overrides that apply to a model loaded for fine-tuning, whose saved config is its architecture.
TRAINING_ONLY_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
    "initialization",
    "initializer_range",
)


def build_model(
    model_args: ModelArguments,
    label_names: Sequence[str],
    size: int,
    recipe_override_keys: frozenset[str] = frozenset(),
):
    """A new model for `size`^3 volumes, or the saved one to fine-tune (a new head if the label count differs).

    Fine-tuning keeps the saved architecture: `config_overrides` of `TRAINING_ONLY_FIELDS` apply; another value
    for an architecture field is skipped (with a log line) when it comes from the recipe (`recipe_override_keys`),
    which describes a model to build, and refused when the user gave it on the command line.

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
            logger.info(f"config overrides: {_format_overrides(overrides)}")
        try:
            return VivitMedmnistForVideoClassification(
                VivitMedmnistConfig(volume_size=size, **labels, **overrides)
            )
        except (StrictDataclassError, TypeError) as err:  # the config's type checks
            raise ValueError(f"invalid model configuration: {err}") from err
    try:
        saved = AutoConfig.from_pretrained(path)
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
    if list(model.config.volume_size) != [size] * 3:
        raise ValueError(
            f"--model_name_or_path {path} expects volumes of size {model.config.volume_size}, the data is "
            f"{size}^3: pass --size {model.config.volume_size[0]} (position embeddings are per volume size)"
        )
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
            f"--config_overrides {_format_overrides(refused)} would change the architecture of the model being "
            f"fine-tuned ({path}: {_format_overrides(current)}); fine-tuning keeps the saved architecture. "
            f"Only {', '.join(TRAINING_ONLY_FIELDS)} apply to a saved model; drop --model_name_or_path to "
            "train a new model of that architecture."
        )
    for key, value in skipped.items():
        logger.info(
            f"the recipe's {key}={_format_value(value)} does not apply: fine-tuning keeps the saved model's "
            f"{key}={_format_value(getattr(saved, key, None))}"
        )
    if applied:
        logger.info(f"fine-tuning {path} with config overrides {_format_overrides(applied)}")
    return applied


def same_config_value(saved: Any, value: Any) -> bool:
    """Whether an override `value` is what the config holds (`8` is `[8, 8, 8]` for the per-axis fields)."""
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(saved, (list, tuple)):
        value = [value] * len(saved)
    if isinstance(saved, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(saved) == list(value)
    return saved == value


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def _format_overrides(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={_format_value(value)}" for key, value in overrides.items()) or "none"


def applied_overrides(model_args: ModelArguments, model) -> str:
    """The config overrides that the trained model has (a fine-tuned model keeps its saved architecture, so a
    recipe's architecture overrides may not apply), for the model card."""
    overrides = parse_config_overrides(model_args.config_overrides)
    return _format_overrides(
        {k: v for k, v in overrides.items() if same_config_value(getattr(model.config, k, None), v)}
    )


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


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


def save_results(output_dir: Path, **metrics_by_split: Mapping[str, Any]) -> dict[str, Any]:
    """Write <split>_results.json for each split and all_results.json (their union); return the union."""
    output_dir.mkdir(parents=True, exist_ok=True)
    everything = {}
    for split, metrics in metrics_by_split.items():
        (output_dir / f"{split}_results.json").write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
        everything.update(metrics)
    (output_dir / "all_results.json").write_text(json.dumps(everything, indent=2, sort_keys=True))
    return everything


def training_summary(
    run: RunArguments, trainer: Trainer, data: datasets.DatasetDict, train_seconds: float
) -> dict:
    """The training set-up, flat, for the model card."""
    args = run.training
    augmentation = {k: v for k, v in run.data.augmentation().items() if v}
    if not run.data.max_rotation:
        augmentation.pop("rotation_interpolation")
    # the precision that ran: `accelerate launch --mixed_precision bf16` sets it without --bf16
    mixed = trainer.accelerator.mixed_precision
    precision = mixed if mixed in ("bf16", "fp16", "fp8") else "fp32"
    return {
        "recipe": Path(run.recipe).name if run.recipe else "none (command-line options)",
        "initialisation": run.model.model_name_or_path or f"new ({trainer.model.config.initialization})",
        "config overrides": applied_overrides(run.model, trainer.model),
        "parameters": trainer.model.num_parameters(),
        "train / validation / test volumes": f"{len(data['train'])} / {len(data['validation'])} / {len(data['test'])}",
        "epochs": args.num_train_epochs,
        "batch size (per device x devices x accumulation)": (
            f"{args.per_device_train_batch_size} x {args.world_size} x {args.gradient_accumulation_steps}"
        ),
        "optimizer": args.optim,
        "learning rate": args.learning_rate,
        "adam betas / epsilon": f"{args.adam_beta1}, {args.adam_beta2} / {args.adam_epsilon}",
        "weight decay": args.weight_decay,
        "lr schedule": f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, warmup {args.warmup_steps}",
        "gradient clipping": args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else "none",
        "label smoothing": args.label_smoothing_factor or "none",
        "augmentation": ", ".join(f"{k}={v}" for k, v in augmentation.items()) or "none",
        "model selection": (
            f"best validation {args.metric_for_best_model}" if args.load_best_model_at_end else "last epoch"
        ),
        "seed": args.seed,
        "device": args.device.type,
        "world size": args.world_size,
        "precision": precision,
        "train time (s)": round(train_seconds, 1),
    }


def finish_distributed(wait: bool = True) -> None:
    """Tear the process group down at exit (without it, some gloo runs abort at interpreter shutdown).

    `wait`: first wait for the other processes (the normal end; not on an error, which may be one process's).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
