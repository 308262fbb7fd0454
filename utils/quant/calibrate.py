"""GPTQ (or RTN, or any per-layer quantizer) over a whole model, one decoder block at a time, as the GPTQ paper
runs it.

The calibration samples go through the embedding once; their inputs to the first block are caught by a hook that
stops the forward there (with the keyword arguments the model passes its blocks: position embeddings, masks).
Then, block by block:

1. each linear layer of the block (found from the model: every ``nn.Linear`` inside the block, not LLaMA's names)
   gets a Hessian from its inputs, collected by forward hooks while the block runs on every sample; the run
   stops at the last layer of the step (the rest of the block would compute what nobody reads);
2. the layers are quantized, in execution order; with ``true_sequential`` the layers that read the same input
   (q/k/v, gate/up) form one step, and the block runs again before the next step, so that o_proj is calibrated on
   what the quantized q/k/v give and down_proj on what the quantized gate/up give;
3. the quantized weights replace the originals (dequantized, in the model's dtype) and the block runs once more:
   its outputs are the next block's inputs.

Later passes do not recompute what a quantized layer already summarises: once o_proj (the last calibrated layer
of self_attn) is quantized, self_attn's output on each batch is o_proj applied to the inputs its Hessian was fed,
so attention runs once per block instead of once per later pass (``_Shortcut``, checked on the first batch; the
result is bit for bit the same). The order the layers run in is found once per kind of block.

Samples of the same length run together, in batches of at most ``batch_tokens`` tokens (the per-call overhead of
a forward, not the arithmetic, is what a sample at a time pays on small models: 96% of the stage's time on
stories260K). The Hessians are sums over tokens, so batching changes only the order of the additions; the
position embeddings and masks the model passes its blocks are caught per batch, so they fit it.

Only one block's activations are held at a time. The layers the checkpoint layout cannot pack (``excluded``, e.g.
stories260K's 172-wide MLP) stay in floating point and are reported, never padded.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import torch

from utils.quant.gptq import GPTQSettings, Hessian, gptq_quantize, relative_error
from utils.quant.grid import QuantizedWeight, rtn


class _Caught(Exception):
    """Raised by the hook on the first block: the embedding's work is done, the rest of the forward is not needed."""


#: The most tokens one calibration forward carries (samples of one length batched up to it): large enough that a
#: small model's per-call overhead vanishes, small enough that a 4096-wide model's MLP activations stay near 200 MB.
BATCH_TOKENS = 4096


def batches(samples: Sequence[torch.Tensor], batch_tokens: int = BATCH_TOKENS) -> list[torch.Tensor]:
    """The 1-D samples as [B, T] batches of equal-length rows, at most ``batch_tokens`` tokens each (one row at
    least), in order of first appearance of each length (deterministic)."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for s in samples:
        by_length.setdefault(int(s.numel()), []).append(s.reshape(-1))
    out = []
    for length, rows in by_length.items():
        per = max(1, batch_tokens // max(length, 1))
        out += [torch.stack(rows[i:i + per]) for i in range(0, len(rows), per)]
    return out


def decoder_blocks(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """(qualified name, the ModuleList of decoder blocks): the longest ModuleList whose entries share one class."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder blocks found")
    return best


def block_linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    relative_error: float | None  # ‖WX − ŴX‖ / ‖WX‖ on the calibration inputs (any method); None when kept
    kept: str | None = None  # why the layer stayed in floating point


@dataclass
class Calibrated:
    """What ``quantize_model`` did: each quantized layer's weight (full names), and a report row per linear layer."""

    layers: dict[str, QuantizedWeight] = field(default_factory=dict)
    report: list[LayerReport] = field(default_factory=list)
    tokens: int = 0


