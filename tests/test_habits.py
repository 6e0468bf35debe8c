"""What Hugging Face users habitually do, each test named after the habit it protects (issue 15, part 2).

`pipeline()` is tested with the publishable folder in test_hub_files.py (with and without the package).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from test_hub_files import make_folder, tiny_model
from test_scripts import load_script, run_script
from transformers import DefaultDataCollator, Trainer, TrainingArguments

import vivit_medmnist
from vivit_medmnist import VivitMedmnistImageProcessor
from vivit_medmnist.arguments import build_parser, parse_args
from vivit_medmnist.data import MedMNIST3DCollator, load_medmnist3d
from vivit_medmnist.model_card import hub_id, training_summary
from vivit_medmnist.plots import training_log

TINY_MODEL = "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64"


@pytest.fixture(scope="module")
def adrenal(shared_data_dir) -> datasets.DatasetDict:
    return load_medmnist3d("adrenalmnist3d", data_dir=shared_data_dir, download=False)


# --------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------


def test_datasets_save_to_disk_and_load_from_disk(adrenal, tmp_path):
    train = adrenal["train"].select(range(4))
    train.save_to_disk(tmp_path / "saved")
    back = datasets.load_from_disk(str(tmp_path / "saved"))
    assert back.features == train.features and back.features["volume"].dtype == "uint8"
    np.testing.assert_array_equal(back[:]["volume"], train[:]["volume"])
    batch = MedMNIST3DCollator()([back[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 28, 1, 28, 28)


def test_datasets_to_iterable_dataset_for_streaming(adrenal):
    stream = adrenal["validation"].to_iterable_dataset()
    rows = list(stream.take(3))
    batch = MedMNIST3DCollator()(rows)
    expected = MedMNIST3DCollator()([adrenal["validation"][i] for i in range(3)])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])


def test_datasets_torch_format_gives_volumes_the_collator_takes(adrenal):
    torch_rows = adrenal["validation"].with_format("torch")
    assert torch_rows[0]["volume"].dtype == torch.int64  # datasets widens integers
    batch = MedMNIST3DCollator()([torch_rows[i] for i in range(2)])
    expected = MedMNIST3DCollator()([adrenal["validation"][i] for i in range(2)])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"])


def test_datasets_with_transform_and_the_default_collator_as_in_the_transformers_docs(adrenal, tmp_path):
    # The recipe of transformers' image-classification guide, with "volume" for "image".
    processor = VivitMedmnistImageProcessor()

    def transforms(examples):
        examples["pixel_values"] = processor(examples["volume"], return_tensors="pt")["pixel_values"]
        del examples["volume"]
        return examples

    data = adrenal["validation"].with_transform(transforms)
    assert data[0:2]["pixel_values"].shape == (2, 28, 1, 28, 28)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, remove_unused_columns=False, report_to=[]
    )
    model = tiny_model()
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DefaultDataCollator())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"pixel_values", "labels"}
    assert torch.isfinite(model(**batch).loss)


def test_datasets_map_with_the_processor(adrenal):
    processor = VivitMedmnistImageProcessor()
    mapped = (
        adrenal["validation"]
        .select(range(4))
        .map(
            lambda b: processor(b["volume"], return_tensors="np"),
            batched=True,
            remove_columns=["volume"],
        )
        .with_format("torch")
    )
    expected = processor(adrenal["validation"][:4]["volume"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(mapped[:4]["pixel_values"], expected)


# --------------------------------------------------------------------------------------------------------------
# The package and its command lines
# --------------------------------------------------------------------------------------------------------------


def test_version_attribute():
    assert vivit_medmnist.__version__ == importlib.metadata.version("vivit-medmnist")


def test_help_starts_with_the_recipe_and_says_where_checkpoints_go():
    text = build_parser().format_help()
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert options[0] == "--recipe"
    assert "its checkpoints/ subfolder and are never published" in " ".join(text.split())


def test_log_files_get_no_progress_bars(tmp_path):
    # pytest's stderr is not a terminal: tqdm is off unless asked for
    assert parse_args([]).training.disable_tqdm
    assert not parse_args(["--disable_tqdm", "false"]).training.disable_tqdm


def test_report_to_an_integration_that_is_not_installed(monkeypatch, capsys):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", list)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--report_to", "tensorboard"])
    assert exit_info.value.code == 2
    assert (
        "--report_to tensorboard: not installed; pip install 'vivit-medmnist[tensorboard]'"
        in capsys.readouterr().err
    )
    assert parse_args(["--report_to", "none"]).training.report_to in ([], "none", ["none"])


# --------------------------------------------------------------------------------------------------------------
# The model card tells the truth
# --------------------------------------------------------------------------------------------------------------


def summary(args: list[str], mixed_precision: str = "no") -> dict:
    run = parse_args(args)
    trainer = SimpleNamespace(
        model=tiny_model(), accelerator=SimpleNamespace(mixed_precision=mixed_precision)
    )
    data = {"train": range(64), "validation": range(16), "test": range(16)}
    return training_summary(run, trainer, data, 1.0)


def test_card_names_the_schedule_and_the_precision_that_ran():
    assert (
        summary(["--lr_scheduler_type", "cosine", "--warmup_steps", "0.05"])["lr schedule"]
        == "cosine, warmup 0.05"
    )
    # `accelerate launch --mixed_precision bf16` runs bf16 without --bf16
    assert summary([], mixed_precision="bf16")["precision"] == "bf16"
    assert summary([])["precision"] == "fp32"


def test_card_counts_the_volumes_that_were_used_and_names_the_base_model(tmp_path):
    make_folder(
        tmp_path, split_sizes={"train": 64, "validation": 16, "test": 16}, base_model="org/vivit-organmnist3d"
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/vivit-organmnist3d"
    assert "The test set is small (16 volumes)" in card.text
    assert "| test | 16 of 298 |" in card.text and "| train | 64 of 1188 |" in card.text


def test_base_model_is_only_a_hub_id(tmp_path):
    assert hub_id("org/vivit-organmnist3d") == "org/vivit-organmnist3d"
    assert hub_id(str(tmp_path)) is None  # a local folder
    assert hub_id(None) is None and hub_id("./model") is None and hub_id("a/b/c") is None


def test_training_curves_end_where_training_ended():
    log = [
        {"loss": 0.7, "epoch": 1.0, "step": 4},
        {"eval_loss": 0.6, "epoch": 1.0, "step": 4},
        {"loss": 0.5, "epoch": 2.0, "step": 8},
        {"eval_loss": 0.7, "epoch": 2.0, "step": 8},
        {"train_runtime": 3.0, "train_loss": 0.6, "epoch": 2.0, "step": 8},
        {"eval_loss": 0.6, "epoch": 2.0, "step": 8},  # the final evaluation of the best model
    ]
    assert training_log(log) == log[:5]
    assert training_log(log[:4]) == log[:4]


# --------------------------------------------------------------------------------------------------------------
# The inputs medical users have: NIfTI
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    make_folder(path)
    return path


def test_predict_reads_nifti_and_resizes_it_like_the_processor(model_dir, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    volume = np.random.default_rng(0).integers(0, 256, (40, 36, 32), dtype=np.uint8)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "crop.nii.gz")
    output = tmp_path / "predictions.json"
    proc = run_script(
        "predict", "--model_name_or_path", model_dir, tmp_path / "crop.nii.gz", "--output_file", output,
        "--precision", "fp32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(output.read_text())[0]["top_k"]
    inputs = VivitMedmnistImageProcessor(do_resize=True, size=28)(volume, return_tensors="pt")
    with torch.no_grad():
        probabilities = tiny_model()(**inputs).logits[0].softmax(-1)
    assert [e["label_id"] for e in got] == probabilities.argsort(descending=True).tolist()
    np.testing.assert_allclose(
        [e["probability"] for e in got], probabilities.sort(descending=True).values, atol=1e-5
    )


def test_predict_refuses_a_raw_hounsfield_nifti_and_resizes_npy_only_when_asked(model_dir, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    nibabel.save(
        nibabel.Nifti1Image(np.full((28, 28, 28), -1000.0, np.float32), np.eye(4)), tmp_path / "hu.nii"
    )
    predict = load_script("predict")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model_name_or_path", str(model_dir), str(tmp_path / "hu.nii")])
    assert "got values in [-1000.0, -1000.0]" in exit_info.value.code
    np.save(tmp_path / "big.npy", np.zeros((40, 40, 40), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--model_name_or_path", str(model_dir), str(tmp_path / "big.npy")])
    assert "got shape (40, 40, 40) (--resize resizes volumes of another size)" in exit_info.value.code
    proc = run_script("predict", "--model_name_or_path", model_dir, tmp_path / "big.npy", "--resize")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[1].startswith(f"{tmp_path / 'big.npy'}: ")


def test_predict_help_says_what_medmnist_did_to_its_volumes():
    proc = run_script("predict", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    flat = " ".join(text.split())
    assert "What MedMNIST did to its volumes, which yours must match" in flat and ".nii.gz" in flat
