"""Training-time augmentation of uint8 volumes: flips, rotations, shifts and intensity jitter.

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
