"""VivitMedmnistConfig / VivitMedmnistModel / VivitMedmnistForVideoClassification."""

import math
import re

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification, VivitMedmnistModel
from vivit_medmnist.modeling_vivit_medmnist import VivitMedmnistTubeletEmbeddings


def tiny_config(**overrides) -> VivitMedmnistConfig:
    kwargs = {
        "volume_size": 8,
        "tubelet_size": 4,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "num_labels": 3,
    }
    return VivitMedmnistConfig(**{**kwargs, **overrides})


def volumes_for(config: VivitMedmnistConfig, batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    depth, height, width = config.volume_size
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, depth, config.num_channels, height, width, generator=generator)


# ---------------------------------------------------------------- the Keras reference


def test_reference_defaults_and_parameter_count():
    config = VivitMedmnistConfig(num_labels=11)
    assert config.volume_size == [28, 28, 28] and config.tubelet_size == [8, 8, 8]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 8, 8)
    assert config.intermediate_size == 512 and config.layer_norm_eps == 1e-6
    assert config.hidden_act == config.mlp_output_act == "gelu_pytorch_tanh"
    assert (config.attention_probs_dropout_prob, config.hidden_dropout_prob) == (0.1, 0.0)
    assert (config.pooling, config.padding, config.initialization) == ("mean", "valid", "keras")
    assert config.grid_size == [3, 3, 3] and config.num_tokens == config.sequence_length == 27
    model = VivitMedmnistForVideoClassification(config)
    assert sum(p.numel() for p in model.parameters()) == 1_656_971
    assert model.num_parameters() == 1_656_971
    # exactly the Keras layers: Conv3D, Embedding(27), 8 x (2 LN + MHA + 2 Dense), LN, Dense(11)
    assert model.vivit.embeddings.position_embeddings.shape == (1, 27, 128)
    assert model.vivit.embeddings.cls_token is None


def test_mlp_applies_tanh_gelu_after_both_dense_layers():
    model = VivitMedmnistModel(tiny_config())
    mlp = model.encoder.layers[0].mlp
    x = torch.randn(2, 5, 16)
    expected = nn.functional.gelu(
        mlp.fc2(nn.functional.gelu(mlp.fc1(x), approximate="tanh")), approximate="tanh"
    )
    torch.testing.assert_close(mlp(x), expected)
    plain = VivitMedmnistModel(tiny_config(mlp_output_act=None)).encoder.layers[0].mlp
    torch.testing.assert_close(plain(x), plain.fc2(nn.functional.gelu(plain.fc1(x), approximate="tanh")))


def test_keras_initialisation_limits():
    torch.manual_seed(0)
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11))

    def check_uniform(tensor, limit):
        assert tensor.abs().max() <= limit + 1e-7
        assert tensor.abs().max() > 0.95 * limit  # uniform over thousands of draws reaches close to the limit
        assert abs(tensor.std().item() - limit / math.sqrt(3)) < 0.05 * limit

    def glorot(fan_in, fan_out):
        return math.sqrt(6 / (fan_in + fan_out))

    check_uniform(model.vivit.embeddings.tubelet_embeddings.projection.weight, glorot(8**3, 128 * 8**3))
    check_uniform(model.vivit.embeddings.position_embeddings, 0.05)
    for layer in model.vivit.encoder.layers:
        qkv = layer.attention.qkv_proj.weight
        for part in qkv.chunk(3):  # q, k, v: Keras EinsumDense (128, 8, 16): fan_in 8*128, fan_out 16*128
            check_uniform(part, glorot(1024, 2048))
        check_uniform(layer.attention.o_proj.weight, glorot(128, 1024))  # (8, 16, 128): 16*8, 128*8
        check_uniform(layer.mlp.fc1.weight, glorot(128, 512))
        check_uniform(layer.mlp.fc2.weight, glorot(512, 128))
        for norm in (layer.layernorm_before, layer.layernorm_after):
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    check_uniform(model.classifier.weight, glorot(128, 11))
    biases = [p for name, p in model.named_parameters() if name.endswith("bias") and "layernorm" not in name]
    assert len(biases) == 1 + 8 * 4 + 1 and all(torch.all(b == 0) for b in biases)