@torch.no_grad()
def _catch_inputs(model: Any, blocks: torch.nn.ModuleList, samples: Sequence[torch.Tensor],
                  batch_tokens: int = BATCH_TOKENS) -> list[tuple[tuple, dict]]:
    """The first block's (args, kwargs) for each batch of ``samples`` (see ``batches``)."""
    caught: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        caught.append((args, dict(kwargs)))
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for ids in batches(samples, batch_tokens):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def _run_block(block: torch.nn.Module, inputs: list[tuple[tuple, dict]], stop_at: torch.nn.Module | None = None,
               shortcuts: Sequence["_Shortcut"] = ()) -> list[torch.Tensor]:
    """The block's outputs on each batch of ``inputs``; with ``stop_at``, each run ends when that module is about to
    run (its forward pre-hooks registered before this call have run: the Hessians are collected), and nothing is
    returned. ``shortcuts`` are told which batch is running (they replay that batch's cached inputs)."""
    handle = stop_at.register_forward_pre_hook(_stop) if stop_at is not None else None
    outs = []
    try:
        for i, (args, kwargs) in enumerate(inputs):
            for shortcut in shortcuts:
                shortcut.batch = i
            try:
                out = block(*args, **kwargs)
            except _Caught:
                continue
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    finally:
        if handle is not None:
            handle.remove()
    return outs


_ABSENT = object()


class _Shortcut:
    """Skips a module whose output is its last calibrated layer's output, once that layer is quantized.

    Each true-sequential step re-runs the block up to the step's layers, and the block runs once more for its
    outputs: without this, a block's attention (its costliest part on small models) would be computed once per
    later step. When ``layer`` is the last calibrated linear of ``parent`` (e.g. o_proj of self_attn, down_proj of
    mlp) and is quantized, its inputs on every batch were already caught (they are what its Hessian was fed), so
    the parent's output on batch i is ``layer(inputs[i])``, computed with the quantized weight: the same tensor the
    parent would have given, bit for bit. That is checked, not assumed: the first batch of the next pass runs the
    parent in full and the shortcut is used only if the parent returned exactly the layer's output (or a tuple of
    it and Nones, as attention modules return ``(output, weights=None)``) and the layer's input equals the cached
    one; otherwise the parent always runs in full.
    """

    def __init__(self, parent: torch.nn.Module, layer: torch.nn.Module, inputs: list[torch.Tensor]):
        self.parent, self.layer, self.inputs = parent, layer, inputs
        self.batch = 0
        self.checked = False
        self.nones: int | None = None  # once checked and usable: how many Nones follow the output (0: a bare tensor)
        self._saved = parent.__dict__.get("forward", _ABSENT)
        original = parent.forward

        def forward(*args, **kwargs):
            if not self.checked:
                return self._check(original, args, kwargs)
            if self.nones is None:
                return original(*args, **kwargs)
            out = layer(self.inputs[self.batch])
            return (out,) + (None,) * self.nones if self.nones else out

        parent.forward = forward

    def _check(self, original, args, kwargs):
        seen: list = []
        handle = self.layer.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
        try:
            out = original(*args, **kwargs)
        finally:
            handle.remove()
        self.checked = True
        if len(seen) == 1 and torch.equal(seen[0][0], self.inputs[self.batch]):
            if out is seen[0][1]:
                self.nones = 0
            elif isinstance(out, tuple) and out and out[0] is seen[0][1] and all(x is None for x in out[1:]):
                self.nones = len(out) - 1
        return out

    def remove(self) -> None:
        if self._saved is _ABSENT:
            del self.parent.forward
        else:
            self.parent.forward = self._saved


def _stop(module, args):
    raise _Caught


