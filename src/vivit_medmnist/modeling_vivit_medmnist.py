"""PyTorch ViViT for 3D medical volumes (MedMNIST), as Hugging Face classes.

The default configuration is the Keras example "Video Vision Transformer" (Gosthipaty & Thakur): tubelet
embedding (Conv3d, kernel = stride = 8, valid padding) + learned positions, 8 pre-norm blocks, final LayerNorm,
mean pooling over the tokens, linear head.

This file is copied next to the weights by `save_pretrained`, so it imports only torch, transformers and its
sibling `configuration_vivit_medmnist` (a relative import, which the copy machinery follows).
"""

import math
import os
from collections.abc import Callable
from typing import ClassVar

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    MaskedImageModelingOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_vivit_medmnist import VivitMedmnistConfig


def check_pixel_values(
    pixel_values: torch.Tensor, config: VivitMedmnistConfig, any_size: bool = False
) -> None:
    """Raise a ValueError saying what was expected and what came, with a hint for the usual layout mistakes.
    `any_size`: volumes of another size than the config's are fine (`interpolate_pos_encoding=True`) if they hold
    at least one tubelet along every axis."""
    depth, height, width = config.volume_size
    if any_size and isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 5:
        size = (pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4])
        if pixel_values.shape[2] == config.num_channels and min(config.grid_size_for(size)) >= 1:
            depth, height, width = size
    channels = config.num_channels
    expected = (depth, channels, height, width)
    expected_text = f"(batch, {depth}, {channels}, {height}, {width}) = (batch, frames=D, channels, H, W)"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"expected pixel_values as a torch.Tensor of shape {expected_text}, got {type(pixel_values)}"
        )
    shape = tuple(pixel_values.shape)
    if pixel_values.ndim == 5 and shape[1:] == expected:
        if shape[0] == 0:
            raise ValueError(
                f"expected at least one volume, got an empty batch: pixel_values of shape {shape}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"expected floating-point pixel_values, got dtype {pixel_values.dtype}; uint8 volumes must be "
                "scaled to [0, 1] first (VivitMedmnistImageProcessor does it)"
            )
        return
    hint = ""
    if pixel_values.ndim == 4 and shape[1:] == (depth, height, width):
        hint = " - the channel axis is missing: use pixel_values.unsqueeze(2), or VivitMedmnistImageProcessor"
    elif pixel_values.ndim == 5 and shape[1:] == (depth, height, width, channels):
        hint = " - this looks channels-last: use pixel_values.permute(0, 1, 4, 2, 3)"
    elif pixel_values.ndim == 5 and shape[1:] == (channels, depth, height, width):
        hint = " - this looks like (batch, channels, D, H, W): use pixel_values.transpose(1, 2)"
    elif pixel_values.ndim == 5 and shape[2] != channels and shape[1:2] + shape[3:] == (depth, height, width):
        hint = f" - wrong channel count: the model was configured with num_channels={channels}"
    elif pixel_values.ndim == 5 and shape[2] == channels:
        hint = f" - wrong volume size: the model was configured with volume_size={list(config.volume_size)}"
    raise ValueError(f"expected pixel_values of shape {expected_text}, got {shape}{hint}")


class VivitMedmnistConvStem(nn.Sequential):
    """(batch, C, D, H, W) -> (batch, conv_stem_channels[-1], ceil(D / 2^k), ...): k stages of 3x3x3 Conv3d with
    stride 2 -> BatchNorm3d -> ReLU (`config.conv_stem_channels`; Xiao et al. 2021's early convolutions, in 3D).
    The first stage's kernel, stride and padding are scaled by `config.conv_stem_scale`."""

    def __init__(self, config: VivitMedmnistConfig):
        stages = []
        in_channels = config.num_channels
        for stage, out_channels in enumerate(config.conv_stem_channels):
            scale = config.conv_stem_scale if stage == 0 else 1  # see VivitMedmnistConfig.conv_stem_scale
            stages += [
                nn.Conv3d(
                    in_channels,
                    out_channels,
                    kernel_size=3 * scale,
                    stride=2 * scale,
                    padding=scale,
                    bias=False,
                ),
                nn.BatchNorm3d(out_channels),
                nn.ReLU(),
            ]
            in_channels = out_channels
        super().__init__(*stages)


class VivitMedmnistTubeletEmbeddings(nn.Module):
    """(batch, D, C, H, W) -> (batch, num_tokens, hidden_size): a Conv3d over tubelets (Keras: `TubeletEmbedding`).

    Non-overlapping tubelets (stride = tubelet size, the reference) are one matmul of the flattened tubelets with
    the Conv3d kernel: the same parameters and, up to float rounding, the same result as the convolution, on every
    device, without the convolution's overhead for a kernel that is also its stride. Overlapping tubelets go
    through `nn.Conv3d`. With `config.conv_stem_channels`, the tubelets are cut from the stem's feature map.
    """

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__()
        self.conv_stem = VivitMedmnistConvStem(config) if config.conv_stem_channels else None
        in_channels = config.conv_stem_channels[-1] if config.conv_stem_channels else config.num_channels
        self.projection = nn.Conv3d(
            in_channels, config.hidden_size, kernel_size=config.tubelet_size, stride=config.stride
        )
        self.config = config
        self.tubelet_size = config.tubelet_size
        self.as_matmul = config.stride == config.tubelet_size and self.conv_stem is None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        volume_size = (pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4])
        (d0, d1), (h0, h1), (w0, w1) = self.config.padding_amounts_for(volume_size)
        if self.conv_stem is not None:
            features = self.conv_stem(pixel_values.transpose(1, 2))  # Conv3d layout (batch, C, D, H, W)
            features = nn.functional.pad(features, (w0, w1, h0, h1, d0, d1))
            return self.projection(features).flatten(2).transpose(1, 2).contiguous()
        if any((d0, d1, h0, h1, w0, w1)):  # F.pad's order: last axis first, of (batch, D, C, H, W)
            pixel_values = nn.functional.pad(pixel_values, (w0, w1, h0, h1, 0, 0, d0, d1))
        if not self.as_matmul:
            # Conv3d wants (batch, C, D, H, W); the output is made contiguous here once, as a transposed layout
            # would propagate through every residual add and cost copies in every block
            embeddings = self.projection(pixel_values.transpose(1, 2))
            return embeddings.flatten(2).transpose(1, 2).contiguous()

        (grid_d, grid_h, grid_w) = self.config.grid_size_for(volume_size)
        (size_d, size_h, size_w) = self.tubelet_size
        batch_size, _, channels = pixel_values.shape[:3]
        # "valid": the trailing voxels that no tubelet covers are dropped (a view)
        volumes = pixel_values[:, : grid_d * size_d, :, : grid_h * size_h, : grid_w * size_w]
        tubelets = volumes.reshape(batch_size, grid_d, size_d, channels, grid_h, size_h, grid_w, size_w)
        # -> (batch, tokens in (d, h, w) order, kernel in (C, d, h, w) order): the Conv3d output and weight orders
        tubelets = tubelets.permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(batch_size, grid_d * grid_h * grid_w, -1)
        weight = self.projection.weight.view(self.projection.out_channels, -1)
        return nn.functional.linear(tubelets, weight, self.projection.bias)


