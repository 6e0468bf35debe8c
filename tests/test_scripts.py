"""scripts/evaluate.py, scripts/predict.py and scripts/publish.py, as command lines and in-process.

The reproduction test trains a tiny model with scripts/train.py on the real AdrenalMNIST3D file and checks that
evaluate.py on the saved folder gives that run's test_results.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_runs import run_forked
from test_hub_files import EXPECTED_FILES, add_training_leftovers, make_folder, tiny_model

from vivit_medmnist import VivitMedmnistImageProcessor
from vivit_medmnist.hub_files import REPO_ID_PLACEHOLDER, publishable_files
from vivit_medmnist.metrics import compute_metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
TINY_OVERRIDES = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
TIMING_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time")


def run_script(
    name: str, *args, env: dict | None = None, timeout: float = 300, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python scripts/<name>.py ARGS` as a process of its own: its exit status, stdout and stderr.

    By default the process is forked from the suite's fork server (`forked_runs`), which has imported torch,
    transformers and this package once: the script runs as `__main__` in a real process, only the
    interpreter's start-up (about 8 s of CPU) is skipped. `fresh=True` starts a new interpreter: for what is
    read at import time (HF_HOME, for one) and for the start-up itself.
    """
    argv = [str(SCRIPTS / f"{name}.py"), *map(str, args)]
    if not fresh:
        with tempfile.TemporaryDirectory() as logs:
            return run_forked(argv, Path(logs) / name, timeout=timeout, env=env)
    return subprocess.run(
        [sys.executable, *argv],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def run_in_process(name: str, *args) -> subprocess.CompletedProcess:
    """`scripts/<name>.py ARGS` through its `main` in this process (no interpreter start-up), as a CompletedProcess:
    the exit status (of its SystemExit; a message given to sys.exit is printed to stderr, as Python does), and
    what it printed. For tests of a command's logic; `run_script` tests the command line itself."""
    import contextlib
    import io

    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            load_script(name).main(argv)
            status = 0
        except SystemExit as exit_info:
            code = exit_info.code
            status = 0 if code is None else code if isinstance(code, int) else 1
            if isinstance(code, str):
                print(code, file=sys.stderr)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def load_script(name: str):
    """Import scripts/<name>.py as a module (for the in-process error-path tests)."""
    spec = importlib.util.spec_from_file_location(f"vivit_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A publishable folder of a tiny 2-class (AdrenalMNIST3D labels) model, saved without training."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_folder(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# evaluate.py
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(shared_data_dir, tmp_path_factory) -> Path:
    """The output folder of a real (tiny, 1-epoch, 64-volume) scripts/train.py run on AdrenalMNIST3D."""
    out = tmp_path_factory.mktemp("train_run") / "out"
    proc = run_script(
        "train",
        "--dataset_name",
        "adrenalmnist3d",
        "--data_dir",
        shared_data_dir,
        "--output_dir",
        out,
        "--num_train_epochs",
        1,
        "--config_overrides",
        TINY_OVERRIDES,
        "--max_train_samples",
        64,
        "--per_device_train_batch_size",
        16,
        "--per_device_eval_batch_size",
        64,
        "--seed",
        7,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_calibration_floor_reads_validation_and_the_recorded_test_ece(trained, shared_data_dir, tmp_path):
    import runpy

    script = runpy.run_path(str(REPO_ROOT / "benchmarks" / "calibration_floor.py"), run_name="calibration_floor")
    args = ["--models", str(trained), "--data_dir", str(shared_data_dir), "--draws", "20"]
    report = script["main"]([*args, "--protocol_draws", "10"])
    row = report["models"][str(trained)]
    recorded = json.loads((trained / "test_results.json").read_text())
    assert row["test_volumes"] == 298 and row["recorded_test_ece_raw"] == recorded["test_ece"]
    assert row["temperature"] == json.loads((trained / "config.json").read_text())["calibration_temperature"]
    for name in ("raw", "scaled"):
        assert 0 <= row[f"floor_{name}"]["p5"] <= row[f"floor_{name}"]["mean"] <= row[f"floor_{name}"]["p95"] < 1
    protocol = row["floor_fitted_temperature"]  # T fitted on the 98 validation volumes' simulated labels
    assert 0 <= protocol["p5"] <= protocol["mean"] <= protocol["p95"] < 1
    assert 0 < protocol["temperature_p5"] <= protocol["temperature_p95"]


def test_the_run_records_the_ece_floor_of_its_splits_and_the_card_says_it(trained):
    recorded = json.loads((trained / "eval_results.json").read_text())  # from the validation split and sizes
    temperature = json.loads((trained / "config.json").read_text())["calibration_temperature"]
    assert recorded["calibration_validation_volumes"] == 98  # T was fitted on the whole validation split
    assert 0 < recorded["calibration_ece_floor"] < recorded["calibration_ece_floor_p95"] < 1
    # the simulated model is exactly right after the run's own T: the refitted ones spread around it (this
    # tiny model's T sits at fit_temperature's bound of 20, and so do most refits: hence the 0.1 % of slack)
    low, high = recorded["calibration_temperature_p5"], recorded["calibration_temperature_p95"]
    assert low < high and low <= temperature * 1.001 and temperature <= high * 1.001
    card = " ".join((trained / "README.md").read_text().split())  # the template's line breaks aside
    floor = f"would show a test ECE of {recorded['calibration_ece_floor']:.4f}".rstrip("0")
    assert "with T fitted on 98 validation volumes as here" in card and floor in card, card


def test_evaluate_reproduces_the_training_runs_test_results(trained, shared_data_dir, tmp_path):
    expected = json.loads((trained / "test_results.json").read_text())
    assert {"test_accuracy", "test_auc", "test_loss"} <= set(expected)
    output = tmp_path / "eval" / "test.json"
    proc = run_script(
        "evaluate",
        "--model_name_or_path",
        trained,
        "--dataset_name",
        "adrenalmnist3d",
        "--data_dir",
        shared_data_dir,
        "--split",
        "test",
        "--output_file",
        output,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(output.read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{") :]) == got  # printed too
    assert set(got) == set(expected)
    for key, value in expected.items():
        if not key.endswith(TIMING_SUFFIXES):
            assert got[key] == pytest.approx(value, abs=1e-6), key


def test_training_run_folder_is_publishable(trained):
    names = set(publishable_files(trained))
    assert EXPECTED_FILES <= names
    assert "test_results.json" in names
    assert not any("checkpoint" in name or name.endswith((".bin", ".pt", ".pth")) for name in names)


def test_evaluate_validation_split_uses_eval_prefix_and_the_model_logits(folder, shared_data_dir, tmp_path):
    from vivit_medmnist.data import load_medmnist3d

    output = tmp_path / "val.json"
    load_script("evaluate").main(
        [
            "--model_name_or_path",
            str(folder),
            "--dataset_name",
            "adrenalmnist3d",
            "--data_dir",
            str(shared_data_dir),
            "--split",
            "validation",
            "--output_file",
            str(output),
            "--per_device_eval_batch_size",
            "40",
            "--precision",
            "fp32",  # as the direct model call below
        ]
    )
    got = json.loads(output.read_text())
    assert {"eval_accuracy", "eval_auc", "eval_loss"} <= set(got)
    assert not any(key.startswith("test_") for key in got)

    validation = load_medmnist3d("adrenalmnist3d", data_dir=shared_data_dir)["validation"][:]
    inputs = VivitMedmnistImageProcessor()(validation["volume"], return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model()(**inputs).logits.numpy()
    labels = np.asarray(validation["label"], dtype=np.int64)
    direct = compute_metrics((logits, labels))
    assert got["eval_accuracy"] == pytest.approx(direct["accuracy"], abs=1e-9)
    assert got["eval_auc"] == pytest.approx(direct["auc"], abs=1e-6)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    assert got["eval_loss"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize(
    "labels, match",
    [
        (["normal", "hyperplasia", "other"], "has 3 classes but adrenalmnist3d has 2"),
        (["vessel", "aneurysm"], "are not adrenalmnist3d's labels"),
    ],
)
def test_evaluate_refuses_a_model_of_another_dataset(labels, match, shared_data_dir, tmp_path, capsys):
    tiny_model(labels).save_pretrained(tmp_path)
    VivitMedmnistImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate").main(
            [
                "--model_name_or_path",
                str(tmp_path),
                "--dataset_name",
                "adrenalmnist3d",
                "--data_dir",
                str(shared_data_dir),
            ]
        )
    assert match in str(exit_info.value.code)


def test_evaluate_bad_arguments_fail_clearly(folder, tmp_path, monkeypatch):
    evaluate = load_script("evaluate")
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cases = [
        (
            ["--model_name_or_path", str(tmp_path / "missing"), "--dataset_name", "adrenalmnist3d"],
            "no such model folder",
        ),
        (["--model_name_or_path", str(empty), "--dataset_name", "adrenalmnist3d"], "cannot load a model"),
        (
            ["--model_name_or_path", str(folder), "--dataset_name", "nosuchmnist3d"],
            "nosuchmnist3d: not a MedMNIST 3D set",
        ),
        (
            [
                "--model_name_or_path",
                str(folder),
                "--dataset_name",
                "adrenalmnist3d",
                "--data_dir",
                str(empty),
            ],
            "adrenalmnist3d.npz not found",
        ),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the data loader reads it at call time: no download attempt
    for argv, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(argv)
        # sys.exit(message): the message goes to stderr and the exit status is 1
        assert isinstance(exit_info.value.code, str) and match in exit_info.value.code, (
            argv,
            exit_info.value.code,
        )


# --------------------------------------------------------------------------------------------------------------
# predict.py
# --------------------------------------------------------------------------------------------------------------


def direct_probabilities(volumes: np.ndarray) -> np.ndarray:
    inputs = VivitMedmnistImageProcessor()(volumes, return_tensors="pt")
    with torch.no_grad():
        return tiny_model()(**inputs).logits.softmax(-1).numpy()


def test_predict_labels_npy_and_npz_like_a_direct_model_call(folder, tmp_path):
    rng = np.random.default_rng(3)
    single = rng.integers(0, 256, (28, 28, 28), dtype=np.uint8)
    batch = rng.integers(0, 256, (3, 28, 28, 28), dtype=np.uint8)
    scaled = rng.random((28, 28, 28)).astype(np.float32)
    np.save(tmp_path / "single.npy", single)
    np.save(tmp_path / "batch.npy", batch)
    np.savez(tmp_path / "both.npz", volumes=batch[:2], scaled=scaled)
    output = tmp_path / "predictions.json"
    proc = run_script(
        "predict",
        "--model_name_or_path",
        folder,
        tmp_path / "single.npy",
        tmp_path / "batch.npy",
        tmp_path / "both.npz",
        "--top_k",
        2,
        "--output_file",
        output,
        "--precision",
        "fp32",  # as the direct model call below (auto would use bf16 on a CPU where it is faster)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(output.read_text())
    expected_volumes = [single, *batch, *batch[:2], scaled]
    assert [(Path(r["file"]).name, r["key"], r["index"]) for r in records] == [
        ("single.npy", None, None),
        ("batch.npy", None, 0),
        ("batch.npy", None, 1),
        ("batch.npy", None, 2),
        ("both.npz", "volumes", 0),
        ("both.npz", "volumes", 1),
        ("both.npz", "scaled", None),
    ]
    names = ["normal", "hyperplasia"]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "probabilities: raw softmax (the model has no calibration_temperature)"
    lines = lines[1:]
    assert len(lines) == len(records)
    for record, volume, line in zip(records, expected_volumes, lines):
        probabilities = direct_probabilities(volume)[0]
        order = np.argsort(-probabilities)
        assert record["label"] == names[order[0]] and record["label_id"] == order[0]
        assert [t["label"] for t in record["top_k"]] == [names[i] for i in order]
        np.testing.assert_allclose(
            [t["probability"] for t in record["top_k"]], probabilities[order], atol=1e-5
        )
        assert line.split(": ", 1)[1].startswith(names[order[0]])
        assert f"{names[order[0]]} {probabilities[order[0]]:.4f}" in line


def test_predict_key_selects_one_array(folder, tmp_path, capsys):
    np.savez(
        tmp_path / "two.npz", a=np.zeros((28, 28, 28), np.uint8), b=np.full((2, 28, 28, 28), 255, np.uint8)
    )
    load_script("predict").main(
        ["--model_name_or_path", str(folder), str(tmp_path / "two.npz"), "--key", "b"]
    )
    lines = capsys.readouterr().out.strip().splitlines()[1:]  # after the line saying how probabilities are made
    assert [line.split(":")[0] for line in lines] == [
        f"{tmp_path / 'two.npz'}[b][0]",
        f"{tmp_path / 'two.npz'}[b][1]",
    ]


class Trap:
    """Unpickling this creates a marker file: proof that a file was (wrongly) unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_predict_never_unpickles(folder, tmp_path):
    marker = tmp_path / "unpickled"
    np.save(tmp_path / "objects.npy", np.array([Trap(marker), 1], dtype=object), allow_pickle=True)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Trap(marker)))
    np.savez(tmp_path / "objects.npz", volumes=np.array([Trap(marker)], dtype=object))
    predict = load_script("predict")
    for name in ("objects.npy", "raw.npy", "objects.npz"):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--model_name_or_path", str(folder), str(tmp_path / name)])
        assert "refusing to unpickle" in str(exit_info.value.code), exit_info.value.code
    assert not marker.exists()


def test_predict_bad_inputs_fail_clearly(folder, tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((28, 28), np.uint8))
    np.save(tmp_path / "small.npy", np.zeros((2, 16, 16, 16), np.uint8))
    np.save(tmp_path / "int16.npy", np.full((28, 28, 28), -1, np.int16))  # integers must lie in 0..255
    np.save(tmp_path / "unscaled.npy", np.full((28, 28, 28), 200.0, np.float32))
    np.savez(tmp_path / "one.npz", a=np.zeros((28, 28, 28), np.uint8))
    (tmp_path / "volume.txt").write_text("0 1 2")
    predict = load_script("predict")
    cases = [
        ("flat.npy", [], "expected one volume (28, 28, 28) or a batch (N, 28, 28, 28), got shape (28, 28)"),
        ("small.npy", [], "got shape (2, 16, 16, 16)"),
        (
            "int16.npy",
            [],
            "int16.npy: expected uint8 volumes (0..255) or floats scaled to [0, 1], got torch.int16 values in [-1, -1]",
        ),
        ("unscaled.npy", [], "scaled to [0, 1]"),
        ("one.npz", ["--key", "b"], "no array named 'b'; the file holds ['a']"),
        ("missing.npy", [], "no such file"),
        ("volume.txt", [], "expected a .npy, .npz, .nii or .nii.gz file, got '.txt'"),
    ]
    for name, extra, match in cases:
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["--model_name_or_path", str(folder), str(tmp_path / name), *extra])
        assert isinstance(exit_info.value.code, str) and match in exit_info.value.code, (
            name,
            exit_info.value.code,
        )
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model_name_or_path", str(tmp_path / "no_model"), str(tmp_path / "one.npz")])
    assert "no such model folder" in str(exit_info.value.code)


# --------------------------------------------------------------------------------------------------------------
# publish.py
# --------------------------------------------------------------------------------------------------------------


def test_publish_dry_run_lists_exactly_the_allowed_files_and_checks_them(folder, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(folder, target)
    add_training_leftovers(
        target
    )  # checkpoints/, training_args.bin, *.pkl, trainer_state.json, runs/, results
    proc = run_script("publish", target, "--repo_id", "someone/vivit-adrenal", "--dry_run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = [
        line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and "total" not in line
    ]
    assert listed == sorted(EXPECTED_FILES | {"all_results.json", "test_results.json"})
    sizes = [
        line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("  ") and "total" not in line
    ]
    assert all(len(size) == 2 and size[1] in ("B", "KB", "MB") for size in sizes)
    assert "Check passed: the files load with trust_remote_code=True without vivit_medmnist" in proc.stdout
    assert "nothing uploaded" in proc.stdout.lower()
    assert REPO_ID_PLACEHOLDER in (target / "README.md").read_text()  # a dry run changes nothing


def test_publish_without_a_token_fails_clearly(folder, tmp_path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf_home"), "HUGGING_FACE_HUB_TOKEN": ""}
    # HF_HOME (where the token would be) is read when huggingface_hub is imported: a new interpreter
    proc = run_script("publish", folder, "--repo_id", "someone/vivit-adrenal", env=env, fresh=True)
    assert proc.returncode != 0
    assert "no Hugging Face token found" in proc.stderr and "hf auth login" in proc.stderr


def test_publish_bad_arguments_fail_clearly(folder, tmp_path, capsys):
    publish = load_script("publish")
    with pytest.raises(SystemExit) as exit_info:
        publish.main([str(folder)])  # no --repo_id and no --dry_run
    assert exit_info.value.code == 2 and "--repo_id ORG/NAME is required" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        publish.main([str(broken), "--dry_run"])
    assert exit_info.value.code == 1 and "missing config.json" in capsys.readouterr().err
    # the real command line: a non-zero exit and the message on stderr
    proc = run_script("publish", tmp_path / "missing", "--dry_run")
    assert proc.returncode != 0 and "is not a folder" in proc.stderr


def test_publish_in_offline_mode_fails_before_any_request(folder, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_test")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        load_script("publish").main([str(folder), "--repo_id", "someone/vivit-adrenal"])
    assert "offline mode is on" in str(exit_info.value.code)
