"""scripts/train.py, vivit_medmnist.arguments, .augmentation and .trainer_setup: arguments and recipes, augmentation seeding, a real (tiny) run
that leaves the publishable folder, DDP over gloo keeps the loss scale, and bad arguments fail with a clear message.
Resuming after SIGKILL (mid-epoch, mid-save, bit for bit) is tested in test_faults.py.

The runs train a tiny model (1 block of width 32) on the first volumes of the real AdrenalMNIST3D file.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from forked_runs import run_forked
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForVideoClassification, TrainerState

from vivit_medmnist.arguments import RESUME_LAST, ModelArguments, parse_args
from vivit_medmnist.augmentation import AugmentedDataset, EpochCallback, augment_volume, rotate_volume
from vivit_medmnist.config_overrides import parse_config_overrides
from vivit_medmnist.trainer_setup import build_model, resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train.py"
TINY_MODEL = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def tiny_run_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """64 training volumes, batch 16: 4 optimizer steps per epoch, 2 epochs."""
    return [
        "--dataset_name", "adrenalmnist3d", "--data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--config_overrides", TINY_MODEL,
        "--max_train_samples", "64", "--max_eval_samples", "16", "--max_test_samples", "32",
        "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--num_train_epochs", "2",
        "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "7",
        *extra,
    ]  # fmt: skip


# Augmentation ON, a checkpoint and a validation every 2 steps (mid-epoch), best-checkpoint selection on the
# validation loss: the options a real run combines, in the run whose folder the tests below inspect.
RESUMABLE = (
    "--flip_axes", "0", "1", "2", "--max_shift", "2", "--intensity_scale", "0.1", "--intensity_shift", "0.05",
    "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
    "--save_total_limit", "2", "--load_best_model_at_end", "true",
)  # fmt: skip


def run(cmd: list[str], env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def train(args: list[str], fresh: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """scripts/train.py ARGS in a new interpreter, or (`fresh=False`) forked from the suite's fork server."""
    if fresh:
        result = run([sys.executable, str(TRAIN), *args], **kwargs)
    else:
        with tempfile.TemporaryDirectory() as logs:
            result = run_forked([str(TRAIN), *args], Path(logs) / "train", timeout=400, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_history(output_dir: Path) -> list[dict]:
    checkpoint = max(
        (output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    return TrainerState.load_from_json(str(checkpoint / "trainer_state.json")).log_history


@pytest.fixture(scope="module")
def uninterrupted(shared_data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return output_dir, train(tiny_run_args(shared_data_dir, output_dir, *RESUMABLE))


# --------------------------------------------------------------------------------------------------------------
# A real run leaves the publishable folder
# --------------------------------------------------------------------------------------------------------------


def test_run_writes_publishable_folder(uninterrupted, shared_data_dir):
    output_dir, result = uninterrupted
    assert "world_size=1 device=cpu" in result.stdout  # no CUDA here: use_cpu without being told
    for name in [
        "model.safetensors", "config.json", "preprocessor_config.json", "configuration_vivit_medmnist.py",
        "modeling_vivit_medmnist.py", "image_processing_vivit_medmnist.py", "README.md",
        "training_curves.png", "confusion_matrix.png",
        "all_results.json", "train_results.json", "eval_results.json", "test_results.json",
        "train_eval_results.json",
    ]:  # fmt: skip
        assert (output_dir / name).is_file() and (output_dir / name).stat().st_size > 0, name
    top_level = [p for p in output_dir.iterdir() if p.is_file()]
    assert not [p.name for p in top_level if p.suffix in PICKLE_SUFFIXES]
    # the pickles the Trainer needs to resume exist, but only under checkpoints/
    assert list((output_dir / "checkpoints").glob("checkpoint-*/optimizer.pt"))

    config = json.loads((output_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "normal", "1": "hyperplasia"}
    assert config["auto_map"]["AutoModelForVideoClassification"].endswith(
        "VivitMedmnistForVideoClassification"
    )
    test = json.loads((output_dir / "test_results.json").read_text())
    assert {"test_accuracy", "test_auc", "test_loss"} <= test.keys()
    everything = json.loads((output_dir / "all_results.json").read_text())
    assert {"test_accuracy", "test_auc", "eval_accuracy", "eval_auc", "train_loss"} <= everything.keys()
    # the final model scored on its own (unaugmented) training split: does it fit?
    fit = json.loads((output_dir / "train_eval_results.json").read_text())
    assert {"train_eval_accuracy", "train_eval_auc", "train_eval_loss"} <= fit.keys() <= everything.keys()
    assert 0.0 <= fit["train_eval_accuracy"] <= 1.0 and fit["train_eval_loss"] > 0
    assert (
        "| Metric | test | validation | training (no augmentation) |"
        in (output_dir / "README.md").read_text()
    )
    validations = [entry for entry in log_history(output_dir) if "eval_loss" in entry]
    assert [entry["step"] for entry in validations] == [2, 4, 6, 8]  # validated during training

    # The saved folder loads with the Auto classes and is the model that was tested.
    model = AutoModelForVideoClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    data = np.load(shared_data_dir / "adrenalmnist3d.npz")
    volumes, labels = data["test_images"][:32], data["test_labels"][:32, 0]
    with torch.no_grad():
        logits = model(**processor(volumes, return_tensors="pt")).logits
    assert float((logits.argmax(-1).numpy() == labels).mean()) == pytest.approx(test["test_accuracy"])


def test_fine_tune_from_the_saved_folder(uninterrupted):
    output_dir, _ = uninterrupted
    saved = load_file(output_dir / "model.safetensors")
    model_args = ModelArguments(model_name_or_path=str(output_dir))
    model = build_model(model_args, ["a", "b", "c"], 28)  # 3 labels instead of 2: a new head
    assert model.config.num_labels == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}
    state = model.state_dict()
    new_head = [name for name in saved if state[name].shape != saved[name].shape]
    assert len(new_head) == 2 and all(state[name].shape[0] == 3 for name in new_head)  # weight and bias
    assert all(torch.equal(state[name], saved[name]) for name in saved if name not in new_head)
    # 64^3 data: the saved 28^3 model is transferred (positions resized to the 8^3 grid of 8^3 tubelets)
    transferred = build_model(model_args, ["normal", "hyperplasia"], 64)
    assert transferred.config.volume_size == [64, 64, 64] and transferred.config.grid_size == [8, 8, 8]
    assert transferred.vivit.embeddings.position_embeddings.shape[1] == 512


# --------------------------------------------------------------------------------------------------------------
# DDP: two processes over gloo
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "encoder_type, options",
    [("joint", []), ("factorised_self_attention", ["--mixup_alpha", "0.4", "--cutmix_alpha", "1.0"]),
     ("joint", ["--sam_rho", "0.05"])],
    ids=["joint", "factorised_self_attention_with_mixing", "joint_with_sam"],
)  # fmt: skip
def test_ddp_two_processes_keep_the_loss_scale(shared_data_dir, tmp_path, encoder_type, options):
    # Without dropout and with the same seed, 2 processes x 8 volumes see the same global batches as 1 process x
    # 16 volumes, so the logged losses and gradient norms must coincide. The loss-scaling trap (mean loss per
    # process, multiplied by the world size) doubles the loss; two processes that each train alone log
    # world_size=1. The second case also mixes volumes (mixup and cutmix, vivit_medmnist.mixing), whose loss the
    # Trainer takes from compute_loss_func and scales by its own rule. The third takes sharpness-aware steps, whose
    # ascent uses the gradient averaged over the processes: the whole batch's, as in one process.
    # float32: bf16 (the default on a CPU where it is faster) rounds the two runs' sums differently
    common = ["--config_overrides", f"{TINY_MODEL},attention_probs_dropout_prob=0,encoder_type={encoder_type}",
              "--num_train_epochs", "1", *options,
              "--eval_strategy", "epoch", "--save_strategy", "epoch", "--bf16", "false"]  # fmt: skip
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(TRAIN),
    ]  # fmt: skip
    ddp = run([*launch, *tiny_run_args(shared_data_dir, ddp_dir), *common, "--use_cpu", "true",
               "--per_device_train_batch_size", "8"])  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "world_size=2 device=cpu" in ddp.stdout
    assert (ddp_dir / "test_results.json").is_file()
    train(tiny_run_args(shared_data_dir, single_dir) + common, fresh=False)

    def losses(output_dir):
        entries = [entry for entry in log_history(output_dir) if "loss" in entry]
        return [entry["loss"] for entry in entries], [entry["grad_norm"] for entry in entries]

    (ddp_loss, ddp_grad), (single_loss, single_grad) = losses(ddp_dir), losses(single_dir)
    assert len(ddp_loss) == len(single_loss) == 4
    assert 1 / 1.3 < ddp_loss[0] / single_loss[0] < 1.3
    assert ddp_loss == pytest.approx(single_loss, rel=1e-3)
    assert ddp_grad == pytest.approx(single_grad, rel=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Bad arguments: a clear message and a non-zero exit
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_main():
    return runpy.run_path(str(TRAIN), run_name="train_script")["main"]


def test_missing_data_offline_exits_with_the_message(tmp_path):
    argv = [str(TRAIN), "--dataset_name", "adrenalmnist3d", "--data_dir", str(tmp_path), "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    result = run_forked(argv, tmp_path / "logs" / "train", timeout=400, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "error: adrenalmnist3d.npz not found" in result.stderr and "offline" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, status, message",
    [
        (
            ["--dataset_name", "brainmnist3d"],
            1,
            "--dataset_name brainmnist3d: not a MedMNIST 3D set (organmnist3d, ",
        ),
        (["--model_name_or_path", "{tmp}"], 1, "cannot load a model"),
        (["--resume_from_checkpoint", "{tmp}/nowhere"], 1, "is not a checkpoint folder"),
        (["--config_overrides", "hidden_size=abc"], 2, "hidden_size"),
        (["--config_overrides", "hiden_size=64"], 2, "'hiden_size=64' is not 'field=value'"),
    ],
)
def test_bad_arguments_fail_clearly(train_main, shared_data_dir, tmp_path, capsys, args, status, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    base = [
        "--dataset_name",
        "adrenalmnist3d",
        "--data_dir",
        str(shared_data_dir),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*base, *args])
    assert exit_info.value.code == status  # 2: an option mistake; 1: a file or data that cannot be used
    err = capsys.readouterr().err
    assert "error: " in err and message in err
    assert not (tmp_path / "o").exists()


def test_new_run_refuses_a_folder_with_checkpoints(train_main, shared_data_dir, tmp_path, capsys):
    (tmp_path / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(SystemExit, match="1"):
        train_main(
            [
                "--dataset_name",
                "adrenalmnist3d",
                "--data_dir",
                str(shared_data_dir),
                "--output_dir",
                str(tmp_path),
            ]
        )
    assert "already holds checkpoints (checkpoint-4) of another run" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Arguments and recipes (in-process)
# --------------------------------------------------------------------------------------------------------------


def write_recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_recipe_values_are_defaults_the_command_line_overrides(tmp_path):
    recipe = write_recipe(
        tmp_path,
        """
        dataset_name: adrenalmnist3d
        learning_rate: 1e-3          # YAML reads this as a string: converted like a command-line value
        num_train_epochs: 7
        max_grad_norm: 0
        lr_scheduler_type: constant
        lr_scheduler_kwargs: {foo: 1}
        flip_axes: [0, 2]
        max_shift: 3
        load_best_model_at_end: false
        """,
    )
    run_args = parse_args(["--recipe", recipe, "--learning_rate", "0.01", "--flip_axes", "--output_dir", "o"])
    assert run_args.training.learning_rate == 0.01  # command line wins
    assert run_args.data.flip_axes == []  # a bare list option clears the recipe's list
    assert run_args.training.num_train_epochs == 7.0 and run_args.training.max_grad_norm == 0.0
    assert run_args.training.lr_scheduler_type == "constant"
    assert run_args.training.lr_scheduler_kwargs == {"foo": 1}
    assert run_args.data.max_shift == 3 and run_args.data.dataset_name == "adrenalmnist3d"
    assert run_args.recipe == recipe
    assert run_args.output_dir == Path("o") and run_args.training.output_dir == str(Path("o") / "checkpoints")
    no_recipe = parse_args([])
    assert no_recipe.training.learning_rate == 5e-5 and no_recipe.output_dir == Path("outputs/organmnist3d")
    assert no_recipe.training.use_cpu is (not torch.cuda.is_available())


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "lerning_rate: 0.1\nfoo: 1\n",
            "unknown key(s) 'lerning_rate' (did you mean 'learning_rate'?), 'foo'",
        ),
        ("learning_rate: fast\n", "invalid value 'fast' for 'learning_rate'"),
        ("num_train_epochs: [1, 2]\n", "invalid value [1, 2] for 'num_train_epochs'"),
        ("per_device_train_batch_size: 3.5\n", "invalid value 3.5 for 'per_device_train_batch_size'"),
        ("eval_strategy: weekly\n", "invalid value 'weekly' for 'eval_strategy'"),
        ("max_shift: true\n", "invalid value True for 'max_shift'"),
        ("- a list\n", "must be a mapping"),
        ("learning_rate: [1\n", "cannot read recipe"),
    ],
)
def test_bad_recipes_are_rejected(tmp_path, capsys, text, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--recipe", write_recipe(tmp_path, text)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bare_resume_flag_means_the_last_checkpoint(tmp_path):
    for argv in (["--resume_from_checkpoint"], ["--resume_from_checkpoint", "--seed", "3"]):
        assert parse_args(argv).training.resume_from_checkpoint == RESUME_LAST
    assert (
        parse_args(["--resume_from_checkpoint", "x/checkpoint-3"]).training.resume_from_checkpoint
        == "x/checkpoint-3"
    )

    from test_faults import fake_checkpoint

    run = parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint"])
    assert resolve_checkpoint(run) == (None, [])  # nothing to resume: the run starts from the beginning
    for step in (2, 10, 4):
        fake_checkpoint(tmp_path / "checkpoints", step)
    assert resolve_checkpoint(run) == (str(tmp_path / "checkpoints" / "checkpoint-10"), [])
    # a run with a weight average needs it in its checkpoints: none of these is complete for it
    averaged = parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "--weight_average_decay", "0.99"])
    checkpoint, damaged = resolve_checkpoint(averaged)
    assert checkpoint is None and "missing weight_average.safetensors" in damaged[0][1]


