"""Fine-tuning keeps the model it was given (issue 15, part 1).

With `--model_name_or_path` the saved config is the architecture: a recipe's architecture overrides do not apply
(each skipped one is logged), architecture overrides given on the command line are refused, and only the
training-behaviour fields (dropout, stochastic depth) apply. Command-line overrides merge with the recipe's key
by key.
"""

from __future__ import annotations

import logging
import runpy
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
)
from vivit_medmnist.arguments import parse_args
from vivit_medmnist.configuration_vivit_medmnist import ENCODER_TYPES
from vivit_medmnist.model_card import applied_overrides
from vivit_medmnist.trainer_setup import build_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if not p.stem.endswith("_pretrain"))  # training
ORGAN_LABELS = [f"organ-{i}" for i in range(11)]
ADRENAL_LABELS = ["normal", "hyperplasia"]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def save_model(folder: Path, encoder_type: str, labels: list[str]) -> Path:
    torch.manual_seed(0)
    config = VivitMedmnistConfig(
        **TINY,
        encoder_type=encoder_type,
        num_temporal_layers=1,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    VivitMedmnistForVideoClassification(config).save_pretrained(folder)
    VivitMedmnistImageProcessor().save_pretrained(folder)  # as in every folder train.py writes
    return folder


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    return {
        encoder: save_model(root / encoder, encoder, ORGAN_LABELS)
        for encoder in ENCODER_TYPES
    }


def encoder_tensors_equal_the_saved_ones(model, folder: Path) -> None:
    saved = load_file(folder / "model.safetensors")
    state = model.state_dict()
    encoder = [name for name in saved if name.startswith("vivit.")]
    assert encoder and set(encoder) == {name for name in state if name.startswith("vivit.")}
    for name in encoder:
        assert torch.equal(state[name], saved[name]), name


def test_command_line_overrides_merge_with_the_recipes_key_by_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        'config_overrides: "drop_path_rate=0.1,encoder_type=factorised_encoder,tubelet_size=[4,4,8]"\n'
    )
    run = parse_args(["--recipe", str(recipe), "--config_overrides", "hidden_size=64,drop_path_rate=0.2"])
    assert (
        run.model.config_overrides
        == "drop_path_rate=0.2,encoder_type=factorised_encoder,tubelet_size=[4,4,8],hidden_size=64"
    )
    assert run.recipe_override_keys == {"encoder_type", "tubelet_size"}
    model = build_model(run.model, ADRENAL_LABELS, 28, run.recipe_override_keys)
    config = model.config
    assert (config.drop_path_rate, config.encoder_type, config.tubelet_size, config.hidden_size) == (
        0.2, "factorised_encoder", [4, 4, 8], 64,
    )  # fmt: skip
    # without a command-line value the recipe's string is used as it is
    assert parse_args(["--recipe", str(recipe)]).model.config_overrides == (
        "drop_path_rate=0.1,encoder_type=factorised_encoder,tubelet_size=[4,4,8]"
    )


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_fine_tuning_with_a_shipped_recipe_starts_from_the_saved_weights(
    saved_models, recipe, encoder_type, caplog
):
    folder = saved_models[encoder_type]
    run = parse_args(["--recipe", str(recipe), "--model_name_or_path", str(folder)])
    with caplog.at_level(logging.INFO, logger="vivit_medmnist.trainer_setup"):
        model = build_model(run.model, ADRENAL_LABELS, 28, run.recipe_override_keys)
    assert model.config.encoder_type == encoder_type
    assert {k: getattr(model.config, k) for k in TINY} == TINY
    encoder_tensors_equal_the_saved_ones(model, folder)
    assert model.classifier.out_features == 2  # 11 organ classes -> a new head for the 2 of the data
    # the recipe's training-behaviour overrides apply; its architecture ones that differ are logged as skipped
    recipe_overrides = run.model.config_overrides or ""
    if "drop_path_rate=0.1" in recipe_overrides:
        assert model.config.drop_path_rate == 0.1
    if "encoder_type=factorised_encoder" in recipe_overrides and encoder_type == "joint":
        assert "the recipe's encoder_type=factorised_encoder does not apply" in caplog.text
        assert "encoder_type" not in applied_overrides(run.model, model)


def test_architecture_overrides_on_the_command_line_are_refused(saved_models):
    folder = saved_models["joint"]
    run = parse_args(["--model_name_or_path", str(folder), "--config_overrides", "hidden_size=64,drop_path_rate=0.1,encoder_type=factorised_encoder"])  # fmt: skip
    with pytest.raises(ValueError) as error:
        build_model(run.model, ADRENAL_LABELS, 28, run.recipe_override_keys)
    message = str(error.value)
    assert message.startswith(
        "--config_overrides hidden_size=64,encoder_type=factorised_encoder would change"
    )
    assert f"({folder}: hidden_size=32,encoder_type=joint)" in message and "drop_path_rate" in message
    # the values the saved model already has, and training-behaviour fields, are fine
    run = parse_args(["--model_name_or_path", str(folder), "--config_overrides", "hidden_size=32,tubelet_size=8,attention_probs_dropout_prob=0.2"])  # fmt: skip
    model = build_model(run.model, ADRENAL_LABELS, 28, run.recipe_override_keys)
    assert model.config.attention_probs_dropout_prob == 0.2
    encoder_tensors_equal_the_saved_ones(model, folder)


def test_fine_tuning_a_model_with_the_same_classes_keeps_its_head(tmp_path):
    folder = save_model(tmp_path / "adrenal", "joint", ADRENAL_LABELS)
    run = parse_args(["--model_name_or_path", str(folder)])
    model = build_model(run.model, ADRENAL_LABELS, 28)
    assert torch.equal(model.classifier.weight, load_file(folder / "model.safetensors")["classifier.weight"])


def readme_fine_tuning_command() -> list[str]:
    """The arguments of the README's "fine-tune a saved or Hub model" example."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("# fine-tune a saved or Hub model") + 1
    words = shlex.split(lines[start])
    return words[words.index("scripts/train.py") + 1 :]


class StopBeforeTheFirstStep(Exception):
    pass


def test_the_readme_fine_tuning_example_starts_from_the_saved_weights(
    saved_models, shared_data_dir, tmp_path, monkeypatch, caplog
):
    args = readme_fine_tuning_command()
    assert args[args.index("--model_name_or_path") + 1] == "outputs/organmnist3d"
    args[args.index("--model_name_or_path") + 1] = str(saved_models["joint"])  # an OrganMNIST3D-shaped model
    args += ["--data_dir", str(shared_data_dir), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    started = {}

    def train(self, *a, **kw):
        started["model"] = self.model
        raise StopBeforeTheFirstStep

    monkeypatch.setattr(Trainer, "train", train)
    main = runpy.run_path(str(REPO / "scripts" / "train.py"), run_name="train_script")["main"]
    with (
        caplog.at_level(logging.INFO, logger="vivit_medmnist.trainer_setup"),
        pytest.raises(StopBeforeTheFirstStep),
    ):
        main(args)
    model = started["model"]
    assert model.config.encoder_type == "joint" and model.config.id2label == {0: "normal", 1: "hyperplasia"}
    encoder_tensors_equal_the_saved_ones(model, saved_models["joint"])
    assert "the recipe's encoder_type=factorised_encoder does not apply" in caplog.text
