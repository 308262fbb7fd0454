"""GPTQ on one layer (utils/quant/gptq.py): the Hessian is 2/n X Xᵀ however the inputs are batched; with H = I no
error is fed back and the codes are RTN's exactly; on correlated calibration inputs its reconstruction error is
below RTN's on the same grid (with and without act-order and static groups, 3 and 4 bits); act-order's g_idx maps
each column to its group; a Hessian that stays singular is a clear error."""

from __future__ import annotations

import pytest
import torch

from utils.quant.gptq import GPTQError, GPTQSettings, Hessian, gptq_quantize, relative_error
from utils.quant.grid import maxq, rtn
from utils.quant.packing import dequantize_gptq, pack_gptq


def calibration(cols: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and unevenly scaled, as a transformer's hidden states are."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    scale = torch.exp(torch.randn(cols, generator=gen))
    return (torch.randn(tokens, cols, generator=gen) @ mix) * scale


def weight(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def hessian_of(x: torch.Tensor, split: int = 3) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    for part in x.chunk(split):
        h.add(part)
    return h.H


def test_the_hessian_is_a_running_mean_of_2_over_n_x_xt():
    x = calibration(24, 100)
    expected = 2 / x.shape[0] * x.t() @ x
    for split in (1, 3, 7):
        assert torch.allclose(hessian_of(x, split), expected, rtol=1e-5, atol=1e-5)
    h = Hessian(24)
    h.add(x[:10].reshape(2, 5, 24))  # any leading dims: rows are tokens
    assert h.tokens == 10


@pytest.mark.parametrize("group_size", [-1, 16])
def test_with_an_identity_hessian_gptq_is_rtn(group_size):
    w = weight(12, 64)
    ours = gptq_quantize(w, torch.eye(64), GPTQSettings(bits=4, group_size=group_size, damp_percent=0.0)).quantized
    ref = rtn(w, 4, group_size)
    assert torch.equal(ours.codes, ref.codes) and torch.equal(ours.zeros, ref.zeros)
    assert torch.allclose(ours.scales, ref.scales) and torch.equal(ours.g_idx, ref.g_idx)


@pytest.mark.parametrize("bits,group_size,act_order,static", [
    (4, -1, False, False), (4, 32, False, False), (4, 32, True, False), (4, 32, True, True), (3, 32, True, False),
    (4, -1, True, False),
])
def test_gptq_reconstructs_better_than_rtn_on_the_same_inputs(bits, group_size, act_order, static):
    x = calibration(128)
    H = hessian_of(x)
    w = weight(64, 128)  # both dimensions pack at every width (3-bit packs 32 values in 3 words)
    settings = GPTQSettings(bits=bits, group_size=group_size, act_order=act_order, static_groups=static,
                            block_size=64)
    result = gptq_quantize(w, H, settings)
    q = result.quantized
    assert q.codes.min() >= 0 and q.codes.max() <= maxq(bits) and q.codes.shape == w.shape
    ours = relative_error(w, q.dequantize(), H)
    base = relative_error(w, rtn(w, bits, group_size).dequantize(), H)
    # The error measured directly on the inputs agrees with the one computed from H.
    direct = torch.linalg.norm(x @ (w - q.dequantize()).t()) / torch.linalg.norm(x @ w.t())
    assert ours == pytest.approx(float(direct), rel=1e-3)
    assert ours < 0.9 * base, (ours, base)
    # The checkpoint's fp16 scales rebuild exactly the weights GPTQ chose (scales are fp16-exact from the start).
    assert torch.equal(dequantize_gptq(pack_gptq(q), bits), q.dequantize())


def test_act_order_groups_are_runs_of_the_permuted_columns():
    x = calibration(64)
    H = hessian_of(x)
    q = gptq_quantize(weight(8, 64), H, GPTQSettings(bits=4, group_size=16, act_order=True)).quantized
    perm = torch.argsort(torch.diag(H), descending=True)
    assert torch.equal(q.g_idx[perm], torch.arange(64, dtype=torch.int32) // 16)
    assert not torch.equal(q.g_idx, torch.arange(64, dtype=torch.int32) // 16)  # not monotone in input order
    static = gptq_quantize(weight(8, 64), H, GPTQSettings(bits=4, group_size=16, act_order=True,
                                                         static_groups=True)).quantized
    assert torch.equal(static.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    assert q.scales.shape == static.scales.shape == (4, 8)


def test_unused_inputs_and_a_singular_hessian():
    x = calibration(32)
    x[:, 5] = 0  # an input no calibration token reaches: its weights are zeroed, not a failure
    q = gptq_quantize(weight(8, 32), hessian_of(x), GPTQSettings(bits=4)).quantized
    assert torch.all(q.dequantize()[:, 5] == 0)
    rank_one = torch.ones(64, 1) @ torch.randn(1, 32)
    with pytest.raises(GPTQError, match="layer.q: the Hessian is singular.*--damp_percent"):
        gptq_quantize(weight(8, 32), hessian_of(rank_one), GPTQSettings(bits=4, damp_percent=0.0), name="layer.q")
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(weight(8, 32), torch.eye(32), GPTQSettings(bits=5))
