"""LoRA merge math for every variant the suite trains (and plain peft adapters): LoRA, rsLoRA, DoRA,
rank / alpha patterns, LoRA on embeddings, GPT-2's Conv1D (fan_in_fan_out), trained biases and
``modules_to_save``, applied one base tensor at a time.

In peft's terms, for a target module with base weight W (as [out, in]), A [r, in], B [out, r]:

    delta  = s * B @ A,   s = alpha / r   (rsLoRA: alpha / sqrt(r))
    LoRA:    W' = W + delta
    DoRA:    W' = (m / ||W + delta||_row) * (W + delta)     (m: the trained magnitude, one per output row)

GPT-2's Conv1D stores W as [in, out] and an embedding as [vocab, dim] (in = vocab, out = dim), so both
are transposed around the formula. Prefix, p-tuning and prompt-tuning adapters add virtual tokens,
not weights: there is nothing to merge and ``load_adapter`` says so.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import SuiteError
from utils.weights.config import read_folder_json
from utils.weights.shards import read_entry, read_header

PREFIX = "base_model.model."
MERGEABLE = ("LORA",)
VIRTUAL_TOKEN_TYPES = ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING")
_PARTS = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "B_bias", ".lora_magnitude_vector": "m",
    ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
}


@dataclass
class Target:
    """One adapted module: its LoRA tensors and scaling."""

    module: str
    parts: dict = field(default_factory=dict)
    scaling: float = 1.0

    @property
    def embedding(self) -> bool:
        return "EA" in self.parts

    @property
    def rank(self) -> int:
        return self.parts["EA" if self.embedding else "A"].shape[0]


@dataclass
class Adapter:
    folder: Path
    config: dict
    targets: dict[str, Target]  # base weight name -> target
    replacements: dict  # base tensor name -> tensor (modules_to_save, trained biases, saved base layers)
    fan_in_fan_out: bool
    use_dora: bool
    weights_file: Path

    @property
    def peft_type(self) -> str:
        return self.config.get("peft_type", "")


def _pattern_value(patterns: dict, module: str, default):
    # peft matches a pattern key against the end of the module name (regex).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path, flag: str = "--lora_weights") -> dict:

    return read_folder_json(folder, "adapter_config.json", flag, " (not a PEFT adapter folder)")


def adapter_weights_file(folder: Path, allow_pickle: bool, flag: str = "--lora_weights") -> Path:
    safe, pickled = Path(folder) / "adapter_model.safetensors", Path(folder) / "adapter_model.bin"
    if safe.is_file():
        return safe
    if pickled.is_file():
        if not allow_pickle:
            raise SuiteError(f"{flag} {folder}: only adapter_model.bin (pickle); pass --allow_pickle_weights to read "
                             "it with torch.load(weights_only=True)")
        return pickled
    raise SuiteError(f"{flag} {folder}: no adapter_model.safetensors (the adapter's weights; nor adapter_model.bin)")


def check_adapter_dir(folder: str | Path, allow_pickle: bool, flag: str = "--lora_weights") -> None:
    """Refuse an incomplete adapter folder before any work: adapter_config.json missing or unreadable, no weights
    file, or a safetensors file that is damaged or shorter than its header says."""
    read_adapter_config(Path(folder), flag)
    path = adapter_weights_file(Path(folder), allow_pickle, flag)
    if path.suffix == ".safetensors":

        read_header(path, flag)


def load_state(path: Path, flag: str = "--lora_weights") -> dict:
    import torch

    if path.suffix == ".safetensors":

        entries, _ = read_header(path, flag)
        return {k: read_entry(e) for k, e in entries.items()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SuiteError(f"{flag} {path}: refused by torch.load(weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SuiteError(f"{flag} {path}: not a dict of tensors")
    return state


def load_adapter(folder: str | Path, allow_pickle: bool = False, flag: str = "--lora_weights") -> Adapter:
    """Read and check an adapter; refuses what cannot be merged, and empty or all-zero adapters."""
    folder = Path(folder)
    config = read_adapter_config(folder, flag)
    kind = str(config.get("peft_type", "")).upper()
    if kind in VIRTUAL_TOKEN_TYPES:
        raise SuiteError(
            f"{flag} {folder} is a {kind.lower()} adapter: it adds virtual tokens to every input rather than "
            "changing weights, so it cannot be merged into the base model. Export the adapter itself instead "
            "(export_hf.py --adapter_only: PEFT format with its tokenizer and template), and load it with the base")
    if kind not in MERGEABLE:
        raise SuiteError(f"{flag} {folder}: peft_type {kind or '?'} is not supported for merging (LoRA, rsLoRA, DoRA)")
    weights_file = adapter_weights_file(folder, allow_pickle, flag)
    state = load_state(weights_file, flag)
    if not state:
        raise SuiteError(f"{flag} {weights_file} holds no tensors at all (an empty adapter, like alpaca-lora's "
                         "443-byte adapter_model.bin); refusing to export the unchanged base model")
    targets: dict[str, Target] = {}
    replacements = {}
    for key, tensor in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        part = next((p for suffix, p in _PARTS.items() if name.endswith(suffix)), None)
        if part is not None:
            module = name[: -len(next(s for s, p in _PARTS.items() if p == part))]
            targets.setdefault(module, Target(module)).parts[part] = tensor.float()
        elif ".lora_" in name or "modules_to_save" in name:
            raise SuiteError(f"{flag} {weights_file}: unsupported adapter tensor {key!r}")
        else:
            # modules_to_save, trained biases, saved embedding layers: replace the base tensor
            replacements[name.replace(".base_layer.", ".")] = tensor
    fifo = bool(config.get("fan_in_fan_out", False))
    dora = bool(config.get("use_dora", False))
    by_weight: dict[str, Target] = {}
    for module, t in targets.items():
        need = {"EA", "EB"} if t.embedding else {"A", "B"}
        if not need <= set(t.parts) or (dora and "m" not in t.parts):
            raise SuiteError(f"{flag} {weights_file}: module {module} lacks some of its LoRA tensors "
                             f"(has {sorted(t.parts)})")
        r = t.rank
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        t.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        by_weight[module + ".weight"] = t
    if not by_weight and not replacements:
        raise SuiteError(f"{flag} {weights_file}: no LoRA weights in the adapter")
    zero = [m for m, t in by_weight.items() if float(t.parts["EB" if t.embedding else "B"].abs().max()) == 0
            and "m" not in t.parts]
    if by_weight and len(zero) == len(by_weight) and not replacements:
        raise SuiteError(f"{flag} {weights_file}: every lora_B is zero, so the adapter changes nothing (untrained?); "
                         "refusing to export the unchanged base model")
    return Adapter(folder, config, by_weight, replacements, fifo, dora, weights_file)


def delta_out_in(target: Target):
    """s * B @ A as [out, in] (fp32)."""
    if target.embedding:
        return (target.parts["EB"] @ target.parts["EA"]) * target.scaling
    return (target.parts["B"] @ target.parts["A"]) * target.scaling


def stored_is_transposed(target: Target, fan_in_fan_out: bool) -> bool:
    return target.embedding or fan_in_fan_out


def merge_weight(target: Target, weight, fan_in_fan_out: bool):
    """The merged weight (fp32) in the base tensor's own layout. Works in place on ``weight`` when it is
    already fp32 (no temporary the size of the weight: ``addmm_``)."""
    w = weight.float()
    transposed = stored_is_transposed(target, fan_in_fan_out)
    w_oi = w.T if transposed else w
    a, b = (target.parts["EA"], target.parts["EB"]) if target.embedding else (target.parts["A"], target.parts["B"])
    if (b.shape[0], a.shape[1]) != tuple(w_oi.shape):
        raise SuiteError(f"adapter module {target.module}: LoRA shape {(b.shape[0], a.shape[1])} does not fit the base "
                         f"weight {tuple(weight.shape)} (adapter made for another model?)")
    w_oi.addmm_(b, a, alpha=target.scaling)
    if "m" in target.parts:
        w_oi.mul_((target.parts["m"].reshape(-1) / torch_norm_rows(w_oi)).reshape(-1, 1))
    return w.contiguous()


def torch_norm_rows(matrix):
    import torch

    return torch.linalg.norm(matrix, dim=1)


def merge_bias(target: Target, bias):
    if "B_bias" not in target.parts:
        return None
    return bias.float() + target.parts["B_bias"] * target.scaling


def lora_forward_extra(target: Target, inputs, weight_oi, base_out):
    """Unmerged forward of an adapted linear: what the adapter adds to ``base_out`` (= inputs @ W.T + b), computed
    the way peft runs it (side branch, then DoRA's rescaling), for the verification."""
    lora = (inputs @ target.parts["A"].T) @ target.parts["B"].T * target.scaling
    if "B_bias" in target.parts:
        lora = lora + target.parts["B_bias"] * target.scaling
    if "m" not in target.parts:
        return base_out + lora
    norm = torch_norm_rows(weight_oi + delta_out_in(target))
    scale = target.parts["m"].reshape(-1) / norm
    return base_out + (scale - 1) * (inputs @ weight_oi.T) + scale * lora
