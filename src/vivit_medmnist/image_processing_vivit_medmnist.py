"""Image processor for ViViT-MedMNIST: raw 3D volumes -> `pixel_values` of shape (batch, D, 1, H, W).

This file is copied next to the weights by `save_pretrained`, so it imports only numpy, torch and transformers.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs


class VivitMedmnistImageProcessorKwargs(ImagesKwargs, total=False):
    """The options `from_dict` / `from_pretrained` accept (all are standard `ImagesKwargs` keys)."""


class VivitMedmnistImageProcessor(BaseImageProcessor):
    r"""
    Turns raw MedMNIST-style volumes into the `pixel_values` that `VivitMedmnistModel` expects.

    A volume is a "video" whose first axis is time (frames = depth). The processor adds the channel axis,
    converts to `float32` and rescales integers, as the Keras reference does (`uint8 / 255`). It resizes only when
    asked (`do_resize=True` with `size`, trilinear): the model's `volume_size` is fixed by its position
    embeddings, and the model raises a clear error on a size mismatch.

    Accepted inputs (numpy arrays or torch tensors, or a list/tuple of volumes, of equal shapes unless resized):

    - one volume `(D, H, W)` -> `pixel_values` `(1, D, 1, H, W)`;
    - a batch `(N, D, H, W)` -> `(N, D, 1, H, W)`;
    - a batch that already has a singleton channel axis, channels-last `(N, D, H, W, 1)` (the layout of
      `keras`/`tf` arrays) -> `(N, D, 1, H, W)`.

    dtypes: `uint8` volumes, and volumes of another integer type whose values all lie in 0..255 (e.g. the int64
    of a `datasets` column read without a format), are multiplied by `rescale_factor` (1/255) when `do_rescale` is
    set; floating volumes must already be scaled to [0, 1] and are only cast to `float32` (a `float32` input is
    returned without a copy, as a view of the caller's memory, unless `do_normalize` is set). Each volume of a
    list is converted on its own, so a list may mix dtypes. A floating volume with values outside [0, 1] (or
    NaN/inf), an integer volume outside 0..255 and any other dtype (bool, complex) raise a `ValueError` naming
    what came: silently guessing the intensity range of, e.g., raw Hounsfield units would be wrong. With
    `do_rescale=False` nothing is scaled and floating volumes are passed through unchecked.

    Args:
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply `uint8` volumes by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            The factor applied to `uint8` volumes.
        do_normalize (`bool`, *optional*, defaults to `False`):
            Whether to apply `(x - image_mean) / image_std` after rescaling (the reference does not).
        image_mean (`float`, *optional*, defaults to `0.0`):
            The mean subtracted when `do_normalize` is set (one value: the volumes have one channel).
        image_std (`float`, *optional*, defaults to `1.0`):
            The standard deviation divided by when `do_normalize` is set.
        do_resize (`bool`, *optional*, defaults to `False`):
            Whether to resize every volume to `size` (trilinear interpolation of the scaled intensities, e.g. a
            64³ volume for a 28³ model).
        size (`int`, `list[int]` or `dict`, *optional*):
            The `(D, H, W)` to resize to (an int means a cube; `{"depth", "height", "width"}` is accepted too).
        intensity_window (`list[float]`, *optional*):
            `(low, high)`: a fixed window for raw intensities, e.g. `(-160, 240)` Hounsfield units for abdominal CT:
            values are clipped to it and mapped linearly to [0, 1], whatever their dtype. Replaces the
            uint8 / float checks and `do_rescale`.
        percentile_window (`list[float]`, *optional*):
            `(low, high)` percentiles, e.g. `(0.5, 99.5)` for MRI, whose intensities have no fixed scale: each
            volume is clipped to its own percentiles and mapped linearly to [0, 1]. Not together with
            `intensity_window`.
        keep_aspect_ratio (`bool`, *optional*, defaults to `False`):
            Resize (to `size`) without distorting: the volume is first padded with zeros to a cube, in physical
            units when the call gives each volume's voxel `spacing` (e.g. from a NIfTI header), then resized.

    With `intensity_window` or `percentile_window`, the result is rounded to the 256 levels of a uint8 volume
    (`k / 255`): how `vivit_medmnist.volume_folder` stores the volumes a model trains on, so that a raw volume
    given here is exactly what training saw. With none of the three options, nothing changes: a MedMNIST volume
    is `uint8 / 255`.

    Example:

    ```python
    >>> import numpy as np
    >>> from vivit_medmnist import VivitMedmnistImageProcessor
    >>> volumes = np.zeros((4, 28, 28, 28), dtype=np.uint8)
    >>> VivitMedmnistImageProcessor()(volumes, return_tensors="pt")["pixel_values"].shape
    torch.Size([4, 28, 1, 28, 28])
    ```
    """

    valid_kwargs = VivitMedmnistImageProcessorKwargs
    model_input_names: ClassVar[list[str]] = ["pixel_values"]

    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = False
    image_mean = 0.0
    image_std = 1.0
    do_resize = False
    size = None
    intensity_window = None
    percentile_window = None
    keep_aspect_ratio = False

    def __init__(
        self,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: float = 0.0,
        image_std: float = 1.0,
        do_resize: bool = False,
        size: int | list[int] | dict[str, int] | None = None,
        intensity_window: list[float] | None = None,
        percentile_window: list[float] | None = None,
        keep_aspect_ratio: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _scalar(image_mean, "image_mean")
        self.image_std = _scalar(image_std, "image_std")
        if self.image_std == 0:
            raise ValueError("image_std must be non-zero.")
        self.do_resize = bool(do_resize)
        self.size = None if size is None else _volume_size(size)
        if self.do_resize and self.size is None:
            raise ValueError(
                "do_resize=True needs size, the (D, H, W) to resize volumes to (e.g. 28 or [28, 28, 28])"
            )
        self.intensity_window = _window(intensity_window, "intensity_window")
        self.percentile_window = _window(percentile_window, "percentile_window", (0.0, 100.0))
        if self.intensity_window and self.percentile_window:
            raise ValueError("give intensity_window (CT) or percentile_window (MRI), not both")
        self.keep_aspect_ratio = bool(keep_aspect_ratio)
        if self.keep_aspect_ratio and self.size is None:
            raise ValueError("keep_aspect_ratio=True needs size, the (D, H, W) of the model's volumes")

    def preprocess(
        self,
        images: np.ndarray | torch.Tensor | list | tuple,
        return_tensors: str | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | None = None,
        image_std: float | None = None,
        do_resize: bool | None = None,
        size: int | list[int] | dict[str, int] | None = None,
        data_format: str | None = None,
        input_data_format: str | None = None,
        spacing: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Convert `images` (one volume, a batch, or a list of volumes, see the class docstring) to
        `{"pixel_values": ...}`.

        `return_tensors`: `"pt"` gives one tensor `(N, D, 1, H, W)`, `"np"` one array, and `None` (the default, as
        for transformers' image processors) a list of one `(D, 1, H, W)` tensor per volume. `data_format` and
        `input_data_format` are accepted as in other image processors: the output is channels-first per frame
        (`"channels_first"`), and a volume's layout is read from its shape. `spacing`: the voxel size (D, H, W),
        one for all volumes or one per volume, used by `keep_aspect_ratio` (default: isotropic). The other
        arguments override the processor's attributes for this call.
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected arguments {sorted(kwargs)}")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else _scalar(image_mean, "image_mean")
        image_std = self.image_std if image_std is None else _scalar(image_std, "image_std")
        do_resize = self.do_resize if do_resize is None else do_resize
        size = self.size if size is None else _volume_size(size)
        if do_resize and size is None:
            raise ValueError("do_resize=True needs size, the (D, H, W) to resize volumes to")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")
        if data_format not in (None, "channels_first"):
            raise ValueError(
                f"data_format: pixel_values are (N, D, C, H, W), channels first; got {data_format!r}"
            )
        if input_data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(
                f"input_data_format must be channels_first or channels_last, got {input_data_format!r}"
            )

        windowed = bool(self.intensity_window or self.percentile_window)
        if self.keep_aspect_ratio and size is None:
            raise ValueError("keep_aspect_ratio=True needs size, the (D, H, W) of the model's volumes")

        def convert(volumes: torch.Tensor, voxel_spacing=None) -> torch.Tensor:
            """(n, D, H, W) of any accepted dtype -> float32, scaled and resized."""
            if windowed:
                volumes = _apply_window(volumes, self.intensity_window, self.percentile_window)
            else:
                volumes = _to_float32(volumes, rescale_factor if do_rescale else None)
            if self.keep_aspect_ratio:
                volumes = _pad_to_cube_and_resize(volumes, size, voxel_spacing)
            elif do_resize:
                volumes = _resize(volumes, size)
            # the 256 levels the training volumes were stored in (volume_folder): exactly what training saw
            return volumes.mul(255).round_().div_(255) if windowed else volumes

        if isinstance(images, (list, tuple)) and all(
            isinstance(i, (np.ndarray, torch.Tensor)) for i in images
        ):
            if len(images) == 0:
                raise ValueError("expected at least one volume, got an empty list")
            spacings = _spacings(spacing, len(images))
            # each on its own: dtypes (and, when resizing, sizes) may differ
            parts = [convert(_as_batch(_as_tensor(image)), sp) for image, sp in zip(images, spacings)]
            shapes = {tuple(part.shape[1:]) for part in parts}
            if len(shapes) != 1:
                raise ValueError(
                    f"all volumes of a batch must have the same shape, got shapes {sorted(shapes)} (do_resize=True "
                    "with a size makes them one)"
                )
            volumes = torch.cat(parts)
        else:
            volumes = _as_batch(_as_tensor(images))
            spacings = _spacings(spacing, len(volumes))
            if self.keep_aspect_ratio and len(set(map(tuple, spacings))) > 1:
                volumes = torch.cat([convert(v[None], sp) for v, sp in zip(volumes, spacings)])
            else:
                volumes = convert(volumes, spacings[0] if spacings else None)
        pixel_values = volumes[:, :, None]  # (N, D, 1, H, W): a view
        if do_normalize:
            # a new tensor: a float32 input comes through `convert` as the caller's own memory
            pixel_values = (pixel_values - image_mean) / image_std

        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": pixel_values.numpy()}, tensor_type="np")
        if return_tensors is None:
            return BatchFeature(data={"pixel_values": list(pixel_values)})
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type="pt")

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


def _volume_size(size: Any) -> list[int]:
    """An int (a cube), a sequence of 3 ints or a {"depth", "height", "width"} dict -> [D, H, W]."""
    if isinstance(size, dict):
        size = [size.get(key) for key in ("depth", "height", "width")]
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size] * 3
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise ValueError(f"size must be a positive int or 3 of them (D, H, W), got {size!r}")
    return [int(n) for n in size]


def _resize(volumes: torch.Tensor, size: list[int]) -> torch.Tensor:
    """(n, D, H, W) float -> (n, *size), trilinear (align_corners=False, as transformers resizes positions)."""
    if list(volumes.shape[1:]) == size or volumes.shape[0] == 0:
        return volumes if volumes.shape[0] else volumes.new_zeros((0, *size))
    resized = torch.nn.functional.interpolate(
        volumes[:, None], size=size, mode="trilinear", align_corners=False
    )
    return resized[:, 0]


def _window(value: Any, name: str, bounds: tuple[float, float] | None = None) -> list[float] | None:
    """None, or a (low, high) pair of finite floats with low < high (within `bounds`)."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be (low, high) with low < high, got {value!r}")
    if bounds and not (bounds[0] <= low and high <= bounds[1]):
        raise ValueError(f"{name} must lie within {list(bounds)}, got {value!r}")
    return [low, high]