def test_normal_initialisation():
    torch.manual_seed(0)
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11, initialization="normal"))
    for weight in (
        model.vivit.encoder.layers[0].attention.qkv_proj.weight,
        model.vivit.encoder.layers[0].mlp.fc1.weight,
        model.vivit.embeddings.position_embeddings,
    ):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert torch.all(model.vivit.encoder.layers[0].attention.qkv_proj.bias == 0)


# ---------------------------------------------------------------- forward, loss, gradients


@pytest.mark.parametrize(
    "overrides, num_tokens",
    [
        ({}, 8),
        ({"pooling": "cls"}, 8),
        ({"tubelet_size": 4, "tubelet_stride": 2}, 27),  # overlapping tubelets through nn.Conv3d
        ({"volume_size": 10, "padding": "same"}, 27),  # 10 = 2 x 4 + 2: padded to 12
        ({"volume_size": 10}, 8),  # valid: the last 2 voxels of each axis are dropped
        ({"volume_size": [8, 12, 6], "tubelet_size": [2, 4, 3], "num_channels": 2}, 4 * 3 * 2),
    ],
)
def test_forward_shapes(overrides, num_tokens):
    config = tiny_config(**overrides)
    assert config.num_tokens == num_tokens
    model = VivitMedmnistForVideoClassification(config).eval()
    pixel_values = volumes_for(config, batch_size=3)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
        base = model.vivit(pixel_values)
    assert outputs.logits.shape == (3, 3)
    assert base.last_hidden_state.shape == (3, config.sequence_length, 16)
    assert base.pooler_output.shape == (3, 16)
    assert len(outputs.hidden_states) == config.num_hidden_layers + 1
    assert all(h.shape == (3, config.sequence_length, 16) for h in outputs.hidden_states)
    if config.pooling == "cls":
        torch.testing.assert_close(base.pooler_output, base.last_hidden_state[:, 0])
    else:
        torch.testing.assert_close(base.pooler_output, base.last_hidden_state.mean(dim=1))


def test_reference_forward_and_gradients_reach_every_parameter():
    model = VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11)).train()
    pixel_values = torch.rand(2, 28, 1, 28, 28)
    outputs = model(pixel_values, labels=torch.tensor([0, 10]))
    assert outputs.logits.shape == (2, 11) and outputs.loss.ndim == 0
    outputs.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_cls_token_gets_gradients():
    model = VivitMedmnistForVideoClassification(tiny_config(pooling="cls"))
    model(volumes_for(model.config), labels=torch.tensor([0, 2])).loss.backward()
    assert model.vivit.embeddings.cls_token.grad.abs().sum() > 0


def test_tubelet_matmul_equals_conv3d():
    for overrides in ({}, {"volume_size": 10, "padding": "same"}, {"volume_size": 10}, {"num_channels": 2}):
        config = tiny_config(**overrides)
        embeddings = VivitMedmnistTubeletEmbeddings(config)
        assert embeddings.as_matmul
        pixel_values = volumes_for(config)
        padded = nn.functional.pad(
            pixel_values.transpose(1, 2), [a for pair in config.padding_amounts[::-1] for a in pair]
        )
        conv = nn.functional.conv3d(
            padded, embeddings.projection.weight, embeddings.projection.bias, stride=4
        )
        torch.testing.assert_close(embeddings(pixel_values), conv.flatten(2).transpose(1, 2))


def test_loss_is_cross_entropy_and_honours_num_items_in_batch():
    model = VivitMedmnistForVideoClassification(tiny_config()).eval()
    pixel_values = volumes_for(model.config, batch_size=4)
    labels = torch.tensor([0, 1, 2, 1])
    outputs = model(pixel_values, labels=labels)
    torch.testing.assert_close(outputs.loss, nn.functional.cross_entropy(outputs.logits, labels))
    # under gradient accumulation the Trainer passes the label count of the whole accumulated batch
    accumulated = model(pixel_values, labels=labels, num_items_in_batch=torch.tensor(10))
    torch.testing.assert_close(
        accumulated.loss, nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / 10
    )
    assert VivitMedmnistForVideoClassification.accepts_loss_kwargs is True


