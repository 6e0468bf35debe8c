#!/usr/bin/env python
"""How much of a recipe's error is the draw of its seed: its models' softmax averaged, against each model (issue 23).

    python benchmarks/seed_ensemble.py --models OUT/seed_0 OUT/seed_1 ... [--data_dir ../shared/data]
        [--split validation] [--json F]

A diagnostic, not a lever the package offers: if the average of several seeds' models scores far above each of
them, a single run loses mostly to its seed's draw (variance); if not, to what every seed shares (the model
family, the data). Scores each model and their average on `--split` (validation unless asked: no test split is
read by default) with the package's metrics, in float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_check import REPO, SPLITS, predict_logits, volumes_and_labels

from vivit_medmnist import VivitMedmnistForVideoClassification
from vivit_medmnist.metrics import compute_metrics


def probabilities(model_folder: str, volumes: torch.Tensor) -> np.ndarray:
    model = VivitMedmnistForVideoClassification.from_pretrained(model_folder)
    return torch.softmax(predict_logits(model, volumes), dim=-1).numpy()


def scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # compute_metrics takes logits; log-probabilities give the same softmax
    metrics = compute_metrics((np.log(np.clip(probs, 1e-12, None)), labels))
    return {key: float(metrics[key]) for key in ("accuracy", "auc")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model folders written by train.py")
    parser.add_argument("--dataset_name", default="adrenalmnist3d")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--split", default="validation", choices=list(SPLITS))
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error(f"--models takes at least two model folders, got {len(args.models)}")

    volumes, labels = volumes_and_labels(args.dataset_name, args.size, args.data_dir, args.split)
    probs = {folder: probabilities(folder, volumes) for folder in args.models}
    results = {"split": args.split, "models": {folder: scores(p, labels) for folder, p in probs.items()}}
    results["mean_of_models"] = {
        key: statistics.mean(model[key] for model in results["models"].values())
        for key in ("accuracy", "auc")
    }
    results["average_of_softmax"] = scores(np.mean(list(probs.values()), axis=0), labels)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "x") as handle:  # never overwrite an earlier result
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