def test_shipped_recipes():
    keras = parse_args(["--recipe", str(REPO / "recipes" / "keras_reference.yaml")])
    args = keras.training
    assert (args.learning_rate, args.adam_epsilon, args.weight_decay, args.max_grad_norm) == (
        1e-4,
        1e-7,
        0.0,
        0.0,
    )
    assert (args.adam_beta1, args.adam_beta2, args.optim) == (
        0.9,
        0.999,
        "adamw_torch",
    )  # AdamW, no decay = Adam
    assert args.lr_scheduler_type == "constant" and args.warmup_steps == 0
    assert (args.per_device_train_batch_size, args.num_train_epochs) == (32, 60)
    assert args.eval_strategy == "epoch" and not args.load_best_model_at_end
    assert args.save_strategy == "epoch" and args.save_total_limit == 2
    assert keras.model.config_overrides is None and keras.data.dataset_name == "organmnist3d"
    assert keras.data.augmentation() == {
        "flip_axes": (),
        "max_rotation": 0.0,
        "rotation_interpolation": "linear",
        "max_shift": 0,
        "intensity_scale": 0.0,
        "intensity_shift": 0.0,
    }
    labels = [f"organ{i}" for i in range(11)]
    assert build_model(keras.model, labels, 28).num_parameters() == 1_656_971  # the Keras model's count

    organ = parse_args(["--recipe", str(REPO / "recipes" / "organmnist3d.yaml")])
    assert organ.data.flip_axes == []  # left/right organs: no flips
    # the final model of the schedule, as recipes/medmnist3d.yaml: validated every epoch, not selected by it
    assert not organ.training.load_best_model_at_end and organ.training.eval_strategy == "epoch"
    adrenal = parse_args(["--recipe", str(REPO / "recipes" / "adrenalmnist3d.yaml")])
    assert adrenal.data.dataset_name == "adrenalmnist3d" and adrenal.training.load_best_model_at_end
    # the lever kept on validation (benchmarks/ACCURACY.md); the Keras reference has no label smoothing
    assert adrenal.training.label_smoothing_factor == organ.training.label_smoothing_factor == 0.1
    assert keras.training.label_smoothing_factor == 0.0


