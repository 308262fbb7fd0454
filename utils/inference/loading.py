"""One entry point to load anything the suite writes, for generation, serving, evaluation and quantization.

``load_for_inference(base_model, lora_weights, ...)`` accepts:

* a base model folder (Hugging Face layout, safetensors);
* a ``finetune.py`` output folder, given as either argument: its ``pipeline.json`` names the base
  model, the adapter is the folder itself, the template is its ``template.json``; a full fine-tune
  is a model folder of its own;
* a base model plus any PEFT adapter folder: LoRA (kept unmerged), prefix / P-tuning v2, p-tuning or
  prompt tuning;
* a merged or exported model folder (any folder with config.json and weights);
* bitsandbytes 8-bit or 4-bit loading of the base;
* a quantized folder (``utils.quant.checkpoint.quantized_format``): GPTQ, ChatGLM row-wise int8 / int4, LLMZoo
  group-wise, or pre-quantized bitsandbytes; ``info["quantization"]`` is its label (``gptq-4bit``, ``int8_row``,
  ``groupwise-8bit``, ``bnb-nf4``, ...) and ``info["quantization_backend"]`` how its layers run.

``prepare(...)`` does everything but reading the weights (every check, tokenizer, template, the record of
what will be loaded) and ``load_model(plan)`` the rest, so a stage can refuse its input, or find that it has
nothing to do, before the heavy part. An incomplete folder fails in ``prepare``, naming the folder and what is
missing: no config.json, no weights or a missing shard, a truncated safetensors file, no tokenizer files, an
adapter without adapter_model.safetensors.

Before any weight is read, the adapter is also checked against the base: against the base fingerprint
``finetune.py`` recorded (config and weight hashes), and against the shapes in the adapter's and the
base's safetensors headers, so a wrong base fails with a message instead of a shape error deep in
peft (or, worse, a silently wrong model). Safe by default: safetensors only, no remote code, unless
the caller opts in.

Devices: ``device`` cpu, cuda, cuda:N, mps or auto; ``dtype`` fp32, bf16, fp16 (refused on CPU, where
it has no fast kernels) or auto; ``device_map`` auto | balanced | sequential (with ``max_memory``)
spreads decoder layers over the GPUs by their size (``plan_device_map``, ChatGLM's
``auto_configure_device_map`` generalised to any architecture).
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.cli import parse_size
from utils.dtypes import torch_dtype_of
from utils.errors import SuiteError
from utils.weights.folders import (check_model_dir, missing_folder, needs_remote_code, safetensors_problem, tokenizer_problems)
from utils.data.templates import available_templates, load_template, template_from_dict
from utils.artifacts import OutputInfo, base_fingerprint, finished_output
from utils.weights.pretrained import bnb_config, keep_bnb_cpu_layout

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICE_MAPS = ("auto", "balanced", "sequential")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    template: Any  # utils.data.templates.Template, or None when neither the artifact nor the caller names one
    info: dict = field(default_factory=dict)  # what was loaded, for records (paths, method, dtype, device)


@dataclass
class ModelSource:
    """What the arguments point at, resolved from folders and metadata (no weights read)."""

    base: str
    adapter: str | None = None
    method: str | None = None  # lora, prefix, prompt, ptuning, ... (peft_type lower-cased) or None
    template_file: str | None = None
    tokenizer_dir: str = ""
    meta: OutputInfo | None = None  # the finetune pipeline.json of the adapter (or full model)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _has_tokenizer(folder: Path) -> bool:
    return not tokenizer_problems(str(folder))


def template_problems(name: str | None, flag: str = "--prompt_template") -> list[str]:
    """An unknown template name (with the closest built-in one) or a missing template file, found before anything
    is loaded: a bad argument, not bad input."""


    if not name:
        return []
    if name.endswith(".json") or "/" in name or os.sep in name:
        return [] if Path(name).is_file() else [f"{flag} {name}: no such template file"]
    names = available_templates()
    if name in names:
        return []
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    return [f"{flag} {name}: unknown template" + (f" (did you mean {close[0]}?)" if close else "")
            + f"; built-in: {', '.join(names)}, or a path to a template JSON"]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_source(base_model: str | None, lora_weights: str | None) -> ModelSource:
    """Work out base, adapter, template and tokenizer from the two path arguments.

    Raises:
        SuiteError: naming the flag whose folder is unusable.
    """
    base_model = base_model or None
    lora_weights = lora_weights or None
    if base_model and lora_weights is None and is_adapter_dir(base_model):
        base_model, lora_weights = None, base_model  # a finetune (adapter) folder given as the model
    meta = None
    adapter = None
    method = None
    if lora_weights:
        folder = Path(lora_weights)
        if not folder.is_dir():
            raise SuiteError(missing_folder(lora_weights, "--lora_weights").replace("(models are", "(adapters are"))
        if not is_adapter_dir(folder):
            raise SuiteError(f"--lora_weights {lora_weights}: no {ADAPTER_CONFIG} (not a PEFT adapter or finetune "
                             "output folder)")
        cfg = _read_json(folder / ADAPTER_CONFIG)
        if cfg is None:
            raise SuiteError(f"--lora_weights {lora_weights}: {ADAPTER_CONFIG} is not valid JSON")
        adapter = str(folder)
        method = str(cfg.get("peft_type", "?")).lower()
        meta = _finetune_meta(folder, "--lora_weights")
        if base_model is None:
            recorded = (meta.base_model.get("path") if meta else None) or cfg.get("base_model_name_or_path")
            if not recorded:
                raise SuiteError(f"--lora_weights {lora_weights} does not record its base model; pass --base_model")
            if not Path(recorded).is_dir():
                raise SuiteError(f"--lora_weights {lora_weights} was trained on {recorded}, which is not a local "
                                 "folder here; pass --base_model")
            base_model = recorded
    if base_model is None:
        raise SuiteError("--base_model is required (a model folder, or a finetune output folder)")
    base_meta = _finetune_meta(Path(base_model), "--base_model")
    if meta is None and base_meta is not None:
        meta = base_meta  # a full fine-tune: the model folder is the finetune output
    template_file = None
    for folder in ([Path(adapter)] if adapter else []) + [Path(base_model)]:
        if (folder / "template.json").is_file():
            template_file = str(folder / "template.json")
            break
    tokenizer_dir = adapter if adapter and _has_tokenizer(Path(adapter)) else base_model
    return ModelSource(base=str(base_model), adapter=adapter, method=method, template_file=template_file,
                  tokenizer_dir=str(tokenizer_dir), meta=meta)


def _finetune_meta(folder: Path, flag: str) -> OutputInfo | None:
    """The record of the finetune run ``folder`` holds (None if it is not one); refused if it did not finish."""
    return finished_output(folder, "finetune", flag)


# -- checks before loading ------------------------------------------------------------------------


def safetensors_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a model folder (no tensor data read)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = _read_json(folder / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values())) if index and "weight_map" in index else \
        [p.name for p in sorted(folder.glob("*.safetensors"))]
    shapes = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_adapter(source: ModelSource, allow_pickle_weights: bool = False, allow_base_mismatch: bool = False) -> list[str]:
    """Problems with loading ``source.adapter`` onto ``source.base`` (empty when it fits)."""
    if not source.adapter:
        return []
    folder = Path(source.adapter)
    adapter_shapes, problems = _adapter_shapes(folder, allow_pickle_weights)
    if adapter_shapes is None:
        return problems
    problems = _base_mismatch(source, folder, allow_base_mismatch)
    if source.method == "lora":
        problems += _lora_fit(source, folder, adapter_shapes)
    elif source.method in ("prefix_tuning", "prompt_tuning", "p_tuning"):
        problems += _virtual_tokens_fit(source, folder)
    return problems


def _adapter_shapes(folder: Path, allow_pickle_weights: bool) -> tuple[dict | None, list[str]]:
    """(tensor name -> shape of the adapter's safetensors, []), or (None, problems) when its weights are missing,
    damaged or empty; (None, []) for allowed pickle weights, which are not checked further."""
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / ADAPTER_PICKLE).is_file():
            if not allow_pickle_weights:
                return None, [f"--lora_weights {folder}: only pickle weights ({ADAPTER_PICKLE}); pass "
                              "--allow_pickle_weights to load them with torch.load(weights_only=True), or convert to "
                              "safetensors"]
            return None, []
        return None, [f"--lora_weights {folder}: no {ADAPTER_WEIGHTS} (an unfinished or partly copied adapter folder)"]
    damaged = safetensors_problem(weights)
    if damaged:
        return None, [f"--lora_weights {folder}: {damaged}"]
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if not shapes:
        return None, [f"--lora_weights {folder}: {ADAPTER_WEIGHTS} holds no tensors (an empty adapter, e.g. one saved "
                      "through a broken state_dict override); re-export it"]
    return shapes, []


def _base_mismatch(source: ModelSource, folder: Path, allow_base_mismatch: bool) -> list[str]:
    """The base differs from the one the adapter was trained on (the base fingerprint finetune.py recorded)."""
    recorded = source.meta.base_model.get("fingerprint") if source.meta else None
    if not recorded or source.meta.raw.get("method") == "full":
        return []

    try:
        actual = base_fingerprint(source.base)
    except OSError as exc:
        actual = {"error": str(exc)}
    if actual == recorded or allow_base_mismatch:
        return []
    return [f"--lora_weights {folder} was trained on {source.meta.base_model.get('path')}, and --base_model "
            f"{source.base} is a different model (its config or weights differ from the recorded fingerprint); "
            "pass the base it was trained on, or --allow_base_mismatch if you know they are equivalent"]


def _lora_fit(source: ModelSource, folder: Path, adapter_shapes: dict) -> list[str]:
    """LoRA matrices whose target is not in the base, or whose size does not match the base layer's."""
    base_shapes = safetensors_shapes(source.base)
    if any(k.endswith(".qweight") for k in base_shapes):  # GPTQ layers store qweight, not weight: their true shape
        from utils.quant.adapters import layer_shapes

        base_shapes = {**base_shapes, **{f"{k}.weight": v for k, v in layer_shapes(source.base).items()}}
    bad = []
    for key, shape in adapter_shapes.items():
        m = re.match(r"(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not m or len(shape) != 2:
            continue
        target = base_shapes.get(m.group(1) + ".weight")
        if target is None:
            bad.append(f"{m.group(1)} (not in the base model)")
        elif len(target) == 2:
            want_in, want_out = target[1], target[0]
            got = shape[1] if m.group(2) == "A" else shape[0]
            if got != (want_in if m.group(2) == "A" else want_out):
                bad.append(f"{m.group(1)}: adapter {'input' if m.group(2) == 'A' else 'output'} size {got}, "
                           f"base layer {tuple(target)}")
    if not bad:
        return []
    return [f"--lora_weights {folder} does not fit --base_model {source.base}: "
            + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")]


def _virtual_tokens_fit(source: ModelSource, folder: Path) -> list[str]:
    """A prefix / prompt / p-tuning adapter made for another number of layers or hidden size."""
    cfg = _read_json(folder / ADAPTER_CONFIG) or {}
    base_cfg = _read_json(Path(source.base) / "config.json") or {}
    layers, hidden = base_cfg.get("num_hidden_layers"), base_cfg.get("hidden_size")
    problems = []
    if cfg.get("num_layers") not in (None, layers):
        problems.append(f"--lora_weights {folder} was made for {cfg.get('num_layers')} layers; --base_model "
                        f"{source.base} has {layers}")
    if source.method != "prefix_tuning" and cfg.get("token_dim") not in (None, hidden):
        problems.append(f"--lora_weights {folder} was made for hidden size {cfg.get('token_dim')}; --base_model "
                        f"{source.base} has {hidden}")
    return problems


# -- devices and dtypes ---------------------------------------------------------------------------


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_problems(device: str, dtype: str) -> list[str]:
    import torch

    problems = []
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        problems.append(f"--device {device}: expected cpu, cuda, cuda:N, mps or auto")
    elif kind == "cuda" and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA device here")
    elif kind == "cuda" and ":" in device and int(device.split(":")[1] or 0) >= torch.cuda.device_count():
        problems.append(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        problems.append(f"--device {device}: MPS is not available here")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    elif dtype == "fp16" and kind == "cpu":
        problems.append("--dtype fp16 on CPU has no fast kernels (about 150x slower than bf16); use bf16 or fp32")
    elif dtype == "bf16" and kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append("--dtype bf16: this GPU does not support bf16; use fp16")
    return problems


def pick_dtype(dtype: str, device: str):
    """(the suite's dtype name, torch's dtype) for ``--dtype`` on ``device``; auto: bf16 (fp16 where the GPU lacks
    it) on CUDA, fp16 on MPS, fp32 on CPU."""
    import torch

    if dtype == "auto":
        kind = device.split(":")[0]
        if kind == "cuda":
            dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif kind == "mps":
            dtype = "fp16"
        else:
            dtype = "fp32"
    return dtype, torch_dtype_of(dtype)


def parse_max_memory(text: str | None) -> dict | None:
    """``0=20GiB,1=20GiB,cpu=64GiB`` -> {0: bytes, 1: bytes, "cpu": bytes}."""
    if not text:
        return None
    out: dict = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        key, sep, size = part.partition("=")
        if not sep:
            raise SuiteError(f"--max_memory: {part!r} is not DEVICE=SIZE (e.g. 0=20GiB,1=20GiB,cpu=64GiB)")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = parse_size(size, "--max_memory")
    return out


def model_units(model) -> tuple[list[tuple[str, int]], list[str]]:
    """Placement units of a (meta-device) model in forward order: the decoder layers one by one, every other
    top-level part whole. Returns ([(module name, bytes)], names of the decoder layers)."""
    import torch

    def size(module) -> int:
        return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return [(name, size(m)) for name, m in model.named_children()], []
    list_name, layers = max(lists, key=lambda item: size(item[1]))
    units: list[tuple[str, int]] = []
    before, after = [], []
    # Siblings of every module on the path to the layer list are units of their own.
    path = list_name.split(".")
    for depth in range(len(path)):
        parent_name = ".".join(path[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        seen_path = False
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if child_name == path[depth]:
                seen_path = True
                continue
            (after if seen_path else before).append((full, size(child)))
    layer_names = [f"{list_name}.{i}" for i in range(len(layers))]
    units = before + [(n, size(layers[i])) for i, n in enumerate(layer_names)] + after
    return units, layer_names


def plan_device_map(units: list[tuple[str, int]], layer_names: list[str], devices: list,
                    max_memory: dict | None = None, strategy: str = "balanced") -> dict[str, Any]:
    """Place ``units`` on ``devices``: the parts that are not decoder layers (embeddings, final norm, output
    head) on the first device, as ChatGLM does (inputs and logits live there), and the decoder layers in order.

    ``balanced`` (and ``auto``) gives each device about the same number of bytes; ``sequential`` fills each
    device up to its ``max_memory`` before using the next. A ``cpu`` entry in ``max_memory`` takes what the
    devices cannot hold (offload). Pure function of the sizes, so it is tested without GPUs.

    Raises:
        ValueError: when the model does not fit in ``max_memory``.
    """
    if not devices:
        raise ValueError("no devices to place the model on")
    if strategy not in DEVICE_MAPS:
        raise ValueError(f"--device_map {strategy}: expected one of {', '.join(DEVICE_MAPS)}")
    layer_set = set(layer_names)
    fixed = [(n, s) for n, s in units if n not in layer_set]
    layers = [(n, s) for n, s in units if n in layer_set]
    caps = {d: (max_memory or {}).get(d, float("inf")) for d in devices}
    used = {d: 0 for d in devices}
    plan: dict[str, Any] = {}
    first = devices[0]
    for name, s in fixed:
        plan[name] = first
        used[first] += s
    total = sum(s for _, s in units)
    if strategy in ("balanced", "auto"):
        target = total / len(devices)
        cum = used[first]
        for name, s in layers:
            d = devices[min(len(devices) - 1, int((cum + s / 2) // target))]
            plan[name], used[d], cum = d, used[d] + s, cum + s
        if all(used[d] <= caps[d] for d in devices):
            return plan
        for name, _ in layers:  # does not fit balanced: fall back to filling devices in order
            plan.pop(name)
        used = {d: 0 for d in devices}
        used[first] = sum(s for _, s in fixed)
    i = 0
    offload = (max_memory or {}).get("cpu")
    for name, s in layers:
        while i < len(devices) and used[devices[i]] + s > caps[devices[i]]:
            i += 1
        if i < len(devices):
            plan[name] = devices[i]
            used[devices[i]] += s
        elif offload is not None:
            plan[name] = "cpu"
            offload -= s
            if offload < 0:
                raise ValueError("the model does not fit in --max_memory, CPU offload included")
        else:
            raise ValueError(f"the model ({total / 2**30:.2f} GiB) does not fit in --max_memory "
                             f"({', '.join(f'{d}={c / 2**30:.2f}GiB' for d, c in caps.items())}); add devices, "
                             "raise the limits, or add cpu=SIZE to offload")
    if used[first] > caps[first]:
        raise ValueError(f"the embeddings and output head alone ({used[first] / 2**30:.2f} GiB) exceed --max_memory "
                         f"of device {first}")
    return plan


def _device_map_for(base: str, strategy: str, max_memory: dict | None, dtype, trust_remote_code: bool) -> dict:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    units, layer_names = model_units(skeleton)
    devices = [i for i in range(torch.cuda.device_count())] or ["cpu"]
    if max_memory:
        devices = [d for d in devices if d in max_memory] or devices
    plan = plan_device_map(units, layer_names, devices, max_memory, strategy)
    if getattr(skeleton, "_tied_weights_keys", None) and getattr(config, "tie_word_embeddings", False):
        head = next((n for n, _ in units if "lm_head" in n), None)
        emb = next((n for n, _ in units if "embed" in n), None)
        if head and emb:
            plan[head] = plan[emb]  # tied weights must live together
    return plan


# -- loading --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``load`` decides before reading a weight: the sources, checks passed, tokenizer, template and
    the record of what will be loaded (``info``, what batch outputs are keyed on)."""

    source: ModelSource
    tokenizer: Any
    template: Any
    info: dict
    device: str
    torch_dtype: Any
    kwargs: dict
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    quantized: str | None = None  # the base folder's quantized format (checkpoint.quantized_format), or None


def prepare(base_model: str | None = None, lora_weights: str | None = None, *, prompt_template: str | None = None,
            dtype: str = "auto", device: str = "auto", load_8bit: bool = False, load_4bit: bool = False,
            device_map: str | None = None, max_memory: str | dict | None = None, trust_remote_code: bool = False,
            allow_pickle_weights: bool = False, allow_base_mismatch: bool = False) -> Plan:
    """Resolve and check everything ``load`` needs, and load the tokenizer and template, without reading the model's
    weights: an incomplete folder (no config, weights, tokenizer or adapter weights; a truncated safetensors file)
    fails here, naming the folder and what is missing.

    Raises:
        SuiteError: every problem found, at once.
    """
    from utils.quant.checkpoint import quantization_label, quantized_format  # torch code: imported when loading

    source = resolve_source(base_model, lora_weights)
    device = pick_device(device)
    flag = "--base_model" if base_model else "base model"
    tok_flag = "--lora_weights" if source.tokenizer_dir == source.adapter else flag
    quantized = quantized_format(source.base) if Path(source.base).is_dir() else None
    problems = quantized_problems(source, quantized, flag, load_8bit, load_4bit, device_map) if quantized else \
        check_model_dir(source.base, allow_pickle_weights, flag=flag)
    problems += tokenizer_problems(source.tokenizer_dir, flag=tok_flag) if Path(source.tokenizer_dir).is_dir() else []
    problems += template_problems(prompt_template)
    problems += device_problems(device, dtype) + quantization_problems(load_8bit, load_4bit)
    memory, placement = _placement(device_map, max_memory)
    problems += placement
    if needs_remote_code(source.base) and not trust_remote_code:
        problems.append(f"base model {source.base} needs custom code (auto_map in config.json); pass "
                        "--trust_remote_code if you trust it")
    if not problems:
        problems += check_adapter(source, allow_pickle_weights, allow_base_mismatch)
    if problems:
        raise SuiteError("\n".join(problems))

    dtype_name, torch_dtype = pick_dtype(dtype, device)
    kwargs = _load_kwargs(source, device, torch_dtype, load_8bit, load_4bit, device_map, memory, trust_remote_code)
    tokenizer = _load_tokenizer(source.tokenizer_dir, tok_flag, trust_remote_code)
    template = load_template_for(source, prompt_template, tokenizer)
    info = {
        "base_model": os.path.abspath(source.base),
        "adapter": os.path.abspath(source.adapter) if source.adapter else None,
        "method": source.method or (source.meta.raw.get("method") if source.meta else None),
        "template": getattr(template, "name", None),
        "dtype": dtype_name,
        "device": device if device_map is None else f"device_map={device_map}",
        "quantization": quantization_label(source.base) if quantized else
        "8bit" if load_8bit else "4bit" if load_4bit else None,
        "model_id": Path(source.adapter or source.base).resolve().name,
    }
    return Plan(source, tokenizer, template, info, device, torch_dtype, kwargs, trust_remote_code,
                allow_pickle_weights, quantized)


#: How each quantized format is named in messages.
QUANTIZED_NAMES = {"gptq": "GPTQ", "chatglm_rowwise": "ChatGLM row-wise", "llmzoo_groupwise": "LLMZoo group-wise",
                   "bitsandbytes": "bitsandbytes"}


def quantized_problems(source: ModelSource, quantized: str, flag: str, load_8bit: bool, load_4bit: bool,
                       device_map: str | None) -> list[str]:
    """What stops a quantized folder (``checkpoint.quantized_format``) given as the base from loading: its config
    and weights (headers only), and the options that do not apply to an already quantized model."""
    from utils.quant.checkpoint import quantized_folder_problems

    name = QUANTIZED_NAMES.get(quantized, quantized)
    problems = quantized_folder_problems(source.base, flag)
    if load_8bit or load_4bit:
        problems.append(f"--load_{'8' if load_8bit else '4'}bit: {flag} {source.base} is already quantized ({name}); "
                        "drop the flag")
    if device_map is not None and quantized != "bitsandbytes":  # transformers places bitsandbytes layers itself
        problems.append(f"--device_map: not supported for a {name} model ({flag} {source.base}); pass --device "
                        "instead")
    from utils.quant.adapters import TRAINABLE_FORMATS

    if source.adapter and quantized not in TRAINABLE_FORMATS:
        problems.append(f"--lora_weights {source.adapter}: adapters on a {name} base ({source.base}) are not "
                        "supported; merge the adapter into the floating-point base before quantizing, or use a "
                        "GPTQ or bitsandbytes base")
    return problems


def gptq_problems(source: ModelSource, flag: str, load_8bit: bool, load_4bit: bool,
                  device_map: str | None) -> list[str]:
    """``quantized_problems`` for a GPTQ folder (kept for callers of the GPTQ-only name)."""
    return quantized_problems(source, "gptq", flag, load_8bit, load_4bit, device_map)


def quantization_problems(load_8bit: bool, load_4bit: bool) -> list[str]:
    """--load_8bit / --load_4bit: one at most, and bitsandbytes importable."""
    problems = []
    if load_8bit and load_4bit:
        problems.append("--load_8bit and --load_4bit exclude each other")
    if load_8bit or load_4bit:
        try:
            importlib.import_module("bitsandbytes")
        except Exception as exc:  # a broken install raises more than ImportError
            problems.append(f"--load_{'8' if load_8bit else '4'}bit needs bitsandbytes ({type(exc).__name__}: {exc})")
    return problems


def _placement(device_map: str | None, max_memory: str | dict | None) -> tuple[dict | None, list[str]]:
    """(--max_memory in bytes per device, problems with --device_map and --max_memory)."""
    problems = []
    if device_map is not None and device_map not in DEVICE_MAPS:
        problems.append(f"--device_map {device_map}: expected one of {', '.join(DEVICE_MAPS)}")
    try:
        memory = parse_max_memory(max_memory) if isinstance(max_memory, (str, type(None))) else dict(max_memory)
    except SuiteError as exc:
        problems.append(str(exc))
        memory = None
    if memory and device_map is None:
        problems.append("--max_memory needs --device_map auto|balanced|sequential")
    return memory, problems


def _load_kwargs(source: ModelSource, device: str, torch_dtype, load_8bit: bool, load_4bit: bool,
                 device_map: str | None, memory: dict | None, trust_remote_code: bool) -> dict:
    """from_pretrained's quantization and placement arguments."""
    kwargs: dict = {}
    if load_8bit or load_4bit:

        kwargs["quantization_config"] = bnb_config({"bits": 8 if load_8bit else 4, "quant_type": "nf4",
                                                    "double_quant": True}, torch_dtype)
        kwargs["device_map"] = {"": device if device != "cuda" else 0}
    if device_map is not None:
        try:
            kwargs["device_map"] = _device_map_for(source.base, device_map, memory, torch_dtype, trust_remote_code)
        except ValueError as exc:
            raise SuiteError(f"--device_map {device_map}: {exc}") from None
        if memory:
            kwargs["max_memory"] = memory
    return kwargs


def _load_tokenizer(folder: str, flag: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizers fail in many types (ValueError, OSError, Rust errors)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SuiteError(f"{flag} {folder}: cannot load the tokenizer ({first})") from None


def load_model(plan: Plan, log=None) -> Loaded:
    """Read the weights ``plan`` names (the heavy part of ``load``)."""
    from transformers import AutoModelForCausalLM

    log = log or (lambda msg: print(msg, file=sys.stderr))
    source, kwargs, device = plan.source, plan.kwargs, plan.device
    info = dict(plan.info)
    log(f"loading {source.base}" + (f" + {source.method} adapter {source.adapter}" if source.adapter else "")
        + f" ({info['dtype']}, {'device map' if info['device'].startswith('device_map=') else device}"
        + (", 8-bit" if info["quantization"] == "8bit" else ", 4-bit" if info["quantization"] == "4bit" else
           f", {info['quantization']}" if info["quantization"] else "") + ")")
    try:
        if plan.quantized and "device_map" not in kwargs:
            from utils.quant.checkpoint import load_quantized_model

            model = load_quantized_model(source.base, device, plan.torch_dtype, plan.trust_remote_code)
            log(f"{QUANTIZED_NAMES.get(plan.quantized, plan.quantized)} layers run on {model.quant_backend}")
            info["quantization_backend"] = model.quant_backend
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source.base, dtype=plan.torch_dtype, trust_remote_code=plan.trust_remote_code, local_files_only=True,
                use_safetensors=not plan.allow_pickle_weights, **kwargs)
    except (OSError, ValueError) as exc:  # e.g. weights that do not match config.json
        raise SuiteError(f"base model {source.base}: cannot be loaded: {str(exc).strip().splitlines()[0][:400]}") \
            from None
    if "device_map" not in kwargs and device != "cpu" and not plan.quantized:  # a quantized folder is placed as read
        model.to(device)
    if info["quantization"] in ("4bit", "bnb-nf4", "bnb-fp4"):
        # Odd widths (stories260K's 172-wide MLP) would fail in the packed CPU kernel. A pre-quantized folder went
        # through the same guard in load_quantized_model (unless a --device_map loaded it here); it is idempotent.
        keep_bnb_cpu_layout(model)
    if source.adapter:
        from utils.quant.adapters import attach_adapter  # PeftModel.from_pretrained, GPTQ layers taught to peft

        try:
            model = attach_adapter(model, source.adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SuiteError(f"--lora_weights {source.adapter}: cannot be applied to {source.base}: "
                             f"{str(exc).splitlines()[0][:400]}") from None
    model.eval()
    return Loaded(model, plan.tokenizer, plan.template, info)


def load_for_inference(base_model: str | None = None, lora_weights: str | None = None, *,
                       prompt_template: str | None = None,
         dtype: str = "auto", device: str = "auto", load_8bit: bool = False, load_4bit: bool = False,
         device_map: str | None = None, max_memory: str | dict | None = None, trust_remote_code: bool = False,
         allow_pickle_weights: bool = False, allow_base_mismatch: bool = False, log=None) -> Loaded:
    """Load model, tokenizer and template from the suite's artifacts (see module docstring): ``prepare`` (every
    check, tokenizer and template; no weights read), then ``load_model``.

    Raises:
        SuiteError: every problem found before loading, at once.
    """
    plan = prepare(base_model, lora_weights, prompt_template=prompt_template, dtype=dtype, device=device,
                   load_8bit=load_8bit, load_4bit=load_4bit, device_map=device_map, max_memory=max_memory,
                   trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights,
                   allow_base_mismatch=allow_base_mismatch)
    return load_model(plan, log)


def load_template_for(source: ModelSource, prompt_template: str | None, tokenizer) -> Any:
    """The caller's template, else the one the artifact carries, else None."""

    if prompt_template:
        return load_template(prompt_template, tokenizer=tokenizer)
    if source.template_file:
        data = _read_json(Path(source.template_file))
        if data is None:
            raise SuiteError(f"{source.template_file}: not a readable template")
        return template_from_dict({k: v for k, v in data.items() if k != "name"}, name=data.get("name", "artifact"),
                                  source=source.template_file, tokenizer=tokenizer)
    return None
