"""Matmul straight from the GPTQ layout: ``y = x @ Wᵀ (+ bias)`` without keeping W in floating point.

The layout is ``utils.quant.packing``'s (the classic v1 ``checkpoint_format: "gptq"``):
``W[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])`` with the code unpacked from ``qweight``
(input dimension packed, LSB first) and the zero point from ``qzeros`` (output dimension packed, stored as
``zero - 1`` and read back as ``(field + 1) & maxq``, exactly as ``packing.dequantize_gptq`` reads it).

Three backends, one result (up to rounding):

* ``"triton"``: one fused kernel that unpacks codes and zero points, looks up each input column's group from
  ``g_idx`` (so act-order checkpoints need no reordering) and accumulates in float32. Bits 2, 4 and 8; 3-bit
  codes straddle int32 words and are left to the other backends. Block sizes come from a small fixed table chosen
  by M, never from ``triton.autotune`` (MOSS's autotuner broke across triton versions). Runs on a CUDA device, or
  on CPU under ``TRITON_INTERPRET=1`` when asked for explicitly (the tests do this).
* ``"cpu_int4"``: the codes repacked once into torch's own CPU int4 format and multiplied by
  ``torch.ops.aten._weight_int4pack_mm_for_cpu``. Measured with torch 2.13 (2 cores, M=1, K=N=4096, group 128):
  its bfloat16 path runs about 3x faster than a float32 ``x @ Wᵀ``, while its float32 and float16 paths run about
  20x slower, so activations are cast to bfloat16 for the call and the result back to ``x``'s dtype; scales and
  zero points are held in bfloat16 too. This path therefore rounds like a bfloat16 matmul (relative error around
  1e-3), not like float32; ask for ``"torch"`` where that matters. Bits 2, 3 and 4 (every such code fits a
  nibble). The op's own constraints (read from its checks and confirmed by experiment): out_features a multiple
  of 16, and a group size of 32, 64, 128 or 256 that divides in_features. A GPTQ group of 512 or ``-1`` is
  expressed as several such blocks sharing one scale; an act-order ``g_idx`` is made contiguous by permuting the
  input columns of the weight once at load and of ``x`` at each call (``x[:, perm]``). A layer that still does not
  fit falls back to ``"torch"``, with the reason recorded.
* ``"torch"``: dequantize with ``packing.dequantize_gptq`` and multiply. The floating-point weight is cached once
  per layer when it fits in a quarter of the memory free on its device, else rebuilt at each call.

``choose_backend`` makes the choice (and says why) before anything touches triton, so a machine without a GPU
never imports triton and never meets its ``0 active drivers`` error. ``GPTQLinear`` is the module that holds a
packed layer, picks its backend on first use and has a backward for its input, so adapters can train on a GPTQ
base (MOSS's backward called a kernel that did not exist).
"""

from __future__ import annotations

import os

import psutil
import torch
from torch import Tensor

from utils.quant.grid import QuantizedWeight
from utils.quant.packing import dequantize_gptq, pack_gptq, unpack_gptq

BACKENDS = ("triton", "cpu_int4", "torch")
TRITON_BITS = (2, 4, 8)
CPU_INT4_BITS = (2, 3, 4)
# The group sizes _weight_int4pack_mm_for_cpu accepts, largest first (fewer scales to read).
CPU_INT4_GROUPS = (256, 128, 64, 32)
# Its packing step requires out_features (the rows it packs) in multiples of 16.
CPU_INT4_N_MULTIPLE = 16
# The CPU int4 kernel stores a nibble q and computes (q - 8) * scale + zero.
_INT4_MIDPOINT = 8
# Fraction of free device memory one layer's cached floating-point weight may take.
_CACHE_FRACTION = 0.25

# (largest M, launch parameters); the last row takes every larger M. Small M is weight-bound: narrow N tiles give
# more programs and a long K tile amortises the loop. Large M reuses each dequantized tile across more rows.
TRITON_CONFIGS = (
    (16, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)),
    (None, dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3)),
)

_TRUE = ("1", "true", "on", "yes")  # the spellings triton's own environment flags accept


class BackendChoice(str):
    """A backend name (compares equal to ``"triton"``, ``"cpu_int4"`` or ``"torch"``) with the reason it was chosen."""

    reason: str

    def __new__(cls, name: str, reason: str = "") -> BackendChoice:  # the default lets pickle / deepcopy rebuild it
        choice = super().__new__(cls, name)
        choice.reason = reason
        return choice


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set, i.e. triton kernels would run on CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


