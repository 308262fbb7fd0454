"""Forward passes for the decoding engine: a batch of left-padded prompts in, last-position logits out,
then one token per live row per step, with a KV cache that drops finished rows.

Two runners share one interface: ``prefill`` (a new batch), ``step`` (one token per row), ``keep`` (drop
rows), ``fork`` (a runner with no rows on the same weights) and ``absorb`` (take another runner's rows into
this batch: the continuous batcher prefills newcomers on a fork, then merges them in). Caches are
right-aligned: every row's tokens end at the same column, shorter rows are padded (masked) on the left, and
each row keeps its own positions, so merging or dropping rows never changes a row's arithmetic; columns no row
uses any more are trimmed when rows leave.

* ``HFRunner`` works for any causal LM transformers loads, PEFT-wrapped included: LoRA layers run
  unmerged inside the model; prefix (P-tuning v2) adapters seed the cache with their virtual keys
  and values, prompt / p-tuning adapters put their virtual embeddings before the prompt.
* ``LlamaRunner`` is a lean decode path for plain Llama-shaped models (Llama, Mistral without a
  sliding window, Qwen2): q/k/v and gate/up fused into one matrix each, every weight stored
  transposed (an ``x @ W`` GEMV streams memory two to three times faster here than ``F.linear``'s
  ``x @ W.T``, see bench/generate.py; for the output head at 8+ rows the kernel is picked by a one-off
  timing, as the best BLAS call differs by shape), a preallocated cache and no per-step mask construction. The
  model's own modules keep working on the same storage (their weights become views of it), so the
  re-layout costs no memory and HF ``forward``/``generate`` still give the same results.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F

FAST_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token from a left-padded attention mask (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class HFRunner:
    """Any transformers causal LM (or PEFT model) through its own forward and a DynamicCache."""

    name = "hf"

    def __init__(self, model: Any):
        self.model = model
        self.peft = getattr(model, "peft_config", None) is not None and hasattr(model, "get_base_model")
        self.prompt_learning = self.peft and model.active_peft_config.is_prompt_learning
        self.core = model.get_base_model() if self.peft else model
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask = None

    def _virtual(self, batch: int):
        """(n_virtual, past_key_values or None, prompt embeddings or None) of a prompt-learning adapter."""
        cfg = self.model.active_peft_config
        n = cfg.num_virtual_tokens
        if cfg.peft_type.value in ("PREFIX_TUNING",):
            past = self.model.get_prompt(batch_size=batch, max_cache_len=n)
            if isinstance(past, (tuple, list)):  # legacy per-layer (key, value) pairs
                from transformers import DynamicCache

                cache = DynamicCache(config=self.core.config)
                for i, (k, v) in enumerate(past):
                    cache.update(k, v, i)
                past = cache
            return n, past, None
        return n, None, self.model.get_prompt(batch_size=batch)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 0) -> torch.Tensor:
        from transformers import DynamicCache

        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        batch = input_ids.shape[0]
        kwargs: dict = {}
        cache = DynamicCache(config=self.core.config)
        if self.prompt_learning:
            n, past, embeds = self._virtual(batch)
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], 1)
            if past is not None:
                cache = past
                kwargs["input_ids"] = input_ids
            else:
                tokens = self.core.get_input_embeddings()(input_ids)
                kwargs["inputs_embeds"] = torch.cat([embeds.to(tokens.dtype), tokens], 1)
        else:
            kwargs["input_ids"] = input_ids
        positions = positions_from_mask(attention_mask)[:, -input_ids.shape[1]:] if "input_ids" in kwargs \
            else positions_from_mask(attention_mask)
        out = self.core(attention_mask=attention_mask, position_ids=positions, past_key_values=cache, use_cache=True,
                        logits_to_keep=1, **kwargs)
        self.cache, self.mask = out.past_key_values, attention_mask
        self.next_pos = positions[:, -1:] + 1
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
        out = self.core(input_ids=tokens.view(-1, 1).to(self.device), attention_mask=self.mask,
                        position_ids=self.next_pos, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        first = int(self.mask[rows].any(0).long().argmax())  # columns before it are padding in every kept row
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[rows, :, first:], layer.values[rows, :, first:]
        self.mask, self.next_pos = self.mask[rows, first:], self.next_pos[rows]

    def _layers(self) -> list:
        return list(self.cache.layers)

    def fork(self) -> "HFRunner":
        twin = copy.copy(self)
        twin.cache = twin.mask = None
        return twin

    def can_absorb(self) -> bool:
        """Caches merge when every layer is a plain dynamic layer (sliding-window and other layouts do not)."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is not None and all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def absorb(self, other: "HFRunner") -> None:
        """Append ``other``'s rows (right-aligned: the shorter side is padded on the left)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)], 0)
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)], 0)
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)], 0)
        self.next_pos = torch.cat([self.next_pos, other.next_pos], 0)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros before its entries along ``dim`` up to ``width`` (zeros, not garbage: a masked column
    still enters the attention product with weight 0, and 0 * NaN would be NaN)."""
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)