def test_medmnist_uint8_column_labels_and_binary_task():
    model = VivitMedmnistForVideoClassification(tiny_config(num_labels=2)).eval()
    pixel_values = volumes_for(model.config, batch_size=3)
    labels = torch.tensor([[0], [1], [1]], dtype=torch.uint8)  # MedMNIST stores labels as (N, 1) uint8
    outputs = model(pixel_values, labels=labels)
    assert outputs.logits.shape == (3, 2)  # binary still uses 2-logit cross-entropy, like the reference
    torch.testing.assert_close(
        outputs.loss, nn.functional.cross_entropy(outputs.logits, labels.view(-1).long())
    )
    assert model.config.problem_type == "single_label_classification"


def test_return_dict_false_gives_a_tuple():
    model = VivitMedmnistForVideoClassification(tiny_config()).eval()
    pixel_values = volumes_for(model.config)
    outputs = model(pixel_values, labels=torch.tensor([0, 1]), return_dict=False)
    assert isinstance(outputs, tuple) and len(outputs) == 2 and outputs[0].ndim == 0
    torch.testing.assert_close(outputs[1], model(pixel_values).logits)


# ---------------------------------------------------------------- attention implementations


@pytest.mark.parametrize("overrides", [{}, {"tubelet_size": 7}], ids=["27-tokens", "64-tokens"])
def test_eager_and_sdpa_agree(monkeypatch, overrides):
    # count the calls of torch's kernel: the configured implementation is the one that runs, on every device
    calls = []
    sdpa_kernel = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    torch.manual_seed(0)
    config = VivitMedmnistConfig(num_labels=11, num_hidden_layers=2, **overrides)
    model = VivitMedmnistForVideoClassification(config).eval()
    pixel_values = torch.rand(3, 28, 1, 28, 28)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixel_values).logits
    assert not calls
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(pixel_values).logits
    assert len(calls) == config.num_hidden_layers
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)


def test_attentions_with_eager_and_what_sdpa_does():
    model = VivitMedmnistForVideoClassification(tiny_config(pooling="cls")).eval()
    pixel_values = volumes_for(model.config)
    model.set_attn_implementation("eager")
    outputs = model(pixel_values, output_attentions=True)
    assert len(outputs.attentions) == 2
    for attention in outputs.attentions:
        assert attention.shape == (2, 2, 9, 9)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 9))
    assert model(pixel_values).attentions is None
    # as everywhere in transformers 5, SDPA computes no attention maps: it warns and returns none
    model.set_attn_implementation("sdpa")
    assert not model(pixel_values, output_attentions=True).attentions


def test_attention_dropout_is_active_in_training_only():
    model = VivitMedmnistForVideoClassification(tiny_config(attention_probs_dropout_prob=0.5))
    model.set_attn_implementation("eager")
    pixel_values = volumes_for(model.config)
    model.train()
    assert not torch.allclose(model(pixel_values).logits, model(pixel_values).logits)
    model.eval()
    torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits)


def test_drop_path_rates():
    model = VivitMedmnistModel(tiny_config(num_hidden_layers=3, drop_path_rate=0.2))
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    model.train()
    pixel_values = volumes_for(model.config, batch_size=8)
    assert not torch.allclose(model(pixel_values).pooler_output, model(pixel_values).pooler_output)


# ---------------------------------------------------------------- ViViT Model 2: factorised encoder


def test_factorised_encoder_is_spatial_blocks_per_slab_then_temporal_blocks():
    """Recompute Model 2 by hand from the joint model's pieces: spatial blocks on each temporal slab alone, mean,
    temporal position embeddings, temporal blocks, final LayerNorm, mean."""
    config = tiny_config(
        volume_size=[12, 8, 8], encoder_type="factorised_encoder", num_hidden_layers=2, num_temporal_layers=1
    )
    model = VivitMedmnistModel(config).eval()
    assert config.grid_size == [3, 2, 2]
    pixel_values = volumes_for(config, batch_size=2)
    encoder = model.encoder
    with torch.no_grad():
        tokens = model.embeddings(pixel_values)  # (2, 12, hidden), (d, h, w) order
        frames = []
        for t in range(3):
            slab = tokens[:, 4 * t : 4 * (t + 1)]
            for layer in encoder.spatial.layers:
                slab = layer(slab)
            frames.append(encoder.spatial_layernorm(slab).mean(dim=1))
        hidden = torch.stack(frames, dim=1) + encoder.temporal_position_embeddings
        for layer in encoder.temporal.layers:
            hidden = layer(hidden)
        expected = model.layernorm(hidden).mean(dim=1)
        outputs = model(pixel_values, output_hidden_states=True)
    torch.testing.assert_close(outputs.pooler_output, expected)
    assert outputs.last_hidden_state.shape == (2, 3, config.hidden_size)
    assert len(outputs.hidden_states) == 2 + 1 + 1  # input of the first block, 2 spatial, 1 temporal


