"""Image processor for ViViT-MedMNIST: raw 3D volumes -> `pixel_values` of shape (batch, D, 1, H, W).

This file is copied next to the weights by `save_pretrained`, so it imports only numpy, torch and transformers.
"""

from __future__ import annotations

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

    A volume is a "video" whose first axis is time (frames = depth). The processor only adds the channel axis,
    converts to `float32` and rescales integers, as the Keras reference does (`uint8 / 255`); it never resizes
    (the model's `volume_size` is fixed by its position embeddings, and the model itself raises a clear error on
    a size mismatch).

    Accepted inputs (numpy arrays or torch tensors, or a list/tuple of equally shaped volumes):

    - one volume `(D, H, W)` -> `pixel_values` `(1, D, 1, H, W)`;
    - a batch `(N, D, H, W)` -> `(N, D, 1, H, W)`;
    - a batch that already has a singleton channel axis, channels-last `(N, D, H, W, 1)` (the layout of
      `keras`/`tf` arrays) -> `(N, D, 1, H, W)`.

    dtypes: `uint8` volumes are multiplied by `rescale_factor` (1/255) when `do_rescale` is set; floating volumes
    are assumed to be already scaled and are only cast to `float32` (a `float32` input is returned without a
    copy, as a view of the caller's memory, unless `do_normalize` is set). Any other dtype (bool, int16, int64, ...)
    raises a `ValueError`, because silently guessing the intensity range of, e.g., raw Hounsfield units would be
    wrong.

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

    def __init__(
        self,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        image_mean: float = 0.0,
        image_std: float = 1.0,
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

    def preprocess(
        self,
        images: np.ndarray | torch.Tensor | list | tuple,
        return_tensors: str | None = "pt",
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | None = None,
        image_std: float | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Convert `images` (one volume or a batch, see the class docstring) to `{"pixel_values": ...}`.

        `return_tensors` is `"pt"` (default, also used for `None`) or `"np"`. The other arguments override the
        processor's attributes for this call.
        """
        if kwargs:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected arguments {sorted(kwargs)}")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        image_mean = self.image_mean if image_mean is None else _scalar(image_mean, "image_mean")
        image_std = self.image_std if image_std is None else _scalar(image_std, "image_std")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")

        volumes = _as_tensor(images)
        volumes = _add_channel_axis(volumes)
        if volumes.dtype == torch.uint8:
            # the training collator calls this on every batch: one float32 copy, then an in-place scale
            pixel_values = volumes.to(torch.float32)
            if do_rescale:
                pixel_values.mul_(rescale_factor)
        elif volumes.is_floating_point():
            pixel_values = volumes.to(torch.float32)
        else:
            raise ValueError(
                f"expected uint8 or floating-point volumes, got dtype {volumes.dtype}; convert integer volumes "
                "to uint8 (0..255) or to floats scaled as the model was trained"
            )
        if do_normalize:
            if pixel_values is volumes:  # float32 input: never modify the caller's tensor in place
                pixel_values = pixel_values.clone()
            pixel_values.sub_(image_mean).div_(image_std)

        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": pixel_values.numpy()}, tensor_type="np")
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type="pt")

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)


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
        if not all(isinstance(image, (np.ndarray, torch.Tensor)) for image in images):
            return _from_numpy(np.asarray(images))  # nested Python lists (their ints become int64: rejected)
        parts = [_as_tensor(image) for image in images]
        shapes = {tuple(part.shape) for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"all volumes of a batch must have the same shape, got shapes {sorted(shapes)}")
        return torch.stack(parts)
    raise ValueError(f"expected a numpy array, a torch tensor or a list of them, got {type(images).__name__}")


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == object:
        raise ValueError("expected a numeric array, got dtype object (volumes of different shapes?)")
    if not array.flags.writeable or any(stride < 0 for stride in array.strides):
        # torch.from_numpy refuses negative strides and warns on read-only memory (e.g. np.load(mmap_mode="r")).
        array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array)
    return torch.from_numpy(array)


def _add_channel_axis(volumes: torch.Tensor) -> torch.Tensor:
    """(D,H,W) / (N,D,H,W) / (N,D,H,W,1) -> (N, D, 1, H, W) (a view, no copy)."""
    if volumes.ndim == 3:
        return volumes[None, :, None]
    if volumes.ndim == 4:
        return volumes[:, :, None]
    if volumes.ndim == 5 and volumes.shape[-1] == 1:
        return volumes.squeeze(-1)[:, :, None]
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
