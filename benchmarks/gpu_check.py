#!/usr/bin/env python
"""Everything issue 13 asks of a GPU, in one command, every figure written to `OUT/gpu_check.json`.

    bash benchmarks/gpu_check.sh OUT [DATA_DIR]                            # on the GPU machine (installs wheels)
    python benchmarks/gpu_check.py --output_dir OUT --data_dir ../shared/data --dry_run   # the same steps, tiny, CPU

1. the CUDA tests: `pytest -m gpu tests/test_gpu.py` (bf16 tracks fp32, SDPA's fused kernel runs,
   torch.compile(fullgraph=True) trains and infers, GPU -> CPU round trip, both encoders);
2. the full `keras_reference` recipe on AdrenalMNIST3D 28³ through `scripts/train.py` (60 epochs, per-epoch
   validation and checkpoints) in fp32, with `--bf16 true`, and with `--bf16 true --torch_compile true`: wall
   time of the whole command and the Trainer's `train_runtime`;
3. `benchmarks/speed.py` on the device at batch 32, 256 and 1024 (fp32, and bf16 at 1024): this model vs
   transformers' native ViViT, training and inference volumes/s and peak GPU memory;
4. training volumes/s at 64³ with 8³ tubelets (512 tokens), batch 32, bf16.

With `--dry_run` every step runs at a tiny size on the CPU (1 epoch of 32 volumes, 1 step of batch 2), so that
the test suite proves the script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


def run(command: list, log: Path, timeout: float) -> dict:
    """Run `command` from the repository root; its output goes to `log`; return its status and wall time."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(
            [str(c) for c in command],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    return {
        "command": " ".join(map(str, command)),
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
    }


def environment() -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def cuda_tests(out: Path) -> dict:
    result = run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                  "-o", "addopts="],  # not the suite's parallel workers (pytest-xdist is not on the GPU machine)
                 out / "cuda_tests.log", timeout=900)  # fmt: skip
    result["summary"] = (out / "cuda_tests.log").read_text().strip().splitlines()[-1]
    return result


def training_runs(out: Path, data_dir: str, dry_run: bool) -> dict:
    runs = {
        "fp32": [],
        "bf16": ["--bf16", "true"],
        "bf16_compile": ["--bf16", "true", "--torch_compile", "true"],
    }
    if dry_run:  # tiny, on the CPU; torch.compile's CPU build would take minutes
        runs.pop("bf16_compile")
    results = {}
    for name, extra in runs.items():
        folder = out / f"run_{name}"
        command = [
            sys.executable, "scripts/train.py", "--recipe", "keras_reference", "--dataset_name", "adrenalmnist3d",
            "--data_dir", data_dir, "--output_dir", folder, "--disable_tqdm", "true", "--report_to", "none", *extra,
        ]  # fmt: skip
        if dry_run:
            command += ["--num_train_epochs", "1", "--max_train_samples", "32", "--max_eval_samples", "16",
                        "--max_test_samples", "16", "--config_overrides", TINY_MODEL]  # fmt: skip
        result = run(command, out / f"run_{name}.log", timeout=1800)
        if result["returncode"] == 0:
            metrics = json.loads((folder / "all_results.json").read_text())
            result.update(
                train_runtime_s=metrics["train_runtime"],
                test_accuracy=metrics.get("test_accuracy"),
                test_auc=metrics.get("test_auc"),
            )
        results[name] = result
    return results


def speed_runs(out: Path, device: str, dry_run: bool) -> dict:
    settings = {
        "batch_32": ["--batch_size", "32"],
        "batch_256": ["--batch_size", "256"],
        "batch_1024": ["--batch_size", "1024"],
        "batch_1024_bf16": ["--batch_size", "1024", "--bf16"],
        "volume_64_batch_32_bf16": ["--batch_size", "32", "--volume_size", "64", "--bf16"],
    }
    if dry_run:  # --tiny sets batch 2: the three batch sizes would be the same run three times
        settings = {k: settings[k] for k in ("batch_32", "batch_1024_bf16", "volume_64_batch_32_bf16")}
    results = {}
    for name, extra in settings.items():
        report = out / f"speed_{name}.json"
        command = [sys.executable, "benchmarks/speed.py", "--device", device, *extra, "--json", report]
        command += (
            ["--tiny", "--memory_steps", "0"]
            if dry_run
            else ["--rounds", "5", "--steps", "10", "--warmup", "5"]
        )
        result = run(command, out / f"speed_{name}.log", timeout=1200)
        if result["returncode"] == 0:
            data = json.loads(report.read_text())
            result.update(results=data["results"], ratios=data["ratios"], memory=data["memory"])
        results[name] = result
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dry_run", action="store_true", help="every step, tiny, on the CPU")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": args.dry_run}
    report["environment"] = environment()
    for name, step in (
        ("cuda_tests", lambda: cuda_tests(out)),
        ("training", lambda: training_runs(out, args.data_dir, args.dry_run)),
        ("speed", lambda: speed_runs(out, device, args.dry_run)),
    ):
        print(f"{name} ...", flush=True)
        report[name] = step()
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # what is done survives a time-out
    print(json.dumps({k: report[k] for k in ("environment", "cuda_tests")}, indent=2))
    for name, result in report["training"].items():
        print(f"training {name}: exit {result['returncode']}, wall {result['wall_s']:.1f} s, "
              f"train_runtime {result.get('train_runtime_s', float('nan')):.1f} s")  # fmt: skip
    for name, result in report["speed"].items():
        ratios = result.get("ratios", {}).get("ours/native", {})
        summary = ", ".join(f"{mode} {v['median_of_rounds']:.2f}x" for mode, v in ratios.items())
        ours = result.get("results", {}).get("ours", {})
        speeds = ", ".join(f"{mode} {v['volumes_per_s']:.0f} vol/s" for mode, v in ours.items())
        print(f"speed {name}: exit {result['returncode']}; ours {speeds}; ours/native {summary}")
    return report


if __name__ == "__main__":
    main()
