"""Your own volumes as the `DatasetDict` the package trains on: a folder of NIfTI / NumPy files sorted by class,
or any `datasets` dataset with a volume column.

```python
from vivit_medmnist import VivitMedmnistImageProcessor
from vivit_medmnist.volume_folder import load_volume_folder, load_volume_dataset

processor = VivitMedmnistImageProcessor(intensity_window=[-160, 240], keep_aspect_ratio=True, size=28)
ds = load_volume_folder("crops/", processor)  # crops/<class>/*.nii.gz or crops/{train,validation,test}/<class>/*
ds = load_volume_dataset("org/my-volumes", processor, volume_column="image", label_column="diagnosis")
ds["train"][0]  # {"volume": (28, 28, 28) uint8, "label": 0}; ds["train"].features["label"].names
```

Both return what `vivit_medmnist.data.load_medmnist3d` returns: splits "train", "validation" and "test", a
`volume` column of uint8 volumes at the model's size and a `label` `ClassLabel`, so that `train.py`,
`evaluate.py` and a `Trainer` take them as they take MedMNIST.

- **A folder**: `root/<class>/<file>` (one split, the others made from it) or `root/{train,validation,test}/
  <class>/<file>` (`val` and `valid` name the validation split too); files `.nii`, `.nii.gz`, `.npy` or `.npz`
  (one volume each; a `.npz` holds one array), of any shape. The classes are the folder names, sorted, unless
  `class_names` gives their order. Each split's files are ordered by file name (then class), so numbered files
  keep their order.
- **Missing splits** are cut from the training files, stratified by class, with `seed` (scikit-learn's
  `train_test_split`): `validation_fraction` and `test_fraction` of the volumes. Which file went where is
  returned in `splits_made` (on the `DatasetDict` as `ds.splits_made`), and `train.py` records it in the run's
  outputs and the model card.
- **Preprocessing**: every volume goes through `image_processor` (its intensity window or percentile window, its
  aspect-keeping resize with the NIfTI header's voxel spacing), is stored as uint8 at the model's size, and is
  what training reads; `image_processor` is saved with the model, so that `predict.py`, the pipeline and remote
  code repeat exactly this on raw volumes. Volumes already uint8 at the model's size with no option set are
  stored unchanged (MedMNIST's own files give the same rows).
- **Cache**: the preprocessed volumes are written once by `datasets` (`Dataset.from_generator`, `num_proc`
  processes) into its cache, keyed by the files, their sizes and modification times and the preprocessing; a
  second load reads them back without touching the source files, and memory does not grow with their number.
  Nothing is ever written into `root`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from .data import VOLUME_COLUMN
from .volume_files import InputError, is_nifti, load_arrays, nifti_header

__all__ = ["SPLIT_NAMES", "VOLUME_SUFFIXES", "load_volume_dataset", "load_volume_folder", "preprocess_volume"]

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "valid": "validation", "test": "test"}


def preprocess_volume(array: np.ndarray, image_processor, spacing=None, where: str = "") -> np.ndarray:
    """A raw volume (D, H, W) -> uint8 at the processor's size, exactly as the processor prepares it for the
    model (times 255). Raises InputError naming `where` for what is not a volume."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        kind = "a 2D image" if array.ndim == 2 else f"an array of {array.ndim} dimensions"
        raise InputError(f"{where}: expected a 3D volume (D, H, W), got {kind} of shape {array.shape}")
    size = image_processor.size
    plain = not (image_processor.intensity_window or image_processor.percentile_window)
    if plain and not image_processor.keep_aspect_ratio and array.dtype == np.uint8 and (
        size is None or list(array.shape) == list(size)
    ):
        return array  # already what MedMNIST stores: unchanged
    try:
        pixel_values = image_processor(
            array, return_tensors="pt", spacing=spacing, do_resize=size is not None, size=size
        )["pixel_values"]
    except ValueError as err:
        raise InputError(f"{where}: {err}") from err
    return np.rint(pixel_values[0, :, 0].numpy() * 255).astype(np.uint8)


