"""Reading a model folder's JSON (config.json, adapter_config.json) with errors that name the flag, the
config keys the conversions need, the dtype a config declares, and its RoPE parameters."""

from __future__ import annotations

import json
from pathlib import Path

from utils.dtypes import CONFIG_NAMES, FROM_CONFIG_NAME
from utils.errors import SuiteError


def read_folder_json(folder: str | Path, name: str, flag: str, missing: str = "") -> dict:
    """``folder/name`` parsed, or a SuiteError naming the flag (``missing`` says what its absence means)."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{flag} {folder}: no {name}{missing}") from None
    except ValueError as exc:
        raise SuiteError(f"{flag} {path}: not valid JSON ({exc})") from None


def read_config(folder: str | Path, flag: str) -> dict:
    return read_folder_json(folder, "config.json", flag)


# The config keys the conversions read, by model type (the layer-by-layer forward, Meta's params.json): a
# config without one would otherwise fail deep inside the work with a KeyError.
CONFIG_KEYS = {
    **{t: ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
       for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt2": ("n_embd", "n_layer", "n_head", "vocab_size"),
}


def check_config(config: dict, folder: str | Path, flag: str) -> dict:
    """Refuse a config.json that lacks what the conversion reads (its model_type, and the shape keys of the
    architectures converted here); returns the config."""
    if not isinstance(config, dict) or not config.get("model_type"):
        raise SuiteError(f"{flag} {folder}: config.json has no model_type (not a transformers model config)")
    missing = [k for k in CONFIG_KEYS.get(config["model_type"], ()) if not isinstance(config.get(k), int)]
    if missing:
        raise SuiteError(f"{flag} {folder}: config.json lacks {', '.join(missing)} (needed for a "
                         f"{config['model_type']} model; damaged or hand-edited?)")
    return config


def config_dtype(config: dict) -> str:
    """The suite's name (fp32/bf16/fp16) for the dtype a config declares (fp32 if none)."""
    return FROM_CONFIG_NAME.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), "fp32")


def set_config_dtype(config: dict, dtype: str) -> dict:
    config = dict(config)
    config["dtype"] = CONFIG_NAMES[dtype]
    if "torch_dtype" in config:
        config["torch_dtype"] = CONFIG_NAMES[dtype]
    return config


def rope_params(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope
