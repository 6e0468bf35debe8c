"""ViViT-MedMNIST model configuration.

This file is copied next to the weights by `save_pretrained`, so it imports only torch/transformers (and
`huggingface_hub`, which transformers itself requires).
"""

import math
from collections.abc import Sequence

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig

POOLING_TYPES = ("mean", "cls")
PADDING_TYPES = ("valid", "same")
INITIALIZATIONS = ("keras", "normal")
ENCODER_TYPES = ("joint", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")


@strict
class VivitMedmnistConfig(PreTrainedConfig):
    r"""
    Configuration of a [`VivitMedmnistModel`]: a ViViT (Arnab et al. 2021, "spatio-temporal attention" /
    tubelet-embedding variant) for 3D volumes. The defaults reproduce the Keras example "Video Vision
    Transformer" (Gosthipaty & Thakur) exactly, weight initialisation included:
    `VivitMedmnistForVideoClassification(VivitMedmnistConfig(num_labels=11))` has 1,656,971 parameters, like
    the Keras model trained on OrganMNIST3D.

    A volume of size `(D, H, W)` is treated as a video of `D` frames of `H x W`; `pixel_values` have shape
    `(batch, D, num_channels, H, W)`.

    Args:
        volume_size (`int` or `list[int]`, *optional*, defaults to 28):
            The size `(D, H, W)` of the input volumes. An int means a cube. Stored as a list of 3 ints.
        num_channels (`int`, *optional*, defaults to 1):
            The number of channels of each voxel (1 for CT/MRI volumes).
        tubelet_size (`int` or `list[int]`, *optional*, defaults to 8):
            The size `(d, h, w)` of each tubelet, i.e. of the kernel of the Conv3d that embeds the volume into
            tokens. An int means a cube. Stored as a list of 3 ints. It must not be larger than `volume_size`.
        tubelet_stride (`int` or `list[int]`, *optional*):
            The step between tubelets (the Conv3d stride). `None` (default) means `tubelet_size`: non-overlapping
            tubelets, as in the reference. A smaller stride makes the tubelets overlap. Stored as a list of 3 ints
            (or `None`). It must not be larger than `tubelet_size` (that would skip voxels).
        padding (`str`, *optional*, defaults to `"valid"`):
            How tubelets meet the border of the volume, with the meaning of Keras' `Conv3D(padding=...)`:
            `"valid"` uses no padding and drops the trailing voxels no tubelet covers (the reference: 28 = 3 x 8 + 4,
            so 4 voxels per axis are dropped and there are 3^3 = 27 tokens); `"same"` zero-pads the volume so that
            there are `ceil(size / stride)` tubelets per axis and every voxel is covered (padding split as in
            TensorFlow: half before, the odd voxel after).
        conv_stem_channels (`list[int]`, *optional*):
            A convolutional stem before the tubelet projection (Xiao et al. 2021, "Early convolutions help
            transformers see better"): one stage per entry, each a 3x3x3 `Conv3d` with stride 2 and padding 1
            (no bias) to that many channels, `BatchNorm3d` and ReLU. Each stage halves every axis (rounding up:
            28 -> 14 -> 7 -> 4), and the tubelets are then cut from the stem's feature map instead of the voxels,
            with `tubelet_size`, `tubelet_stride` and `padding` meaning the same there. Stacked small kernels
            see local 3D shape that one linear projection of a large tubelet averages away. E.g. `[32, 64, 128]`
            with `tubelet_size=1` gives 4 x 4 x 4 = 64 tokens for 28^3 volumes, each with a receptive field that
            overlaps its neighbours' and covers every voxel. `None` (default) or `[]`: no stem, the reference.
        conv_stem_scale (`int`, *optional*, defaults to 1):
            Scales the stem's first convolution by an integer factor `s`: kernel `3s`, stride `2s`, padding `s`
            (the other stages are unchanged). This is what resolution transfer makes of a stem model moved to
            volumes `s` times as large (28^3 -> 56^3 or 64^3 with `s = 2`): the first stage's output then has
            about the size it had before, so the token grid and every later tensor keep their shape, and a
            volume upsampled `s` times (nearest) gives the original model's features exactly. Also a cheap stem
            for large volumes from scratch.
        hidden_size (`int`, *optional*, defaults to 128):
            The width of the tokens (the Conv3d filters, the Keras `embed_dim`).
        num_hidden_layers (`int`, *optional*, defaults to 8):
            The number of Transformer blocks (with `encoder_type="factorised_encoder"`: of spatial blocks).
        encoder_type (`str`, *optional*, defaults to `"joint"`):
            The ViViT variant (Arnab et al. 2021, §3.3). On a volume the "temporal" axis is the first one, depth
            (D): a temporal index is one slab of the token grid along D, a spatial position one (h, w) column.
            - `"joint"`, Model 1 ("spatio-temporal attention", the reference): every block attends over all
              tubelet tokens.
            - `"factorised_encoder"`, Model 2: `num_hidden_layers` spatial blocks attend within each temporal
              index (the `grid_size[1] * grid_size[2]` tokens of one slab, all slabs in parallel), each slab's
              tokens are layer-normed and averaged into one token, learned temporal position embeddings are added,
              and `num_temporal_layers` temporal blocks attend over those `grid_size[0]` tokens.
            - `"factorised_self_attention"`, Model 3: each block attends spatially (each token to the tokens of
              its temporal index), then temporally (each token to the tokens of its spatial position, across
              the slabs), then applies its MLP: one more attention layer (and LayerNorm) per block than Model 1.
            - `"factorised_dot_product"`, Model 4: Model 1's blocks and parameters, but in each block the first
              half of the attention heads attend spatially and the other half temporally; the heads' outputs are
              concatenated as usual. Needs at least 2 heads.
            Models 2 to 4 need `pooling="mean"` (a CLS token has no place in the token grid).
        num_temporal_layers (`int`, *optional*, defaults to 4):
            The number of temporal blocks of `encoder_type="factorised_encoder"` (unused by `"joint"`).
        num_attention_heads (`int`, *optional*, defaults to 8):
            The number of attention heads; `hidden_size` must be divisible by it (head dim 128 / 8 = 16, the Keras
            `key_dim`).
        intermediate_size (`int`, *optional*, defaults to 512):
            The width of the first dense layer of each block's MLP (Keras: `embed_dim * 4`).
        hidden_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
            The activation after the first MLP dense layer, a key of `transformers.activations.ACT2FN`. The
            default is the tanh approximation of GELU, which is what `keras.ops.gelu` computes by default.
        mlp_output_act (`str`, *optional*, defaults to `"gelu_pytorch_tanh"`):
            The activation after the second MLP dense layer. The Keras reference applies GELU there too; `None`
            gives the usual ViT MLP (linear output).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            The dropout probability after the embeddings, the attention output projection and the MLP (the
            reference has none).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1):
            The dropout probability of the attention weights (Keras `MultiHeadAttention(dropout=0.1)`).
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            The stochastic-depth rate of the last block; block `i` of `L` drops its residual branches with
            probability `drop_path_rate * i / (L - 1)` during training (the reference has none). With
            `encoder_type="factorised_encoder"` the spatial then temporal blocks count as one stack of `L`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-06):
            The epsilon of every LayerNorm (the blocks' and the final one).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query/key/value projection has a bias (Keras `MultiHeadAttention` has one).
        pooling (`str`, *optional*, defaults to `"mean"`):
            How the tokens become one vector for the head: `"mean"` averages all tokens after the final
            LayerNorm (Keras `GlobalAvgPool1D`, no CLS token); `"cls"` prepends a learned CLS token and uses its
            final state (the ViT/ViViT convention; adds `hidden_size` parameters and one position).
        initialization (`str`, *optional*, defaults to `"keras"`):
            How new weights are initialised. `"keras"` reproduces Keras' defaults: glorot-uniform kernels with
            Keras' fan computation (the attention kernels seen as Keras `EinsumDense` kernels of shape
            `(hidden, heads, head_dim)` and `(heads, head_dim, hidden)`), zero biases, position embeddings (and
            the CLS token) uniform in [-0.05, 0.05] (`keras.layers.Embedding`), LayerNorm weight 1 and bias 0.
            `"normal"` is the transformers convention: every weight normal(0, `initializer_range`), zero biases,
            LayerNorm 1/0.
        initializer_range (`float`, *optional*, defaults to 0.02):
            The standard deviation of the `"normal"` initialisation (unused by `"keras"`).
        calibration_temperature (`float`, *optional*):
            The temperature T of temperature scaling (Guo et al. 2017), fitted on the validation split at the end
            of training: calibrated probabilities are `softmax(logits / T)`. The model still returns the raw
            logits; the volume-classification pipeline, `vivit-medmnist-predict` and the demo divide by T. `None`
            (default): not calibrated, probabilities are the plain softmax.

    The usual [`PreTrainedConfig`] arguments are accepted too, notably `num_labels` (defaults to 2; OrganMNIST3D
    has 11), `id2label`, `label2id` and `problem_type`.

    Derived, read-only: `stride` (the effective tubelet stride), `grid_size` (tubelets per axis),
    `num_tokens` (number of tubelet tokens, CLS excluded), `padding_amounts` (zero voxels added before/after on
    each axis) and `sequence_length` (tokens seen by the encoder, CLS included).

    Example:

    ```python
    >>> from vivit_medmnist import VivitMedmnistConfig, VivitMedmnistForVideoClassification
    >>> config = VivitMedmnistConfig(num_labels=11)  # the Keras reference for OrganMNIST3D
    >>> config.num_tokens
    27
    >>> model = VivitMedmnistForVideoClassification(config)
    >>> model.num_parameters()
    1656971
    ```
    """

    model_type = "vivit_medmnist"

    volume_size: int | list[int] | tuple[int, ...] = 28
    num_channels: int = 1
    tubelet_size: int | list[int] | tuple[int, ...] = 8
    tubelet_stride: int | list[int] | tuple[int, ...] | None = None
    padding: str = "valid"
    conv_stem_channels: list[int] | tuple[int, ...] | None = None
    conv_stem_scale: int = 1
    hidden_size: int = 128
    num_hidden_layers: int = 8
    encoder_type: str = "joint"
    num_temporal_layers: int = 4
    num_attention_heads: int = 8
    intermediate_size: int = 512
    hidden_act: str = "gelu_pytorch_tanh"
    mlp_output_act: str | None = "gelu_pytorch_tanh"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.1
    drop_path_rate: float | int = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    pooling: str = "mean"
    initialization: str = "keras"
    initializer_range: float = 0.02
    calibration_temperature: float | int | None = None

    def __post_init__(self, **kwargs):
        # Plain ValueErrors here (not `validate_*` methods, which @strict would wrap in its own exception type).
        self.volume_size = _triple(self.volume_size, "volume_size")
        self.tubelet_size = _triple(self.tubelet_size, "tubelet_size")
        if self.tubelet_stride is not None:
            self.tubelet_stride = _triple(self.tubelet_stride, "tubelet_stride")
        if self.conv_stem_channels is not None:
            stem = self.conv_stem_channels
            if not isinstance(stem, (list, tuple)):
                raise ValueError(f"conv_stem_channels must be a list of positive ints or None, got {stem!r}")
            for item in stem:
                _check_positive_int(item, "conv_stem_channels", whole=stem)
            self.conv_stem_channels = [int(item) for item in stem] or None
        for name in (
            "conv_stem_scale",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_temporal_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            _check_positive_int(getattr(self, name), name)
        if self.conv_stem_scale != 1 and not self.conv_stem_channels:
            raise ValueError(f"conv_stem_scale {self.conv_stem_scale} needs a conv stem (conv_stem_channels)")
        feature_size = self.feature_size_for(self.volume_size)
        if any(t > v for t, v in zip(self.tubelet_size, feature_size)):
            where = (
                f"the conv stem's feature map {feature_size} (volume_size {self.volume_size})"
                if self.conv_stem_channels
                else f"volume_size {self.volume_size}"
            )
            raise ValueError(f"tubelet_size {self.tubelet_size} is larger than {where} on some axis")
        if any(s > t for s, t in zip(self.stride, self.tubelet_size)):
            raise ValueError(
                f"tubelet_stride {self.tubelet_stride} is larger than tubelet_size {self.tubelet_size} on some axis: "
                "voxels between tubelets would be skipped"
            )
        if self.padding not in PADDING_TYPES:
            raise ValueError(f"padding must be one of {PADDING_TYPES}, got {self.padding!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("hidden_act", "mlp_output_act"):
            act = getattr(self, name)
            if (act is not None or name == "hidden_act") and act not in ACT2FN:
                raise ValueError(f"{name} must be a key of transformers' ACT2FN, got {act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}")
        if self.encoder_type != "joint" and self.pooling != "mean":
            raise ValueError(
                f"encoder_type={self.encoder_type!r} factorises the token grid, where a CLS token has no place: it "
                f'needs pooling="mean", got pooling={self.pooling!r}'
            )
        if self.encoder_type == "factorised_dot_product" and self.num_attention_heads < 2:
            raise ValueError(
                'encoder_type="factorised_dot_product" splits the heads into spatial and temporal ones: it needs '
                f"num_attention_heads >= 2, got {self.num_attention_heads}"
            )
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {self.initialization!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range!r}")
        temperature = self.calibration_temperature
        if temperature is not None and (isinstance(temperature, bool) or not 0 < temperature < float("inf")):
            raise ValueError(f"calibration_temperature must be a positive number or None, got {temperature!r}")
        super().__post_init__(**kwargs)
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")

    @property
    def stride(self) -> list[int]:
        """The effective tubelet stride (D, H, W): `tubelet_stride`, or `tubelet_size` when it is `None`."""
        return list(self.tubelet_size if self.tubelet_stride is None else self.tubelet_stride)

    @property
    def padding_amounts(self) -> list[tuple[int, int]]:
        """Zero voxels added `(before, after)` on the D, H and W axes (all zero for `padding="valid"`)."""
        return self.padding_amounts_for(self.volume_size)

    @property
    def grid_size(self) -> list[int]:
        """The number of tubelets along D, H and W."""
        return self.grid_size_for(self.volume_size)

    def feature_size_for(self, volume_size: Sequence[int]) -> list[int]:
        """The size (D, H, W) of what the tubelets are cut from: the volume, or the conv stem's feature map
        (each stride-2 stage with padding 1 maps `n` voxels to `ceil(n / 2)`; a first stage scaled by `s`, to
        `(n - s) // 2s + 1`)."""
        size = [int(n) for n in volume_size]
        for stage in range(len(self.conv_stem_channels or ())):
            scale = self.conv_stem_scale if stage == 0 else 1  # kernel 3s, stride 2s, padding s
            size = [(n + 2 * scale - 3 * scale) // (2 * scale) + 1 for n in size]
        return size

    def padding_amounts_for(self, volume_size: Sequence[int]) -> list[tuple[int, int]]:
        """`padding_amounts` for volumes of another size (with `interpolate_pos_encoding=True`), in voxels of the
        conv stem's feature map if there is a stem."""
        if self.padding == "valid":
            return [(0, 0)] * 3
        amounts = []
        for size, kernel, step in zip(self.feature_size_for(volume_size), self.tubelet_size, self.stride):
            total = max((math.ceil(size / step) - 1) * step + kernel - size, 0)
            amounts.append((total // 2, total - total // 2))
        return amounts

    def token_fields_for(self, volume_size: Sequence[int]) -> list[tuple[int, int, int]]:
        """Per axis (D, H, W), the voxels token i reads: `[start + i * step, start + i * step + span)`, as
        (start, span, step): through the conv stem's stages (kernel 3s / stride 2s / padding s, then 3 / 2 / 1), then
        the tubelet projection (kernel `tubelet_size`, stride `stride`, the `padding` before the first tubelet)."""
        fields = []
        padding = self.padding_amounts_for(volume_size)
        for axis in range(3):
            start, span, step = 0, 1, 1
            for stage in range(len(self.conv_stem_channels or ())):
                scale = self.conv_stem_scale if stage == 0 else 1
                start -= scale * step
                span += (3 * scale - 1) * step
                step *= 2 * scale
            start -= padding[axis][0] * step
            span += (self.tubelet_size[axis] - 1) * step
            step *= self.stride[axis]
            fields.append((start, span, step))
        return fields

    def grid_size_for(self, volume_size: Sequence[int]) -> list[int]:
        """`grid_size` for volumes of another size (with `interpolate_pos_encoding=True`)."""
        return [
            (size + before + after - kernel) // step + 1
            for size, kernel, step, (before, after) in zip(
                self.feature_size_for(volume_size),
                self.tubelet_size,
                self.stride,
                self.padding_amounts_for(volume_size),
            )
        ]

    @property
    def num_tokens(self) -> int:
        """The number of tubelet tokens (the CLS token, if any, not included); 27 for the reference."""
        return math.prod(self.grid_size)

    @property
    def sequence_length(self) -> int:
        """The number of tokens the encoder sees: `num_tokens`, plus one with `pooling="cls"`."""
        return self.num_tokens + (self.pooling == "cls")


def _triple(value, name: str) -> list[int]:
    """An int (a cube) or a sequence of 3 positive ints -> a list of 3 ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 3:
        raise ValueError(
            f"{name} must be a positive int or a sequence of 3 positive ints (D, H, W), got {value!r}"
        )
    for item in value:
        _check_positive_int(item, name, whole=value)
    return [int(item) for item in value]


def _check_positive_int(value, name: str, whole=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        shown = value if whole is None else whole
        raise ValueError(f"{name} must be a positive int, got {shown!r}")


__all__ = ["VivitMedmnistConfig"]