def _read(path: str, processor_config: dict) -> np.ndarray:
    from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor

    processor = VivitMedmnistImageProcessor(**processor_config)
    arrays = load_arrays(Path(path), None)
    if len(arrays) != 1:
        raise InputError(f"{path}: expected one volume per file, got {len(arrays)} arrays ({[k for k, _ in arrays]})")
    spacing = nifti_header(Path(path))[1] if is_nifti(Path(path)) else None
    return preprocess_volume(arrays[0][1], processor, spacing, where=path)


def _generate(files: list[str], labels: list[int], processor_config: dict):
    for path, label in zip(files, labels):
        yield {VOLUME_COLUMN: _read(path, processor_config), "label": label}


def _processor_config(image_processor) -> dict:
    keys = ("do_rescale", "rescale_factor", "do_resize", "size", "intensity_window", "percentile_window", "keep_aspect_ratio")
    return {key: getattr(image_processor, key) for key in keys}


def _files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)),
        key=lambda p: p.name,
    )


def _scan(root) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> files, from `root/<class>/*` (all "train"), `root/<split>/<class>/*`, or a mapping
    {split: folder of class folders}."""
    if isinstance(root, dict):
        layout = {split: Path(folder) for split, folder in root.items()}
        for folder in layout.values():
            if not folder.is_dir():
                raise InputError(f"{folder}: expected a folder of class folders (<class>/*.nii.gz), got no such folder")
    else:
        if not root.is_dir():
            raise InputError(f"{root}: expected a folder of class folders (root/<class>/*.nii.gz), got no such folder")
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in children if p.name.lower() in SPLIT_NAMES}
        if split_dirs and len(split_dirs) != len(children):
            others = [p.name for p in children if p.name.lower() not in SPLIT_NAMES]
            raise InputError(
                f"{root}: mixes split folders ({', '.join(sorted(split_dirs))}) with other folders "
                f"({', '.join(others)}); expected root/<class>/* or root/{{train,validation,test}}/<class>/*"
            )
        if split_dirs and "train" not in split_dirs:
            raise InputError(f"{root}: has {', '.join(sorted(split_dirs))} but no train folder")
        layout = split_dirs or {"train": root}
    out = {}
    for split, folder in layout.items():
        classes = {}
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = _files(class_dir)
            if not files:
                raise InputError(
                    f"{class_dir}: the class folder holds no volume file ({', '.join(VOLUME_SUFFIXES)})"
                )
            classes[class_dir.name] = files
        if not classes:
            raise InputError(f"{folder}: expected one folder per class holding volumes, found none")
        out[split] = classes
    return out


def _class_names(scanned, class_names: Sequence[str] | None) -> list[str]:
    first = next(split for split in ("train", "validation", "test") if split in scanned)
    found = sorted(scanned[first])
    if class_names is None:
        names = found
    else:
        names = list(class_names)
        if sorted(names) != found:
            raise InputError(f"class_names {names} are not the {first} folder's classes {found}")
    for split, classes in scanned.items():
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise InputError(
                f"the {split} split has classes that training has not: {', '.join(unknown)} (training: {', '.join(names)})"
            )
    return names


def _cut_splits(files, labels, seed: int, validation_fraction: float, test_fraction: float, missing: list[str]):
    """Stratified splits of the training files for the `missing` splits; returns split -> (files, labels)."""
    from sklearn.model_selection import train_test_split

    fractions = {"validation": validation_fraction, "test": test_fraction}
    out, rest_files, rest_labels = {}, list(files), list(labels)
    total = len(files)
    classes = len(set(labels))
    for split in missing:
        count = max(classes, round(fractions[split] * total))  # at least one volume of every class
        try:
            rest_files, taken_files, rest_labels, taken_labels = train_test_split(
                rest_files, rest_labels, test_size=count, random_state=seed, stratify=rest_labels
            )
        except ValueError as err:
            raise InputError(f"cannot cut a stratified {split} split of {count} volumes from {len(rest_files)}: {err}") from err
        out[split] = (taken_files, taken_labels)
    out["train"] = (rest_files, rest_labels)
    return out


def _build(split_files, names, image_processor, cache_dir, num_proc, fingerprint_extra: str):
    features = datasets.Features(
        {
            VOLUME_COLUMN: datasets.Array3D(shape=tuple(image_processor.size), dtype="uint8"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )
    config = _processor_config(image_processor)
    splits = {}
    for split, (files, labels) in split_files.items():
        # the cache key: the files (with sizes and modification times), their labels and the preprocessing
        stamp = [(str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        key = hashlib.sha256(json.dumps([stamp, labels, config, fingerprint_extra], default=str).encode()).hexdigest()
        dataset = _from_generator(files, labels, config, features, cache_dir, num_proc, split, key)
        splits[split] = dataset.with_format("numpy")
    return datasets.DatasetDict(splits)


# Volumes written to the cache per Arrow record batch. datasets' default (1,000 examples) holds that many
# preprocessed volumes in a worker before it writes them, so a worker's memory grew with the folder; a small batch
# keeps it flat (benchmarks/README.md, volume_folder.py).
WRITER_BATCH_SIZE = 16


def _from_generator(files, labels, config, features, cache_dir, num_proc, split, key):
    """`Dataset.from_generator` of the preprocessed volumes; the InputError a file raised, unwrapped from
    datasets' DatasetGenerationError."""
    try:
        return datasets.Dataset.from_generator(
            _generate,
            features=features,
            gen_kwargs={"files": [str(f) for f in files], "labels": list(labels), "processor_config": config},
            cache_dir=cache_dir,
            num_proc=num_proc if num_proc and num_proc > 1 and len(files) > 1 else None,
            split=datasets.NamedSplit(split),
            fingerprint=key[:32],
            writer_batch_size=WRITER_BATCH_SIZE,
        )
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise InputError(str(cause)) from None
        raise InputError(f"preprocessing the {split} volumes failed: {err.__cause__ or err}") from err


