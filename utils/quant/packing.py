"""The GPTQ checkpoint layout the ecosystem loads (AutoGPTQ, GPTQModel, transformers' GPTQ backend through optimum):
the classic v1 format, ``checkpoint_format: "gptq"``.

Per quantized linear layer W [out, in] with ``G`` groups:

* ``qweight`` int32 [in * bits / 32, out]: the codes packed along the INPUT dimension;
* ``qzeros`` int32 [G, out * bits / 32]: the zero points packed along the OUTPUT dimension, each stored as
  ``zero - 1`` (the v1 convention; readers add 1 back);
* ``scales`` float16 [G, out];
* ``g_idx`` int32 [in]: the group of each input column (not monotone under act-order).

Packing is one bit stream per column of the packed tensor, least significant bit first: value ``k`` of the
packed dimension occupies stream bits ``bits*k .. bits*k + bits - 1``, stream bit ``b`` being bit ``b % 32`` of
word ``b // 32``. At 2, 4 and 8 bits a word holds ``32 / bits`` whole values. At 3 bits, 32 values fill 3 words and
two of them straddle a word boundary (value 10: bits 30-31 of word 0 and bit 0 of word 1; value 21: bit 31 of word
1 and bits 0-1 of word 2) — the convention of AutoGPTQ's ``QuantLinear.pack`` (``qlinear_cuda_old.py``) and of the
3-bit unpack in its torch path, which GPTQModel keeps.

A zero point of 0 cannot be written faithfully in v1: ``0 - 1`` is stored as all ones in its field (``maxq``), and
``unpack_gptq`` / ``dequantize_gptq`` read a field back as ``(field + 1) & maxq``, so our round trip is exact. The
ecosystem's v1 readers compute ``field + 1`` without the wrap (AutoGPTQ's triton and torch paths read
``2**bits``; GPTQModel's v1-to-v2 conversion adds 1 to every field of a packed word, carrying into the next field).
Only an asymmetric grid produces zero 0 (a group with no value below -scale/2): ``(q.zeros == 0)`` finds such
groups, for the writer to report.

Shapes the layout cannot hold (``packable``) are kept in floating point by the caller, never padded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor

from utils.quant.grid import BITS, QuantizedWeight, maxq

_WORD = 32


def _period(bits: int) -> tuple[int, int]:
    """(values, words) of the shortest run of whole words holding whole values: (32 / bits, 1), or (32, 3) at 3 bits."""
    values = _WORD // math.gcd(_WORD, bits)
    return values, values * bits // _WORD


def _as_int32(words: Tensor) -> Tensor:
    """Unsigned 32-bit words held in int64 as the int32 with the same bits (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack ``values`` [L, N] (integers in ``0..maxq``) along dim 0 into int32 words [L * bits / 32, N]."""
    per, words_per = _period(bits)
    length, n = values.shape
    v = values.to(torch.int64).reshape(length // per, per, n)
    out = torch.zeros(length // per, words_per, n, dtype=torch.int64)
    for j in range(per):
        word, offset = divmod(bits * j, _WORD)
        out[:, word] |= (v[:, j] << offset) & 0xFFFFFFFF
        if offset + bits > _WORD:  # the value's high bits spill into the next word (3-bit only)
            out[:, word + 1] |= v[:, j] >> (_WORD - offset)
    return _as_int32(out.reshape(-1, n))


def _unpack_rows(words: Tensor, bits: int) -> Tensor:
    """Inverse of ``_pack_rows``: int32 words [W, N] to int64 values [W * 32 / bits, N]."""
    per, words_per = _period(bits)
    n = words.shape[1]
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(-1, words_per, n)
    values = []
    for j in range(per):
        word, offset = divmod(bits * j, _WORD)
        v = w[:, word] >> offset
        if offset + bits > _WORD:
            v = v | (w[:, word + 1] << (_WORD - offset))
        values.append(v & maxq(bits))
    return torch.stack(values, dim=1).reshape(-1, n)


def packable(in_features: int, out_features: int, bits: int) -> str | None:
    """None when the layout can hold a linear layer of this shape at ``bits``, else the reason it cannot.

    ``qweight`` packs the input dimension and ``qzeros`` the output dimension in whole words, so both must be
    multiples of ``32 / bits`` at 2, 4 and 8 bits, and of 32 at 3 bits.
    """
    if bits not in BITS:
        return f"bits must be one of {BITS}, got {bits}"
    per, words_per = _period(bits)
    unit = f"{per} {bits}-bit values fill {words_per} int32 word{'s' if words_per > 1 else ''}"
    for name, size, packed in (("in_features", in_features, "qweight"), ("out_features", out_features, "qzeros")):
        if size % per:
            return (f"{name} = {size} is not a multiple of {per} ({unit}, and {packed} packs this dimension in "
                    "whole words)")
    return None


def pack_gptq(q: QuantizedWeight) -> dict[str, Tensor]:
    """``q`` in the GPTQ v1 layout: ``{"qweight", "qzeros", "scales", "g_idx"}`` (see the module docstring).

    Raises:
        ValueError: a shape the layout cannot hold (``packable``), codes or zero points out of ``0..maxq``,
            tensors whose shapes disagree, or scales that are not finite in float16.
    """
    out_features, in_features = q.codes.shape
    reason = packable(in_features, out_features, q.bits)
    if reason:
        raise ValueError(f"cannot pack a [{out_features}, {in_features}] weight at {q.bits} bits: {reason}")
    top = maxq(q.bits)
    groups = q.scales.shape[0]
    if q.scales.shape != (groups, out_features) or q.zeros.shape != (groups, out_features):
        raise ValueError(f"scales {tuple(q.scales.shape)} and zeros {tuple(q.zeros.shape)} must both be "
                         f"[groups, {out_features}]")
    if q.g_idx.shape != (in_features,) or (q.g_idx < 0).any() or (q.g_idx >= groups).any():
        raise ValueError(f"g_idx must name one of the {groups} groups for each of the {in_features} input columns")
    for name, values in (("codes", q.codes), ("zeros", q.zeros)):
        if (values < 0).any() or (values > top).any():
            raise ValueError(f"{name} must lie in 0..{top} at {q.bits} bits")
    scales = q.scales.to(torch.float16)
    if not torch.isfinite(scales).all():
        raise ValueError("scales overflow float16, the layout's scale dtype")
    stored_zeros = (q.zeros.to(torch.int64) - 1) & top  # v1 stores zero - 1; a zero of 0 wraps to all ones
    return {
        "qweight": _pack_rows(q.codes.t(), q.bits),
        "qzeros": _pack_rows(stored_zeros.t(), q.bits).t().contiguous(),
        "scales": scales.contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def _shapes(tensors: dict[str, Tensor], bits: int) -> tuple[int, int]:
    """(in_features, out_features) of a packed layer, checked against ``qzeros`` and ``scales``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    words_per = _period(bits)[1]
    if qweight.shape[0] % words_per or qzeros.shape[1] % words_per:
        raise ValueError(f"{bits}-bit qweight rows and qzeros columns come in runs of {words_per} words, got "
                         f"qweight {tuple(qweight.shape)} and qzeros {tuple(qzeros.shape)}")
    in_features = qweight.shape[0] * _WORD // bits
    out_features = qweight.shape[1]
    if scales.shape[1] != out_features or qzeros.shape != (scales.shape[0], out_features * bits // _WORD):
        raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                         f"{tuple(scales.shape)} do not describe one {bits}-bit layer")
    return in_features, out_features


def _g_idx(tensors: dict[str, Tensor], in_features: int, group_size: int) -> Tensor:
    """The stored ``g_idx``, or (old checkpoints without one) ``k // group_size``."""
    if tensors.get("g_idx") is not None:
        return tensors["g_idx"].to(torch.int32)
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // size).to(torch.int32)


def _codes_and_zeros(tensors: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor]:
    """codes [in, out] and zero points [groups, out] (int64) straight from ``qweight`` / ``qzeros``."""
    codes = _unpack_rows(tensors["qweight"], bits)
    zeros = (_unpack_rows(tensors["qzeros"].t(), bits).t() + 1) & maxq(bits)
    return codes, zeros


def unpack_gptq(tensors: dict[str, Tensor], bits: int, group_size: int) -> QuantizedWeight:
    """The exact inverse of ``pack_gptq`` (scales come back as the float16 values stored, in float32).

    A checkpoint without ``g_idx`` gets ``k // group_size``; ``group_size`` is otherwise only recorded.
    """
    in_features, _ = _shapes(tensors, bits)
    codes, zeros = _codes_and_zeros(tensors, bits)
    return QuantizedWeight(codes=codes.t().to(torch.int32).contiguous(),
                           scales=tensors["scales"].to(torch.float32), zeros=zeros.to(torch.int32),
                           g_idx=_g_idx(tensors, in_features, group_size), bits=bits, group_size=group_size)


def dequantize_gptq(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """float32 [out, in] straight from the packed form: ``scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])``.

    Without ``g_idx`` the groups are taken as consecutive runs of ``ceil(in / groups)`` columns.
    """
    in_features, _ = _shapes(tensors, bits)
    codes, zeros = _codes_and_zeros(tensors, bits)
    groups = tensors["scales"].shape[0]
    g = _g_idx(tensors, in_features, -(-in_features // groups)).long()
    weight = tensors["scales"].to(torch.float32)[g] * (codes - zeros[g]).to(torch.float32)
    return weight.t().contiguous()


def quantize_config(bits: int, group_size: int, desc_act: bool, sym: bool, static_groups: bool,
                    true_sequential: bool, damp_percent: float,
                    modules_in_block_to_quantize: list[list[str]] | None = None,
                    excluded: Iterable[str] = ()) -> dict:
    """``quantize_config.json`` (and ``config.json``'s ``quantization_config``) as the ecosystem reads it.

    Layers left in floating point (``excluded``, full module names such as ``model.layers.0.mlp.down_proj``) are
    told to each loader in the form it honours, as read from their sources:

    * transformers 5.23 (``quantizers/quantizer_gptq.py``) hands the config to optimum's ``GPTQQuantizer``, whose
      ``convert_model`` (optimum ``optimum/gptq/quantizer.py``, at 83c88b8) replaces every linear layer of the
      decoder blocks unless ``modules_in_block_to_quantize`` is set; then only layers whose name ENDS WITH one of
      its entries are replaced (block-relative names like ``self_attn.q_proj`` apply to every block; a full name
      to one layer). It reads no other exclusion field.
    * GPTQModel (``gptqmodel/utils/model.py`` ``make_quant``, ``gptqmodel/quantization/config.py``
      ``_resolve_dynamic_override``, at f4c327a) skips a module when a ``dynamic`` key ``"-:<regex>"`` matches its
      full name (``re.match``, start-anchored); ``^name$`` with the name escaped is its exact-name form. Unknown
      keys such as ``static_groups`` or ``modules_in_block_to_quantize`` are ignored with a log line.

    So both are written: ``modules_in_block_to_quantize`` as given (the caller lists what IS quantized, in
    true-sequential order) and one ``dynamic`` negative rule per excluded layer.

    Raises:
        ValueError: values the loaders refuse (transformers' ``GPTQConfig.post_init``: bits, group_size, damp
            strictly between 0 and 1), or an excluded layer that ``modules_in_block_to_quantize`` would still
            have transformers quantize.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must lie strictly between 0 and 1, got {damp_percent}")
    config = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "static_groups": bool(static_groups),
        "true_sequential": bool(true_sequential),
        "damp_percent": damp_percent,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    excluded = list(excluded)
    if modules_in_block_to_quantize is not None:
        kept = [name for step in modules_in_block_to_quantize for name in step]
        clash = [name for name in excluded if any(name.endswith(m) for m in kept)]
        if clash:
            raise ValueError(f"{clash} are excluded from quantization, but modules_in_block_to_quantize names them "
                             "(transformers matches its entries as name suffixes)")
        config["modules_in_block_to_quantize"] = [list(step) for step in modules_in_block_to_quantize]
    if excluded:
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in excluded}
    return config
