"""Faults (issue 24): a run killed at any moment resumes to the same weights, a damaged folder or checkpoint is named,
a second run on a folder in use is refused, and publishing uploads only what the model needs.

The kill test runs `scripts/train.py` as its own process each time (forked from a server that has done the imports,
`forked_runs.py`) and kills it with SIGKILL; the rest calls the commands in-process.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_runs import ForkedRun
from safetensors.torch import load_file
from test_hub_files import make_folder
from test_safety import assert_user_error, digest, folder_digests
from test_scripts import load_script, run_in_process, run_script

from vivit_medmnist.checkpoints import checkpoint_problem, complete_checkpoints, resolve_checkpoint
from vivit_medmnist.hub_files import code_files, left_out_files, publishable_files
from vivit_medmnist.safe_io import FolderInUse, lock_folder, unlock_folder

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
TINY = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


def kill_run_args(data_dir: Path, output_dir: Path) -> list[str]:
    """12 steps (3 epochs of 4), a checkpoint after every step (so that random kills land in checkpoint writes),
    augmentation and dropout on (so that their random state must be restored)."""
    return [
        "--dataset_name", "adrenalmnist3d", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--config_overrides", TINY + ",drop_path_rate=0.1", "--max_train_samples", "64", "--max_eval_samples", "16",
        "--max_test_samples", "16", "--per_device_train_batch_size", "16", "--num_train_epochs", "3",
        "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2", "--eval_strategy", "epoch",
        "--max_shift", "2", "--flip_axes", "2", "--seed", "5", "--disable_tqdm", "true", "--report_to", "none",
        "--resume_from_checkpoint",  # bare: the newest complete checkpoint, or the beginning
    ]  # fmt: skip


# Kills the process in the middle of writing a checkpoint: after the weights, before the optimizer state
# (`KILL_IN_SAVE=optimizer`), or after the optimizer state, before trainer_state.json (`KILL_IN_SAVE=state`).
KILL_IN_SAVE = """
import os, runpy, signal, sys
from transformers import Trainer

where, step = os.environ["KILL_IN_SAVE"], int(os.environ["KILL_AT_STEP"])
original = Trainer._save_rng_state if where == "state" else Trainer._save_optimizer_and_scheduler

def killing(self, output_dir):
    if self.state.global_step >= step:
        if where == "state":
            original(self, output_dir)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)

setattr(Trainer, "_save_rng_state" if where == "state" else "_save_optimizer_and_scheduler", killing)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start(args: list[str], logs: Path, env: dict | None = None, harness: Path | None = None) -> ForkedRun:
    logs.parent.mkdir(parents=True, exist_ok=True)
    return ForkedRun([*([str(harness)] if harness else []), str(TRAIN), *args], logs, env)


