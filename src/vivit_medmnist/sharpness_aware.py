"""Sharpness-aware minimisation (SAM, Foret et al., ICLR 2021) as a `Trainer`: `--sam_rho RHO`.

Each step computes the gradient g at the weights w, moves to the worst nearby point w + rho * g / ||g|| (one
ascent step inside a ball of radius rho), computes the gradient there, returns to w, and lets the run's own
optimizer (AdamW, with its clipping and schedule) step with that second gradient. Chen et al. (ICLR 2022,
"When Vision Transformers Outperform ResNets without Pretraining or Strong Data Augmentations") found it the
lever that lets a ViT trained from scratch on little data generalise. A step costs two forward and backward
passes. On AdrenalMNIST3D with `recipes/medmnist3d.yaml` it lowered the training fit and the validation AUC
(rho 0.05, two seeds: benchmarks/ACCURACY.md, issue 23): an option, off by default.

No library of the ecosystem has SAM for the `Trainer`; this is the paper's algorithm on top of
`Trainer.training_step`, so mixed precision, label smoothing and mixing's loss stay the Trainer's. Under DDP
the ascent uses the gradient averaged over the processes (the whole batch's), where Foret et al. took each
device's own ("m-sharpness").
"""

from __future__ import annotations

import torch
from transformers import Trainer

__all__ = ["SharpnessAwareTrainer", "check_sam"]


def check_sam(rho: float, gradient_accumulation_steps: int) -> None:
    """Raise ValueError unless SAM can run with radius `rho` (positive) and this gradient accumulation (none:
    the ascent step needs the whole batch's gradient). The command line and the Trainer both ask here."""
    if not rho > 0:
        raise ValueError(f"--sam_rho must be positive, got {rho}")
    if gradient_accumulation_steps != 1:
        raise ValueError(
            "--sam_rho takes its ascent step on a whole batch's gradient: it needs "
            f"--gradient_accumulation_steps 1, got {gradient_accumulation_steps}"
        )


class SharpnessAwareTrainer(Trainer):
    """A `Trainer` whose every optimisation step is a SAM step of radius `sam_rho`."""

    def __init__(self, *args, sam_rho: float, **kwargs):
        super().__init__(*args, **kwargs)
        check_sam(sam_rho, self.args.gradient_accumulation_steps)
        self.sam_rho = sam_rho

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The loss at the weights (what is logged), with the gradient at the ascent point left for the
        optimizer."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            weights = [p.detach().clone() for p in params]  # w itself, not w + e - e in floating point
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            step = self.sam_rho / (float(grad_norm) + 1e-12)
            for p in params:
                p.add_(p.grad, alpha=step)
        model.zero_grad(set_to_none=True)
        super().training_step(model, inputs, num_items_in_batch)  # the gradient at w + e
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        return loss