def _order(block: torch.nn.Module, linears: dict[str, torch.nn.Linear], inputs, orders: dict
           ) -> tuple[list[str], list[list[str]]]:
    """The block's linear layers in execution order, and the same grouped into runs that read one input tensor.
    ``orders`` (one per ``quantize_model`` call: another model of the same class may be configured to run its layers
    otherwise, e.g. GPT-NeoX's parallel residual) maps (block class, layer names) to what a watched run of the first
    block of that kind found, reused for the blocks like it."""
    key = (type(block), tuple(linears))
    if key in orders:
        return orders[key]
    order: list[str] = []
    seen_inputs: dict[str, int] = {}

    def watch(name):
        def hook(module, args):
            if name not in seen_inputs:
                order.append(name)
                seen_inputs[name] = id(args[0])
        return hook

    handles = [m.register_forward_pre_hook(watch(n)) for n, m in linears.items()]
    try:
        _run_block(block, inputs[:1])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in order:
        if groups and seen_inputs[groups[-1][0]] == seen_inputs[name]:
            groups[-1].append(name)
        else:
            groups.append([name])
    orders[key] = (order, groups)
    return order, groups


def _steps(block: torch.nn.Module, linears: dict[str, torch.nn.Linear], inputs, true_sequential: bool,
           orders: dict) -> list[list[str]]:
    """The block's linear layers in execution order, grouped by shared input when ``true_sequential`` (one step
    holding all of them otherwise)."""
    order, groups = _order(block, linears, inputs, orders)
    return groups if true_sequential else [order]


def _shortcut_parents(block: torch.nn.Module, order: list[str]) -> dict[str, torch.nn.Module]:
    """Layer name -> its parent module, for the layers that are the last of ``order`` inside their parent (the
    parent being a part of the block, not the block itself): the candidates for ``_Shortcut``."""
    modules = dict(block.named_modules())
    last: dict[str, str] = {}
    for name in order:
        if "." in name:
            last[name.rsplit(".", 1)[0]] = name
    return {name: modules[parent] for parent, name in last.items()}


@torch.no_grad()
def quantize_model(model: Any, samples: Sequence[torch.Tensor], settings: GPTQSettings, *, method: str = "gptq",
                   quantizer: Callable[[torch.Tensor], Any] | None = None,
                   keep: Callable[[str, torch.nn.Linear], str | None] = lambda name, m: None,
                   true_sequential: bool = True, progress: bool = True,
                   block_scope: Callable[[int], ContextManager] | None = None,
                   after_block: Callable[[int, dict[str, Any]], None] | None = None,
                   batch_tokens: int = BATCH_TOKENS) -> Calibrated:
    """Quantize every linear layer of every decoder block of ``model`` in place (weights replaced by their
    dequantized values) and return the quantized weights.

    Args:
        model: a transformers causal LM (not PEFT-wrapped: merge adapters first), in eval mode.
        samples: calibration token sequences (1-D id tensors).
        settings: the grid and GPTQ's options (``method="rtn"`` uses bits, group_size and sym only).
        method: "gptq" or "rtn" (the same grid, no error feedback: GPTQ's ablation), or any other name with a
            ``quantizer``.
        quantizer: for a method other than "gptq": the float32 weight [out, in] -> its quantized form, any object
            with ``dequantize()`` (e.g. the seeds' row-wise and group-wise quantizers); default: ``rtn`` on
            ``settings``' grid. It sees no activations; the calibration inputs still give its reconstruction
            error (the Hessians are collected for every method).
        keep: name, layer -> why the layer stays in floating point (e.g. a shape the layout cannot pack), or None.
        true_sequential: re-run the block between groups of layers that read different inputs.
        progress: one line per block on stderr.
        block_scope: block index -> a context manager the block is calibrated in (a streaming model reads the
            block's weights on entry and drops them on exit: ``utils.quant.streaming``).
        after_block: called inside the scope once block ``b`` is quantized, with its quantized layers (full
            name -> quantized weight), e.g. to write them; the weights are then not kept in the result
            (``result.layers`` maps their names to None), so memory holds one block's at a time.
        batch_tokens: the most tokens per calibration forward (equal-length samples run together; 1 gives one
            sample per forward).
    """
    if method != "gptq" and quantizer is None:
        def quantizer(w):
            return rtn(w, settings.bits, settings.group_size, settings.sym)
    prefix, blocks = decoder_blocks(model)
    inputs = _catch_inputs(model, blocks, samples, batch_tokens)
    result = Calibrated(tokens=sum(int(s.numel()) for s in samples))
    orders: dict = {}
    for b, block in enumerate(blocks):
        with (block_scope(b) if block_scope else nullcontext()):
            inputs = _quantize_block(prefix, b, block, inputs, settings, method, quantizer, keep, true_sequential,
                                     result, after_block, progress, len(blocks), orders)
    return result


