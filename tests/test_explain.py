"""Explanations (`vivit_medmnist.explain`) and calibration (`vivit_medmnist.calibration`), issue 19.

Maps must be aligned voxel for voxel with the input for every tokenisation; what they claim is measured in
`benchmarks/explanations.py` (localisation on the synthetic task, the randomisation test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
from vivit_medmnist.calibration import (
    brier_score,
    calibrated_probabilities,
    ece_after_a_fitted_temperature,
    ece_of_a_calibrated_model,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from vivit_medmnist.explain import METHODS, explain, heatmap_peak, token_boxes, tokens_to_voxels
from vivit_medmnist.metrics import compute_metrics

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

TOKENISATIONS = {
    "tubelets_valid": {},
    "tubelets_same_strided": {"padding": "same", "tubelet_size": 6, "tubelet_stride": 5},
    "conv_stem": {"conv_stem_channels": [8, 8, 8], "tubelet_size": 1},
    "factorised": {"encoder_type": "factorised_encoder", "num_temporal_layers": 1},
    "cls": {"pooling": "cls"},
    "model3": {"encoder_type": "factorised_self_attention"},
    "model4": {"encoder_type": "factorised_dot_product"},
}


def model_for(fields: dict, size: int = 28, seed: int = 0) -> VivitMedmnistForVideoClassification:
    torch.manual_seed(seed)
    return VivitMedmnistForVideoClassification(
        VivitMedmnistConfig(num_labels=3, volume_size=size, **TINY, **fields)
    ).eval()


def test_token_boxes_follow_the_tokenisation():
    reference = VivitMedmnistConfig()
    assert token_boxes(reference, [28] * 3) == [(0, 8, 8)] * 3  # 3 tubelets of 8; voxels 24..27 unread
    same = VivitMedmnistConfig(padding="same", tubelet_size=6, tubelet_stride=5)
    assert token_boxes(same, [28] * 3) == [(-1, 6, 5)] * 3  # 1 zero voxel padded before
    stem = VivitMedmnistConfig(conv_stem_channels=[32, 64, 128], tubelet_size=1)
    assert token_boxes(stem, [28] * 3) == [(-7, 15, 8)] * 3  # three 3/2/1 convolutions: 15 voxels, every 8
    scaled = VivitMedmnistConfig(conv_stem_channels=[32, 64, 128], tubelet_size=1, conv_stem_scale=2, volume_size=64)
    assert token_boxes(scaled, [64] * 3) == [(-14, 30, 16)] * 3  # first stage 6/4/2


def test_tokens_map_to_exactly_the_voxels_they_read():
    config = VivitMedmnistConfig()
    relevance = torch.arange(27, dtype=torch.float32).view(1, 3, 3, 3)
    voxels = tokens_to_voxels(relevance, config, [28] * 3)[0]
    assert voxels.shape == (28, 28, 28)
    assert torch.all(voxels[24:] == 0) and torch.all(voxels[:, :, 24:] == 0)  # no tubelet reads them
    assert torch.all(voxels[8:16, 16:24, 0:8] == relevance[0, 1, 2, 0])
    # overlapping receptive fields average: the stem's token fields are 15 wide, every 8
    stem = VivitMedmnistConfig(conv_stem_channels=[32, 64, 128], tubelet_size=1)
    one_hot = torch.zeros(1, 4, 4, 4)
    one_hot[0, 1, 1, 1] = 1.0
    voxels = tokens_to_voxels(one_hot, stem, [28] * 3)[0]
    assert voxels[1:16, 1:16, 1:16].min() > 0 and voxels[0].max() == 0 and voxels[16:].max() == 0
    assert voxels[5, 5, 5] == pytest.approx(1 / 8)  # read by 2 x 2 x 2 tokens (fields -7..7 and 1..15)
    assert voxels[8, 8, 8] == pytest.approx(1.0)  # only token (1, 1, 1) reaches it (fields 1..15 and 9..23)


@pytest.mark.parametrize("name", list(TOKENISATIONS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_voxel_map_for_every_tokenisation(name, method):
    model = model_for(TOKENISATIONS[name])
    pixel_values = torch.rand(2, 28, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    maps = explain(model, pixel_values, method, window=7)
    assert maps.shape == (2, 28, 28, 28) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0
    if method == "hires_cam":  # an untrained model may have no token *for* its predicted class: some class has one
        maps = np.stack([explain(model, pixel_values, method, target=c) for c in range(3)])
    assert maps.max() > 0
    if name == "tubelets_valid" and method == "rollout":
        assert maps[:, 24:].max() == 0  # voxels no tubelet reads get no evidence


def test_explanations_under_bf16_autocast_are_float32_maps():
    model = model_for(TOKENISATIONS["conv_stem"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for method in METHODS:
            volume = torch.rand(1, 28, 1, 28, 28, generator=torch.Generator().manual_seed(2))
            maps = explain(model, volume, method, window=7, steps=4)
            assert maps.dtype == np.float32, method
            if method == "hires_cam":  # as above: some class has evidence in an untrained model
                maps = np.stack([explain(model, volume, method, target=c) for c in range(3)])
            assert maps.max() > 0, method


def test_rollout_at_64_and_on_sdpa_models_switches_attention_back():
    model = model_for({"conv_stem_channels": [8, 8, 8], "tubelet_size": 1})
    assert model.config._attn_implementation == "sdpa"
    maps = explain(model, torch.rand(1, 64, 1, 64, 64), "rollout")  # 64^3 through interpolate_pos_encoding
    assert maps.shape == (1, 64, 64, 64)
    assert model.config._attn_implementation == "sdpa"


def test_rollout_follows_the_attention():
    """A block whose attention all goes to one token makes rollout point at that token's voxels."""
    model = model_for({})

    def forced(module, inputs, output):
        if output[1] is None:  # the forward that finds the predicted class, under SDPA
            return output
        weights = torch.zeros_like(output[1])
        weights[..., 13] = 1.0  # every token attends to token 13 = grid (1, 1, 1)
        return output[0], weights

    handles = [layer.attention.register_forward_hook(forced) for layer in model.vivit.encoder.layers]
    maps = explain(model, torch.rand(1, 28, 1, 28, 28), "rollout")
    for handle in handles:
        handle.remove()
    assert heatmap_peak(maps[0]) == (12, 12, 12)  # the centre of voxels 8..15 on every axis


