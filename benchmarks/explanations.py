#!/usr/bin/env python
"""Which explanation to trust: localisation on the synthetic diagnostic, and the randomisation test.

    python benchmarks/explanations.py --json explanations.json          # reference and stem models, 12 epochs
    python benchmarks/explanations.py --volumes 10 --epochs 2 --train 200  # a quick look

The synthetic task of `benchmarks/synthetic.py` knows where the evidence is: class 1 is a tube with a bulge on
its wall, class 0 the same without. Each model option (`reference`: the Keras model's 8^3 tubelets; `stem3`: the
convolutional stem of `recipes/medmnist3d.yaml`) is trained there as `synthetic.py` trains it, then every method
of `vivit_medmnist.explain` explains class 1 on the first `--volumes` bulging validation volumes:

- **pointing game**: the fraction of volumes whose map peak (`explain.heatmap_peak`) lies within 2 voxels of
  the bulge, against two chance rates: a voxel drawn uniformly from the volume, and one drawn from the tube
  (a method that only finds the object);
- **randomisation test** (Adebayo et al. 2018): the same maps from the same architecture with freshly
  initialised weights; the Spearman rank correlation of the two maps over the voxels within 3 voxels of the
  tube (where both have something to say) should be low. A method passes when the mean correlation is below
  0.5 (fixed before measuring) and the randomised model's pointing score is below the trained one's;
- the seconds per volume of each method on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import OPTIONS, make_tubes, train_option

from vivit_medmnist import VivitMedmnistForVideoClassification
from vivit_medmnist.cpu_speed import speed_up_for_cpu
from vivit_medmnist.explain import METHODS, explain, heatmap_peak

SPEARMAN_PASS = 0.5  # fixed before measuring
HIT_DISTANCE = 2.0  # voxels


def pointing(maps: np.ndarray, bulges: np.ndarray) -> list[bool]:
    hits = []
    for heatmap, bulge in zip(maps, bulges):
        distance = ndimage.distance_transform_edt(~bulge)
        hits.append(bool(distance[heatmap_peak(heatmap)] <= HIT_DISTANCE))
    return hits


def chance_rates(volumes: np.ndarray, bulges: np.ndarray) -> dict:
    uniform, tube = [], []
    for volume, bulge in zip(volumes, bulges):
        near = ndimage.distance_transform_edt(~bulge) <= HIT_DISTANCE
        uniform.append(near.mean())
        tube.append(near[volume > 0].mean())
    return {"uniform_voxel": float(np.mean(uniform)), "tube_voxel": float(np.mean(tube))}


def randomisation(trained: np.ndarray, randomised: np.ndarray, volumes: np.ndarray) -> list[float]:
    out = []
    for a, b, volume in zip(trained, randomised, volumes):
        near = ndimage.distance_transform_edt(volume == 0) <= 3
        rho = spearmanr(a[near], b[near]).statistic
        out.append(0.0 if np.isnan(rho) else float(rho))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and `explanation_choices.py` share: the models, their training, the volumes."""
    parser.add_argument("--options", nargs="+", default=["reference", "stem3"], choices=list(OPTIONS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--volumes", type=int, default=40, help="bulging validation volumes explained")
    parser.add_argument("--random_volumes", type=int, default=20, help="of which, for the randomisation test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")


def synthetic_data(args):
    """The training and validation tensors `train_option` takes, and the validation volumes, labels and bulges."""
    train_x, train_y = make_tubes(args.train, seed=1)
    val_x, val_y, val_bulges = make_tubes(args.val, seed=2, with_bulges=True)
    data = (
        (torch.from_numpy(train_x).unsqueeze(2), torch.from_numpy(train_y)),
        (torch.from_numpy(val_x).unsqueeze(2), torch.from_numpy(val_y)),
    )
    return data, val_x, val_y, val_bulges


def trained_and_random(name: str, data, args):
    """The option trained as `synthetic.py` trains it (its result and model), and the same architecture with fresh
    weights."""
    result, model = train_option(name, OPTIONS[name], data, args.epochs, args.seed, return_model=True)
    print(f"{name}: trained, val AUC {result['val_auc']:.3f} ({result['s_per_epoch']:.1f} s/epoch)", flush=True)
    torch.manual_seed(args.seed + 1000)
    random_model = VivitMedmnistForVideoClassification(model.config).eval()
    speed_up_for_cpu(random_model)
    return result, model, random_model


def score(explainer, model, random_model, volumes, bulges, n_random: int, name: str) -> dict:
    """Pointing game, randomisation test and seconds per volume of `explainer(model, pixel_values)` (maps of class
    1), printed as one line."""
    pixel_values = torch.from_numpy(volumes).float().div_(255).unsqueeze(2)
    start = time.perf_counter()
    maps = np.clip(explainer(model, pixel_values), 0, None)
    seconds = (time.perf_counter() - start) / len(volumes)
    random_maps = np.clip(explainer(random_model, pixel_values[:n_random]), 0, None)
    hits, random_hits = pointing(maps, bulges), pointing(random_maps, bulges[:n_random])
    rho = float(np.mean(randomisation(maps[:n_random], random_maps, volumes[:n_random])))
    hit_rate, random_rate = float(np.mean(hits)), float(np.mean(random_hits))
    passed = bool(rho < SPEARMAN_PASS and random_rate < hit_rate)
    print(
        f"  {name:30s} pointing {hit_rate:.3f} (randomised {random_rate:.3f}) spearman {rho:.3f} "
        f"{'pass' if passed else 'FAIL'} {seconds:.2f} s/volume",
        flush=True,
    )
    return {
        "pointing_game": hit_rate, "pointing_game_randomised_model": random_rate,
        "spearman_trained_vs_randomised": rho, "randomisation_test_passed": passed, "seconds_per_volume": seconds,
    }  # fmt: skip


def run_option(name: str, data, positives, args) -> dict:
    result, model, random_model = trained_and_random(name, data, args)
    volumes, bulges = positives
    n_random = min(args.random_volumes, len(volumes))
    report = {"option": name, "training": result, "methods": {}}
    for method in METHODS:
        explainer = lambda m, x, method=method: explain(m, x, method, target=1)
        report["methods"][method] = score(explainer, model, random_model, volumes, bulges, n_random, method)
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)

    data, val_x, val_y, val_bulges = synthetic_data(args)
    positive = np.flatnonzero(val_y == 1)[: args.volumes]
    positives = (val_x[positive], val_bulges[positive])
    report = {
        "settings": vars(args),
        "chance": chance_rates(*positives),
        "hit_distance_voxels": HIT_DISTANCE,
        "spearman_pass_below": SPEARMAN_PASS,
        "threads": torch.get_num_threads(),
        "options": [],
    }
    print(f"chance of a hit: {report['chance']}")
    for name in args.options:
        report["options"].append(run_option(name, data, positives, args))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