def test_config_overrides():
    overrides = parse_config_overrides(
        "hidden_size=64, num_hidden_layers=2,tubelet_size=[4,4,7],layer_norm_eps=1e-5"
    )
    assert overrides == {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "tubelet_size": [4, 4, 7],
        "layer_norm_eps": 1e-5,
    }
    overrides = parse_config_overrides("tubelet_size=4,pooling=cls,mlp_output_act=null,drop_path_rate=0")
    assert overrides == {"tubelet_size": 4, "pooling": "cls", "mlp_output_act": None, "drop_path_rate": 0.0}
    assert parse_config_overrides(None) == {}
    model_args = parse_args(
        ["--config_overrides", "hidden_size=32,num_attention_heads=2,tubelet_size=4"]
    ).model
    config = build_model(model_args, ["a", "b", "c"], 28).config
    assert (config.hidden_size, config.tubelet_size, config.num_labels) == (32, [4, 4, 4], 3)
    assert config.id2label == {0: "a", 1: "b", 2: "c"}
    with pytest.raises(ValueError, match="layer_norm_eps must be a number"):
        parse_config_overrides("layer_norm_eps=small")
    with pytest.raises(ValueError, match="not 'field=value'"):
        parse_config_overrides("hidden_size")


# --------------------------------------------------------------------------------------------------------------
# Augmentation: a function of (seed, epoch, index) only
# --------------------------------------------------------------------------------------------------------------