def _apply_window(volumes: torch.Tensor, window, percentiles) -> torch.Tensor:
    """(n, D, H, W) raw intensities -> float32 in [0, 1]: clipped to the fixed `window`, or to each volume's own
    `percentiles`, and mapped linearly."""
    if volumes.dtype == torch.bool or volumes.is_complex():
        raise ValueError(f"expected a volume of intensities, got dtype {volumes.dtype}")
    volumes = volumes.to(torch.float32)
    if volumes.numel() and not torch.isfinite(volumes).all():
        raise ValueError("expected finite intensities, got NaN or inf")
    if window is not None:
        low = torch.full((len(volumes), 1, 1, 1), window[0])
        high = torch.full_like(low, window[1])
    else:
        flat = volumes.reshape(len(volumes), -1)
        q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100])
        bounds = torch.quantile(flat, q, dim=1)  # (2, n)
        low, high = bounds[0].view(-1, 1, 1, 1), bounds[1].view(-1, 1, 1, 1)
    span = (high - low).clamp(min=1e-12)  # a constant volume maps to 0
    return ((volumes.clamp(min=low, max=high) - low) / span).clamp_(0, 1)


def _spacings(spacing: Any, count: int) -> list[tuple[float, float, float]]:
    """One (D, H, W) voxel spacing per volume: `None` (isotropic), one triple for all, or one per volume."""
    if spacing is None:
        return [(1.0, 1.0, 1.0)] * count
    values = np.asarray(spacing, dtype=np.float64)
    if values.shape == (3,):
        values = np.tile(values, (count, 1))
    if values.shape != (count, 3) or not np.all(values > 0):
        raise ValueError(f"spacing must be 3 positive numbers (D, H, W), or one such triple per volume; got {spacing!r}")
    return [tuple(row) for row in values.tolist()]