def test_occlusion_finds_the_voxels_a_model_reads():
    """A 'model' whose logit is the mean of one corner cube: occlusion puts its evidence there."""

    class Corner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = VivitMedmnistConfig(num_labels=2)
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values, interpolate_pos_encoding=False, **kwargs):
            score = pixel_values[:, 2:6, 0, 20:24, 20:24].mean((1, 2, 3)) * 10 + self.anchor
            return type("Out", (), {"logits": torch.stack([-score, score], -1)})()

    maps = explain(Corner(), torch.ones(1, 28, 1, 28, 28), "occlusion", target=1, window=4)
    d, h, w = heatmap_peak(maps[0])
    assert 1 <= d <= 6 and 19 <= h <= 24 and 19 <= w <= 24


def test_bad_input_is_a_clear_error():
    model = model_for({})
    with pytest.raises(ValueError, match="unknown explanation method 'lime'; expected one of rollout"):
        explain(model, torch.rand(1, 28, 1, 28, 28), "lime")
    with pytest.raises(ValueError, match=r"expected pixel_values \(N, D, 1, H, W\)"):
        explain(model, torch.rand(28, 28, 28), "rollout")
    with pytest.raises(ValueError, match="target must be a class in 0..2"):
        explain(model, torch.rand(1, 28, 1, 28, 28), "rollout", target=5)


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def test_ece_and_brier_by_hand():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # bins (0.8667, 0.9333]: 0.9 right; (0.7333, 0.8]: 0.8 wrong; (0.6667, 0.7333]: 0.7 right; (0.5333, 0.6]: right
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert expected_calibration_error(probabilities, labels) == pytest.approx(expected)
    assert brier_score(probabilities, labels) == pytest.approx(
        np.mean([2 * 0.1**2, 2 * 0.8**2, 2 * 0.3**2, 2 * 0.4**2])
    )
    assert sum(row["count"] for row in reliability_bins(probabilities, labels)) == 4


def test_temperature_scaling_fixes_an_over_confident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 4000)
    true_logits = rng.normal(size=(4000, 3)) + 2.0 * np.eye(3)[labels]
    sampled = np.array([rng.choice(3, p=p) for p in calibrated_probabilities(true_logits, 1.0)])
    over_confident = 3.0 * true_logits  # the same ranking, too sharp
    temperature = fit_temperature(over_confident, sampled)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(calibrated_probabilities(over_confident, None), sampled)
    after = expected_calibration_error(calibrated_probabilities(over_confident, temperature), sampled)
    assert after < 0.03 < before
    assert (calibrated_probabilities(over_confident, temperature).argmax(-1) == over_confident.argmax(-1)).all()


