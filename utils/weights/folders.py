"""Checks of a local model folder from its files alone (no weights loaded): config, weights (whole, safetensors
unless allowed), tokenizer files, custom code; and the messages for a missing folder or a Hub id."""

from __future__ import annotations

import json
import re
from pathlib import Path


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# A Hub id as people paste it: "owner/name", no path prefix, no extension.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.fullmatch(path)) and not path.startswith(".") and not path.endswith((".json", ".jsonl"))


def missing_folder(path: str, flag: str) -> str:
    """The message for a model folder that does not exist; a Hub id is told that nothing is ever downloaded."""
    if looks_like_hub_id(path):
        return (f"{flag} {path}: no such folder. It looks like a Hugging Face Hub id, but this suite never downloads "
                f"anything: download it yourself (e.g. hf download {path} --local-dir DIR) and pass "
                "the local folder")
    return f"{flag} {path}: no such folder (models are never downloaded)"


def safetensors_problem(file: str | Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone (None when it is whole): missing, unreadable,
    not safetensors, or shorter than its header says (a copy or download that was cut off)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, 100 * 2**20):
                return f"{file.name} is not a safetensors file (or is truncated: {size} bytes)"
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        return f"{file.name} is missing"
    except OSError as exc:
        return f"{file.name} cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, ValueError):
        return f"{file.name} has a damaged header (not a safetensors file, or truncated)"
    if not isinstance(header, dict):
        return f"{file.name} has a damaged header (not a safetensors file)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return (f"{file.name} is truncated: {size:,} bytes, its header needs {need:,} (an interrupted copy or "
                "download?)")
    return None


def tokenizer_problems(path: str, flag: str = "--base_model") -> list[str]:
    """A folder without tokenizer files (as export_state_dict.py writes for a llama2.c file imported without
    --tokenizer): the same message as prepare_data.py, before anything heavy is loaded."""
    p = Path(path)
    vocab = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
    if any((p / f).is_file() for f in vocab) or any(p.glob("*.tiktoken")):
        return []
    cfg = p / "tokenizer_config.json"
    if cfg.is_file():
        try:
            if "auto_map" in json.loads(cfg.read_text(encoding="utf-8")):
                return []  # custom tokenizer code brings its own vocabulary files (checked when it loads)
        except (OSError, ValueError):
            return [f"{flag} {path}: tokenizer_config.json is not valid JSON"]
    return [f"{flag} {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); copy them from the model "
            "it came from (export_state_dict.py imports them with --tokenizer DIR)"]


def check_model_dir(path: str, allow_pickle: bool = False, flag: str = "--base_model") -> list[str]:
    """Problems with a local model folder (empty list if it is usable): missing folder, config.json or weights,
    and safetensors files that are damaged or shorter than their headers say (checked from the headers alone)."""
    p = Path(path)
    if not p.is_dir():
        return [missing_folder(path, flag)]
    if not (p / "config.json").is_file():
        return [f"{flag} {path}: no config.json (not a model folder)"]
    try:
        json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"{flag} {path}: config.json is not valid JSON"]
    index = p / SAFE_WEIGHTS[1]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{flag} {path}: {SAFE_WEIGHTS[1]} is damaged (no readable weight_map)"]
        bad = [why for why in (safetensors_problem(p / s) for s in shards) if why]
        return [f"{flag} {path}: {why}" for why in bad]
    if (p / SAFE_WEIGHTS[0]).is_file():
        why = safetensors_problem(p / SAFE_WEIGHTS[0])
        return [f"{flag} {path}: {why}"] if why else []
    if any((p / f).is_file() for f in PICKLE_WEIGHTS):
        if allow_pickle:
            return []
        return [f"{flag} {path}: only pickle weights (pytorch_model.bin); pass --allow_pickle_weights to load "
                "them with torch.load(weights_only=True), or convert to safetensors"]
    return [f"{flag} {path}: no weights (model.safetensors)"]


def needs_remote_code(path: str) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "auto_map" in config


