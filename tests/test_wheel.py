"""The package works as a wheel, without a checkout: entry points, packaged recipes and card template.

A fresh virtual environment gets the wheel (`pip install --no-deps`) and sees the already installed dependencies
(torch, transformers, ...) through a path file, but not this checkout: `vivit_medmnist` imports from the wheel.
It trains a tiny model with a packaged recipe (`--recipe keras_reference`), writes the model card, and predicts,
from a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


def run(command: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(c) for c in command], cwd=cwd, env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            root / "dist",
            REPO,
        ],
        root,
    )
    (wheel,) = (root / "dist").glob("vivit_medmnist-*.whl")
    env = root / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env], root)
    # the dependencies installed here (and pip), but not the editable checkout: only that dir, no .pth of it
    (site,) = (env / "lib").glob("python*/site-packages")
    (site / "installed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([env / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], root)
    return env


def test_the_wheel_imports_its_own_code(wheel_env, tmp_path):
    out = run(
        [wheel_env / "bin" / "python", "-c", "import vivit_medmnist; print(vivit_medmnist.__file__)"],
        tmp_path,
    )
    assert out.stdout.strip().startswith(str(wheel_env)), out.stdout
    for name in ("train", "evaluate", "predict", "publish"):
        assert (wheel_env / "bin" / f"vivit-medmnist-{name}").is_file()


def test_the_wheel_trains_from_a_packaged_recipe_writes_the_card_and_predicts(
    wheel_env, shared_data_dir, tmp_path
):
    out = tmp_path / "model"
    run([
        wheel_env / "bin" / "vivit-medmnist-train", "--recipe", "keras_reference",
        "--dataset_name", "adrenalmnist3d", "--data_dir", shared_data_dir, "--output_dir", out,
        "--config_overrides", TINY_MODEL, "--max_train_samples", 32, "--max_eval_samples", 16,
        "--max_test_samples", 16, "--num_train_epochs", 1, "--save_strategy", "no", "--report_to", "none",
    ], tmp_path)  # fmt: skip
    card = (out / "README.md").read_text()
    assert "keras_reference.yaml" in card and "vivit-medmnist-adrenalmnist3d" in card
    np.save(tmp_path / "volume.npy", np.zeros((28, 28, 28), np.uint8))
    run([
        wheel_env / "bin" / "vivit-medmnist-predict", "--model_name_or_path", out, tmp_path / "volume.npy",
        "--output_file", tmp_path / "predictions.json",
    ], tmp_path)  # fmt: skip
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions[0]["label"] in ("normal", "hyperplasia")