class VivitMedmnistEmbeddings(nn.Module):
    """Tubelet tokens (+ a CLS token with `pooling="cls"`) + learned position embeddings. With `use_mask_token`
    (masked volume modelling), the tokens that `bool_masked_pos` names are replaced by a learned mask token."""

    def __init__(self, config: VivitMedmnistConfig, use_mask_token: bool = False):
        super().__init__()
        self.tubelet_embeddings = VivitMedmnistTubeletEmbeddings(config)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.pooling == "cls" else None
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.sequence_length, config.hidden_size))
        self.dropout = (
            nn.Dropout(config.hidden_dropout_prob) if config.hidden_dropout_prob > 0 else nn.Identity()
        )

        self.grid_size = config.grid_size

    def interpolate_pos_encoding(self, grid_size: list[int]) -> torch.Tensor:
        """The position embeddings resized to a token grid of `grid_size`: trilinear over depth, height and width
        (`align_corners=False`, as transformers resizes ViT and ViViT positions over height and width); the CLS
        position is kept. The grid of the config gives the embeddings unchanged."""
        if list(grid_size) == list(self.grid_size):
            return self.position_embeddings
        num_cls = 1 if self.cls_token is not None else 0
        cls_position, positions = self.position_embeddings.split(
            [num_cls, self.position_embeddings.shape[1] - num_cls], 1
        )
        hidden_size = positions.shape[-1]
        positions = positions.reshape(1, *self.grid_size, hidden_size).permute(0, 4, 1, 2, 3)
        positions = nn.functional.interpolate(
            positions, size=tuple(grid_size), mode="trilinear", align_corners=False
        )
        positions = positions.permute(0, 2, 3, 4, 1).reshape(1, -1, hidden_size)
        return torch.cat((cls_position, positions), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_size: list[int] | None = None,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`grid_size`: the token grid of volumes of another size than the config's (`interpolate_pos_encoding`).
        `bool_masked_pos` (batch, num_tokens): the tokens to replace by the mask token (as in ViT's SimMIM)."""
        embeddings = self.tubelet_embeddings(pixel_values)
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError("bool_masked_pos needs a model built with use_mask_token=True")
            masked = bool_masked_pos.unsqueeze(-1).to(embeddings.dtype)
            embeddings = embeddings * (1.0 - masked) + self.mask_token.to(embeddings.dtype) * masked
        if self.cls_token is not None:
            embeddings = torch.cat((self.cls_token.expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
        positions = (
            self.position_embeddings if grid_size is None else self.interpolate_pos_encoding(grid_size)
        )
        return self.dropout(embeddings + positions)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention, (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out, like the other
    implementations of transformers' attention interface; the only one that returns the attention weights."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class VivitMedmnistAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection (one GEMM instead of three).

    Same parameters as Keras' `MultiHeadAttention(key_dim=hidden/heads)`: q, k, v and output kernels with biases.
    """

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # Keras' glorot fans of these kernels, read by `_init_weights` ("keras" initialisation). Keras' attention
        # kernels are EinsumDense kernels, q/k/v of shape (hidden, heads, head_dim) and output (heads, head_dim,
        # hidden), and Keras' glorot takes receptive = prod(shape[:-2]), fan_in = shape[-2] * receptive,
        # fan_out = shape[-1] * receptive. q, k and v have the same shape, hence the same limit: one uniform draw
        # over the fused (3 * hidden, hidden) weight is three independent draws with that limit.
        hidden, heads = config.hidden_size, self.num_heads
        self.qkv_proj.keras_fans = (heads * hidden, self.head_dim * hidden)
        self.o_proj.keras_fans = (self.head_dim * heads, hidden * heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask`: None (every token attends to every token), or an additive mask broadcastable to
        (batch, heads, tokens, tokens), 0 where a pair may attend: ViViT Models 3 and 4 (`factorised_attention_mask`)."""
        batch_size, seq_length, _ = hidden_states.shape
        # (batch, seq, 3 * hidden) -> 3 x (batch, heads, seq, head_dim) views
        qkv = self.qkv_proj(hidden_states).view(batch_size, seq_length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_length, -1))
        return attn_output, attn_weights


class VivitMedmnistMLP(nn.Module):
    """Dense -> activation -> Dense -> activation (the Keras reference applies GELU after both dense layers;
    `mlp_output_act=None` gives the usual ViT MLP)."""

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_activation_fn = (
            nn.Identity() if config.mlp_output_act is None else ACT2FN[config.mlp_output_act]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        return self.output_activation_fn(self.fc2(hidden_states))


class VivitMedmnistDropPath(nn.Module):
    """Stochastic depth: drops a residual branch for whole samples during training (Huang et al. 2016)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob).div_(keep_prob)
        return hidden_states * mask

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class VivitMedmnistLayer(GradientCheckpointingLayer):
    """One pre-norm Transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: VivitMedmnistConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = VivitMedmnistAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VivitMedmnistMLP(config)
        # Identity instead of no-op modules keeps the default (reference) block free of per-call overhead
        self.dropout = (
            nn.Dropout(config.hidden_dropout_prob) if config.hidden_dropout_prob > 0 else nn.Identity()
        )
        self.drop_path = VivitMedmnistDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        return hidden_states + self.drop_path(self.dropout(mlp_output))


class VivitMedmnistFactorisedSelfAttentionLayer(VivitMedmnistLayer):
    """ViViT Model 3's block ("factorised self-attention", §3.3): x + spatial attn(LN(x)), then + temporal
    attn(LN(.)), then + mlp(LN(.)). `attention_mask` (2, 1, 1, tokens, tokens) holds the spatial step's mask, then
    the temporal step's (`factorised_attention_mask`)."""

    def __init__(self, config: VivitMedmnistConfig, drop_path_rate: float = 0.0):
        super().__init__(config, drop_path_rate)
        self.layernorm_temporal = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.temporal_attention = VivitMedmnistAttention(config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        spatial_mask, temporal_mask = attention_mask
        attn_output, _ = self.attention(self.layernorm_before(hidden_states), spatial_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        attn_output, _ = self.temporal_attention(self.layernorm_temporal(hidden_states), temporal_mask, **kwargs)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        mlp_output = self.mlp(self.layernorm_after(hidden_states))
        return hidden_states + self.drop_path(self.dropout(mlp_output))


def factorised_attention_mask(
    config: VivitMedmnistConfig, grid_size: list[int], device: torch.device
) -> torch.Tensor | None:
    """Where ViViT Models 3 and 4 let tokens attend, as additive masks (0: may attend, the float32 minimum: may
    not) over the tokens in (d, h, w) order, token t * S + s for temporal index t (along depth) and spatial
    position s (of S = h * w): None for Models 1 and 2.

    - Model 3 (`factorised_self_attention`): (2, 1, 1, N, N), the spatial step (pairs with the same t) and the
      temporal step (pairs with the same s);
    - Model 4 (`factorised_dot_product`): (1, heads, N, N), the first half of the heads spatial, the rest temporal.
    """
    if config.encoder_type not in ("factorised_self_attention", "factorised_dot_product"):
        return None
    space = grid_size[1] * grid_size[2]
    token = torch.arange(grid_size[0] * space, device=device)
    time_index, space_index = token // space, token % space
    blocked = torch.finfo(torch.float32).min
    same_time = torch.where(time_index[:, None] == time_index[None], 0.0, blocked)
    same_space = torch.where(space_index[:, None] == space_index[None], 0.0, blocked)
    if config.encoder_type == "factorised_self_attention":
        return torch.stack([same_time, same_space])[:, None, None]
    spatial_heads = config.num_attention_heads // 2
    heads = [same_time] * spatial_heads + [same_space] * (config.num_attention_heads - spatial_heads)
    return torch.stack(heads)[None]


def _drop_path_rates(config: VivitMedmnistConfig) -> list[float]:
    """Stochastic-depth rate of every block, growing linearly from 0 to `drop_path_rate` over the whole depth."""
    num_layers = config.num_hidden_layers
    if config.encoder_type == "factorised_encoder":
        num_layers += config.num_temporal_layers
    return [config.drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]


class VivitMedmnistEncoder(nn.Module):
    """A stack of blocks, one per stochastic-depth rate (see `_drop_path_rates`): Model 3's blocks for
    `encoder_type="factorised_self_attention"`, else the plain block (Models 1, 2 and 4)."""

    def __init__(self, config: VivitMedmnistConfig, drop_path_rates: list[float]):
        super().__init__()
        layer_class = (
            VivitMedmnistFactorisedSelfAttentionLayer
            if config.encoder_type == "factorised_self_attention"
            else VivitMedmnistLayer
        )
        self.layers = nn.ModuleList([layer_class(config, rate) for rate in drop_path_rates])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        for layer in self.layers:
            # positional arguments: required by reentrant gradient checkpointing
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return hidden_states


class VivitMedmnistFactorisedEncoder(nn.Module):
    """ViViT Model 2 ("factorised encoder"): spatial blocks within each temporal index, then temporal blocks.

    The tubelet tokens come in (d, h, w) order, so the tokens of temporal index t are the contiguous run
    `[t * S, (t + 1) * S)` with S = grid_h * grid_w: a reshape to (batch * T, S, hidden) runs the spatial encoder
    on all slabs at once. Each slab is then layer-normed and averaged into one token (the paper uses a per-frame
    CLS token; the mean matches this package's default pooling), and temporal position embeddings tell the
    temporal encoder the order of the slabs.
    """

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__()
        rates = _drop_path_rates(config)
        self.num_frames = config.grid_size[0]
        self.spatial = VivitMedmnistEncoder(config, rates[: config.num_hidden_layers])
        self.spatial_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.temporal_position_embeddings = nn.Parameter(torch.zeros(1, self.num_frames, config.hidden_size))
        self.temporal = VivitMedmnistEncoder(config, rates[config.num_hidden_layers :])

    def interpolate_pos_encoding(self, num_frames: int) -> torch.Tensor:
        """The temporal position embeddings resized linearly to `num_frames` slabs (`align_corners=False`)."""
        if num_frames == self.num_frames:
            return self.temporal_position_embeddings
        positions = self.temporal_position_embeddings.transpose(1, 2)
        positions = nn.functional.interpolate(positions, size=num_frames, mode="linear", align_corners=False)
        return positions.transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, num_frames: int | None = None, **kwargs: Unpack[TransformersKwargs]
    ) -> torch.Tensor:
        """`num_frames`: the temporal slabs of volumes of another size than the config's."""
        num_frames = num_frames or self.num_frames
        batch_size, num_tokens, hidden_size = hidden_states.shape
        slabs = hidden_states.reshape(batch_size * num_frames, num_tokens // num_frames, hidden_size)
        slabs = self.spatial_layernorm(self.spatial(slabs, **kwargs))
        frames = slabs.mean(dim=1).view(batch_size, num_frames, hidden_size)
        return self.temporal(frames + self.interpolate_pos_encoding(num_frames), **kwargs)


HEAD_PREFIX = "classifier."


def _check_loaded_tensors(model, info: dict, source, new_head_allowed: bool | None) -> None:
    """Raise an OSError naming every tensor the checkpoint lacked, had in excess or had in another shape, apart
    from the head cases `VivitMedmnistPreTrainedModel.from_pretrained` allows."""
    saved_bare = list(getattr(model.config, "architectures", None) or []) == ["VivitMedmnistModel"]
    has_head = hasattr(model, "classifier")
    problems = []
    missing = sorted(info["missing_keys"])
    if missing and not (
        has_head and (new_head_allowed or saved_bare) and all(k.startswith(HEAD_PREFIX) for k in missing)
    ):
        problems.append(f"missing from the checkpoint: {_names(missing)}")
    unexpected = sorted(k for k in info["unexpected_keys"] if has_head or not k.startswith(HEAD_PREFIX))
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {_names(unexpected)}")
    mismatched = sorted(
        f"{key} (saved {tuple(saved)}, model {tuple(new)})"
        for key, saved, new in info["mismatched_keys"]
        if not key.startswith(HEAD_PREFIX)
    )
    if mismatched:
        problems.append(f"of another shape: {_names(mismatched)}")
    if problems:
        raise OSError(
            f"{source}: the saved weights do not match the {type(model).__name__} of its config; "
            + "; ".join(problems)
            + ". Nothing was initialised in their place. (A new classification head: ignore_mismatched_sizes=True.)"
        )


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class VivitMedmnistPreTrainedModel(PreTrainedModel):
    config: VivitMedmnistConfig
    config_class = VivitMedmnistConfig
    base_model_prefix = "vivit"
    main_input_name = "pixel_values"
    input_modalities = ("video",)
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["VivitMedmnistEmbeddings", "VivitMedmnistLayer"]
    _supports_sdpa = True
    _can_compile_fullgraph = True
    _can_record_outputs: ClassVar[dict[str, type[nn.Module]]] = {
        "hidden_states": VivitMedmnistLayer,
        "attentions": VivitMedmnistAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Keras-style (default) or transformers-style initialisation, see `VivitMedmnistConfig.initialization`.

        Uses `transformers.initialization`, whose functions skip tensors loaded from a checkpoint. transformers
        only calls this for modules that own parameters (not for the attention module, whose Linears own them),
        hence the `keras_fans` attribute on the attention projections.
        """
        config = self.config
        if config.initialization == "normal":
            # Linear/Conv3d weights normal(0, initializer_range), biases 0, LayerNorm 1/0
            super()._init_weights(module)
            if isinstance(module, VivitMedmnistEmbeddings):
                init.normal_(module.position_embeddings, mean=0.0, std=config.initializer_range)
                if module.cls_token is not None:
                    init.normal_(module.cls_token, mean=0.0, std=config.initializer_range)
            elif isinstance(module, VivitMedmnistFactorisedEncoder):
                init.normal_(module.temporal_position_embeddings, mean=0.0, std=config.initializer_range)
            return

        if isinstance(module, (nn.Linear, nn.Conv3d)):
            fans = getattr(module, "keras_fans", None)
            if fans is None:
                # torch's fans equal Keras' for Dense (in, out) and Conv3D (k*k*k*in, k*k*k*out) kernels
                init.xavier_uniform_(module.weight)
            else:  # the attention projections, see VivitMedmnistAttention.__init__
                limit = math.sqrt(6.0 / sum(fans))
                init.uniform_(module.weight, -limit, limit)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm3d):  # the conv stem's: Keras' defaults are torch's
            super()._init_weights(module)
        elif isinstance(module, VivitMedmnistEmbeddings):
            init.uniform_(module.position_embeddings, -0.05, 0.05)  # keras.layers.Embedding's default
            if module.cls_token is not None:
                init.uniform_(module.cls_token, -0.05, 0.05)
        elif isinstance(module, VivitMedmnistFactorisedEncoder):
            init.uniform_(module.temporal_position_embeddings, -0.05, 0.05)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict: weights are read only from safetensors (never unpickled), and
        a checkpoint that does not hold exactly the model's tensors is an error naming them, not a model with
        freshly initialised weights. A new head is allowed only where it is asked for: with
        `ignore_mismatched_sizes=True` (e.g. another `num_labels`) the classifier may be resized or absent, and a
        task model may be loaded from a bare `VivitMedmnistModel` checkpoint (its `architectures` says so);
        loading the bare model from a task checkpoint drops the classifier, as in every transformers model."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "vivit-medmnist loads weights only from safetensors; use_safetensors=False is refused"
            )
        if os.path.isfile(str(pretrained_model_name_or_path)) and not str(
            pretrained_model_name_or_path
        ).endswith(".safetensors"):
            raise OSError(f"{pretrained_model_name_or_path}: expected a model folder or a .safetensors file")
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                **{**kwargs, "use_safetensors": True, "output_loading_info": True},
            )
        except SafetensorError as err:  # truncated or not a safetensors file: name the folder
            raise OSError(
                f"{pretrained_model_name_or_path}: model.safetensors is unreadable ({err})"
            ) from err
        except OSError:
            raise  # transformers' and huggingface_hub's own, which name the file
        except Exception as err:
            if "ignore_mismatched_sizes" in str(err):  # the loading report of a config that is not its weights'
                raise OSError(
                    f"{pretrained_model_name_or_path}: config.json does not match model.safetensors: tensors were "
                    "saved in other shapes than the config describes (e.g. a class added to id2label: the "
                    "classifier has another number of outputs); the load report above names them. Nothing was "
                    "initialised in their place. (A new classification head: ignore_mismatched_sizes=True.)"
                ) from err
            raise OSError(
                f"{pretrained_model_name_or_path}: cannot load the model ({type(err).__name__}: {err})"
            ) from err
        _check_loaded_tensors(
            model, info, pretrained_model_name_or_path, kwargs.get("ignore_mismatched_sizes")
        )
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        # `register_for_auto_class` makes `save_pretrained` write only the saving class's own entry (plus
        # AutoConfig) into `auto_map`. Name both model classes so that a folder saved from either loads with
        # `AutoModel` and `AutoModelForVideoClassification` (trust_remote_code=True) where the package is absent.
        if self.is_remote_code():
            module_name = __name__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", f"{module_name}.VivitMedmnistModel")
            auto_map.setdefault(
                "AutoModelForVideoClassification", f"{module_name}.VivitMedmnistForVideoClassification"
            )
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class VivitMedmnistModel(VivitMedmnistPreTrainedModel):
    """The bare encoder: embeddings -> blocks -> final LayerNorm -> pooled output (token mean or CLS state).

    With `encoder_type="factorised_encoder"` the blocks are `VivitMedmnistFactorisedEncoder`'s and
    `last_hidden_state` holds one token per temporal index. With `"factorised_self_attention"` (Model 3) and
    `"factorised_dot_product"` (Model 4) the blocks attend through `factorised_attention_mask`.
    """

    def __init__(self, config: VivitMedmnistConfig, use_mask_token: bool = False):
        super().__init__(config)
        self.config = config
        self.embeddings = VivitMedmnistEmbeddings(config, use_mask_token)
        if config.encoder_type == "factorised_encoder":
            self.encoder = VivitMedmnistFactorisedEncoder(config)
        else:
            self.encoder = VivitMedmnistEncoder(config, _drop_path_rates(config))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.tubelet_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, D, num_channels, H, W)`):
            The volumes, e.g. from [`VivitMedmnistImageProcessor`] (uint8 / 255).
        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Take volumes of another size than `config.volume_size`: the position embeddings (and the factorised
            encoder's temporal ones) are resized to their token grid, trilinearly over all three axes.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_tokens)`, *optional*):
            Tokens to replace by the mask token (a model built with `use_mask_token=True`, as
            [`VivitMedmnistForPreTraining`] builds it).

        `output_hidden_states=True` returns the embeddings and the output of every block (before the final
        LayerNorm), `num_hidden_layers + 1` tensors of shape (batch, tokens, hidden) (with
        `encoder_type="factorised_encoder"`, then also the temporal blocks' outputs; the spatial ones have shape
        `(batch * grid_size[0], tokens per slab, hidden)`). `output_attentions=True` returns the attention
        weights of every attention layer, (batch, heads, tokens, tokens): one per block, two per block for
        Model 3 (the spatial, then the temporal step), and for Models 3 and 4 zero wherever
        `factorised_attention_mask` forbids a pair. It needs `attn_implementation="eager"` (like every
        transformers model, SDPA computes no weights: it warns and returns none).
        """
        check_pixel_values(pixel_values, self.config, any_size=interpolate_pos_encoding)
        dtype = self.embeddings.tubelet_embeddings.projection.weight.dtype
        if pixel_values.dtype != dtype:
            pixel_values = pixel_values.to(dtype)

        grid_size = None  # the config's
        if interpolate_pos_encoding:
            grid_size = self.config.grid_size_for(
                (pixel_values.shape[1], pixel_values.shape[3], pixel_values.shape[4])
            )
        embeddings = self.embeddings(pixel_values, grid_size, bool_masked_pos)
        if self.config.encoder_type == "factorised_encoder":
            if grid_size is not None:
                kwargs["num_frames"] = grid_size[0]
            hidden_states = self.encoder(embeddings, **kwargs)
        else:  # Models 3 and 4 attend through a mask of the token grid, Model 1 through none
            mask = factorised_attention_mask(self.config, grid_size or self.config.grid_size, embeddings.device)
            hidden_states = self.encoder(embeddings, mask, **kwargs)
        sequence_output = self.layernorm(hidden_states)
        if self.config.pooling == "cls":
            pooled_output = sequence_output[:, 0]
        else:  # Keras GlobalAvgPool1D over the tokens, after the final LayerNorm
            pooled_output = sequence_output.mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


class VivitMedmnistForVideoClassification(VivitMedmnistPreTrainedModel):
    """`VivitMedmnistModel` + a linear head on the pooled output (the Keras reference's softmax Dense, whose
    softmax is folded into the cross-entropy loss)."""

    # The loss is computed by `self.loss_function` (transformers' ForSequenceClassificationLoss) with the
    # `num_items_in_batch` that the Trainer passes through **kwargs: the summed cross-entropy is divided by the
    # number of labels of the whole accumulated (and, under DDP, gathered) batch, so the Trainer's rescaling of
    # models that accept loss kwargs is exact under gradient accumulation and DDP. Stated explicitly rather than
    # left to the Trainer's inspection of the signature.
    accepts_loss_kwargs = True

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vivit = VivitMedmnistModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, D, num_channels, H, W)`):
            The volumes, e.g. from [`VivitMedmnistImageProcessor`] (uint8 / 255).
        labels (`torch.LongTensor` of shape `(batch_size,)` or `(batch_size, 1)`, *optional*):
            Class indices in `[0, num_labels)`; the loss is then the cross-entropy (`config.problem_type`
            `"single_label_classification"`, also for two classes). Float labels of shape `(batch_size,
            num_labels)` mean multi-label (BCE) as usual in transformers.

        interpolate_pos_encoding (`bool`, *optional*, defaults to `False`):
            Take volumes of another size than `config.volume_size`, see [`VivitMedmnistModel.forward`].

        `output_attentions`, `output_hidden_states` and `return_dict` are taken as in every transformers model.
        """
        outputs: BaseModelOutputWithPooling = self.vivit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)

        loss = None
        if labels is not None:
            single_label = self.config.problem_type in (None, "single_label_classification")
            if single_label and not labels.is_floating_point():
                # MedMNIST labels are uint8 (N, 1); the loss reads only int32/int64 labels as class indices
                labels = labels.long()
            loss = self.loss_function(labels, logits, self.config, **kwargs)

        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def token_owners(config: VivitMedmnistConfig, volume_size, device=None) -> torch.Tensor:
    """(D, H, W) long: the token that owns each voxel, -1 where none does. Token i owns, per axis, the `step`
    voxels from `origin + i * step` (origin = start + (span - step) // 2, `config.token_fields_for`) that lie in
    its receptive field: its tubelet, or the cell around the centre of its conv-stem field. Every voxel has at most
    one owner; a voxel no token reads has none."""
    grid = config.grid_size_for(volume_size)
    owners = []
    for (start, span, step), size, count in zip(config.token_fields_for(volume_size), volume_size, grid):
        voxel = torch.arange(size, device=device)
        token = torch.div(voxel - (start + (span - step) // 2), step, rounding_mode="floor")
        first = start + token * step
        inside = (token >= 0) & (token < count) & (voxel >= first) & (voxel < first + span)
        owners.append(torch.where(inside, token, -1))
    d, h, w = owners[0][:, None, None], owners[1][None, :, None], owners[2][None, None, :]
    return torch.where((d >= 0) & (h >= 0) & (w >= 0), (d * grid[1] + h) * grid[2] + w, -1)


class VivitMedmnistForPreTraining(VivitMedmnistPreTrainedModel):
    """Masked volume modelling: SimMIM (Xie et al. 2022) in 3D, VideoMAE's task with an encoder that sees every
    token, as a convolutional stem needs the whole grid. The voxels owned by the masked tokens (`token_owners`)
    are zeroed in the input, so that no visible token's overlapping receptive field reads them, and the masked
    tokens' embeddings become a learned mask token; a linear layer maps each output token to the voxels of its
    cell, and the loss is the mean squared error over the masked voxels only (MAE's and VideoMAE's; SimMIM's L1
    is least for the median, which on sparse binary masks such as MedMNIST's shape sets is mostly 0).

    The encoder (`self.vivit`) is what fine-tuning starts from: `vivit_medmnist.pretraining` saves it as a bare
    `VivitMedmnistModel` folder, which `VivitMedmnistForVideoClassification.from_pretrained` takes."""

    def __init__(self, config: VivitMedmnistConfig):
        super().__init__(config)
        if config.encoder_type == "factorised_encoder":
            raise ValueError(
                "masked volume modelling needs one output per token; encoder_type='factorised_encoder' returns one "
                "per temporal index: use 'joint', 'factorised_self_attention' or 'factorised_dot_product'"
            )
        self.vivit = VivitMedmnistModel(config, use_mask_token=True)
        steps = [step for _, _, step in config.token_fields_for(config.volume_size)]
        self.decoder = nn.Linear(config.hidden_size, config.num_channels * math.prod(steps))
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedImageModelingOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, D, num_channels, H, W)`):
            The volumes, of the config's size.
        bool_masked_pos (`torch.BoolTensor` of shape `(batch_size, num_tokens)`):
            The tokens to mask, in the token grid's (d, h, w) order
            (`vivit_medmnist.pretraining.MaskedVolumeCollator` draws them).

        Returns the loss and the `reconstruction`, shaped as `pixel_values`: each owned voxel's prediction from its
        token (zero where no token owns the voxel).
        """
        check_pixel_values(pixel_values, self.config)
        config, batch_size = self.config, pixel_values.shape[0]
        if bool_masked_pos is None or tuple(bool_masked_pos.shape) != (batch_size, config.num_tokens):
            got = None if bool_masked_pos is None else tuple(bool_masked_pos.shape)
            raise ValueError(f"bool_masked_pos must have shape {(batch_size, config.num_tokens)}, got {got}")
        bool_masked_pos = bool_masked_pos.bool()
        volume_size = list(config.volume_size)
        owners = token_owners(config, volume_size, pixel_values.device)
        # (batch, D, 1, H, W): voxels whose owner is masked (index -1, no owner, reads the appended False)
        padded = torch.cat((bool_masked_pos, bool_masked_pos.new_zeros(batch_size, 1)), dim=1)
        masked_voxels = padded[:, owners].unsqueeze(2)
        visible = pixel_values.masked_fill(masked_voxels, 0.0)
        outputs = self.vivit(visible, bool_masked_pos=bool_masked_pos, **kwargs)
        tokens = outputs.last_hidden_state[:, -config.num_tokens :]  # without the CLS state

        # each token's prediction is a (C, step_d, step_h, step_w) block at its cell; the blocks tile a volume that
        # starts at voxel `origin` on each axis, cut here to the input's voxels
        fields = config.token_fields_for(volume_size)
        steps, grid = [step for _, _, step in fields], config.grid_size
        blocks = self.decoder(tokens).float().view(batch_size, *grid, config.num_channels, *steps)
        tiled = blocks.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(
            batch_size, grid[0] * steps[0], config.num_channels, grid[1] * steps[1], grid[2] * steps[2]
        )
        reconstruction = tiled.new_zeros(pixel_values.shape)
        source, target = [], []
        for (start, span, step), count, size in zip(fields, grid, volume_size):
            origin = start + (span - step) // 2
            low, high = max(origin, 0), min(origin + count * step, size)
            source.append(slice(low - origin, high - origin))
            target.append(slice(low, high))
        reconstruction[:, target[0], :, target[1], target[2]] = tiled[:, source[0], :, source[1], source[2]]
        reconstruction = reconstruction * (owners >= 0).unsqueeze(1)

        errors = (reconstruction - pixel_values.float()).square() * masked_voxels
        loss = errors.sum() / (masked_voxels.sum() * config.num_channels).clamp(min=1)
        return MaskedImageModelingOutput(
            loss=loss, reconstruction=reconstruction, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "VivitMedmnistForPreTraining",
    "VivitMedmnistForVideoClassification",
    "VivitMedmnistModel",
    "VivitMedmnistPreTrainedModel",
]
