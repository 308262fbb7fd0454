"""Benchmark P5: the GPTQ-layout int4 matmul (utils/quant/kernels.py) against the floating-point matmul it replaces.

One 4096 x 4096 linear layer, quantized by RTN at 4 bits, group 128, packed in the GPTQ layout; x is [M, 4096].

    CPU   ours: GPTQLinear on its automatic CPU backend (torch's int4 kernel after a one-time repack); also with
          the groups shuffled over the input columns as act-order leaves them (x's columns permuted per call)
          reference: float32 ``x @ W.T`` with the unquantized weight; also the naive way, dequantizing the packed
          weight at every call and then multiplying (what a plain fallback without a cache does)
    GPU   ours: GPTQLinear on the triton backend, float16 x (only when CUDA is available)
          reference: float16 ``torch.matmul(x, W.T)``

Timings interleave ours and the reference call by call and keep each one's median, so load from other processes
hits both alike. The CPU int4 kernel splits its work across torch's intra-op threads and suffers most when another
process holds a core, so the CPU figures are also given with one thread, along with the load average.
Ratios are reference time / our time (higher is better for us). Each output is also checked against the
dequantize-then-matmul reference (relative error of the largest entry).

The last line is ``RESULT {json}``.

Usage: .venv/bin/python bench/quant_kernels.py [--reps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.quant.grid import QuantizedWeight, rtn  # noqa: E402
from utils.quant.kernels import GPTQLinear  # noqa: E402
from utils.quant.packing import dequantize_gptq, pack_gptq, unpack_gptq  # noqa: E402

SIZE, GROUP, BITS = 4096, 128, 4


def interleaved(ours, reference, reps: int, sync=lambda: None) -> tuple[float, float]:
    """Median seconds of ``ours()`` and of ``reference()``, called alternately ``reps`` times after a warm-up."""
    for _ in range(3):
        ours(), reference()
    sync()
    times = {ours: [], reference: []}
    for _ in range(reps):
        for fn in (ours, reference):
            start = time.perf_counter()
            fn()
            sync()
            times[fn].append(time.perf_counter() - start)
    return statistics.median(times[ours]), statistics.median(times[reference])


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def shuffled_groups(tensors: dict) -> QuantizedWeight:
    """The same codes with the groups spread over the input columns as act-order (desc_act) leaves them."""
    q = unpack_gptq(tensors, BITS, GROUP)
    perm = torch.randperm(SIZE, generator=torch.Generator().manual_seed(1))
    q.g_idx = q.g_idx[perm].contiguous()
    return q


def cpu_figures(layer: GPTQLinear, weight: torch.Tensor, dequantized: torch.Tensor, tensors: dict,
                reps: int) -> dict:
    out = {"cpu_backend": f"{layer.backend} ({layer.backend.reason})", "cpu_threads": torch.get_num_threads(),
           "cpu_loadavg_1min": os.getloadavg()[0]}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (1, 16):
            x = torch.randn(m, SIZE, generator=gen)
            ours, ref = interleaved(lambda: layer(x), lambda: x @ weight.t(), reps)
            out[f"int4_vs_fp32_cpu_m{m}"] = round(ref / ours, 3)
            out[f"cpu_ms_m{m}"] = {"ours": round(ours * 1e3, 3), "fp32": round(ref * 1e3, 3)}
            out[f"cpu_rel_err_m{m}"] = rel_err(layer(x), x @ dequantized.t())
        x = torch.randn(1, SIZE, generator=gen)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ours, ref = interleaved(lambda: layer(x), lambda: x @ weight.t(), reps)
        finally:
            torch.set_num_threads(threads)
        out["int4_vs_fp32_cpu_m1_1thread"] = round(ref / ours, 3)
        act_order = GPTQLinear.from_quantized(shuffled_groups(tensors))
        ours, ref = interleaved(lambda: act_order(x), lambda: x @ weight.t(), reps)
        out["int4_act_order_vs_fp32_cpu_m1"] = round(ref / ours, 3)
        naive, ref = interleaved(lambda: x @ dequantize_gptq(tensors, BITS).t(), lambda: x @ weight.t(), 3)
        out["naive_dequant_vs_fp32_cpu_m1"] = round(ref / naive, 4)
    return out


def gpu_figures(tensors: dict, weight: torch.Tensor, dequantized: torch.Tensor, reps: int) -> dict:
    layer = GPTQLinear.from_tensors(tensors, BITS, GROUP).to("cuda")
    w16 = weight.to("cuda", torch.float16)
    ref_w = dequantized.to("cuda", torch.float16)
    out = {"gpu": torch.cuda.get_device_name()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (1, 16):
            x = torch.randn(m, SIZE, generator=gen).to("cuda", torch.float16)
            ours, ref = interleaved(lambda: layer(x), lambda: torch.matmul(x, w16.t()), reps, torch.cuda.synchronize)
            out[f"int4_vs_fp16_gpu_m{m}"] = round(ref / ours, 3)
            out[f"gpu_us_m{m}"] = {"ours": round(ours * 1e6, 1), "fp16": round(ref * 1e6, 1)}
            out[f"gpu_rel_err_m{m}"] = rel_err(layer(x), torch.matmul(x, ref_w.t()))
    out["gpu_backend"] = f"{layer.backend} ({layer.backend.reason})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50, help="timed calls of each side per figure")
    args = parser.parse_args()
    weight = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 0.02
    start = time.perf_counter()
    tensors = pack_gptq(rtn(weight, BITS, GROUP))
    quantize_s = time.perf_counter() - start
    dequantized = dequantize_gptq(tensors, BITS)
    layer = GPTQLinear.from_tensors(tensors, BITS, GROUP)
    start = time.perf_counter()
    layer.prepare()
    result = {"shape": f"M x {SIZE} @ {SIZE} x {SIZE}", "bits": BITS, "group_size": GROUP,
              "rtn_and_pack_s": round(quantize_s, 2), "cpu_repack_s": round(time.perf_counter() - start, 3)}
    result.update(cpu_figures(layer, weight, dequantized, tensors, args.reps))
    if torch.cuda.is_available():
        result.update(gpu_figures(tensors, weight, dequantized, args.reps))
    else:
        result["gpu"] = "skipped: no CUDA device"
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
