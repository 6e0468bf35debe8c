"""The convolutional tubelet stem (issue 14): config, forward, saving, remote code, resolution; and the synthetic
diagnostic of benchmarks/synthetic.py on a tiny setting."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from forked_runs import run_forked
from huggingface_hub.errors import StrictDataclassFieldValidationError

from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
)
from vivit_medmnist.hub_files import load_without_package, probe_volume
from vivit_medmnist.resolution import transfer_resolution

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
STEM = {"conv_stem_channels": [4, 8, 16], "tubelet_size": 1}


def tiny(**overrides) -> VivitMedmnistForVideoClassification:
    torch.manual_seed(0)
    return VivitMedmnistForVideoClassification(VivitMedmnistConfig(**{**TINY, **overrides}, num_labels=2))


@pytest.mark.parametrize(
    ("overrides", "feature", "grid"),
    [
        ({"conv_stem_channels": [8]}, [14, 14, 14], [1, 1, 1]),  # 8^3 tubelets, valid, on the 14^3 map
        ({"conv_stem_channels": [8, 16], "tubelet_size": 2, "padding": "same"}, [7, 7, 7], [4, 4, 4]),
        ({"conv_stem_channels": [8, 16, 32], "tubelet_size": 1}, [4, 4, 4], [4, 4, 4]),
        ({"conv_stem_channels": []}, [28, 28, 28], [3, 3, 3]),  # an empty stem is no stem
    ],
)
def test_the_token_grid_is_cut_from_the_stems_feature_map(overrides, feature, grid):
    config = VivitMedmnistConfig(**overrides)
    assert config.feature_size_for(config.volume_size) == feature
    assert config.grid_size == grid
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(**TINY, **overrides)).eval()
    with torch.no_grad():
        hidden = model.vivit(torch.rand(2, 28, 1, 28, 28)).last_hidden_state
    assert hidden.shape == (2, int(np.prod(grid)), 32)


def test_an_empty_stem_is_the_reference_model():
    assert VivitMedmnistConfig(conv_stem_channels=[]).conv_stem_channels is None
    assert VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11)).num_parameters() == 1656971


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"conv_stem_channels": [8, 0]}, "conv_stem_channels must be a positive int"),
        # three stages leave a 4^3 map: 8^3 tubelets no longer fit, and the message says why
        ({"conv_stem_channels": [8, 16, 32]}, r"larger than the conv stem's feature map \[4, 4, 4\]"),
        ({"conv_stem_scale": 2}, "needs a conv stem"),
        ({"conv_stem_channels": [8], "conv_stem_scale": 0}, "conv_stem_scale must be a positive int"),
    ],
)
def test_bad_stems_are_refused_at_construction(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        VivitMedmnistConfig(**overrides)


def test_a_stem_that_is_not_a_list_is_refused_by_the_typed_field():
    with pytest.raises(StrictDataclassFieldValidationError, match="conv_stem_channels"):
        VivitMedmnistConfig(conv_stem_channels=8)


def test_the_stem_is_conv_batchnorm_relu_and_every_parameter_learns():
    model = tiny(**STEM).train()
    stem = model.vivit.embeddings.tubelet_embeddings.conv_stem
    kinds = [type(module).__name__ for module in stem]
    assert kinds == ["Conv3d", "BatchNorm3d", "ReLU"] * 3
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv3d)] == [(2, 2, 2)] * 3
    assert model.vivit.embeddings.tubelet_embeddings.projection.in_channels == 16
    out = model(torch.rand(4, 28, 1, 28, 28), labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_in_eval_mode_a_volume_gets_the_same_logits_whatever_its_batch():
    # BatchNorm uses its running statistics at inference: no dependence on the other volumes of the batch
    model = tiny(**STEM).train()
    model(torch.rand(8, 28, 1, 28, 28))  # move the running statistics away from their initial values
    model.eval()
    x = torch.rand(3, 28, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]).logits, model(x).logits[:1])


def test_save_load_keeps_weights_and_running_statistics(tmp_path):
    model = tiny(**STEM).train()
    model(torch.rand(8, 28, 1, 28, 28))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = VivitMedmnistForVideoClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.conv_stem_channels == [4, 8, 16]
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert any(name.endswith("running_mean") for name in before)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["conv_stem_channels"] == [4, 8, 16]


def test_a_stem_model_loads_and_runs_without_the_package(tmp_path):
    model = tiny(**STEM).train()
    model(torch.rand(8, 28, 1, 28, 28))
    model.eval()
    model.save_pretrained(tmp_path)
    VivitMedmnistImageProcessor().save_pretrained(tmp_path)
    volume = probe_volume([28, 28, 28])
    with torch.no_grad():
        expected = model(**VivitMedmnistImageProcessor()(volume, return_tensors="pt")).logits[0]
    report = load_without_package(tmp_path)
    np.testing.assert_allclose(report["logits"], expected.numpy(), atol=1e-5)


def test_a_stem_model_interpolates_positions_and_transfers_to_64():
    model = tiny(**STEM).eval()
    x = torch.rand(2, 64, 1, 64, 64)
    resized = transfer_resolution(model, 64)
    assert resized.config.grid_size == [8, 8, 8]  # 64 -> 32 -> 16 -> 8
    with torch.no_grad():
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True).logits, resized(x).logits)
    before, after = model.state_dict(), resized.state_dict()
    changed = {n for n in before if before[n].shape != after[n].shape or not torch.equal(before[n], after[n])}
    assert changed == {"vivit.embeddings.position_embeddings"}  # the stem is size-agnostic: copied as it is


def test_a_scaled_stem_gives_the_original_logits_on_an_upsampled_volume(caplog):
    # 28^3 -> 56^3 with the first convolution scaled by 2 (kernel 6, stride 4): a nearest-upsampled volume gives
    # the 28^3 model's first feature map exactly, so the same logits; only that kernel changes
    model = tiny(**STEM).train()
    model(torch.rand(8, 28, 1, 28, 28))  # running statistics away from their initial values
    model.eval()
    with caplog.at_level(logging.INFO, logger="vivit_medmnist.resolution"):
        resized = transfer_resolution(model, 56, conv_stem_scale=2, kernel_interpolation="nearest").eval()
    assert "stem scale 1 -> 2" in caplog.text
    x = torch.rand(3, 28, 1, 28, 28)
    upsampled = x.repeat_interleave(2, 1).repeat_interleave(2, 3).repeat_interleave(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(resized(upsampled).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    before, after = model.state_dict(), resized.state_dict()
    changed = {n for n in before if before[n].shape != after[n].shape or not torch.equal(before[n], after[n])}
    assert changed == {"vivit.embeddings.tubelet_embeddings.conv_stem.0.weight"}
    with pytest.raises(ValueError, match="has none"):
        transfer_resolution(tiny(), 56, conv_stem_scale=2)


# --- the synthetic diagnostic -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        import synthetic
    finally:
        sys.path.pop(0)
    return synthetic


def test_synthetic_tubes_are_balanced_binary_masks_whose_classes_differ_by_a_bulge(synthetic):
    volumes, labels = synthetic.make_tubes(40, seed=3)
    assert volumes.shape == (40, 28, 28, 28) and volumes.dtype == np.uint8
    assert set(np.unique(volumes)) == {0, 255}
    assert labels.sum() == 20
    again, _ = synthetic.make_tubes(40, seed=3)
    assert np.array_equal(volumes, again)  # a seed is a data set
    counts = (volumes > 0).sum((1, 2, 3))
    # a thin tube is a small part of the volume, and the bulge adds to it
    assert counts.max() < 0.1 * 28**3
    assert counts[labels == 1].mean() > counts[labels == 0].mean()


def test_synthetic_benchmark_runs_and_reports_fit_and_validation(repo_root, tmp_path):
    out = tmp_path / "synthetic.json"
    done = run_forked(  # a process of its own, forked from the suite's fork server (tests/forked_runs.py)
        [repo_root / "benchmarks" / "synthetic.py", "--options", "reference", "stem3", "--epochs", "1",
         "--train", "32", "--val", "16", "--json", out],
        tmp_path / "logs" / "synthetic", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert 0.0 <= report["count_baseline_val_auc"] <= 1.0
    assert [r["option"] for r in report["results"]] == ["reference", "stem3"]
    for result in report["results"]:
        assert result["s_per_epoch"] > 0 and result["train_loss_last_epoch"] > 0
        assert 0.0 <= result["val_auc"] <= 1.0 and 0.0 <= result["train_acc_last_epoch"] <= 1.0
    assert report["results"][1]["num_tokens"] == 64 and report["results"][0]["num_tokens"] == 27


# --- the recipes that use it ---------------------------------------------------------------------------------

ADRENAL_LABELS = ["normal", "hyperplasia"]


def test_the_medmnist3d_recipes_build_stem_models_of_64_tokens(repo_root):
    from vivit_medmnist.arguments import parse_args
    from vivit_medmnist.trainer_setup import build_model

    for name, size, scale in (("medmnist3d", 28, 1), ("medmnist3d_64", 64, 2)):
        run = parse_args(["--recipe", str(repo_root / "recipes" / f"{name}.yaml")])
        assert run.data.size == size and run.data.flip_axes == []  # label-safe on every set
        config = build_model(run.model, ADRENAL_LABELS, size).config
        assert config.conv_stem_channels == [32, 64, 128] and config.conv_stem_scale == scale, name
        assert config.grid_size == [4, 4, 4], name
        assert (config.num_hidden_layers, config.hidden_size, config.encoder_type) == (8, 128, "joint")
    organ = parse_args(["--recipe", str(repo_root / "recipes" / "organmnist3d.yaml")])
    medmnist = parse_args(["--recipe", str(repo_root / "recipes" / "medmnist3d.yaml")])
    assert organ.model.config_overrides == medmnist.model.config_overrides  # the same model choices


def test_the_64_fine_tuning_recipe_transfers_a_28_stem_model(repo_root, tmp_path):
    from safetensors.torch import load_file

    from vivit_medmnist.arguments import parse_args
    from vivit_medmnist.trainer_setup import build_model

    model = tiny(**STEM, drop_path_rate=0.1)
    model.config.id2label, model.config.label2id = dict(enumerate(ADRENAL_LABELS)), None
    model.save_pretrained(tmp_path)
    recipe = repo_root / "recipes" / "medmnist3d_64_finetune.yaml"
    run = parse_args(["--recipe", str(recipe), "--model_name_or_path", str(tmp_path)])
    assert run.data.size == 64
    new = build_model(run.model, ADRENAL_LABELS, 64, run.recipe_override_keys)
    config = new.config
    assert config.volume_size == [64] * 3 and config.tubelet_size == [1, 1, 1] and config.conv_stem_scale == 2
    assert config.feature_size_for(config.volume_size) == [4, 4, 4] and config.grid_size == [4, 4, 4]
    saved, state = load_file(tmp_path / "model.safetensors"), new.state_dict()
    first_conv = "vivit.embeddings.tubelet_embeddings.conv_stem.0.weight"
    assert state[first_conv].shape == (4, 1, 6, 6, 6)
    for name in saved:  # everything else as saved: the later stages, positions (same grid), blocks, head
        if name != first_conv:
            assert torch.equal(state[name], saved[name]), name