def fast_path_problem(model: Any) -> str | None:
    """Why ``LlamaRunner`` cannot run ``model`` (None when it can)."""
    name = type(model).__name__
    if name not in FAST_ARCHITECTURES:
        return f"architecture {name}"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act}"
    if name != "LlamaForCausalLM" and getattr(cfg, "use_sliding_window", name == "MistralForCausalLM") \
            and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if len({p.device for p in model.parameters()}) > 1:
        return "weights spread over several devices"
    for m in model.modules():
        # GPTQ layers (ours, AutoGPTQ's QuantLinear) are not nn.Linear and have no .weight: the packed buffer says it.
        if isinstance(getattr(m, "qweight", None), torch.Tensor):
            return "quantized layers (GPTQ)"
        # The seeds' layers (utils.quant.rowwise) keep integer codes in .weight beside a .weight_scale.
        if isinstance(getattr(m, "weight_scale", None), torch.Tensor):
            return f"quantized layers ({getattr(m, 'kind', type(m).__name__)})"
        if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear:
            return f"{type(m).__name__} layers (quantized or adapted)"
        if getattr(m, "weight", None) is not None and isinstance(m.weight, torch.Tensor) \
                and not m.weight.dtype.is_floating_point:
            return "quantized weights"
    return None


def _fuse(linears: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One contiguous [in, sum(out)] matrix for several Linear layers; each layer's weight becomes a view of
    it, so no memory is duplicated. Returns (matrix, fused bias or None)."""
    fused = getattr(linears[0], "_suite_fused", None)
    reuse = fused is not None and fused.shape[1] == sum(m.weight.shape[0] for m in linears) and all(
        getattr(m, "_suite_fused", None) is fused
        and m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for m in linears)
    if reuse:  # a second runner on the same model: already laid out
        pass
    else:
        fused = torch.cat([m.weight.detach().t() for m in linears], 1).contiguous()
        offset = 0
        for m in linears:
            n = m.weight.shape[0]
            m.weight.data = fused[:, offset:offset + n].t()
            m._suite_fused = fused
            offset += n
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.weight.shape[0], dtype=fused.dtype, device=fused.device)
         for b, m in zip(biases, linears)])
    return fused, bias


class LlamaRunner:
    """Lean forward of a Llama-shaped model over a static cache (see module docstring)."""

    name = "fast"

    def __init__(self, model: Any):
        problem = fast_path_problem(model)
        if problem:
            raise ValueError(f"fast path unavailable: {problem}")
        self.model = model
        cfg = model.config
        inner = model.model
        self.embed = inner.get_input_embeddings()
        self.rotary = inner.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.eps = cfg.rms_norm_eps
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.layers = []
        for layer in inner.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv, qkv_b = _fuse([att.q_proj, att.k_proj, att.v_proj])
            gu, gu_b = _fuse([mlp.gate_proj, mlp.up_proj])
            o, o_b = _fuse([att.o_proj])
            d, d_b = _fuse([mlp.down_proj])
            self.layers.append((layer.input_layernorm.weight, qkv, qkv_b, o, o_b,
                                layer.post_attention_layernorm.weight, gu, gu_b, mlp.gate_proj.weight.shape[0], d, d_b))
        self.norm = inner.norm.weight
        head = model.get_output_embeddings()
        if head.weight is self.embed.weight:
            # Tied embeddings: the table must stay row-major for lookups, so the head gets its own copy.
            self.head = head.weight.detach().t().contiguous()
            self.head_b = None
        else:
            self.head, self.head_b = _fuse([head])
        self.q_dim, self.kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._head_kernel: dict[int, bool] = {}
        self.cache_k = self.cache_v = None

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # The same arithmetic as LlamaRMSNorm (fp32 statistics, weight applied in the model dtype).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    @staticmethod
    def _mm(x, w, b):
        flat = x.reshape(-1, x.shape[-1])  # one 2-D GEMM (a 3-D matmul may take a batched path)
        out = flat @ w if b is None else torch.addmm(b, flat, w)
        return out.view(*x.shape[:-1], w.shape[1])

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, H] at cache columns start..start+T-1; mask: bool [B, 1, T, start+T] or None (attend to all)."""
        bsz, t, _ = x.shape
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        half = self.head_dim // 2
        end = start + t
        for i, (w_in, qkv, qkv_b, o, o_b, w_post, gu, gu_b, inter, d, d_b) in enumerate(self.layers):
            h = self._norm(x, w_in)
            y = self._mm(h, qkv, qkv_b)
            q = y[..., :self.q_dim].view(bsz, t, self.heads, self.head_dim).transpose(1, 2)
            k = y[..., self.q_dim:self.q_dim + self.kv_dim].view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = y[..., self.q_dim + self.kv_dim:].view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            ck, cv = self.cache_k[i], self.cache_v[i]
            ck[:, :, start:end] = k
            cv[:, :, start:end] = v
            a = F.scaled_dot_product_attention(q, ck[:, :, :end], cv[:, :, :end], attn_mask=mask,
                                               is_causal=mask is None and t > 1, scale=self.scale,
                                               enable_gqa=self.kv_heads != self.heads)
            x = x + self._mm(a.transpose(1, 2).reshape(bsz, t, self.q_dim), o, o_b)
            h = self._norm(x, w_post)
            g = self._mm(h, gu, gu_b)
            x = x + self._mm(F.silu(g[..., :inter]) * g[..., inter:], d, d_b)
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self._norm(x, self.norm)
        rows = h.shape[0]
        if self.head_b is not None or rows < 8 or self.device.type != "cpu":
            return self._mm(h, self.head, self.head_b).float()
        # For a few rows at once, the BLAS kernel behind (W^T)^T @ h^T on the same storage can be twice as fast
        # as h @ W^T for the output head (and slower for other shapes): measured once per row count.
        use_t = self._head_kernel.get(rows)
        if use_t is None:
            use_t = self._head_kernel[rows] = self._tune_head(h)
        out = (self.head.t() @ h.t()).t().contiguous() if use_t else h @ self.head
        return out.float()

    def _tune_head(self, h: torch.Tensor) -> bool:
        best = {False: float("inf"), True: float("inf")}
        for use_t in (False, True, False, True):
            t = time.perf_counter()
            _ = (self.head.t() @ h.t()).t().contiguous() if use_t else h @ self.head
            best[use_t] = min(best[use_t], time.perf_counter() - t)
        return best[True] < 0.85 * best[False]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 0) -> torch.Tensor:
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device).bool()
        bsz, t = input_ids.shape
        self.capacity = t + max(max_new_tokens, 1)
        shape = (len(self.layers), bsz, self.kv_heads, self.capacity, self.head_dim)
        self.cache_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.cache_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.padded = not bool(attention_mask.all())
        self.valid = torch.zeros(bsz, self.capacity, dtype=torch.bool, device=self.device)
        self.valid[:, :t] = attention_mask
        positions = positions_from_mask(attention_mask)
        mask = None
        if self.padded:
            causal = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
            # A pad query attends to itself only: its output is unused, but a row with nothing to attend
            # to would be NaN.
            mask = (causal[None] & attention_mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=self.device)
            mask = mask[:, None]
        x = self._forward(self.embed(input_ids), positions, 0, mask)
        self.length = t
        self.next_pos = positions[:, -1:] + 1
        return self._logits(x[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.capacity:
            self._grow()
        x = self.embed(tokens.view(-1, 1).to(self.device))
        # Marked valid even when no row is padded: a batch merged in later (absorb) or trimmed (keep) reads it.
        self.valid[:, self.length] = True
        mask = None
        if self.padded:
            mask = self.valid[:, None, None, :self.length + 1]
        x = self._forward(x, self.next_pos, self.length, mask)
        self.length += 1
        self.next_pos = self.next_pos + 1
        return self._logits(x[:, -1])

    def _grow(self) -> None:
        extra = max(self.capacity // 2, 16)
        pad = (0, 0, 0, extra)
        self.cache_k, self.cache_v = F.pad(self.cache_k, pad), F.pad(self.cache_v, pad)
        self.valid = F.pad(self.valid, (0, extra))
        self.capacity += extra

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        valid = self.valid[rows]
        first = int(valid[:, :self.length].any(0).long().argmax())  # padding in every kept row before it
        self.cache_k = self.cache_k[:, :, :, first:].index_select(1, rows)
        self.cache_v = self.cache_v[:, :, :, first:].index_select(1, rows)
        self.valid, self.next_pos = valid[:, first:], self.next_pos[rows]
        self.length -= first
        self.capacity -= first
        if self.padded:
            self.padded = not bool(self.valid[:, :self.length].all())

    def fork(self) -> "LlamaRunner":
        twin = copy.copy(self)  # the fused weights are shared; only the cache is per batch
        twin.cache_k = twin.cache_v = None
        return twin

    def can_absorb(self) -> bool:
        return self.cache_k is not None

    def absorb(self, other: "LlamaRunner") -> None:
        """Append ``other``'s rows. Both caches are right-aligned at the longer length; the room left for new
        tokens is the larger of the two (``step`` grows it when that runs out)."""
        length = max(self.length, other.length)
        capacity = length + max(self.capacity - self.length, other.capacity - other.length, 1)
        b1, b2 = self.cache_k.shape[1], other.cache_k.shape[1]
        shape = (len(self.layers), b1 + b2, self.kv_heads, capacity, self.head_dim)
        # Zeros, not empty memory: masked columns still meet the attention product with weight 0 (0 * NaN = NaN).
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        valid = torch.zeros(b1 + b2, capacity, dtype=torch.bool, device=self.device)
        for rows, src in ((slice(0, b1), self), (slice(b1, b1 + b2), other)):
            cols = slice(length - src.length, length)
            k[:, rows, :, cols] = src.cache_k[:, :, :, :src.length]
            v[:, rows, :, cols] = src.cache_v[:, :, :, :src.length]
            valid[rows, cols] = src.valid[:, :src.length]
        self.cache_k, self.cache_v, self.valid = k, v, valid
        self.next_pos = torch.cat([self.next_pos, other.next_pos], 0)
        self.length, self.capacity = length, capacity
        self.padded = not bool(valid[:, :length].all())


def make_runner(model: Any, fast: bool | None = None):
    """``LlamaRunner`` where it applies (``fast=None``: automatically), else ``HFRunner``."""
    if fast is not False and fast_path_problem(model) is None:
        return LlamaRunner(model)
    if fast:
        raise ValueError(f"fast path unavailable: {fast_path_problem(model)}")
    return HFRunner(model)
