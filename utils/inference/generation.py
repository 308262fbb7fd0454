"""The decoding engine shared by generate.py, the server and evaluation.

``Engine(model, tokenizer, template)`` turns prompts into completions:

* ``engine.stream(prompt, settings)`` yields the text of one completion as it is produced (new,
  complete characters only; a stop string is never shown, not even its first characters);
  ``stream.completion`` holds the result once the generator is exhausted or closed.
* ``engine.generate(prompts, settings, batch_size)`` runs many prompts, results returned (and optionally
  reported one by one) in input order.
* ``engine.scheduler(max_rows)`` is the continuous batcher both use, and the server drives directly:
  requests are ``submit``-ted as rows (``Sequence``), wait in arrival order, are prefilled on their own and
  join the running batch at the next step; a finished or cancelled row leaves it at once.

The decoding step is three small parts, in the spirit of gpt-fast's ``prefill`` / ``decode_one_token``:
the runner's forward (``utils.inference.runners``: last-position logits for every live row), the logits
processing of each row (``Sequence.edit_``), and the sampler (``sample``). Each row carries its own
settings and random generator, so rows of different requests decode together and a seeded request gives the
same text alone or in a full batch.

Decoding (``Settings``): greedy (temperature 0) or sampling with temperature / top-k / top-p (in
Hugging Face's order and semantics), a repetition penalty over every earlier token, prompt included
(MOSS / CTRL: a positive logit is divided by it, a negative one multiplied), MOSS's length regulation
(EOS made ``length_penalty`` times likelier per token after ``regulation_start`` new tokens),
``min_new_tokens``, ``max_new_tokens``, ``max_time``, a seed. Logits that are NaN or infinite are
repaired before use (a row with no finite logit ends). Beam search runs through transformers'
``generate`` (the same stop handling is applied to its result).

Stopping: on any EOS id of the tokenizer and generation config (unless the row ignores EOS), on the
template's and the user's stop strings, and on stop strings that are single special tokens
(``<|im_end|>``). Text is decoded incrementally over a short window of tokens (never the whole sequence per
token); text that could still become a stop string is held back until it cannot.

Variants: one engine can decode for several views of one base model (the base itself, LoRA adapters of a
multi-adapter PEFT model, prompt-learning wrappers); each ``Variant`` has its own runner and batch, and
rows of different variants never share a forward pass.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from utils.inference.runners import make_runner
from utils.inference.settings import Settings


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before any sampling edit) and the most
    likely tokens at that position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # eos, stop, length, time, interrupted
    prompt_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for
    end: TokenLogprob | None = None  # the EOS or stop token that ended it (not in token_ids), when asked for

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

    def __init__(self, tokenizer: Any, context: Seq[int] = ()):
        self.tok = tokenizer
        # A raw prompt's last tokens as context: a continuation's first word keeps the space its token carries
        # (a tokenizer drops it at the start of a decode), so prompt + completion reads as the model wrote it.
        self.ids: list[int] = list(context)
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens whose text has been emitted (or that are context)

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


# -- one row ---------------------------------------------------------------------------------------


class Sequence:
    """One row being decoded: its prompt, settings and random generator, the text so far, and why it ended.

    A request for ``n`` completions is ``n`` rows; each has its own generator (the caller passes the request's
    seed + the row's index), so what it samples does not depend on the other rows of the batch.
    """

    def __init__(self, engine: "Engine", prompt: Seq[int], settings: Settings, *, seed: int | None = None,
                 variant: str = "default", logprobs: int | None = None, ignore_eos: bool = False, tag: Any = None,
                 template_stops: bool = True, in_context: bool = False):
        self.prompt = list(prompt)
        self.settings = settings
        self.variant = variant
        self.tag = tag  # the caller's: which request and choice this row answers
        self.want_logprobs = logprobs  # None: none; k >= 0: each token's logprob and the k most likely tokens
        template = engine.template if variant == "default" else engine.variants[variant].template
        # A raw completion prompt has no template, so only EOS and the request's stop strings end it.
        strings, self.stop_ids = engine.stops(settings, template if template_stops else None)
        self.eos_ids = set() if ignore_eos else set(engine.eos_ids)
        ends = sorted(self.eos_ids | self.stop_ids)
        self.end_t = torch.tensor(ends, dtype=torch.long) if ends else None
        self.greedy = settings.temperature == 0
        self.generator = None if self.greedy else torch.Generator(device="cpu").manual_seed(
            settings.seed if seed is None else seed)
        self.seen = None
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(engine.vocab, dtype=torch.bool)
            self.seen[torch.tensor([t for t in self.prompt if t < engine.vocab], dtype=torch.long)] = True
        self.log_lp = math.log(settings.length_penalty) if settings.length_penalty != 1.0 and ends else 0.0
        self.detok = Detokenizer(engine.tok, self.prompt[-4:] if in_context else ())
        self.stopper = StopText(strings)
        self.texts: list[str] = []
        self.new_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.end: TokenLogprob | None = None
        self.step = 0
        self.max_new = settings.max_new_tokens  # capped by the context at admission
        self.started = time.monotonic()
        self.last_piece = ""  # the text the last token made visible
        self.completion: Completion | None = None

    def edits_logits(self) -> bool:
        s = self.settings
        return (not self.greedy or self.seen is not None or (self.end_t is not None and self.step < s.min_new_tokens)
                or (self.log_lp != 0.0 and self.step > s.regulation_start))

    def edit_(self, row: torch.Tensor) -> None:
        """This row's logits processing, in place: the repetition penalty, then min_new_tokens (no EOS yet) or
        MOSS's length regulation (EOS likelier with every token)."""
        s = self.settings
        if self.seen is not None:
            penalize_repetition_(row, self.seen, s.repetition_penalty)
        if self.end_t is not None and self.step < s.min_new_tokens:
            row[self.end_t] = -math.inf
        elif self.log_lp != 0.0 and self.step > s.regulation_start:
            row[self.end_t] += self.log_lp * (self.step - s.regulation_start)

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Take the next token; returns (and keeps in ``last_piece``) the text it makes visible, maybe "".
        ``completion`` is set when the row ends: EOS, a stop token or string, max_new_tokens or max_time."""
        self.step += 1
        reason, piece = None, ""
        if token in self.eos_ids or token in self.stop_ids:
            reason = "eos" if token in self.eos_ids else "stop"
            self.end = logprob
        else:
            self.new_ids.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if self.seen is not None:
                self.seen[token] = True
            piece = self.stopper.feed(self.detok.push(token))
            if self.stopper.stopped:
                reason = "stop"
        if reason is None and self.step >= self.max_new:
            reason = "length"
        elif reason is None and self.settings.max_time > 0 and time.monotonic() - self.started > self.settings.max_time:
            reason = "time"
        if reason is not None and reason != "stop":
            piece += self.stopper.flush()
        if piece:
            self.texts.append(piece)
        if reason is not None:
            self._finish(reason)
        self.last_piece = piece
        return piece

    def cancel(self) -> None:
        """End the row where it is (the client left, or the caller stopped it): finish_reason ``interrupted``."""
        if self.completion is None:
            self._finish("interrupted")

    def _finish(self, reason: str) -> None:
        self.completion = Completion("".join(self.texts), self.new_ids, reason, len(self.prompt), self.logprobs,
                                     self.end)


def sample(logits: torch.Tensor, rows: Seq[Sequence]) -> list[int]:
    """The next token of each row: argmax for greedy rows; for sampling rows the temperature, then top-k and top-p
    (Hugging Face's order), then a draw from the row's own generator."""
    out = logits.argmax(-1).tolist()
    for i, r in enumerate(rows):
        s = r.settings
        # A temperature this small is greedy decoding in all but name; dividing by it overflows.
        if not r.greedy and s.temperature >= 1e-5:
            row = torch.nan_to_num(logits[i:i + 1] / s.temperature, nan=-math.inf,
                                   posinf=torch.finfo(logits.dtype).max)
            filter_top_k_top_p_(row, s.top_k, s.top_p)
            probs = row.softmax(-1)
            if bool(torch.isfinite(probs).all()):  # else (extreme penalties): the row's best token
                out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
    return out


# -- batches and the scheduler ----------------------------------------------------------------------


@dataclass
class Variant:
    """What a row runs on: a model (the base, or a PEFT view of it), its runner, the template its prompts are
    rendered with, its usable context, and a context manager entered around each forward pass (e.g. one that
    selects a LoRA adapter of a multi-adapter model)."""

    name: str
    model: Any
    runner: Any
    template: Any = None
    context_len: int = 2048
    activate: Callable[[], Any] = contextlib.nullcontext


class Batch:
    """The rows of one variant decoding together over one runner (one KV cache). New rows are prefilled on their
    own and then join; ``pending`` holds each live row's next input token."""

    def __init__(self, engine: "Engine", variant: Variant):
        self.engine, self.variant = engine, variant
        self.runner = None
        self.rows: list[Sequence] = []
        self.pending: list[int] = []

    def can_join(self) -> bool:
        """Whether rows can be added now: always into an empty batch; into a running one if its runner can merge
        caches (one that cannot makes newcomers wait until the batch has drained)."""
        return not self.rows or bool(getattr(self.runner, "can_absorb", lambda: False)())

    def admit(self, new: list[Sequence]) -> None:
        """Prefill ``new`` as one left-padded batch, give each row its first token; the live rows join."""
        proto = self.variant.runner
        runner = proto.fork() if hasattr(proto, "fork") else proto
        for r in new:
            r.max_new = max(1, min(r.settings.max_new_tokens, self.variant.context_len - len(r.prompt)))
        ids, mask = self.engine.batch_tensors([r.prompt for r in new])
        with self.variant.activate():
            logits = runner.prefill(ids, mask, max_new_tokens=max(r.max_new for r in new))
        tokens = self.engine.decide(logits, new)
        live = [i for i, r in enumerate(new) if r.completion is None]
        if not live:
            return
        if len(live) < len(new):
            runner.keep(torch.tensor(live, dtype=torch.long))
        if self.rows:
            self.runner.absorb(runner)
        else:
            self.runner = runner
        self.rows += [new[i] for i in live]
        self.pending += [tokens[i] for i in live]

    def step(self) -> list[Sequence]:
        """One decode step for every live row. Returns the rows that took a token."""
        self.drop_finished()
        if not self.rows:
            return []
        rows = list(self.rows)
        with self.variant.activate():
            logits = self.runner.step(torch.tensor(self.pending, dtype=torch.long))
        self.pending = self.engine.decide(logits, rows)
        self.drop_finished()
        return rows

    def drop_finished(self) -> None:
        """Finished and cancelled rows leave the batch (and its cache) now."""
        keep = [i for i, r in enumerate(self.rows) if r.completion is None]
        if len(keep) == len(self.rows):
            return
        if keep:
            self.runner.keep(torch.tensor(keep, dtype=torch.long))
            self.rows = [self.rows[i] for i in keep]
            self.pending = [self.pending[i] for i in keep]
        else:
            self.rows, self.pending, self.runner = [], [], None  # the cache goes with the runner


class Scheduler:
    """Continuous batching. Requests (``submit(rows)``: a request's rows are admitted together) wait in arrival
    order and join their variant's running batch as soon as there is room: at most ``max_rows`` rows decode at
    once, over all variants. Each ``tick`` admits what fits, then advances every variant's batch by one token, so
    no variant starves another. It returns ``(row, text)`` for each row that took a token; a row has ended when
    ``row.completion`` is set, and leaves its batch at once.

    Not thread-safe: one thread (the server's engine thread, or the caller) owns it and the model.
    """

    def __init__(self, engine: "Engine", max_rows: int = 16):
        self.engine = engine
        self.max_rows = max(1, max_rows)
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.batches: dict[str, Batch] = {}

    def submit(self, rows: Seq[Sequence]) -> None:
        for r in rows:
            if r.variant not in self.engine.variants:
                raise KeyError(f"unknown model {r.variant!r}")
            if not r.prompt:
                raise ValueError("an empty prompt cannot be continued (no tokens)")
        self.waiting.append(list(rows))

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self.batches.values())

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def tick(self) -> list[tuple[Sequence, str]]:
        events = [(r, r.last_piece) for r in self._admit()]
        for batch in self.batches.values():
            events += [(r, r.last_piece) for r in batch.step()]
        return events

    def _admit(self) -> list[Sequence]:
        room = self.max_rows - self.running
        groups: dict[str, list[Sequence]] = {}
        while self.waiting:
            rows = [r for r in self.waiting[0] if r.completion is None]  # cancelled while waiting: dropped
            if not rows:
                self.waiting.popleft()
                continue
            name = rows[0].variant
            if len(rows) > room or not (name in groups or self._batch(name).can_join()):
                break  # first come, first served: nothing overtakes the head of the queue
            self.waiting.popleft()
            groups.setdefault(name, []).extend(rows)
            room -= len(rows)
        admitted = []
        for name, rows in groups.items():
            self.batches[name].admit(rows)
            admitted += rows
        return admitted

    def _batch(self, name: str) -> Batch:
        if name not in self.batches:
            self.batches[name] = Batch(self.engine, self.engine.variants[name])
        return self.batches[name]

    def cancel(self, rows: Seq[Sequence]) -> None:
        """End ``rows`` now: they leave their batch before its next forward pass, or the queue."""
        for r in rows:
            r.cancel()
        for batch in self.batches.values():
            batch.drop_finished()
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
        cfg = getattr(model, "config", None)
        self.max_context = context_len or getattr(cfg, "max_position_embeddings", None) or 2048
        self.variants: dict[str, Variant] = {}
        self.add_variant("default", model, template, fast=fast)
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
        self.bad_logit_rows = 0

    def add_variant(self, name: str, model: Any, template: Any = None, fast: bool | None = None,
                    activate: Callable[[], Any] = contextlib.nullcontext) -> Variant:
        """Another view of the base model (an adapter) that requests can pick by ``name``; a prompt-learning
        adapter's virtual tokens come off its context."""
        n_virtual = 0
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            n_virtual = model.active_peft_config.num_virtual_tokens
        variant = Variant(name, model, make_runner(model, fast), template, self.max_context - n_virtual, activate)
        self.variants[name] = variant
        return variant

    # The default variant's runner and context, as attributes (tests and callers swap the runner).
    @property
    def runner(self):
        return self.variants["default"].runner

    @runner.setter
    def runner(self, value) -> None:
        self.variants["default"].runner = value

    @property
    def context_len(self) -> int:
        return self.variants["default"].context_len

    @context_len.setter
    def context_len(self, value: int) -> None:
        self.variants["default"].context_len = value

    @property
    def template_stops(self) -> list[str]:
        return list(getattr(self.template, "stop", []) or [])

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def fit(self, ids: list[int], max_new_tokens: int, truncate: bool = False, context_len: int | None = None) -> list[int]:
        """``ids`` if prompt + max_new_tokens fit the context; else its last tokens (BOS kept) when
        ``truncate``, else a ValueError saying by how much it is over."""
        context = context_len or self.context_len
        room = context - max_new_tokens
        if len(ids) <= room:
            return ids
        if not truncate or room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"context of {context} tokens")
        bos = getattr(self.tok, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            return [bos] + ids[len(ids) - room + 1:]
        return ids[len(ids) - room:]

    def stops(self, settings: Settings, template: Any = None) -> tuple[list[str], set[int]]:
        """(stop strings, stop token ids): the template's and the request's; a stop string that is one special
        token also stops as that token."""
        own = list(getattr(template, "stop", []) or [])
        strings = list(dict.fromkeys(own + list(settings.stop)))
        ids = set()
        special = set(getattr(self.tok, "all_special_tokens", []) or []) | set(
            getattr(self.tok, "added_tokens_encoder", {}) or {})
        for s in strings:
            if s in special:
                tid = self.tok.convert_tokens_to_ids(s)
                if isinstance(tid, int) and tid != getattr(self.tok, "unk_token_id", None):
                    ids.add(tid)
        return strings, ids

    def row(self, prompt: Seq[int], settings: Settings, **kwargs) -> Sequence:
        """A row for ``scheduler.submit`` (see ``Sequence``)."""
        return Sequence(self, prompt, settings, **kwargs)

    def scheduler(self, max_rows: int = 16) -> Scheduler:
        return Scheduler(self, max_rows)

    # -- public API ----------------------------------------------------------------------------
    def stream(self, prompt: str | list[int], settings: Settings | None = None, in_context: bool = False) -> "Stream":
        """A generator of text chunks for one prompt (a string is tokenized as is, special tokens added);
        ``in_context``: the text continues the prompt's (a raw prompt: its first word keeps its space)."""
        settings = settings or Settings()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Stream(self, ids, settings, in_context)

    def generate(self, prompts: Seq[list[int]], settings: Settings | None = None, batch_size: int = 16,
                 on_result: Callable[[int, Completion], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """Completions for tokenized prompts, in input order. Rows are admitted shortest first, at most
        ``batch_size`` at a time, and a finished row's place is taken at once. ``on_result(index, completion)``
        is called as each row finishes; ``progress(n)`` with the number of rows finished."""
        settings = settings or Settings()
        if any(not p for p in prompts):
            raise ValueError("an empty prompt cannot be continued (no tokens)")
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[Completion | None] = [None] * len(prompts)

        def done(i: int, completion: Completion) -> None:
            results[i] = completion
            if on_result is not None:
                on_result(i, completion)
            if progress is not None:
                progress(1)

        if settings.num_beams > 1:
            for start in range(0, len(order), max(batch_size, 1)):
                chunk = order[start:start + batch_size]
                for local, completion in self._beam([prompts[i] for i in chunk], settings):
                    done(chunk[local], completion)
            return results  # type: ignore[return-value]
        sched = self.scheduler(batch_size)
        for i in order:
            sched.submit([self.row(prompts[i], settings, tag=i)])
        while not sched.idle:
            for r, _ in sched.tick():
                if r.completion is not None:
                    done(r.tag, r.completion)
        return results  # type: ignore[return-value]

    # -- one decoding step -----------------------------------------------------------------------
    def batch_tensors(self, rows: Seq[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
        return ids, mask

    def decide(self, logits: torch.Tensor, rows: Seq[Sequence]) -> list[int]:
        """From the runner's last-position logits to each row's next token, given to the row (``accept``): repair,
        per-row processing, log-probabilities where asked for, sampling."""
        logits = logits.float().cpu()
        if logits.shape[-1] > self.vocab:
            logits = logits[:, :self.vocab]
        if any(r.edits_logits() or r.want_logprobs is not None for r in rows) or not bool(torch.isfinite(logits).all()):
            # The runners' outputs are inference tensors; the processing below edits a normal copy.
            logits = logits.clone()
            self.bad_logit_rows += sanitize_(logits, self.eos_ids[0] if self.eos_ids else None)
        raw = None
        if any(r.want_logprobs is not None for r in rows):
            raw = torch.log_softmax(logits, -1)
        for i, r in enumerate(rows):
            if r.edits_logits():
                r.edit_(logits[i])
        tokens = sample(logits, rows)
        for i, (r, t) in enumerate(zip(rows, tokens)):
            lp = None
            if raw is not None and r.want_logprobs is not None:
                top = []
                if r.want_logprobs > 0:
                    values, ids = torch.topk(raw[i], r.want_logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
                lp = TokenLogprob(t, float(raw[i, t]), top)
            r.accept(t, lp)
        return tokens

    def prompt_logprobs(self, ids: list[int], top: int = 0, variant: str = "default") -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), from one plain
        forward of the variant's model, and the ``top`` most likely tokens at each position: what
        ``/v1/completions`` with ``echo`` and ``logprobs`` returns, and lm-eval scores with."""
        v = self.variants[variant]
        with torch.inference_mode(), v.activate():
            device = next(v.model.parameters()).device
            out = v.model(input_ids=torch.tensor([ids], device=device))
        logits = out.logits[0, -len(ids):].float().cpu()  # a prompt-tuning model puts its virtual tokens first
        logp = torch.log_softmax(logits[:, :self.vocab], -1)
        result: list[TokenLogprob | None] = [None]
        if len(ids) > 1:
            picked = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            tops = torch.topk(logp[:-1], top, -1) if top > 0 else None
            for j in range(1, len(ids)):
                alts = list(zip(tops.indices[j - 1].tolist(), tops.values[j - 1].tolist())) if tops is not None else []
                result.append(TokenLogprob(ids[j], picked[j - 1], alts))
        return result

    def _beam(self, rows: Seq[list[int]], settings: Settings) -> Iterator[tuple]:
        """Beam search through transformers' generate; stop strings cut its result."""
        stop_strings, stop_ids = self.stops(settings, self.template)
        ids, mask = self.batch_tensors(rows)
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

    def __init__(self, engine: Engine, ids: list[int], settings: Settings, in_context: bool = False):
        self.engine, self.ids, self.settings, self.in_context = engine, ids, settings, in_context
        self.completion: Completion | None = None
        self._parts: list[str] = []
        self._gen = self._run()

    def _run(self) -> Iterator[str]:
        if self.settings.num_beams > 1:
            for _, completion in self.engine._beam([self.ids], self.settings):
                self.completion = completion
                if completion.text:
                    yield completion.text  # beam search: the whole answer at once
            return
        sched = self.engine.scheduler(1)
        row = self.engine.row(self.ids, self.settings, in_context=self.in_context)
        sched.submit([row])
        try:
            while row.completion is None:
                for _, piece in sched.tick():
                    if piece:
                        yield piece
        finally:
            sched.cancel([row])  # closed early: the row ends as interrupted
            self.completion = row.completion

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        try:
            piece = next(self._gen)
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise
        self._parts.append(piece)
        return piece

    def close(self) -> None:
        self._gen.close()
        if self.completion is None:
            self.completion = Completion("".join(self._parts), [], "interrupted", len(self.ids))
