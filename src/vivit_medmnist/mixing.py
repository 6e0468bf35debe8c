"""Mixing augmentations for volumes: mixup and cutmix in 3D, and the soft-target loss they train with.

- mixup (Zhang et al. 2018): a training volume becomes `lam * volume + (1 - lam) * partner`, its label
  `lam * label + (1 - lam) * partner's label`, with `lam ~ Beta(mixup_alpha, mixup_alpha)`;
- cutmix (Yun et al. 2019), in 3D: a box of the partner replaces the same box of the volume; the box holds a fraction
  `1 - lam` of the voxels (`lam ~ Beta(cutmix_alpha, cutmix_alpha)`, each edge `(1 - lam) ** (1/3)` of the volume's,
  clipped at the borders), and the label weights are the exact fractions of voxels kept and pasted.

With both on, each mixed volume takes one of the two at random (half and half, as timm's `Mixup`). The partner is
another training volume, augmented as it is in the same epoch; which volumes are mixed, with which partner and how
much is drawn from `np.random.default_rng([seed, epoch, index, 1])`, so a resumed run mixes exactly as the
uninterrupted one (`augmentation.AugmentedDataset`). Labels become vectors of class weights (float32, summing to
1): the collator passes them on as float `labels`, and the Trainer computes the loss with `soft_target_loss`,
which is the Trainer's label smoothing for integer labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["mix_volumes", "mixing_options", "soft_target_loss"]


def mixing_options(mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0) -> dict[str, Any]:
    """The keyword arguments of `mix_volumes`, or {} when neither mixing is on."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return {}
    return {"mixup_alpha": mixup_alpha, "cutmix_alpha": cutmix_alpha, "mix_prob": mix_prob}


def mix_volumes(
    volume: np.ndarray,
    partner: np.ndarray,
    rng: np.random.Generator,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mix_prob: float = 1.0,
) -> tuple[np.ndarray, float]:
    """`volume` mixed with `partner` (uint8 (D, H, W) each) and the weight `lam` of `volume`'s label (1.0: not
    mixed, which happens with probability 1 - mix_prob)."""
    if rng.random() >= mix_prob:
        return volume, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if not use_cutmix:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        mixed = lam * volume.astype(np.float32) + (1.0 - lam) * partner.astype(np.float32)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8), lam
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    edge = (1.0 - lam) ** (1.0 / 3.0)
    box = []
    for size in volume.shape:
        length = round(size * edge)
        centre = int(rng.integers(0, size))
        box.append(slice(max(centre - length // 2, 0), min(centre - length // 2 + length, size)))
    box = tuple(box)
    mixed = volume.copy()
    mixed[box] = partner[box]
    pasted = np.prod([s.stop - s.start for s in box]) / volume.size
    return mixed, float(1.0 - pasted)


def soft_target_loss(label_smoothing: float = 0.0):
    """The Trainer's `compute_loss_func` for runs with mixing: cross-entropy against class weights (float labels
    (B, classes), from the mixing) or class indices (int labels (B,), e.g. validation), with the label smoothing
    of `--label_smoothing_factor` (for integer labels the same loss as the Trainer's `LabelSmoother`). The Trainer
    passes `num_items_in_batch` (its count of label entries over the accumulated batches, and the processes): the
    loss is the sum over volumes divided by their number, as its contract asks."""

    def loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits = (outputs["logits"] if isinstance(outputs, dict) else outputs[0]).float()
        classes = logits.shape[-1]
        if labels.is_floating_point():  # (B, classes) weights: the Trainer counted B * classes entries
            target, per_volume = labels.float(), classes
        else:
            target, per_volume = torch.nn.functional.one_hot(labels.long(), classes).float(), 1
        target = (1.0 - label_smoothing) * target + label_smoothing / classes
        total = -(target * torch.nn.functional.log_softmax(logits, dim=-1)).sum()
        if num_items_in_batch is None:
            return total / len(labels)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / (num_items_in_batch / per_volume)

    return loss