_triton_import: tuple | None = None  # (module or None, error message), filled on first need


def _import_triton():
    """``(triton, "")`` or ``(None, why)``; any failure counts (a broken install raises more than ImportError)."""
    global _triton_import
    if _triton_import is None:
        try:
            import triton
            _triton_import = (triton, "")
        except Exception as exc:  # noqa: BLE001 - every failure means "use a fallback", with its message kept
            _triton_import = (None, f"{type(exc).__name__}: {exc}")
    return _triton_import


def choose_backend(device: torch.device | str, bits: int, group_size: int, act_order: bool = False, *,
                   requested: str | None = None) -> BackendChoice:
    """The backend for a GPTQ layer on ``device``, and why; touches triton only where it will be used.

    Args:
        device: where the packed tensors (and the inputs) live.
        bits: 2, 3, 4 or 8.
        group_size: input columns per group, -1 for one group per row.
        act_order: whether ``g_idx`` is not monotone (it only changes the reason: every backend handles it,
            ``cpu_int4`` by permuting the input columns).
        requested: force one of ``BACKENDS``; ``"triton"`` on CPU needs ``TRITON_INTERPRET=1``.

    Raises:
        ValueError: an unknown backend, or one that cannot run this layer on this device.
    """
    device = torch.device(device)
    if requested is not None:
        return _check_requested(requested, device, bits, group_size)
    if device.type == "cuda":
        if bits not in TRITON_BITS:
            return BackendChoice("torch", f"{bits}-bit codes straddle int32 words; the triton kernel takes bits "
                                          f"{TRITON_BITS}, so the weight is dequantized and multiplied in torch")
        triton, error = _import_triton()
        if triton is None:
            return BackendChoice("torch", f"triton cannot be imported ({error})")
        order = ", per-column g_idx lookup for act-order" if act_order else ""
        return BackendChoice("triton", f"CUDA device: fused triton dequantize-matmul, {bits}-bit{order}")
    if device.type == "cpu":
        why = _cpu_int4_unsupported(bits, group_size)
        if why:
            return BackendChoice("torch", why)
        order = "; act-order columns permuted once at load so groups are contiguous" if act_order else ""
        return BackendChoice("cpu_int4", f"CPU: repacked once into torch's int4 format, bfloat16 matmul{order}")
    return BackendChoice("torch", f"no fused kernel for {device.type} devices")


def _cpu_int4_unsupported(bits: int, group_size: int) -> str | None:
    """Why the CPU int4 path cannot take this bit width / group size, or None."""
    if bits not in CPU_INT4_BITS:
        return (f"{bits}-bit codes do not fit torch's CPU int4 format (bits {CPU_INT4_BITS}); the weight is "
                "dequantized and multiplied in torch")
    if group_size != -1 and group_size % CPU_INT4_GROUPS[-1]:
        return (f"group size {group_size} is not a multiple of {CPU_INT4_GROUPS[-1]}, the smallest group torch's "
                "CPU int4 matmul takes; the weight is dequantized and multiplied in torch")
    return None


