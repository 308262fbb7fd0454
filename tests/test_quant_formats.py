"""The quantization formats: GPTQ's min-max grid and RTN, the GPTQ v1 checkpoint layout (pack / unpack / dequantize,
which shapes it can hold, quantize_config.json), and the seeds' baselines (ChatGLM's absmax int8/int4, LLMZoo's
group-wise compression). Expected values are either round trips or hand-computed from the rule named beside them."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import STORIES
from utils.quant.baselines import (CompressionConfig, chatglm_dequantize, chatglm_quantize, groupwise_compress,
                                   groupwise_decompress)
from utils.quant.grid import QuantizedWeight, dequantize_codes, grid_params, maxq, quantize_codes, rtn
from utils.quant.packing import dequantize_gptq, pack_gptq, packable, quantize_config, unpack_gptq


def random_quantized(bits: int, group_size: int, act_order: bool, out_features: int = 64, in_features: int = 320,
                     seed: int = 0) -> QuantizedWeight:
    """Random codes / zeros over the full 0..maxq range (both ends forced in), fp16-exact scales, and a sequential
    or act-order g_idx. 320 inputs make group 128's last group short (64 columns)."""
    gen = torch.Generator().manual_seed(seed)
    top = maxq(bits)
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen, dtype=torch.int32)
    codes[0, :2] = torch.tensor([0, top])
    zeros = torch.randint(0, top + 1, (groups, out_features), generator=gen, dtype=torch.int32)
    zeros[0, :2] = torch.tensor([0, top])  # 0 is the v1 format's awkward case: stored as all ones
    scales = (torch.rand(groups, out_features, generator=gen) + 0.01).half().float()
    g_idx = torch.arange(in_features) // size
    if act_order:  # act-order: column k joins the group of its rank in a random order, so g_idx is not monotone
        g_idx = g_idx[torch.argsort(torch.randperm(in_features, generator=gen))]
        assert groups == 1 or not bool((g_idx[1:] >= g_idx[:-1]).all())
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx.to(torch.int32), bits=bits,
                           group_size=group_size)


# ---- the GPTQ layout ----

