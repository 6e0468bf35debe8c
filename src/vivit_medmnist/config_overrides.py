"""The `--config_overrides` language: 'hidden_size=64,tubelet_size=[4,4,8],pooling=cls' -> config fields.

Keys are `VivitMedmnistConfig` fields; values are parsed as YAML (a list may also be a single int for the per-axis
fields). A malformed item is an `OptionError` (exit status 2 in the commands).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from .configuration_vivit_medmnist import VivitMedmnistConfig

__all__ = ["OptionError", "format_overrides", "format_value", "override_items", "parse_config_overrides", "same_config_value"]


class OptionError(ValueError):
    """A value given on the command line or in a recipe that cannot mean what the user wants: the command ends
    with exit status 2, like argparse's own usage errors (files and data that cannot be used: 1)."""


def _split_overrides(text: str) -> list[str]:
    return re.split(r",(?![^\[]*\])", text)  # commas outside [...]


def override_items(text: str | None) -> dict[str, str]:
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
            raise OptionError(
                "--config_overrides: volume_size comes from the data: use --size 28 or --size 64"
            )
        if not sep or not key or key.startswith("_") or not hasattr(defaults, key):
            raise OptionError(
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
                raise OptionError(f"--config_overrides: {key} must be a number, got {raw!r}") from None
        overrides[key] = value
    return overrides


def same_config_value(saved: Any, value: Any) -> bool:
    """Whether an override `value` is what the config holds (`8` is `[8, 8, 8]` for the per-axis fields)."""
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(saved, (list, tuple)):
        value = [value] * len(saved)
    if isinstance(saved, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(saved) == list(value)
    return saved == value


def format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value)


def format_overrides(overrides: Mapping[str, Any]) -> str:
    return ",".join(f"{key}={format_value(value)}" for key, value in overrides.items()) or "none"
