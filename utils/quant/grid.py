"""The quantizer grid GPTQ and RTN share: the reference GPTQ's min-max grid, per output row (or per group of input
columns), and the unpacked form of a quantized linear weight.

The rules are those of the reference implementation's ``Quantizer.find_params`` (IST-DASLab/gptq, ``quant.py``):

* the range always contains 0: ``xmin = min(row.min(), 0)``, ``xmax = max(row.max(), 0)``, so a row whose values are
  all positive (or all negative) is widened to reach 0, and 0 is always exactly representable (code ``zero``);
* a row that is all zeros uses ``[-1, 1]`` instead, so its scale is never 0;
* asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)`` (an integer in ``0..maxq``);
* symmetric: ``xmax = max(|xmin|, xmax)``, and ``xmin = -xmax`` where ``xmin < 0``; ``zero = 2**(bits-1)``. As in
  the reference, a row with no negative value keeps ``xmin = 0``: its scale is ``xmax / maxq`` and codes above
  ``zero`` reach only about half of ``xmax`` (values beyond are clamped) — kept, so GPTQ and RTN match the
  reference's grid exactly.

Codes are ``clamp(round(w / scale) + zero, 0, maxq)``; rounding is torch's (half to even). One departure: every
scale is rounded up to an fp16 value before codes are chosen (``fp16_ceil``), because the checkpoint stores fp16
scales: the weights a loader rebuilds are then exactly the ones GPTQ's error feedback accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (2, 3, 4, 8)


def maxq(bits: int) -> int:
    """The largest code of a ``bits``-bit grid: ``2**bits - 1``."""
    return 2 ** bits - 1


def fp16_ceil(x: Tensor) -> Tensor:
    """The smallest fp16 value >= ``x`` (at least fp16's smallest subnormal), as float32.

    The GPTQ checkpoint stores fp16 scales, so a scale is made fp16-exact before any code is chosen: the codes (and
    GPTQ's error feedback) are then computed against the very scale a loader uses. Rounding up, not to nearest,
    keeps the whole [xmin, xmax] range on the grid."""
    half = x.to(torch.float16)
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    half = torch.where(half.to(torch.float32) < x, up, half)
    return half.to(torch.float32).clamp(min=2.0 ** -24)


def grid_params(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each row of ``w`` [rows, cols] (see the module docstring for the rules).

    Returns:
        ``(scale [rows], zero [rows])``, both float32; ``zero`` holds integers.
    """
    w = w.to(torch.float32)
    top = maxq(bits)
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = fp16_ceil((xmax - xmin) / top)
    if sym:
        zero = torch.full_like(scale, (top + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _per_row(param: Tensor, w: Tensor) -> Tensor:
    """``param`` [rows] as a column [rows, 1] against ``w`` [rows, cols]; anything else broadcasts as given."""
    return param.unsqueeze(-1) if param.dim() == w.dim() - 1 else param


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` as int32; ``scale`` / ``zero`` [rows] apply per row of ``w``."""
    scale, zero = _per_row(scale, w), _per_row(zero, w)
    q = torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq(bits))
    return q.to(torch.int32)


def dequantize_codes(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (q - zero)`` as float32; ``scale`` / ``zero`` [rows] apply per row of ``q``."""
    scale, zero = _per_row(scale, q), _per_row(zero, q)
    return scale.to(torch.float32) * (q.to(torch.float32) - zero.to(torch.float32))


@dataclass
class QuantizedWeight:
    """A linear weight W [out, in] quantized in GPTQ's terms, before packing.

    Group ``g`` has its own scale and zero point per output row; ``g_idx[k]`` names the group of input column ``k``.
    Without act-order ``g_idx[k] = k // group_size``; with act-order (no static groups) a group is a run of the
    permuted column order, so ``g_idx`` is not monotone.

    Attributes:
        codes: int32 [out, in], in ``0..maxq``.
        scales: float32 [groups, out].
        zeros: int32 [groups, out], integer zero points in ``0..maxq``.
        g_idx: int32 [in], the group of each input column.
        bits: 2, 3, 4 or 8.
        group_size: input columns per group; -1 = one group per output row (``groups == 1``).
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int

    def dequantize(self) -> Tensor:
        """float32 [out, in]: ``scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])``."""
        g = self.g_idx.long()
        scale = self.scales[g].t().to(torch.float32)
        zero = self.zeros[g].t()
        return scale * (self.codes - zero).to(torch.float32)


def rtn(w: Tensor, bits: int, group_size: int = -1, sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest on GPTQ's grid, with no error feedback (the ablation GPTQ is measured against).

    Input columns go in consecutive groups of ``group_size`` (-1: one group of all of them); each group's scale and
    zero point come from ``grid_params`` on that group's columns, and ``g_idx[k] = k // group_size``. The last group
    is shorter when ``group_size`` does not divide ``in_features`` (GPTQ allows it, and so does the layout).

    Args:
        w: the weight [out, in], finite.
        bits: 2, 3, 4 or 8.
        group_size: -1 or a positive number of input columns.
        sym: symmetric grid (``zero = 2**(bits-1)``) instead of min-max.

    Raises:
        ValueError: unsupported ``bits`` or ``group_size``, a weight that is not 2-D or not finite.
    """
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    if w.dim() != 2:
        raise ValueError(f"rtn quantizes a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("rtn: the weight holds NaN or inf values")
    w = w.detach().to(torch.float32)
    cols = w.shape[1]
    size = cols if group_size == -1 else group_size
    codes, scales, zeros = [], [], []
    for start in range(0, cols, size):
        part = w[:, start:start + size]
        scale, zero = grid_params(part, bits, sym)
        codes.append(quantize_codes(part, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(cols) // size).to(torch.int32)
    return QuantizedWeight(codes=torch.cat(codes, dim=1), scales=torch.stack(scales),
                           zeros=torch.stack(zeros).to(torch.int32), g_idx=g_idx, bits=bits, group_size=group_size)
