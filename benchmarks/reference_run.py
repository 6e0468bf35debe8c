#!/usr/bin/env python
"""Wall time of a full `keras_reference` training run (60 epochs, validation after each) on AdrenalMNIST3D.

    python benchmarks/reference_run.py --output_dir /tmp/keras_reference_adrenal [--data_dir ../shared/data]

Runs, as a child process, exactly

    python scripts/train.py --recipe recipes/keras_reference.yaml --dataset_name adrenalmnist3d \
        --data_dir DATA_DIR --output_dir OUTPUT_DIR [EXTRA ...]

and reports the wall time of the whole command (start-up, data loading, 60 epochs of training with per-epoch
validation and checkpoints, the final validation and test evaluation, writing the model folder), the training
time alone (`train_runtime` from the Trainer) and the test metrics from OUTPUT_DIR/all_results.json. Extra
arguments after `--` go to train.py. The goal in issue 5 is <= 4 minutes on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output_dir", required=True, help="where train.py writes (must be new or resumable)"
    )
    parser.add_argument("--data_dir", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", metavar="OUT", help="also write the timing and metrics as JSON")
    parser.add_argument("--dry_run", action="store_true", help="print the command and exit")
    parser.add_argument("extra", nargs="*", help="more train.py options, after --")
    args = parser.parse_args(argv)

    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "--recipe",
        str(REPO_ROOT / "recipes" / "keras_reference.yaml"),
        "--dataset_name",
        "adrenalmnist3d",
        "--data_dir",
        args.data_dir,
        "--output_dir",
        args.output_dir,
        *args.extra,
    ]
    print("command:", shlex.join(command), flush=True)
    if args.dry_run:
        return
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"train.py failed with exit status {done.returncode} after {wall:.0f} s")

    results = json.loads((Path(args.output_dir) / "all_results.json").read_text())
    summary = {
        "command": shlex.join(command),
        "wall_s": wall,
        "train_runtime_s": results.get("train_runtime"),
        "test": {k: v for k, v in results.items() if k.startswith("test_")},
        "eval": {k: v for k, v in results.items() if k.startswith("eval_")},
    }
    print(f"wall time {wall:.1f} s ({wall / 60:.2f} min); train_runtime {summary['train_runtime_s']} s")
    print("test metrics:", json.dumps(summary["test"], sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
