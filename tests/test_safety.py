"""Nothing a user has is overwritten, and no wrong answer is silent (issue 10).

Each test gives a script or class what a careless or hostile user would, and asserts the exact outcome: the
file's bytes unchanged, the exit status, one `error: ...` line naming the option or file, and no traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hub_files import make_folder, tiny_model
from test_scripts import Trap, load_script, run_in_process, run_script

from vivit_medmnist import VivitMedmnistImageProcessor, VivitMedmnistModel
from vivit_medmnist.data import load_medmnist3d
from vivit_medmnist.modeling_vivit_medmnist import VivitMedmnistForVideoClassification
from vivit_medmnist.safe_io import check_new_output, staged_files, write_text_atomic

TINY_MODEL = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    """Exit `status`, no traceback, and stderr ends with one error (`error: ...`, or argparse's `PROG: error:
    ...` after the usage) that names every fragment."""
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ") or ": error: " in line]
    assert len(starts) == 1, proc.stderr[-3000:]
    message = "\n".join(lines[starts[0] :])
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A publishable folder of a tiny, untrained 2-class model."""
    path = tmp_path_factory.mktemp("model")
    make_folder(path)
    return path


@pytest.fixture
def volume_file(tmp_path) -> Path:
    path = tmp_path / "volume.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (28, 28, 28), dtype=np.uint8))
    return path


def copy_of(model_dir: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            (target / path.name).write_bytes(path.read_bytes())
    return target


# --------------------------------------------------------------------------------------------------------------
# Writing: never over what exists unless asked, never over an input, whole or not at all
# --------------------------------------------------------------------------------------------------------------


def tiny_train(data_dir: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_script(
        "train",
        "--dataset_name", "adrenalmnist3d", "--data_dir", data_dir, "--output_dir", output_dir,
        "--config_overrides", TINY_MODEL, "--max_train_samples", 32, "--max_eval_samples", 16,
        "--max_test_samples", 16, "--per_device_train_batch_size", 16, "--num_train_epochs", 1,
        "--disable_tqdm", "true", "--report_to", "none", *extra,
        timeout=600,
    )  # fmt: skip


def tiny_train_in_process(data_dir: Path, output_dir: Path, capsys, *extra: str) -> subprocess.CompletedProcess:
    """`tiny_train` through train.py's `main` in this process, as a CompletedProcess (the exit status of its
    SystemExit, what it printed)."""
    argv = [
        "--dataset_name", "adrenalmnist3d", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--config_overrides", TINY_MODEL, "--max_train_samples", "32", "--max_eval_samples", "16",
        "--max_test_samples", "16", "--per_device_train_batch_size", "16", "--num_train_epochs", "1",
        "--disable_tqdm", "true", "--report_to", "none", *map(str, extra),
    ]  # fmt: skip
    capsys.readouterr()
    try:
        load_script("train").main(argv)
        status = 0
    except SystemExit as exit_info:
        code = exit_info.code
        status = code if isinstance(code, int) else 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, captured.out, captured.err)


@pytest.fixture(scope="module")
def finished_run(shared_data_dir, tmp_path_factory) -> Path:
    """The folder of a finished tiny training run whose checkpoints were not kept (--save_strategy no)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = tiny_train(shared_data_dir, out, "--save_strategy", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list((out / "checkpoints").glob("checkpoint-*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".staging-")]  # the staging folder is gone
    return out


def test_train_refuses_to_replace_a_finished_model(finished_run, shared_data_dir):
    before = folder_digests(finished_run)
    proc = tiny_train(shared_data_dir, finished_run, "--save_strategy", "no")
    assert_user_error(
        proc,
        f"--output_dir {finished_run} already holds a model",
        "model.safetensors",
        "--overwrite_output_dir",
    )
    assert folder_digests(finished_run) == before


def test_train_refuses_to_fine_tune_in_place(finished_run, shared_data_dir):
    before = folder_digests(finished_run)
    proc = tiny_train(shared_data_dir, finished_run, "--model_name_or_path", finished_run)
    assert_user_error(proc, "is the model being fine-tuned", "--overwrite_output_dir")
    assert folder_digests(finished_run) == before


def test_train_with_overwrite_output_dir_replaces_the_model_and_old_checkpoints(
    finished_run, shared_data_dir, tmp_path
):
    out = copy_of(finished_run, tmp_path, "again")
    old_checkpoint = out / "checkpoints" / "checkpoint-99"
    old_checkpoint.mkdir(parents=True)
    before = folder_digests(out)
    proc = tiny_train(shared_data_dir, out, "--overwrite_output_dir", "--seed", "3", "--save_strategy", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = folder_digests(out)
    assert after.keys() == before.keys()
    assert after["model.safetensors"] != before["model.safetensors"]  # another seed: other weights
    assert not old_checkpoint.exists()


def test_a_crash_while_writing_leaves_the_old_folder_whole(model_dir, tmp_path):
    folder = copy_of(model_dir, tmp_path, "model")
    before = folder_digests(folder)
    with pytest.raises(OSError, match="No space left"), staged_files(folder) as staging:
        make_folder(staging, tiny_model(seed=5))  # a complete new model, written beside the old one...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the disk fills up
    assert folder_digests(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no staging folder left behind

    with staged_files(folder) as staging:  # the same without the crash replaces the files
        make_folder(staging, tiny_model(seed=5))
    assert folder_digests(folder)["model.safetensors"] != before["model.safetensors"]


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temporary file is removed


def test_check_new_output(tmp_path):
    existing, source = tmp_path / "out.json", tmp_path / "in.npy"
    existing.write_text("{}")
    source.write_bytes(b"x")
    (tmp_path / "link.json").symlink_to(source)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite_output_file"):
        check_new_output(existing, False)
    check_new_output(existing, True)
    for alias in (source, tmp_path / "link.json", tmp_path / "." / "in.npy"):
        with pytest.raises(FileExistsError, match="is an input of this command"):
            check_new_output(alias, True, [source])
    with pytest.raises(FileExistsError, match="is a folder"):
        check_new_output(tmp_path, True)


def test_predict_never_writes_over_its_input(model_dir, volume_file, tmp_path):
    before = digest(volume_file)
    proc = run_in_process("predict", "--model_name_or_path", model_dir, volume_file, "--output_file", volume_file)
    assert_user_error(proc, f"--output_file {volume_file} is an input")
    link = tmp_path / "predictions.json"
    link.symlink_to(volume_file)
    proc = run_in_process("predict", "--model_name_or_path", model_dir, volume_file, "--output_file", link,
                      "--overwrite_output_file")  # fmt: skip
    assert_user_error(proc, "is an input")
    assert digest(volume_file) == before


def test_predict_output_file_is_replaced_only_when_asked(model_dir, volume_file, tmp_path):
    output = tmp_path / "predictions.json"
    output.write_text("mine")
    proc = run_in_process("predict", "--model_name_or_path", model_dir, volume_file, "--output_file", output)
    assert_user_error(proc, f"--output_file {output} already exists", "--overwrite_output_file")
    assert output.read_text() == "mine"
    proc = run_in_process("predict", "--model_name_or_path", model_dir, volume_file, "--output_file", output,
                      "--overwrite_output_file")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(output.read_text())[0]["file"] == str(volume_file)


def test_predict_reports_an_unwritable_output_file(model_dir, volume_file, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    proc = run_in_process("predict", "--model_name_or_path", model_dir, volume_file,
                      "--output_file", blocker / "predictions.json")  # fmt: skip
    assert_user_error(proc, "cannot write --output_file")


def test_evaluate_output_file_is_checked_before_any_work(model_dir, tmp_path):
    output = tmp_path / "metrics.json"
    output.write_text("mine")
    # no data anywhere: had it started evaluating, the error would be about the missing file
    proc = run_in_process("evaluate", "--model_name_or_path", model_dir, "--dataset_name", "adrenalmnist3d",
                      "--data_dir", tmp_path / "nowhere", "--output_file", output)  # fmt: skip
    assert_user_error(proc, f"--output_file {output} already exists", "--overwrite_output_file")
    assert output.read_text() == "mine"
    # a file of the model being evaluated is an input: refused even with --overwrite_output_file
    before = digest(model_dir / "config.json")
    proc = run_in_process("evaluate", "--model_name_or_path", model_dir, "--dataset_name", "adrenalmnist3d",
                      "--data_dir", tmp_path / "nowhere", "--output_file", model_dir / "config.json",
                      "--overwrite_output_file")  # fmt: skip
    assert_user_error(
        proc, f"--output_file {model_dir / 'config.json'} is an input of this command, or inside one"
    )
    assert digest(model_dir / "config.json") == before


# --------------------------------------------------------------------------------------------------------------
# Loading: safetensors only, and exactly the model's tensors
# --------------------------------------------------------------------------------------------------------------


def rewrite_weights(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    save_file(change(tensors), folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensors_are_an_error_not_new_weights(model_dir, volume_file, tmp_path):
    folder = copy_of(model_dir, tmp_path, "no_head")
    rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if not k.startswith("classifier.")})
    with pytest.raises(OSError, match=r"missing from the checkpoint: classifier.bias, classifier.weight"):
        VivitMedmnistForVideoClassification.from_pretrained(folder)
    proc = run_in_process("predict", "--model_name_or_path", folder, volume_file)
    assert_user_error(proc, "missing from the checkpoint: classifier.bias, classifier.weight")
    assert proc.stdout == ""  # no class printed


def test_unexpected_and_misshapen_tensors_are_an_error(model_dir, tmp_path):
    folder = copy_of(model_dir, tmp_path, "extra")
    rewrite_weights(folder, lambda t: {**t, "vivit.extra.weight": torch.zeros(3)})
    with pytest.raises(OSError, match=r"in the checkpoint but not in the model: vivit.extra.weight"):
        VivitMedmnistForVideoClassification.from_pretrained(folder)
    # another architecture in the config than in the weights: even ignore_mismatched_sizes keeps the encoder
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != "vivit.extra.weight"})
    with pytest.raises(
        OSError, match=r"of another shape: vivit.embeddings.position_embeddings \(saved \(1, 27, 32\)"
    ):
        VivitMedmnistForVideoClassification.from_pretrained(folder, ignore_mismatched_sizes=True)


def test_the_usual_head_changes_still_load(model_dir, tmp_path):
    saved = load_file(model_dir / "model.safetensors")
    # a new head for another number of classes, asked for
    model = VivitMedmnistForVideoClassification.from_pretrained(
        model_dir, num_labels=3, ignore_mismatched_sizes=True
    )
    assert model.classifier.out_features == 3
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith("classifier."))
    # the bare encoder of a classification model (the head is dropped), and back (a new head)
    bare = VivitMedmnistModel.from_pretrained(model_dir)
    bare.save_pretrained(tmp_path / "bare")
    model = VivitMedmnistForVideoClassification.from_pretrained(tmp_path / "bare")
    assert all(
        torch.equal(model.state_dict()[k], v) for k, v in saved.items() if not k.startswith("classifier.")
    )


def test_a_truncated_weights_file_is_named(model_dir, volume_file, tmp_path):
    folder = copy_of(model_dir, tmp_path, "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="model.safetensors is unreadable"):
        VivitMedmnistForVideoClassification.from_pretrained(folder)
    proc = run_in_process("predict", "--model_name_or_path", folder, volume_file)
    assert_user_error(proc, f"{folder}: model.safetensors is unreadable")


def test_pickled_weights_are_never_loaded(model_dir, volume_file, tmp_path):
    folder = copy_of(model_dir, tmp_path, "pickled")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    torch.save({"weights": Trap(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        VivitMedmnistForVideoClassification.from_pretrained(folder)
    with pytest.raises(ValueError, match="only from safetensors"):
        VivitMedmnistForVideoClassification.from_pretrained(folder, use_safetensors=False)
    with pytest.raises(OSError, match="expected a model folder or a .safetensors file"):
        VivitMedmnistForVideoClassification.from_pretrained(folder / "pytorch_model.bin")
    proc = run_in_process("predict", "--model_name_or_path", folder, volume_file)
    assert_user_error(proc, "no file named model.safetensors")
    assert "weights_only" not in proc.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Bad input: one clear error
# --------------------------------------------------------------------------------------------------------------


def test_npz_members_that_are_not_arrays(model_dir, tmp_path):
    path = tmp_path / "notes.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    proc = run_in_process("predict", "--model_name_or_path", model_dir, path)
    assert_user_error(proc, f"{path}: member 'notes.txt' is not a numpy array")


def test_the_loader_names_a_member_that_is_not_an_array(tmp_path, monkeypatch):
    import medmnist
    from medmnist_fakes import FAKE_NAME, fake_arrays, fake_info, md5

    path = tmp_path / f"{FAKE_NAME}.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in fake_arrays().items():
            if key == "val_labels":
                archive.writestr(key, b"not an array")  # no .npy suffix: NpzFile hands over the raw bytes
            else:
                with archive.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, array)
    monkeypatch.setitem(medmnist.INFO, FAKE_NAME, fake_info(md5(path.read_bytes())))
    with pytest.raises(ValueError, match="val_labels is not a numpy array"):
        load_medmnist3d(FAKE_NAME, data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["--max_train_samples", "0"], 2, "--max_train_samples must be a positive number of volumes, got 0"),
        (["--max_test_samples", "-5"], 2, "--max_test_samples must be a positive number of volumes, got -5"),
        (["--num_epochs", "3"], 2, "unrecognized arguments: --num_epochs 3"),
        (["--push_to_hub", "true"], 2, "--push_to_hub would upload the Trainer's checkpoint folder"),
        (["--config_overrides", "volume_size=32"], 2, "volume_size comes from the data: use --size"),
        (["--flip_axes", "3"], 2, "--flip_axes takes volume axes 0 (D), 1 (H) and 2 (W), got [3]"),
        (["--max_shift", "-1"], 2, "--max_shift must be in [0, 27], got -1"),
        (["--max_rotation", "-5"], 2, "--max_rotation must be in [0, 180], got -5.0"),
        (["--intensity_scale", "3"], 2, "--intensity_scale must be in [0, 1), got 3.0"),
        (["--per_device_train_batch_size", "0"], 2, "--per_device_train_batch_size must be >= 1, got 0"),
        (["--num_train_epochs", "-1"], 2, "--num_train_epochs must be > 0 (or give --max_steps), got -1.0"),
        (["--learning_rate", "-1"], 2, "--learning_rate must be >= 0, got -1.0"),
    ],
)
def test_train_option_mistakes_end_with_one_error_and_write_nothing(
    shared_data_dir, tmp_path, capsys, args, status, message
):
    # in-process: the command's logic, without an interpreter start-up per case (the command line itself is
    # tested as a subprocess in test_train_output_dir_that_is_a_file and test_train_refuses_*)
    out = tmp_path / "out"
    proc = tiny_train_in_process(shared_data_dir, out, capsys, *args)
    assert_user_error(proc, message, status=status)
    assert not out.exists()


def test_train_output_dir_that_is_a_file(shared_data_dir, tmp_path):
    out = tmp_path / "model.json"
    out.write_text("mine")
    proc = tiny_train(shared_data_dir, out)
    assert_user_error(proc, f"--output_dir {out} is a file")
    assert out.read_text() == "mine"


def test_evaluate_unknown_option_is_a_usage_error(model_dir):
    proc = run_script(
        "evaluate", "--model_name_or_path", model_dir, "--dataset_name", "adrenalmnist3d", "--spilt", "test"
    )
    assert_user_error(proc, "unrecognized arguments: --spilt test", status=2)


def test_processor_converts_each_volume_of_a_list_on_its_own():
    full = np.full((8, 8, 8), 255, np.uint8)
    half = np.full((8, 8, 8), 0.5, np.float32)
    pixel_values = VivitMedmnistImageProcessor()([full, half], return_tensors="pt")["pixel_values"]
    assert pixel_values.amax(dim=(1, 2, 3, 4)).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"got values in \[2.0, 2.0\]"):
        VivitMedmnistImageProcessor()([full, np.full((8, 8, 8), 2.0)])
    # integers that fit in uint8 are uint8 volumes (e.g. a datasets column read without a format: int64)
    as_int64 = VivitMedmnistImageProcessor()(full.astype(np.int64), return_tensors="pt")["pixel_values"]
    assert torch.equal(as_int64, VivitMedmnistImageProcessor()(full, return_tensors="pt")["pixel_values"])
    # with do_rescale=False nothing is scaled or checked
    raw = VivitMedmnistImageProcessor(do_rescale=False)(np.full((8, 8, 8), 200.0), return_tensors="pt")[
        "pixel_values"
    ]
    assert raw.max().item() == 200.0


def test_an_empty_batch_is_a_clear_error():
    model = VivitMedmnistForVideoClassification(tiny_model().config).eval()
    with pytest.raises(
        ValueError, match=r"expected at least one volume, got an empty batch: .*\(0, 28, 1, 28, 28\)"
    ):
        model(torch.zeros(0, 28, 1, 28, 28))
    pixel_values = VivitMedmnistImageProcessor()(np.zeros((0, 28, 28, 28), np.uint8), return_tensors="pt")[
        "pixel_values"
    ]
    assert pixel_values.shape == (
        0,
        28,
        1,
        28,
        28,
    )  # the processor passes it on; the model says what is wrong


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