def _pad_to_cube_and_resize(volumes: torch.Tensor, size: list[int], spacing) -> torch.Tensor:
    """(n, D, H, W) -> (n, *size) without distortion: scaled so that its longest physical side (shape x spacing)
    fills `size`, the other sides in proportion, then zero-padded around the centre."""
    extent = [n * s for n, s in zip(volumes.shape[1:], spacing or (1.0, 1.0, 1.0))]
    longest = max(e / t for e, t in zip(extent, size))
    inner = [max(1, min(t, round(e / longest))) for e, t in zip(extent, size)]
    resized = _resize(volumes, inner)
    before = [(t - n) // 2 for t, n in zip(size, inner)]
    padding = []
    for b, t, n in zip(reversed(before), reversed(size), reversed(inner)):
        padding += [b, t - n - b]
    return torch.nn.functional.pad(resized, padding)


def _scalar(value: Any, name: str) -> float:
    """A single float; a one-element list (the usual `image_mean` format) is accepted too."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{name} must be one value (the volumes have one channel), got {value!r}")
        value = value[0]
    return float(value)


def _as_tensor(images: Any) -> torch.Tensor:
    """numpy / torch / list of volumes -> one torch tensor, without copying when possible."""
    if isinstance(images, torch.Tensor):
        return images.detach()
    if isinstance(images, np.ndarray):
        return _from_numpy(images)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("expected at least one volume, got an empty list")
        return _from_numpy(np.asarray(images))  # nested Python lists (their ints become int64)
    raise ValueError(f"expected a numpy array, a torch tensor or a list of them, got {type(images).__name__}")


def _to_float32(volumes: torch.Tensor, rescale_factor: float | None) -> torch.Tensor:
    """Integer volumes (values 0..255) times `rescale_factor`, or float volumes checked to lie in [0, 1], as
    float32; `rescale_factor=None` (no rescaling): cast only."""
    if volumes.dtype == torch.bool or volumes.is_complex():
        raise ValueError(
            f"expected uint8 volumes (0..255) or floats scaled to [0, 1], got dtype {volumes.dtype}"
        )
    if rescale_factor is None or volumes.numel() == 0:
        return volumes.to(torch.float32)
    if volumes.is_floating_point():
        low, high = volumes.min().item(), volumes.max().item()
        if not (0.0 <= low and high <= 1.0):  # NaN fails both comparisons
            raise ValueError(
                f"expected float volumes scaled to [0, 1] (or uint8 volumes, 0..255), got values in [{low}, {high}]"
                + (" (NaN or inf)" if not (math.isfinite(low) and math.isfinite(high)) else "")
                + "; scale them first (e.g. uint8 / 255), or pass do_rescale=False if the model expects them as is"
            )
        return volumes.to(torch.float32)
    if volumes.dtype != torch.uint8:
        low, high = volumes.min().item(), volumes.max().item()
        if low < 0 or high > 255:
            raise ValueError(
                f"expected uint8 volumes (0..255) or floats scaled to [0, 1], got {volumes.dtype} values in "
                f"[{low}, {high}]; window and scale them to 0..255 (MedMNIST stores uint8) first"
            )
    # the training collator calls this on every batch: one float32 copy, then an in-place scale
    return volumes.to(torch.float32).mul_(rescale_factor)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == object:
        raise ValueError("expected a numeric array, got dtype object (volumes of different shapes?)")
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        # torch.from_numpy refuses negative strides and warns on read-only memory (e.g. np.load(mmap_mode="r")).
        array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
    return torch.from_numpy(array)


def _as_batch(volumes: torch.Tensor) -> torch.Tensor:
    """(D,H,W) / (N,D,H,W) / (N,D,H,W,1) -> (N, D, H, W) (a view, no copy)."""
    if volumes.ndim == 3:
        return volumes[None]
    if volumes.ndim == 4:
        return volumes
    if volumes.ndim == 5 and volumes.shape[-1] == 1:
        return volumes[..., 0]
    raise ValueError(
        "expected one volume (D, H, W), a batch (N, D, H, W) or a channels-last batch (N, D, H, W, 1), got shape "
        f"{tuple(volumes.shape)}"
        + (
            " (already (N, D, C, H, W) pixel_values? pass them to the model directly)"
            if volumes.ndim == 5
            else ""
        )
    )


__all__ = ["VivitMedmnistImageProcessor"]
