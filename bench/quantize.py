"""Quantization quality (P4, P4b): GPTQ against RTN on the same grid, in one run, on two models with real weights;
and against llmcompressor, the GPTQ a user would pick instead.

P4 (a), stories260K: ../shared/models/stories260K/hf in fp32; calibration on the first 128 stories of
../shared/data/tinystories/valid_sample.jsonl (one sample of the first --seqlen tokens per story), evaluation on
the other 250 (utils.evaluation.perplexity, the eval stage's function: the stories joined, windows of the model's
context). Quantized: the layers the GPTQ layout can pack on this model (the attention projections; the 172-wide
MLP stays in floating point, as quantize.py keeps it), asymmetric min-max grid, group size 32, at 4 and 3 bits.
Each configuration is quantized from a fresh copy of the model with ``utils.quant.calibrate.quantize_model`` (the
function quantize.py streams the model through; true-sequential, its default):
  rtn          round to nearest on the grid (GPTQ's ablation: no error feedback)
  gptq         GPTQ, columns in order
  gptq_act     GPTQ with act-order (desc_act)
  gptq_static  GPTQ with act-order and static groups

P4 (b), a small trained Llama: the bench builds a Llama of 5.4M parameters from a config (hidden 256, MLP 768,
6 layers of 4 heads, 256 positions, untied embeddings; every dimension a multiple of 128, so group 128 applies and
every linear layer packs) with stories260K's 512-token vocabulary, and trains it for --train_steps steps (plain
AdamW, batches of 8 x 256 tokens, seed fixed) on GSM8K + GPTeacher-roleplay rows (../shared/data/alpaca, each row
as plain text: instruction, input, output on their own lines; rows joined with blank lines as the evaluator joins
documents). The rows are shuffled once (seeded) and split: 250 held out for evaluation, the next 128 for
calibration (the first --seqlen tokens of each), the rest for training: calibration and evaluation rows are
disjoint and neither was trained on. The trained model is cached in bench/.cache/ under a hash of its settings and
data (a re-run skips training). Then RTN and GPTQ with act-order, every linear layer of the blocks, at group 128
and per row (-1), at 4 and 3 bits. Its perplexity moves little under quantization (4-bit RTN costs ~0.05% of
it, against ~3.5% on stories260K), and after 400 steps the model is far from converged: the held-out loss still
has a gradient, so a weight error changes it to first order, by an amount of either sign, before the second-order
damage quantization does. Its 4-bit ΔPPL are then a few thousandths of either sign (models trained with the same
seed at other thread counts gave g128 ratios of 0.36 to 0.47 in one session and an RTN g128 ΔPPL of -0.012, a
negative ratio, in another), and their ratio says nothing;
the 3-bit ones are sturdier. So each run also reports the mean KL divergence of the quantized model's next-token
distribution from the float model's on the held-out windows (``kl_*``, ``gptq_vs_rtn_kl_ratio_trained_*``): it
has no first-order term, is never negative, and measures the same damage without the sign noise.

P4b, against llmcompressor 0.14.0.1 (the vLLM project's GPTQ): it needs transformers <= 5.17, so it runs in its
own venv (bench/peers/llmcompressor-venv, made by ``make bench-peers`` from bench/peers/llmcompressor.txt), as a
subprocess running bench/peers/llmcompressor_gptq.py. The same model (stories260K), the same layers (the attention
projections), 4 bits, group 32, asymmetric, static act-order (its default; ours: act-order with static groups,
the same thing), the very same 128 calibration samples (token ids handed over, so both calibrate on the same
tokens), dampening 0.01, GPTQ blocks of 128 columns. It writes the fake-quantized model (its weights dequantized,
checked there to lie on its grid) and we score it with our perplexity function, in our venv, on the same 250
stories: one evaluator for both. Our ΔPPL is P4 (a)'s ``gptq_static`` 4-bit run's. The two tools differ in one
choice each makes by default: ours is true-sequential (o_proj calibrated on the quantized q/k/v's outputs),
llmcompressor calibrates a block's layers on its float inputs; both feed each block the quantized previous blocks'
outputs.
Timed on both sides: the quantization call alone (ours: ``quantize_model``; theirs: ``oneshot``): catching the
calibration inputs, the calibration forward passes, the Hessians, GPTQ and writing the weights back into the
model; not imports, loading, saving or evaluation. Both at the same torch thread count (--threads, for the whole
bench, in the RESULT line; 1 by default: on a shared 2-core machine a second thread mostly waits for a core another
process holds, which made the same call 1.8 s in one run and 36 s in the next), each --repeats times on a fresh
copy of the model (ours before and after theirs), the fastest counting; all times are reported. Without the venv
the peer is reported as skipped, with the reason, and its figures are null.
``dppl_vs_llmcompressor_ratio`` = our ΔPPL / theirs (target <= 1.05); ``time_vs_llmcompressor_ratio`` = our
seconds / theirs (target <= 0.1). ``attention_floor_vs_llmcompressor_ratio`` = the seconds our call spends inside
torch's scaled-dot-product attention (measured in a separate run that times each call) / their seconds: GPTQ has
to run each block's attention at least once over the calibration set (o_proj's inputs come out of it), and with
stories260K's 8-wide heads that attention is most of the work, so this is the lowest ratio any implementation
calling the model's own attention could reach here (ours runs it once per block and batch: calibrate.py).

quantize.py, the stage itself, runs too (``quantize_py_stage``, informational; skipped with the reason if it
fails): the same settings on stories260K, ``--data_path`` a JSONL of the 128 calibration stories and
``--eval_data_path`` one of the 250. Its figures are not the P4b protocol: from a text file it calibrates on 128
slices of --seqlen tokens at seeded random places of the joined stories (not each story's first tokens), and its
``seconds`` cover the whole stage (both perplexities, the writing), so the comparison above uses the in-process
call. P5's CPU figure (``int4_vs_fp32_cpu_m1``, and the GPU ones when CUDA is there) comes from running
bench/quant_kernels.py, whose RESULT line is parsed.

Figures: held-out perplexity of each run, its increase over the float model (ΔPPL) and the ratio of GPTQ's ΔPPL to
RTN's (target <= 0.5 with act-order on every model and group size). The last line is ``RESULT {json}``.

Run: .venv/bin/python bench/quantize.py [--seqlen 256] [--train_steps 400] [--threads 1] [--repeats 2]
     [--peer false] [--stage false] [--kernels false]
     (on 2 loaded cores, one thread: about 8 minutes with the trained model cached, about 8 more to train it)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

STORIES = SHARED / "models" / "stories260K" / "hf"
TEXT = SHARED / "data" / "tinystories" / "valid_sample.jsonl"
ALPACA = (SHARED / "data" / "alpaca" / "gsm8k_train.json", SHARED / "data" / "alpaca" / "gpteacher_roleplay.json")
CACHE = REPO / "bench" / ".cache"
PEER_PYTHON = REPO / "bench" / "peers" / "llmcompressor-venv" / "bin" / "python"
PEER_SCRIPT = REPO / "bench" / "peers" / "llmcompressor_gptq.py"
ATTENTION = r".*self_attn\.(q|k|v|o)_proj"  # the layers that pack on stories260K (the MLP is 172 wide)
CONFIGS = {"rtn": dict(method="rtn"), "gptq": dict(), "gptq_act": dict(act_order=True),
           "gptq_static": dict(act_order=True, static_groups=True)}
TRAINED_CONFIGS = {"rtn": CONFIGS["rtn"], "gptq_act": CONFIGS["gptq_act"]}
CALIBRATION_ROWS, EVAL_ROWS = 128, 250
# The small Llama of P4 (b) and how it is trained: every field goes into the cache key.
TRAINED = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
               batch_size=8, seqlen=256, lr=2e-3, warmup=20, weight_decay=0.1, seed=0)


def log(message: str) -> None:
    print(f"bench/quantize: {message}", file=sys.stderr, flush=True)


def windows(tok, texts: list[str], seqlen: int):
    """The texts joined (blank lines between them, as the evaluator joins documents) and cut into [n, seqlen]
    windows: the P4 (b) model's training stream, and the held-out windows of ``mean_kl``."""
    import torch

    from utils.evaluation.perplexity import encode_documents

    ids = torch.tensor(encode_documents(tok, ["\n\n".join(texts)], add_bos=True)[0])
    return ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)