@pytest.mark.parametrize("act_order", [False, True], ids=["sequential", "act_order"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits, group_size, act_order):
    q = random_quantized(bits, group_size, act_order)
    packed = pack_gptq(q)
    groups = q.scales.shape[0]
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (320 * bits // 32, 64)
    assert packed["qzeros"].dtype == torch.int32 and packed["qzeros"].shape == (groups, 64 * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (groups, 64)
    assert packed["g_idx"].dtype == torch.int32 and packed["g_idx"].shape == (320,)

    back = unpack_gptq(packed, bits, group_size)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.g_idx, q.g_idx)
    assert torch.equal(back.scales, q.scales)
    assert (back.bits, back.group_size) == (bits, group_size)
    assert torch.equal(dequantize_gptq(packed, bits), q.dequantize())


def test_pack_4bit_by_hand():
    """Input-dim codes 1..8 of output column 0 fill one word LSB first: 0x87654321. Zero points [8, 1, 2, ..., 7]
    are stored as zero - 1 = [7, 0, 1, ..., 6], four bits each from the low end: 0x65432107; a zero of 0 stores
    -1, all ones in its field (0xF)."""
    codes = torch.zeros(8, 8, dtype=torch.int32)
    codes[0] = torch.arange(1, 9)
    zeros = torch.tensor([[8, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int32)
    q = QuantizedWeight(codes=codes, scales=torch.ones(1, 8), zeros=zeros, g_idx=torch.zeros(8, dtype=torch.int32),
                        bits=4, group_size=-1)
    packed = pack_gptq(q)
    assert packed["qweight"].shape == (1, 8) and packed["qzeros"].shape == (1, 1)
    assert packed["qweight"][0, 0].item() & 0xFFFFFFFF == 0x87654321
    assert torch.equal(packed["qweight"][0, 1:], torch.zeros(7, dtype=torch.int32))
    assert packed["qzeros"][0, 0].item() & 0xFFFFFFFF == 0x65432107
    assert (packed["qzeros"][0, 0].item() & 0xF) == 7  # the zero point 8 of output column 0 stores 7

    q.zeros[0, 0] = 0
    packed = pack_gptq(q)
    assert packed["qzeros"][0, 0].item() & 0xFFFFFFFF == 0x6543210F
    assert unpack_gptq(packed, 4, -1).zeros[0, 0].item() == 0


def test_pack_3bit_values_straddle_words_as_autogptq_packs_them():
    """3-bit: 32 values in 3 words. Per AutoGPTQ's pack, value 10 puts its low two bits in bits 30-31 of word 0 and
    its high bit in bit 0 of word 1; value 21 its low bit in bit 31 of word 1 and its high two in bits 0-1 of word 2.
    Value 10 = 5 (0b101): word 0 = 1 << 30, word 1 = 1. Value 21 = 6 (0b110): word 1 bit 31 = 0, word 2 = 0b11."""
    codes = torch.zeros(32, 32, dtype=torch.int32)
    codes[0, 10] = 5
    codes[1, 21] = 6
    codes[2, 31] = 7  # the last value: bits 29-31 of word 2
    q = QuantizedWeight(codes=codes, scales=torch.ones(1, 32), zeros=torch.ones(1, 32, dtype=torch.int32),
                        g_idx=torch.zeros(32, dtype=torch.int32), bits=3, group_size=-1)
    words = pack_gptq(q)["qweight"].to(torch.int64) & 0xFFFFFFFF
    assert words.shape == (3, 32)
    assert words[:, 0].tolist() == [1 << 30, 1, 0]
    assert words[:, 1].tolist() == [0, 0, 3]
    assert words[:, 2].tolist() == [0, 0, 7 << 29]
    assert torch.equal(unpack_gptq(pack_gptq(q), 3, -1).codes, codes)


def test_pack_refuses_what_the_layout_cannot_hold():
    q = rtn(torch.randn(172, 64), 4)
    with pytest.raises(ValueError, match="172"):
        pack_gptq(q)
    bad = random_quantized(4, 32, False)
    bad.codes[0, 0] = 16
    with pytest.raises(ValueError, match="codes must lie in 0..15"):
        pack_gptq(bad)


def test_packable_on_stories260k_shapes():
    """stories260K: hidden 64, intermediate 172, 4 KV heads of 8 (k/v_proj 32 wide). 4-bit packs 8 values per word,
    3-bit 32 values per 3 words, 2-bit 16, 8-bit 4: 172 = 8·21 + 4 = 16·10 + 12 = 4·43."""
    config = json.loads((STORIES / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    assert (hidden, inter, kv) == (64, 172, 32)
    for in_f, out_f in [(hidden, hidden), (hidden, kv)]:  # q/o_proj, k/v_proj
        assert packable(in_f, out_f, 4) is None
        assert packable(in_f, out_f, 3) is None
    for in_f, out_f, side in [(hidden, inter, "out_features"), (inter, hidden, "in_features")]:  # gate/up, down
        for bits in (2, 3, 4):
            reason = packable(in_f, out_f, bits)
            assert reason is not None and f"{side} = 172" in reason, reason
        assert packable(in_f, out_f, 8) is None
    assert packable(96, 64, 3) is None
    assert "multiple of 32" in packable(48, 64, 3)
    assert "multiple of 8" in packable(64, 36, 4)
    assert "bits" in packable(64, 64, 5)


def test_quantize_config_fields_and_exclusions():
    excluded = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    inside = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    config = quantize_config(4, 32, True, False, True, True, 0.01, modules_in_block_to_quantize=inside,
                             excluded=excluded)
    assert {k: config[k] for k in ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential",
                                   "damp_percent", "quant_method", "checkpoint_format")} == {
        "bits": 4, "group_size": 32, "desc_act": True, "sym": False, "static_groups": True, "true_sequential": True,
        "damp_percent": 0.01, "quant_method": "gptq", "checkpoint_format": "gptq"}
    assert config["modules_in_block_to_quantize"] == inside
    json.dumps(config)  # it is written as JSON

    # GPTQModel's negative rule: "-:" then a start-anchored regex; ours names exactly one module
    rules = [re.compile(key[2:]) for key in config["dynamic"] if key.startswith("-:")]
    assert len(rules) == 2
    skipped = lambda name: any(rule.match(name) for rule in rules)  # noqa: E731
    assert skipped("model.layers.0.mlp.down_proj") and skipped("model.layers.1.mlp.down_proj")
    assert not skipped("model.layers.10.mlp.down_proj") and not skipped("model.layers.0.mlp.down_proj2")
    assert not skipped("model.layers.0.mlp.up_proj")

    plain = quantize_config(8, -1, False, True, False, True, 0.1)
    assert "dynamic" not in plain and "modules_in_block_to_quantize" not in plain


def test_transformers_gptq_config_reads_ours():
    """transformers' GPTQConfig takes our dict as is (modules_in_block_to_quantize is left out: its post_init then
    looks up optimum's version, and optimum is not installed here)."""
    from transformers import GPTQConfig

    config = quantize_config(3, 128, True, True, False, False, 0.05, excluded=["lm_head"])
    read = GPTQConfig.from_dict(config)
    assert (read.bits, read.group_size, read.desc_act, read.sym, read.true_sequential, read.damp_percent) == (
        3, 128, True, True, False, 0.05)
    assert read.format == "gptq" and read.to_dict()["checkpoint_format"] == "gptq"


def test_quantize_config_refuses_what_loaders_refuse():
    with pytest.raises(ValueError, match="damp_percent"):
        quantize_config(4, 128, False, True, False, True, 0.0)
    with pytest.raises(ValueError, match="bits"):
        quantize_config(5, 128, False, True, False, True, 0.01)
    with pytest.raises(ValueError, match="group_size"):
        quantize_config(4, 0, False, True, False, True, 0.01)
    with pytest.raises(ValueError, match="suffixes"):  # transformers would still quantize it
        quantize_config(4, 128, False, True, False, True, 0.01, modules_in_block_to_quantize=[["mlp.down_proj"]],
                        excluded=["model.layers.0.mlp.down_proj"])


# ---- the grid ----

@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_codes_in_range_and_error_within_half_a_step(bits, sym):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 100, generator=gen) * torch.linspace(0.01, 3, 32)[:, None]
    scale, zero = grid_params(w, bits, sym)
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == zero.shape == (32,)
    assert torch.equal(zero, zero.round()) and bool((scale > 0).all())
    q = quantize_codes(w, scale, zero, bits)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= maxq(bits)
    err = (dequantize_codes(q, scale, zero) - w).abs()
    # every row has values of both signs, so the whole row lies within half a step of the grid (sym included:
    # its top code is xmax - scale / 2); the slack is float32 rounding at the row's magnitude
    slack = 4 * torch.finfo(torch.float32).eps * w.abs().amax(dim=1, keepdim=True)
    assert bool((err <= scale[:, None] / 2 + slack).all())
    if sym:
        assert bool((zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_grid_all_zero_row_uses_minus_one_to_one(sym):
    scale, zero = grid_params(torch.zeros(2, 16), 4, sym)
    assert torch.equal(scale, fp16_up(2 / 15, 2))
    q = quantize_codes(torch.zeros(2, 16), scale, zero, 4)
    assert torch.equal(q, zero[:, None].to(torch.int32).expand(2, 16))
    assert torch.equal(dequantize_codes(q, scale, zero), torch.zeros(2, 16))


def fp16_up(value: float, n: int) -> torch.Tensor:
    """``value`` rounded up to the next fp16 value, ``n`` times (scales are made fp16-exact, rounding up, so that
    the checkpoint's fp16 scales are the ones the codes were chosen with): computed here from fp16's own spacing."""
    half = torch.tensor(value, dtype=torch.float16)
    if float(half) < value:
        half = torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16))
    return half.float().repeat(n)


def test_grid_widens_to_include_zero():
    """Rows [2, 3] and [-3, -2] at 4 bits: the range becomes [0, 3] and [-3, 0], so scale = 3/15 = 0.2 (made
    fp16-exact, rounded up) and the zero point is 0 and 15. Symmetric: [-3, 3] for the negative row; the positive row keeps xmin = 0 (the
    reference mirrors xmin only when it is negative): scale = 3/15 with zero 8, so it reaches only 7 · 0.2 = 1.4."""
    w = torch.tensor([[2.0, 2.5, 3.0], [-3.0, -2.5, -2.0]])
    scale, zero = grid_params(w, 4, sym=False)
    assert torch.equal(scale, fp16_up(0.2, 2)) and zero.tolist() == [0.0, 15.0]
    q = quantize_codes(w, scale, zero, 4)
    assert bool(((dequantize_codes(q, scale, zero) - w).abs() <= scale[:, None] / 2 + 1e-6).all())
    assert dequantize_codes(zero.to(torch.int32)[:, None], scale, zero).tolist() == [[0.0], [0.0]]

    scale, zero = grid_params(w, 4, sym=True)
    assert torch.equal(scale, torch.cat([fp16_up(0.2, 1), fp16_up(0.4, 1)])) and zero.tolist() == [8.0, 8.0]
    assert torch.allclose(dequantize_codes(quantize_codes(w, scale, zero, 4), scale, zero)[0],
                          7 * fp16_up(0.2, 3))


# ---- RTN ----

def test_rtn_error_falls_with_bits_and_with_smaller_groups():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[:, 7] *= 8  # an outlier column, as real weights have: it hurts a per-row grid more than a grid per 32 columns
    mse = {bits: float(((rtn(w, bits).dequantize() - w) ** 2).mean()) for bits in (2, 3, 4, 8)}
    assert mse[2] > mse[3] > mse[4] > mse[8]
    grouped = float(((rtn(w, 4, group_size=32).dequantize() - w) ** 2).mean())
    assert grouped < mse[4]


def test_rtn_groups_and_layout():
    w = torch.randn(32, 80, generator=torch.Generator().manual_seed(1))
    q = rtn(w, 4, group_size=32)  # 80 = 32 + 32 + 16: the last group is shorter
    assert q.scales.shape == q.zeros.shape == (3, 32) and q.zeros.dtype == torch.int32
    assert q.g_idx.tolist() == [k // 32 for k in range(80)]
    scale, zero = grid_params(w[:, 64:], 4, sym=False)
    assert torch.equal(q.scales[2], scale) and torch.equal(q.zeros[2], zero.to(torch.int32))
    assert torch.equal(q.codes[:, 64:], quantize_codes(w[:, 64:], scale, zero, 4))

    whole = rtn(w, 4)
    assert whole.scales.shape == (1, 32) and whole.g_idx.tolist() == [0] * 80 and whole.group_size == -1

    layer = rtn(torch.randn(64, 128), 4, group_size=32, sym=True)
    assert torch.equal(dequantize_gptq(pack_gptq(layer), 4), unpack_gptq(pack_gptq(layer), 4, 32).dequantize())
    assert torch.allclose(dequantize_gptq(pack_gptq(layer), 4), layer.dequantize(), rtol=1e-3, atol=0)


def test_rtn_refuses_bad_settings():
    with pytest.raises(ValueError, match="bits"):
        rtn(torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match="group_size"):
        rtn(torch.randn(4, 8), 4, group_size=0)
    with pytest.raises(ValueError, match="NaN"):
        rtn(torch.tensor([[1.0, float("nan")]]), 4)


# ---- ChatGLM ----

def test_chatglm_int4_packs_pairs_into_bytes():
    """A row of absmax 7 has scale 7/7 = 1 (exact in fp16), so the codes are the values: (3, -2) -> 0x3E
    ((3 << 4) | (-2 & 0xF)), (-7, 5) -> 0x95 ((-7 & 0xF) << 4 | 5)."""
    w = torch.tensor([[3.0, -2.0, -7.0, 5.0]])
    packed, scale = chatglm_quantize(w, 4)
    assert packed.dtype == torch.int8 and packed.shape == (1, 2)
    assert scale.dtype == torch.float16 and scale.tolist() == [1.0]
    assert packed.view(torch.uint8).tolist() == [[0x3E, 0x95]]
    assert chatglm_dequantize(packed, scale, 4).tolist() == w.tolist()  # unpacks high 3, low -2; high -7, low 5


def test_chatglm_int8_rounds_half_to_even():
    """absmax 127 -> scale 1: codes round(w), half to even as torch.round: 1.5 -> 2, -2.5 -> -2."""
    packed, scale = chatglm_quantize(torch.tensor([[127.0, -64.4, 1.5, -2.5]]), 8)
    assert packed.tolist() == [[127, -64, 2, -2]] and scale.tolist() == [1.0]


@pytest.mark.parametrize("bits", [4, 8])
def test_chatglm_round_trip_error_and_zero_row(bits):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits))
    w[3] = 0  # ChatGLM computes 0 / 0 here
    packed, scale = chatglm_quantize(w, bits)
    assert packed.shape == (16, 64 if bits == 8 else 32)
    back = chatglm_dequantize(packed, scale, bits)
    assert bool(torch.isfinite(back).all()) and torch.equal(back[3], torch.zeros(64))
    assert bool(((back - w).abs() <= scale.float()[:, None] / 2 * 1.01).all())
    rows = scale > 0
    codes = back[rows] / scale.float()[rows, None]
    assert float(codes.abs().max()) == 2 ** (bits - 1) - 1  # each row's absmax lands on the top code


def test_chatglm_refuses_odd_width_at_4_bits():
    with pytest.raises(ValueError, match="odd"):
        chatglm_quantize(torch.randn(2, 5), 4)


# ---- LLMZoo ----

def test_llmzoo_symmetric_by_hand():
    """[[0.5, -1.0]], group 2, symmetric 8-bit: B = 127, scale = 127 / 1.0, x · scale = [63.5, -127], rounded half
    to even [64, -127]; decompressed 64 / 127 = 0.503937..., -1.0."""
    config = CompressionConfig(num_bits=8, group_size=2, group_dim=1, symmetric=True)
    packed = groupwise_compress(torch.tensor([[0.5, -1.0]]), config)
    assert packed.data.dtype == torch.int8 and packed.data.tolist() == [[[64, -127]]]
    assert packed.scale.tolist() == [[[127.0]]] and packed.mn is None
    back = groupwise_decompress(packed, config)
    assert back.shape == (1, 2)
    assert torch.allclose(back, torch.tensor([[0.50394, -1.0]]), atol=1e-5)


def test_llmzoo_asymmetric_by_hand():
    """[[1, 2, 3, 4]], group 4, asymmetric 8-bit: mn = 1, scale = 255 / 3 = 85, (x - 1) · 85 = [0, 85, 170, 255];
    decompressed data / 85 + 1 gives the values back exactly."""
    config = CompressionConfig(num_bits=8, group_size=4, group_dim=1, symmetric=False)
    packed = groupwise_compress(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), config)
    assert packed.data.dtype == torch.uint8 and packed.data.tolist() == [[[0, 85, 170, 255]]]
    assert packed.mn.tolist() == [[[1.0]]]
    assert groupwise_decompress(packed, config).tolist() == [[1.0, 2.0, 3.0, 4.0]]


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_llmzoo_group_without_range_gives_zeros_not_nan(symmetric):
    """LLMZoo's scale is B / max|x| (or B / (max - min)): infinite for these groups, and its codes come from NaN."""
    config = CompressionConfig(num_bits=8, group_size=4, group_dim=1, symmetric=symmetric)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    packed = groupwise_compress(w, config)
    assert bool(torch.isfinite(packed.scale).all()) and packed.scale[0, 0].item() == 0
    back = groupwise_decompress(packed, config)
    assert bool(torch.isfinite(back).all())
    assert back[0, :4].tolist() == [0.0] * 4 and back[1, 4:].tolist() == [0.0] * 4
    if not symmetric:  # a constant group comes back as its constant
        assert back[1, :4].tolist() == [2.0] * 4


@pytest.mark.parametrize("group_dim", [0, 1])
def test_llmzoo_pads_to_whole_groups_and_cuts_back(group_dim):
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(group_dim))
    config = CompressionConfig(num_bits=8, group_size=4, group_dim=group_dim, symmetric=True)
    packed = groupwise_compress(w, config)
    expected = (2, 4, 10) if group_dim == 0 else (6, 3, 4)  # 6 -> 8 and 10 -> 12, in groups of 4
    assert tuple(packed.data.shape) == expected and packed.original_shape == w.shape
    back = groupwise_decompress(packed, config)
    assert back.shape == w.shape
    assert bool(((back - w).abs() <= 0.5 / packed.scale.min() + 1e-6).all())


def test_llmzoo_defaults_and_bad_bits():
    assert CompressionConfig() == CompressionConfig(num_bits=8, group_size=256, group_dim=1, symmetric=True)
    with pytest.raises(ValueError, match="num_bits"):
        groupwise_compress(torch.randn(2, 4), CompressionConfig(num_bits=9))
