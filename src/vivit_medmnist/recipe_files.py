"""Recipe files: the YAML files of option defaults that `--recipe` names (a path, or the name of one shipped with
the package), read with each option's own type, as if given on the command line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers.hf_argparser import string_to_bool

__all__ = ["RECIPES_DIR", "load_recipe", "packaged_recipes", "resolve_recipe"]

RECIPES_DIR = Path(__file__).with_name("recipes")  # the recipes shipped with the package (package data)


def packaged_recipes() -> list[str]:
    """The names of the recipes shipped with the package, e.g. ['adrenalmnist3d', 'keras_reference', ...]."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name: str) -> Path:
    """A recipe file: `name` itself when it exists, else the packaged recipe of that name (with or without
    `.yaml`), so `--recipe organmnist3d` works where the package is installed without a checkout."""
    path = Path(name)
    packaged = RECIPES_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if not path.is_file() and path.parent == Path(".") and packaged.is_file():
        return packaged
    return path


def load_recipe(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read a recipe: a flat YAML mapping of option name -> value, checked against `parser`'s options.

    `path` is a YAML file, or the name of a recipe shipped with the package (`organmnist3d`, see
    `packaged_recipes`). Values are converted with the option's own type, as if given on the command line, so a
    recipe cannot hold
    anything the command line would refuse. Errors go through `parser.error` (usage + message, exit status 2).
    """
    try:
        recipe = yaml.safe_load(resolve_recipe(path).read_text())
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
    if unknown and (other := _command_of(unknown)):
        kind, command = other
        parser.error(f"recipe {path} is a {kind} recipe ({', '.join(unknown)}): run it with {command}")
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


# The package's other commands that read training's recipes plus options of their own: (kind, command, the module
# and dataclass of those options). A recipe whose unknown keys are all one command's options is that command's.
OTHER_COMMANDS = (("pretraining", "vivit-medmnist-pretrain", "vivit_medmnist.pretraining", "PretrainingOptions"),)


def _command_of(keys: Sequence[str]) -> tuple[str, str] | None:
    for kind, command, module, name in OTHER_COMMANDS:
        options = getattr(importlib.import_module(module), name)  # only on this error path
        if set(keys) <= {option.name for option in dataclasses.fields(options)}:
            return kind, command
    return None


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