def log_probs(model, ids, batch: int = 16) -> list:
    """The model's next-token log-probabilities on each batch of windows ``ids``."""
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=ids[i:i + batch]).logits.float(), -1)
                for i in range(0, len(ids), batch)]


def mean_kl(reference: list, model, ids, batch: int = 16) -> float:
    """Mean over held-out tokens of KL(float model || quantized model): how far quantization moved the
    predictions, second order in the weight error wherever the float model sits (ΔPPL also carries a first-order
    term of either sign on a model that is still far from converged, see P4 (b))."""
    total, count = 0.0, 0
    for ref, lp in zip(reference, log_probs(model, ids, batch)):
        total += float((ref.exp() * (ref - lp)).sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


def quantize_and_score(fresh, tok, samples, held_out, bits: int, group_size: int, name: str, extra: dict,
                       base: float, keep, kl_reference: tuple | None = None) -> dict:
    """Quantize a fresh copy of the model with one configuration and score it on the held-out texts (and, with
    ``kl_reference`` = (windows, the float model's log-probabilities on them), its mean KL from the float model)."""
    from utils.evaluation.perplexity import perplexity
    from utils.quant.calibrate import quantize_model
    from utils.quant.gptq import GPTQSettings

    model = fresh()
    method = extra.get("method", "gptq")
    settings = GPTQSettings(bits=bits, group_size=group_size, **{k: v for k, v in extra.items() if k != "method"})
    started = time.perf_counter()
    done = quantize_model(model, samples, settings, method=method, progress=False, keep=keep)
    took = time.perf_counter() - started
    ppl = perplexity(model, tok, held_out, progress=False)["ppl"]
    kl = mean_kl(kl_reference[1], model, kl_reference[0]) if kl_reference else None
    log(f"{bits}-bit g{group_size} {name}: ppl {ppl:.4f} (delta {ppl - base:+.4f}), {len(done.layers)} layers, "
        f"{took:.1f}s" + (f", KL {kl:.2e}" if kl is not None else ""))
    return {"ppl": ppl, "dppl": ppl - base, "kl": kl, "seconds": round(took, 2), "layers": len(done.layers)}


def packable_only(bits: int):
    from utils.quant.packing import packable

    return lambda name, m: packable(m.in_features, m.out_features, bits)


# ---------------------------------------------------------------- P4 (a): stories260K

def stories(seqlen: int, group_size: int) -> tuple[dict, list, list[str]]:
    """P4 (a): every configuration at 4 and 3 bits; returns (results, calibration samples, held-out stories)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.evaluation.perplexity import perplexity

    texts = [json.loads(line)["text"] for line in TEXT.read_text(encoding="utf-8").splitlines()]
    calib, held_out = texts[:CALIBRATION_ROWS], texts[CALIBRATION_ROWS:]
    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    samples = [torch.tensor(tok(t)["input_ids"][:seqlen]) for t in calib]

    def fresh():
        return AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()

    base = perplexity(fresh(), tok, held_out, progress=False)["ppl"]
    results: dict = {"ppl_fp32": base}
    for bits in (4, 3):
        for name, extra in CONFIGS.items():
            results[f"{name}_{bits}bit"] = quantize_and_score(fresh, tok, samples, held_out, bits, group_size,
                                                              name, extra, base, packable_only(bits))
    return results, samples, held_out


# ---------------------------------------------------------------- P4 (b): a small Llama trained here

def alpaca_texts() -> list[str]:
    """GSM8K and GPTeacher rows as plain text, shuffled once with a fixed seed."""
    rows = [r for path in ALPACA for r in json.loads(path.read_text(encoding="utf-8"))]
    texts = ["\n".join(part for part in (r["instruction"], r.get("input", ""), r["output"]) if part) for r in rows]
    random.Random(TRAINED["seed"]).shuffle(texts)
    return texts


def cache_key(steps: int) -> str:
    """A hash of everything the trained model depends on: its settings, the step count, the data and vocabulary."""
    digest = hashlib.sha256(json.dumps({**TRAINED, "steps": steps, "eval_rows": EVAL_ROWS,
                                        "calibration_rows": CALIBRATION_ROWS}, sort_keys=True).encode())
    for path in (*ALPACA, STORIES / "tokenizer.json"):
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def train(tok, texts: list[str], steps: int):
    """The P4 (b) model, trained from scratch on ``texts`` (one stream, blank lines between rows, cut into
    ``seqlen``-token windows drawn at random)."""
    import math

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = TRAINED
    torch.manual_seed(s["seed"])
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **{k: s[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "num_key_value_heads",
                                              "max_position_embeddings", "tie_word_embeddings")})
    model = LlamaForCausalLM(config)
    train_windows = windows(tok, texts, s["seqlen"])
    log(f"training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama for {steps} steps "
        f"on {len(texts)} rows ({train_windows.numel()} tokens in windows; "
        f"{steps * s['batch_size'] * s['seqlen']} seen)")
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]}, {"params": rest,
                             "weight_decay": 0.0}], lr=s["lr"], betas=(0.9, 0.95))

    def lr_at(step):  # linear warm-up, then cosine down to a tenth
        if step < s["warmup"]:
            return (step + 1) / s["warmup"]
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - s["warmup"]) / max(1, steps - s["warmup"])))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(s["seed"])
    model.train()
    losses, started = [], time.perf_counter()
    for step in range(steps):
        batch = train_windows[torch.randint(len(train_windows), (s["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"({time.perf_counter() - started:.0f}s)")
    return model.eval(), {"train_seconds": round(time.perf_counter() - started, 1), "final_loss": losses[-1],
                          "mean_loss_last_50": sum(losses[-50:]) / len(losses[-50:])}


def trained_model(tok, train_texts: list[str], steps: int) -> tuple[Path, dict]:
    """The folder of the trained P4 (b) model: from the cache, or trained now and cached (written to a temporary
    folder and renamed, so an interrupted run leaves no half-written entry)."""
    folder = CACHE / f"trained-llama-{cache_key(steps)}"
    info = folder / "bench_train.json"
    if info.exists():
        log(f"trained model from the cache: {folder.relative_to(REPO)}")
        return folder, {**json.loads(info.read_text(encoding="utf-8")), "cached": True}
    model, record = train(tok, train_texts, steps)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".tmp-"))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        record = {**TRAINED, "steps": steps, **record}
        (tmp / "bench_train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, {**record, "cached": False}


def trained(seqlen: int, steps: int) -> dict:
    """P4 (b): RTN and GPTQ (act-order) at group 128 and per row, 4 and 3 bits, on the trained Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.evaluation.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    texts = alpaca_texts()
    held_out = texts[:EVAL_ROWS]
    calib = texts[EVAL_ROWS:EVAL_ROWS + CALIBRATION_ROWS]
    folder, record = trained_model(tok, texts[EVAL_ROWS + CALIBRATION_ROWS:], steps)
    samples = [torch.tensor(tok(t)["input_ids"][:seqlen]) for t in calib]

    def fresh():
        return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()

    model = fresh()
    base = perplexity(model, tok, held_out, progress=False)["ppl"]
    results: dict = {"ppl_fp32": base, "parameters": sum(p.numel() for p in model.parameters()),
                     "training": record}
    log(f"trained model: held-out ppl {base:.4f}")
    ids = windows(tok, held_out, seqlen)
    reference = (ids, log_probs(model, ids))
    for bits in (4, 3):
        for group_size, label in ((128, "g128"), (-1, "perrow")):
            for name, extra in TRAINED_CONFIGS.items():
                results[f"{name}_{bits}bit_{label}"] = quantize_and_score(
                    fresh, tok, samples, held_out, bits, group_size, f"{name} (trained)", extra, base,
                    packable_only(bits), kl_reference=reference)
    return results


# ---------------------------------------------------------------- P4b: llmcompressor in its own venv

def time_ours(samples, group_size: int, attention: bool = False) -> float:
    """Seconds of one ``quantize_model`` call with P4b's settings on a fresh stories260K (the figure P4b times);
    with ``attention``, the seconds spent inside torch's scaled-dot-product attention during that call instead
    (a separate, untimed run: the floor no GPTQ implementation that runs the model's own attention can go under)."""
    import torch
    from transformers import AutoModelForCausalLM

    from utils.quant.calibrate import quantize_model
    from utils.quant.gptq import GPTQSettings

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), local_files_only=True, dtype=torch.float32).eval()
    settings = GPTQSettings(bits=4, group_size=group_size, act_order=True, static_groups=True)
    inside = [0.0]
    original = torch.nn.functional.scaled_dot_product_attention

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - t

    if attention:
        torch.nn.functional.scaled_dot_product_attention = timed
    try:
        started = time.perf_counter()
        quantize_model(model, samples, settings, progress=False, keep=packable_only(4))
        took = time.perf_counter() - started
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return inside[0] if attention else took


