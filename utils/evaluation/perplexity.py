"""Sliding-window perplexity, exactly summed: the importable core of ``eval/perplexity.py`` (quantize.py calls it
for its before/after report).

A token sequence of N tokens is cut into windows of ``max_length`` tokens that start every ``stride`` tokens,
until one reaches the end. Every token after the first is scored exactly once: the first window scores all of
its tokens but the first, each later window only the tokens no window scored before, with
``max_length - stride`` tokens of context before them (Hugging Face's perplexity guide, without its
"mean loss x target length" shortcut, which counts one token per window that was never scored; with
``stride == max_length`` the windows overlap by one token, the context the next token needs). The
perplexity is ``exp(sum of per-token NLL / tokens scored)``; the sum is ``math.fsum`` of the per-token
values, so it depends neither on the batch size nor on the order windows ran in.

Windows of one length run together (all but each document's last window are ``max_length`` long), so a
window's arithmetic never depends on the windows batched with it: on the CPU a result is bitwise the same for
every ``batch_size``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from utils.evaluation.scoring import Scorer


@dataclass(frozen=True)
class Window:
    doc: int
    start: int
    end: int
    scored: int  # the window's last ``scored`` tokens are scored


def plan_windows(n_tokens: int, max_length: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows of one document of ``n_tokens`` tokens (none when there is nothing to score).

    The first window is the first ``max_length`` tokens. Each later one starts ``context`` tokens before the first
    token not yet scored, ``context = max_length - stride`` (at least 1: a token needs one before it), and scores
    what follows up to its end: for ``stride < max_length`` these are Hugging Face's windows, starting every
    ``stride`` tokens; for ``stride == max_length`` consecutive windows share one token, as lm-eval's rolling
    windows do.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    context = max(max_length - stride, 1)
    windows: list[Window] = []
    scored_to, start = 1, 0  # token 0 has no context: it is never scored
    while scored_to < n_tokens:
        end = min(start + max_length, n_tokens)
        windows.append(Window(doc, start, end, end - scored_to))
        scored_to = end
        start = end - context
    return windows


@dataclass
class DocumentScore:
    """One document's totals."""

    tokens_scored: int = 0
    nll_sum: float = 0.0
    values: list[float] = field(default_factory=list, repr=False)  # per-token NLL, in token order


@dataclass
class Result:
    documents: list[DocumentScore]
    windows: int

    @property
    def tokens_scored(self) -> int:
        return sum(d.tokens_scored for d in self.documents)

    @property
    def nll_sum(self) -> float:
        return math.fsum(v for d in self.documents for v in d.values)


def score_documents(scorer: Scorer, documents: Sequence[Sequence[int]], max_length: int, stride: int,
                    batch_size: int = 8, progress: bool = True) -> Result:
    """Score token sequences with sliding windows (see module docstring)."""
    windows = [w for i, ids in enumerate(documents) for w in plan_windows(len(ids), max_length, stride, i)]
    by_length: dict[int, list[int]] = {}
    for n, w in enumerate(windows):
        by_length.setdefault(w.end - w.start, []).append(n)
    nll: dict[int, list[float]] = {}
    bar = _progress(len(windows), progress)
    try:
        for length in sorted(by_length, reverse=True):
            group = by_length[length]
            for at in range(0, len(group), batch_size):
                chunk = [windows[n] for n in group[at:at + batch_size]]
                values = scorer.window_nll([documents[w.doc][w.start:w.end] for w in chunk], [w.scored for w in chunk])
                for n, v in zip(group[at:at + batch_size], values):
                    nll[n] = v.tolist()
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    scores = [DocumentScore() for _ in documents]
    for n, w in enumerate(windows):  # windows are planned in token order within each document
        d = scores[w.doc]
        d.values += nll[n]
        d.tokens_scored += w.scored
    for d in scores:
        d.nll_sum = math.fsum(d.values)
    return Result(scores, len(windows))


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="perplexity windows", unit="window", file=sys.stderr, dynamic_ncols=True)