AUGMENT = {"flip_axes": (0, 1, 2), "max_shift": 3, "intensity_scale": 0.2, "intensity_shift": 0.1}


def volumes(n=6, size=8) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"volume": rng.integers(0, 256, (size,) * 3, dtype=np.uint8), "label": i % 2} for i in range(n)]


def test_augmentation_is_seeded_by_seed_epoch_and_index():
    rows = volumes()
    dataset = AugmentedDataset(rows, seed=1, **AUGMENT)
    dataset.set_epoch(3)
    first = [dataset[i]["volume"] for i in range(len(rows))]
    np.random.seed(123)
    torch.manual_seed(123)  # the global RNGs play no part
    again = [dataset[i]["volume"] for i in reversed(range(len(rows)))][::-1]  # nor does the order
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(v.dtype == np.uint8 and v.shape == (8, 8, 8) for v in first)
    assert not all(np.array_equal(v, row["volume"]) for v, row in zip(first, rows))  # it augments

    dataset.set_epoch(4)
    assert not all(np.array_equal(a, dataset[i]["volume"]) for i, a in enumerate(first))  # new epoch
    other_seed = AugmentedDataset(rows, seed=2, **AUGMENT)
    other_seed.set_epoch(3)
    assert not all(np.array_equal(a, other_seed[i]["volume"]) for i, a in enumerate(first))
    assert dataset[0]["label"] == rows[0]["label"]


