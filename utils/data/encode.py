"""Examples to token ids and labels, with the loss mask taken from the rendered template.

Each example is rendered once, tokenized once with character offsets, and every token is labelled
by whether its characters overlap a trained span. This is exact for any tokenizer (BOS or not,
SentencePiece or byte-level BPE) and linear in length, unlike re-tokenizing growing prefixes turn by
turn (LLMZoo's O(turns^2) method, which is also off by one on BOS-adding tokenizers).

Masking modes:

* ``assistant`` (default): loss on what the model produces — assistant answers (after the template's
  generation prompt, through the end marker) and, for MOSS data, inner thoughts and commands.
* ``moss``: the MOSS SFT recipe — everything is trained except the meta instruction and the bodies of
  tool results (MOSS's ``no_loss_spans``).
* ``all`` (``--train_on_inputs``): every token.

An EOS token ends every trained assistant response: if the template's end marker does not already
tokenize to EOS, one is inserted after it.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from utils.data.records import Example, RowError
from utils.data.templates import Rendered, Template, TemplateError

IGNORE_INDEX = -100
MaskMode = Literal["assistant", "moss", "all"]
OverlengthPolicy = Literal["truncate", "drop", "error"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    path: str
    line: int
    full_length: int  # before truncation
    truncated: bool
    offsets: np.ndarray | None = None  # (tokens, 2) character spans, (-1, -1) for inserted EOS; if kept

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def trained_char_spans(rendered: Rendered, mode: MaskMode) -> list[tuple[int, int]]:
    """Character spans that carry loss under ``mode``."""
    if mode == "all":
        return [(0, len(rendered.text))]
    if mode == "moss":
        masked = [(s.content_start, s.content_end) for s in rendered.segments if s.role in ("system", "result")]
        spans, pos = [], 0
        for a, b in sorted(masked):
            if a > pos:
                spans.append((pos, a))
            pos = max(pos, b)
        if pos < len(rendered.text):
            spans.append((pos, len(rendered.text)))
        return spans
    return [(s.train_start, s.train_end) for s in rendered.segments if s.train_end > s.train_start]


def _token_flags(offsets: np.ndarray, spans: list[tuple[int, int]], n_chars: int) -> np.ndarray:
    """True for tokens whose character range overlaps a span (zero-width tokens never do)."""
    chars = np.zeros(n_chars + 1, dtype=np.int32)
    for a, b in spans:
        chars[a] += 1
        chars[b] -= 1
    inside = np.cumsum(chars)[:n_chars] > 0
    csum = np.concatenate([[0], np.cumsum(inside)])
    starts, ends = offsets[:, 0], offsets[:, 1]
    return (csum[ends] - csum[starts]) > 0


def _raw(ex: Example) -> dict:
    """What --log_bad_rows prints for an example that failed after parsing."""
    return {"messages": [{"role": m.role, "content": m.content} for m in ex.messages], "input": ex.input}


class Encoder:
    """Turns Examples into ``Encoded`` rows for one tokenizer, template and policy."""

    def __init__(self, tokenizer: Any, template: Template, *, cutoff_len: int, on_overlength: OverlengthPolicy,
                 mask_mode: MaskMode, keep_offsets: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("a fast tokenizer (tokenizer.json) is needed: labels come from character offsets")
        if tokenizer.eos_token_id is None:
            raise TemplateError("the tokenizer has no EOS token: every trained response must end with one")
        self.tokenizer = tokenizer
        # The Rust tokenizer directly (what tokenizer(...) calls underneath, minus the per-call Python
        # conversion), without any truncation or padding a tokenizer.json may carry: we cut ourselves.
        self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.template = template
        self.cutoff_len = cutoff_len
        self.on_overlength = on_overlength
        self.mask_mode = mask_mode
        self.eos_id = tokenizer.eos_token_id
        self.keep_offsets = keep_offsets

    def render(self, ex: Example) -> Rendered:
        try:
            return self.template.render(ex.messages, input=ex.input)
        except TemplateError as exc:
            raise RowError("unsupported_by_template", ex.path, ex.line, str(exc), raw=_raw(ex)) from None

    def encode_batch(self, examples: Sequence[Example]) -> list[Encoded | RowError]:
        out: list[Any] = []
        for ex in examples:
            try:
                out.append(self.render(ex))
            except RowError as err:
                out.append(err)
        for add_special in (True, False):
            idx = [i for i, r in enumerate(out) if isinstance(r, Rendered) and r.add_special_tokens == add_special]
            if idx:
                encodings = self.backend.encode_batch([out[i].text for i in idx], add_special_tokens=add_special)
                for i, enc in zip(idx, encodings):
                    out[i] = self._label(examples[i], out[i], enc.ids, enc.offsets)
        return out

    def _label(self, ex: Example, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> Encoded | RowError:
        n = len(ids)
        offs = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * n).reshape(n, 2)
        ids_arr = np.asarray(ids, dtype=np.int64)
        flags = _token_flags(offs, trained_char_spans(r, self.mask_mode), len(r.text))
        # EOS after every trained assistant response, unless its end marker already is EOS. Insert
        # positions are token indices just past each response; truncation prefers them as cut points.
        starts, ends = offs[:, 0], offs[:, 1]
        real = ends > starts  # zero-width tokens (BOS, post-processor specials) are not text
        inserts, turn_ends = [], []
        for seg in r.segments:
            if not seg.eos_after or seg.train_end <= seg.train_start:
                continue
            before = np.flatnonzero(real & (starts < seg.train_end))
            k = int(before[-1]) + 1 if len(before) else 0
            if k > 0 and ids_arr[k - 1] == self.eos_id:
                turn_ends.append(k + len(inserts))
            else:
                inserts.append(k)
                turn_ends.append(k + len(inserts))
        if inserts:
            ids_arr = np.insert(ids_arr, inserts, self.eos_id)
            flags = np.insert(flags, inserts, True)
            offs = np.insert(offs, inserts, -1, axis=0)
        labels = np.where(flags, ids_arr, IGNORE_INDEX)
        full = len(ids_arr)
        trained_upto = np.cumsum(flags)
        if full == 0 or trained_upto[-1] == 0:
            return RowError("no_trained_tokens", ex.path, ex.line, raw=_raw(ex))
        truncated = False
        if full > self.cutoff_len:
            detail = f"{full} tokens > --cutoff_len {self.cutoff_len}"
            if self.on_overlength in ("drop", "error"):
                return RowError("overlength", ex.path, ex.line, detail, full)
            # Prefer cutting after the last whole assistant turn that fits; else cut mid-response.
            cut = max((k for k in turn_ends if k <= self.cutoff_len), default=self.cutoff_len)
            if trained_upto[cut - 1] == 0:
                cut = self.cutoff_len
            if trained_upto[cut - 1] == 0:
                return RowError("no_trained_tokens_after_truncation", ex.path, ex.line, detail, full)
            ids_arr, labels, offs, truncated = ids_arr[:cut], labels[:cut], offs[:cut], True
        return Encoded(ids_arr.tolist(), labels.tolist(), ex.path, ex.line, full, truncated,
                       offs if self.keep_offsets else None)
