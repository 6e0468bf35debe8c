#!/usr/bin/env python
"""How a 28³ model does on 64³ volumes right after resolution transfer, before any fine-tuning (issue 11).

    python benchmarks/transfer_check.py --model OUT28 [--data_dir ../shared/data] [--split validation] [--json F]

For a saved 28³ model folder, scores on the 64³ release of its data set (`<name>_64.npz`, `--split`):
- `at_28`: the model itself on the 28³ volumes of the same split (the yardstick);
- `interpolate`: the 28³ model on 64³ volumes with `interpolate_pos_encoding=True` (positions resized only);
- `transfer`: `transfer_resolution(model, 64)` with the saved tubelets and stem as they are;
- `transfer_stem_scale_2` (models with a conv stem): `transfer_resolution(model, 64, conv_stem_scale=2)`, the
  transfer `recipes/medmnist3d_64_finetune.yaml` makes, with the kernel resize by trilinear and by nearest.
Each gives accuracy and AUC (the package's metrics). No test split is read unless asked for with `--split
test`; `--only NAME ...` scores only those variants (a test split read for the one model a rule chose, not for
all).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch

from vivit_medmnist import VivitMedmnistForVideoClassification
from vivit_medmnist.data import load_medmnist3d
from vivit_medmnist.metrics import compute_metrics
from vivit_medmnist.resolution import transfer_resolution

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("validation", "test", "train")


def volumes_and_labels(dataset_name: str, size: int, data_dir: str, split: str):
    rows = load_medmnist3d(dataset_name, size=size, data_dir=data_dir, download=False)[split].with_format(
        "numpy"
    )
    volumes = torch.from_numpy(np.asarray(rows["volume"])).float().div_(255).unsqueeze(2)
    return volumes, np.asarray(rows["label"])


def predict_logits(model, volumes: torch.Tensor, **kwargs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(chunk, **kwargs).logits for chunk in volumes.split(32)])


def score(model, volumes: torch.Tensor, labels: np.ndarray, **kwargs) -> dict[str, float]:
    metrics = compute_metrics((predict_logits(model, volumes, **kwargs).numpy(), labels))
    return {key: float(metrics[key]) for key in ("accuracy", "auc")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a 28^3 model folder written by train.py")
    parser.add_argument("--dataset_name", default="adrenalmnist3d")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--split", default="validation", choices=list(SPLITS))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="score only these variants (default: all)")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)

    model = VivitMedmnistForVideoClassification.from_pretrained(args.model).eval()
    # each size is read when a chosen variant first needs it (`--only` reads nothing it does not score)
    data = functools.cache(lambda size: volumes_and_labels(args.dataset_name, size, args.data_dir, args.split))
    variants = {
        "at_28": lambda: score(model, *data(28)),
        "interpolate": lambda: score(model, *data(64), interpolate_pos_encoding=True),
        "transfer": lambda: score(transfer_resolution(model, 64), *data(64)),
    }
    if model.config.conv_stem_channels:
        for interpolation in ("trilinear", "nearest"):
            scaled = functools.partial(
                transfer_resolution, model, 64, conv_stem_scale=2, kernel_interpolation=interpolation
            )
            name = f"transfer_stem_scale_2_{interpolation}"
            variants[name] = lambda scaled=scaled: score(scaled(), *data(64))
    unknown = sorted(set(args.only or ()) - set(variants))
    if unknown:
        parser.error(f"--only takes {sorted(variants)} for this model, got {unknown}")
    results = {name: scoring() for name, scoring in variants.items() if not args.only or name in args.only}
    for name, metrics in results.items():
        print(f"{name:40s} accuracy {metrics['accuracy']:.3f}  AUC {metrics['auc']:.3f}")
    report = {"model": args.model, "dataset": args.dataset_name, "split": args.split, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
