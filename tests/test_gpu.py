"""CUDA: bf16 training, SDPA's fused kernels, torch.compile, GPU -> CPU round trip (`pytest -m gpu`).

Skipped where there is no CUDA device; `benchmarks/gpu_check.py` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ENCODERS = {
    "joint": {},
    "factorised": {"encoder_type": "factorised_encoder"},
    "model3": {"encoder_type": "factorised_self_attention"},
    "model4": {"encoder_type": "factorised_dot_product"},
}


def model_and_batch(overrides: dict, batch_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11, **overrides)).cuda()
    pixel_values = torch.rand(batch_size, 28, 1, 28, 28, device="cuda")
    labels = torch.randint(0, 11, (batch_size,), device="cuda")
    return model, pixel_values, labels


@pytest.mark.parametrize("overrides", ENCODERS.values(), ids=ENCODERS.keys())
def test_bf16_autocast_training_tracks_fp32(overrides):
    losses = {}
    for precision in ("fp32", "bf16"):
        model, pixel_values, labels = model_and_batch({**overrides, "attention_probs_dropout_prob": 0.0})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses[precision] = []
        for _ in range(20):
            optimizer.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(pixel_values=pixel_values, labels=labels).loss
            loss.backward()
            optimizer.step()
            losses[precision].append(loss.item())
    assert losses["fp32"][-1] < losses["fp32"][0]  # it learns the batch
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"]):
        assert abs(fp32 - bf16) < 0.05 * abs(fp32) + 0.02


def test_sdpa_runs_a_fused_cuda_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, pixel_values, _ = model_and_batch({})
    model.eval()
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values).logits
    model.set_attn_implementation("sdpa")
    # only the fused kernels are allowed: the math fallback would raise
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad(), sdpa_kernel(fused_only):
        fused = model(pixel_values).logits
    torch.testing.assert_close(fused, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("overrides", ENCODERS.values(), ids=ENCODERS.keys())
def test_torch_compile_fullgraph_trains_and_infers(overrides):
    model, pixel_values, labels = model_and_batch({**overrides, "attention_probs_dropout_prob": 0.0})
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.eval()(pixel_values).logits, model.eval()(pixel_values).logits, rtol=1e-3, atol=1e-3
        )
    compiled.train()
    loss = compiled(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("overrides", ENCODERS.values(), ids=ENCODERS.keys())
def test_saved_on_gpu_loads_on_cpu_with_the_same_logits(overrides, tmp_path):
    model, pixel_values, _ = model_and_batch(overrides)
    model.eval().save_pretrained(tmp_path)
    loaded = VivitMedmnistForVideoClassification.from_pretrained(tmp_path).eval()
    assert next(loaded.parameters()).device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values.cpu()).logits, model(pixel_values).logits.cpu(), rtol=1e-4, atol=1e-4
        )
