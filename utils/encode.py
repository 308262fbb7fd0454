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

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from utils.data import Example, RowError
from utils.templates import Rendered, Template, TemplateError

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
    offsets: list[tuple[int, int]] | None = None  # character span per token; (-1, -1) for inserted EOS


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


class Encoder:
    """Turns Examples into ``Encoded`` rows for one tokenizer, template and policy."""

    def __init__(self, tokenizer: Any, template: Template, *, cutoff_len: int, on_overlength: OverlengthPolicy,
                 mask_mode: MaskMode):
        if not getattr(tokenizer, "is_fast", False):
            raise TemplateError("a fast tokenizer (tokenizer.json) is needed: labels come from character offsets")
        if tokenizer.eos_token_id is None:
            raise TemplateError("the tokenizer has no EOS token: every trained response must end with one")
        self.tokenizer = tokenizer
        self.template = template
        self.cutoff_len = cutoff_len
        self.on_overlength = on_overlength
        self.mask_mode = mask_mode
        self.eos_id = tokenizer.eos_token_id

    def render(self, ex: Example) -> Rendered:
        try:
            return self.template.render(ex.messages, input=ex.input)
        except TemplateError as exc:
            raise RowError("unsupported_by_template", ex.path, ex.line, str(exc)) from None

    def encode_batch(self, examples: Sequence[Example]) -> list[Encoded | RowError]:
        rendered: list[Rendered | RowError] = []
        for ex in examples:
            try:
                rendered.append(self.render(ex))
            except RowError as err:
                rendered.append(err)
        out: list[Encoded | RowError] = [r for r in rendered]  # placeholders, replaced below
        for add_special in (True, False):
            idx = [i for i, r in enumerate(rendered) if isinstance(r, Rendered) and r.add_special_tokens == add_special]
            if not idx:
                continue
            batch = self.tokenizer([rendered[i].text for i in idx], add_special_tokens=add_special,
                                   return_offsets_mapping=True)
            for j, i in enumerate(idx):
                out[i] = self._label(examples[i], rendered[i], batch["input_ids"][j], batch["offset_mapping"][j])
        return out

    def _label(self, ex: Example, r: Rendered, ids: list[int], offsets: list[tuple[int, int]]) -> Encoded | RowError:
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        flags = _token_flags(offs, trained_char_spans(r, self.mask_mode), len(r.text)).tolist()
        ids = list(ids)
        spans = [tuple(o) for o in offs.tolist()]
        # EOS after every trained assistant response, unless its end marker already is EOS.
        # turn_ends: token index just past each assistant turn (truncation prefers these cut points).
        inserts = []
        starts, ends = offs[:, 0], offs[:, 1]
        real = ends > starts  # zero-width tokens (BOS, post-processor specials) are not text
        for seg in r.segments:
            if not seg.eos_after or seg.train_end <= seg.train_start:
                continue
            before = np.nonzero(real & (starts < seg.train_end))[0]
            k = int(before[-1]) + 1 if len(before) else 0
            inserts.append((k, not (k > 0 and ids[k - 1] == self.eos_id)))
        turn_ends = []
        shift = 0
        for k, insert in inserts:
            k += shift
            if insert:
                ids.insert(k, self.eos_id)
                flags.insert(k, True)
                spans.insert(k, (-1, -1))
                shift += 1
                k += 1
            turn_ends.append(k)
        labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags)]
        full = len(ids)
        if not any(flags):
            return RowError("no_trained_tokens", ex.path, ex.line)
        truncated = False
        if full > self.cutoff_len:
            if self.on_overlength == "drop":
                return RowError("overlength", ex.path, ex.line, f"{full} tokens > {self.cutoff_len}", full)
            if self.on_overlength == "error":
                return RowError("overlength", ex.path, ex.line, f"{full} tokens > {self.cutoff_len} (--on_overlength error)", full)
            # Prefer cutting after the last whole assistant turn that fits; else cut mid-response.
            cut = max((k for k in turn_ends if k <= self.cutoff_len), default=self.cutoff_len)
            if not any(l != IGNORE_INDEX for l in labels[:cut]):
                cut = self.cutoff_len
            ids, labels, spans, truncated = ids[:cut], labels[:cut], spans[:cut], True
            if not any(l != IGNORE_INDEX for l in labels):
                return RowError("no_trained_tokens_after_truncation", ex.path, ex.line, f"{full} tokens > {self.cutoff_len}", full)
        return Encoded(ids, labels, ex.path, ex.line, full, truncated, spans)
