"""Why the model decided: voxel-aligned explanations of a ViViT-MedMNIST prediction.

```python
from vivit_medmnist.explain import explain

maps = explain(model, pixel_values, method="occlusion")  # (N, D, H, W) float32, aligned voxel for voxel
```

Every method returns, per volume, a non-negative map on the volume's own grid: the evidence *for* the target
class (the predicted one unless `target` is given), except rollout, which says what the pooled output reads
whatever the class:

- `"rollout"`: attention rollout (Abnar & Zuidema 2020) over the encoder: each block's head-averaged attention
  plus the identity (the residual), row-normalised, multiplied through the blocks; a token's relevance is its
  column of the product, read by the pooling (the mean over the tokens, or the CLS row). The factorised encoder
  rolls out within each temporal slab and over the slabs, and multiplies the two. Token relevance is mapped to
  voxels by the tokenisation's true geometry (`token_boxes`): each token's receptive field (its tubelet, or
  through the convolutional stem the voxels its features see), averaged where fields overlap; voxels no token
  reads (`padding="valid"`) get nothing. Needs attention maps: a model running SDPA is switched to eager
  attention for the call (and back), with a log line.
- `"hires_cam"`: HiResCAM (Draelos & Carin 2020), the Grad-CAM (Selvaraju et al. 2017) variant that multiplies
  each token's features by the target logit's gradient element-wise (Grad-CAM first averages the gradient over
  the tokens), summed over the features, the positive part; on the tokens leaving the first block, mapped to
  voxels like rollout. One forward and one backward pass; no extra dependency. Why this form and this layer:
  Grad-CAM at the input of the last block, the usual choice for vision transformers, never pointed at the
  synthetic bulge on the reference model (a likely reason: its tokens there have passed seven blocks of
  attention, which mix them); the layers and both forms were compared on volumes the benchmark does not use
  (`benchmarks/explanation_choices.py`).
- `"integrated_gradients"`: captum's `IntegratedGradients` of the target logit with respect to the voxels, from
  a baseline volume holding the volume's mean everywhere (`steps` steps); the positive part. Not from an all-zero
  volume: integrated gradients multiplies by (input - baseline), so from zero every background voxel of a
  masked or air-filled volume gets exactly nothing whatever the model, and the maps of a randomly initialised
  model kept the object's shape (they failed the randomisation test, `benchmarks/README.md`).
- `"occlusion"`: captum's `Occlusion`: the drop of the target class's probability when a cube of voxels is set
  to zero, averaged over the cube positions that cover each voxel; the positive part. Model-agnostic: the
  reference the others are measured against.

Which to trust is measured, not assumed: `benchmarks/explanations.py` scores each method's localisation on the
synthetic diagnostic (is the peak on the bulge?) and runs the model-parameter randomisation test (Adebayo et
al. 2018); `DEFAULT_METHOD` is the one that did best (`benchmarks/README.md`). captum is the `explain` extra
(`pip install 'vivit-medmnist[explain]'`); rollout needs nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cpu_speed import CPU_ATTENTION
from .volume_files import is_nifti, nifti_header

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "evidence_gallery",
    "explain",
    "heatmap_peak",
    "token_boxes",
    "tokens_to_voxels",
]

METHODS = ("rollout", "hires_cam", "integrated_gradients", "occlusion")
DEFAULT_METHOD = "occlusion"  # the best localisation on the synthetic diagnostic, see the module docstring


def explain(
    model: nn.Module,
    pixel_values: torch.Tensor,
    method: str = DEFAULT_METHOD,
    target: int | Sequence[int] | None = None,
    *,
    steps: int = 32,
    window: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """(N, D, H, W) float32 evidence maps for `pixel_values` (N, D, 1, H, W), see the module docstring.

    `target`: the class to explain, one for all volumes or one per volume (default: each volume's prediction).
    `steps`: integration steps of integrated gradients. `window`: the occlusion cube's edge (default: the volume's
    edge / 7, at least 3, moved by three quarters of it). `batch_size`: volumes per forward pass of the perturbation
    methods. Raises ValueError for an unknown method or input of the wrong shape."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; expected one of {', '.join(METHODS)}")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or pixel_values.shape[2] != 1:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"expected pixel_values (N, D, 1, H, W) as a torch.Tensor, got {shape}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pixel_values = pixel_values.to(device, torch.float32)
    try:
        targets = _targets(model, pixel_values, target, batch_size)
        if method == "rollout":  # class-agnostic: what the pooled output reads
            maps = _rollout(model, pixel_values)
        elif method == "hires_cam":
            maps = _hires_cam(model, pixel_values, targets, batch_size)
        elif method == "integrated_gradients":
            maps = _integrated_gradients(model, pixel_values, targets, steps, batch_size)
        else:
            maps = _occlusion(model, pixel_values, targets, window, batch_size)
    finally:
        model.train(was_training)
    return np.ascontiguousarray(np.clip(maps, 0.0, None), dtype=np.float32)


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, int, int]:
    """The peak of a (D, H, W) map: the centre of mass of its maximal voxels (a token-level map is flat over a
    token's voxels, where a plain arg-max would pick a corner), rounded to the nearest voxel."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    top = heatmap.max()
    spread = top - heatmap.min()
    maximal = np.argwhere(heatmap >= top - 1e-6 * spread) if spread > 0 else np.argwhere(np.ones_like(heatmap))
    return tuple(int(np.rint(v)) for v in maximal.mean(0))


# --------------------------------------------------------------------------------------------------------------
# Tokens -> voxels
# --------------------------------------------------------------------------------------------------------------


def token_boxes(config, volume_size: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per axis (D, H, W), the voxels token i reads, `[start + i * step, start + i * step + span)`, as
    (start, span, step): `VivitMedmnistConfig.token_fields_for`."""
    return config.token_fields_for(volume_size)


