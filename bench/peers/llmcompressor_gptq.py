"""The peer side of bench/quantize.py's P4b: llmcompressor's GPTQ on the samples the bench gives, run in the peer's
own virtual environment (bench/peers/llmcompressor-venv, made by `make bench-peers`), never in the suite's.

Input: a JSON file from the bench with the model folder, the calibration samples as token ids (the bench cut them,
so both sides calibrate on the very same tokens), the layers to quantize (a regular expression over module names),
the grid (bits, group size, asymmetric, static act-order), torch's thread count and how many times to quantize
(each time on a fresh copy of the model; the fastest counts, as on the bench's side). The quantization is
llmcompressor's ``oneshot`` with a ``GPTQModifier`` whose scheme is built by hand: its W4A16 preset uses group
128, which stories260K's 64-wide attention layers cannot take.

Output, in --output_dir: the model in plain Hugging Face form with the fake-quantized weights (each quantized
layer's weight is its dequantized 4-bit codes, checked here to lie on the grid llmcompressor fitted) under the
original parameter names, the source folder's config and tokenizer files beside them, so that the bench scores
it with its own perplexity function in its own environment; and ``peer_report.json``: the seconds of the
``oneshot`` call alone, the fastest of the repeats (the calibration forward passes, the Hessians, GPTQ and
freezing the scheme; not imports, loading or saving), torch's thread count, the library versions, the layers
quantized and the largest distance of a quantized weight from its grid point, in units of its group's scale.

Usage (the bench runs it): bench/peers/llmcompressor-venv/bin/python bench/peers/llmcompressor_gptq.py \
    --spec SPEC.json --output_dir DIR
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "tokenizer.model", "special_tokens_map.json")


def scheme(spec: dict):
    """The QuantizationScheme of the spec: integer weights, grouped along the input columns, no activations."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=spec["bits"], type="int", symmetric=spec["sym"], strategy="group",
                               group_size=spec["group_size"], actorder=spec["actorder"])
    return QuantizationScheme(targets=[f"re:{spec['modules']}"], weights=weights)


def grid_distance(module, group_size: int, bits: int) -> float:
    """The largest |W / scale + zero − round(…)| of a quantized layer, codes outside the signed range
    [−2^(bits−1), 2^(bits−1) − 1] (compressed-tensors' "int" type) counted by their distance from it: 0 (up to
    float rounding) when every weight is a grid point."""
    import torch

    w = module.weight.detach().float()
    columns = torch.arange(w.shape[1])
    g_idx = getattr(module, "weight_g_idx", None)
    # Static act-order keeps the groups in column order; group act-order maps column k to group g_idx[k].
    group = g_idx.long() if g_idx is not None and int(g_idx.min()) >= 0 else columns // group_size
    scale = module.weight_scale.detach().float()[:, group]
    zero = module.weight_zero_point.detach().float()[:, group]
    codes = w / scale + zero
    off_grid = (codes - codes.round()).abs().max()
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out_of_range = torch.clamp(low - codes, min=0).max().maximum(torch.clamp(codes - high, min=0).max())
    return float(off_grid.maximum(out_of_range))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the bench's JSON: model, samples, modules, grid")
    parser.add_argument("--output_dir", required=True, help="where the fake-quantized model goes")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))

    import compressed_tensors
    import llmcompressor
    import safetensors.torch
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    source = Path(spec["model"])
    samples = spec["samples"]
    data = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    times = []
    for _ in range(spec.get("repeats", 1)):  # each on a fresh copy of the model; the fastest is the figure
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
        names = set(model.state_dict())
        recipe = GPTQModifier(config_groups={"group_0": scheme(spec)}, ignore=["lm_head"],
                              dampening_frac=spec["damp_percent"], block_size=128)
        started = time.perf_counter()
        oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(samples),
                max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False, batch_size=1)
        times.append(time.perf_counter() - started)

    pattern = re.compile(spec["modules"])
    quantized = {n: m for n, m in model.named_modules() if pattern.fullmatch(n) and hasattr(m, "weight_scale")}
    if not quantized:
        raise SystemExit(f"llmcompressor_gptq: no layer matching {spec['modules']!r} was quantized")
    distance = max(grid_distance(m, spec["group_size"], spec["bits"]) for m in quantized.values())
    # Only the original parameters: llmcompressor's scales, zero points and observers stay behind, the
    # quantized layers' weights are already their dequantized values.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in names}
    if set(state) != names:
        raise SystemExit(f"llmcompressor_gptq: parameters lost after oneshot: {sorted(names - set(state))[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # stored once, as the source folder does
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in COMPANIONS:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    report = {"seconds": round(min(times), 2), "seconds_each": [round(t, 2) for t in times],
              "threads": torch.get_num_threads(), "layers": sorted(quantized),
              "max_grid_distance": distance, "samples": len(samples),
              "tokens": sum(len(s) for s in samples),
              "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__,
                           "compressed_tensors": compressed_tensors.__version__}}
    (out / "peer_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"llmcompressor_gptq: {len(quantized)} layers, oneshot {min(times):.1f}s at best of {len(times)}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
