"""MedMNIST 3D sets as 🤗 `datasets`, with verified downloads, and the collator that feeds them to the model.

```python
from vivit_medmnist.data import MedMNIST3DCollator, load_medmnist3d

ds = load_medmnist3d("organmnist3d", size=28)  # DatasetDict: train / validation / test
ds["train"][0]["volume"]  # numpy array (28, 28, 28), the raw volume (uint8 values, read as int64)
ds["train"].features["label"].names  # ['liver', 'kidney-right', ..., 'pancreas']
batch = MedMNIST3DCollator()([ds["train"][i] for i in range(4)])  # pixel_values (4, 28, 1, 28, 28) float32
```

`medmnist.INFO` is the single source of every URL, MD5, label name and split size. Files are stored under the
names MedMNIST itself uses (`<name>.npz` for 28³, `<name>_64.npz` for 64³), so an existing `~/.medmnist` folder
works as `data_dir`.

Where files live (first that is set): the `data_dir` argument, the `VIVIT_MEDMNIST_DATA_DIR` environment
variable, `DEFAULT_DATA_DIR` (`$XDG_CACHE_HOME/vivit_medmnist`, i.e. `~/.cache/vivit_medmnist`).

Offline: with `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1 (read at call time) or
`download=False`, nothing is fetched; a missing file is an error that says where to put it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import medmnist  # medmnist 3.x imports torch (not torchvision) on import; only its download() needs torchvision
import numpy as np
import pyarrow as pa
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import http_stream_backoff
from huggingface_hub.utils import tqdm as hf_tqdm

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "MEDMNIST_CITATION",
    "MEDMNIST_HOMEPAGE",
    "VOLUME_COLUMN",
    "MedMNIST3DCollator",
    "MedMNIST3DSource",
    "dataset_names",
    "download_medmnist3d",
    "load_medmnist3d",
    "resolve_data_dir",
    "resolve_dataset",
]

DATA_DIR_ENV = "VIVIT_MEDMNIST_DATA_DIR"
# The column of raw volumes, named like the raw "image" / "video" columns of the Hub's data sets; "pixel_values"
# is what a processor makes of it.
VOLUME_COLUMN = "volume"
DEFAULT_DATA_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vivit_medmnist"
OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

MEDMNIST_HOMEPAGE = "https://medmnist.com/"
MEDMNIST_CITATION = """\
@article{medmnistv2,
    title={MedMNIST v2-A large-scale lightweight benchmark for 2D and 3D biomedical image classification},
    author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and Ke, Bilian and
            Pfister, Hanspeter and Ni, Bingbing},
    journal={Scientific Data},
    volume={10},
    number={1},
    pages={41},
    year={2023},
    publisher={Nature Publishing Group UK London}
}
"""

# MedMNIST's split names in the npz file -> the split names of the DatasetDict.
SPLITS = {"train": "train", "val": "validation", "test": "test"}


# --------------------------------------------------------------------------------------------------------------
# Which file: names, sizes, URLs and checksums, all read from medmnist.INFO at call time
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MedMNIST3DSource:
    """One MedMNIST 3D file as described by `medmnist.INFO`."""

    name: str
    size: int
    filename: str
    url: str
    md5: str
    label_names: tuple[str, ...]
    n_samples: Mapping[str, int]  # MedMNIST split name (train/val/test) -> number of volumes
    task: str
    description: str
    license: str


def dataset_names() -> list[str]:
    """The MedMNIST 3D sets in `medmnist.INFO` (names ending in "3d"), in MedMNIST's order."""
    return [name for name in medmnist.INFO if name.endswith("3d")]


def _sizes(info: Mapping) -> list[int]:
    # 28 is "url"/"MD5"; every other size S is "url_S"/"MD5_S" (MedMNIST+).
    return [28] + sorted(int(key[4:]) for key in info if key.startswith("url_") and key[4:].isdigit())