def load_volume_folder(
    root: str | os.PathLike | dict,
    image_processor,
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 42,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    make_missing_splits: bool = True,
) -> datasets.DatasetDict:
    """A folder of volumes as a `DatasetDict` (see the module docstring), or {split: folder of class folders}
    (`--train_dir` and friends). `image_processor` must have a `size` (the model's). With
    `make_missing_splits=False` only the splits found are returned (evaluating a folder). Raises InputError for an empty class folder, a class in validation or test that training has
    not, an unreadable or non-volume file (named), a 2D image where a volume was expected."""
    if image_processor.size is None:
        raise ValueError("the image processor needs size, the model's (D, H, W), to store the volumes at")
    scanned = _scan(root if isinstance(root, dict) else Path(root))
    base = Path(next(iter(root.values()))).parent if isinstance(root, dict) else Path(root)
    names = _class_names(scanned, class_names)
    split_files = {
        split: ([f for c in names if c in classes for f in classes[c]], [names.index(c) for c in names if c in classes for _ in classes[c]])
        for split, classes in scanned.items()
    }
    for split, (files, labels) in split_files.items():  # ordered by file name, then class
        order = sorted(range(len(files)), key=lambda i: (files[i].name, labels[i]))
        split_files[split] = ([files[i] for i in order], [labels[i] for i in order])
    missing = [split for split in ("validation", "test") if split not in split_files] if make_missing_splits else []
    made = {}
    if missing:
        split_files.update(_cut_splits(*split_files["train"], seed, validation_fraction, test_fraction, missing))
        made = {split: [os.path.relpath(f, base) for f in split_files[split][0]] for split in missing}
    data = _build(split_files, names, image_processor, cache_dir, num_proc, f"folder:{base.resolve()}")
    data = datasets.DatasetDict({split: data[split] for split in ("train", "validation", "test") if split in data})
    data.splits_made = {"seed": seed, "files": made} if made else {}
    return data


