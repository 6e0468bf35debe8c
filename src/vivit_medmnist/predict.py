"""Label 3D volumes stored as .npy / .npz / NIfTI files with a saved (or Hub) ViViT-MedMNIST model.

    vivit-medmnist-predict --model_name_or_path outputs/organmnist3d scan.npy batch.npz crop.nii.gz --top_k 3

Each array is one volume `(D, H, W)` or a batch `(N, D, H, W)`, uint8 (0..255, as MedMNIST stores them; other
integer types with values in 0..255 too) or floating point already scaled to [0, 1]. `D, H, W` must be the
model's `volume_size`, unless `--resize` (always for NIfTI) resizes it trilinearly with the model's processor.
A `.npz` contributes every array it holds, or only the one named by `--key`. Files are read with
`np.load(allow_pickle=False)`: pickled content (object arrays, pickles renamed .npy) is refused, never
unpickled. `.nii` / `.nii.gz` files are read with nibabel (`pip install 'vivit-medmnist[nifti]'`) as stored:
the first axis of the image array is taken as D.

What MedMNIST did to its volumes, which yours must match: each is a crop around the structure of interest
(OrganMNIST3D: CT mapped to grey levels with an abdominal window, then cropped to one organ's 3D bounding box),
resized to 28^3 (or 64^3), stored as uint8 0..255 (mask sets such as AdrenalMNIST3D hold only 0 and 255). A
raw scan in Hounsfield units is refused (floats outside [0, 1]): window and scale it first.

For every volume it prints the predicted label and the `--top_k` labels with their probabilities (softmax of
the logits); `--output_file` also writes them as JSON: a list of
`{"file", "key", "index", "label", "label_id", "top_k": [{"label", "label_id", "probability"}, ...]}`
(`key` is the array's name in a .npz, else null; `index` the position in a batch, else null).
"""

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForVideoClassification

import vivit_medmnist  # noqa: F401 -- registers the model with the Auto classes
from vivit_medmnist.publishing import check_model_path
from vivit_medmnist.safe_io import check_new_output, write_text_atomic


class InputError(ValueError):
    """A file that cannot be labelled; the message says what was expected and what came."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[3],  # what MedMNIST's preprocessing was
    )
    parser.add_argument(
        "files",
        nargs="+",
        help=".npy or .npz files of volumes (D, H, W) or batches (N, D, H, W), or .nii / .nii.gz volumes",
    )
    parser.add_argument(
        "--resize",
        action="store_true",
        help="resize volumes of another size to the model's volume_size (trilinear); NIfTI volumes always are",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="a folder written by vivit-medmnist-train or a Hub id"
    )
    parser.add_argument("--top_k", type=int, default=3, help="how many labels to list per volume (default 3)")
    parser.add_argument("--key", default=None, help="in .npz files, label only this array")
    parser.add_argument(
        "--output_file", default=None, help="also write the predictions as JSON (a new file; never an input)"
    )
    parser.add_argument(
        "--overwrite_output_file", action="store_true", help="allow --output_file to replace an existing file"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="volumes per forward pass (default 32)")
    parser.add_argument("--revision", default="main", help="the Hub revision of the model (default main)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    return args


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def load_nifti(path: Path) -> np.ndarray:
    """The image array of a NIfTI file, in its stored dtype and axis order (a trailing length-1 axis dropped)."""
    try:
        import nibabel
    except ImportError:
        raise InputError(
            f"{path}: reading NIfTI needs nibabel: pip install 'vivit-medmnist[nifti]'"
        ) from None
    try:
        array = np.asanyarray(
            nibabel.load(path).dataobj
        )  # the stored values, scaled only if the header says so
    except Exception as err:
        raise InputError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 3D NIfTI volume, got an image of shape {array.shape}")
    return array


def load_arrays(path: Path, key: str | None) -> list[tuple[str | None, np.ndarray]]:
    """[(key or None, array)] from a .npy, .npz or NIfTI file, never unpickling anything."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if is_nifti(path):
        if key is not None:
            raise InputError(f"{path}: --key {key!r} applies to .npz files only")
        return [(None, load_nifti(path))]
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(
            f"{path}: expected a .npy, .npz, .nii or .nii.gz file, got {suffix or 'no extension'!r}"
        )
    if suffix == ".npy" and key is not None:
        raise InputError(f"{path}: --key {key!r} applies to .npz files only")
    try:
        loaded = np.load(path, allow_pickle=False)  # decides by content: an ndarray or an NpzFile
        if suffix == ".npy":
            if not isinstance(loaded, np.ndarray):
                loaded.close()
                raise InputError(f"{path}: expected a .npy array, got a .npz archive (rename it to .npz)")
            return [(None, loaded)]
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: expected a .npz archive, got a single .npy array (rename it to .npy)")
        with loaded as npz:
            if key is not None and key not in npz.files:
                raise InputError(f"{path}: no array named {key!r}; the file holds {sorted(npz.files)}")
            keys = [key] if key is not None else list(npz.files)
            if not keys:
                raise InputError(f"{path}: the archive holds no arrays")
            arrays = [(k, npz[k]) for k in keys]
            for k, array in arrays:
                if not isinstance(array, np.ndarray):  # NpzFile returns the raw bytes of a non-.npy member
                    raise InputError(
                        f"{path}: member {k!r} is not a numpy array (.npy) but {type(array).__name__}"
                    )
            return arrays
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        if "pickle" in str(err).lower():
            raise InputError(
                f"{path}: holds pickled data (e.g. an object array); refusing to unpickle it. Save the volumes "
                "as a numeric array: np.save(path, volumes.astype(np.uint8))"
            ) from err
        raise InputError(f"{path}: not a readable numpy file ({err})") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"{path}: not a readable numpy file ({type(err).__name__}: {err})") from err