def test_the_ece_of_a_calibrated_model_is_sampling_noise_that_shrinks_with_the_set():
    confidence = np.random.default_rng(1).uniform(0.5, 1.0, 400)
    probabilities = np.stack([confidence, 1 - confidence], axis=-1)
    # one draw by hand with the same generator: expected_calibration_error of the simulated set
    rng = np.random.default_rng(7)
    drawn = rng.choice(confidence, size=50, replace=True)
    correct = rng.random(50) < drawn
    by_hand = expected_calibration_error(np.stack([drawn, 1 - drawn], -1), np.where(correct, 0, 1))
    one = ece_of_a_calibrated_model(probabilities, 50, draws=1, seed=7)
    assert one["mean"] == pytest.approx(by_hand) and one["p5"] == one["p95"] == one["mean"]
    small, large = ece_of_a_calibrated_model(probabilities, 300), ece_of_a_calibrated_model(probabilities, 30000, 50)
    assert 0.03 < small["p5"] < small["mean"] < small["p95"] and large["mean"] < 0.01
    certain = np.tile([1.0, 0.0], (10, 1))  # always right with confidence 1: no noise at all
    assert ece_of_a_calibrated_model(certain, 100, draws=20)["p95"] == 0.0


def test_a_temperature_fitted_on_a_small_split_adds_its_own_noise_to_the_ece():
    logits = np.random.default_rng(2).normal(0, 2.0, (400, 3))
    temperature = 0.8  # the model is right after T = 0.8, under-confident without it
    known = ece_of_a_calibrated_model(calibrated_probabilities(logits, temperature), 300, draws=300)
    many = ece_after_a_fitted_temperature(logits, temperature, 20000, 300, draws=40, seed=1)
    few = ece_after_a_fitted_temperature(logits, temperature, 30, 300, draws=300, seed=1)
    # 20,000 validation volumes pin T down: the labels were drawn from softmax(logits / 0.8)
    assert 0.77 < many["temperature_p5"] < temperature < many["temperature_p95"] < 0.83
    assert many["mean"] == pytest.approx(known["mean"], abs=0.006)
    # 30 volumes do not: a wide spread of T, and a larger test ECE than the known temperature leaves
    assert few["temperature_p5"] < 0.7 and few["temperature_p95"] > 0.9
    assert few["mean"] > known["mean"] + 0.01 and few["p5"] <= few["mean"] <= few["p95"]


def test_metrics_report_ece_and_brier():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    metrics = compute_metrics((logits, np.array([0, 1, 1, 1])))
    probabilities = calibrated_probabilities(logits, None)
    assert metrics["ece"] == pytest.approx(expected_calibration_error(probabilities, [0, 1, 1, 1]))
    assert metrics["brier"] == pytest.approx(brier_score(probabilities, [0, 1, 1, 1]))


# --------------------------------------------------------------------------------------------------------------
# predict.py --explain
# --------------------------------------------------------------------------------------------------------------


def test_predict_explain_writes_aligned_maps_and_pictures(tmp_path, capsys):
    nibabel = pytest.importorskip("nibabel")
    from test_hub_files import make_folder

    from vivit_medmnist.predict import main

    model = tmp_path / "model"
    make_folder(model)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "batch.npy", rng.integers(0, 256, (2, 28, 28, 28), dtype=np.uint8))
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    affine[:3, 3] = [10, -5, 3]
    nibabel.save(nibabel.Nifti1Image(rng.random((40, 36, 30)).astype(np.float32), affine), tmp_path / "scan.nii.gz")
    out = tmp_path / "why"
    main(["--model_name_or_path", str(model), str(tmp_path / "batch.npy"), str(tmp_path / "scan.nii.gz"),
          "--explain", "rollout", "--explain_dir", str(out)])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "batch_0.rollout.npy", "batch_0.rollout.png", "batch_1.rollout.npy", "batch_1.rollout.png",
        "scan.rollout.nii.gz", "scan.rollout.png",
    ]  # fmt: skip
    assert np.load(out / "batch_0.rollout.npy").shape == (28, 28, 28)
    image = nibabel.load(out / "scan.rollout.nii.gz")
    assert image.shape == (40, 36, 30) and np.allclose(image.affine, affine)  # the input's voxels and affine
    from PIL import Image

    with Image.open(out / "scan.rollout.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 200
    assert "evidence (rollout):" in capsys.readouterr().out
    # nothing is replaced unless asked; an unknown method is a usage error
    with pytest.raises(SystemExit, match="already exists; pass --overwrite_output_file"):
        main(["--model_name_or_path", str(model), str(tmp_path / "batch.npy"), "--explain", "rollout",
              "--explain_dir", str(out)])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", str(model), str(tmp_path / "batch.npy"), "--explain", "lime"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'lime'" in capsys.readouterr().err
