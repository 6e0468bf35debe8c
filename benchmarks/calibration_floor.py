#!/usr/bin/env python
"""How small an ECE the test split can show: the expected calibration error of a perfectly calibrated model.

    python benchmarks/calibration_floor.py --models OUT/seed_0 OUT/seed_1 OUT/seed_2 --json floor.json

An ECE measured on a few hundred volumes is partly sampling noise: even a model whose confidences are exactly
right would show one. For each model folder written by `train.py`, this takes its top-class confidences on the
**validation** split (raw, and with the temperature `train.py` fitted there), and simulates a perfectly calibrated
model with those confidences on as many volumes as the test split holds (`calibration.ece_of_a_calibrated_model`,
2,000 draws): the mean ECE and its 5th-95th percentiles. Beside it, the test ECE that `train.py` recorded at the end
of the run (`test_results.json`, read from the file: the test split is not read again).

That floor takes the temperature as known. `train.py` fits it on the validation split, a few dozen to a few
hundred volumes, and a temperature that is off moves every test probability at once. The second simulation
(`calibration.ece_after_a_fitted_temperature`, `--protocol_draws` draws) is the floor of that whole protocol:
a model that the run's own temperature makes exactly right, on volumes drawn from its validation logits, a
temperature fitted on as many such volumes as the validation split holds, the ECE on as many as the test split
holds; it reports the spread of the fitted temperatures too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vivit_medmnist import VivitMedmnistForVideoClassification
from vivit_medmnist.calibration import (
    calibrated_probabilities,
    ece_after_a_fitted_temperature,
    ece_of_a_calibrated_model,
    expected_calibration_error,
)
from vivit_medmnist.cpu_speed import autocast_for, prepare_for_inference
from vivit_medmnist.data import load_medmnist3d

REPO = Path(__file__).resolve().parents[1]


def validation_logits(model, dataset_name: str, size: int, data_dir: str) -> tuple[np.ndarray, np.ndarray, int]:
    """The model's validation logits (as `train.py` evaluates on this machine: bf16 where native), the labels,
    and the number of test volumes."""
    splits = load_medmnist3d(dataset_name, size=size, data_dir=data_dir, download=False)
    rows = splits["validation"].with_format("numpy")
    volumes = torch.from_numpy(np.asarray(rows["volume"])).float().div_(255).unsqueeze(2)
    bf16 = prepare_for_inference(model, "cpu")
    with torch.inference_mode(), autocast_for("cpu", bf16):
        logits = torch.cat([model(pixel_values=chunk).logits.float() for chunk in volumes.split(64)])
    return logits.numpy(), np.asarray(rows["label"]).reshape(-1), len(splits["test"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="model folders written by train.py")
    parser.add_argument("--dataset_name", default="adrenalmnist3d")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--protocol_draws", type=int, default=500, help="draws of the fitted-T floor")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    report = {"settings": vars(args), "models": {}}
    for folder in map(Path, args.models):
        model = VivitMedmnistForVideoClassification.from_pretrained(folder)
        temperature = model.config.calibration_temperature
        logits, labels, test_volumes = validation_logits(
            model, args.dataset_name, model.config.volume_size[0], args.data_dir
        )
        row = {"temperature": temperature, "test_volumes": test_volumes}
        for name, t in (("raw", None), ("scaled", temperature)) if temperature else (("raw", None),):
            probabilities = calibrated_probabilities(logits, t)
            row[f"validation_ece_{name}"] = expected_calibration_error(probabilities, labels)
            row[f"floor_{name}"] = ece_of_a_calibrated_model(probabilities, test_volumes, draws=args.draws)
        if temperature:
            row["floor_fitted_temperature"] = ece_after_a_fitted_temperature(
                logits, temperature, len(labels), test_volumes, draws=args.protocol_draws
            )
        recorded = folder / "test_results.json"
        if recorded.is_file():
            results = json.loads(recorded.read_text())
            row["recorded_test_ece_raw"] = results.get("test_ece")
            row["recorded_test_ece_scaled"] = results.get("test_calibrated_ece")
        report["models"][str(folder)] = row
        for name in ("raw", "scaled"):
            if f"floor_{name}" in row:
                floor = row[f"floor_{name}"]
                print(
                    f"{folder} ({name}, T {temperature}): a calibrated model's ECE on {test_volumes} volumes "
                    f"{floor['mean']:.3f} [{floor['p5']:.3f}, {floor['p95']:.3f}]; recorded test ECE "
                    f"{row.get(f'recorded_test_ece_{name}')}",
                    flush=True,
                )
        if "floor_fitted_temperature" in row:
            floor = row["floor_fitted_temperature"]
            print(
                f"{folder} (T fitted on {len(labels)} volumes, as train.py does): the ECE it leaves on "
                f"{test_volumes} {floor['mean']:.3f} [{floor['p5']:.3f}, {floor['p95']:.3f}]; fitted T "
                f"[{floor['temperature_p5']:.3f}, {floor['temperature_p95']:.3f}]",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
