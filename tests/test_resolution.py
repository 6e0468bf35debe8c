"""Volumes of another size: 3D position interpolation at run time, and resolution transfer (issue 11)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForVideoClassification

from vivit_medmnist import (
    VivitMedmnistConfig,
    VivitMedmnistForVideoClassification,
    VivitMedmnistImageProcessor,
)
from vivit_medmnist.arguments import ModelArguments
from vivit_medmnist.hub_files import load_without_package, probe_volume
from vivit_medmnist.resolution import pseudo_inverse_resize, transfer_resolution
from vivit_medmnist.trainer_setup import build_model

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
VARIANTS = {
    "joint": {},
    "factorised": {"encoder_type": "factorised_encoder", "num_temporal_layers": 1},
    "cls": {"pooling": "cls"},
    "model3": {"encoder_type": "factorised_self_attention"},
    "model4": {"encoder_type": "factorised_dot_product"},
}


def tiny(**overrides) -> VivitMedmnistForVideoClassification:
    torch.manual_seed(0)
    config = VivitMedmnistConfig(**TINY, **overrides, num_labels=2, id2label={0: "normal", 1: "hyperplasia"})
    return VivitMedmnistForVideoClassification(config).eval()


def volumes(size: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, size, 1, size, size, generator=torch.Generator().manual_seed(size))


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    return x.repeat_interleave(factor, 1).repeat_interleave(factor, 3).repeat_interleave(factor, 4)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_interpolation_to_the_configs_own_size_is_the_identity(overrides):
    model = tiny(**overrides)
    x = volumes(28)
    with torch.no_grad():
        assert torch.equal(model(x, interpolate_pos_encoding=True).logits, model(x).logits)
    assert (
        model.vivit.embeddings.interpolate_pos_encoding([3, 3, 3])
        is model.vivit.embeddings.position_embeddings
    )


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_28_model_runs_on_64_volumes_like_an_explicitly_resized_model(overrides):
    model = tiny(**overrides)
    x = volumes(64)
    with pytest.raises(ValueError, match="wrong volume size"):
        model(x)  # without the flag, a size mismatch stays an error
    resized = transfer_resolution(model, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x, interpolate_pos_encoding=True).logits, resized(x).logits)
    grid = resized.config.grid_size
    assert grid == [8, 8, 8]
    # the positions over depth too: not only over height and width as in transformers' ViViT
    positions = resized.vivit.embeddings.position_embeddings
    num_cls = 1 if overrides.get("pooling") == "cls" else 0
    assert positions.shape == (1, num_cls + 512, 32)
    grid_positions = positions[0, num_cls:].reshape(8, 8, 8, 32)
    assert not torch.allclose(grid_positions[0], grid_positions[-1])
    if num_cls:  # the CLS position is kept
        assert torch.equal(positions[0, 0], model.vivit.embeddings.position_embeddings[0, 0])


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_transfer_keeps_every_tensor_that_needs_no_resizing_bit_identical(overrides, caplog):
    model = tiny(**overrides)
    with caplog.at_level(logging.INFO, logger="vivit_medmnist.resolution"):
        resized = transfer_resolution(model, 64, tubelet_size=16)
    before, after = model.state_dict(), resized.state_dict()
    assert before.keys() == after.keys()
    changed = {
        name
        for name in before
        if before[name].shape != after[name].shape or not torch.equal(before[name], after[name])
    }
    expected = {
        "vivit.embeddings.tubelet_embeddings.projection.weight",
        "vivit.embeddings.position_embeddings",
    }
    if overrides.get("encoder_type") == "factorised_encoder":  # Models 3 and 4 have no temporal positions
        expected.add("vivit.encoder.temporal_position_embeddings")
    assert changed == expected
    # one log line lists what was resized
    lines = [r.getMessage() for r in caplog.records if "resolution transfer" in r.getMessage()]
    assert len(lines) == 1 and all(name in lines[0] for name in expected)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_at_an_integer_scale_the_transferred_model_gives_the_same_logits(overrides):
    # 28^3 -> 56^3 with tubelets 8 -> 16: the same 3^3 grid; a nearest-neighbour upsampled volume gives every
    # tubelet upsampled alike, and the pseudo-inverse kernel keeps each token
    model = tiny(**overrides)
    resized = transfer_resolution(model, 56, tubelet_size=16, kernel_interpolation="nearest")
    x = volumes(28, n=3)
    with torch.no_grad():
        torch.testing.assert_close(
            resized(nearest_upsample(x, 2)).logits, model(x).logits, rtol=1e-5, atol=1e-5
        )


def test_pseudo_inverse_resize_keeps_the_response_to_a_resized_tubelet():
    torch.manual_seed(1)
    weight = torch.randn(4, 1, 2, 3, 4, dtype=torch.float64)
    new = pseudo_inverse_resize(weight, [4, 5, 6], "trilinear")
    tubelet = torch.randn(1, 1, 2, 3, 4, dtype=torch.float64)
    resized = torch.nn.functional.interpolate(tubelet, size=(4, 5, 6), mode="trilinear", align_corners=False)
    torch.testing.assert_close(
        torch.einsum("ocdhw,bcdhw->bo", new, resized), torch.einsum("ocdhw,bcdhw->bo", weight, tubelet)
    )
    assert pseudo_inverse_resize(weight, [2, 3, 4]) is weight


def test_the_transferred_folder_loads_with_and_without_the_package(tmp_path):
    resized = transfer_resolution(tiny(), 64, tubelet_size=16)
    resized.save_pretrained(tmp_path)
    VivitMedmnistImageProcessor().save_pretrained(tmp_path)
    volume = probe_volume([64, 64, 64])
    with torch.no_grad():
        expected = resized(**VivitMedmnistImageProcessor()(volume, return_tensors="pt")).logits[0]
        loaded = AutoModelForVideoClassification.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(
            loaded(**VivitMedmnistImageProcessor()(volume, return_tensors="pt")).logits[0], expected
        )
    report = load_without_package(tmp_path)
    np.testing.assert_allclose(report["logits"], expected.numpy(), atol=1e-5)


def test_train_transfers_a_saved_28_model_to_64_volumes(tmp_path, caplog):
    tiny(encoder_type="factorised_encoder", num_temporal_layers=1).save_pretrained(tmp_path)
    VivitMedmnistImageProcessor().save_pretrained(tmp_path)
    args = ModelArguments(
        model_name_or_path=str(tmp_path), config_overrides="tubelet_size=16,drop_path_rate=0.1"
    )
    with caplog.at_level(logging.INFO, logger="vivit_medmnist.resolution"):
        model = build_model(args, ["normal", "hyperplasia"], 64)
    config = model.config
    assert (config.volume_size, config.tubelet_size, config.grid_size) == ([64] * 3, [16] * 3, [4, 4, 4])
    assert config.encoder_type == "factorised_encoder" and config.drop_path_rate == 0.1
    assert "resolution transfer [28, 28, 28] -> [64, 64, 64]" in caplog.text
    # the rest of the architecture still may not change
    with pytest.raises(ValueError, match="would change the architecture"):
        build_model(
            ModelArguments(model_name_or_path=str(tmp_path), config_overrides="hidden_size=64"),
            ["a", "b"],
            64,
        )
