#!/usr/bin/env python
"""The cost of your own volumes: preprocessing a folder of large NIfTI files once, and training on them after.

    python benchmarks/volume_folder.py --root /tmp/volumes --json volume_folder.json   # 2,000 volumes of 160^3
    python benchmarks/volume_folder.py --root /tmp/volumes --count 200 --edge 96         # a quick look

1. Generates `--count` CT-like NIfTI volumes (`.nii`, int16 Hounsfield units, `--edge`^3 voxels of 0.8 x 0.8 x
   2.0 mm: a body of soft tissue in air, one organ-like ellipsoid, noise; half the classes add a small dense
   lesion) into `ROOT/{lesion,no_lesion}/`, unless they are there already.
2. Preprocesses them once with `vivit_medmnist.volume_folder.load_volume_folder` into 64^3 uint8 volumes
   (abdominal window -160..240 HU, aspect kept with the voxel spacing; `--num_proc` processes), timing it, with
   the peak resident memory of the process and of its workers; and again at a tenth of the volumes, to show that
   the peak does not grow with their number. A second load (the cache) is timed too.
3. Trains `recipes/medmnist3d_64.yaml`'s model for one epoch on the preprocessed volumes, and one epoch on
   AdrenalMNIST3D's 64^3 `.npz` (`--data_dir`) with the same settings: `train.py`'s seconds per volume on each.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPACING = (2.0, 0.8, 0.8)  # D, H, W in mm


def make_volume(rng: np.random.Generator, edge: int, lesion: bool) -> np.ndarray:
    grid = np.ogrid[:edge, :edge, :edge]
    centre = np.array([edge / 2] * 3) + rng.normal(0, edge / 20, 3)
    body = sum(((g - c) / (edge * 0.45)) ** 2 for g, c in zip(grid, centre)) <= 1
    volume = np.where(body, 40, -1000).astype(np.float32)  # soft tissue in air
    organ_centre = centre + rng.normal(0, edge / 10, 3)
    radii = rng.uniform(edge / 8, edge / 5, 3)
    organ = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, organ_centre, radii)) <= 1
    volume[organ] = 90
    if lesion:
        spot = organ_centre + rng.normal(0, edge / 30, 3)
        volume[sum((g - c) ** 2 for g, c in zip(grid, spot)) <= (edge / 25) ** 2] = 200
    volume += rng.normal(0, 15, volume.shape).astype(np.float32)
    return volume.astype(np.int16)


def generate(root: Path, count: int, edge: int) -> float:
    import nibabel

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    affine = np.diag([*SPACING, 1.0])
    for index in range(count):
        name = "lesion" if index % 2 else "no_lesion"
        path = root / name / f"{index:05d}.nii"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        nibabel.save(nibabel.Nifti1Image(make_volume(rng, edge, bool(index % 2)), affine), path)
    return time.perf_counter() - start


PREPROCESS = r"""
import json, resource, sys, time
from vivit_medmnist import VivitMedmnistImageProcessor
from vivit_medmnist.volume_folder import load_volume_folder
root, cache, num_proc, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
processor = VivitMedmnistImageProcessor(intensity_window=[-160, 240], keep_aspect_ratio=True, do_resize=True, size=64)
if limit:  # a subset: the first files of each class, linked into their own folder
    import os, pathlib
    sub = pathlib.Path(cache) / "subset"
    for cls in ("lesion", "no_lesion"):
        (sub / cls).mkdir(parents=True, exist_ok=True)
        for p in sorted(pathlib.Path(root, cls).iterdir())[: limit // 2]:
            if not (sub / cls / p.name).exists():
                os.symlink(p, sub / cls / p.name)
    root = str(sub)
start = time.perf_counter()
data = load_volume_folder(root, processor, cache_dir=cache, num_proc=num_proc)
first = time.perf_counter() - start
start = time.perf_counter()
load_volume_folder(root, processor, cache_dir=cache, num_proc=num_proc)
second = time.perf_counter() - start
print(json.dumps({
    "volumes": sum(len(d) for d in data.values()),
    "seconds": first,
    "cached_seconds": second,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_rss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def preprocess(root: Path, cache: Path, num_proc: int, limit: int = 0) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PREPROCESS, str(root), str(cache), str(num_proc), str(limit)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_epoch(args_in: list[str], output: Path) -> dict:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--recipe", "medmnist3d_64", *args_in,
               "--size", "64", "--num_train_epochs", "1", "--eval_strategy", "no", "--save_strategy", "no",
               "--output_dir", str(output), "--disable_tqdm", "true", "--report_to", "none",
               "--config_overrides", "conv_stem_scale=2"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    metrics = json.loads((output / "train_results.json").read_text())
    volumes = metrics["train_samples_per_second"] * metrics["train_runtime"]
    return {"train_runtime": metrics["train_runtime"], "volumes": round(volumes), "seconds_per_volume": 1 / metrics["train_samples_per_second"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="where the generated volumes go (kept for the next run)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--edge", type=int, default=160)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"), help="holds adrenalmnist3d_64.npz")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--generate_only", action="store_true", help="write the volumes and stop")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    root = Path(args.root)
    report = {"settings": vars(args), "generate_seconds": generate(root, args.count, args.edge)}
    print(f"generated {args.count} volumes of {args.edge}^3 in {report['generate_seconds']:.0f} s", flush=True)
    if args.generate_only:
        return report
    with tempfile.TemporaryDirectory(prefix="volume-folder-") as tmp:
        report["preprocess_tenth"] = preprocess(root, Path(tmp) / "cache_tenth", args.num_proc, args.count // 10)
        print(f"a tenth: {report['preprocess_tenth']}", flush=True)
        report["preprocess"] = preprocess(root, Path(tmp) / "cache", args.num_proc)
        print(f"all: {report['preprocess']}", flush=True)
        if not args.skip_training:
            folder_args = ["--data_folder", str(root), "--intensity_window", "-160", "240", "--keep_aspect_ratio",
                           "--preprocessing_num_workers", str(args.num_proc)]  # fmt: skip
            shutil.rmtree(Path.home() / ".cache" / "huggingface" / "datasets" / "generator", ignore_errors=True)
            report["epoch_folder"] = train_epoch(folder_args, Path(tmp) / "run_folder")
            report["epoch_npz"] = train_epoch(["--dataset_name", "adrenalmnist3d", "--data_dir", args.data_dir],
                                              Path(tmp) / "run_npz")  # fmt: skip
            print(f"epoch: folder {report['epoch_folder']}, npz {report['epoch_npz']}", flush=True)
    report["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
