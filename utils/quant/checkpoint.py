"""Reading a GPTQ checkpoint folder (ours from quantize.py, or a standard AutoGPTQ / GPTQModel one) into a model.

A GPTQ folder is a Hugging Face model folder whose ``config.json`` carries ``quantization_config`` with
``quant_method: "gptq"`` (older AutoGPTQ folders carry a ``quantize_config.json`` instead). Its safetensors hold,
for each quantized linear layer ``name``, ``name.qweight`` / ``.qzeros`` / ``.scales`` / ``.g_idx`` (and
``name.bias``) in the classic v1 layout of ``utils.quant.packing``; every other tensor of the state dict is stored
as usual (embeddings, norms, ``lm_head``, the ``.weight`` of layers kept in floating point).

``load_gptq_model`` builds the model from its config with the quantization config removed, so transformers does
not reach for its own GPTQ backend (which needs optimum or gptqmodel). Parameters are created on the meta device
(no memory, no random init) while buffers such as the rotary ``inv_freq`` are computed as usual, since
non-persistent buffers are not in any checkpoint. Which layers are quantized is read from the checkpoint itself
(a ``.qweight`` tensor), so the config's exclusion rules need not be interpreted; a GPTQModel ``dynamic``
override of bits or group size for some layers is honoured.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from utils.quant.kernels import GPTQLinear

CONFIG = "config.json"
QUANTIZE_CONFIG = "quantize_config.json"
INDEX = "model.safetensors.index.json"
SUPPORTED_FORMATS = ("gptq",)
PACKED = ("qweight", "qzeros", "scales", "g_idx")
# Checkpoints written by older transformers hold the rotary tables, which are now non-persistent buffers.
_STALE_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _quantization_config(path: str | Path) -> dict | None:
    """``config.json``'s ``quantization_config``, else ``quantize_config.json``, else None."""
    folder = Path(path)
    config = _read_json(folder / CONFIG) or {}
    found = config.get("quantization_config")
    if isinstance(found, dict):
        return found
    return _read_json(folder / QUANTIZE_CONFIG)