def load_volume_dataset(
    name_or_path: str,
    image_processor,
    *,
    volume_column: str = "volume",
    label_column: str = "label",
    seed: int = 42,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """A `datasets` dataset (a folder saved with `save_to_disk`, or a Hub / local dataset `load_dataset` reads)
    as the package's `DatasetDict`: its volumes preprocessed by `image_processor` (via `Dataset.map`, cached by
    `datasets`), its label column a `ClassLabel` (required), missing splits cut as for a folder."""
    path = Path(name_or_path)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            raw = datasets.load_from_disk(str(path))
        else:
            raw = datasets.load_dataset(name_or_path, cache_dir=cache_dir)
    except Exception as err:  # whichever library raised it: one error naming the dataset
        from .data import dataset_names

        raise InputError(
            f"--dataset_name {name_or_path}: not a MedMNIST 3D set ({', '.join(dataset_names())}), and not a "
            f"datasets dataset that loads ({type(err).__name__}: {err})"
        ) from err
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    splits = {SPLIT_NAMES[k.lower()]: v for k, v in raw.items() if k.lower() in SPLIT_NAMES}
    if "train" not in splits:
        raise InputError(f"{name_or_path}: expected a train split, found {sorted(raw)}")
    for split, dataset in splits.items():
        for column in (volume_column, label_column):
            if column not in dataset.column_names:
                raise InputError(
                    f"{name_or_path} ({split}): no column {column!r}; columns are {dataset.column_names} "
                    "(--volume_column_name / --label_column_name)"
                )
        if not isinstance(dataset.features[label_column], datasets.ClassLabel):
            raise InputError(
                f"{name_or_path}: the label column {label_column!r} is {dataset.features[label_column]}, expected a "
                "ClassLabel (dataset.cast_column(label, datasets.ClassLabel(names=[...])))"
            )
    names = splits["train"].features[label_column].names
    for split, dataset in splits.items():
        if dataset.features[label_column].names != names:
            raise InputError(f"{name_or_path}: the {split} split's classes {dataset.features[label_column].names} are not training's {names}")
    config = _processor_config(image_processor)
    features = datasets.Features(
        {
            VOLUME_COLUMN: datasets.Array3D(shape=tuple(image_processor.size), dtype="uint8"),
            "label": datasets.ClassLabel(names=list(names)),
        }
    )

    def prepare(row, index):
        from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor

        volume = preprocess_volume(
            row[volume_column], VivitMedmnistImageProcessor(**config), where=f"{name_or_path} row {index}"
        )
        return {VOLUME_COLUMN: volume, "label": row[label_column]}

    # the preprocessed rows go to datasets' cache (or cache_dir), never beside a dataset saved by the user
    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "vivit_medmnist"
    cache.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for split, dataset in splits.items():
        dataset = dataset.with_format("numpy", columns=[volume_column, label_column])
        key = hashlib.sha256(json.dumps([dataset._fingerprint, config, volume_column, label_column]).encode())
        prepared[split] = dataset.map(
            prepare, with_indices=True, remove_columns=dataset.column_names, features=features,
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            cache_file_name=str(cache / f"{key.hexdigest()[:32]}.arrow"), new_fingerprint=key.hexdigest()[:32],
            writer_batch_size=WRITER_BATCH_SIZE,
        ).with_format("numpy")  # fmt: skip
    missing = [split for split in ("validation", "test") if split not in prepared]
    made = {}
    if missing:
        train = prepared["train"]
        indices = _cut_splits(list(range(len(train))), list(train["label"]), seed, validation_fraction, test_fraction, missing)
        for split, (rows, _) in indices.items():
            prepared[split] = train.select(sorted(rows))
        made = {split: sorted(int(i) for i in indices[split][0]) for split in missing}
    data = datasets.DatasetDict({split: prepared[split] for split in ("train", "validation", "test")})
    data.splits_made = {"seed": seed, "train_rows": made} if made else {}
    return data