def _check_requested(name: str, device: torch.device, bits: int, group_size: int) -> BackendChoice:
    """A backend the caller asked for, refused with the reason when it cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown GPTQ backend {name!r}; choose one of {BACKENDS}")
    if name == "triton":
        if bits not in TRITON_BITS:
            raise ValueError(f"the triton kernel takes bits {TRITON_BITS}, not {bits}")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"the triton backend needs a CUDA device, or TRITON_INTERPRET=1 on CPU; got {device}")
        triton, error = _import_triton()
        if triton is None:
            raise ValueError(f"the triton backend was requested but triton cannot be imported ({error})")
    if name == "cpu_int4":
        why = "not a CPU device" if device.type != "cpu" else _cpu_int4_unsupported(bits, group_size)
        if why:
            raise ValueError(f"the cpu_int4 backend cannot run this layer: {why}")
    return BackendChoice(name, "requested")


# ---------------------------------------------------------------------------------------------------- triton

tl = None  # triton.language, bound by _triton_kernel (so a CPU-only process never imports it)
_KERNEL = None


def _gptq_matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, bias_ptr, y_ptr, M, N, K,
                        stride_xm, stride_xk, stride_ym, stride_yn,
                        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of ``y``: for each K tile, unpack the codes, look up each column's group (act-order
    safe), dequantize in float32 and accumulate ``x_tile @ w_tile`` in float32."""
    PER_WORD: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = ((offs_n % PER_WORD) * BITS)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
        # Arithmetic shifts of negative words fill with ones; the mask drops them.
        codes = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MAXQ
        group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        scale = tl.load(scales_ptr + group[:, None] * N + offs_n[None, :], mask=mask_w, other=0.0).to(tl.float32)
        zero_words = tl.load(qzeros_ptr + group[:, None] * (N // PER_WORD) + (offs_n // PER_WORD)[None, :],
                             mask=mask_w, other=0)
        zero = (((zero_words >> zero_shift) & MAXQ) + 1) & MAXQ  # v1 stores zero - 1 (0 wraps to maxq)
        # Masked-out entries have scale 0. The weight is rounded to the input's dtype (a no-op for float32).
        w = ((codes - zero).to(tl.float32) * scale).to(a.dtype)
        if IEEE_DOT:  # true float32 products, as torch's float32 matmul (no TF32)
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:  # float16 / bfloat16 operands on tensor cores, products summed in float32
            acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _triton_kernel():
    """The jitted kernel, built on first use (``triton.jit`` reads ``TRITON_INTERPRET`` at that moment)."""
    global tl, _KERNEL
    if _KERNEL is None:
        triton, error = _import_triton()
        if triton is None:
            raise RuntimeError(f"triton cannot be imported ({error})")
        import triton.language
        tl = triton.language
        _KERNEL = triton.jit(_gptq_matmul_kernel)
    return _KERNEL


def triton_config(m: int) -> dict:
    """The fixed launch parameters for ``m`` rows of ``x`` (``TRITON_CONFIGS``)."""
    for largest, config in TRITON_CONFIGS:
        if largest is None or m <= largest:
            return config
    raise AssertionError("TRITON_CONFIGS must end with a catch-all row")


def _ieee_dot(dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies in float32 rather than on ``dtype`` operands.

    Always for float32 inputs. Also for bfloat16 under the interpreter: triton 3.9's interpreter computes ``tl.dot``
    on bfloat16 operands wrongly (errors of 1e10 measured on a 16x16 product), and upcasting them changes nothing
    else, since a product of two bfloat16 values is exact in float32.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton_interpreting())


def triton_gptq_matmul(x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                       bias: Tensor | None = None) -> Tensor:
    """``x @ Wᵀ (+ bias)`` for ``x`` [M, K] (float32, float16 or bfloat16) by the fused triton kernel.

    Call only where ``choose_backend`` allows triton (a CUDA device, or CPU with ``TRITON_INTERPRET=1``).

    Returns:
        [M, N] in ``x``'s dtype; accumulation is float32 whatever the dtype.
    """
    if bits not in TRITON_BITS:
        raise ValueError(f"the triton kernel takes bits {TRITON_BITS}, not {bits}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * 32 // bits != k or g_idx.shape[0] != k:
        raise ValueError(f"x has {k} columns but the layer has {qweight.shape[0] * 32 // bits} inputs")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    kernel = _triton_kernel()
    config = triton_config(m)
    grid = (-(-m // config["BLOCK_M"]), -(-n // config["BLOCK_N"]))
    kernel[grid](x, qweight.contiguous(), qzeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous(),
                 y if bias is None else bias.contiguous(), y, m, n, k,
                 x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                 BITS=bits, HAS_BIAS=bias is not None, IEEE_DOT=_ieee_dot(x.dtype), **config)
    return y


# -------------------------------------------------------------------------------------------------- cpu_int4

class CpuInt4Weight:
    """A GPTQ layer repacked for ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    Attributes:
        packed: uint8 [N, K / 2], torch's own nibble layout (made by ``_convert_weight_to_int4pack_for_cpu``).
        scales_and_zeros: bfloat16 [K / block, N, 2]: ``scale`` and a zero term, since the kernel computes
            ``(q - 8) * scale + zero_term`` and GPTQ wants ``scale * (code - zero)``. At 4 bits ``q`` is the code
            and the zero term ``scale * (8 - zero)``; at 2 and 3 bits ``q = code - zero + 8`` and the term is 0.
        block: the group size handed to the kernel (one of ``CPU_INT4_GROUPS``).
        perm: the order of input columns that makes groups contiguous, or None when they already are.
    """

    def __init__(self, packed: Tensor, scales_and_zeros: Tensor, block: int, perm: Tensor | None):
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros
        self.block = block
        self.perm = perm

    @classmethod
    def from_quantized(cls, q: QuantizedWeight) -> CpuInt4Weight:
        """Repack ``q``; raises ValueError (with the reason) when the CPU kernel cannot hold this layer."""
        if q.bits not in CPU_INT4_BITS:
            raise ValueError(f"{q.bits}-bit codes do not fit a nibble")
        n, k = q.codes.shape
        if n % CPU_INT4_N_MULTIPLE:
            raise ValueError(f"out_features = {n} is not a multiple of {CPU_INT4_N_MULTIPLE}, as torch's int4 "
                             "packing requires")
        g_idx = q.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        groups = g_idx[perm]
        if torch.equal(perm, torch.arange(k)):
            perm = None
        block = next((b for b in CPU_INT4_GROUPS if k % b == 0 and _constant_blocks(groups, b)), None)
        if block is None:
            raise ValueError(f"the {k} input columns, sorted by group, do not split into blocks of "
                             f"{CPU_INT4_GROUPS[-1]} or more that share one group")
        codes, zeros = q.codes.to(torch.int32), q.zeros.to(torch.int32)
        block_groups = groups.view(-1, block)[:, 0]
        scale = q.scales.to(torch.float32)[block_groups]
        if q.bits < 4:
            # code - zero lies in -7..7, so the nibble can hold it offset by 8: the zero term is then exactly 0,
            # and only the scale is rounded to bfloat16.
            codes = codes - zeros[g_idx].t() + _INT4_MIDPOINT
            zero_term = torch.zeros_like(scale)
        else:
            zero_term = scale * (_INT4_MIDPOINT - zeros[block_groups].to(torch.float32))
        codes = codes if perm is None else codes[:, perm]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        scales_and_zeros = torch.stack([scale, zero_term], dim=-1).to(torch.bfloat16).contiguous()
        return cls(packed, scales_and_zeros, block, perm)

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ Wᵀ`` for ``x`` [M, K] on CPU, computed in bfloat16 (see the module docstring), in ``x``'s dtype."""
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        xb = x.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.block, self.scales_and_zeros)
        return y.to(x.dtype)


def _constant_blocks(groups: Tensor, block: int) -> bool:
    """Whether every run of ``block`` consecutive entries of ``groups`` holds a single group."""
    runs = groups.view(-1, block)
    return bool((runs == runs[:, :1]).all())


# ----------------------------------------------------------------------------------------------------- torch

def _fits_in_cache(nbytes: int, device: torch.device) -> bool:
    """Whether a cached weight of ``nbytes`` stays within ``_CACHE_FRACTION`` of the memory free on ``device``."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = psutil.virtual_memory().available
    else:
        return False
    return nbytes <= _CACHE_FRACTION * free


# -------------------------------------------------------------------------------------------------- the layer

class _GPTQMatmul(torch.autograd.Function):
    """``x @ Wᵀ`` through the layer's backend, with ``grad_x = grad_y @ W`` from the dequantized weight.

    The packed weight gets no gradient (it is integer data); adapters on top of the layer train as usual.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: GPTQLinear) -> Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        weight = ctx.layer.dequantized_weight(grad_y.dtype, grad_y.device)
        return grad_y @ weight, None


class GPTQLinear(torch.nn.Module):
    """A linear layer stored in the GPTQ layout, run by the fastest backend its device allows.

    The buffers carry the layout's own names (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``), so a
    state dict from a GPTQ checkpoint loads into it. The backend is chosen at the first ``forward`` or by
    ``prepare()``, and again after the module moves (``.to``) or loads new tensors.

    Args:
        in_features, out_features: the layer's shape (W is [out_features, in_features]).
        bits: 2, 3, 4 or 8.
        group_size: input columns per group, -1 for one group per row.
        bias: whether the layer has a bias.
        backend: force one of ``BACKENDS`` instead of ``choose_backend``'s pick.
        cache_weight: for the ``"torch"`` backend: keep the dequantized weight (True), rebuild it at each call
            (False), or keep it when it fits in a quarter of the free memory (None).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False, *,
                 backend: str | None = None, cache_weight: bool | None = None):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
        if in_features * bits % 32 or out_features * bits % 32:
            raise ValueError(f"a [{out_features}, {in_features}] layer does not pack into int32 words at {bits} bits")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown GPTQ backend {backend!r}; choose one of {BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.requested_backend, self.cache_weight = backend, cache_weight
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        size = in_features if group_size == -1 else group_size
        self.register_buffer("g_idx", (torch.arange(in_features) // size).to(torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.register_load_state_dict_post_hook(GPTQLinear._after_load)
        self.reset()

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], bits: int, group_size: int, bias: Tensor | None = None,
                     **kwargs) -> GPTQLinear:
        """A layer holding ``tensors`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``pack_gptq``'s output)."""
        qweight = tensors["qweight"]
        layer = cls(qweight.shape[0] * 32 // bits, qweight.shape[1], bits, group_size, bias is not None, **kwargs)
        layer.qzeros = torch.empty_like(tensors["qzeros"])  # the group count comes from the checkpoint
        layer.scales = torch.empty_like(tensors["scales"])
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if tensors.get(name) is not None:
                getattr(layer, name).copy_(tensors[name])
        if bias is not None:
            layer.bias = bias.detach().clone()
        layer.to(qweight.device)
        return layer

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: Tensor | None = None, **kwargs) -> GPTQLinear:
        """A layer holding ``q`` packed by ``pack_gptq``."""
        return cls.from_tensors(pack_gptq(q), q.bits, q.group_size, bias, **kwargs)

    def tensors(self) -> dict[str, Tensor]:
        """The packed tensors, keyed as in the checkpoint (without the bias)."""
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def reset(self) -> None:
        """Forget the backend and everything derived from the buffers (called when they move or change)."""
        self.backend: BackendChoice | None = None
        self._cpu_int4: CpuInt4Weight | None = None
        self._cached_weight: Tensor | None = None

    @staticmethod
    def _after_load(module: GPTQLinear, incompatible_keys) -> None:
        module.reset()  # the buffers were overwritten in place (a named function, so the module still pickles)

    def _apply(self, fn, *args, **kwargs):
        self.reset()  # .to(), .cuda(), .half(): derived tensors belong to the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    @property
    def act_order(self) -> bool:
        """Whether ``g_idx`` is not monotone (an act-order checkpoint without static groups)."""
        return bool((self.g_idx[1:] < self.g_idx[:-1]).any())

    def prepare(self) -> BackendChoice:
        """Choose the backend for the buffers' device and build what it needs (the CPU repack). Returns the choice."""
        choice = choose_backend(self.qweight.device, self.bits, self.group_size, self.act_order,
                                requested=self.requested_backend)
        if choice == "cpu_int4":
            try:
                self._cpu_int4 = CpuInt4Weight.from_quantized(unpack_gptq(self.tensors(), self.bits, self.group_size))
            except ValueError as exc:
                if self.requested_backend == "cpu_int4":
                    raise
                choice = BackendChoice("torch", f"torch's CPU int4 matmul cannot hold this layer: {exc}")
        self.backend = choice
        return choice

    def dequantized_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """W [out, in] in ``dtype``: the cached copy where the ``"torch"`` backend keeps one, else built now."""
        cached = self._cached_weight
        if cached is not None and cached.dtype == dtype and cached.device == device:
            return cached
        weight = dequantize_gptq(self.tensors(), self.bits).to(device=device, dtype=dtype)
        if self.backend == "torch":
            keep = self.cache_weight
            if keep is None:
                keep = _fits_in_cache(weight.numel() * weight.element_size(), weight.device)
            self._cached_weight = weight if keep else None
        return weight

    def _matmul(self, x: Tensor) -> Tensor:
        """``x @ Wᵀ + bias`` for ``x`` [M, K], no autograd."""
        if self.backend is None:
            self.prepare()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend == "triton":
            return triton_gptq_matmul(x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, bias)
        if self.backend == "cpu_int4":
            y = self._cpu_int4.matmul(x)
            return y if bias is None else y + bias
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype, x.device), bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = _GPTQMatmul.apply(x.reshape(-1, self.in_features), self)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        backend = "not chosen yet" if self.backend is None else f"{self.backend} ({self.backend.reason})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={backend}")
