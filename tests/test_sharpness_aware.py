"""Sharpness-aware minimisation (`--sam_rho`, issue 23): a step's gradient is the one at the ascent point, the
weights come back exactly, a run trains with it and its card says so, and bad settings are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_hub_files import TINY, tiny_model
from test_scripts import TINY_OVERRIDES, run_in_process
from transformers import TrainingArguments

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
from vivit_medmnist.sharpness_aware import SharpnessAwareTrainer


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(4, 28, 1, 28, 28, generator=g), "labels": torch.tensor([0, 1, 1, 0])}


def gradients(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def loss_and_gradients(model, inputs) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), gradients(model)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_a_step_takes_the_gradient_at_the_ascent_point_and_restores_the_weights(tmp_path, rho):
    torch.manual_seed(0)  # no dropout: the passes by hand and the step's compute one function
    config = VivitMedmnistConfig(**TINY, num_labels=2, attention_probs_dropout_prob=0.0)
    model = VivitMedmnistForVideoClassification(config).train()
    args = TrainingArguments(tmp_path, report_to="none", use_cpu=True, per_device_train_batch_size=4)
    trainer = SharpnessAwareTrainer(model=model, args=args, sam_rho=rho)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets before each step
    inputs = batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # by hand: g at w, e = rho g / ||g||, the gradient at w + e
    loss_at_w, g = loss_and_gradients(model, inputs)
    norm = torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p.add_(x * rho / norm)
    _, expected = loss_and_gradients(model, inputs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(before[name])
    model.zero_grad(set_to_none=True)

    loss = trainer.training_step(model, inputs)
    got = gradients(model)
    assert loss.item() == pytest.approx(loss_at_w, rel=1e-6)  # what is logged: the loss at w
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the weights are exactly w again, and the gradient is not the plain one (the test can tell the two apart)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert max((a - b).abs().max().item() for a, b in zip(got, g, strict=True)) > 1e-4


def test_bad_settings_are_refused(tmp_path):
    args = TrainingArguments(tmp_path, report_to="none", use_cpu=True, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="needs --gradient_accumulation_steps 1, got 2"):
        SharpnessAwareTrainer(model=tiny_model(), args=args, sam_rho=0.05)
    args = TrainingArguments(tmp_path, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="sam_rho must be positive, got 0"):
        SharpnessAwareTrainer(model=tiny_model(), args=args, sam_rho=0)


def test_a_run_trains_with_sam_and_its_card_says_so(shared_data_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--dataset_name", "adrenalmnist3d", "--data_dir", shared_data_dir, "--report_to", "none"]
    done = run_in_process(
        "train", *common, "--output_dir", out, "--config_overrides", TINY_OVERRIDES,
        "--max_train_samples", 32, "--max_eval_samples", 16, "--max_test_samples", 16,
        "--per_device_train_batch_size", 16,
        "--num_train_epochs", 1, "--sam_rho", 0.05,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.isfinite(json.loads((out / "train_results.json").read_text())["train_loss"])
    card = (out / "README.md").read_text()
    assert "| optimizer | adamw_torch_fused, sharpness-aware (rho 0.05) |" in card
    for value, message in [
        (["--sam_rho", 0], "--sam_rho must be positive, got 0.0"),
        (["--sam_rho", 0.05, "--gradient_accumulation_steps", 2],
         "it needs --gradient_accumulation_steps 1, got 2"),
    ]:
        bad = run_in_process("train", *common, "--output_dir", tmp_path / "bad", *value)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
        assert not (tmp_path / "bad").exists()