def run_peer(samples, held_out: list[str], group_size: int, work: Path, repeats: int) -> dict:
    """llmcompressor's GPTQ on stories260K (see the module docstring), scored with our perplexity function, or
    ``{"skipped": reason}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.evaluation.perplexity import perplexity

    if not PEER_PYTHON.exists():
        return {"skipped": f"{PEER_PYTHON.relative_to(REPO)} is absent: run `make bench-peers` to create it"}
    spec = work / "peer_spec.json"
    spec.write_text(json.dumps({"model": str(STORIES), "samples": [s.tolist() for s in samples],
                                "modules": ATTENTION, "bits": 4, "group_size": group_size, "sym": False,
                                "actorder": "static", "damp_percent": 0.01, "threads": torch.get_num_threads(),
                                "repeats": repeats}), encoding="utf-8")
    out = work / "llmcompressor"
    started = time.perf_counter()
    proc = subprocess.run([str(PEER_PYTHON), str(PEER_SCRIPT), "--spec", str(spec), "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"skipped": f"llmcompressor_gptq.py exited {proc.returncode}: " + " | ".join(tail)}
    report = json.loads((out / "peer_report.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    report.update(ppl=perplexity(model, tok, held_out, progress=False)["ppl"], process_seconds=round(wall, 1))
    log(f"llmcompressor: ppl {report['ppl']:.4f}, {len(report['layers'])} layers, oneshot {report['seconds']}s "
        f"(process {wall:.0f}s)")
    return report


def run_stage(calib_texts: list[str], held_out: list[str], seqlen: int, group_size: int, work: Path,
              threads: int) -> dict:
    """quantize.py itself on the P4b settings (informational: its calibration samples differ, see the docstring)."""
    for name, texts in (("calib.jsonl", calib_texts), ("held_out.jsonl", held_out)):
        (work / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = work / "stage"
    cmd = [sys.executable, str(REPO / "quantize.py"), "--base_model", str(STORIES), "--method", "gptq",
           "--modules", "self_attn.*", "--bits", "4", "--group_size", str(group_size), "--act_order",
           "--static_groups", "--data_path", str(work / "calib.jsonl"), "--field", "text",
           "--nsamples", str(len(calib_texts)), "--seqlen", str(seqlen),
           "--eval_data_path", str(work / "held_out.jsonl"), "--output_dir", str(out), "--progress", "false"]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the bench's thread count (torch reads it at start)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"skipped": f"quantize.py exited {proc.returncode}: " + " | ".join(tail)}
    report = json.loads((out / "quant_report.json").read_text(encoding="utf-8"))
    keys = ("ppl_before", "ppl_after", "delta_ppl", "seconds", "layers_quantized", "layers_kept", "peak_rss_mb")
    result = {k: report.get(k) for k in keys}
    result["process_seconds"] = round(wall, 1)
    log(f"quantize.py: ppl {result['ppl_before']:.4f} -> {result['ppl_after']:.4f}, {result['seconds']}s")
    return result


def run_kernels() -> dict:
    """P5's figures from bench/quant_kernels.py's RESULT line, or ``{"skipped": reason}``."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "quant_kernels.py"), "--reps", "30"],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"skipped": f"bench/quant_kernels.py exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------- the run

