"""Quantization quality (P4, first part): GPTQ against RTN on the same grid, in one run, on the real stories260K.

Protocol (issue 15's P4 (a)): ../shared/models/stories260K/hf in fp32; calibration on the first 128 stories of
../shared/data/tinystories/valid_sample.jsonl (one sample of the first --seqlen tokens per story), evaluation on
the other 250 (utils.evaluation.perplexity, the eval stage's function, 512-token windows). Quantized: the layers
the GPTQ layout can pack on this model (the attention projections; the 172-wide MLP stays in floating point, as
quantize.py keeps it), asymmetric min-max grid, group size 32, at 4 and 3 bits. Each configuration is quantized
from a fresh copy of the model:
  rtn          round to nearest on the grid (GPTQ's ablation: no error feedback)
  gptq         GPTQ, columns in order
  gptq_act     GPTQ with act-order (desc_act)
  gptq_static  GPTQ with act-order and static groups
Figures: the held-out perplexity of each, its increase over the fp32 model (ΔPPL) and the ratio of GPTQ's ΔPPL
to RTN's (target ≤ 0.5 with act-order). Not yet here: P4 (b) (a small Llama trained by the bench), P4b
(llmcompressor in its own venv) and P5 (kernel speed: bench/quant_kernels.py).

Run: .venv/bin/python bench/quantize.py [--seqlen 256]      (about a minute on 2 cores)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

STORIES = SHARED / "models" / "stories260K" / "hf"
TEXT = SHARED / "data" / "tinystories" / "valid_sample.jsonl"
CONFIGS = {"rtn": dict(method="rtn"), "gptq": dict(), "gptq_act": dict(act_order=True),
           "gptq_static": dict(act_order=True, static_groups=True)}


def main(seqlen: int = 256, group_size: int = 32) -> None:
    """Run the benchmark.

    Args:
        seqlen: Calibration tokens per story.
        group_size: Input columns per scale / zero point.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.evaluation.perplexity import perplexity
    from utils.quant.calibrate import quantize_model
    from utils.quant.gptq import GPTQSettings
    from utils.quant.packing import packable

    stories = [json.loads(line)["text"] for line in TEXT.read_text(encoding="utf-8").splitlines()]
    calib, held_out = stories[:128], stories[128:]
    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    samples = [torch.tensor(tok(t)["input_ids"][:seqlen]) for t in calib]

    def fresh():
        return AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()

    base = perplexity(fresh(), tok, held_out, progress=False)["ppl"]
    results: dict = {"ppl_fp32": base}
    for bits in (4, 3):
        for name, extra in CONFIGS.items():
            model = fresh()
            method = extra.get("method", "gptq")
            settings = GPTQSettings(bits=bits, group_size=group_size,
                                    **{k: v for k, v in extra.items() if k != "method"})
            started = time.perf_counter()
            done = quantize_model(model, samples, settings, method=method, progress=False,
                                  keep=lambda n, m: packable(m.in_features, m.out_features, bits))
            took = time.perf_counter() - started
            ppl = perplexity(model, tok, held_out, progress=False)["ppl"]
            results[f"{name}_{bits}bit"] = {"ppl": ppl, "dppl": ppl - base, "seconds": round(took, 2),
                                            "layers": len(done.layers)}
            print(f"{bits}-bit {name}: ppl {ppl:.4f} (delta {ppl - base:+.4f}), {len(done.layers)} layers, "
                  f"{took:.1f}s", file=sys.stderr)
    r = results
    summary = {
        "ppl_fp32_stories260k": base,
        "dppl_rtn_4bit_stories260k": r["rtn_4bit"]["dppl"],
        "dppl_gptq_4bit_stories260k": r["gptq_act_4bit"]["dppl"],
        "gptq_vs_rtn_dppl_ratio_stories260k": r["gptq_act_4bit"]["dppl"] / r["rtn_4bit"]["dppl"],
        "gptq_in_order_vs_rtn_dppl_ratio_stories260k": r["gptq_4bit"]["dppl"] / r["rtn_4bit"]["dppl"],
        "gptq_static_vs_rtn_dppl_ratio_stories260k": r["gptq_static_4bit"]["dppl"] / r["rtn_4bit"]["dppl"],
        "dppl_rtn_3bit_stories260k": r["rtn_3bit"]["dppl"],
        "dppl_gptq_3bit_stories260k": r["gptq_act_3bit"]["dppl"],
        "gptq_vs_rtn_dppl_ratio_stories260k_3bit": r["gptq_act_3bit"]["dppl"] / r["rtn_3bit"]["dppl"],
        "group_size": group_size, "calibration_samples": len(samples), "seqlen": seqlen,
        "eval_stories": len(held_out), "layers_quantized": r["gptq_4bit"]["layers"],
    }
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    from utils.cli import run

    run(main)
