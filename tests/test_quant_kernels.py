"""utils/quant/kernels.py: every backend against the plain reference ``dequantize_gptq(...)`` then matmul.

The triton kernel runs on CPU under ``TRITON_INTERPRET=1`` in a subprocess (triton reads the variable when a kernel
is jitted, and the rest of the suite may import triton without it), and in-process on a GPU when one is present.
Tolerances are forward-error bounds, ``c * (|x| @ |W|ᵀ + |bias|)`` with ``c`` a few units in the last place of the
arithmetic each backend uses (float32, or float16 / bfloat16 operands with float32 sums), so a wrong code, zero
point, group or column order (errors the size of the output itself) fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.quant import kernels
from utils.quant.grid import QuantizedWeight
from utils.quant.kernels import GPTQLinear, choose_backend
from utils.quant.packing import dequantize_gptq, pack_gptq

REPO = Path(__file__).resolve().parent.parent

# Relative error per term of each arithmetic: float32 products and sums; float16 / bfloat16 operands (the weight
# rounded to the input's dtype, the output rounded once) summed in float32. A few ulps: 2^-20, 2^-9, 2^-6.
TOL = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}
# The CPU int4 path computes in bfloat16 whatever the input dtype (activations, scales and its output rounded).
CPU_INT4_TOL = 2.0 ** -7


def random_layer(out_features: int, in_features: int, bits: int, group_size: int, act_order: bool,
                 seed: int = 0) -> QuantizedWeight:
    """Codes and zero points over their whole range (0 included: the v1 wrap), scales in [0.01, 0.11]; with
    ``act_order`` the groups are shuffled across the input columns as GPTQ's desc_act leaves them."""
    gen = torch.Generator().manual_seed(seed)
    top = 2 ** bits - 1
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    g_idx = (torch.arange(in_features) // size).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)].contiguous()
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen, dtype=torch.int32)
    return QuantizedWeight(codes=codes, scales=torch.rand(groups, out_features, generator=gen) * 0.1 + 0.01,
                           zeros=torch.randint(0, top + 1, (groups, out_features), generator=gen, dtype=torch.int32),
                           g_idx=g_idx, bits=bits, group_size=group_size)


def error_ratio(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                tol: float) -> float:
    """max |y - ref| / (tol * (|x| @ |W|ᵀ + |bias|)) with the reference in float64; <= 1 passes."""
    x64, w64 = x.double(), weight.double()
    ref = x64 @ w64.t()
    scale = x64.abs() @ w64.abs().t()
    if bias is not None:
        ref, scale = ref + bias.double(), scale + bias.double().abs()
    return ((y.double() - ref).abs() / (tol * scale + 1e-30)).max().item()