def peer_summary(theirs: dict):
    """The skip reason, or what the peer run was (versions, threads, layers, its weights' distance from its grid)."""
    if "skipped" in theirs:
        return theirs["skipped"]
    keep = ("versions", "threads", "process_seconds", "max_grid_distance", "ppl")
    return {**{k: theirs[k] for k in keep}, "layers": len(theirs["layers"])}


def ratio(a, b):
    return a / b if a is not None and b else None


def main(seqlen: int = 256, group_size: int = 32, train_steps: int = 400, peer: bool = True, stage: bool = True,
         kernels: bool = True, threads: int = 1, repeats: int = 2) -> None:
    """Run the benchmark.

    Args:
        seqlen: Calibration tokens per sample (each calibration story or row cut to its first ``seqlen``).
        group_size: Input columns per scale / zero point on stories260K (P4 (a), P4b).
        train_steps: Training steps of the P4 (b) model (a different count trains and caches another model).
        peer: Run P4b's llmcompressor (when its venv exists).
        stage: Also run quantize.py itself on the P4b settings.
        kernels: Also run bench/quant_kernels.py for P5's figures.
        threads: torch's thread count for the whole run, the peer and quantize.py included (0: torch's default).
            One by default: on a shared 2-core machine a second thread mostly waits for a core another process
            holds, and P4b's timing needs the same count on both sides.
        repeats: P4b's quantization runs on each side (the fastest counts; ours before and after theirs).
    """
    import torch

    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    log(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    r, samples, held_out = stories(seqlen, group_size)
    t = trained(seqlen, train_steps)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        ours_s = [time_ours(samples, group_size)]
        theirs = run_peer(samples, held_out, group_size, work, repeats) if peer else {"skipped": "--peer false"}
        ours_s += [time_ours(samples, group_size) for _ in range(repeats - 1)]
        attention_s = time_ours(samples, group_size, attention=True)
        log("ours, P4b's timing: " + ", ".join(f"{x:.2f}s" for x in ours_s) + f" (attention alone {attention_s:.2f}s)")
        texts = [json.loads(line)["text"] for line in TEXT.read_text(encoding="utf-8").splitlines()]
        ours_stage = (run_stage(texts[:CALIBRATION_ROWS], held_out, seqlen, group_size, work,
                                torch.get_num_threads()) if stage
                      else {"skipped": "--stage false"})
    p5 = run_kernels() if kernels else {"skipped": "--kernels false"}

    ours = r["gptq_static_4bit"]
    their_dppl = theirs["ppl"] - r["ppl_fp32"] if "ppl" in theirs else None
    summary = {
        "ppl_fp32_stories260k": r["ppl_fp32"],
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
        # P4 (b)
        "ppl_fp32_trained": t["ppl_fp32"], "trained_parameters": t["parameters"],
        "trained_steps": t["training"]["steps"], "trained_cached": t["training"]["cached"],
    }
    for bits, suffix in ((4, ""), (3, "_3bit")):
        for label in ("g128", "perrow"):
            rtn_d, gptq_d = t[f"rtn_{bits}bit_{label}"]["dppl"], t[f"gptq_act_{bits}bit_{label}"]["dppl"]
            summary[f"dppl_rtn_{bits}bit_trained_{label}"] = rtn_d
            summary[f"dppl_gptq_{bits}bit_trained_{label}"] = gptq_d
            summary[f"gptq_vs_rtn_dppl_ratio_trained_{label}{suffix}"] = gptq_d / rtn_d
            rtn_kl, gptq_kl = t[f"rtn_{bits}bit_{label}"]["kl"], t[f"gptq_act_{bits}bit_{label}"]["kl"]
            summary[f"kl_rtn_{bits}bit_trained_{label}"] = rtn_kl
            summary[f"kl_gptq_{bits}bit_trained_{label}"] = gptq_kl
            summary[f"gptq_vs_rtn_kl_ratio_trained_{label}{suffix}"] = gptq_kl / rtn_kl
    summary.update({
        # P4b
        "dppl_ours_vs_llmcompressor": ours["dppl"], "dppl_llmcompressor": their_dppl,
        "seconds_ours_vs_llmcompressor": round(min(ours_s), 2), "seconds_llmcompressor": theirs.get("seconds"),
        "seconds_each_ours": [round(x, 2) for x in ours_s], "seconds_each_llmcompressor": theirs.get("seconds_each"),
        "threads": torch.get_num_threads(),
        "dppl_vs_llmcompressor_ratio": ratio(ours["dppl"], their_dppl),
        "time_vs_llmcompressor_ratio": ratio(min(ours_s), theirs.get("seconds")),
        # The model's own attention (SDPA, once per block and batch) inside our call, against their whole call.
        "seconds_attention_ours": round(attention_s, 2),
        "attention_floor_vs_llmcompressor_ratio": ratio(attention_s, theirs.get("seconds")),
        "llmcompressor": peer_summary(theirs),
        "quantize_py_stage": ours_stage,
        # P5
        "int4_vs_fp32_cpu_m1": p5.get("int4_vs_fp32_cpu_m1"),
        "int4_vs_fp32_cpu_m1_1thread": p5.get("int4_vs_fp32_cpu_m1_1thread"),
    })
    for key in ("int4_vs_fp16_gpu_m1", "int4_vs_fp16_gpu_m16"):
        if key in p5:
            summary[key] = p5[key]
    if "skipped" in p5:
        summary["quant_kernels"] = p5["skipped"]
    summary["bench_seconds"] = round(time.perf_counter() - started, 1)
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    from utils.cli import run

    run(main)