def tokens_to_voxels(relevance: torch.Tensor, config, volume_size: Sequence[int]) -> torch.Tensor:
    """(N, gd, gh, gw) token relevance -> (N, D, H, W): each voxel gets the mean relevance of the tokens whose
    receptive field (`token_boxes`) holds it, 0 where none does."""
    boxes = token_boxes(config, volume_size)
    relevance = relevance.float()
    starts = [b[0] for b in boxes]
    kernel = torch.ones((1, 1, *[b[1] for b in boxes]), dtype=relevance.dtype, device=relevance.device)
    stride = [b[2] for b in boxes]
    with torch.autocast(relevance.device.type, enabled=False):  # exact sums, whatever the caller's autocast
        summed = nn.functional.conv_transpose3d(relevance[:, None], kernel, stride=stride)[:, 0]
        counts = nn.functional.conv_transpose3d(torch.ones_like(relevance[:1, None]), kernel, stride=stride)[:, 0]
    mean = summed / counts.clamp(min=1)
    # output index o of an axis is voxel start + o: crop what lies outside [0, size), pad what no token reaches
    out = mean.new_zeros((relevance.shape[0], *volume_size))
    source, target = [], []
    for start, length, size in zip(starts, mean.shape[1:], volume_size):
        low, high = max(start, 0), min(start + length, size)
        source.append(slice(low - start, high - start))
        target.append(slice(low, high))
    out[(slice(None), *target)] = mean[(slice(None), *source)]
    return out


# --------------------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------------------


def _volume_size(pixel_values: torch.Tensor) -> list[int]:
    return [pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4]]


def _any_size(model, pixel_values) -> bool:
    return _volume_size(pixel_values) != list(model.config.volume_size)


@torch.no_grad()
def _targets(model, pixel_values, target, batch_size) -> torch.Tensor:
    """One class per volume: `target` checked, or each volume's prediction."""
    n = pixel_values.shape[0]
    if target is None:
        logits = torch.cat(
            [
                model(pixel_values=chunk, interpolate_pos_encoding=_any_size(model, pixel_values)).logits
                for chunk in pixel_values.split(batch_size)
            ]
        )
        return logits.argmax(-1)
    targets = torch.as_tensor([target] * n if isinstance(target, int) else list(target), dtype=torch.long)
    if targets.shape != (n,) or targets.min() < 0 or targets.max() >= model.config.num_labels:
        raise ValueError(f"target must be a class in 0..{model.config.num_labels - 1}, one or one per volume; got {target}")
    return targets.to(pixel_values.device)


@contextmanager
def _attention_maps(model):
    """Run with an attention implementation that returns its weights: SDPA computes none, so switch to eager."""
    current = model.config._attn_implementation
    if current not in ("eager", CPU_ATTENTION):
        logger.info(f"attention rollout needs attention maps, which {current!r} attention does not return: eager for now")
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation(current)
    else:
        yield