def encode_documents(tokenizer: Any, texts: Sequence[str], add_bos: bool) -> list[list[int]]:
    """Token ids of each text, without the tokenizer's own special tokens, BOS first when ``add_bos``."""
    bos = [tokenizer.bos_token_id] if add_bos else []
    return [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def summary(result: Result, texts: Sequence[str]) -> dict:
    """The report's figures: perplexity, NLL per token, bits per byte (lm-eval's tokenizer-independent figure:
    total NLL in bits over the UTF-8 bytes of the text) and word perplexity (per whitespace-separated word)."""
    tokens = result.tokens_scored
    total = result.nll_sum
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    mean = total / tokens if tokens else float("nan")
    return {
        "ppl": math.exp(mean) if tokens else float("nan"),
        "nll_per_token": mean,
        "tokens_scored": tokens,
        "nll_sum": total,
        "bits_per_byte": total / (n_bytes * math.log(2)) if n_bytes else float("nan"),
        "bytes": n_bytes,
        "word_perplexity": math.exp(total / words) if words else float("nan"),
        "words": words,
        "windows": result.windows,
    }


def context_length(model: Any) -> int:
    """The tokens a window may hold: the model's context, less a prompt-learning adapter's virtual tokens."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    peft = getattr(model, "active_peft_config", None)
    if peft is not None and peft.is_prompt_learning:
        n -= peft.num_virtual_tokens
    return int(n)


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 8, add_bos: bool | None = None,
               per_document: bool = False, join: str = "\n\n", progress: bool = True) -> dict:
    """Perplexity of a loaded model on ``texts``: the function quantize.py and the eval script call.

    Args:
        model: a causal LM (PEFT-wrapped included), in eval mode.
        tokenizer: its tokenizer.
        texts: the documents.
        max_length: tokens per window (default: the model's context).
        stride: tokens between window starts (default: ``max_length``: windows do not overlap).
        batch_size: windows per forward pass (the result does not depend on it).
        add_bos: put BOS first (default: when the tokenizer has one).
        per_document: score each document on its own (each with its BOS); else join them with ``join``.
        join: the separator between joined documents.
        progress: show a progress bar on stderr.

    Returns:
        ``summary``'s figures, plus ``documents`` (per-document totals when ``per_document``).
    """
    max_length = max_length or context_length(model)
    stride = stride or max_length
    if add_bos is None:
        add_bos = getattr(tokenizer, "bos_token_id", None) is not None
    texts = list(texts) if per_document else [join.join(texts)]
    ids = encode_documents(tokenizer, texts, add_bos)
    result = score_documents(Scorer(model), ids, max_length, stride, batch_size, progress)
    report = summary(result, texts)
    report.update(max_length=max_length, stride=stride, add_bos=add_bos, batch_size=batch_size,
                  per_document=per_document)
    if per_document:
        report["documents"] = [{"tokens_scored": d.tokens_scored, "nll_sum": d.nll_sum,
                                "ppl": math.exp(d.nll_sum / d.tokens_scored) if d.tokens_scored else None}
                               for d in result.documents]
    return report


def read_texts(path: str, field: str, split_on: str | None, strict: bool, flag: str = "--data_file"
               ) -> tuple[list[str], dict[str, list[int]]]:
    """The documents of ``path``: a JSON array / JSONL file's ``field`` of each row, or a plain-text file as one
    document (split on ``split_on`` when given: documents joined by a separator are scored one by one).

    Returns:
        (texts, bad rows by reason with their line numbers).

    Raises:
        SuiteError: an unreadable or empty file, no usable row, or (``strict``) the first bad row.
    """
    from utils.data.records import DataError, RowError, read_records
    from utils.errors import SuiteError

    if not path.endswith((".json", ".jsonl")):
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise SuiteError(f"{flag} {path}: cannot read it as UTF-8 text ({exc})") from None
        texts = [t for t in text.split(split_on) if t.strip()] if split_on else [text]
        if not any(t.strip() for t in texts):
            raise SuiteError(f"{flag} {path}: empty file")
        return texts, {}
    bad: dict[str, list[int]] = {}

    def problem(reason: str, line: int) -> None:
        if strict:
            raise SuiteError(f"{flag} {path}:{line}: {reason} (--strict)")
        bad.setdefault(reason, []).append(line)

    texts = []
    try:
        for item in read_records(path):
            if isinstance(item, RowError):
                problem("not valid JSON" if item.category == "invalid_json" else "not valid UTF-8", item.line)
            elif not isinstance(item.value, dict):
                problem("not a JSON object", item.line)
            elif not isinstance(item.value.get(field), str):
                problem(f"no {field!r} text", item.line)
            else:
                texts.append(item.value[field])
    except DataError as exc:
        raise SuiteError(str(exc).replace("--data_path", flag)) from None
    if not texts:
        raise SuiteError(f"{flag} {path}: no row with a {field!r} text"
                         + (f" ({'; '.join(f'{k}: {len(v)}' for k, v in bad.items())})" if bad else ""))
    return texts, bad
