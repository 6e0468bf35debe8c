"""What a model card says about its data: a MedMNIST 3D set (from `medmnist.INFO`) or the user's own volumes (a
folder or a `datasets` dataset), and how the image processor prepares volumes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

__all__ = ["DatasetCard", "data_card", "describe_preprocessing", "medmnist_dataset_card", "own_dataset_card"]

_SPLIT_KEYS = (("train", "train"), ("validation", "val"), ("test", "test"))  # split -> MedMNIST's name


def _volumes(split_sizes: Mapping[str, int] | None, split: str, total: int) -> str:
    used = (split_sizes or {}).get(split, total)
    return str(total) if used == total else f"{used} of {total}"


@dataclass
class DatasetCard:
    """What the model card says about the data: a MedMNIST set (`medmnist_dataset_card`) or the user's own
    (`own_dataset_card`)."""

    name: str
    pretty: str
    size: int
    task: str
    description: str
    splits: list[tuple[str, str]]
    test_volumes: int
    medmnist: bool
    license: str | None = None
    homepage: str | None = None
    splits_made: str | None = None


def medmnist_dataset_card(name: str, size: int, split_sizes: Mapping[str, int] | None = None) -> DatasetCard:
    import medmnist

    from .data import MEDMNIST_HOMEPAGE, resolve_dataset

    source = resolve_dataset(name, size)
    return DatasetCard(
        name=source.name,
        pretty=f"{medmnist.INFO[source.name]['python_class']} ({size}³)",  # e.g. "OrganMNIST3D (28³)"
        size=size,
        task=source.task,
        description=source.description,
        splits=[(split, _volumes(split_sizes, split, source.n_samples[key])) for split, key in _SPLIT_KEYS],
        test_volumes=(split_sizes or {}).get("test", source.n_samples["test"]),
        medmnist=True,
        license=source.license,
        homepage=MEDMNIST_HOMEPAGE,
    )


def own_dataset_card(source: str, size: int, data: datasets.DatasetDict, splits_made: Mapping | None = None) -> DatasetCard:
    """The card's description of the user's volumes: a folder or a datasets dataset `source`."""
    names = data["train"].features["label"].names
    made = ""
    if splits_made:
        cut = ", ".join(k for k in ("validation", "test") if k in (splits_made.get("files") or splits_made.get("train_rows") or {}))
        made = (
            f"The {cut} split{'s were' if ',' in cut else ' was'} cut from the training volumes, stratified by class, "
            f"with seed {splits_made['seed']}; the run's `splits.json` lists which volume went where (it stays with the run: "
            "publishing leaves it out, as file names may identify patients)."
        )
    return DatasetCard(
        name=Path(str(source)).name or str(source),
        pretty=f"{Path(str(source)).name or source} ({size}³)",
        size=size,
        task=f"{'binary' if len(names) == 2 else 'multi-class'} classification ({len(names)} classes)",
        description=f"the user's own volumes (`{Path(str(source)).name}`), {sum(len(d) for d in data.values())} in all.",
        splits=[(split, str(len(data[split]))) for split in ("train", "validation", "test")],
        test_volumes=len(data["test"]),
        medmnist=False,
        splits_made=made or None,
    )


def data_card(data_args, data: datasets.DatasetDict) -> DatasetCard | None:
    """The card's description of a run's data: None for a MedMNIST set (the card reads medmnist.INFO)."""
    if not data_args.own_volumes():
        return None
    source = data_args.data_folder or data_args.train_dir or data_args.dataset_name
    return own_dataset_card(source, data_args.size, data, getattr(data, "splits_made", None))


def describe_preprocessing(image_processor) -> str:
    """The image processor's steps, in words, for the card."""
    steps = []
    if window := getattr(image_processor, "intensity_window", None):
        steps.append(f"intensities clipped to [{window[0]:g}, {window[1]:g}] and mapped to [0, 1]")
    elif window := getattr(image_processor, "percentile_window", None):
        steps.append(f"each volume clipped to its {window[0]:g}th-{window[1]:g}th percentiles and mapped to [0, 1]")
    else:
        steps.append("`uint8 / 255`")
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "keep_aspect_ratio", False):
        steps.append(f"padded to a cube in physical units (NIfTI voxel spacing) and resized to {size}")
    elif getattr(image_processor, "do_resize", False):
        steps.append(f"resized (trilinear) to {size}")
    else:
        steps.append("no resizing")
    if getattr(image_processor, "intensity_window", None) or getattr(image_processor, "percentile_window", None):
        steps.append("rounded to 256 grey levels, as the training volumes were stored")
    return ", ".join(steps)


