"""Reading volume files: `.npy`, `.npz` and NIfTI (`.nii`, `.nii.gz`), never unpickling anything.

```python
from vivit_medmnist.volume_files import load_arrays, load_nifti

load_arrays(Path("scan.nii.gz"), key=None)  # [(None, array (D, H, W))]
load_arrays(Path("batch.npz"), key=None)  # [(name, array), ...] for every array of the archive
```

Used by `vivit-medmnist-predict`, the demo and the volume-folder loader. NIfTI needs nibabel (the `nifti`
extra). Every failure is an `InputError` naming the file, what was expected and what came.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

__all__ = ["NIFTI_SUFFIXES", "InputError", "is_nifti", "load_arrays", "load_nifti", "nifti_header"]


class InputError(ValueError):
    """A file that cannot be labelled; the message says what was expected and what came."""


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


def nifti_header(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The affine (4 x 4) and the voxel spacing (the first three zooms) of a NIfTI file."""
    import nibabel

    image = nibabel.load(path)
    return np.asarray(image.affine), tuple(float(z) for z in image.header.get_zooms()[:3])