def test_epoch_callback_sets_the_epoch_that_starts():
    dataset = AugmentedDataset(volumes(), seed=0)
    callback = EpochCallback(dataset)
    for state_epoch, expected in ((0.0, 0), (1.0, 1), (1.5, 1), (2.999, 2)):  # 1.5: resumed mid-epoch
        callback.on_epoch_begin(None, TrainerState(epoch=state_epoch), None)
        assert dataset.epoch == expected


def test_augmentations_individually():
    volume = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    rng = np.random.default_rng(0)
    assert np.array_equal(augment_volume(volume, rng), volume)  # all off: unchanged
    seen = set()
    for seed in range(20):  # flips only along the allowed axis
        out = augment_volume(volume, np.random.default_rng(seed), flip_axes=(1,))
        assert np.array_equal(out, volume) or np.array_equal(out, volume[:, ::-1])
        seen.add(np.array_equal(out, volume))
    assert seen == {True, False}
    for seed in range(20):  # a zero-filled integer shift of at most 2 voxels per axis
        out = augment_volume(volume, np.random.default_rng(seed), max_shift=2)
        shifts = [
            (a, b, c) for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)
            if np.array_equal(out, shifted(volume, (a, b, c)))
        ]  # fmt: skip
        assert shifts, "not a zero-filled shift"
    out = augment_volume(np.full((4, 4, 4), 250, np.uint8), rng, intensity_scale=0.5, intensity_shift=0.5)
    assert (
        out.dtype == np.uint8 and len(np.unique(out)) == 1
    )  # one scale/offset per volume, clipped to 0..255


