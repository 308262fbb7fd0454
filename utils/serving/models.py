"""What one server process serves: one base model and any number of adapters of it, as variants of one engine.

The base weights are loaded once. LoRA-family adapters (LoRA, DoRA, ...) go into one multi-adapter PEFT model,
and a variant selects its adapter before each of its forward passes; prompt-learning adapters (prefix /
P-tuning v2, p-tuning, prompt tuning) leave the base's modules alone and get a PEFT wrapper each, which runs with
the LoRA layers switched off. The base itself is a variant too, with every adapter off. Rows of different
variants never share a forward pass (``utils.inference.generation``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import SuiteError


@dataclass
class Artifact:
    """A model id and the loading plan of what answers it (``utils.inference.loading.prepare``)."""

    name: str
    plan: Any
    is_base: bool = False


def parse_adapters(text: str | dict | None) -> tuple[list[tuple[str, str]], list[str]]:
    """``--adapters name=path,name2=path2`` (or a dict, as Fire may pass it) -> ([(name, path)], problems)."""
    if not text:
        return [], []
    if isinstance(text, dict):
        items = [(str(k), str(v)) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, sep, path = part.partition("=")
            items.append((name.strip(), path.strip()) if sep else ("", part.strip()))
    problems, seen = [], set()
    for name, path in items:
        if not name or not path:
            problems.append(f"--adapters: {name or path!r} is not NAME=PATH")
        elif name in seen:
            problems.append(f"--adapters: the name {name!r} is given twice")
        elif not Path(path).is_dir():
            problems.append(f"--adapters {name}={path}: no such folder")
        seen.add(name)
    return items, problems


def same_base(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _lora_like(plan) -> bool:
    return bool(plan.source.adapter) and (plan.source.method or "").lower() not in (
        "prefix_tuning", "prompt_tuning", "p_tuning", "prefix", "prompt", "ptuning")


def load_engine(artifacts: list[Artifact], fast: bool | None, log) -> tuple[Any, dict[str, str]]:
    """Load the base once, attach every adapter, and build one engine with a variant per artifact.

    Returns (engine, {model id: variant name}); the first artifact is the engine's default variant.
    """
    from peft import PeftModel

    from utils.inference.generation import Engine
    from utils.inference.loading import load_model

    first = artifacts[0].plan
    plain = dataclasses.replace(first, source=dataclasses.replace(first.source, adapter=None))
    base = load_model(plain, log=log).model
    lora_model = None
    views: dict[str, Any] = {}
    activate: dict[str, Any] = {}
    # PEFT's own adapter names, not the model ids: an id such as "lora" or "prefix" inside PEFT's parameter
    # prefixes ("lora_", "prefix_tuning_") could make it re-initialise the weights it loads.
    internal = {a.name: f"served{i}" for i, a in enumerate(artifacts)}
    for a in artifacts:
        if not a.plan.source.adapter:
            continue
        path = a.plan.source.adapter
        tag = internal[a.name]
        try:
            if _lora_like(a.plan):
                if lora_model is None:
                    lora_model = PeftModel.from_pretrained(base, path, adapter_name=tag, is_trainable=False)
                else:
                    lora_model.load_adapter(path, adapter_name=tag, is_trainable=False)
                views[a.name] = lora_model
            else:
                views[a.name] = PeftModel.from_pretrained(base, path, adapter_name=tag, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SuiteError(f"adapter {a.name} ({path}): cannot be applied to {first.source.base}: "
                             f"{str(exc).splitlines()[0][:300]}") from None
        log(f"serve: {a.name}: {a.plan.source.method or 'adapter'} {path}")

    def lora_off():
        return lora_model.disable_adapter() if lora_model is not None else contextlib.nullcontext()

    def selecting(name: str):
        @contextlib.contextmanager
        def on():
            lora_model.set_adapter(name)
            yield
        return on

    for a in artifacts:
        if not a.plan.source.adapter:
            views[a.name], activate[a.name] = (lora_model.get_base_model() if lora_model is not None else base), lora_off
        elif views[a.name] is lora_model:
            activate[a.name] = selecting(internal[a.name])
        else:
            activate[a.name] = lora_off
    head = artifacts[0]
    try:
        engine = Engine(views[head.name], first.tokenizer, first.template, fast=fast)
    except ValueError as exc:
        raise SuiteError(f"--fast on: {exc}") from None
    engine.variants["default"].activate = activate[head.name]
    names = {head.name: "default"}
    for a in artifacts[1:]:
        # --fast on is a requirement on the primary model; the others take the lean path where it applies.
        engine.add_variant(a.name, views[a.name], a.plan.template, fast=False if fast is False else None,
                           activate=activate[a.name])
        names[a.name] = a.name
    return engine, names
