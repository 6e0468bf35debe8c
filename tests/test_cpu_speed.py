"""The CPU attention's dropout (`cpu_speed.dropout_keep`): the rate asked for, reproducible from torch's seed,
and the arithmetic of eager attention with that mask."""

import math

import pytest
import torch
from torch import nn

from vivit_medmnist.cpu_speed import cpu_attention_forward, dropout_keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keep_drops_at_the_rate_asked_and_follows_torchs_seed(dtype):
    shape = (4, 8, 64, 64)  # 131,072 elements: the drop rate's standard error is 0.0008
    torch.manual_seed(3)
    keep, dropped = dropout_keep(shape, 0.1, dtype)
    assert keep.shape == shape and keep.dtype == dtype
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(dropped - 0.1) < 7.7e-6
    assert abs((keep == 0).float().mean().item() - dropped) < 0.004  # 5 standard errors
    torch.manual_seed(3)
    # torch's seed (a checkpoint's RNG state) replays the mask, and the next call draws anew
    assert torch.equal(dropout_keep(shape, 0.1, dtype)[0], keep)
    assert not torch.equal(dropout_keep(shape, 0.1, dtype)[0], keep)


def test_cpu_attention_dropout_is_eager_attention_with_that_mask_and_unbiased():
    module = nn.Module().train()
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 16, 8, generator=generator) for _ in range(3))
    scaling = 8**-0.5
    plain = torch.softmax(query @ key.transpose(2, 3) * scaling, dim=-1)

    torch.manual_seed(5)
    output, weights = cpu_attention_forward(module, query, key, value, None, scaling, dropout=0.25)
    torch.manual_seed(5)
    keep, dropped = dropout_keep(plain.shape, 0.25, plain.dtype)
    torch.testing.assert_close(weights, plain * keep)  # the weights returned are the dropped, unscaled ones
    expected = ((plain * keep) @ value / (1 - dropped)).transpose(1, 2)
    torch.testing.assert_close(output, expected)

    # over many draws the dropped attention averages to the attention without dropout (the rescale is right)
    draws = torch.stack(
        [cpu_attention_forward(module, query, key, value, None, scaling, dropout=0.25)[0] for _ in range(400)]
    )
    without = cpu_attention_forward(module.eval(), query, key, value, None, scaling, dropout=0.25)[0]
    spread = draws.std(0).max().item() / math.sqrt(len(draws))
    assert (draws.mean(0) - without).abs().max().item() < 6 * spread


def test_bf16_is_chosen_only_where_the_cpu_has_it_and_it_measures_faster(monkeypatch):
    from vivit_medmnist import cpu_speed

    speedup = cpu_speed.bf16_matmul_speedup(repeats=3)
    assert 0.0 < speedup < float("inf")
    for native, measured, chosen in [(False, 3.0, False), (True, 0.55, False), (True, 1.0, False), (True, 1.4, True)]:
        monkeypatch.setattr(cpu_speed, "native_bf16", lambda native=native: native)
        monkeypatch.setattr(cpu_speed, "bf16_matmul_speedup", lambda measured=measured: measured)
        cpu_speed.bf16_is_faster.cache_clear()
        assert cpu_speed.bf16_is_faster() is chosen
        # the commands follow it: train.py's --bf16 default and the inference commands' --precision auto
        from vivit_medmnist.arguments import parse_args

        assert parse_args(["--output_dir", "x"]).training.bf16 is (chosen and not torch.cuda.is_available())
        assert cpu_speed.use_bf16("auto", "cpu") is chosen
        assert cpu_speed.use_bf16("fp32", "cpu") is False and cpu_speed.use_bf16("bf16", "cpu") is True
    cpu_speed.bf16_is_faster.cache_clear()
