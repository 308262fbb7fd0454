"""eval/perplexity.py: sliding-window perplexity agrees with a plain Hugging Face forward and with a naive
one-window-at-a-time loop written here, on a tiny Llama built from a config and on the real stories260K, for
base models and unmerged adapters (LoRA, prefix, prompt tuning); it does not depend on the batch size and is
bitwise the same across runs; the script validates, counts bad rows and re-runs as a no-op."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, REPO, STORIES, peft_adapters, tiny_model
from utils.evaluation.perplexity import perplexity, plan_windows

STORIES_TEXT = DATA / "tinystories" / "valid_sample.jsonl"


def stories(n: int) -> list[str]:
    return [json.loads(line)["text"] for line in STORIES_TEXT.read_text(encoding="utf-8").splitlines()[:n]]


def load(folder: Path, adapter: Path | None = None):
    from utils.inference.loading import load_for_inference

    loaded = load_for_inference(str(folder), str(adapter) if adapter else None, log=lambda m: None)
    return loaded.model, loaded.tokenizer


def naive_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's guide, written out with exact counting: windows start every ``stride`` tokens; each
    window's tokens after the previous window's end are its targets; one window at a time, full logits, the
    model's own forward. For ``stride == max_length`` (no shared context in the guide) window j starts at
    j * (max_length - 1) instead: one token of context, as lm-eval's rolling windows have."""
    starts = range(0, len(ids), stride) if stride < max_length else range(0, len(ids), max_length - 1)
    total, count, prev_end = 0.0, 0, 1  # token 0 of the text has no context
    for begin in starts:
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window])).logits[0, -len(window):].float()
        first_target = prev_end - begin
        targets = torch.tensor(window[first_target:])
        nll = F.cross_entropy(logits[first_target - 1:-1], targets, reduction="sum")
        total += float(nll)
        count += len(targets)
        prev_end = end
        if end == len(ids):
            break
    return total, count


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model("llama", tmp_path_factory.mktemp("ppl") / "tiny", positions=256, width=64)


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    return peft_adapters(tiny, tmp_path_factory.mktemp("ppl_adapters"))