def resolve_dataset(name: str = "organmnist3d", size: int = 28) -> MedMNIST3DSource:
    """Look `name` (case-insensitive) and `size` up in `medmnist.INFO`; ValueError listing the valid ones."""
    key = str(name).lower()
    if key not in dataset_names():
        raise ValueError(
            f"Unknown MedMNIST 3D dataset {name!r}; expected one of: {', '.join(dataset_names())}."
        )
    info = medmnist.INFO[key]
    sizes = _sizes(info)
    if size not in sizes:
        raise ValueError(f"{key} has no size {size!r}; expected one of: {', '.join(map(str, sizes))}.")
    suffix = "" if size == 28 else f"_{size}"
    return MedMNIST3DSource(
        name=key,
        size=size,
        filename=f"{key}{suffix}.npz",
        url=info[f"url{suffix}"],
        md5=info[f"MD5{suffix}"],
        label_names=tuple(info["label"][str(i)] for i in range(len(info["label"]))),
        n_samples=dict(info["n_samples"]),
        task=info["task"],
        description=info.get("description", ""),
        license=info.get("license", ""),
    )


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir` if given, else $VIVIT_MEDMNIST_DATA_DIR (read now), else `DEFAULT_DATA_DIR`."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _offline_vars() -> list[str]:
    # Read at call time: huggingface_hub and datasets read these once, at import.
    return [var for var in OFFLINE_ENV_VARS if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _place_by_hand(source: MedMNIST3DSource, path: Path, url: str) -> str:
    return (
        f"To place it by hand, download {url} (MD5 {source.md5}) on a machine with internet access, e.g.\n"
        f"    wget '{url}' -O '{path}'\n"
        f"or point data_dir (or ${DATA_DIR_ENV}) at a folder that holds {source.filename}, such as ~/.medmnist."
    )


# --------------------------------------------------------------------------------------------------------------
# Download: huggingface_hub's HTTP session (retries with backoff) into a temp file, MD5-checked, then os.replace
# --------------------------------------------------------------------------------------------------------------


def download_medmnist3d(
    name: str = "organmnist3d",
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    url: str | None = None,
    max_retries: int = 5,
) -> Path:
    """Download one MedMNIST 3D file into `data_dir` and return its path.

    The body is streamed, with a progress bar, into a hidden temp file in `data_dir` while its MD5 is computed;
    only a complete file with the MD5 of `medmnist.INFO` is moved (`os.replace`) to `<data_dir>/<filename>`. On
    any error the temp file is removed, so a failed download never sits where `load_medmnist3d` would read it.
    `url` overrides the address of `medmnist.INFO` (mirrors); `max_retries` bounds the retries (with exponential
    backoff) on connection errors, timeouts and 5xx answers. An existing file is replaced.
    """
    source = resolve_dataset(name, size)
    url = url or source.url
    directory = resolve_data_dir(data_dir)
    path = directory / source.filename
    if offline := _offline_vars():
        raise OSError(
            f"Cannot download {source.filename}: offline mode is on ({', '.join(offline)} set).\n"
            + _place_by_hand(source, path, url)
        )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{source.filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            got_md5 = _stream_to(f, url, source.filename, max_retries)
        if got_md5 != source.md5:
            raise OSError(
                f"Downloaded {source.filename} from {url} is corrupt: MD5 {got_md5}, expected {source.md5} "
                "(from medmnist.INFO). It was discarded; retry, or check the URL/mirror."
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _stream_to(f, url: str, filename: str, max_retries: int) -> str:
    """GET `url` into the open file `f`; return the MD5 of the bytes written. Raises OSError on any failure.

    huggingface_hub retries the request (connection errors, timeouts, 5xx) with exponential backoff. Errors
    while reading the body are caught inside the `with`: thrown into the backoff generator they would start a
    retry that its context manager cannot yield. The body is not resumed; the caller discards the partial file.
    """
    digest = hashlib.md5()
    written, expected, status, failure = 0, None, None, None
    try:
        with http_stream_backoff(
            "GET", url, max_retries=max_retries, timeout=hf_constants.HF_HUB_DOWNLOAD_TIMEOUT
        ) as response:
            status = response.status_code
            if status < 400:
                # Content-Length counts encoded bytes; with Content-Encoding httpx hands over decoded ones.
                if "Content-Length" in response.headers and "Content-Encoding" not in response.headers:
                    expected = int(response.headers["Content-Length"])
                with hf_tqdm(
                    total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=filename
                ) as bar:
                    try:
                        for chunk in response.iter_bytes(chunk_size=1 << 20):
                            f.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            bar.update(len(chunk))
                    except Exception as err:  # noqa: BLE001 -- connection closed mid-body, read timeout, disk full
                        failure = err
    except Exception as err:  # retries spent (connection errors, timeouts, 5xx); huggingface_hub offline mode
        raise OSError(f"Downloading {filename} from {url} failed: {type(err).__name__}: {err}") from err
    if status >= 400:
        raise OSError(f"Downloading {filename} from {url} failed: HTTP {status} {response.reason_phrase}.")
    if failure is not None or (expected is not None and written != expected):
        cause = f"{type(failure).__name__}: {failure}" if failure is not None else f"got {written} bytes"
        raise OSError(
            f"Downloading {filename} from {url} was cut off: expected {expected or 'more'} bytes; {cause}."
        ) from failure
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Reading: verify, validate against medmnist.INFO, and wrap the numpy buffers in Arrow without copying them
# --------------------------------------------------------------------------------------------------------------


def load_medmnist3d(
    name: str = "organmnist3d",
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    url: str | None = None,
) -> datasets.DatasetDict:
    """Load a MedMNIST 3D set as a `DatasetDict` with splits "train", "validation" and "test".

    Columns: "volume", a uint8 `Array3D` of shape (size, size, size) (depth, height, width), and "label", a
    `ClassLabel` with MedMNIST's names in label order. The dataset info carries MedMNIST's description, license,
    citation and homepage. Rows come out as numpy (`with_format("numpy")`, which reads integers as int64; the
    image processor takes those volumes as they are). The splits are plain `datasets.Dataset`s:
    `save_to_disk`, `to_iterable_dataset`, `set_format("torch")`, `with_transform` and `map` work as usual.

    The file `<data_dir>/<name>[_<size>].npz` is MD5-checked against `medmnist.INFO` on every load (a fraction
    of a second) and a mismatch is an error, never silently used or replaced. A missing file is downloaded
    unless `download=False` or offline mode is on (`HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE`/`TRANSFORMERS_OFFLINE`,
    read at call time); then the error says where to place it. Loading an existing file writes nothing, so
    `data_dir` may be read-only. `data_dir` defaults to $VIVIT_MEDMNIST_DATA_DIR, else `DEFAULT_DATA_DIR`;
    `url` overrides the download address. The volumes are decompressed into memory once and shared with Arrow
    (no copy): memory ≈ the size of the volumes.
    """
    source = resolve_dataset(name, size)
    directory = resolve_data_dir(data_dir)
    path = directory / source.filename
    if path.is_file():
        got_md5 = _md5(path)
        if got_md5 != source.md5:
            raise ValueError(
                f"{path} is corrupt or not the MedMNIST file: MD5 {got_md5}, expected {source.md5} "
                f"(from medmnist.INFO). Delete it to download it again, or replace it with {url or source.url}."
            )
        md5 = got_md5
    elif not download or _offline_vars():
        why = "download=False" if not download else f"offline mode is on ({', '.join(_offline_vars())} set)"
        raise FileNotFoundError(
            f"{source.filename} not found in {directory} and {why}.\n"
            + _place_by_hand(source, path, url or source.url)
        )
    else:
        download_medmnist3d(source.name, source.size, directory, url=url)
        md5 = source.md5  # verified while downloading
    arrays = _read_npz(path, source)
    features = datasets.Features(
        {
            VOLUME_COLUMN: datasets.Array3D(shape=(size, size, size), dtype="uint8"),
            "label": datasets.ClassLabel(names=list(source.label_names)),
        }
    )
    info = datasets.DatasetInfo(
        description=f"{source.description}\n\n{size}×{size}×{size} volumes; task: {source.task}.",
        citation=MEDMNIST_CITATION,
        homepage=MEDMNIST_HOMEPAGE,
        license=source.license,
        features=features,
        dataset_name=source.name,
        config_name=f"{size}",
    )
    splits = {}
    for split, out in SPLITS.items():
        images, labels = arrays[split]
        table = _arrow_table(images, labels, features)
        # The fingerprint must be given: hashing 300 MB of volumes to derive one would cost seconds.
        fingerprint = hashlib.sha256(f"{source.filename}:{md5}:{out}".encode()).hexdigest()[:16]
        dataset = datasets.Dataset(table, info=info, split=datasets.NamedSplit(out), fingerprint=fingerprint)
        splits[out] = dataset.with_format("numpy")
    return datasets.DatasetDict(splits)


def _read_npz(path: Path, source: MedMNIST3DSource) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read and validate the npz: keys, shapes, dtypes, split sizes and labels against `medmnist.INFO`."""
    s = source.size
    expected = f"expected MedMNIST's npz (a zip archive) with keys {_expected_keys()}"
    if not zipfile.is_zipfile(
        path
    ):  # checked first: np.load would take other bytes for a pickle and refuse it
        with open(path, "rb") as f:
            head = f.read(16)
        raise ValueError(
            f"{path} is not a readable .npz archive (truncated, or another kind of file: it starts with "
            f"{head!r}); {expected}. Delete it and download it again."
        )
    try:
        npz = np.load(path, allow_pickle=False)  # never unpickle downloaded data
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a readable .npz archive ({type(err).__name__}: {err}); {expected}."
        ) from err
    with npz:
        missing = [key for key in _expected_keys() if key not in npz.files]
        if missing:
            raise ValueError(
                f"{path} lacks keys {missing}: expected {_expected_keys()}, found {sorted(npz.files)}."
            )
        arrays = {}
        for split in SPLITS:
            try:
                images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
                raise ValueError(
                    f"{path}: cannot read the {split} arrays ({type(err).__name__}: {err})."
                ) from err
            for key, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
                if not isinstance(array, np.ndarray):  # NpzFile returns the raw bytes of a non-.npy member
                    raise ValueError(  # noqa: TRY004 -- a bad file, reported like every other one here
                        f"{path}: {key} is not a numpy array (.npy) but {type(array).__name__}."
                    )
            n = source.n_samples[split]
            if images.shape[0] != n or labels.shape[0] != n:
                raise ValueError(
                    f"{path}: the {split} split has {images.shape[0]} images and {labels.shape[0]} labels, "
                    f"expected {n} (medmnist.INFO['{source.name}']['n_samples'])."
                )
            if images.shape != (n, s, s, s) or images.dtype != np.uint8:
                raise ValueError(
                    f"{path}: {split}_images is {images.dtype} {images.shape}, expected uint8 {(n, s, s, s)}."
                )
            labels = labels.reshape(n, -1)
            if labels.shape[1] != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"{path}: {split}_labels is {labels.dtype} {labels.shape}, expected integers of shape {(n, 1)}."
                )
            labels = labels[:, 0].astype(np.int64)
            bad = labels[(labels < 0) | (labels >= len(source.label_names))]
            if bad.size:
                raise ValueError(
                    f"{path}: {split}_labels holds {sorted(set(bad.tolist()))[:5]}, expected labels in "
                    f"0..{len(source.label_names) - 1} ({', '.join(source.label_names)})."
                )
            arrays[split] = (images, labels)
    return arrays


def _expected_keys() -> list[str]:
    return [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]


def _arrow_table(images: np.ndarray, labels: np.ndarray, features: datasets.Features) -> pa.Table:
    """An Arrow table whose pixel_values column shares `images`' memory (no copy).

    `datasets.Array3D` stores a volume as list<list<list<uint8>>> (variable-size lists, in an extension type).
    The values buffer is the numpy buffer itself; only the offsets (4 bytes per row of S voxels) are new.
    The schema is exactly `features.arrow_schema`, so `datasets.Dataset` has nothing to cast (a cast would copy).
    """
    n, d, h, w = images.shape
    if images.size >= 2**31:  # list offsets are int32
        raise ValueError(f"{images.shape} volumes do not fit in one Arrow list array (2**31 values at most).")
    flat = np.ascontiguousarray(images).reshape(-1)
    storage = pa.Array.from_buffers(pa.uint8(), flat.size, [None, pa.py_buffer(flat)])
    for rows, length in ((n * d * h, w), (n * d, h), (n, d)):
        offsets = pa.array(np.arange(0, (rows + 1) * length, length, dtype=np.int32))
        storage = pa.ListArray.from_arrays(offsets, storage)
    schema = features.arrow_schema
    volumes = pa.ExtensionArray.from_storage(schema.field(VOLUME_COLUMN).type, storage)
    return pa.Table.from_arrays([volumes, pa.array(labels, pa.int64())], schema=schema)


# --------------------------------------------------------------------------------------------------------------
# Collator: dataset rows -> model inputs, through the package's image processor
# --------------------------------------------------------------------------------------------------------------


class MedMNIST3DCollator:
    """Turn dataset rows into a batch for `VivitMedmnistForVolumeClassification`.

    Returns `{"pixel_values": float32 (B, D, 1, H, W) scaled to [0, 1], "labels": int64 (B,)}` (float32
    (B, classes) where the rows' labels are class weights, as mixed training volumes have). Preprocessing
    is done by `image_processor` (a default `VivitMedmnistImageProcessor` if None), so that training and
    inference share one definition of it. Rows need "volume" (integer volumes with values 0..255, as numpy
    arrays, tensors or nested lists) and "label" (or "labels"); other keys are ignored.

    With `Trainer`, pass it as `data_collator=MedMNIST3DCollator()` with `TrainingArguments(
    remove_unused_columns=False)`, as for any raw-image column: the Trainer would otherwise drop "volume", which
    is not an argument of the model's `forward`.
    """

    def __init__(self, image_processor=None):
        if image_processor is None:
            from .image_processing_vivit_medmnist import VivitMedmnistImageProcessor

            image_processor = VivitMedmnistImageProcessor()
        self.image_processor = image_processor

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        import torch

        volumes = np.stack([np.asarray(row[VOLUME_COLUMN]) for row in rows])
        if volumes.dtype != np.uint8:
            # e.g. rows read without the numpy format (Python lists -> int64): accept values that are uint8.
            if not np.issubdtype(volumes.dtype, np.integer) or volumes.min() < 0 or volumes.max() > 255:
                raise ValueError(
                    f"{VOLUME_COLUMN} must be uint8 volumes (0..255), got {volumes.dtype} with values in "
                    f"[{volumes.min()}, {volumes.max()}]."
                )
            volumes = volumes.astype(np.uint8)
        labels = np.asarray([row["label"] if "label" in row else row["labels"] for row in rows])
        batch = self.image_processor(volumes, return_tensors="pt")
        if labels.ndim == 2 and np.issubdtype(labels.dtype, np.floating):  # class weights (vivit_medmnist.mixing)
            return {"pixel_values": batch["pixel_values"], "labels": torch.as_tensor(labels, dtype=torch.float32)}
        return {
            "pixel_values": batch["pixel_values"],
            "labels": torch.as_tensor(labels.reshape(len(rows)), dtype=torch.long),
        }