def test_factorised_encoder_parameters_gradients_and_drop_path():
    joint = VivitMedmnistForVideoClassification(tiny_config())
    config = tiny_config(encoder_type="factorised_encoder", num_temporal_layers=2, drop_path_rate=0.3)
    model = VivitMedmnistForVideoClassification(config)
    layer_params = sum(p.numel() for p in joint.vivit.encoder.layers[0].parameters())
    hidden, frames = config.hidden_size, config.grid_size[0]
    # + 2 temporal blocks + the spatial LayerNorm + temporal position embeddings
    assert model.num_parameters() == joint.num_parameters() + 2 * layer_params + 2 * hidden + frames * hidden
    rates = [
        getattr(layer.drop_path, "drop_prob", 0.0)
        for stack in (model.vivit.encoder.spatial, model.vivit.encoder.temporal)
        for layer in stack.layers
    ]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])  # one linear ramp over spatial then temporal blocks
    pixel_values = volumes_for(config, batch_size=3)
    model(pixel_values, labels=torch.tensor([0, 1, 2])).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    limit = model.vivit.encoder.temporal_position_embeddings.abs().max().item()
    assert 0 < limit <= 0.05  # keras initialisation, like the joint position embeddings


def test_factorised_encoder_save_and_load(tmp_path):
    config = tiny_config(encoder_type="factorised_encoder", num_temporal_layers=1)
    model = VivitMedmnistForVideoClassification(config).eval()
    model.save_pretrained(tmp_path)
    loaded = VivitMedmnistForVideoClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_type == "factorised_encoder" and loaded.config.num_temporal_layers == 1
    pixel_values = volumes_for(config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gradient_checkpointing_gives_the_same_gradients(attn_implementation):
    # dropout and stochastic depth on: checkpointing must replay the same random masks
    config = tiny_config(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1, drop_path_rate=0.1)
    model = VivitMedmnistForVideoClassification(config).train()
    model.set_attn_implementation(attn_implementation)
    pixel_values, labels = volumes_for(config, batch_size=4), torch.tensor([0, 1, 2, 0])

    def gradients():
        model.zero_grad()
        torch.manual_seed(123)
        model(pixel_values, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    assert model.supports_gradient_checkpointing
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert all(layer.gradient_checkpointing for layer in model.vivit.encoder.layers)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "shape, dtype, hint",
    [
        ((2, 8, 8, 8), torch.float32, "channel axis is missing"),
        ((2, 8, 8, 8, 1), torch.float32, "channels-last"),
        ((2, 1, 8, 8, 8), torch.float32, "transpose(1, 2)"),
        ((2, 8, 3, 8, 8), torch.float32, "wrong channel count"),
        ((2, 6, 1, 8, 8), torch.float32, "wrong volume size"),
        ((2, 8, 1, 8, 8, 1), torch.float32, ""),
        ((8, 8, 8), torch.float32, ""),
    ],
)
def test_bad_pixel_values_raise_a_clear_error(shape, dtype, hint):
    model = VivitMedmnistForVideoClassification(tiny_config())
    with pytest.raises(ValueError) as error:
        model(torch.zeros(shape, dtype=dtype))
    message = str(error.value)
    assert "expected pixel_values of shape (batch, 8, 1, 8, 8)" in message
    assert f"got {shape}" in message
    assert hint in message


def test_uint8_pixel_values_raise_a_clear_error():
    model = VivitMedmnistModel(tiny_config())
    with pytest.raises(ValueError, match="expected floating-point pixel_values, got dtype torch.uint8"):
        model(torch.zeros(2, 8, 1, 8, 8, dtype=torch.uint8))


def test_float64_pixel_values_are_cast():
    model = VivitMedmnistModel(tiny_config()).eval()
    pixel_values = volumes_for(model.config)
    torch.testing.assert_close(model(pixel_values.double()).pooler_output, model(pixel_values).pooler_output)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"tubelet_size": 30}, "tubelet_size .* larger than volume_size"),
        ({"volume_size": [28, 28, 28], "tubelet_size": [8, 8, 29]}, "larger than volume_size"),
        ({"hidden_size": 100}, "divisible by num_attention_heads"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"padding": "full"}, "padding must be one of"),
        ({"initialization": "xavier"}, "initialization must be one of"),
        ({"attention_probs_dropout_prob": -0.1}, r"attention_probs_dropout_prob must be in \[0, 1\)"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob must be in"),
        ({"drop_path_rate": 1.5}, "drop_path_rate must be in"),
        ({"volume_size": [28, 28]}, "volume_size must be a positive int or a sequence of 3"),
        ({"tubelet_size": 0}, "tubelet_size must be a positive int"),
        ({"tubelet_stride": 9}, "tubelet_stride .* larger than tubelet_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
        ({"hidden_act": "gelu_nonexistent"}, "hidden_act must be a key"),
        ({"mlp_output_act": "nope"}, "mlp_output_act must be a key"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
        ({"num_labels": 0}, "num_labels must be >= 1"),
        ({"encoder_type": "divided"}, "encoder_type must be one of"),
        ({"encoder_type": "factorised_encoder", "pooling": "cls"}, 'needs pooling="mean"'),
        ({"num_temporal_layers": 0}, "num_temporal_layers must be a positive int"),
    ],
)
def test_bad_config_raises_value_error_at_construction(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        VivitMedmnistConfig(**overrides)


def test_config_normalises_sizes_and_derives_the_token_grid():
    config = VivitMedmnistConfig(volume_size=(28, 32, 30), tubelet_size=[4, 8, 8], tubelet_stride=(2, 8, 6))
    assert config.volume_size == [28, 32, 30] and config.tubelet_size == [4, 8, 8]
    assert config.tubelet_stride == [2, 8, 6] and config.stride == [2, 8, 6]
    assert config.grid_size == [13, 4, 4] and config.num_tokens == 208
    same = VivitMedmnistConfig(padding="same")  # Keras/TF "same": ceil(28 / 8) = 4 tubelets, 2 + 2 zeros
    assert same.grid_size == [4, 4, 4] and same.padding_amounts == [(2, 2)] * 3
    overlapping = VivitMedmnistConfig(tubelet_size=8, tubelet_stride=4)  # (28 - 8) / 4 + 1 = 6, covers all
    assert overlapping.grid_size == [6, 6, 6] and overlapping.padding_amounts == [(0, 0)] * 3


def test_config_round_trip(tmp_path):
    config = VivitMedmnistConfig(
        volume_size=[28, 32, 30],
        tubelet_size=[4, 8, 8],
        tubelet_stride=[2, 8, 8],
        padding="same",
        pooling="cls",
        mlp_output_act=None,
        drop_path_rate=0.1,
        qkv_bias=False,
        initialization="normal",
        num_labels=11,
        id2label={i: f"organ_{i}" for i in range(11)},
    )
    config.save_pretrained(tmp_path)
    loaded = VivitMedmnistConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.id2label[3] == "organ_3" and loaded.num_labels == 11
    assert re.search(r'"model_type": "vivit_medmnist"', (tmp_path / "config.json").read_text())


@pytest.mark.parametrize(
    "overrides", [{"hidden_size": "128"}, {"tubelet_size": [8.0, 8, 8]}, {"qkv_bias": "yes"}]
)
def test_wrong_field_types_raise_at_construction(overrides):
    # type checks come from transformers' @strict dataclass validation (its own exception type, a clear message)
    with pytest.raises(StrictDataclassError, match=f"field '{next(iter(overrides))}'"):
        VivitMedmnistConfig(**overrides)