def test_windows_score_every_token_after_the_first_exactly_once():
    for n, length, stride in [(1, 8, 8), (2, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 3), (50, 16, 16), (17, 5, 1)]:
        windows = plan_windows(n, length, stride)
        scored = [i for w in windows for i in range(w.end - w.scored, w.end)]
        assert scored == list(range(1, n)), (n, length, stride)
        assert windows == [] or windows[0].scored == windows[0].end - 1
        for w in windows:
            assert w.end - w.start <= length
            if w is not windows[0]:  # the context before the targets
                assert w.end - w.scored - w.start == max(length - stride, 1)
                assert stride == length or w.start % stride == 0


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_one_window_equals_the_models_own_loss(tiny, which):
    model, tok = load(tiny if which == "tiny" else STORIES)
    text = stories(1)[0][:400]
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) <= 256
    report = perplexity(model, tok, [text], max_length=256, progress=False)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert report["tokens_scored"] == len(ids) - 1
    assert report["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(64, 32), (64, 64), (50, 17), (128, 1)])
def test_sliding_window_equals_a_naive_loop(tiny, max_length, stride):
    model, tok = load(tiny)
    texts = stories(3) if stride > 1 else [stories(1)[0][:300]]
    joined = "\n\n".join(texts)
    ids = [tok.bos_token_id] + tok(joined, add_special_tokens=False)["input_ids"]
    total, count = naive_nll(model, ids, max_length, stride)
    report = perplexity(model, tok, texts, max_length=max_length, stride=stride, batch_size=4, progress=False)
    assert report["tokens_scored"] == count == len(ids) - 1
    assert report["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(total / (len(joined.encode()) * math.log(2)), rel=1e-5)


def test_stories260k_sliding_window_equals_a_naive_loop():
    model, tok = load(STORIES)
    texts = stories(4)
    ids = [tok.bos_token_id] + tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    total, count = naive_nll(model, ids, 256, 100)
    report = perplexity(model, tok, texts, max_length=256, stride=100, progress=False)
    assert report["tokens_scored"] == count
    assert report["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 2.0 < report["ppl"] < 8.0  # stories260K on TinyStories: about 3.8


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_unmerged_adapters_score_as_the_peft_model_does(tiny, adapters, method):
    """The PEFT model's own forward (virtual tokens, prefix caches and LoRA layers as PEFT runs them) in the naive
    loop; ours runs the same model through the scorer, window by window in batches."""
    model, tok = load(tiny, adapters[method])
    base_model, _ = load(tiny)
    texts = stories(2)
    ids = [tok.bos_token_id] + tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    total, count = naive_nll(model, ids, 100, 40)
    ours = perplexity(model, tok, texts, max_length=100, stride=40, batch_size=3, progress=False)
    assert ours["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    base = perplexity(base_model, tok, texts, max_length=100, stride=40, progress=False)
    assert abs(ours["ppl"] - base["ppl"]) > 1e-4 * base["ppl"]  # the adapter is really applied (10x the tolerance)


def test_the_result_does_not_depend_on_the_batch_size(tiny):
    model, tok = load(tiny)
    texts = stories(5)
    runs = [perplexity(model, tok, texts, max_length=64, stride=24, batch_size=b, progress=False)
            for b in (1, 3, 16)]
    assert runs[0]["nll_sum"] == runs[1]["nll_sum"] == runs[2]["nll_sum"]  # bitwise
    per_doc = [perplexity(model, tok, texts, max_length=64, stride=24, batch_size=b, per_document=True,
                          progress=False) for b in (1, 7)]
    assert per_doc[0]["documents"] == per_doc[1]["documents"]
    # Scored alone, each document gives the same totals as in the per-document run.
    alone = [perplexity(model, tok, [t], max_length=64, stride=24, progress=False) for t in texts]
    assert [d["nll_sum"] for d in per_doc[0]["documents"]] == [a["nll_sum"] for a in alone]


def script(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "eval/perplexity.py", *args], cwd=REPO, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_script_is_deterministic_counts_bad_rows_and_reruns_as_a_no_op(tmp_path):
    """Slow: four runs of the script as separate processes (about 4 s each, mostly imports): two to compare across
    processes and batch sizes, the no-op re-run, and --strict; none of them can share a process."""
    rows = [{"text": t} for t in stories(6)]
    data = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json", json.dumps({"title": "no text"})] + \
        [json.dumps(r) for r in rows[3:]]
    data.write_text("\n".join(lines) + "\n")
    common = ["--base_model", str(STORIES), "--data_file", str(data), "--max_length", "128", "--stride", "64",
              "--noprogress"]
    first = script(*common, "--batch_size", "2")
    second = script(*common, "--batch_size", "5", "--output_dir", str(tmp_path / "out"))
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["ppl"] == b["ppl"] and a["nll_sum"] == b["nll_sum"]  # bitwise, across processes and batch sizes
    assert a["malformed"] == {"not valid JSON": 1, "no 'text' text": 1} and a["documents"] == 6
    assert f"{data}:4" in first.stderr and f"{data}:5" in first.stderr
    meta = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert meta["stage"] == "perplexity" and meta["complete"] and "report.json" in meta["files"]
    mtime = (tmp_path / "out" / "report.json").stat().st_mtime_ns
    again = script(*common, "--batch_size", "3", "--output_dir", str(tmp_path / "out"))
    assert "nothing to do" in again.stderr and json.loads(again.stdout)["ppl"] == b["ppl"]
    assert (tmp_path / "out" / "report.json").stat().st_mtime_ns == mtime
    strict = script(*common, "--strict", check=False)
    assert strict.returncode != 0 and f"{data}:4" in strict.stderr and "Traceback" not in strict.stderr


def test_script_per_document_writes_each_documents_totals(tmp_path):
    text = tmp_path / "t.txt"
    docs = stories(3)
    text.write_text("\n\n\n".join(d.replace("\n\n", "\n") for d in docs))
    out = tmp_path / "out"
    # --join as a shell passes "\n\n\n": backslashes, read as newlines
    proc = script("--base_model", str(STORIES), "--data_file", str(text), "--per_document", "--join", r"\n\n\n",
                  "--output_dir", str(out), "--noprogress")
    report = json.loads(proc.stdout)
    table = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert report["documents"] == len(table) == 3
    assert sum(d["tokens_scored"] for d in table) == report["tokens_scored"]
    assert math.fsum(d["nll_sum"] for d in table) == pytest.approx(report["nll_sum"], rel=1e-12)


def test_bad_arguments_are_reported_together_before_loading(tmp_path):
    proc = script("--base_model", str(STORIES), "--data_file", str(tmp_path / "missing.txt"), "--max_length", "64",
                  "--stride", "100", "--batch_size", "0", check=False)
    assert proc.returncode == 2
    for word in ("missing.txt", "--stride", "--batch_size"):
        assert word in proc.stderr
    text = tmp_path / "t.txt"
    text.write_text(stories(1)[0])
    proc = script("--base_model", str(STORIES), "--data_file", str(text), "--max_length", "100000", check=False)
    assert proc.returncode != 0 and "context" in proc.stderr and "Traceback" not in proc.stderr
