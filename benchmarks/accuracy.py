#!/usr/bin/env python
"""Accuracy of a recipe over several seeds: train each seed with scripts/train.py, then report mean ± std.

    python benchmarks/accuracy.py --recipe recipes/adrenalmnist3d.yaml --output_root /tmp/acc/adrenal \
        [--seeds 0 1 2] [--data_dir ../shared/data] [--jobs 2] [-- MORE TRAIN.PY OPTIONS]
    python benchmarks/accuracy.py --output_root /tmp/acc/adrenal --summarize_only

For each seed S it runs, as a child process,

    python scripts/train.py --recipe RECIPE --data_dir DATA_DIR --output_dir OUTPUT_ROOT/seed_S --seed S [EXTRA ...]

A seed whose folder already holds `all_results.json` is not trained again; one with checkpoints but no results
(an interrupted run) is resumed (`--resume_from_checkpoint`). With `--jobs N`, N seeds train at once, each with
`OMP_NUM_THREADS` = cores / N (on 2 cores, two 1-thread runs get more done than one 2-thread run).

The report, per seed and as mean ± sample standard deviation (ddof = 1) over the seeds, gives how the final
model fits its training split (train.py's `train_eval_*`: loss, accuracy and AUC on the unaugmented training
volumes) and the training loss of the last epoch (on augmented batches), the validation metrics of the final
model (the best checkpoint with `load_best_model_at_end`, which selects on validation only) with the mean
validation AUC over the last 10 epochs, and the test metrics, which train.py computes once, at the end of each
run, and which steer nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "auc")
CALIBRATION = ("test_ece", "test_calibrated_ece", "calibration_temperature")


def train_command(args, seed: int, output_dir: Path) -> list[str]:
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--recipe", args.recipe]
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    command += ["--output_dir", str(output_dir), "--seed", str(seed), *args.extra]
    if (output_dir / "checkpoints").is_dir() and any((output_dir / "checkpoints").glob("checkpoint-*")):
        command.append("--resume_from_checkpoint")
    return command


def say(line: str) -> None:
    """One whole line at once: print() writes the text and its newline separately, so lines from seeds trained
    in parallel threads can run together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_seed(args, seed: int, threads: int) -> float:
    """Train one seed (unless its results exist); return the wall time in seconds (0 when skipped)."""
    output_dir = Path(args.output_root) / f"seed_{seed}"
    if (output_dir / "all_results.json").is_file():
        say(f"seed {seed}: {output_dir}/all_results.json exists, not training again")
        return 0.0
    command = train_command(args, seed, output_dir)
    say(f"seed {seed}: {shlex.join(command)}")
    log_file = Path(args.output_root) / f"seed_{seed}.log"  # beside, not in, the publishable folder
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(log_file, "a") as log:
        done = subprocess.run(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: train.py failed with exit code {done.returncode}, see {log_file}")
    # the largest resident set of any train.py child so far (Linux: KiB); with --jobs 1, this seed's peak
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    say(f"seed {seed}: peak memory of the training processes so far {peak_mib:.0f} MiB (max RSS)")
    return time.perf_counter() - start


def load_run(run_dir: Path) -> dict[str, float]:
    results_file = run_dir / "all_results.json"
    if not results_file.is_file():
        raise SystemExit(f"{run_dir}: expected all_results.json from a finished train.py run, found none")
    results = json.loads(results_file.read_text())
    row = {}
    for split in ("train_eval", "eval", "test"):
        for metric in METRICS:
            key = f"{split}_{metric}"
            if key not in results and split == "train_eval":
                continue  # runs from before train.py scored the training split
            if key not in results:
                raise SystemExit(f"{results_file}: expected the key {key!r}, got {sorted(results)}")
            row[key] = float(results[key])
    if "train_eval_loss" in results:
        row["train_eval_loss"] = float(results["train_eval_loss"])
    for key in CALIBRATION:  # runs since issue 19: the test ECE before and after temperature scaling
        if key in results:
            row[key] = float(results[key])
    row.update(curve_figures(run_dir))
    return row


def curve_figures(run_dir: Path) -> dict[str, float]:
    """From the last checkpoint's log history: the mean validation AUC over the last 10 epochs (a figure that does
    not depend on picking the best epoch) and the last epoch's training loss (on augmented batches)."""
    states = sorted(
        (run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.rsplit("-", 1)[1]),
    )
    if not states:
        return {}
    history = json.loads(states[-1].read_text())["log_history"]
    aucs = [entry["eval_auc"] for entry in history if "eval_auc" in entry]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    figures = {}
    if aucs:
        figures["eval_auc_last10"] = statistics.fmean(aucs[-10:])
    if losses:
        figures["last_epoch_loss"] = float(losses[-1])
    return figures


def summarize(output_root: Path) -> dict:
    runs = {}
    run_dirs = [p for p in output_root.glob("seed_*") if p.is_dir() and p.name[5:].isdigit()]
    for run_dir in sorted(run_dirs, key=lambda p: int(p.name[5:])):
        if (run_dir / "all_results.json").is_file():
            runs[run_dir.name] = load_run(run_dir)
    if not runs:
        raise SystemExit(f"{output_root}: expected seed_*/all_results.json from finished runs, found none")
    summary = {}
    for key in set.intersection(*(set(run) for run in runs.values())):
        values = [run[key] for run in runs.values()]
        summary[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return {"runs": runs, "summary": summary}


def print_report(report: dict) -> None:
    columns = [f"{split}_{metric}" for split in ("eval", "test") for metric in METRICS]
    summary = report["summary"]
    if "eval_auc_last10" in summary:
        columns.insert(2, "eval_auc_last10")
    if "train_eval_loss" in summary:  # how well the final model fits its (unaugmented) training split
        columns = ["train_eval_loss", *(f"train_eval_{metric}" for metric in METRICS), *columns]
    if "last_epoch_loss" in summary:
        columns.insert(0, "last_epoch_loss")
    columns += [key for key in CALIBRATION if key in summary]
    names = {"last_epoch_": "last epoch's ", "train_eval_": "train ", "eval_": "val ", "test_": "test ",
             "calibration_": "calibration "}  # fmt: skip
    print("| run | " + " | ".join(_header(c, names) for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, run in report["runs"].items():
        print(f"| {name} | " + " | ".join(f"{run[c]:.3f}" for c in columns) + " |")
    summary = report["summary"]
    print(
        f"| mean ± std ({len(report['runs'])}) | "
        + " | ".join(f"{summary[c]['mean']:.3f} ± {summary[c]['std']:.3f}" for c in columns)
        + " |"
    )


def _header(column: str, names: dict[str, str]) -> str:
    prefix = next(p for p in names if column.startswith(p))
    return names[prefix] + column[len(prefix) :]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default=str(REPO_ROOT / "recipes" / "adrenalmnist3d.yaml"))
    parser.add_argument("--output_root", required=True, help="seed S trains into OUTPUT_ROOT/seed_S")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--data_dir", default=None, help="passed to train.py (default: the recipe's or its own)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at once")
    parser.add_argument(
        "--summarize_only", action="store_true", help="report the finished runs, train nothing"
    )
    parser.add_argument(
        "--json", metavar="OUT", help="also write the per-seed metrics and the summary as JSON"
    )
    parser.add_argument("extra", nargs="*", help="more train.py options, after --")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    output_root = Path(args.output_root)
    if not args.summarize_only:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            walls = list(pool.map(lambda seed: train_seed(args, seed, threads), args.seeds))
        for seed, wall in zip(args.seeds, walls):
            if wall:
                print(f"seed {seed}: trained in {wall:.0f} s", flush=True)
    report = summarize(output_root)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