def test_rotation():
    volume = np.random.default_rng(0).integers(0, 256, size=(6, 6, 6), dtype=np.uint8)
    # quarter turns about the centre are exact permutations of voxels
    for interpolation in ("nearest", "linear"):
        assert np.array_equal(rotate_volume(volume, (90, 0, 0), interpolation), np.rot90(volume, -1, (1, 2)))
        assert np.array_equal(rotate_volume(volume, (0, 90, 0), interpolation), np.rot90(volume, 1, (0, 2)))
        assert np.array_equal(rotate_volume(volume, (0, 0, -90), interpolation), np.rot90(volume, 1, (0, 1)))
        assert np.array_equal(rotate_volume(volume, (0, 0, 0), interpolation), volume)
    mask = np.zeros((28, 28, 28), np.uint8)
    mask[8:20, 10:18, 6:22] = 255
    nearest = rotate_volume(mask, (10, -7, 12), "nearest")
    linear = rotate_volume(mask, (10, -7, 12), "linear")
    assert set(np.unique(nearest)) == {0, 255}  # nearest keeps a mask binary
    assert len(np.unique(linear)) > 2 and linear.dtype == np.uint8  # linear blends its edges
    assert abs(int(nearest.astype(bool).sum()) - 12 * 8 * 16) < 0.1 * 12 * 8 * 16  # about the same volume
    assert not np.array_equal(nearest, mask) and nearest[14, 14, 14] == 255  # moved, centre kept
    # corners leave the volume and are zero-filled, nothing wraps around
    assert rotate_volume(np.full((8, 8, 8), 200, np.uint8), (0, 0, 45), "nearest")[0, 0, :].max() == 0
    with pytest.raises(ValueError, match="rotation_interpolation must be one of .*got 'cubic'"):
        rotate_volume(mask, (1, 2, 3), "cubic")


def test_rotation_in_augmentation():
    volume = np.zeros((28, 28, 28), np.uint8)
    volume[10:18, 12:16, 4:24] = 255
    outs = [
        augment_volume(volume, np.random.default_rng(seed), max_rotation=15, rotation_interpolation="nearest")
        for seed in range(5)
    ]
    assert all(set(np.unique(out)) <= {0, 255} for out in outs)
    assert len({out.tobytes() for out in outs}) == 5  # a different angle for each draw
    # bounded: no draw of at most 15 degrees per axis comes close to a quarter turn
    quarter = rotate_volume(volume, (0, 0, 90), "nearest")
    assert all((out != quarter).sum() > (out != volume).sum() for out in outs)
    # rotation draws after the flips: switching it on leaves the flip draws as they were
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    plain = augment_volume(volume, rng_a, flip_axes=(2,))
    rotated = augment_volume(volume, rng_b, flip_axes=(2,), max_rotation=1e-6)
    assert np.array_equal(plain, rotated)


def shifted(volume: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros_like(volume)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, volume.shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, volume.shape))
    out[dst] = volume[src]
    return out