def _roll(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout of per-block (B, heads, T, T) attention: prod_l 0.5 (A_l + I), rows normalised."""
    rollout = None
    for attention in attentions:
        mixed = attention.float().mean(1)
        mixed = 0.5 * mixed + 0.5 * torch.eye(mixed.shape[-1], device=mixed.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


@torch.no_grad()
def _rollout(model, pixel_values) -> np.ndarray:
    config = model.config
    size = _volume_size(pixel_values)
    grid = config.grid_size_for(size)
    with _attention_maps(model):
        attentions = model(
            pixel_values=pixel_values, output_attentions=True, interpolate_pos_encoding=_any_size(model, pixel_values)
        ).attentions
    n = pixel_values.shape[0]
    if config.encoder_type == "factorised_encoder":
        spatial = _roll(attentions[: config.num_hidden_layers])  # (N * frames, S, S)
        temporal = _roll(attentions[config.num_hidden_layers :])  # (N, frames, frames)
        per_slab = spatial.mean(1).view(n, grid[0], -1)  # each slab's mean token reads its tokens so
        relevance = temporal.mean(1)[:, :, None] * per_slab  # the pooled output reads the slabs by their mean
    else:
        rolled = _roll(attentions)  # (N, T, T)
        relevance = rolled[:, 0, 1:] if config.pooling == "cls" else rolled.mean(1)
    relevance = relevance.reshape(n, *grid)
    return tokens_to_voxels(relevance, config, size).cpu().numpy()


HIRES_CAM_LAYER = 1  # hidden_states[1]: the tokens leaving the first block (the embeddings for a 0-block model)


def _hires_cam(model, pixel_values, targets, batch_size: int) -> np.ndarray:
    config = model.config
    size = _volume_size(pixel_values)
    grid = config.grid_size_for(size)
    maps = []
    for chunk, chunk_targets in zip(pixel_values.split(batch_size), targets.split(batch_size)):
        with torch.enable_grad():
            outputs = model(
                pixel_values=chunk, output_hidden_states=True, interpolate_pos_encoding=_any_size(model, pixel_values)
            )
            # (volumes, tokens, hidden), or (volumes * slabs, tokens per slab, hidden) for the factorised encoder,
            # whose first hidden states are its spatial blocks'
            tokens = outputs.hidden_states[min(HIRES_CAM_LAYER, config.num_hidden_layers)]
            score = outputs.logits.float().gather(1, chunk_targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, tokens)
        cam = (gradients.float() * tokens.detach().float()).sum(-1).clamp(min=0)
        cam = cam.reshape(chunk.shape[0], -1)
        if cam.shape[1] == int(np.prod(grid)) + 1:  # the CLS token holds no place in the volume
            cam = cam[:, 1:]
        maps.append(tokens_to_voxels(cam.reshape(chunk.shape[0], *grid), config, size).cpu().numpy())
    return np.concatenate(maps)


def _captum():
    try:
        import captum.attr
    except ImportError:
        raise ImportError(
            "this explanation method uses captum: pip install 'vivit-medmnist[explain]' (or captum)"
        ) from None
    return captum.attr


class _Logits(nn.Module):
    """The model as a function of pixel_values alone, returning logits (or probabilities) for captum."""

    def __init__(self, model, probabilities: bool):
        super().__init__()
        self.model, self.probabilities = model, probabilities

    def forward(self, pixel_values):
        logits = self.model(
            pixel_values=pixel_values, interpolate_pos_encoding=_any_size(self.model, pixel_values)
        ).logits.float()
        return logits.softmax(-1) if self.probabilities else logits


def _integrated_gradients(model, pixel_values, targets, steps: int, batch_size: int) -> np.ndarray:
    method = _captum().IntegratedGradients(_Logits(model, probabilities=False))
    maps = []
    for volume, target in zip(pixel_values, targets):
        volume = volume[None]
        baseline = torch.full_like(volume, float(volume.mean()))  # not zeros: see the module docstring
        attribution = method.attribute(
            volume, baselines=baseline, target=int(target), n_steps=steps, internal_batch_size=batch_size
        )
        maps.append(attribution[0, :, 0].detach().float().cpu().numpy())
    return np.stack(maps)


@torch.no_grad()
def _occlusion(model, pixel_values, targets, window: int | None, batch_size: int) -> np.ndarray:
    size = _volume_size(pixel_values)
    edge = window or max(3, round(min(size) / 7))
    stride = max(1, round(0.75 * edge))  # cubes overlap by a quarter: 9^3 positions at 28^3 and at 64^3
    method = _captum().Occlusion(_Logits(model, probabilities=True))
    maps = []
    for volume, target in zip(pixel_values, targets):
        attribution = method.attribute(
            volume[None], sliding_window_shapes=(edge, 1, edge, edge), strides=(stride, 1, stride, stride),
            baselines=0.0, target=int(target), perturbations_per_eval=batch_size,
        )  # fmt: skip
        maps.append(attribution[0, :, 0].float().cpu().numpy())
    return np.stack(maps)


# --------------------------------------------------------------------------------------------------------------
# The model card's gallery
# --------------------------------------------------------------------------------------------------------------


def evidence_gallery(
    model, image_processor, volumes: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, method: str = DEFAULT_METHOD
) -> list[tuple[str, tuple | None, tuple | None]]:
    """Per class, the first test volume classified correctly and the first classified wrongly, each as (volume in
    [0, 1], evidence for the predicted class, caption), None where there is none: the rows of
    `plots.plot_evidence_gallery`. `probabilities`: (N, classes), the ones the card reports."""
    from .cpu_speed import autocast_for, use_bf16

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    predictions = probabilities.argmax(-1)
    device = next(model.parameters()).device
    rows = []
    for label, name in enumerate(names):
        row = [name]
        for correct in (True, False):
            hits = np.flatnonzero((labels == label) & ((predictions == label) == correct))
            if not len(hits):
                row.append(None)
                continue
            i = int(hits[0])
            pixel_values = image_processor(volumes[i], return_tensors="pt")["pixel_values"]
            with autocast_for(device, use_bf16("auto", device)):
                heatmap = explain(model, pixel_values, method, target=int(predictions[i]))[0]
            caption = (
                f"test #{i}: {name}\npredicted {names[predictions[i]]} ({probabilities[i, predictions[i]]:.2f})"
            )
            row.append((pixel_values[0, :, 0].float().numpy(), heatmap, caption))
        rows.append(tuple(row))
    return rows


# --------------------------------------------------------------------------------------------------------------
# Writing explanations (vivit-medmnist-predict --explain)
# --------------------------------------------------------------------------------------------------------------


def explanation_stem(folder, method: str, name: str, key: str | None, index: int | None) -> Path:
    """`folder`/<file name without extension>[_<key>][_<index>].<method>"""
    base = Path(name).name
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    parts = [base] + ([key] if key is not None else []) + ([str(index)] if index is not None else [])
    return Path(folder) / f"{'_'.join(parts)}.{method}"


def explanation_paths(folder, method: str, inputs) -> list[Path]:
    """Every file `write_explanation` will write for `inputs` ((name, key, array, pixel_values) per file)."""
    paths = []
    for name, key, array, _ in inputs:
        indices = range(len(array)) if array.ndim == 4 else [None]
        suffix = ".nii.gz" if is_nifti(Path(name)) else ".npy"
        for index in indices:
            stem = explanation_stem(folder, method, name, key, index)
            paths += [stem.with_name(stem.name + suffix), stem.with_name(stem.name + ".png")]
    return paths


def write_explanation(model, volume, index, top, bf16: bool, method: str, folder) -> list[Path]:
    """`vivit-medmnist-predict --explain`: the evidence map of one volume (`volume`: file name, npz key, the
    array as read, its pixel_values) for its predicted class (`top`: label id, probability), as .npy / .nii.gz
    aligned with the input, and a PNG; returns the paths written."""
    from .cpu_speed import autocast_for
    from .plots import plot_explanation

    name, key, array, pixel_values = volume
    label_id, probability = top
    with autocast_for(model.device, bf16):
        heatmap = explain(model, pixel_values, method, target=label_id)[0]
    stem = explanation_stem(folder, method, name, key, index)
    stem.parent.mkdir(parents=True, exist_ok=True)
    aligned = heatmap
    if tuple(array.shape) != heatmap.shape:  # resized for the model: back to the input's voxels
        aligned = resize_volume(heatmap, array.shape)
    if is_nifti(Path(name)):
        import nibabel

        affine, _ = nifti_header(Path(name))
        data_path = stem.with_name(stem.name + ".nii.gz")
        nibabel.save(nibabel.Nifti1Image(aligned.astype(np.float32), affine), data_path)
    else:
        data_path = stem.with_name(stem.name + ".npy")
        np.save(data_path, aligned.astype(np.float32))
    label = model.config.id2label[label_id]
    kind = "calibrated probability" if getattr(model.config, "calibration_temperature", None) else "probability"
    png = stem.with_name(stem.name + ".png")
    title = f"{Path(name).name}{f'[{key}]' if key else ''}{f'[{index}]' if index is not None else ''}: {label} ({kind} {probability:.3f})"
    plot_explanation(pixel_values[0, :, 0].float().cpu().numpy(), heatmap, title, method, png)
    return [data_path, png]


def resize_volume(volume: np.ndarray, shape) -> np.ndarray:
    """Trilinear resize of a (D, H, W) map to `shape` (align_corners=False, as the processor resizes)."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()
