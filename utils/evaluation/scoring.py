"""Token log-likelihoods from any model the loader gives (base, merged, quantized, PEFT-wrapped with the adapter
unmerged: LoRA layers run inside the model, prefix adapters seed the cache, prompt adapters put their virtual
embeddings first), the two ways evaluation needs them:

* ``Scorer.window_nll``: windows of tokens, the negative log-likelihood of each window's last tokens (perplexity).
  The output head runs only at the positions that are scored.
* ``Scorer.choice_logprobs``: a shared prefix, then per item a suffix and several continuations (multiple-choice
  questions: the few-shot header once per subject, the question once per question, each answer on top of it).
  The prefix and each suffix go through the model once, their keys and values are reused from a cache, and a
  one-token continuation costs no forward at all (its log-probability is read from the suffix's last position).

Both give what a plain forward of the whole sequence gives (tests/test_eval_perplexity.py and
tests/test_eval_multiple_choice.py check it against ``model(ids)``), up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from utils.inference.runners import HFRunner, positions_from_mask


@dataclass
class ChoiceItem:
    """One question: its own tokens after the shared prefix, and each continuation's tokens."""

    suffix: list[int]
    continuations: list[list[int]]


class Scorer:
    """Log-likelihoods from a loaded model (see module docstring)."""

    def __init__(self, model: Any):
        self.runner = HFRunner(model)  # its adapter handling (virtual tokens, prefix caches) is the decoder's
        self.model = model.eval()
        self.core = self.runner.core
        self.device = self.runner.device
        self.n_virtual = model.active_peft_config.num_virtual_tokens if self.runner.prompt_learning else 0

    # -- one forward ------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, *, cache=None,
                 positions: torch.Tensor | None = None, keep: torch.Tensor | int = 0, use_cache: bool = False):
        """(logits [B, kept, V], cache) for token rows ``ids``.

        The first forward of a sequence (``cache`` None) puts a prompt-learning adapter's virtual tokens
        before it, as the PEFT model's own forward does. ``keep``: positions of ``ids`` whose logits are
        wanted (a 1-D tensor of column indices, or an int: the last ``keep``; 0: all). ``mask``: [B, past + T]
        (None: no padding anywhere)."""
        ids = ids.to(self.device)
        batch, width = ids.shape
        kwargs: dict = {}
        offset = 0
        if cache is None and self.runner.prompt_learning:
            n, past, embeds = self.runner._virtual(batch)
            mask = torch.ones(batch, width, dtype=torch.long) if mask is None else mask
            mask = torch.cat([mask.new_ones(batch, n), mask], 1)
            if past is not None:
                cache = past
            else:
                tokens = self.core.get_input_embeddings()(ids)
                kwargs["inputs_embeds"] = torch.cat([embeds.to(tokens.dtype), tokens], 1)
                offset = n
        if "inputs_embeds" not in kwargs:
            kwargs["input_ids"] = ids
        if mask is not None:
            mask = mask.to(self.device)
            kwargs["attention_mask"] = mask
            if positions is None:
                positions = positions_from_mask(mask)[:, -(width + offset):]
        if positions is not None:
            kwargs["position_ids"] = positions.to(self.device)
        if isinstance(keep, torch.Tensor):
            keep = (keep + offset).to(self.device)
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.core.config)
        out = self.core(past_key_values=cache, use_cache=use_cache, logits_to_keep=keep, **kwargs)
        logits = out.logits
        if isinstance(keep, int) and keep == 0 and offset:
            logits = logits[:, offset:]
        return logits, (out.past_key_values if use_cache else None)

    # -- perplexity windows ---------------------------------------------------------------------
    @torch.inference_mode()
    def window_nll(self, windows: Sequence[Sequence[int]], scored: Sequence[int]) -> list[torch.Tensor]:
        """Per-token NLL (float32, on the CPU) of the last ``scored[i]`` tokens of each window, every token
        predicted from the tokens before it in its window. All windows have the same length (callers batch
        windows of equal length, so a window's arithmetic never depends on the windows beside it)."""
        width = len(windows[0])
        if any(len(w) != width for w in windows):
            raise ValueError("window_nll: windows of one call must have the same length")
        k = max(scored)
        ids = torch.tensor([list(w) for w in windows], dtype=torch.long)
        # Logits at columns width-1-k .. width-2 predict the last k tokens; the head runs nowhere else.
        logits, _ = self._forward(ids, keep=torch.arange(width - 1 - k, width - 1))
        out = []
        for i, s in enumerate(scored):
            rows = logits[i, k - s:].float()
            out.append(F.cross_entropy(rows, ids[i, width - s:].to(rows.device), reduction="none").cpu())
        return out

    # -- multiple choice ------------------------------------------------------------------------
    @torch.inference_mode()
    def choice_logprobs(self, prefix: Sequence[int], items: Sequence[ChoiceItem], batch_size: int = 8
                        ) -> list[list[list[float]]]:
        """For each item and continuation, the log-probability of each continuation token given
        prefix + suffix + the continuation tokens before it: ``result[item][choice]`` is a list of floats.

        ``prefix`` goes through the model once; the items' suffixes ``batch_size`` at a time on its cache
        (left-padded so that every suffix ends in the last column, whose logits predict the continuations'
        first tokens); continuations of two or more tokens then run on their item's cache."""
        if not prefix:
            raise ValueError("choice_logprobs: the prefix must hold at least one token (e.g. BOS)")
        if any(not it.suffix for it in items):
            raise ValueError("choice_logprobs: every item needs at least one suffix token")
        _, base = self._forward(torch.tensor([list(prefix)]), use_cache=True, keep=1)
        if not self._plain_cache(base):
            return [self._full_logprobs(list(prefix) + it.suffix, it.continuations) for it in items]
        p = self._cache_len(base)  # prefix length, virtual tokens included
        results: list[list[list[float]]] = []
        for start in range(0, len(items), batch_size):
            results += self._score_items(base, p, items[start:start + batch_size])
        return results

    def _score_items(self, base, p: int, items: Sequence[ChoiceItem]) -> list[list[list[float]]]:
        q = len(items)
        width = max(len(it.suffix) for it in items)
        ids = torch.zeros(q, width, dtype=torch.long)
        suffix_mask = torch.zeros(q, width, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, width - len(it.suffix):] = torch.tensor(it.suffix)
            suffix_mask[i, width - len(it.suffix):] = 1
        mask = torch.cat([torch.ones(q, p, dtype=torch.long), suffix_mask], 1)
        # Positions continue after the prefix (whose cache holds any virtual tokens: its length is the next
        # position either way); left pads, never attended to, get the first suffix position.
        positions = (p + suffix_mask.cumsum(1) - 1).clamp(min=p)
        cache = self._expand(base, q)
        last, cache = self._forward(ids, mask, cache=cache, positions=positions, keep=1, use_cache=True)
        first = torch.log_softmax(last[:, -1].float(), -1).cpu()
        results = [[[float(first[i, c[0]])] for c in it.continuations] for i, it in enumerate(items)]
        longer = [(i, j) for i, it in enumerate(items) for j, c in enumerate(it.continuations) if len(c) > 1]
        if not longer:
            return results
        # Continuations of two or more tokens: one row per (item, continuation) on that item's cache.
        rows = torch.tensor([i for i, _ in longer])
        conts = [items[i].continuations[j] for i, j in longer]
        cw = max(len(c) - 1 for c in conts)
        fed = torch.zeros(len(conts), cw, dtype=torch.long)
        fed_mask = torch.zeros(len(conts), cw, dtype=torch.long)
        for r, c in enumerate(conts):
            fed[r, :len(c) - 1] = torch.tensor(c[:-1])
            fed_mask[r, :len(c) - 1] = 1
        row_mask = torch.cat([mask[rows], fed_mask], 1)
        next_pos = positions[rows, -1:] + 1
        cont_positions = next_pos + torch.arange(cw)[None]
        logits, _ = self._forward(fed, row_mask, cache=self._select(cache, rows), positions=cont_positions)
        logp = torch.log_softmax(logits.float(), -1).cpu()
        for r, ((i, j), c) in enumerate(zip(longer, conts)):
            picked = logp[r, torch.arange(len(c) - 1), torch.tensor(c[1:])].tolist()
            results[i][j] += picked
        return results

    def _full_logprobs(self, context: list[int], continuations: list[list[int]]) -> list[list[float]]:
        """The fallback for caches that cannot be copied row-wise (sliding-window and other layouts): one plain
        forward of context + continuation per continuation."""
        out = []
        for cont in continuations:
            ids = torch.tensor([context + cont])
            logits, _ = self._forward(ids, keep=torch.arange(len(context) - 1, len(context) + len(cont) - 1))
            logp = torch.log_softmax(logits[0].float(), -1).cpu()
            out.append(logp[torch.arange(len(cont)), torch.tensor(cont)].tolist())
        return out

    # -- caches -----------------------------------------------------------------------------------
    @staticmethod
    def _plain_cache(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        return cache is not None and all(type(layer) is DynamicLayer for layer in cache.layers)

    @staticmethod
    def _cache_len(cache) -> int:
        return int(cache.layers[0].keys.shape[-2])

    def _expand(self, cache, rows: int):
        """A new cache holding ``rows`` copies of a one-row cache."""
        return self._rebuild(cache, lambda t: t.expand(rows, *t.shape[1:]))

    def _select(self, cache, rows: torch.Tensor):
        """A new cache holding the given rows of ``cache``."""
        rows = rows.to(self.device)
        return self._rebuild(cache, lambda t: t.index_select(0, rows))

    def _rebuild(self, cache, fn):
        from transformers import DynamicCache

        new = DynamicCache(config=self.core.config)
        for i, layer in enumerate(cache.layers):
            new.update(fn(layer.keys), fn(layer.values), i)
        return new