def test_speed_choices_are_made_once_where_the_model_is_built_and_never_saved(tmp_path, caplog):
    from vivit_medmnist.cpu_speed import CPU_ATTENTION, bf16_is_faster
    from vivit_medmnist.trainer_setup import speed_up

    model = build_model(ModelArguments(config_overrides=TINY_MODEL + ",conv_stem_channels=[8],tubelet_size=2"), ["a", "b"], 28)
    speed_up(model, torch.device("cuda"))  # a GPU keeps the model's default
    assert model.config._attn_implementation == "sdpa"
    with caplog.at_level("INFO", logger="vivit_medmnist.trainer_setup"):
        speed_up(model, torch.device("cpu"), bf16=bf16_is_faster())
        speed_up(model, torch.device("cpu"), bf16=not bf16_is_faster())
    assert model.config._attn_implementation == CPU_ATTENTION
    # the log says which precision the run computes in, and when --bf16 chose the slower one on this CPU
    default, forced = (r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU speed choices"))
    assert default.endswith("bf16 autocast" if bf16_is_faster() else "float32")
    assert "as --bf16 says" in forced and "as --bf16 says" not in default
    assert model.vivit.embeddings.tubelet_embeddings.conv_stem[0].weight.is_contiguous(
        memory_format=torch.channels_last_3d
    )
    model.save_pretrained(tmp_path)  # the run's choice is not the saved model's: it loads with the default
    assert "vivit_cpu" not in (tmp_path / "config.json").read_text()
    assert AutoModelForVideoClassification.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_the_weight_average_is_the_saved_model_and_resumes_from_its_checkpoint(tmp_path):
    from types import SimpleNamespace

    from vivit_medmnist.weight_average import AVERAGE_FILE, WeightAverage

    model = build_model(ModelArguments(config_overrides=TINY_MODEL), ["a", "b"], 28)
    start = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    average = WeightAverage(decay=0.5)
    args, control = SimpleNamespace(output_dir=str(tmp_path)), None
    average.on_train_begin(args, None, control, model=model)
    expected = {k: v.clone() for k, v in start.items()}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * step)
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        average.on_step_end(args, state, control, model=model)
        decay = min(0.5, (1 + step) / (10 + step))
        current = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        expected = {k: decay * expected[k] + (1 - decay) * current[k] for k in expected}
    (tmp_path / "checkpoint-3").mkdir()
    average.on_save(args, state, control)
    assert (tmp_path / "checkpoint-3" / AVERAGE_FILE).is_file()
    resumed = WeightAverage(decay=0.5, checkpoint=str(tmp_path / "checkpoint-3"))
    resumed.on_train_begin(args, state, control, model=model)
    average.on_train_end(args, state, control, model=model)
    for name, value in model.state_dict().items():
        if name in expected:
            torch.testing.assert_close(value, expected[name])  # the model is the average now
            torch.testing.assert_close(resumed.average[name], expected[name])  # and resumes from it


def test_test_time_views_are_label_safe_shifts_reported_beside_the_plain_metrics(shared_data_dir, tmp_path):
    from test_hub_files import make_folder
    from test_scripts import run_in_process

    from vivit_medmnist.augmentation import shift_volume, tta_shifts

    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    moved = shift_volume(volume, (1, 0, -2))
    assert np.array_equal(moved[1:, :, :-2], volume[:-1, :, 2:]) and moved[0].max() == 0 and moved[:, :, -2:].max() == 0
    assert tta_shifts(0) == [(0, 0, 0)] and len(set(tta_shifts(2))) == 7
    model = tmp_path / "model"
    make_folder(model)
    proc = run_in_process("evaluate", "--model_name_or_path", model, "--dataset_name", "adrenalmnist3d",
                          "--data_dir", shared_data_dir, "--split", "validation", "--tta_shift", 1,
                          "--output_file", tmp_path / "m.json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["eval_tta_views"] == 7 and {"eval_auc", "eval_tta_auc", "eval_tta_accuracy"} <= metrics.keys()
