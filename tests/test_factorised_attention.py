"""ViViT Models 3 and 4 (issue 21): the attention pattern itself, parameters, and the package's paths.

Tokens come in (d, h, w) order, token t * S + s: temporal index t along depth, spatial position s of S = h * w.
"""

from __future__ import annotations

import copy

import pytest
import torch

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
from vivit_medmnist.modeling_vivit_medmnist import factorised_attention_mask
from vivit_medmnist.resolution import transfer_resolution

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
GRID = [3, 2, 2]  # a 24 x 16 x 16 volume in 8^3 tubelets: 12 tokens
VOLUME = [24, 16, 16]
MODELS = ("factorised_self_attention", "factorised_dot_product")


def model_for(encoder_type: str, seed: int = 0, **fields) -> VivitMedmnistForVideoClassification:
    torch.manual_seed(seed)
    config = VivitMedmnistConfig(volume_size=VOLUME, encoder_type=encoder_type, num_labels=3, **{**TINY, **fields})
    return VivitMedmnistForVideoClassification(config).eval()


def time_and_space(grid=GRID) -> tuple[torch.Tensor, torch.Tensor]:
    token = torch.arange(grid[0] * grid[1] * grid[2])
    return token // (grid[1] * grid[2]), token % (grid[1] * grid[2])


def changed_tokens(module, mask, token: int, hidden: int = 32) -> torch.Tensor:
    """Which output tokens of an attention module change when input token `token` changes."""
    torch.manual_seed(1)
    x = torch.randn(1, 12, hidden)
    y = x.clone()
    y[0, token] += 1.0
    with torch.no_grad():
        a, b = module(x, mask)[0], module(y, mask)[0]
    return (a - b).abs().amax(-1)[0] > 1e-6


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_model_3_spatial_step_sees_only_its_temporal_index_and_temporal_step_only_its_position(attn_implementation):
    model = model_for("factorised_self_attention")
    model.set_attn_implementation(attn_implementation)
    block = model.vivit.encoder.layers[0]
    spatial_mask, temporal_mask = factorised_attention_mask(model.config, GRID, torch.device("cpu"))
    time, space = time_and_space()
    for token in (0, 5, 11):
        assert torch.equal(changed_tokens(block.attention, spatial_mask, token), time == time[token])
        assert torch.equal(changed_tokens(block.temporal_attention, temporal_mask, token), space == space[token])


def test_model_4_heads_each_see_only_their_axis():
    model = model_for("factorised_dot_product")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(pixel_values=torch.rand(2, 24, 1, 16, 16), output_attentions=True).attentions
    time, space = time_and_space()
    same_time, same_space = time[:, None] == time[None], space[:, None] == space[None]
    for weights in attentions:  # (batch, 4 heads, 12, 12)
        spatial_heads, temporal_heads = weights[:, :2], weights[:, 2:]
        assert torch.all(spatial_heads[..., ~same_time] == 0) and torch.all(spatial_heads[..., same_time] > 0)
        assert torch.all(temporal_heads[..., ~same_space] == 0) and torch.all(temporal_heads[..., same_space] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))
    # a block then mixes both: a token reaches exactly the tokens that share its slab or its position
    block = model.vivit.encoder.layers[0].attention
    mask = factorised_attention_mask(model.config, GRID, torch.device("cpu"))
    for token in (0, 7):
        assert torch.equal(changed_tokens(block, mask, token), (time == time[token]) | (space == space[token]))


def test_parameter_counts_follow_the_paper():
    """Model 4 has exactly Model 1's parameters (§3.3); Model 3 adds one attention layer and its LayerNorm per
    block; the default configuration is still the Keras reference."""
    joint, model3, model4 = (VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11, encoder_type=e))
                             for e in ("joint", *MODELS))  # fmt: skip
    assert joint.num_parameters() == 1_656_971
    assert model4.num_parameters() == joint.num_parameters()
    attention = sum(p.numel() for p in joint.vivit.encoder.layers[0].attention.parameters())
    assert attention == 4 * 128 * 128 + 4 * 128
    assert model3.num_parameters() == joint.num_parameters() + 8 * (attention + 2 * 128)


@pytest.mark.parametrize("encoder_type", MODELS)
def test_sdpa_eager_and_cpu_attention_agree_and_outputs_have_their_shapes(encoder_type):
    from vivit_medmnist.cpu_speed import CPU_ATTENTION

    model = model_for(encoder_type)
    pixel_values = torch.rand(2, 24, 1, 16, 16)
    logits = {}
    for implementation in ("sdpa", "eager", CPU_ATTENTION):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out = model(pixel_values=pixel_values, output_attentions=implementation != "sdpa", output_hidden_states=True)
        logits[implementation] = out.logits
        assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (2, 12, 32)
        if implementation != "sdpa":
            per_block = 2 if encoder_type == "factorised_self_attention" else 1
            assert len(out.attentions) == 2 * per_block and out.attentions[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[CPU_ATTENTION], logits["sdpa"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoder_type", MODELS)
def test_gradient_checkpointing_gives_the_same_gradients(encoder_type):
    model = model_for(encoder_type, attention_probs_dropout_prob=0.0).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    pixel_values, labels = torch.rand(2, 24, 1, 16, 16), torch.tensor([0, 2])
    for m in (model, checkpointed):
        m(pixel_values=pixel_values, labels=labels).loss.backward()
    for (name, a), (_, b) in zip(model.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("encoder_type", MODELS)
def test_save_load_other_sizes_and_transfer(encoder_type, tmp_path):
    model = model_for(encoder_type)
    model.save_pretrained(tmp_path)
    loaded = VivitMedmnistForVideoClassification.from_pretrained(tmp_path).eval()
    pixel_values = torch.rand(1, 24, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)
        # a larger volume: a 4 x 3 x 3 grid; the masks follow the grid
        bigger = model(pixel_values=torch.rand(1, 32, 1, 24, 24), interpolate_pos_encoding=True).logits
    assert bigger.shape == (1, 3)
    moved = transfer_resolution(copy.deepcopy(model), 32, tubelet_size=8)
    assert moved.config.encoder_type == encoder_type and moved.config.grid_size == [4, 4, 4]
    with torch.no_grad():
        assert moved(pixel_values=torch.rand(1, 32, 1, 32, 32)).logits.shape == (1, 3)


def test_models_3_and_4_need_mean_pooling_and_model_4_two_heads():
    for encoder_type in MODELS:
        with pytest.raises(ValueError, match='needs pooling="mean"'):
            VivitMedmnistConfig(encoder_type=encoder_type, pooling="cls")
    with pytest.raises(ValueError, match="num_attention_heads >= 2"):
        VivitMedmnistConfig(encoder_type="factorised_dot_product", hidden_size=32, num_attention_heads=1)


@pytest.mark.parametrize("encoder_type", ("joint", *MODELS))
def test_models_1_3_and_4_compile_to_one_graph(encoder_type):
    """torch.compile captures the whole forward (torch._dynamo.explain: no graph break), with either attention,
    also with the recipe's convolutional stem for Model 1; what the compiled code then computes is checked on a
    GPU (tests/test_gpu.py)."""
    import torch._dynamo

    stem = {"conv_stem_channels": [8, 8, 8], "tubelet_size": 1} if encoder_type == "joint" else {}
    model = model_for(encoder_type, **stem)
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        explanation = torch._dynamo.explain(model)(pixel_values=torch.rand(2, 24, 1, 16, 16))
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
