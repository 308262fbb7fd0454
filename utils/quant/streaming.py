"""A model whose decoder blocks stay on disk: read one block at a time, for quantizing in bounded memory.

``open_streaming(folder, adapter)`` builds the causal LM from its config with every parameter on the meta device
(no memory), loads what lies outside the decoder blocks (embeddings, final norm, output head), and hooks each
block so that its weights are read from the safetensors files when a forward reaches it and dropped when the
forward leaves it. A LoRA / DoRA adapter is merged as each tensor is read (``utils.weights.merge``, the math
export_hf.py writes). The result is an ordinary ``nn.Module``: eval/perplexity.py's function scores it as it is,
with one block's weights in memory at a time.

``StreamingModel.hold(block)`` keeps a block's weights while the quantizer works on it (calibration runs the
block several times and replaces its weights); ``release(block)`` then drops them.
"""

from __future__ import annotations

import re
import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from utils.quant.calibrate import decoder_blocks


class TensorStore:
    """The tensors of a model folder by name, read from disk on demand (float32), with an adapter merged."""

    def __init__(self, folder: str | Path, adapter: str | Path | None = None, allow_pickle: bool = False):
        from utils.weights.merge import load_adapter
        from utils.weights.shards import ModelWeights

        self.weights = ModelWeights(folder, allow_pickle=allow_pickle)
        self.adapter = load_adapter(adapter, allow_pickle) if adapter else None

    def __contains__(self, name: str) -> bool:
        return name in self.weights or bool(self.adapter and name in self.adapter.replacements)

    def get(self, name: str) -> torch.Tensor:
        from utils.weights.merge import merge_bias, merge_weight

        a = self.adapter
        if a and name in a.replacements:  # modules_to_save, trained biases, saved layers
            return a.replacements[name].float()
        value = self.weights.get(name)
        if a is None:
            return value.float() if value.is_floating_point() else value
        if name in a.targets:
            return merge_weight(a.targets[name], value, a.fan_in_fan_out)
        owner = a.targets.get(name[: -len("bias")] + "weight") if name.endswith(".bias") else None
        merged = merge_bias(owner, value) if owner is not None else None
        return merged if merged is not None else value.float()


class StreamingModel:
    """A causal LM with its decoder blocks read from a ``TensorStore`` one at a time (see the module docstring).

    Attributes:
        model: the transformers model (eval mode); blocks hold meta tensors except while a forward is in them.
        prefix: the qualified name of the block list, e.g. ``model.layers``.
        blocks: the block list.
    """

    def __init__(self, model: Any, store: TensorStore, dtype: torch.dtype):
        self.model, self.store, self.dtype = model, store, dtype
        self.prefix, self.blocks = decoder_blocks(model)
        self._held: set[int] = set()
        self._hooks = []
        for b, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda m, args, b=b: self._enter(b)))
            self._hooks.append(block.register_forward_hook(lambda m, args, out, b=b: self._leave(b)))

    def block_tensor_names(self, b: int) -> list[str]:
        """The full names of block ``b``'s parameters and persistent buffers, in state-dict order."""
        return [f"{self.prefix}.{b}.{n}" for n in self.blocks[b].state_dict()]

    def load(self, b: int) -> None:
        """Read block ``b``'s weights (no-op when they are in memory)."""
        block = self.blocks[b]
        if not any(t.is_meta for t in block.parameters()):
            return
        state = {}
        for full in self.block_tensor_names(b):
            if full not in self.store:
                raise ValueError(f"{full} is missing from the model's weights")
            t = self.store.get(full)
            state[full[len(f"{self.prefix}.{b}."):]] = t.to(self.dtype) if t.is_floating_point() else t
        block.load_state_dict(state, strict=True, assign=True)

    def release(self, b: int) -> None:
        """Drop block ``b``'s weights (back to the meta device)."""
        self._held.discard(b)
        self.blocks[b].to("meta")

    def release_all(self) -> None:
        """Drop every block's weights and the hooks (the model is of no further use after)."""
        for h in self._hooks:
            h.remove()
        for b in range(len(self.blocks)):
            self.release(b)

    @contextmanager
    def hold(self, b: int) -> Iterator[torch.nn.Module]:
        """Block ``b`` in memory for the duration (forwards through it keep its weights); released after."""
        self.load(b)
        self._held.add(b)
        try:
            yield self.blocks[b]
        finally:
            self.release(b)

    def _enter(self, b: int) -> None:
        if b not in self._held:
            self.load(b)

    def _leave(self, b: int) -> None:
        if b not in self._held:
            self.blocks[b].to("meta")


def open_streaming(folder: str | Path, adapter: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                   trust_remote_code: bool = False, allow_pickle: bool = False) -> StreamingModel:
    """The model of ``folder`` (+ ``adapter`` merged) with only what lies outside its decoder blocks in memory.

    Raises:
        ValueError: a tensor outside the blocks that the weights lack, or one the model does not have.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    store = TensorStore(folder, adapter, allow_pickle)
    streaming = StreamingModel(model, store, dtype)
    inside = f"{streaming.prefix}."
    outside = {}
    for name in model.state_dict():
        if name.startswith(inside):
            continue
        if name in store:
            t = store.get(name)
            outside[name] = t.to(dtype) if t.is_floating_point() else t
    model.load_state_dict(outside, strict=False, assign=True)
    model.tie_weights()  # a tied output head is stored once (as the embeddings)
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta and not n.startswith(inside)]
    if missing:
        raise ValueError(f"{folder}: tensors missing from the weights: {', '.join(sorted(missing)[:5])}")
    return streaming


def reset_peak_rss() -> bool:
    """Start a new peak-memory phase for ``peak_rss_mb`` (Linux: ``/proc/self/clear_refs``, which resets VmHWM to
    the current RSS); False where the system has no such reset (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory in MiB since the last ``reset_peak_rss`` (or since it started): VmHWM,
    which starts afresh at exec; ``ru_maxrss`` (the fallback where /proc is missing) can carry the parent's."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
