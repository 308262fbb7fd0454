"""The decoding engine shared by generate.py, the server and evaluation.

``Engine(model, tokenizer, template)`` turns prompts into completions:

* ``engine.stream(prompt, settings)`` yields the text of one completion as it is produced (new,
  complete characters only; a stop string is never shown, not even its first characters);
  ``stream.completion`` holds the result once the generator is exhausted or closed.
* ``engine.generate(prompts, settings, batch_size)`` runs many prompts: sorted by length, batched
  with left padding over a KV cache, finished rows dropped from the batch while the others go on,
  results returned (and optionally reported one by one) in input order.

Decoding (``Settings``): greedy (temperature 0) or sampling with temperature / top-k / top-p (in
Hugging Face's order and semantics), a repetition penalty over every earlier token, prompt included
(MOSS / CTRL: a positive logit is divided by it, a negative one multiplied), MOSS's length regulation
(EOS made ``length_penalty`` times likelier per token after ``regulation_start`` new tokens),
``min_new_tokens``, ``max_new_tokens``, ``max_time``, a seed. Logits that are NaN or infinite are
repaired before use (a row with no finite logit ends). Beam search runs through transformers'
``generate`` (the same stop handling is applied to its result).

Stopping: on any EOS id of the tokenizer and generation config, on the template's and the user's
stop strings, and on stop strings that are single special tokens (``<|im_end|>``). Text is decoded
incrementally over a short window of tokens (never the whole sequence per token); text that could
still become a stop string is held back until it cannot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from utils.inference.runners import make_runner
from utils.inference.settings import Settings


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos, stop, length, time, interrupted
    prompt_tokens: int

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)


# -- logits --------------------------------------------------------------------------------------


def sanitize_(logits: torch.Tensor, eos_id: int | None) -> int:
    """Repair NaN/inf logits in place; returns the number of rows that needed it. NaN becomes -inf, +inf the
    largest finite value; a row left with no finite logit gets EOS (so it ends instead of sampling garbage)."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return 0
    bad_rows = int((~finite.all(-1)).sum())
    big = torch.finfo(logits.dtype).max
    torch.nan_to_num_(logits, nan=-math.inf, posinf=big, neginf=-math.inf)
    dead = torch.isneginf(logits).all(-1)
    if bool(dead.any()):
        logits[dead] = -math.inf
        logits[dead, eos_id if eos_id is not None else 0] = 0.0
    return bad_rows


def penalize_repetition_(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """MOSS / CTRL repetition penalty over every token already in the row (prompt included)."""
    picked = torch.where(logits < 0, logits * penalty, logits / penalty)
    torch.where(seen, picked, logits, out=logits)


def filter_top_k_top_p_(logits: torch.Tensor, top_k: int, top_p: float) -> None:
    """Hugging Face's TopK then TopP warpers: keep the k best, then the smallest set whose probability reaches
    top_p (always at least one token)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - top_p
        remove[..., -1] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -math.inf)


# -- text ----------------------------------------------------------------------------------------


class Detokenizer:
    """Incremental decoding: each token's new text from a window of the last few tokens, withheld while it
    ends in an incomplete character (U+FFFD from a partial UTF-8 sequence)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        if len(self.ids) - self.prefix > 16 and not after.endswith("\ufffd"):
            # A tokenizer that rewrote earlier text: resynchronise on the window (never grows unbounded).
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):] if after.startswith(before) else ""
        return ""


