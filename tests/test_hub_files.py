"""The publishable folder: files, model card, plots, what is published, pickle detection and the load-without-package check.

A tiny model built here (no training) is saved with `save_publishable_folder`; `tests/test_scripts.py` checks the
folder of a real training run.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
)
from vivit_medmnist.hub_files import (
    REPO_ID_PLACEHOLDER,
    check_folder,
    find_pickled_files,
    load_without_package,
    probe_volume,
    publishable_files,
    stage_for_upload,
)
from vivit_medmnist.model_folder import save_publishable_folder

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
ADRENAL_LABELS = ["normal", "hyperplasia"]
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "configuration_vivit_medmnist.py",
    "confusion_matrix.png",
    "image_processing_vivit_medmnist.py",
    "model.safetensors",
    "modeling_vivit_medmnist.py",
    "pipeline_vivit_medmnist.py",
    "preprocessor_config.json",
    "reliability_diagram.png",
    "training_curves.png",
}
LOG_HISTORY = [
    {"loss": 0.71, "grad_norm": 1.2, "learning_rate": 1e-4, "epoch": 0.5, "step": 2},
    {"loss": 0.64, "grad_norm": 1.1, "learning_rate": 1e-4, "epoch": 1.0, "step": 4},
    {
        "eval_loss": 0.66,
        "eval_accuracy": 0.61,
        "eval_auc": 0.68,
        "eval_runtime": 0.3,
        "epoch": 1.0,
        "step": 4,
    },
    {"loss": 0.52, "grad_norm": 0.9, "learning_rate": 1e-4, "epoch": 1.5, "step": 6},
    {"loss": 0.47, "grad_norm": 0.8, "learning_rate": 1e-4, "epoch": 2.0, "step": 8},
    {
        "eval_loss": 0.58,
        "eval_accuracy": 0.72,
        "eval_auc": 0.79,
        "eval_runtime": 0.3,
        "epoch": 2.0,
        "step": 8,
    },
    {"train_runtime": 3.2, "train_loss": 0.58, "epoch": 2.0, "step": 8},
]


def tiny_model(label_names=ADRENAL_LABELS, seed: int = 0) -> VivitMedmnistForVideoClassification:
    torch.manual_seed(seed)
    config = VivitMedmnistConfig(
        **TINY,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return VivitMedmnistForVideoClassification(config).eval()


def make_folder(
    folder: Path, model=None, *, dataset_name: str = "adrenalmnist3d", seed: int = 0, **overrides
) -> dict:
    """Save `model` (default: a tiny 2-class model) with made-up measurements; return the arguments used."""
    model = model if model is not None else tiny_model()
    rng = np.random.default_rng(seed)
    n, c = 40, model.config.num_labels
    kwargs = {
        "dataset_name": dataset_name,
        "size": 28,
        "log_history": LOG_HISTORY,
        "test_labels": rng.integers(0, c, size=n),
        "test_logits": rng.normal(size=(n, c)),
        # values no template could contain by chance
        "results": {
            "test_accuracy": 0.6173,
            "test_auc": 0.7391,
            "test_loss": 0.6652,
            "test_runtime": 1.25,
            "test_samples_per_second": 32.0,
            "eval_accuracy": 0.7142,
            "eval_auc": 0.8263,
        },
        "training_summary": {
            "recipe": "recipes/tiny.yaml",
            "num_train_epochs": 2,
            "learning_rate": 1e-4,
            "optimizer": "adamw_torch",
            "seed": 1234,
            "world_size": 1,
            "device": "cpu",
        },
    }
    kwargs.update(overrides)
    save_publishable_folder(folder, model, VivitMedmnistImageProcessor(), **kwargs)
    return kwargs


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("published")
    return folder, make_folder(folder)


def test_folder_has_every_file_and_nothing_pickled(published):
    folder, _ = published
    assert {p.name for p in folder.iterdir()} == EXPECTED_FILES
    assert publishable_files(folder) == sorted(EXPECTED_FILES)
    assert find_pickled_files(folder, sorted(EXPECTED_FILES)) == []

    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "normal", "1": "hyperplasia"}
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForVideoClassification"}
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert "AutoImageProcessor" in processor_config["auto_map"]


def test_folder_reloads_with_the_same_weights(published):
    from transformers import AutoImageProcessor, AutoModelForVideoClassification

    folder, _ = published
    loaded = AutoModelForVideoClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    inputs = processor(probe_volume([28, 28, 28]), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, tiny_model()(**inputs).logits)


def test_model_card_metadata_holds_the_measured_results(published):
    folder, kwargs = published
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    # no stock pipeline tag (video-classification cannot run a volume model) and no made-up Hub dataset id
    assert data.pipeline_tag is None and data.datasets is None and data.base_model is None
    assert {"vivit", "volume-classification", "medical-imaging", "3d", "medmnist", "adrenalmnist3d"} <= set(
        data.tags
    )

    got = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    results = kwargs["results"]
    assert got == {
        ("test", "accuracy"): results["test_accuracy"],
        ("test", "roc_auc"): results["test_auc"],
        ("validation", "accuracy"): results["eval_accuracy"],
        ("validation", "roc_auc"): results["eval_auc"],
    }
    for result in data.eval_results:
        assert result.task_type == "volume-classification"
        assert result.dataset_config == "adrenalmnist3d"
    assert data.model_name == "vivit-medmnist-adrenalmnist3d"


def test_model_card_text(published):
    folder, _ = published
    text = ModelCard.load(folder / "README.md").text
    assert "{{" not in text and "{%" not in text
    # results table, training setup, dataset facts, architecture from the config, intended use, loading, citations
    for value in ("0.6173", "0.7391", "0.6652", "0.7142", "recipes/tiny.yaml", "1234", "adamw_torch"):
        assert value in text
    assert "1188" in text and "298" in text and "CC BY 4.0" in text and "hyperplasia" in text
    assert "27 tokens of width 32" in text and f"{tiny_model().num_parameters():,}" in text
    assert "not a medical device" in text.lower() or "must not be used for diagnosis" in text
    assert "trust_remote_code=True" in text and "AutoImageProcessor" in text and REPO_ID_PLACEHOLDER in text
    assert "arnab2021vivit" in text and "medmnistv2" in text
    assert "test_runtime" not in text and "32.0" not in text  # speed metrics are not results


@pytest.mark.parametrize(
    "overrides, says, table",
    [
        (
            {},
            [
                "attends jointly over all 27 tokens",
                "non-overlapping",
                "last 4, 4, 4 voxels along D, H, W are never read",
                "the mean over the tokens",
            ],
            "joint (ViViT Model 1): 1 pre-norm",
        ),
        (
            {"encoder_type": "factorised_encoder", "num_temporal_layers": 2},
            [
                "1 pre-norm *spatial* Transformer blocks attend within each of the 3 temporal slabs (9 tokens each)",
                "2 *temporal* blocks attend over those 3 tokens",
            ],
            "factorised (ViViT Model 2): 1 spatial blocks within each of 3 temporal slabs, slab LayerNorm + mean, then 2 temporal blocks",
        ),
        (
            {"pooling": "cls", "tubelet_stride": 4, "padding": "same"},
            [
                "overlapping spatio-temporal tubelets (the volume zero-padded",
                "all 343 tokens and a CLS token",
                "the final state of the CLS token",
            ],
            "learned, 344 positions (incl. a CLS token)",
        ),
        (
            {"encoder_type": "factorised_self_attention"},
            ["attends first *spatially*, each token to the 9 tokens of its temporal slab", "Model 3"],
            "factorised self-attention (ViViT Model 3): 1 pre-norm",
        ),
        (
            {"encoder_type": "factorised_dot_product"},
            ["1 heads attend within each token's temporal slab (9 tokens), 1 across the slabs", "Model 4"],
            "factorised dot-product attention (ViViT Model 4): 1 pre-norm",
        ),
    ],
)
def test_card_describes_the_model_it_ships_with(tmp_path, overrides, says, table):
    config = VivitMedmnistConfig(
        **{**TINY, **overrides}, num_labels=2, id2label={0: "normal", 1: "hyperplasia"}
    )
    make_folder(tmp_path, VivitMedmnistForVideoClassification(config))
    text = " ".join(ModelCard.load(tmp_path / "README.md").text.split())
    for fragment in says:
        assert fragment in text, fragment
    assert table in text
    if overrides.get("encoder_type"):
        assert "attends jointly" not in text
    else:
        assert "temporal slab" not in text
    if overrides.get("encoder_type", "").startswith("factorised_") and overrides["encoder_type"] != "factorised_encoder":
        # the folder's own code runs the model where this package is not installed
        report = load_without_package(tmp_path)
        with torch.no_grad():
            expected = VivitMedmnistForVideoClassification.from_pretrained(tmp_path).eval()(
                **VivitMedmnistImageProcessor()(probe_volume([28] * 3), return_tensors="pt")
            ).logits[0]
        np.testing.assert_allclose(report["logits"], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_pngs_are_valid_images(published):
    folder, _ = published
    for name in ("training_curves.png", "confusion_matrix.png"):
        with Image.open(folder / name) as image:
            image.verify()
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
            # not a blank canvas
            assert len(set(np.asarray(image.convert("L")).ravel().tolist())) > 10


def test_multiclass_card_reports_top5(tmp_path):
    names = [f"organ {i}" for i in range(11)]
    results = {"test_accuracy": 0.5031, "test_auc": 0.8862, "test_top5_accuracy": 0.9474, "test_loss": 1.31}
    make_folder(tmp_path, tiny_model(names), dataset_name="organmnist3d", results=results, log_history=[])
    card = ModelCard.load(tmp_path / "README.md")
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert got == {
        ("test", "accuracy"): 0.5031,
        ("test", "roc_auc"): 0.8862,
        ("test", "top_k_accuracy"): 0.9474,
    }
    assert "organ 10" in card.text and "organmnist3d" in card.data.tags
    with Image.open(tmp_path / "training_curves.png") as image:  # nothing logged: still a valid image
        image.verify()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"test_logits": np.zeros((40, 3))}, "test_logits must have shape"),
        ({"test_labels": np.full(40, 2)}, "test_labels must be in 0..1"),
        ({"test_labels": np.zeros(40, dtype=np.float32)}, "integer class ids"),
        ({"results": {"eval_accuracy": 0.5}}, "must hold test metrics"),
    ],
)
def test_bad_measurements_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_folder(tmp_path, **overrides)


def add_training_leftovers(folder: Path) -> None:
    """What a training run leaves next to the publishable files: checkpoints, pickles, Trainer state, logs."""
    checkpoint = folder / "checkpoints" / "checkpoint-8"
    checkpoint.mkdir(parents=True)
    shutil.copy(folder / "model.safetensors", checkpoint / "model.safetensors")
    shutil.copy(folder / "config.json", checkpoint / "config.json")
    (checkpoint / "modeling_extra.py").write_text("# code inside a checkpoint\n")
    torch.save({"state": {}}, checkpoint / "optimizer.pt")
    torch.save({"python": 1}, checkpoint / "rng_state.pth")
    torch.save({"args": 1}, folder / "training_args.bin")
    (folder / "trainer_state.json").write_text("{}")
    (folder / "notes.pkl").write_bytes(pickle.dumps({"a": 1}))
    (folder / "runs").mkdir()
    (folder / "runs" / "events.png").write_bytes(b"\x89PNG not really")
    (folder / "test_results.json").write_text(json.dumps({"test_accuracy": 0.6173}))
    (folder / "all_results.json").write_text(json.dumps({"test_accuracy": 0.6173}))


def test_publishable_files_exclude_checkpoints_and_pickles(tmp_path):
    make_folder(tmp_path)
    add_training_leftovers(tmp_path)
    assert publishable_files(tmp_path) == sorted(EXPECTED_FILES | {"test_results.json", "all_results.json"})


def test_find_pickled_files_reads_content_not_names(tmp_path):
    (tmp_path / "ok.json").write_text("{}")
    (tmp_path / "pickle_results.json").write_bytes(pickle.dumps([1, 2]))
    torch.save({"x": torch.zeros(2)}, tmp_path / "torch_results.json")  # a zip holding data.pkl
    (tmp_path / "fake.safetensors").write_bytes(pickle.dumps({"w": 1}))
    names = ["ok.json", "pickle_results.json", "torch_results.json", "fake.safetensors"]
    assert find_pickled_files(tmp_path, names) == names[1:]


def test_check_folder_loads_the_staged_files_without_the_package(published):
    folder, _ = published
    check = check_folder(folder)
    assert check.ok, check.problems
    assert set(check.files) == EXPECTED_FILES
    report = check.load_report
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("VivitMedmnistForVideoClassification")
    assert report["processor_class"].endswith("VivitMedmnistImageProcessor")
    assert report["id2label"] == {"0": "normal", "1": "hyperplasia"}
    inputs = VivitMedmnistImageProcessor()(probe_volume([28, 28, 28]), return_tensors="pt")
    with torch.no_grad():
        expected = tiny_model()(**inputs).logits[0]
    np.testing.assert_allclose(report["logits"], expected.numpy(), atol=1e-5)
    # pipeline(model=folder, trust_remote_code=True) without the package: labels and softmax scores, best first
    probabilities = expected.softmax(-1)
    order = probabilities.argsort(descending=True).tolist()
    assert [entry["label"] for entry in report["pipeline"]] == [["normal", "hyperplasia"][i] for i in order]
    np.testing.assert_allclose(
        [e["score"] for e in report["pipeline"]], probabilities[order].numpy(), atol=1e-5
    )


def test_pipeline_habit_with_the_package(published, tmp_path):
    from transformers import pipeline

    folder, _ = published
    classify = pipeline(model=str(folder), trust_remote_code=True)
    volume = probe_volume([28, 28, 28])
    with torch.no_grad():
        probabilities = (
            tiny_model()(**VivitMedmnistImageProcessor()(volume, return_tensors="pt")).logits[0].softmax(-1)
        )
    best = int(probabilities.argmax())
    answer = classify(volume)
    assert answer[0]["label"] == ["normal", "hyperplasia"][best]
    assert answer[0]["score"] == pytest.approx(float(probabilities[best]), abs=1e-5)
    np.save(tmp_path / "volume.npy", volume)
    assert classify(str(tmp_path / "volume.npy"), top_k=1) == answer[:1]  # a path, like an image file
    assert classify(np.stack([volume, volume])) == [answer, answer]  # a batch: one answer per volume
    with pytest.raises(ValueError, match="expected a .npy file"):
        classify(str(tmp_path / "volume.nii.gz"))


def test_check_folder_catches_code_that_needs_the_package(tmp_path):
    make_folder(tmp_path)
    modeling = tmp_path / "modeling_vivit_medmnist.py"
    modeling.write_text("import vivit_medmnist  # not available on the Hub\n" + modeling.read_text())
    check = check_folder(tmp_path)
    assert not check.ok
    assert "does not load with trust_remote_code=True" in check.problems[0]
    assert "vivit_medmnist" in check.problems[0]


def test_check_folder_reports_missing_and_pickled_files(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "test_results.json").write_bytes(pickle.dumps(object))  # a published name, pickled content
    check = check_folder(tmp_path)  # no load check is attempted on such a folder
    assert check.load_report is None
    assert any("missing model.safetensors" in p for p in check.problems)
    assert any("test_results.json" in p for p in check.problems)
    with pytest.raises(ValueError, match="not ready to publish"):
        check.raise_for_problems()


def test_stage_for_upload_copies_exactly_the_allowed_files(published, tmp_path):
    folder, _ = published
    names = stage_for_upload(folder, tmp_path / "stage", repo_id="someone/vivit-adrenal")
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == names == sorted(EXPECTED_FILES)
    readme = (tmp_path / "stage" / "README.md").read_text()
    assert "someone/vivit-adrenal" in readme and REPO_ID_PLACEHOLDER not in readme
    assert REPO_ID_PLACEHOLDER in (folder / "README.md").read_text()  # the original is left alone


def test_the_cards_loading_example_runs_and_gives_calibrated_probabilities(published, capsys):
    import ast
    import re as regex

    folder, _ = published
    text = (folder / "README.md").read_text().replace(REPO_ID_PLACEHOLDER, str(folder))
    code = regex.findall(r"```python\n(.*?)```", text, flags=regex.DOTALL)[0]
    exec(compile(code, "card_example", "exec"), {})  # noqa: S102 -- the card's own example, on its own folder
    label, probabilities = capsys.readouterr().out.strip().split(" ", 1)
    assert label in ("normal", "hyperplasia") and abs(sum(ast.literal_eval(probabilities)) - 1) < 1e-5
