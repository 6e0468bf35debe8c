#!/usr/bin/env python
"""Where a training run's time goes: the model step, and everything around it.

    python benchmarks/overhead.py --output_dir /tmp/overhead_run [--data_dir ../shared/data] [-- TRAIN.PY OPTIONS]

runs `scripts/train.py --recipe recipes/keras_reference.yaml --dataset_name adrenalmnist3d --data_dir DATA
--output_dir OUT` (options after `--` are added, e.g. `--num_train_epochs 10`) in this process, with timers
around the Trainer's pieces:

- model step: from `on_step_begin` to `on_step_end` of every optimizer step (forward, backward, clipping,
  optimizer and scheduler step);
- data: `Trainer.get_batch_samples` (reading rows, augmenting, collating, moving to the device);
- validation: `Trainer._evaluate` during training (the per-epoch validation with its metrics);
- checkpoints: `Trainer._save_checkpoint`.

It prints the Trainer's `train_runtime`, steps × median model step (the time the run would take if nothing but
the model step cost anything), the overhead fraction `1 - steps × median step / train_runtime`, and each piece
as a share of `train_runtime` ("other" is what none of the timers saw: logging, callbacks, the epoch loop).
`--json FILE` writes every number.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.steps: list[float] = []
        self._step_start: float | None = None

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def callback(self):
        from transformers import TrainerCallback

        timers = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timers._step_start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timers.steps.append(time.perf_counter() - timers._step_start)

        return StepTimer()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="a new folder for the run")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--recipe", default="keras_reference")
    parser.add_argument("--json", help="write every number as JSON")
    parser.add_argument("train_args", nargs="*", help="after --: more scripts/train.py options")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import Trainer

    from vivit_medmnist import train

    timers = Timers()
    timers.wrap(Trainer, "get_batch_samples", "data")
    timers.wrap(Trainer, "_evaluate", "validation")
    timers.wrap(Trainer, "_save_checkpoint", "checkpoints")
    build_trainer = train.build_trainer

    def build_timed_trainer(*a, **kw):
        trainer = build_trainer(*a, **kw)
        trainer.add_callback(timers.callback())
        return trainer

    train.build_trainer = build_timed_trainer
    command = [
        "--recipe", args.recipe, "--dataset_name", "adrenalmnist3d", "--data_dir", args.data_dir,
        "--output_dir", args.output_dir, "--disable_tqdm", "true", *args.train_args,
    ]  # fmt: skip
    wall = time.perf_counter()
    train.main(command)
    wall = time.perf_counter() - wall

    results = json.loads((Path(args.output_dir) / "all_results.json").read_text())
    runtime = results["train_runtime"]
    steps = len(timers.steps)
    median = statistics.median(timers.steps)
    pieces = {"model step": sum(timers.steps), **timers.seconds}
    pieces["other"] = runtime - sum(pieces.values())
    report = {
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "train_runtime_s": runtime,
        "wall_s": wall,
        "steps": steps,
        "median_step_s": median,
        "steps_x_median_step_s": steps * median,
        "overhead_fraction": 1 - steps * median / runtime,
        "seconds": pieces,
        "share_of_train_runtime": {name: value / runtime for name, value in pieces.items()},
    }
    print(
        f"\ntrain_runtime {runtime:.1f} s (whole command {wall:.1f} s), {steps} steps, median model step "
        f"{1000 * median:.1f} ms: steps x median step {steps * median:.1f} s, overhead "
        f"{100 * report['overhead_fraction']:.1f} % of train_runtime"
    )
    for name, value in pieces.items():
        print(f"  {name:<12} {value:8.1f} s  {100 * value / runtime:5.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
