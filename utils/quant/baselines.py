"""The seed projects' own weight quantizers, kept as baselines for the GPTQ / RTN report.

* ChatGLM-6B (``quantization.py``): per output row symmetric absmax, int8 or int4, with int4 codes packed two to a
  byte (``chatglm_quantize`` / ``chatglm_dequantize``).
* LLMZoo (``llmzoo/deploy/webapp/compression.py``): group-wise quantization along any dimension, symmetric int8 or
  asymmetric uint8 (``CompressionConfig``, ``groupwise_compress`` / ``groupwise_decompress``).

Both follow their source's arithmetic (its rounding, clamping and fp16 scale), computed in float32 because fp16
arithmetic is slow on CPU. Where the source breaks on a row or group with no range, the fix is said in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _nibbles_to_bytes(q: Tensor) -> Tensor:
    """int8 codes in [-8, 7], [out, in] with ``in`` even, to ChatGLM's bytes [out, in / 2]:
    ``(q[2i] << 4) | (q[2i + 1] & 0x0F)``, the even column in the high nibble."""
    high = q[:, 0::2].to(torch.int32) & 0x0F
    low = q[:, 1::2].to(torch.int32) & 0x0F
    return ((high << 4) | low).to(torch.uint8).view(torch.int8)


def _bytes_to_nibbles(packed: Tensor) -> Tensor:
    """Inverse of ``_nibbles_to_bytes``: each byte's two signed nibbles, high one first.

    ChatGLM's kernel sign-extends with arithmetic shifts (``x >> 4``, ``(int8)(x << 4) >> 4``); the low nibble is
    sign-extended here by arithmetic instead, since shifting a negative int8 left is not portable.
    """
    x = packed.to(torch.int32)
    high = x >> 4
    low = ((x & 0x0F) ^ 0x08) - 0x08
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)


def chatglm_quantize(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """ChatGLM's per-row symmetric absmax quantization of a linear weight ``w`` [out, in].

    ``scale = (max |row| / (2**(bits-1) - 1)).half()`` and ``q = round(w / scale)``, in [-127, 127] at 8 bits and
    [-7, 7] at 4 bits; at 4 bits adjacent input columns share a byte (high nibble: the even column).

    Two fixes: a row whose fp16 scale is 0 (all zeros, or so small fp16 flushes it) gets codes 0 where ChatGLM
    computes 0/0 and casts NaN to int8; and codes are clamped to the range, which a subnormal fp16 scale (much
    coarser than the true absmax / bound) could otherwise overflow.

    Returns:
        ``(packed, scale)``: int8 [out, in] (8 bits) or [out, in / 2] (4 bits), and float16 [out].

    Raises:
        ValueError: ``bits`` not 4 or 8, a weight that is not 2-D, an odd ``in`` at 4 bits.
    """
    if bits not in (4, 8):
        raise ValueError(f"ChatGLM quantizes to 4 or 8 bits, got {bits}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if bits == 4 and w.shape[1] % 2:
        raise ValueError(f"int4 packs input columns in pairs: in_features = {w.shape[1]} is odd")
    bound = 2 ** (bits - 1) - 1
    w = w.detach().to(torch.float32)
    scale = (w.abs().amax(dim=-1) / bound).to(torch.float16)
    s = scale.to(torch.float32)[:, None]
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0)
    q = q.clamp(-bound, bound).to(torch.int8)
    return (q if bits == 8 else _nibbles_to_bytes(q)), scale


def chatglm_dequantize(packed: Tensor, scale: Tensor, bits: int) -> Tensor:
    """float32 [out, in] from ``chatglm_quantize``'s output: ``q * scale[:, None]``."""
    if bits not in (4, 8):
        raise ValueError(f"ChatGLM quantizes to 4 or 8 bits, got {bits}")
    q = packed if bits == 8 else _bytes_to_nibbles(packed)
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


@dataclass(frozen=True)
class CompressionConfig:
    """LLMZoo's group-wise quantization settings (its defaults).

    Attributes:
        num_bits: code width, 2..8.
        group_size: elements per group along ``group_dim``.
        group_dim: the dimension split into groups (1: input columns of a linear weight).
        symmetric: int8 codes in [-B, B], B = 2**(num_bits-1) - 1; else uint8 codes in [0, 2**num_bits - 1]
            above each group's minimum.
    """

    num_bits: int = 8
    group_size: int = 256
    group_dim: int = 1
    symmetric: bool = True