def _quantize_block(prefix, b, block, inputs, settings, method, quantizer, keep, true_sequential, result,
                    after_block, progress, count, orders):
    """Quantize one block in place (see ``quantize_model``); its outputs on ``inputs`` are the next inputs."""
    linears = block_linears(block)
    quantized: dict[str, Any] = {}
    kept = {n: why for n, m in linears.items() if (why := keep(f"{prefix}.{b}.{n}", m))}
    for n, why in kept.items():
        w = linears[n].weight
        result.report.append(LayerReport(f"{prefix}.{b}.{n}", tuple(w.shape), None, why))
    todo = {n: m for n, m in linears.items() if n not in kept}
    steps = _steps(block, todo, inputs, true_sequential, orders) if todo else []
    # The cached inputs of shortcut layers are held for the rest of the block: at most one more copy of the block's
    # inputs in all, decided before the passes that would catch them, so a wide MLP's inputs (down_proj's) are only
    # cached where they fit. Every layer sees the same tokens, so the room is counted in columns.
    room = inputs[0][0][0].shape[-1] if inputs else 0
    parents: dict[str, torch.nn.Module] = {}
    for n, parent in _shortcut_parents(block, [n for step in steps for n in step]).items():
        if todo[n].in_features <= room:
            room -= todo[n].in_features
            parents[n] = parent
    shortcuts: list[_Shortcut] = []
    try:
        for step in steps:
            hessians = {n: Hessian(todo[n].in_features, todo[n].weight.device) for n in step}
            caches: dict[str, list[torch.Tensor]] = {n: [] for n in step if n in parents}

            def collect(module, args, n):
                hessians[n].add(args[0])
                if n in caches:
                    caches[n].append(args[0])

            handles = [todo[n].register_forward_pre_hook(lambda m, args, n=n: collect(m, args, n)) for n in step]
            try:
                # step[-1] runs last: its hook has fed its Hessian
                _run_block(block, inputs, stop_at=todo[step[-1]], shortcuts=shortcuts)
            finally:
                for h in handles:
                    h.remove()
            for n in step:
                layer, full = todo[n], f"{prefix}.{b}.{n}"
                w = layer.weight.data
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"{full}: the weight holds NaN or inf values; a grid cannot be fitted to them "
                                     "(is the checkpoint damaged?)")
                if method == "gptq":
                    q = gptq_quantize(w, hessians[n].H, settings, name=full).quantized
                else:
                    q = quantizer(w.float())
                approx = q.dequantize().to(w.device)
                error = relative_error(w, approx, hessians[n].H)
                layer.weight.data = approx.to(w.dtype)
                quantized[full] = q
                result.layers[full] = None if after_block else q
                result.report.append(LayerReport(full, tuple(w.shape), error))
            for n, cached in caches.items():
                if len(cached) == len(inputs):  # every batch reached the layer
                    shortcuts.append(_Shortcut(parents[n], todo[n], cached))
        outputs = _run_block(block, inputs, shortcuts=shortcuts)
    finally:
        for shortcut in shortcuts:
            shortcut.remove()
    if after_block:
        after_block(b, quantized)
    if progress:
        print(f"quantize: block {b + 1}/{count} ({len(todo)} layers, {len(kept)} kept)", file=sys.stderr)
    return [((out,) + args[1:], kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