def test_a_run_killed_at_ten_moments_resumes_to_the_same_weights(shared_data_dir, tmp_path):
    reference = tmp_path / "reference"
    began = time.perf_counter()
    logs = tmp_path / "logs"
    done = start(kill_run_args(shared_data_dir, reference), logs / "reference")
    _, err = done.communicate(timeout=600)
    duration = time.perf_counter() - began
    assert done.returncode == 0, err[-3000:]

    output_dir = tmp_path / "killed"
    args = kill_run_args(shared_data_dir, output_dir)
    harness = tmp_path / "kill_in_save.py"
    harness.write_text(textwrap.dedent(KILL_IN_SAVE))
    rng = random.Random(24)
    attempts = []
    # two kills in the middle of a checkpoint write, at steps 3 and 7, then eight at random moments of a run
    for where, step in (("optimizer", 3), ("state", 7)):
        proc = start(args, logs / f"in_save_{where}", {"KILL_IN_SAVE": where, "KILL_AT_STEP": str(step)}, harness)
        attempts.append((f"in save ({where}) at step {step}", *proc.communicate(timeout=600), proc.returncode))
        assert proc.returncode == -signal.SIGKILL, attempts[-1][2][-3000:]
    assert any(checkpoint_problem(p) for p in (output_dir / "checkpoints").glob("checkpoint-*")), (
        "a kill in the middle of a save must leave a partial checkpoint behind"
    )
    # The second run resumed (it did not start again): from checkpoint-2, in the middle of the first epoch of 4
    # steps, past the damaged checkpoint-3 that the first kill left. Steps 3-7 are retrained from there, so the
    # final bit-for-bit check also covers the restored data order, augmentation and dropout state.
    second = attempts[1][1] + attempts[1][2]
    assert f"resuming from {output_dir / 'checkpoints' / 'checkpoint-2'}" in second, second[-3000:]
    assert "checkpoint-3 is damaged" in second, second[-3000:]
    for index in range(8):
        proc = start(args, logs / f"random_{index}")
        delay = rng.uniform(0.2, duration)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        attempts.append((f"random kill {index} after {delay:.1f} s", *proc.communicate(timeout=600), proc.returncode))
    final = start(args, logs / "final")
    attempts.append(("final", *final.communicate(timeout=600), final.returncode))
    assert final.returncode == 0, attempts[-1][2][-3000:]

    for what, _, stderr, _ in attempts:
        assert "Traceback" not in stderr, (what, stderr[-3000:])
    expected, got = load_file(reference / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"not bit-identical to the uninterrupted run: {different}"
    for split in ("eval", "test"):
        reference_metrics = json.loads((reference / f"{split}_results.json").read_text())
        metrics = json.loads((output_dir / f"{split}_results.json").read_text())
        assert metrics[f"{split}_loss"] == reference_metrics[f"{split}_loss"]


# --------------------------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------------------------


def fake_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder with the files a Trainer checkpoint holds, all valid."""
    from safetensors.torch import save_file

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.ones(3)}, path / "model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"x": torch.zeros(2)}, path / name)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: (p / "optimizer.pt").unlink(), "missing optimizer.pt"),
        (lambda p: (p / "trainer_state.json").unlink(), "missing trainer_state.json"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-7]), "model.safetensors: unreadable"),
        (lambda p: (p / "optimizer.pt").write_bytes((p / "optimizer.pt").read_bytes()[:100]), "optimizer.pt: not a complete torch file"),
        (lambda p: (p / "rng_state.pth").write_bytes(b""), "rng_state.pth: empty"),
        (lambda p: (p / "trainer_state.json").write_text('{"global_step": '), "trainer_state.json: not valid JSON"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_named(tmp_path, damage, problem):
    path = fake_checkpoint(tmp_path, 8)
    assert checkpoint_problem(path) is None
    damage(path)
    assert problem in checkpoint_problem(path)


def test_resume_falls_back_to_the_previous_complete_checkpoint(tmp_path, caplog):
    from vivit_medmnist.checkpoints import set_aside

    older, newer = fake_checkpoint(tmp_path, 4), fake_checkpoint(tmp_path, 8)
    (newer / "scheduler.pt").write_bytes(b"PK\x03\x04 cut")
    before = {p.name: digest(p) for p in older.iterdir()}
    checkpoint, damaged = resolve_checkpoint(tmp_path, "last", "last")
    assert checkpoint == str(older) and [p for p, _ in damaged] == [newer]
    assert newer.is_dir()  # resolving writes nothing
    with caplog.at_level("WARNING", logger="vivit_medmnist"):
        set_aside(damaged)
    assert not newer.exists() and (tmp_path / "damaged-checkpoint-8" / "scheduler.pt").is_file()
    assert "checkpoint-8 is damaged (scheduler.pt: not a complete torch file" in caplog.text
    assert complete_checkpoints(tmp_path) == [older]
    assert {p.name: digest(p) for p in older.iterdir()} == before
    # no complete checkpoint at all: the bare flag starts from the beginning; a named damaged one is an error
    assert resolve_checkpoint(tmp_path / "nothing", "last", "last") == (None, [])
    with pytest.raises(ValueError, match="damaged-checkpoint-8 is damaged: scheduler.pt"):
        resolve_checkpoint(tmp_path, str(tmp_path / "damaged-checkpoint-8"), "last")


def test_train_names_a_damaged_checkpoint_it_was_told_to_resume(shared_data_dir, tmp_path, capsys):
    path = fake_checkpoint(tmp_path / "run" / "checkpoints", 8)
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    train = load_script("train")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset_name", "adrenalmnist3d", "--data_dir", str(shared_data_dir),
                    "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(path)])  # fmt: skip
    assert exit_info.value.code == 1
    assert f"error: --resume_from_checkpoint: {path} is damaged: model.safetensors: unreadable" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# One run per folder; the write rule's two holes
# --------------------------------------------------------------------------------------------------------------


def test_a_second_run_on_a_folder_in_use_is_refused(shared_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    lock = lock_folder(out)  # what a running train.py holds
    with pytest.raises(FolderInUse, match=f"--output_dir {out} is in use by a training run that is still going"):
        lock_folder(out)
    train = load_script("train")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset_name", "adrenalmnist3d", "--data_dir", str(shared_data_dir), "--output_dir", str(out),
                    "--config_overrides", TINY, "--overwrite_output_dir"])  # fmt: skip
    assert exit_info.value.code == 1
    assert f"is in use by a training run that is still going (pid {os.getpid()})" in capsys.readouterr().err
    unlock_folder(lock)
    assert not list(out.iterdir())  # the lock file goes with the lock
    unlock_folder(lock_folder(out))  # free again


def test_resuming_another_runs_checkpoint_does_not_replace_a_finished_model(shared_data_dir, tmp_path, capsys):
    finished = tmp_path / "finished"
    make_folder(finished)
    other = fake_checkpoint(tmp_path / "other" / "checkpoints", 4)
    before = folder_digests(finished)
    train = load_script("train")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--dataset_name", "adrenalmnist3d", "--data_dir", str(shared_data_dir),
                    "--output_dir", str(finished), "--resume_from_checkpoint", str(other)])  # fmt: skip
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert f"--output_dir {finished} already holds a model" in err and "is another run's" in err
    assert folder_digests(finished) == before


def test_predict_never_writes_into_the_model_folder_even_when_asked(tmp_path):
    model = tmp_path / "model"
    make_folder(model)
    volume = tmp_path / "volume.npy"
    np.save(volume, np.zeros((28, 28, 28), dtype=np.uint8))
    before = folder_digests(model)
    proc = run_script("predict", "--model_name_or_path", model, volume, "--output_file", model / "config.json",
                      "--overwrite_output_file")  # fmt: skip
    assert_user_error(proc, f"--output_file {model / 'config.json'} is an input of this command")
    assert folder_digests(model) == before


# --------------------------------------------------------------------------------------------------------------
# Damage that transformers reports: one error line through every door
# --------------------------------------------------------------------------------------------------------------


def damaged_folders(tmp_path: Path) -> dict[str, Path]:
    source = tmp_path / "source"
    make_folder(source)
    folders = {}

    def copy(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for path in source.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        folders[name] = folder
        return folder

    config = json.loads((source / "config.json").read_text())
    extra = copy("extra_label")
    (extra / "config.json").write_text(json.dumps({**config, "id2label": {**config["id2label"], "2": "new"},
                                                   "label2id": {**config["label2id"], "new": 2}}))  # fmt: skip
    (copy("config_not_json") / "config.json").write_text('{"model_type": ')
    (copy("config_bad_value") / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    (copy("processor_not_json") / "preprocessor_config.json").write_text("nope")
    return folders


EXPECTED = {
    "extra_label": "config.json does not match model.safetensors",
    "config_not_json": "config.json' is not a valid JSON file",
    "config_bad_value": "hidden_size",
    "processor_not_json": "preprocessor_config.json' is not a valid JSON file",
}


def test_a_damaged_model_folder_is_one_error_line_in_predict_and_evaluate(tmp_path, shared_data_dir, capsys):
    volume = tmp_path / "volume.npy"
    np.save(volume, np.zeros((28, 28, 28), dtype=np.uint8))
    evaluate = load_script("evaluate")
    for name, folder in damaged_folders(tmp_path).items():
        before = folder_digests(folder)
        predict = run_in_process("predict", "--model_name_or_path", folder, volume)
        assert_user_error(predict, f"cannot load a model and image processor from '{folder}'", EXPECTED[name])
        with pytest.raises(SystemExit) as exit_info:  # the same door of evaluate.py, in-process
            evaluate.main(["--model_name_or_path", str(folder), "--dataset_name", "adrenalmnist3d",
                           "--data_dir", str(shared_data_dir)])  # fmt: skip
        assert str(exit_info.value.code).startswith("error: cannot load a model") and EXPECTED[name] in str(exit_info.value.code)
        assert folder_digests(folder) == before


def test_a_damaged_model_folder_is_an_oserror_naming_it_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForVideoClassification

    folder = damaged_folders(tmp_path)["extra_label"]
    with pytest.raises(OSError, match=f"{folder}: config.json does not match model.safetensors"):
        AutoModelForVideoClassification.from_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------
# Publishing uploads exactly what the model needs
# --------------------------------------------------------------------------------------------------------------


def test_publishing_takes_only_the_files_the_model_needs(tmp_path):
    folder = tmp_path / "model"
    make_folder(folder)
    (folder / "my_script.py").write_text("HF_TOKEN = 'hf_secret'\n")
    (folder / "notes.png").write_bytes(b"\x89PNG mine")
    (folder / "scores_results.json").write_text("{}")
    (folder / "all_results.json").write_text(json.dumps({"test_accuracy": 0.6}))
    names = publishable_files(folder)
    assert "my_script.py" not in names and "notes.png" not in names and "scores_results.json" not in names
    assert code_files(folder) == sorted(
        ["configuration_vivit_medmnist.py", "image_processing_vivit_medmnist.py", "modeling_vivit_medmnist.py",
         "pipeline_vivit_medmnist.py"]
    )  # fmt: skip
    assert {"training_curves.png", "confusion_matrix.png", "all_results.json"} <= set(names)  # linked / written
    assert left_out_files(folder) == ["my_script.py", "notes.png", "scores_results.json"]
    dry_run = run_script("publish", folder, "--dry_run")
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    assert "Left out (not needed by the model): my_script.py, notes.png, scores_results.json" in dry_run.stdout
    assert "my_script.py" not in dry_run.stdout.split("Left out")[0]


def test_a_damaged_model_folder_is_named_through_remote_code_and_the_pipeline(tmp_path):
    from transformers import pipeline

    from vivit_medmnist.hub_files import load_without_package

    folder = damaged_folders(tmp_path)["extra_label"]
    with pytest.raises(RuntimeError, match="config.json does not match model.safetensors"):
        load_without_package(folder)  # the folder's own code, where this package is not installed
    with pytest.raises(ValueError, match="config.json does not match model.safetensors"):
        pipeline(model=str(folder), trust_remote_code=True)


def test_the_package_logs_through_one_setting(caplog):
    """A module's INFO lines (here the resolution transfer's list of what it resized) show under the one
    setting the commands make, `vivit_medmnist.set_verbosity(INFO)`."""
    import logging

    import vivit_medmnist
    from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
    from vivit_medmnist.resolution import transfer_resolution

    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(**{k: int(v) for k, v in (i.split("=") for i in TINY.split(","))}))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # the root logger at WARNING, as a user's
    caplog.handler.setLevel(logging.INFO)
    try:
        vivit_medmnist.set_verbosity(logging.INFO)
        transfer_resolution(model, 64, tubelet_size=16)
    finally:
        root.setLevel(level)
    assert any(r.name == "vivit_medmnist.resolution" and "resized" in r.getMessage() for r in caplog.records)


def test_set_up_cannot_fail_silently(repo_root):
    """The Makefile lets a failed install fail the target, and checks every import the suite needs."""
    makefile = (repo_root / "Makefile").read_text()
    install_lines = [line for line in makefile.splitlines() if "pip install" in line]
    assert install_lines and not any(line.rstrip().endswith("|| true") for line in install_lines)
    assert "-o pipefail" in makefile
    check = next(line for line in makefile.splitlines() if 'python -c "import vivit_medmnist' in line)
    for module in ("nibabel", "captum", "gradio", "playwright", "xdist"):
        assert module in check, module