def triton_errors(device: str) -> list[dict]:
    """The triton kernel (and GPTQLinear on it, backward included) on ``device``, case by case: ``ratio`` as in
    ``error_ratio``. Shapes are small because the CPU interpreter is slow, and odd (K = 96, N = 40 or 48, M up to
    80) so every mask and all three block configurations are exercised."""
    results = []
    cases = [(bits, m, group_size, act_order, with_bias)
             for bits in (2, 4, 8)
             for m, group_size, act_order, with_bias in ((1, 32, False, True), (3, -1, False, False),
                                                         (17, 32, True, True))]
    cases.append((4, 80, 32, True, True))
    for bits, m, group_size, act_order, with_bias in cases:
        n = 40 if bits > 2 else 48  # 2-bit qzeros pack 16 outputs per word
        tensors = pack_gptq(random_layer(n, 96, bits, group_size, act_order, seed=m + bits))
        weight = dequantize_gptq(tensors, bits)
        tensors = {name: t.to(device) for name, t in tensors.items()}
        gen = torch.Generator().manual_seed(m)
        bias = torch.randn(n, generator=gen) if with_bias else None
        dtypes = (torch.float32, torch.float16, torch.bfloat16) if m == 17 else (torch.float32,)
        for dtype in dtypes:
            x = torch.randn(m, 96, generator=gen).to(dtype)
            y = kernels.triton_gptq_matmul(x.to(device), tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                           tensors["g_idx"], bits, None if bias is None else bias.to(device, dtype))
            # What the kernel computes: the weight (and bias) rounded to x's dtype, float32 sums.
            w_in = weight.to(dtype).float()
            b_in = None if bias is None else bias.to(dtype).float()
            results.append({"case": f"kernel bits={bits} M={m} group={group_size} act_order={act_order} "
                                    f"bias={with_bias} {dtype}", "dtype": str(dtype),
                            "ratio": error_ratio(y.cpu(), x.float(), w_in, b_in, TOL[dtype])})
    # The module on this backend: leading dimensions, bias, and grad of the input.
    tensors = pack_gptq(random_layer(40, 96, 4, 32, True, seed=7))
    weight = dequantize_gptq(tensors, 4)
    bias = torch.randn(40)
    layer = GPTQLinear.from_tensors(tensors, 4, 32, bias, backend="triton").to(device)
    x = torch.randn(2, 5, 96, device=device, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    results.append({"case": "GPTQLinear forward", "backend": str(layer.backend),
                    "ratio": error_ratio(y.detach().reshape(10, 40).cpu(), x.detach().reshape(10, 96).cpu(), weight,
                                         bias, TOL[torch.float32])})
    results.append({"case": "GPTQLinear grad_x", "ratio": error_ratio(
        x.grad.reshape(10, 96).cpu(), grad_y.reshape(10, 40).cpu(), weight.t(), None, TOL[torch.float32])})
    return results


def _run_python(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def test_triton_kernel_interpreted_matches_reference():
    """The triton kernel on CPU through triton's interpreter: bits 2/4/8, M in {1, 3, 17, 80}, K = 96, N = 40/48,
    group 32 and -1, act-order g_idx, bias, float32/float16/bfloat16; and GPTQLinear's forward and backward on it.
    About 5 s, mostly the subprocess importing torch and triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = ("import json, sys; sys.path[:0] = ['tests', '.']; import test_quant_kernels as t; "
            "print(json.dumps(t.triton_errors('cpu')))")
    results = json.loads(_run_python(code, env))
    assert len(results) == 18  # 10 kernel cases (3 of them in three dtypes) and 2 module checks
    assert results[-2]["backend"] == "triton"
    bad = [r for r in results if not r["ratio"] <= 1]
    assert not bad, bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_gpu_matches_reference():
    """The same cases compiled for the GPU (run where one is lent)."""
    assert choose_backend("cuda", 4, 128) == "triton"
    bad = [r for r in triton_errors("cuda") if not r["ratio"] <= 1]
    assert not bad, bad


@pytest.mark.parametrize("bits,group_size,act_order", [
    (4, 32, False), (4, 128, True), (4, -1, False), (4, 512, False), (3, 64, True), (2, 32, True), (2, -1, False),
])
def test_cpu_int4_path_matches_reference(bits, group_size, act_order):
    """torch's CPU int4 kernel after the repack: act-order columns permuted, group -1 and 512 expressed as blocks
    of the kernel's sizes, 2/3-bit codes in a nibble; leading dimensions and bias."""
    out_features, in_features = 96, 1024  # multiples of 16 (the int4 packing) and of 32 (3-bit qzeros)
    tensors = pack_gptq(random_layer(out_features, in_features, bits, group_size, act_order))
    bias = torch.randn(out_features)
    layer = GPTQLinear.from_tensors(tensors, bits, group_size, bias)
    assert layer.prepare() == "cpu_int4", layer.backend.reason
    assert (layer._cpu_int4.perm is not None) == act_order
    x = torch.randn(2, 3, in_features)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (2, 3, out_features) and y.dtype == torch.float32
    ratio = error_ratio(y.reshape(6, -1), x.reshape(6, -1), dequantize_gptq(tensors, bits), bias, CPU_INT4_TOL)
    assert ratio <= 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_torch_fallback_matches_reference(bits):
    """The dequantize-then-matmul backend at every bit width, act-order, float32-exact up to summation order."""
    tensors = pack_gptq(random_layer(64, 96, bits, 32, True, seed=bits))
    bias = torch.randn(64)
    layer = GPTQLinear.from_tensors(tensors, bits, 32, bias, backend="torch")
    x = torch.randn(5, 96)
    ratio = error_ratio(layer(x).detach(), x, dequantize_gptq(tensors, bits), bias, TOL[torch.float32])
    assert layer.backend == "torch" and ratio <= 1


@pytest.mark.parametrize("out_features,in_features,bits,group_size,why", [
    (64, 96, 8, 32, "do not fit torch's CPU int4 format"),
    (64, 96, 4, 16, "not a multiple of 32"),
    (40, 96, 4, 32, "out_features = 40 is not a multiple of 16"),
    (64, 104, 4, -1, "do not split into blocks"),
])
def test_cpu_falls_back_to_torch_with_the_reason(out_features, in_features, bits, group_size, why):
    """Layers the CPU int4 kernel cannot hold run on the torch backend, which says why, with the same result."""
    tensors = pack_gptq(random_layer(out_features, in_features, bits, group_size, False))
    layer = GPTQLinear.from_tensors(tensors, bits, group_size)
    x = torch.randn(3, in_features)
    y = layer(x).detach()
    assert layer.backend == "torch" and why in layer.backend.reason
    assert error_ratio(y, x, dequantize_gptq(tensors, bits), None, TOL[torch.float32]) <= 1


def test_choose_backend_rules(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_backend("cpu", 4, 128) == "cpu_int4"
    assert choose_backend("cpu", 4, 128, act_order=True) == "cpu_int4"
    assert "permuted" in choose_backend("cpu", 4, 128, act_order=True).reason
    assert choose_backend("cpu", 8, 128) == "torch"
    for bits in (2, 3, 4, 8):
        assert choose_backend("cpu", bits, 32) != "triton"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        choose_backend("cpu", 4, 128, requested="triton")
    with pytest.raises(ValueError, match="cpu_int4"):
        choose_backend("cpu", 8, 128, requested="cpu_int4")
    assert choose_backend("cuda", 3, 128) == "torch"
    assert choose_backend("meta", 4, 128) == "torch"
    monkeypatch.setattr(kernels, "_triton_import", (None, "ImportError: no triton"))
    choice = choose_backend("cuda", 4, 128)
    assert choice == "torch" and "no triton" in choice.reason


def test_cpu_never_imports_triton():
    """A CPU process without TRITON_INTERPRET builds, runs and trains through GPTQLinear without importing triton,
    so it can never reach triton's '0 active drivers' error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, sys, torch; sys.path.insert(0, '.')\n"
        "from utils.quant.grid import rtn\n"
        "from utils.quant.kernels import GPTQLinear\n"
        "names = []\n"
        "for bits in (2, 3, 4, 8):\n"
        "    layer = GPTQLinear.from_quantized(rtn(torch.randn(64, 128), bits, 32))\n"
        "    x = torch.randn(3, 128, requires_grad=True)\n"
        "    layer(x).sum().backward()\n"
        "    names.append(str(layer.backend))\n"
        "print(json.dumps([names, 'triton' in sys.modules]))\n")
    names, imported = json.loads(_run_python(code, env))
    assert names == ["cpu_int4", "cpu_int4", "cpu_int4", "torch"]
    assert imported is False


@pytest.mark.parametrize("backend", ["cpu_int4", "torch"])
def test_backward_matches_float_linear(backend):
    """grad of x (and of an upstream tensor) through GPTQLinear equals that through nn.Linear with the dequantized
    weight; the packed weight gets no gradient."""
    tensors = pack_gptq(random_layer(64, 128, 4, 32, True))
    bias = torch.randn(64)
    layer = GPTQLinear.from_tensors(tensors, 4, 32, bias, backend=backend)
    reference = torch.nn.Linear(128, 64)
    with torch.no_grad():
        reference.weight.copy_(dequantize_gptq(tensors, 4))
        reference.bias.copy_(bias)
    x = torch.randn(2, 3, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_y = torch.randn(2, 3, 64)
    layer(x).backward(grad_y)
    reference(x_ref).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in layer.buffers())
    assert not list(layer.parameters())


def test_lora_step_on_a_frozen_gptq_base_reduces_the_loss():
    """A LoRA-style adapter (down/up projections, up initialised at zero) on a frozen 4-bit GPTQLinear learns a
    rank-4 correction the base alone misses; the packed weight is untouched. Plain gradient steps (building a
    torch.optim optimizer first costs seconds of lazy imports)."""
    gen = torch.Generator().manual_seed(0)
    base = GPTQLinear.from_quantized(random_layer(64, 128, 4, 32, True))
    qweight = base.qweight.clone()
    down = (torch.randn(128, 8, generator=gen) * 0.1).requires_grad_()
    up = torch.zeros(8, 64, requires_grad=True)
    x = torch.randn(32, 128, generator=gen)
    with torch.no_grad():
        target = base(x) + x @ torch.randn(128, 4, generator=gen) @ torch.randn(4, 64, generator=gen) * 0.1
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(base(x) + x @ down @ up, target)
        loss.backward()
        with torch.no_grad():
            for p in (down, up):
                p -= 0.5 * p.grad
                p.grad = None
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(base.qweight, qweight)


def test_state_dict_and_moves_reset_the_backend():
    """Loading other tensors (or moving the module) drops what was derived from the old ones."""
    first = pack_gptq(random_layer(64, 128, 4, 32, False, seed=1))
    second = pack_gptq(random_layer(64, 128, 4, 32, False, seed=2))
    layer = GPTQLinear.from_tensors(first, 4, 32)
    x = torch.randn(2, 128)
    layer(x)
    assert layer.backend == "cpu_int4"
    layer.load_state_dict(second)
    assert layer.backend is None
    y = layer(x).detach()
    assert error_ratio(y, x, dequantize_gptq(second, 4), None, CPU_INT4_TOL) <= 1
    layer.to("cpu")
    assert layer.backend is None


@pytest.mark.parametrize("cache_weight", [True, False])
def test_torch_backend_weight_cache(cache_weight):
    layer = GPTQLinear.from_tensors(pack_gptq(random_layer(64, 96, 8, 32, False)), 8, 32, cache_weight=cache_weight)
    layer(torch.randn(1, 96))
    assert (layer._cached_weight is not None) == cache_weight