def is_gptq_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a GPTQ checkpoint (``quant_method: "gptq"``, or an AutoGPTQ ``quantize_config.json``,
    which predates ``quant_method`` and so may lack it)."""
    folder = Path(path)
    config = (_read_json(folder / CONFIG) or {}).get("quantization_config")
    if isinstance(config, dict):
        return str(config.get("quant_method", "")).lower() == "gptq"
    return (folder / QUANTIZE_CONFIG).is_file()


def gptq_settings(path: str | Path) -> dict:
    """``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format`` and ``dynamic`` of a GPTQ folder.

    A missing ``checkpoint_format`` means ``"gptq"`` (AutoGPTQ wrote none before v2 existed).

    Raises:
        ValueError: not a GPTQ folder, bits or group size missing or invalid, or a checkpoint format other than
            the v1 ``"gptq"`` (``gptq_v2`` stores zero points without the -1 offset; ``marlin`` and others are
            kernel-specific repackings).
    """
    config = _quantization_config(path)
    if config is None:
        raise ValueError(f"{path}: no quantization_config in {CONFIG} and no {QUANTIZE_CONFIG}")
    fmt = str(config.get("checkpoint_format") or "gptq").lower()
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"{path}: checkpoint_format {fmt!r} is not supported; only {', '.join(SUPPORTED_FORMATS)} "
                         "(the classic v1 layout AutoGPTQ, GPTQModel and quantize.py write) can be loaded. "
                         "Re-save it in the v1 format (e.g. GPTQModel's save with format='gptq')")
    bits, group_size = config.get("bits"), config.get("group_size", -1)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{path}: quantization_config bits {bits!r}; expected 2, 3, 4 or 8")
    if not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"{path}: quantization_config group_size {group_size!r}; expected -1 or a positive integer")
    dynamic = config.get("dynamic") or {}
    return {"bits": bits, "group_size": group_size, "desc_act": bool(config.get("desc_act", False)),
            "sym": bool(config.get("sym", True)), "checkpoint_format": fmt,
            "dynamic": dynamic if isinstance(dynamic, dict) else {}}


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, else every ``*.safetensors`` (AutoGPTQ folders name
    theirs after the model, e.g. ``gptq_model-4bit-128g.safetensors``)."""
    folder = Path(path)
    index = _read_json(folder / INDEX)
    if index and isinstance(index.get("weight_map"), dict):
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def layer_settings(name: str, settings: dict) -> tuple[int, int]:
    """(bits, group_size) of module ``name``: GPTQModel's first positive ``dynamic`` rule (``"+:regex"`` or a bare
    regex, matched with ``re.match`` on the full name) overrides the folder's values."""
    bits, group_size = settings["bits"], settings["group_size"]
    for key, override in settings.get("dynamic", {}).items():
        if key.startswith("-:") or not isinstance(override, dict):
            continue
        if re.match(key[2:] if key.startswith("+:") else key, name):
            return override.get("bits", bits), override.get("group_size", group_size)
    return bits, group_size


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _quantized_layer(path: str | Path, name: str, linear: torch.nn.Linear, tensors: dict, settings: dict,
                     backend: str | None) -> GPTQLinear:
    """The ``GPTQLinear`` replacing ``linear``, its tensors checked against the layer's shape."""
    bits, group_size = layer_settings(name, settings)
    missing = [f"{name}.{t}" for t in PACKED[:3] if f"{name}.{t}" not in tensors]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} missing from the checkpoint ({name}.qweight is there)")
    packed = {t: tensors.pop(f"{name}.{t}") for t in PACKED if f"{name}.{t}" in tensors}
    rows = linear.in_features * bits // 32
    if tuple(packed["qweight"].shape) != (rows, linear.out_features):
        raise ValueError(f"{path}: {name}.qweight has shape {tuple(packed['qweight'].shape)}, but a "
                         f"[{linear.out_features}, {linear.in_features}] layer at {bits} bits packs into "
                         f"({rows}, {linear.out_features})")
    groups = 1 if group_size == -1 else -(-linear.in_features // group_size)
    if packed["scales"].shape[0] != groups and packed.get("g_idx") is None:
        raise ValueError(f"{path}: {name}.scales has {packed['scales'].shape[0]} groups, group_size {group_size} "
                         f"gives {groups}, and there is no g_idx to say otherwise")
    bias = tensors.pop(f"{name}.bias", None)
    if (bias is not None) != (linear.bias is not None):
        raise ValueError(f"{path}: {name} " + ("has a bias the model's config does not give it" if bias is not None
                                               else "has no bias, but the model's config gives it one"))
    try:
        return GPTQLinear.from_tensors(packed, bits, group_size, bias, backend=backend)
    except ValueError as exc:
        raise ValueError(f"{path}: {name}: {exc}") from None


def _describe_backends(layers: list[GPTQLinear]) -> str:
    """``"cpu_int4 (why)"``, or ``"cpu_int4 x8 (why); torch x2 (why)"`` when the layers differ."""
    counts = Counter((str(layer.backend), layer.backend.reason) for layer in layers)
    if len(counts) == 1:
        (name, reason), = counts
        return f"{name} ({reason})"
    return "; ".join(f"{name} x{n} ({reason})" for (name, reason), n in counts.most_common())


def load_gptq_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False, backend: str | None = None) -> Any:
    """The causal LM of a GPTQ folder, its quantized linear layers as ``GPTQLinear``, on ``device``, in eval mode.

    Args:
        path: the folder (``is_gptq_folder``).
        device: where the model goes; each layer's kernel is chosen for it (``kernels.choose_backend``).
        dtype: of every floating-point tensor outside the packed layers (scales stay float16, as stored).
        trust_remote_code: passed to transformers for configs with custom code.
        backend: force one kernel backend for every layer (``kernels.BACKENDS``), e.g. ``"torch"`` for float32
            arithmetic on CPU; None picks per layer.

    Returns:
        The model, with ``model.gptq_backend`` saying which backend its layers chose and why, and
        ``model.gptq_settings`` (``gptq_settings``).

    Raises:
        ValueError: an unsupported format, a tensor the model lacks or one the checkpoint lacks (named), shapes
            that do not fit the config, or no quantized layer at all.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = gptq_settings(path)
    files = weight_files(path)
    if not files:
        raise ValueError(f"{path}: no safetensors weights")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else transformers would look for optimum / gptqmodel
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    tensors = _read_tensors(files)
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.qweight" in tensors:
            layer = _quantized_layer(path, name, module, tensors, settings, backend)
            _set_module(model, name, layer)
            layers.append(layer)
    if not layers:
        raise ValueError(f"{path}: quantization_config says GPTQ, but no linear layer of the model has a .qweight "
                         "in the checkpoint")
    stale = [k for k in tensors if _STALE_KEYS.search(k)]
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items() if k not in stale}
    unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {_few(unexpected)}")
    if isinstance(model.get_output_embeddings(), GPTQLinear) and getattr(config.get_text_config(),
                                                                         "tie_word_embeddings", False):
        raise ValueError(f"{path}: the output head is quantized, but the config ties it to the input embeddings")
    # A tied pair is saved once (either side); tying also re-links what assign=True replaced.
    model.tie_weights(missing_keys=set(_meta_tensors(model)))
    missing = _meta_tensors(model)
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {_few(missing)}")
    model.to(device)
    model.eval()
    for layer in layers:
        layer.prepare()
    model.gptq_backend = _describe_backends(layers)
    model.gptq_settings = settings
    return model


def _meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device, i.e. not loaded."""
    return [n for n, t in list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False)) if t.is_meta]


def _few(names: list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def gptq_folder_problems(path: str | Path, flag: str = "--base_model") -> list[str]:
    """What would stop ``load_gptq_model`` on ``path``, found from the config and the safetensors headers alone."""
    from utils.weights.folders import safetensors_problem

    try:
        gptq_settings(path)
    except ValueError as exc:
        return [f"{flag} {exc}"]
    files = weight_files(path)
    if not files:
        return [f"{flag} {path}: no safetensors weights (a GPTQ folder needs model.safetensors or shards)"]
    return [f"{flag} {path}: {why}" for why in (safetensors_problem(f) if f.is_file() else f"{f.name} is missing"
                                                for f in files) if why]
