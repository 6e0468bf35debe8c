"""Speed choices for running ViViT-MedMNIST on a CPU, made once where a command builds its model.

The model file stays plain (it ships to every Hub user as remote code): it computes exactly what its config says,
with transformers' attention interface. On a CPU, `vivit-medmnist-train`, `-evaluate`, `-predict` and the demo
call `speed_up_for_cpu(model)`, which keeps the model's arithmetic and changes only how it is computed:

- attention through `CPU_ATTENTION`, an implementation registered with transformers' `AttentionInterface`: eager
  attention's arithmetic with fewer passes over the (batch, heads, tokens, tokens) weights, and a dropout mask
  cut from 64-bit random words (`dropout_keep`);
- the convolutional stem's weights in channels-last 3D layout, oneDNN's faster path for these convolutions.

Two process-wide choices go with it: bf16 autocast where it is faster on this CPU (`bf16_is_faster()`: the CPU
computes bf16 natively, AVX512-BF16 or AMX, and a matrix product of the model's shape measures faster in bf16),
which on such a CPU halves the cost of every matrix product (`train.py` then trains with `--bf16` unless told
`--bf16 false`; the inference commands run under `autocast_for` unless told `--precision fp32`), and
`keep_freed_memory()`, which stops glibc from returning freed activations to the kernel after every step.

What each choice bought, and what was tried and bought nothing, is in `benchmarks/README.md`
(`benchmarks/cpu_speed.py`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface

from .modeling_vivit_medmnist import VivitMedmnistConvStem

__all__ = [
    "CPU_ATTENTION",
    "autocast_for",
    "bf16_is_faster",
    "bf16_matmul_speedup",
    "cpu_attention_forward",
    "dropout_keep",
    "keep_freed_memory",
    "native_bf16",
    "prepare_for_inference",
    "speed_up_for_cpu",
    "use_bf16",
]

CPU_ATTENTION = "vivit_cpu"  # the name `set_attn_implementation` takes


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles); without it, bf16 is emulated
    and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


BF16_MIN_SPEEDUP = 1.1  # bf16 must beat float32 by this much: a margin over timing noise, so the choice is stable


def bf16_matmul_speedup(repeats: int = 9) -> float:
    """float32 time / bf16 time of the model's largest matrix product (a batch of 32 volumes' 64 tokens, width 128,
    through the 512-wide MLP), the median over `repeats` interleaved pairs, with torch's current threads."""
    tokens, weight = torch.randn(2048, 128), torch.randn(512, 128)
    operands = {torch.float32: (tokens, weight), torch.bfloat16: (tokens.bfloat16(), weight.bfloat16())}

    def seconds(dtype: torch.dtype) -> float:
        start = time.perf_counter()
        nn.functional.linear(*operands[dtype])
        return time.perf_counter() - start

    for _ in range(2):  # oneDNN builds its kernels on the first calls
        seconds(torch.float32), seconds(torch.bfloat16)
    return statistics.median(seconds(torch.float32) / seconds(torch.bfloat16) for _ in range(repeats))