class StopText:
    """Applies stop strings to streamed text: ``feed(chunk)`` returns what can be shown; ``stopped`` is set
    once a stop string appeared (the text before it is shown, the string itself never)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, chunk: str) -> str:
        buf = self.pending + chunk
        if not self.stops:
            self.pending = ""
            return buf
        cut = min((p for p in (buf.find(s) for s in self.stops) if p != -1), default=-1)
        if cut != -1:
            self.stopped, self.pending = True, ""
            return buf[:cut]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# -- the engine ----------------------------------------------------------------------------------


class Engine:
    """Generation from a loaded model (see module docstring).

    Args:
        model: a transformers causal LM, optionally PEFT-wrapped.
        tokenizer: its tokenizer.
        template: a ``utils.data.templates.Template``; its stop strings apply to every request.
        fast: use the lean Llama decode path: None (where it applies), True (required) or False (never).
        context_len: the model's context window (default: from its config).
    """

    def __init__(self, model: Any, tokenizer: Any, template: Any = None, fast: bool | None = None,
                 context_len: int | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.template = template
        self.fast = fast
        self.runner = make_runner(model, fast)
        cfg = getattr(model, "config", None)
        self.context_len = context_len or getattr(cfg, "max_position_embeddings", None) or 2048
        n_virtual = 0
        if getattr(model, "peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            n_virtual = model.active_peft_config.num_virtual_tokens
        self.context_len -= n_virtual
        self.vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
            else tokenizer.vocab_size
        eos = set()
        for source in (getattr(tokenizer, "eos_token_id", None),
                       getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(x) for x in source)
        self.eos_ids = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.template_stops = list(getattr(template, "stop", []) or [])
        self.bad_logit_rows = 0

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def fit(self, ids: list[int], max_new_tokens: int, truncate: bool = False) -> list[int]:
        """``ids`` if prompt + max_new_tokens fit the context; else its last tokens (BOS kept) when
        ``truncate``, else a ValueError saying by how much it is over."""
        room = self.context_len - max_new_tokens
        if len(ids) <= room:
            return ids
        if not truncate or room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"context of {self.context_len} tokens")
        bos = getattr(self.tok, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            return [bos] + ids[len(ids) - room + 1:]
        return ids[len(ids) - room:]

    def _stops(self, settings: Settings) -> tuple[list[str], set[int]]:
        strings = list(dict.fromkeys(self.template_stops + list(settings.stop)))
        ids = set()
        special = set(getattr(self.tok, "all_special_tokens", []) or []) | set(
            getattr(self.tok, "added_tokens_encoder", {}) or {})
        for s in strings:
            if s in special:
                tid = self.tok.convert_tokens_to_ids(s)
                if isinstance(tid, int) and tid != getattr(self.tok, "unk_token_id", None):
                    ids.add(tid)
        return strings, ids

    # -- public API ----------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], settings: Settings | None = None) -> "Stream":
        """A generator of text chunks for one prompt (a string is tokenized as is, special tokens added)."""
        settings = settings or Settings()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Stream(self, ids, settings)

    def generate(self, prompts: Sequence[list[int]], settings: Settings | None = None, batch_size: int = 16,
                 on_result: Callable[[int, Completion], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """Completions for tokenized prompts, in input order. ``on_result(index, completion)`` is called as each
        row finishes; ``progress(n)`` with the number of rows finished in each step."""
        settings = settings or Settings()
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), max(batch_size, 1)):
            chunk = order[start:start + batch_size]
            for local, completion in self._run(
                    [prompts[i] for i in chunk], settings, stream=False):
                results[chunk[local]] = completion
                if on_result is not None:
                    on_result(chunk[local], completion)
                if progress is not None:
                    progress(1)
        return results  # type: ignore[return-value]

    # -- decoding ------------------------------------------------------------------------------
    def _batch_tensors(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
        return ids, mask

    def _run(self, rows: Sequence[list[int]], settings: Settings, stream: bool) -> Iterator[tuple]:
        """Decode one batch. Yields ``(row, Completion)`` as rows finish; with ``stream`` also ``(row, str)``
        text chunks as they are produced."""
        if any(not r for r in rows):
            raise ValueError("an empty prompt cannot be continued (no tokens)")
        if settings.num_beams > 1:
            yield from self._beam(rows, settings)
            return
        stop_strings, stop_ids = self._stops(settings)
        eos_ids = set(self.eos_ids)
        end_ids = sorted(eos_ids | stop_ids)
        end_t = torch.tensor(end_ids, dtype=torch.long) if end_ids else None
        n = len(rows)
        detoks = [Detokenizer(self.tok) for _ in range(n)]
        stoppers = [StopText(stop_strings) for _ in range(n)]
        texts = [[] for _ in range(n)]
        new_ids: list[list[int]] = [[] for _ in range(n)]
        alive = list(range(n))  # batch position -> row
        ids, mask = self._batch_tensors(rows)
        max_new = max(1, min(settings.max_new_tokens, self.context_len - ids.shape[1]))
        greedy = settings.temperature == 0
        gen = None
        if not greedy:
            gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros((n, self.vocab), dtype=torch.bool)
            for i, r in enumerate(rows):
                seen[i, torch.tensor([t for t in r if t < self.vocab], dtype=torch.long)] = True
        regulate = settings.length_penalty != 1.0 and bool(end_ids)
        log_lp = math.log(settings.length_penalty) if regulate else 0.0
        started = time.monotonic()
        logits = self.runner.prefill(ids, mask, max_new_tokens=max_new)
        step = 0
        while True:
            logits = logits.float().cpu()
            if logits.shape[-1] > self.vocab:
                logits = logits[:, :self.vocab]
            edit = not greedy or seen is not None or (end_t is not None and step < settings.min_new_tokens) or (
                regulate and step > settings.regulation_start) or not bool(torch.isfinite(logits).all())
            if edit:
                # The runners' outputs are inference tensors; the processing below edits a normal copy.
                logits = logits.clone()
                self.bad_logit_rows += sanitize_(logits, self.eos_ids[0] if self.eos_ids else None)
            if seen is not None:
                penalize_repetition_(logits, seen[alive] if len(alive) < n else seen, settings.repetition_penalty)
            if end_t is not None and step < settings.min_new_tokens:
                logits[:, end_t] = -math.inf
            elif regulate and step > settings.regulation_start:
                logits[:, end_t] += log_lp * (step - settings.regulation_start)
            if greedy:
                nxt = logits.argmax(-1)
            else:
                logits /= settings.temperature
                filter_top_k_top_p_(logits, settings.top_k, settings.top_p)
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen).view(-1)
            step += 1
            out_of_time = settings.max_time > 0 and time.monotonic() - started > settings.max_time
            tokens = nxt.tolist()
            finished: list[int] = []
            for pos, (row, token) in enumerate(zip(alive, tokens)):
                reason = None
                if token in eos_ids:
                    reason = "eos"
                elif token in stop_ids:
                    reason = "stop"
                else:
                    new_ids[row].append(token)
                    if seen is not None:
                        seen[row, token] = True
                    piece = stoppers[row].feed(detoks[row].push(token))
                    if piece:
                        texts[row].append(piece)
                        if stream:
                            yield row, piece
                    if stoppers[row].stopped:
                        reason = "stop"
                if reason is None and (step >= max_new or out_of_time):
                    reason = "length" if step >= max_new else "time"
                if reason is not None:
                    if reason != "stop":
                        tail = stoppers[row].flush()
                        if tail:
                            texts[row].append(tail)
                            if stream:
                                yield row, tail
                    finished.append(pos)
                    yield row, Completion("".join(texts[row]), new_ids[row], reason, len(rows[row]))
            if len(finished) == len(alive):
                return
            if finished:
                keep = [p for p in range(len(alive)) if p not in set(finished)]
                self.runner.keep(torch.tensor(keep, dtype=torch.long))
                alive = [alive[p] for p in keep]
                nxt = nxt[keep]
            logits = self.runner.step(nxt)

    def _beam(self, rows: Sequence[list[int]], settings: Settings) -> Iterator[tuple]:
        """Beam search through transformers' generate; stop strings cut its result."""
        stop_strings, stop_ids = self._stops(settings)
        ids, mask = self._batch_tensors(rows)
        device = next(self.model.parameters()).device
        max_new = max(1, min(settings.max_new_tokens, self.context_len - ids.shape[1]))
        kwargs = dict(max_new_tokens=max_new, min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams,
                      do_sample=False, eos_token_id=sorted(set(self.eos_ids) | stop_ids) or None,
                      pad_token_id=self.pad_id, repetition_penalty=settings.repetition_penalty,
                      max_time=settings.max_time or None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        ends = set(self.eos_ids) | stop_ids
        for i in range(len(rows)):
            seq = out[i, ids.shape[1]:].tolist()
            reason = "length"
            for j, t in enumerate(seq):
                if t in ends:
                    seq, reason = seq[:j], ("eos" if t in self.eos_ids else "stop")
                    break
            text = self.tok.decode(seq, skip_special_tokens=True)
            stopper = StopText(stop_strings)
            shown = stopper.feed(text)
            if stopper.stopped:
                reason = "stop"
            else:
                shown += stopper.flush()
            yield i, Completion(shown, seq, reason, len(rows[i]))


class Stream:
    """Iterator over the text chunks of one completion; ``completion`` is set when it ends. ``close()`` (or
    Ctrl-C in the consumer) ends it early with finish_reason ``interrupted``."""

    def __init__(self, engine: Engine, ids: list[int], settings: Settings):
        self.engine, self.ids, self.settings = engine, ids, settings
        self.completion: Completion | None = None
        self._parts: list[str] = []
        self._gen = engine._run([ids], settings, stream=True)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self.completion is not None:
            raise StopIteration
        try:
            for _, item in self._gen:
                if isinstance(item, Completion):
                    self.completion = item
                    if self.settings.num_beams > 1 and item.text:
                        return item.text  # beam search: the whole answer at once
                    raise StopIteration
                self._parts.append(item)
                return item
        except BaseException:
            self.close()
            raise
        raise StopIteration

    def close(self) -> None:
        if self.completion is None:
            self._gen.close()
            text = "".join(self._parts)
            self.completion = Completion(text, [], "interrupted", len(self.ids))
