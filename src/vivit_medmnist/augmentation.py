"""Training-time augmentation of uint8 volumes: flips, rotations, shifts and intensity jitter (and the mixing of
`mixing.py`, applied by `AugmentedDataset`).

Augmentation is seeded by (seed, epoch, volume index), never by a global RNG, so a run resumed from a checkpoint
(even one saved mid-epoch) sees exactly the volumes the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation
from transformers import TrainerCallback

from .data import VOLUME_COLUMN
from .mixing import mix_volumes


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
        out = shift_volume(out, rng.integers(-max_shift, max_shift + 1, size=3))
    if intensity_scale > 0 or intensity_shift > 0:
        scale = rng.uniform(1 - intensity_scale, 1 + intensity_scale)
        offset = rng.uniform(-intensity_shift, intensity_shift) * 255
        out = np.clip(np.rint(out.astype(np.float32) * scale + offset), 0, 255)
    return np.ascontiguousarray(out, dtype=np.uint8)


def shift_volume(volume: np.ndarray, shifts) -> np.ndarray:
    """`volume` (D, H, W) moved by `shifts` voxels along each axis, zero-filled: nothing wraps around."""
    reach = int(max(abs(int(s)) for s in shifts))
    if reach == 0:
        return volume
    padded = np.pad(volume, reach)
    starts = [reach - int(s) for s in shifts]
    return padded[tuple(slice(s, s + n) for s, n in zip(starts, volume.shape))]


def tta_shifts(reach: int) -> list[tuple[int, int, int]]:
    """The label-safe test-time views: the volume itself and its shifts by `reach` voxels along each axis, both
    ways (7 views; `reach` 0: the volume alone)."""
    views = [(0, 0, 0)]
    for axis in range(3):
        for sign in (1, -1):
            if reach:
                views.append(tuple(sign * reach if a == axis else 0 for a in range(3)))
    return views


# the options of `augment_volume` that turn an augmentation on (rotation_interpolation only says how)
AUGMENTATIONS = ("flip_axes", "max_rotation", "max_shift", "intensity_scale", "intensity_shift")
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
    """A dataset whose item i in epoch e is row i augmented with `np.random.default_rng([seed, e, i])` (and, with
    `mixing`, mixed with an augmented partner row as `default_rng([seed, e, i, 1])` draws it: `vivit_medmnist.mixing`;
    its label is then a vector of `num_labels` class weights).

    Being a function of (seed, epoch, index) only, the augmentation does not depend on which process reads the row,
    on data-loader workers, or on whether the run was resumed. `set_epoch` is called by `EpochCallback` (accelerate's
    data loader calls it too, but not for every sampler set-up, e.g. not under DDP).

    The volumes and labels are read from `dataset` (a `datasets.Dataset` or a sequence of rows) once, into two
    arrays: reading a row through Arrow costs about as much per step as everything else around the model step
    (benchmarks/README.md, overhead.py). With no augmentation on, a row's volume is a view of that array.
    """

    def __init__(
        self, dataset, seed: int, mixing: dict | None = None, num_labels: int | None = None, **augmentation
    ):
        if hasattr(dataset, "with_format"):  # a datasets.Dataset: one read of each column
            columns = dataset.with_format("numpy", dtype=np.uint8)[:]
            self.volumes, self.labels = columns[VOLUME_COLUMN], columns["label"].astype(np.int64)
        else:
            self.volumes = np.stack([np.asarray(row[VOLUME_COLUMN], dtype=np.uint8) for row in dataset])
            self.labels = np.asarray([row["label"] for row in dataset], dtype=np.int64)
        self.seed = seed
        # `mixing.mix_volumes`'s options: labels become class weights over `num_labels` classes
        self.mixing = mixing or {}
        self.num_labels = num_labels or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        self.augmentation = augmentation
        self.augments = any(augmentation.get(key) for key in AUGMENTATIONS)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        volume = self._augmented(index)
        if not self.mixing:
            return {VOLUME_COLUMN: volume, "label": self.labels[index]}
        # its own generator: the augmentation draws what it drew without mixing
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])
        partner = int(rng.integers(len(self)))
        volume, lam = mix_volumes(volume, self._augmented(partner), rng, **self.mixing)
        weights = np.zeros(self.num_labels, dtype=np.float32)
        weights[self.labels[index]] += lam
        weights[self.labels[partner]] += 1.0 - lam
        return {VOLUME_COLUMN: volume, "label": weights}

    def _augmented(self, index: int) -> np.ndarray:
        volume = self.volumes[index]
        if self.augments:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            volume = augment_volume(volume, rng, **self.augmentation)
        return volume


class EpochCallback(TrainerCallback):
    """Tells the dataset the epoch that starts: `state.epoch` counts finished epochs (fractional after a
    mid-epoch checkpoint, e.g. 1.5 when resuming in the middle of the second epoch)."""

    def __init__(self, dataset: AugmentedDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch))
