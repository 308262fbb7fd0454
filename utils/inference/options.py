"""The flags every inference stage shares (which model, how to load it, how a request becomes a prompt) and the
engine built from them: generate.py and serve.py load and prompt a model the same way."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

from utils.args import Group, unfingerprinted
from utils.data.templates import load_template
from utils.errors import SuiteError
from utils.inference.loading import load_model, prepare, template_problems

_RESOLVED = "counts as what it resolves to (the model record among the fingerprint's inputs): the same model " \
            "named another way gives the same answers"
_PLACEMENT = "where the model runs, not what it answers: a batch may resume on other devices"
_PERMISSION = "a permission: it only allows what is otherwise refused"


@dataclass(frozen=True)
class ModelInput(Group):
    """Which model: a folder, an adapter or finetune output, and the permissions reading them may need (what
    quantize.py takes; the stages that run a model add how to load it, ``ModelLoading``)."""

    base_model: str = unfingerprinted("", why=_RESOLVED)
    lora_weights: str = unfingerprinted("", why=_RESOLVED)
    trust_remote_code: bool = unfingerprinted(False, why=_PERMISSION)
    allow_pickle_weights: bool = unfingerprinted(False, why=_PERMISSION)
    allow_base_mismatch: bool = unfingerprinted(False, why=_PERMISSION)

    def problems(self) -> list[str]:
        return [] if self.base_model or self.lora_weights else ["--base_model or --lora_weights is required"]


@dataclass(frozen=True)
class ModelLoading(ModelInput):
    """Which model to load and how (utils.inference.loading.prepare's arguments): what every stage that runs a
    model shares (generation adds its decode path, ``Loading``)."""

    load_8bit: bool = False
    load_4bit: bool = False
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = unfingerprinted("auto", why=_RESOLVED)
    device: str = unfingerprinted("auto", why=_PLACEMENT)
    device_map: Literal["auto", "balanced", "sequential"] | None = unfingerprinted(None, why=_PLACEMENT)
    max_memory: str | None = unfingerprinted(None, why=_PLACEMENT)


@dataclass(frozen=True)
class Loading(ModelLoading):
    """The model, as generate.py and serve.py load it: with the choice of decode path."""

    fast: Literal["auto", "on", "off"] = unfingerprinted(
        "auto", why="the lean decode path gives the generic path's tokens (tests/test_generate_engine.py)")


@dataclass(frozen=True)
class Prompting(Group):
    """How a request becomes a prompt: the template, the system message, and what to do with a long prompt."""

    prompt_template: str = ""
    system: str | None = None
    truncate_prompt: bool = False

    def problems(self) -> list[str]:
        return template_problems(self.prompt_template)


def plan_loading(loading: ModelLoading, prompting: Prompting, raw: bool = False, stage: str = "generate"):
    """Check the model arguments and load tokenizer and template, without reading weights (utils.inference.loading.prepare).
    A raw ``--prompt`` has no template; otherwise a model that carries none gets alpaca."""

    plan = prepare(loading.base_model or None, loading.lora_weights or None,
                   prompt_template=prompting.prompt_template or None, dtype=loading.dtype, device=loading.device,
                   load_8bit=loading.load_8bit, load_4bit=loading.load_4bit, device_map=loading.device_map,
                   max_memory=loading.max_memory, trust_remote_code=loading.trust_remote_code,
                   allow_pickle_weights=loading.allow_pickle_weights, allow_base_mismatch=loading.allow_base_mismatch)
    if raw:
        plan.template = None  # sent as is: EOS and --stop end it, never a template's stop strings
        plan.info["template"] = None
    elif plan.template is None:

        plan.template = load_template("alpaca")
        plan.info["template"] = "alpaca"
        if os.environ.get("RANK", "0") == "0":
            print(f"{stage}: the model carries no template; using alpaca (pass --prompt_template)", file=sys.stderr)
    return plan


def build_engine(loading: Loading, prompting: Prompting, log=None, plan=None, raw: bool = False,
                 stage: str = "generate"):
    """(Engine, Loaded) for the arguments; ``plan`` from ``plan_loading`` when the checks already ran."""
    from utils.inference.generation import Engine

    loaded = load_model(plan or plan_loading(loading, prompting, raw=raw), log=log)
    fast = {"auto": None, "on": True, "off": False}[loading.fast]
    try:
        engine = Engine(loaded.model, loaded.tokenizer, loaded.template, fast=fast)
    except ValueError as exc:
        raise SuiteError(f"--fast on: {exc}") from None
    if log is None:
        print(f"{stage}: decoding with the {engine.runner.name} path; context {engine.context_len} tokens",
              file=sys.stderr)
    return engine, loaded


def render_prompt(template, messages: list, input: str | None = None) -> tuple[str, bool]:
    """(prompt text, add_special_tokens) for the conversation so far, ready for the assistant's turn."""
    rendered = template.render(messages, add_generation_prompt=True, input=input)
    return rendered.text, rendered.add_special_tokens


