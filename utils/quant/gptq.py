"""GPTQ (Frantar et al., 2022): one linear layer quantized column by column, each column's rounding error spread
over the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

The loss of a quantized weight Ŵ on calibration inputs X is ‖WX − ŴX‖², whose Hessian in each row of W is
H = 2/n · X Xᵀ (``Hessian`` accumulates it batch by batch, as a running mean, so the number of calibration tokens
never changes its scale). ``gptq_quantize`` then follows the paper's algorithm with its standard refinements:

* dampening: ``damp_percent`` × mean(diag H) added to the diagonal, so H is invertible; columns no input ever
  reached (diag 0) are set to zero and quantize to the zero point;
* the inverse via Cholesky: Hinv = chol(H⁻¹) (upper), whose rows give each column's error-feedback weights;
* lazy batch updates: columns go in blocks of ``block_size``; inside a block each column is rounded and its error
  is pushed to the rest of the block, and the whole block's error to the later columns at once;
* groups: with ``group_size`` > 0, a new scale / zero point is fitted on the (already updated) weights each time a
  group starts; ``static_groups`` fits them all up front on the original columns instead;
* act-order (``desc_act``): columns go in order of decreasing diag H (the most-used inputs first, while the most
  freedom is left to absorb their error). Without static groups a group is then a run of the permuted order and
  ``g_idx`` maps each input column to it (not monotone); with static groups ``g_idx`` stays ``k // group_size``.

The grid is ``utils.quant.grid``'s (the one RTN uses too): with ``H = I`` no error is fed back and GPTQ gives RTN's
codes exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.quant.grid import QuantizedWeight, grid_params, quantize_codes


class GPTQError(ValueError):
    """A layer GPTQ cannot quantize as asked (a Hessian that stays singular, too few calibration tokens)."""


class Hessian:
    """H = 2/n · Σ x xᵀ over the calibration inputs of one linear layer (rows of ``x``: tokens)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., columns]."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # Running mean: rescale what was summed so far, then add this batch with the new count.
        self.H *= self.tokens / (self.tokens + n)
        self.tokens += n
        x = x * (2.0 / self.tokens) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int = -1
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128


@dataclass
class GPTQResult:
    quantized: QuantizedWeight
    loss: float  # GPTQ's own loss: Σ (w - q)² / Hinv_ii², summed over the layer
    permutation: torch.Tensor | None  # act-order's column order (None without act-order)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹."""
    diag = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent * torch.mean(torch.diag(H))
    H = H.clone()
    H[diag, diag] += damp
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(Hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise GPTQError(f"{name}: the Hessian is singular even after dampening ({damp_percent:g} x its mean "
                        "diagonal): raise --damp_percent, or calibrate on more (and more varied) tokens") from None


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, settings: GPTQSettings, name: str = "layer") -> GPTQResult:
    """Quantize ``weight`` [out, in] with the Hessian ``H`` [in, in] of its inputs (see the module docstring).

    Raises:
        GPTQError: the Hessian cannot be inverted.
        ValueError: settings the grid cannot take.
    """
    s = settings
    if s.bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {s.bits}")
    if s.group_size == 0 or s.group_size < -1:
        raise ValueError(f"group_size must be -1 or positive, got {s.group_size}")
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    H = H.to(W.device, torch.float32).clone()
    gs = s.group_size if s.group_size > 0 else cols
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = s.group_size > 0
    if s.static_groups and grouped:  # every group fitted up front, on the original columns
        fitted = [grid_params(W[:, g:g + gs], s.bits, s.sym) for g in range(0, cols, gs)]
    elif not grouped:  # one grid per output row, over all of it
        fitted = [grid_params(W, s.bits, s.sym)]
    else:  # fitted as each group starts (below)
        fitted = []
    perm = None
    if s.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, s.damp_percent, name)

    codes = torch.zeros(rows, cols, dtype=torch.int32, device=W.device)
    column_group = torch.zeros(cols, dtype=torch.int64)  # the group of each column, in the order quantized
    g = 0
    scale, zero = fitted[0] if fitted else (None, None)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, s.block_size):
        i2 = min(i1 + s.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped and s.static_groups:
                g = (int(perm[col]) if perm is not None else col) // gs
                scale, zero = fitted[g]
            elif grouped and col % gs == 0:
                # A new group: fitted on its columns as the error feedback has left them so far (this block's
                # columns from W1, later ones from W, which holds the earlier blocks' updates).
                current = torch.cat([W1[:, i:], W[:, i2:]], 1)[:, :gs]
                fitted.append(grid_params(current, s.bits, s.sym))
                g = len(fitted) - 1
                scale, zero = fitted[g]
            column_group[col] = g
            w = W1[:, i]
            d = Hinv1[i, i]
            q = quantize_codes(w[:, None], scale[:, None], zero[:, None], s.bits)[:, 0]
            codes[:, col] = q
            deq = scale * (q.to(torch.float32) - zero)
            err = (w - deq) / d
            loss += (err ** 2).sum().double()
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    scales = [p[0] for p in fitted]
    zeros = [p[1] for p in fitted]
    g_idx = column_group.to(torch.int32)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        g_idx = g_idx[inverse.cpu()]
    quantized = QuantizedWeight(codes=codes.cpu(), scales=torch.stack(scales).cpu(),
                                zeros=torch.stack(zeros).round().to(torch.int32).cpu(), g_idx=g_idx,
                                bits=s.bits, group_size=s.group_size)
    return GPTQResult(quantized, float(loss), perm.cpu() if perm is not None else None)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """‖WX − ŴX‖ / ‖WX‖ on the calibration inputs behind ``H`` (= 2/n X Xᵀ), computed from H alone."""
    W = weight.to(torch.float32)
    D = W - approx.to(torch.float32)
    H = H.to(torch.float32)
    num = torch.einsum("ij,jk,ik->", D, H, D)
    den = torch.einsum("ij,jk,ik->", W, H, W)
    return float((num.clamp(min=0) / den.clamp(min=1e-30)).sqrt())