def as_batch(array: np.ndarray, volume_size: list[int], where: str, resize: bool = False) -> np.ndarray:
    """(D, H, W) or (N, D, H, W) -> (N, D, H, W), with an error naming the expected shape (any size when
    `resize`)."""
    expected = tuple(volume_size)
    if array.ndim == 3 and (resize or array.shape == expected):
        return array[None]
    if array.ndim == 4 and (resize or array.shape[1:] == expected) and array.shape[0] > 0:
        return array
    raise InputError(
        f"{where}: expected one volume {expected} or a batch (N, {', '.join(map(str, expected))}), "
        f"got shape {array.shape}" + ("" if resize else " (--resize resizes volumes of another size)")
    )


def preprocess(
    processor, array: np.ndarray, volume_size: list[int], where: str, resize: bool = False
) -> torch.Tensor:
    """The model's pixel_values for a file's array; the processor's dtype and value checks, named by file."""
    batch = as_batch(array, volume_size, where, resize)
    resizing = {"do_resize": True, "size": list(volume_size)} if resize else {}
    try:
        return processor(batch, return_tensors="pt", **resizing)["pixel_values"]
    except ValueError as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{where}: {err}") from err


@torch.no_grad()
def predict(model, pixel_values: torch.Tensor, top_k: int, batch_size: int) -> list[list[tuple[int, float]]]:
    """[(label id, probability)] * top_k for every volume of the batch, most probable first."""
    results = []
    for start in range(0, len(pixel_values), batch_size):
        logits = model(pixel_values=pixel_values[start : start + batch_size].to(model.device)).logits
        probabilities = logits.float().softmax(dim=-1)
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        results += [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    if message := check_model_path(args.model_name_or_path):
        sys.exit(f"error: {message}")
    if args.output_file:
        try:
            check_new_output(args.output_file, args.overwrite_output_file, args.files)
        except FileExistsError as err:
            sys.exit(f"error: {err}")
    try:
        model = AutoModelForVideoClassification.from_pretrained(
            args.model_name_or_path, revision=args.revision
        )
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, revision=args.revision)
    except (OSError, ValueError, KeyError) as err:
        sys.exit(f"error: cannot load a model and image processor from {args.model_name_or_path!r}: {err}")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    id2label = model.config.id2label

    try:  # read and check every file before running the model, so a bad file fails fast
        inputs = []
        for name in args.files:
            for key, array in load_arrays(Path(name), args.key):
                where = name if key is None else f"{name}[{key}]"
                resize = args.resize or is_nifti(Path(name))
                pixel_values = preprocess(processor, array, model.config.volume_size, where, resize)
                inputs.append((name, key, array.ndim == 4, pixel_values))
    except InputError as err:
        sys.exit(f"error: {err}")

    records = []
    for name, key, is_batch, pixel_values in inputs:
        for index, top in enumerate(predict(model, pixel_values, args.top_k, args.batch_size)):
            record = {
                "file": name,
                "key": key,
                "index": index if is_batch else None,
                "label": id2label[top[0][0]],
                "label_id": top[0][0],
                "top_k": [{"label": id2label[i], "label_id": i, "probability": p} for i, p in top],
            }
            records.append(record)
            where = name + (f"[{key}]" if key is not None else "") + (f"[{index}]" if is_batch else "")
            ranking = ", ".join(f"{id2label[i]} {p:.4f}" for i, p in top)
            print(f"{where}: {record['label']}  (top-{len(top)}: {ranking})")
    if args.output_file:
        try:
            write_text_atomic(args.output_file, json.dumps(records, indent=2) + "\n")
        except OSError as err:
            sys.exit(f"error: cannot write --output_file {args.output_file}: {err}")


if __name__ == "__main__":
    main()