@dataclass
class GroupwisePacked:
    """A tensor compressed by ``groupwise_compress``, in LLMZoo's terms.

    Attributes:
        data: codes, shape ``shape[:d] + (groups, group_size) + shape[d+1:]`` (``d = group_dim``, padded with zeros
            to whole groups): int8 symmetric, uint8 asymmetric.
        scale: float32, one per group (kept as a size-1 dimension): LLMZoo's multiplier, ``B / max|x|``
            (symmetric) or ``B / (max - min)``; 0 for a group with no range.
        mn: float32 group minimum (asymmetric), else None.
        original_shape: the shape before padding.
    """

    data: Tensor
    scale: Tensor
    mn: Tensor | None
    original_shape: torch.Size


def _check(config: CompressionConfig) -> None:
    if not 2 <= config.num_bits <= 8:
        raise ValueError(f"num_bits must lie in 2..8 (codes are stored in 8 bits), got {config.num_bits}")
    if config.group_size <= 0:
        raise ValueError(f"group_size must be positive, got {config.group_size}")


def _multiplier(bound: int, spread: Tensor) -> Tensor:
    """``bound / spread``, or 0 where that is not finite.

    LLMZoo divides by the group's range as is: a group with no range (all zeros, or a constant group in the
    asymmetric mode) gets an infinite scale, NaN codes from 0 * inf, and an int8 cast of NaN, which is undefined.
    Here such a group gets scale 0 and codes 0, and decompresses to zeros (symmetric) or to its constant.
    """
    scale = bound / spread
    return torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))


def groupwise_compress(w: Tensor, config: CompressionConfig = CompressionConfig()) -> GroupwisePacked:
    """LLMZoo's ``compress``: pad ``group_dim`` with zeros to whole groups, then quantize each group.

    Symmetric: ``data = round(clamp(x * B / max|x|, -B, B))``; asymmetric: ``data = round(clamp((x - mn) * B /
    (mx - mn), 0, B))`` with ``B = 2**num_bits - 1``. Rounding is torch's (half to even), after the clamp, as in
    LLMZoo. In the asymmetric mode the zero padding takes part in the last group's min and max, as in LLMZoo.
    """
    _check(config)
    d, size = config.group_dim, config.group_size
    w = w.detach().to(torch.float32)
    shape = w.shape
    groups = -(-shape[d] // size)
    pad = groups * size - shape[d]
    if pad:
        w = torch.cat([w, w.new_zeros(shape[:d] + (pad,) + shape[d + 1:])], dim=d)
    data = w.reshape(shape[:d] + (groups, size) + shape[d + 1:])
    if config.symmetric:
        bound = 2 ** (config.num_bits - 1) - 1
        scale = _multiplier(bound, data.abs().amax(dim=d + 1, keepdim=True))
        codes = (data * scale).clamp_(-bound, bound).round_().to(torch.int8)
        return GroupwisePacked(codes, scale, None, shape)
    bound = 2 ** config.num_bits - 1
    mn = data.amin(dim=d + 1, keepdim=True)
    mx = data.amax(dim=d + 1, keepdim=True)
    scale = _multiplier(bound, mx - mn)
    codes = ((data - mn) * scale).clamp_(0, bound).round_().to(torch.uint8)
    return GroupwisePacked(codes, scale, mn, shape)


def groupwise_decompress(packed: GroupwisePacked, config: CompressionConfig = CompressionConfig()) -> Tensor:
    """LLMZoo's ``decompress``: ``data / scale`` (asymmetric: ``+ mn``), then the padding cut off; float32.

    A group of scale 0 holds codes 0 and divides by 1 instead, so it decompresses to 0 (+ ``mn``), never NaN.
    """
    _check(config)
    d = config.group_dim
    safe = torch.where(packed.scale == 0, torch.ones_like(packed.scale), packed.scale)
    data = packed.data.to(torch.float32) / safe
    if packed.mn is not None:
        data = data + packed.mn
    shape = packed.original_shape
    data = data.reshape(shape[:d] + (-1,) + shape[d + 1:])
    return data.narrow(d, 0, shape[d]).contiguous()