@functools.cache
def bf16_is_faster() -> bool:
    """Whether bf16 autocast is the faster way to run the model on this CPU: it computes bf16 natively
    (`native_bf16`) and `bf16_matmul_speedup()` is at least BF16_MIN_SPEEDUP, measured once per process (a few
    hundredths of a second). Native bf16 is not enough: on an AMD EPYC with AVX512-BF16 bf16 autocast made the
    training step 1.38x faster, but on an Intel Xeon with AVX512-BF16 and no AMX the product took 1.8x as long in
    bf16 and the step 1.2x (benchmarks/README.md)."""
    return native_bf16() and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def dropout_keep(shape: torch.Size, p: float, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """A 0/1 tensor of `shape` and `dtype` that is 0 (drop) with probability p' = round(p * 2^16) / 2^16 (within
    7.7e-6 of p), and p'. It compares 16-bit random integers with a threshold, four cut from each 64-bit word of
    numpy's PCG64 seeded by one draw of torch's default generator (so torch's seed, and a checkpoint's RNG state,
    reproduce it): one generator call per four elements, from a generator about twice as fast as torch's CPU one,
    where `nn.functional.dropout`'s `bernoulli_` makes one torch call per element. The comparison runs in numpy
    and the mask comes as bytes: torch's bool -> float conversion, `masked_fill` and a bool x float product each
    take several times longer on a CPU than a product with this mask."""
    numel = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    words = np.random.PCG64(seed).random_raw((numel + 3) // 4)
    dropped = round(p * 65536)
    keep = words.view(np.int16)[:numel] >= dropped - 32768
    return torch.from_numpy(keep.view(np.uint8)).view(shape).to(dtype), dropped / 65536


def cpu_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (`modeling_vivit_medmnist.eager_attention_forward`) with fewer passes over the (batch,
    heads, tokens, tokens) weights: the scale multiplies the queries (head_dim wide, not tokens wide); the softmax
    runs in the input's dtype (torch's CPU softmax accumulates bf16 in float32 and rounds once, which is what
    eager's float32 softmax and cast give); dropout multiplies the weights by `dropout_keep`'s 0/1 mask and
    rescales the (tokens, head_dim) output instead of the weights. The weights returned during training are the
    dropped, unscaled ones."""
    weights = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    rescale = None
    if dropout > 0.0 and module.training:
        keep, dropped = dropout_keep(weights.shape, dropout, weights.dtype)
        weights = weights * keep
        rescale = 1.0 / (1.0 - dropped)
    output = torch.matmul(weights, value)
    if rescale is not None:
        output = output * rescale
    return output.transpose(1, 2).contiguous(), weights


AttentionInterface.register(CPU_ATTENTION, cpu_attention_forward)


def speed_up_for_cpu(model: nn.Module, attention: bool = True, channels_last: bool = True) -> list[str]:
    """Make `model` (a ViViT-MedMNIST model on the CPU) compute what it computes faster, in place, and return
    what was changed, for the log: eager or SDPA attention becomes `CPU_ATTENTION`, and the conv stem's weights go
    channels-last (each can be left out, for measurements). A saved model is unaffected: the attention
    implementation is not written to config.json."""
    changed = []
    if attention and model.config._attn_implementation in ("eager", "sdpa"):
        model.set_attn_implementation(CPU_ATTENTION)
        changed.append(f"attention {CPU_ATTENTION}")
    stems = [module for module in model.modules() if isinstance(module, VivitMedmnistConvStem)]
    for stem in stems if channels_last else ():
        stem.to(memory_format=torch.channels_last_3d)
    if stems and channels_last:
        changed.append("conv stem channels-last")
    return changed


PRECISIONS = ("auto", "fp32", "bf16")  # the inference commands' --precision


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether an inference command runs under bf16 autocast: `--precision bf16`, or `auto` on a CPU where bf16
    is faster (`bf16_is_faster`: what `train.py` trains and evaluates with there, so that `evaluate.py` reproduces
    its numbers)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.device(device).type == "cpu" and bf16_is_faster()
    return precision == "bf16"


def prepare_for_inference(model: nn.Module, device: torch.device | str, precision: str = "auto") -> bool:
    """Move `model` to `device`, in eval mode, with the CPU speed choices on a CPU (the model's and the
    allocator's); return `use_bf16(...)`."""
    device = torch.device(device)
    model.to(device).eval()
    if device.type == "cpu":
        speed_up_for_cpu(model)
        keep_freed_memory()
    return use_bf16(precision, device)


def autocast_for(device: torch.device | str, bf16: bool):
    """The context the model runs in: bf16 autocast where `bf16`, else nothing."""
    if bf16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """On glibc (Linux), keep freed memory in the process instead of returning it to the kernel: allocations up
    to 32 MiB come from the heap and the heap is trimmed only beyond 1 GiB. A training step frees and
    re-allocates the same activation-sized buffers every step; returned to the kernel, each comes back as fresh
    pages that fault in one by one (thousands of page faults per step). The resident memory then stays at its
    peak. Returns whether it applied (False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
