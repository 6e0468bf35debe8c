"""Resolution transfer: a model trained on volumes of one size becomes a model for another size (28³ → 64³).

```python
from vivit_medmnist.resolution import transfer_resolution

model_64 = transfer_resolution(model_28, volume_size=64, tubelet_size=16)
model_64.save_pretrained("outputs/organmnist3d_64")  # loads with the Auto classes like any other
```

What changes shape, and how:
- the position embeddings are resized to the new token grid, trilinearly over depth, height and width (the
  factorised encoder's temporal ones linearly), as `interpolate_pos_encoding=True` does at run time; the CLS
  position is kept;
- the tubelet projection kernel, when the tubelet size changes, by FlexiViT's pseudo-inverse resize (Beyer et al.
  2023, "FlexiViT: One Model for All Patch Sizes", §3.4). With `B` the linear map that resizes a tubelet from the
  old to the new size (`kernel_interpolation`), the new kernel is `pinv(Bᵀ) w`: for every tubelet `x`,
  `<B x, pinv(Bᵀ) w> = <x, w>`, so a tubelet resized by `B` gives the token the old tubelet gave. Chosen over
  resizing the kernel itself (which changes the token's scale with the tubelet's volume) because it keeps the
  response. With `kernel_interpolation="nearest"` and an integer scale (e.g. 28³ → 56³, tubelets 8 → 16),
  resizing a whole volume by nearest neighbour resizes each tubelet alike, and the transferred model gives the
  original's logits on the resized volume; `"trilinear"` (the default, what the image processor's resize does)
  matches it per tubelet and approximately on whole volumes, whose interpolation also mixes neighbouring
  tubelets.

Every other tensor is copied unchanged, and none is initialised anew.

A model with a convolutional stem (`conv_stem_channels`): its 3³ kernels slide over any size, but at 64³ they see
structures at 2.3 times their 28³ size, and copied as they are, they give other features (a 28³ AdrenalMNIST3D
model copied to 64³ predicted one class for every validation volume). With `conv_stem_scale=s` the stem's first
convolution gets kernel 3s, stride 2s and padding s, its kernel resized by the same pseudo-inverse resize: with
`kernel_interpolation="nearest"`, a volume upsampled s times by nearest neighbour gives exactly the original
model's first feature map, so every later stage, the token grid and the position embeddings stay as they were
(28³ → 56³ with s = 2 gives the original logits; 64³ gives a 16³ map where 56³ gives 14³, hence the same 4³
grid after two more stages, with positions resized where the grid changes).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .configuration_vivit_medmnist import VivitMedmnistConfig

logger = logging.getLogger(__name__)

__all__ = ["pseudo_inverse_resize", "transfer_resolution"]


def transfer_resolution(
    model,
    volume_size: int | list[int],
    tubelet_size: int | list[int] | None = None,
    kernel_interpolation: str = "trilinear",
    conv_stem_scale: int | None = None,
):
    """A copy of `model` (a `VivitMedmnistModel` or `...ForVideoClassification`) for volumes of `volume_size`,
    with tubelets of `tubelet_size` and, for a model with a conv stem, its first convolution scaled by
    `conv_stem_scale` (defaults: unchanged); see the module docstring. Logs the resized tensors."""
    old = model.config
    if old.tubelet_stride is not None and old.tubelet_stride != old.tubelet_size:
        raise ValueError(
            "transfer_resolution supports non-overlapping tubelets (tubelet_stride None); the model has "
            f"tubelet_stride {old.tubelet_stride}"
        )
    if kernel_interpolation not in ("trilinear", "nearest"):
        raise ValueError(f"kernel_interpolation must be trilinear or nearest, got {kernel_interpolation!r}")
    if conv_stem_scale is not None and not old.conv_stem_channels:
        raise ValueError("conv_stem_scale applies to a model with a conv stem; this one has none")
    changes = {
        "volume_size": volume_size,
        "tubelet_size": old.tubelet_size if tubelet_size is None else tubelet_size,
        "conv_stem_scale": old.conv_stem_scale if conv_stem_scale is None else conv_stem_scale,
    }
    config = VivitMedmnistConfig.from_dict({**old.to_dict(), **changes})
    config._attn_implementation = old._attn_implementation
    new = type(model)(config)

    state = model.state_dict()
    target = new.state_dict()
    resized = []
    for name, tensor in state.items():
        if tensor.shape == target[name].shape and not name.endswith("position_embeddings"):
            continue  # copied as it is
        if name.endswith("embeddings.position_embeddings") and "temporal" not in name:
            num_cls = 1 if old.pooling == "cls" else 0
            state[name] = _resize_positions(tensor, num_cls, old.grid_size, config.grid_size)
        elif name.endswith("temporal_position_embeddings"):
            state[name] = _resize_positions_1d(tensor, config.grid_size[0])
        elif name.endswith("tubelet_embeddings.projection.weight"):
            state[name] = pseudo_inverse_resize(tensor, config.tubelet_size, kernel_interpolation)
        elif name.endswith("tubelet_embeddings.conv_stem.0.weight"):  # the stem's first convolution
            state[name] = pseudo_inverse_resize(
                tensor, [3 * config.conv_stem_scale] * 3, kernel_interpolation
            )
        else:
            raise ValueError(
                f"{name}: shape {tuple(tensor.shape)} would change to {tuple(target[name].shape)}"
            )
        if not torch.equal(state[name], tensor) or state[name].shape != tensor.shape:
            resized.append(f"{name} {tuple(tensor.shape)} -> {tuple(state[name].shape)}")
    new.load_state_dict(state, strict=True)
    stem = f", stem scale {old.conv_stem_scale} -> {config.conv_stem_scale}" if old.conv_stem_channels else ""
    logger.info(
        f"resolution transfer {old.volume_size} -> {config.volume_size} (tubelets {old.tubelet_size} -> "
        f"{config.tubelet_size}{stem}): resized {'; '.join(resized) or 'nothing'}; every other tensor copied"
    )
    return new.train(model.training)


def _resize_positions(positions: torch.Tensor, num_cls: int, old_grid, new_grid) -> torch.Tensor:
    if list(old_grid) == list(new_grid):
        return positions
    cls_position, grid = positions.split([num_cls, positions.shape[1] - num_cls], dim=1)
    hidden_size = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, hidden_size).permute(0, 4, 1, 2, 3)
    grid = nn.functional.interpolate(grid, size=tuple(new_grid), mode="trilinear", align_corners=False)
    return torch.cat((cls_position, grid.permute(0, 2, 3, 4, 1).reshape(1, -1, hidden_size)), dim=1)


def _resize_positions_1d(positions: torch.Tensor, frames: int) -> torch.Tensor:
    if positions.shape[1] == frames:
        return positions
    resized = nn.functional.interpolate(
        positions.transpose(1, 2), size=frames, mode="linear", align_corners=False
    )
    return resized.transpose(1, 2)


def pseudo_inverse_resize(
    weight: torch.Tensor, new_size: list[int], interpolation: str = "trilinear"
) -> torch.Tensor:
    """A Conv3d kernel `(out, in, d, h, w)` for tubelets of `new_size`: `pinv(Bᵀ) w` per output and input
    channel, with `B` the resize of a tubelet from `(d, h, w)` to `new_size` by `interpolation` (FlexiViT)."""
    old_size = list(weight.shape[2:])
    if old_size == list(new_size):
        return weight
    n_old = math.prod(old_size)
    basis = torch.eye(n_old, dtype=torch.float64).reshape(n_old, 1, *old_size)
    align = {"align_corners": False} if interpolation == "trilinear" else {}
    resize = nn.functional.interpolate(
        basis, size=tuple(new_size), mode=interpolation, **align
    )  # B's columns
    matrix = resize.reshape(n_old, -1)  # Bᵀ: (old voxels, new voxels)
    kernels = weight.detach().to(torch.float64).reshape(-1, n_old)  # one row per (out, in) channel pair
    new = kernels @ torch.linalg.pinv(matrix).T  # rows of (pinv(Bᵀ) w)ᵀ
    return new.reshape(*weight.shape[:2], *new_size).to(weight.dtype)
