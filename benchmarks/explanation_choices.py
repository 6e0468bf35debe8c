#!/usr/bin/env python
"""How `vivit_medmnist.explain`'s gradient methods were chosen: their forms compared on volumes the benchmark
does not use.

    OMP_NUM_THREADS=1 python benchmarks/explanation_choices.py --json choices.json   # the run in benchmarks/README.md
    python benchmarks/explanation_choices.py --options stem3 --epochs 1 --train 32 --volumes 2 --random_volumes 1

The models are `explanations.py`'s (trained the same way, on the same synthetic volumes); the volumes explained
are the bulging validation volumes after the benchmark's first `--volumes` (40 by default: volumes 40-79), so
that a choice made here is measured afresh by `explanations.py`. Scored as there: pointing game, and the
randomisation test (Spearman below 0.5 and the randomised model pointing less often) on the first
`--random_volumes`. The candidates:

- integrated gradients from four baselines: all zeros (the first form, which failed the randomisation test), a
  Gaussian blur of the volume (sigma 3 voxels), the volume's mean everywhere, 0.5 everywhere;
- gradient x activation on the token grid at the input of each block `k` (`hidden_states[k]`), in Grad-CAM's
  form (the gradient averaged over the tokens first: `grad_cam_k`) and in HiResCAM's (element-wise:
  `hires_cam_k`).

The rule, written before the stem model's results were seen: of the forms that pass the randomisation test on
both models, the one with the highest mean pointing score over the two models; ties go to Grad-CAM's standard
form, then to the later layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explanations import add_arguments, score, synthetic_data, trained_and_random

from vivit_medmnist import explain as explain_module

BASELINES = {
    "zeros": torch.zeros_like,
    "blur": lambda v: torch.from_numpy(ndimage.gaussian_filter(v.numpy(), (0, 3, 0, 3, 3))).float(),
    "mean": lambda v: torch.full_like(v, float(v.mean())),
    "half": lambda v: torch.full_like(v, 0.5),
}


def integrated_gradients(model, pixel_values, baseline: str) -> np.ndarray:
    from captum.attr import IntegratedGradients

    method = IntegratedGradients(explain_module._Logits(model, probabilities=False))
    maps = []
    for volume in pixel_values:
        volume = volume[None]
        attribution = method.attribute(
            volume, baselines=BASELINES[baseline](volume), target=1, n_steps=32, internal_batch_size=64
        )
        maps.append(attribution[0, :, 0].detach().float().numpy())
    return np.stack(maps)


def token_cam(model, pixel_values, layer: int, hires: bool) -> np.ndarray:
    """Gradient x activation at `hidden_states[layer]`, Grad-CAM's form or HiResCAM's, mapped to voxels."""
    config = model.config
    size = [pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4]]
    with torch.enable_grad():
        outputs = model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = outputs.hidden_states[layer]
        (gradients,) = torch.autograd.grad(outputs.logits.float()[:, 1].sum(), tokens)
    weights = gradients.float() if hires else gradients.float().mean(1, keepdim=True)
    cam = (weights * tokens.detach().float()).sum(-1).clamp(min=0)
    grid = config.grid_size_for(size)
    cam = cam.reshape(len(pixel_values), -1)[:, -int(np.prod(grid)) :]  # without a CLS token
    return explain_module.tokens_to_voxels(cam.reshape(len(pixel_values), *grid), config, size).numpy()


def candidates(layers: int) -> dict:
    forms = {f"integrated_gradients_{name}": (integrated_gradients, name) for name in BASELINES}
    for layer in range(layers):
        forms[f"grad_cam_{layer}"] = (token_cam, layer, False)
        forms[f"hires_cam_{layer}"] = (token_cam, layer, True)
    return forms


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--skip", type=int, default=40, help="the bulging volumes explanations.py explains")
    args = parser.parse_args(argv)

    data, val_x, val_y, val_bulges = synthetic_data(args)
    chosen = np.flatnonzero(val_y == 1)[args.skip : args.skip + args.volumes]
    volumes, bulges = val_x[chosen], val_bulges[chosen]
    n_random = min(args.random_volumes, len(volumes))
    report = {"settings": vars(args), "threads": torch.get_num_threads(), "options": {}}
    for name in args.options:
        result, model, random_model = trained_and_random(name, data, args)
        rows = report["options"][name] = {"val_auc": result["val_auc"], "forms": {}}
        for form, (function, *extra) in candidates(model.config.num_hidden_layers).items():
            explainer = lambda m, x, function=function, extra=extra: function(m, x, *extra)
            rows["forms"][form] = score(explainer, model, random_model, volumes, bulges, n_random, form)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
