"""Reading a quantized folder into a model: GPTQ (ours from quantize.py, or a standard AutoGPTQ / GPTQModel one),
the seeds' ChatGLM row-wise and LLMZoo group-wise layouts (``utils.quant.rowwise``) and pre-quantized bitsandbytes
folders. ``quantized_format`` says which a folder is (from config.json's ``quantization_config.quant_method``),
``quantization_label`` names it, ``quantized_folder_problems`` checks it without reading tensors and
``load_quantized_model`` loads any of them. The rest of this docstring is about GPTQ; the seeds' formats are
built the same way (a model on the meta device, the quantized layers swapped in, the rest loaded as stored).

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

from utils.quant import rowwise
from utils.quant.kernels import GPTQLinear
from utils.quant.rowwise import GroupwiseLinear, RowwiseLinear

CONFIG = "config.json"
QUANTIZE_CONFIG = "quantize_config.json"
INDEX = "model.safetensors.index.json"
SUPPORTED_FORMATS = ("gptq",)
PACKED = ("qweight", "qzeros", "scales", "g_idx")
#: Every quantized folder the loader knows, by config.json's quantization_config quant_method.
GPTQ, BITSANDBYTES = "gptq", "bitsandbytes"
QUANTIZED_FORMATS = (GPTQ, rowwise.ROWWISE, rowwise.GROUPWISE, BITSANDBYTES)
QUANTIZED_LAYERS = (GPTQLinear, RowwiseLinear, GroupwiseLinear)
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
    bias = _take_bias(path, name, linear, tensors)
    try:
        return GPTQLinear.from_tensors(packed, bits, group_size, bias, backend=backend)
    except ValueError as exc:
        raise ValueError(f"{path}: {name}: {exc}") from None


def _take_bias(path: str | Path, name: str, linear: torch.nn.Linear, tensors: dict) -> torch.Tensor | None:
    """``name.bias`` taken out of ``tensors``; refused when the model's config says otherwise."""
    bias = tensors.pop(f"{name}.bias", None)
    if (bias is not None) != (linear.bias is not None):
        raise ValueError(f"{path}: {name} " + ("has a bias the model's config does not give it" if bias is not None
                                               else "has no bias, but the model's config gives it one"))
    return bias


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
        The model, with ``model.gptq_backend`` (and ``model.quant_backend``) saying which backend its layers chose
        and why, and ``model.gptq_settings`` (and ``model.quant_settings``: ``gptq_settings``).

    Raises:
        ValueError: an unsupported format, a tensor the model lacks or one the checkpoint lacks (named), shapes
            that do not fit the config, or no quantized layer at all.
    """
    settings = gptq_settings(path)
    model, config, tensors = _empty_model(path, dtype, trust_remote_code)
    layers = _replace_layers(model, tensors, "qweight", lambda name, linear: _quantized_layer(
        path, name, linear, tensors, settings, backend))
    if not layers:
        raise ValueError(f"{path}: quantization_config says GPTQ, but no linear layer of the model has a .qweight "
                         "in the checkpoint")
    _load_the_rest(path, model, config, tensors, dtype)
    model.to(device)
    model.eval()
    for layer in layers:
        layer.prepare()
    model.gptq_backend = model.quant_backend = _describe_backends(layers)
    model.gptq_settings = model.quant_settings = settings
    return model


def _empty_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any, dict]:
    """(the model built from the folder's config with no weights, that config, every tensor of the checkpoint).

    The quantization config is removed from the config first, so transformers does not reach for a backend of
    its own (optimum / gptqmodel for GPTQ; none exists for the seeds' formats). Parameters are created on the meta
    device (no memory, no random init) while buffers such as the rotary ``inv_freq`` are computed as usual.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    files = weight_files(path)
    if not files:
        raise ValueError(f"{path}: no safetensors weights")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, config, _read_tensors(files)


def _replace_layers(model: torch.nn.Module, tensors: dict, marker: str, build) -> list[torch.nn.Module]:
    """Replace every ``nn.Linear`` whose ``name.<marker>`` is in the checkpoint by ``build(name, linear)``, which
    takes its tensors out of ``tensors``. Returns the new layers."""
    layers = []
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and f"{name}.{marker}" in tensors:
            layer = build(name, module)
            _set_module(model, name, layer)
            layers.append(layer)
    return layers


def _load_the_rest(path: str | Path, model: torch.nn.Module, config: Any, tensors: dict, dtype: torch.dtype) -> None:
    """Load every tensor left in ``tensors`` (float ones cast to ``dtype``) into ``model``, tie the embeddings as
    the config says, and check that nothing is missing or unexpected (named)."""
    stale = [k for k in tensors if _STALE_KEYS.search(k)]
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items() if k not in stale}
    unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {_few(unexpected)}")
    if isinstance(model.get_output_embeddings(), QUANTIZED_LAYERS) and \
            getattr(config.get_text_config(), "tie_word_embeddings", False):
        raise ValueError(f"{path}: the output head is quantized, but the config ties it to the input embeddings")
    # A tied pair is saved once (either side); tying also re-links what assign=True replaced.
    model.tie_weights(missing_keys=set(_meta_tensors(model)))
    missing = _meta_tensors(model)
    if missing:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {_few(missing)}")


def _meta_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device, i.e. not loaded."""
    return [n for n, t in list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False)) if t.is_meta]


def _few(names: list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def gptq_folder_problems(path: str | Path, flag: str = "--base_model") -> list[str]:
    """What would stop ``load_gptq_model`` on ``path``, found from the config and the safetensors headers alone."""
    try:
        gptq_settings(path)
    except ValueError as exc:
        return [f"{flag} {exc}"]
    return _weights_problems(path, flag, "a GPTQ folder")


def _weights_problems(path: str | Path, flag: str, what: str) -> list[str]:
    """No safetensors weights, or a file that is missing or damaged (headers only)."""
    from utils.weights.folders import safetensors_problem

    files = weight_files(path)
    if not files:
        return [f"{flag} {path}: no safetensors weights ({what} needs model.safetensors or shards)"]
    return [f"{flag} {path}: {why}" for why in (safetensors_problem(f) if f.is_file() else f"{f.name} is missing"
                                                for f in files) if why]


# -------------------------------------------------------------------------------- every quantized folder


def quantized_format(path: str | Path) -> str | None:
    """Which quantized folder ``path`` is: ``"gptq"`` (as ``is_gptq_folder``), ``"chatglm_rowwise"``,
    ``"llmzoo_groupwise"``, ``"bitsandbytes"`` (a pre-quantized folder as transformers' ``save_pretrained`` of a
    bitsandbytes model writes it), or None (not quantized, or a method transformers itself must read)."""
    if is_gptq_folder(path):
        return GPTQ
    config = (_read_json(Path(path) / CONFIG) or {}).get("quantization_config")
    if not isinstance(config, dict):
        return None
    method = str(config.get("quant_method", "")).lower()
    return method if method in QUANTIZED_FORMATS else None


def seed_settings(path: str | Path) -> dict:
    """The settings of a ``chatglm_rowwise`` / ``llmzoo_groupwise`` folder (``rowwise.settings_from_config``).

    Raises:
        ValueError: no quantization_config, another method, or a value out of range (named, with the folder).
    """
    config = (_read_json(Path(path) / CONFIG) or {}).get("quantization_config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: no quantization_config in {CONFIG}")
    try:
        return rowwise.settings_from_config(config)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def bnb_kind(path: str | Path) -> str:
    """``"nf4"``, ``"fp4"`` or ``"int8"``: what a bitsandbytes folder's quantization_config holds.

    Raises:
        ValueError: neither 4-bit nor 8-bit, or an unknown 4-bit type.
    """
    config = (_read_json(Path(path) / CONFIG) or {}).get("quantization_config") or {}
    flag = lambda key: bool(config.get(key, config.get(f"_{key}", False)))  # noqa: E731 - both spellings are written
    if flag("load_in_8bit"):
        return "int8"
    if flag("load_in_4bit"):
        kind = str(config.get("bnb_4bit_quant_type", "fp4")).lower()  # fp4: BitsAndBytesConfig's default
        if kind not in ("nf4", "fp4"):
            raise ValueError(f"{path}: bnb_4bit_quant_type {kind!r}; expected nf4 or fp4")
        return kind
    raise ValueError(f"{path}: quant_method bitsandbytes, but neither load_in_4bit nor load_in_8bit is set")


def quantization_label(path: str | Path) -> str:
    """What a quantized folder holds, in one word: ``gptq-4bit``, ``int8_row``, ``int4_row``, ``groupwise-8bit``,
    ``bnb-nf4``, ``bnb-fp4`` or ``bnb-int8``.

    Raises:
        ValueError: not a quantized folder, or a config whose settings are invalid.
    """
    fmt = quantized_format(path)
    if fmt == GPTQ:
        return f"gptq-{gptq_settings(path)['bits']}bit"
    if fmt == rowwise.ROWWISE:
        return f"int{seed_settings(path)['bits']}_row"
    if fmt == rowwise.GROUPWISE:
        return f"groupwise-{seed_settings(path)['bits']}bit"
    if fmt == BITSANDBYTES:
        return f"bnb-{bnb_kind(path)}"
    raise ValueError(f"{path}: not a quantized folder this loader knows ({', '.join(QUANTIZED_FORMATS)})")


def quantized_folder_problems(path: str | Path, flag: str = "--base_model") -> list[str]:
    """What would stop ``load_quantized_model`` on ``path``, from its config, the safetensors headers and (for
    bitsandbytes) whether the library imports; no tensor is read."""
    fmt = quantized_format(path)
    if fmt is None:
        return [f"{flag} {path}: not a quantized folder ({', '.join(QUANTIZED_FORMATS)})"]
    if fmt == GPTQ:
        return gptq_folder_problems(path, flag)
    if fmt == BITSANDBYTES:
        return _bnb_problems(path, flag)
    try:
        seed_settings(path)
    except ValueError as exc:
        return [f"{flag} {exc}"]
    return _weights_problems(path, flag, f"a {fmt} folder")


def _bnb_problems(path: str | Path, flag: str) -> list[str]:
    import importlib

    from utils.weights.folders import check_model_dir

    try:
        bnb_kind(path)
    except ValueError as exc:
        return [f"{flag} {exc}"]
    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # noqa: BLE001 - a broken install raises more than ImportError
        return [f"{flag} {path} is quantized by bitsandbytes, which cannot be imported here "
                f"({type(exc).__name__}: {exc})"]
    return check_model_dir(str(path), flag=flag)


def load_quantized_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         trust_remote_code: bool = False, backend: str | None = None) -> Any:
    """The causal LM of any quantized folder (``quantized_format``), on ``device``, in eval mode.

    GPTQ goes through ``load_gptq_model``; ChatGLM row-wise and LLMZoo group-wise layers become ``RowwiseLinear`` /
    ``GroupwiseLinear`` (a layer is quantized when the checkpoint holds its ``.weight_scale``; every other layer
    loads as stored); a bitsandbytes folder loads through transformers, which reads its quantization_config, with
    4-bit layers whose widths the packed CPU kernel cannot take kept on the generic path
    (``keep_bnb_cpu_layout``).

    Args:
        path: the folder.
        device: where the model goes.
        dtype: of every floating-point tensor outside the quantized layers' codes and scales.
        trust_remote_code: passed to transformers for configs with custom code.
        backend: GPTQ: force one kernel backend (``kernels.BACKENDS``); row-wise / group-wise: None or
            ``"torch"``, their only one; bitsandbytes: None.

    Returns:
        The model, with ``model.quant_backend`` saying how its quantized layers run, ``model.quant_settings``
        (the folder's settings) and ``model.quant_label`` (``quantization_label``); GPTQ models also keep
        ``model.gptq_backend`` / ``model.gptq_settings``.

    Raises:
        ValueError: not a quantized folder, invalid settings, a backend the format does not have, a tensor the
            model lacks or one the checkpoint lacks, a shape that does not fit (named), no quantized layer.
    """
    fmt = quantized_format(path)
    label = quantization_label(path)
    if fmt == GPTQ:
        model = load_gptq_model(path, device, dtype, trust_remote_code, backend)
    elif fmt == BITSANDBYTES:
        if backend is not None:
            raise ValueError(f"{path}: bitsandbytes layers run on bitsandbytes' own kernels; backend {backend!r} "
                             "cannot be chosen")
        model = _load_bnb(path, device, dtype, trust_remote_code)
    else:
        if backend not in (None, "torch"):
            raise ValueError(f"{path}: {fmt} layers run on the torch backend only, not {backend!r}")
        model = _load_seed_model(path, device, dtype, trust_remote_code)
    model.quant_label = label
    return model


def _load_seed_model(path: str | Path, device, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """A ``chatglm_rowwise`` / ``llmzoo_groupwise`` folder as a model (see ``load_quantized_model``)."""
    settings = seed_settings(path)
    model, config, tensors = _empty_model(path, dtype, trust_remote_code)
    layers = _replace_layers(model, tensors, "weight_scale", lambda name, linear: _seed_layer(
        path, name, linear, tensors, settings, dtype))
    names = {n for n, m in model.named_modules() if isinstance(m, (RowwiseLinear, GroupwiseLinear))}
    if not layers:
        raise ValueError(f"{path}: quantization_config says {settings['quant_method']}, but no linear layer of the "
                         "model has a .weight_scale in the checkpoint")
    listed = set(settings["modules"] or names)
    if listed != names:
        unstored, unlisted = sorted(listed - names), sorted(names - listed)
        raise ValueError(f"{path}: the checkpoint's quantized layers differ from quantization_config's modules"
                         + (f"; listed but not stored quantized (no .weight_scale): {_few(unstored)}"
                            if unstored else "")
                         + (f"; stored quantized but not listed: {_few(unlisted)}" if unlisted else ""))
    _load_the_rest(path, model, config, tensors, dtype)
    model.to(device)
    model.eval()
    model.quant_backend = rowwise.BACKEND
    model.quant_settings = settings
    return model


def _seed_layer(path: str | Path, name: str, linear: torch.nn.Linear, tensors: dict, settings: dict,
                dtype: torch.dtype) -> torch.nn.Module:
    """The ``RowwiseLinear`` / ``GroupwiseLinear`` replacing ``linear``, its tensors taken out of ``tensors`` and
    checked against the layer's shape."""
    parts = {k: tensors.pop(f"{name}.{k}") for k in ("weight", "weight_scale", "weight_mn")
             if f"{name}.{k}" in tensors}
    bias = _take_bias(path, name, linear, tensors)
    bias = None if bias is None else bias.to(dtype)
    shape = linear.in_features, linear.out_features
    try:
        if settings["quant_method"] == rowwise.ROWWISE:
            return RowwiseLinear.from_tensors(parts, *shape, settings["bits"], bias, name=name)
        compression = rowwise.layer_compression(settings, linear.out_features, linear.in_features)
        return GroupwiseLinear.from_tensors(parts, *shape, compression, bias, name=name)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _load_bnb(path: str | Path, device, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """A pre-quantized bitsandbytes folder through transformers (it reads the folder's quantization_config).

    The placement is given explicitly: without a ``device_map`` transformers 5.23's bitsandbytes quantizers
    (``update_device_map``) put the model on the first CUDA device whenever one exists, whatever was asked.
    """
    from transformers import AutoModelForCausalLM

    from utils.weights.pretrained import keep_bnb_cpu_layout

    kind = bnb_kind(path)
    target = str(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True, use_safetensors=True,
        device_map={"": 0 if target == "cuda" else target})
    generic = keep_bnb_cpu_layout(model) if kind != "int8" else 0
    model.eval()
    model.quant_backend = f"bitsandbytes {kind} on {target}" + (
        f" ({generic} layers on the generic 4-bit path: their widths do not fit the packed CPU kernel)"
        if generic else "")
    model.quant_settings = {"quant_method": BITSANDBYTES, "kind": kind}
    return model


def _bnb_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The float32 weight of a bitsandbytes 4-bit / 8-bit linear layer, or None for any other module."""
    kind = type(module).__name__
    if kind in ("Linear4bit", "LinearFP4", "LinearNF4"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if kind == "Linear8bitLt":
        w = module.weight
        codes = getattr(w, "CB", None)
        codes = w.data if codes is None else codes
        scale = getattr(w, "SCB", None)
        if scale is None:  # not quantized yet (still float)
            return w.data.float()
        return codes.float() * scale.float()[:, None] / 127
    return None


@torch.no_grad()
def dequantize_model(model: torch.nn.Module) -> list[str]:
    """Replace every quantized linear layer of ``model`` (GPTQ, row-wise, group-wise, bitsandbytes 4 / 8-bit) with
    a float32 ``nn.Linear`` holding its dequantized weight, in place: the model the layers compute, as plain
    floating point (what an adapter trained on the quantized base was trained against). Returns the names of the
    layers replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQLinear):
            weight = module.dequantized_weight(torch.float32, torch.device("cpu"))
        elif isinstance(module, (RowwiseLinear, GroupwiseLinear)):
            weight = module.dequantize().float()
        else:
            weight = _bnb_weight(module)
        if weight is None:
            continue
        bias = getattr(module, "bias", None)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="cpu")
        linear.weight.copy_(weight.cpu())
        if bias is not None:
            linear.bias.copy_(bias.float().cpu())
        _set_module(model, name, linear)
        replaced.append(name)
    return replaced
