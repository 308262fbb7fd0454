"""Generation stage: one-shot, interactive chat and batch generation from any model folder the suite writes.

Loads a base model, a finetune.py output folder (base, adapter and template from its metadata), a base
plus a LoRA / prefix / p-tuning / prompt-tuning adapter (unmerged), or a merged / fully fine-tuned
model, optionally 8-bit or 4-bit (bitsandbytes), on cpu / cuda / mps or spread over GPUs
(``--device_map``). Prompts are rendered with the template the artifact was trained with.

Modes:
    --instruction TEXT [--input TEXT]   one answer, rendered with the template; only the answer on stdout
    --prompt TEXT                       one continuation of TEXT sent as is (no template)
    --input_file F --output_file O      batch: JSONL/JSON rows in, JSONL answers out (resumable)
    (none of these)                     interactive chat on stdin, streamed; clear/reset, exit/stop

Examples:
    python generate.py --lora_weights runs/lora --instruction "Tom has 3 apples and buys 2 more. How many?"
    python generate.py --base_model MODEL --lora_weights runs/lora --input_file questions.jsonl \\
        --output_file answers.jsonl --batch_size 16
    torchrun --nproc_per_node 2 generate.py --lora_weights runs/lora --input_file q.jsonl --output_file a.jsonl
    python generate.py --lora_weights runs/chat        # chat
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal

from utils.errors import SuiteError, UsageError
from utils.cli import run

EXIT_WORDS = ("exit", "stop", "quit")
CLEAR_WORDS = ("clear", "reset")


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    prompt_template: str = "",
    instruction: str | None = None,
    input: str | None = None,
    prompt: str | None = None,
    system: str | None = None,
    input_file: str | None = None,
    output_file: str | None = None,
    instruction_field: str = "instruction",
    input_field: str = "input",
    text_field: str = "text",
    messages_field: str = "messages",
    id_field: str = "",
    batch_size: int = 16,
    max_new_tokens: int = 128,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    regulation_start: int = 0,
    max_time: float = 0.0,
    stop: list[str] = (),
    seed: int = 0,
    truncate_prompt: bool = False,
    strict: bool = False,
    max_bad_fraction: float = 0.01,
    overwrite: bool = False,
    load_8bit: bool = False,
    load_4bit: bool = False,
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    device: str = "auto",
    device_map: Literal["auto", "balanced", "sequential"] | None = None,
    max_memory: str | None = None,
    fast: Literal["auto", "on", "off"] = "auto",
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    allow_base_mismatch: bool = False,
) -> None:
    """Generate text with a base model, an adapter or a finetune.py output folder.

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base, adapter and template are used).
        lora_weights: An adapter folder (LoRA, prefix, p-tuning, prompt tuning) or a finetune.py output folder;
            its base model is read from its metadata unless --base_model is given.
        prompt_template: Template name or JSON path; default: the one the artifact was trained with (alpaca if
            it carries none).
        instruction: One-shot: the instruction, rendered with the template. Only the answer goes to stdout.
        input: One-shot: the optional input (context) of the instruction.
        prompt: One-shot: text sent to the model as is (no template, so no template stop strings: it ends at EOS,
            --stop or --max_new_tokens); its continuation goes to stdout.
        system: Chat and messages rows: the system message (default: the template's).
        input_file: Batch: JSONL or JSON array of rows (alpaca instruction/input, a question text, or OpenAI
            messages; see the *_field flags).
        output_file: Batch: JSONL answers (each input row plus response, finish_reason, token counts, model and
            settings). Resumed after a crash: rows already answered are skipped.
        instruction_field: Batch: field of the instruction.
        input_field: Batch: field of the optional input.
        text_field: Batch: field of a question sent as the instruction (Vicuna / LLMZoo questions).
        messages_field: Batch: field of an OpenAI-style message list (rendered with a conversation template).
        id_field: Batch: field that identifies a row (default: id, question_id or conversation_id when present,
            else the line number).
        batch_size: Batch: rows decoded together (left padding, grouped by prompt length; greedy output does not
            depend on it).
        max_new_tokens: Most tokens to generate per answer.
        min_new_tokens: Fewest tokens before EOS is allowed.
        temperature: Sampling temperature; 0 means greedy.
        top_p: Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: off).
        top_k: Keep the k most likely tokens when sampling (0: off).
        num_beams: Beam search with this many beams (1: off; needs --temperature 0).
        repetition_penalty: Penalty on every token already present, prompt included (MOSS semantics; 1: off).
        length_penalty: MOSS length regulation: EOS becomes this many times more likely per token after
            --regulation_start new tokens (1: off).
        regulation_start: New tokens after which --length_penalty starts.
        max_time: Stop each answer after this many seconds (0: no limit).
        stop: Extra stop strings (the template's apply too); the answer ends before the first one.
        seed: Seed for sampling.
        truncate_prompt: Cut a prompt that does not fit the context to its last tokens, instead of failing.
        strict: Batch: stop at the first bad row instead of skipping it.
        max_bad_fraction: Batch: fail before answering (nothing written) if more than this fraction of rows are
            malformed or cannot be rendered, as prepare_data.py does.
        overwrite: Batch: replace an output_file written with other settings or another model.
        load_8bit: Load the base model in 8-bit (bitsandbytes).
        load_4bit: Load the base model in 4-bit NF4 (bitsandbytes).
        dtype: auto (fp32 on CPU, bf16 or fp16 on GPUs), fp32, bf16 or fp16 (not on CPU).
        device: auto, cpu, cuda, cuda:N or mps.
        device_map: Spread the model over all GPUs by layer: auto / balanced (equal bytes per GPU) or
            sequential (fill each GPU up to --max_memory in turn).
        max_memory: Memory per device for --device_map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.
        fast: The lean decode path for Llama-shaped models: auto (where it applies), on (required) or off.
        trust_remote_code: Allow custom model code from the model folder to run.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin (loaded with weights_only=True).
        allow_base_mismatch: Apply an adapter to a base whose fingerprint differs from the one it was trained on.
    """
    args = dict(locals())
    args["stop"] = list(stop)
    settings, mode = validate(args)
    if mode == "batch":
        return batch(args, settings)
    engine, loaded = build_engine(args, raw=args["prompt"] is not None)
    if mode == "one-shot":
        one_shot(engine, loaded, args, settings)
    else:
        chat(engine, loaded, args, settings)


def generation_settings(a: dict):
    from utils.inference.generation import Settings

    return Settings(max_new_tokens=a["max_new_tokens"], min_new_tokens=a["min_new_tokens"],
                    temperature=a["temperature"], top_p=a["top_p"], top_k=a["top_k"], num_beams=a["num_beams"],
                    repetition_penalty=a["repetition_penalty"], length_penalty=a["length_penalty"],
                    regulation_start=a["regulation_start"], max_time=a["max_time"], seed=a["seed"],
                    stop=list(a["stop"]))


def validate(a: dict):
    """All argument problems at once; returns (settings, mode)."""
    settings = generation_settings(a)
    problems = settings.problems()
    if not a["base_model"] and not a["lora_weights"]:
        problems.append("--base_model or --lora_weights is required")
    one = [f for f in ("instruction", "prompt", "input_file") if a[f] is not None]
    if len(one) > 1:
        problems.append(f"--{' and --'.join(one)} exclude each other (one mode at a time)")
    if a["input"] is not None and a["instruction"] is None:
        problems.append("--input goes with --instruction")
    if (a["input_file"] is None) != (a["output_file"] is None):
        problems.append("--input_file and --output_file go together")
    from utils.inference.loading import template_problems

    problems += template_problems(a["prompt_template"])
    if not 0 <= a["max_bad_fraction"] <= 1:
        problems.append(f"--max_bad_fraction must be between 0 and 1, got {a['max_bad_fraction']}")
    if a["batch_size"] < 1:
        problems.append(f"--batch_size must be >= 1, got {a['batch_size']}")
    if a["input_file"] is not None and not Path(a["input_file"]).is_file():
        problems.append(f"--input_file {a['input_file']}: no such file")
    if a["output_file"] is not None and a["input_file"] is not None and \
            Path(a["output_file"]).absolute() == Path(a["input_file"]).absolute():
        problems.append("--output_file must not be the input file")
    if problems:
        raise UsageError("\n".join(problems))
    mode = "batch" if a["input_file"] else "one-shot" if one else "chat"
    return settings, mode


def plan_loading(a: dict, raw: bool = False):
    """Check the model arguments and load tokenizer and template, without reading weights (utils.inference.loading.prepare).
    A raw ``--prompt`` has no template; otherwise a model that carries none gets alpaca."""
    from utils.inference.loading import prepare

    plan = prepare(a["base_model"] or None, a["lora_weights"] or None, prompt_template=a["prompt_template"] or None,
                   dtype=a["dtype"], device=a["device"], load_8bit=a["load_8bit"], load_4bit=a["load_4bit"],
                   device_map=a["device_map"], max_memory=a["max_memory"], trust_remote_code=a["trust_remote_code"],
                   allow_pickle_weights=a["allow_pickle_weights"], allow_base_mismatch=a["allow_base_mismatch"])
    if raw:
        plan.template = None  # sent as is: EOS and --stop end it, never a template's stop strings
        plan.info["template"] = None
    elif plan.template is None:
        from utils.data.templates import load_template

        plan.template = load_template("alpaca")
        plan.info["template"] = "alpaca"
        if os.environ.get("RANK", "0") == "0":
            print("generate: the model carries no template; using alpaca (pass --prompt_template)", file=sys.stderr)
    return plan


def build_engine(a: dict, log=None, plan=None, raw: bool = False):
    """(Engine, Loaded) for the arguments; ``plan`` from ``plan_loading`` when the checks already ran."""
    from utils.inference.generation import Engine
    from utils.inference.loading import load_model

    loaded = load_model(plan or plan_loading(a, raw=raw), log=log)
    fast = {"auto": None, "on": True, "off": False}[a["fast"]]
    try:
        engine = Engine(loaded.model, loaded.tokenizer, loaded.template, fast=fast)
    except ValueError as exc:
        raise SuiteError(f"--fast on: {exc}") from None
    if log is None:
        print(f"generate: decoding with the {engine.runner.name} path; context {engine.context_len} tokens",
              file=sys.stderr)
    return engine, loaded


def render(template, messages: list, input: str | None = None) -> tuple[str, bool]:
    """(prompt text, add_special_tokens) for the conversation so far, ready for the assistant's turn."""
    rendered = template.render(messages, add_generation_prompt=True, input=input)
    return rendered.text, rendered.add_special_tokens


def fitted_ids(engine, text: str, special: bool, a: dict, what: str) -> list[int]:
    ids = engine.encode(text, add_special_tokens=special)
    try:
        return engine.fit(ids, a["max_new_tokens"], truncate=a["truncate_prompt"])
    except ValueError as exc:
        raise SuiteError(f"{what}: {exc}; shorten it, lower --max_new_tokens, or pass --truncate_prompt") from None


# -- one-shot ------------------------------------------------------------------------------------


def one_shot(engine, loaded, a: dict, settings) -> None:
    from utils.data.templates import Message

    if a["prompt"] is not None:
        text, special, what = a["prompt"], True, "--prompt"
    else:
        messages = ([Message("system", a["system"])] if a["system"] else []) + [Message("user", a["instruction"])]
        text, special = render(loaded.template, messages, input=a["input"])
        what = "--instruction"
    ids = fitted_ids(engine, text, special, a, what)
    started = time.perf_counter()
    stream = engine.stream(ids, settings)
    out = sys.stdout
    for chunk in stream:
        out.write(chunk)
        out.flush()
    out.write("\n")
    out.flush()
    c = stream.completion
    took = time.perf_counter() - started
    print(f"generate: {c.new_tokens} tokens in {took:.2f}s ({c.new_tokens / max(took, 1e-9):.1f} tokens/s), "
          f"finish: {c.finish_reason}", file=sys.stderr)


# -- chat ----------------------------------------------------------------------------------------


def chat(engine, loaded, a: dict, settings, stdin=None, stdout=None, stderr=None) -> None:
    """Multi-turn chat: stdin lines in, streamed answers on stdout, prompts and notes on stderr."""
    from utils.data.templates import Message

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    template = loaded.template
    multi_turn = template.kind != "instruction"
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    print(f"chat with {loaded.info.get('model_id')} ({template.name} template). Type clear or reset to forget the "
          "conversation, exit or stop to quit; Ctrl-C stops an answer." +
          ("" if multi_turn else " (An instruction template: every turn is answered on its own.)"), file=stderr)
    history: list = []
    while True:
        try:
            if tty:
                stderr.write("\nUser: ")
                stderr.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            stderr.write("\n")
            continue
        if not line:
            break
        query = line.strip()
        if not query:
            continue
        if query.lower() in EXIT_WORDS:
            break
        if query.lower() in CLEAR_WORDS:
            history = []
            print("(conversation cleared)", file=stderr)
            continue
        turns = history if multi_turn else []
        base = [Message("system", a["system"])] if a["system"] else []
        dropped = 0
        while True:
            messages = base + turns + [Message("user", query)]
            text, special = render(template, messages)
            ids = engine.encode(text, add_special_tokens=special)
            if len(ids) + settings.max_new_tokens <= engine.context_len or not turns:
                break
            turns, dropped = turns[2:], dropped + 1  # the oldest user/assistant pair goes first
        if dropped:
            print(f"(dropped the {dropped} oldest turn(s) to fit the context)", file=stderr)
        try:
            ids = engine.fit(ids, settings.max_new_tokens, truncate=a["truncate_prompt"])
        except ValueError as exc:
            print(f"generate: this message is too long: {exc} (pass --truncate_prompt to cut it)", file=stderr)
            continue
        if tty:
            stderr.write("Assistant: ")
            stderr.flush()
        stream = engine.stream(ids, settings)
        try:
            for chunk in stream:
                stdout.write(chunk)
                stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            print("\n(answer stopped)", file=stderr)
        stdout.write("\n")
        stdout.flush()
        answer = stream.completion.text
        history = turns + [Message("user", query), Message("assistant", answer)] if multi_turn else []


# -- batch ---------------------------------------------------------------------------------------


ID_FIELDS = ("id", "question_id", "conversation_id")


def read_rows(path: str, a: dict) -> tuple[list[dict], dict]:
    """Rows of ``path`` as {line, id, row, messages, input}; bad rows counted by reason with line numbers.

    Raises:
        SuiteError: an unreadable or empty file, no usable row, or (with --strict) the first bad row.
    """
    from utils.data.templates import Message

    p = Path(path)
    try:
        raw = p.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--input_file {path}: cannot read it ({exc})") from None
    if not raw.strip():
        raise SuiteError(f"--input_file {path}: empty file")
    records: list[tuple[int, Any]] = []
    bad: dict[str, list[int]] = {}

    def problem(reason: str, line: int) -> None:
        if a["strict"]:
            raise SuiteError(f"--input_file {path}:{line}: {reason} (--strict)")
        bad.setdefault(reason, []).append(line)

    text = raw.lstrip()
    if text.startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"--input_file {path}: not valid JSON ({exc})") from None
        records = list(enumerate(array, 1))
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError:
                problem("not valid JSON", n)
    rows = []
    seen_ids: set = set()
    for n, rec in records:
        if not isinstance(rec, dict):
            problem("not a JSON object", n)
            continue
        rid = rec.get(a["id_field"]) if a["id_field"] else next((rec[f] for f in ID_FIELDS if f in rec), None)
        if a["id_field"] and rid is None:
            problem(f"no {a['id_field']!r} field", n)
            continue
        rid = n if rid is None else rid
        if json.dumps(rid) in seen_ids:
            problem(f"duplicate id {rid!r}", n)
            continue
        messages, extra = None, None
        if a["messages_field"] in rec:
            msgs = rec[a["messages_field"]]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                problem(f"{a['messages_field']!r} is not a list of {{role, content}}", n)
                continue
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]  # a reference answer is not part of the prompt
            messages = [Message(m["role"], m["content"]) for m in msgs]
            if not any(m.role == "user" for m in messages):
                problem("no user message", n)
                continue
        else:
            query = rec.get(a["instruction_field"], rec.get(a["text_field"]))
            if not isinstance(query, str) or not query.strip():
                problem(f"no {a['instruction_field']!r} or {a['text_field']!r} text", n)
                continue
            extra = rec.get(a["input_field"]) if a["instruction_field"] in rec else None
            if extra is not None and not isinstance(extra, str):
                problem(f"{a['input_field']!r} is not a string", n)
                continue
            messages = [Message("user", query)]
        if a["system"] and messages[0].role != "system":
            messages = [Message("system", a["system"])] + messages
        seen_ids.add(json.dumps(rid))
        rows.append({"line": n, "id": rid, "row": rec, "messages": messages, "input": extra or None})
    if not rows:
        detail = "; ".join(f"{k}: {len(v)}" for k, v in bad.items())
        raise SuiteError(f"--input_file {path}: no usable row ({detail or 'no rows'})")
    return rows, bad


def settings_key(a: dict, info: dict, settings) -> dict:
    """What determines the answers: resumed rows must have been produced with the same."""
    return {"model": {k: info.get(k) for k in ("base_model", "adapter", "template", "dtype", "quantization")},
            "settings": settings.to_json(), "truncate_prompt": a["truncate_prompt"],
            "system": a["system"], "prompt_template": a["prompt_template"] or None}


def _read_done(paths: list[Path]) -> dict[str, dict]:
    """Answered rows of earlier (possibly crashed) runs by id; a torn last line is ignored."""
    done = {}
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the torn tail of a killed run
            if isinstance(rec, dict) and "id" in rec:
                done[json.dumps(rec["id"])] = rec
    return done


def _append(f, records: list[dict]) -> None:
    """Whole lines only, each batch made durable before the next starts."""
    if not records:
        return
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Drop an incomplete last line (a run killed mid-write), so appended lines start on a fresh line."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _dist():
    """(rank, world, local_rank, run token) under torchrun. The token (rank 0's, broadcast once, before any library
    code can issue collectives of its own) marks this run's completion files; ranks report completion through
    files rather than barriers, which model loading may pair with its own."""
    import uuid

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    token = uuid.uuid4().hex
    if world > 1:
        import torch
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        box = [token]
        td.broadcast_object_list(box, src=0)
        token = box[0]
    return rank, world, local, token


def _wait_for_ranks(out: Path, world: int, token: str) -> None:
    """Rank 0 waits until every other rank has written its completion file for this run."""
    pending = set(range(1, world))
    while pending:
        for r in list(pending):
            try:
                if (out.with_name(f"{out.name}.partial.rank{r}.done")).read_text() == token:
                    pending.discard(r)
            except OSError:
                pass
        if pending:
            time.sleep(0.2)


class Stopped(Exception):
    """SIGTERM or Ctrl-C during batch generation (raised between whole answer lines, never inside a write)."""


class StopSignals:
    """Turns SIGTERM / SIGINT into ``Stopped`` while answers are generated; a signal that arrives while a batch of
    answers is being written waits until the lines are whole and durable."""

    def __init__(self):
        self.requested: str | None = None
        self.writing = False
        import threading

        # Signal handlers can only be installed from the main thread (batch() called from a worker thread, as a
        # server might, keeps the default behaviour).
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if not self.writing:
            raise Stopped(self.requested)

    def write(self, f, records: list[dict]) -> None:
        """Append ``records`` (then emptied) as whole, durable lines; a signal received meanwhile is raised after."""
        self.writing = True
        try:
            _append(f, records)
            records.clear()
        finally:
            self.writing = False
        if self.requested:
            raise Stopped(self.requested)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _lines(path: str, lines: list[int], limit: int = 10) -> str:
    return ", ".join(f"{path}:{n}" for n in lines[:limit]) + (", ..." if len(lines) > limit else "")


def check_bad_fraction(path: str, total: int, bad: dict[str, list[int]], max_bad_fraction: float) -> None:
    """prepare_data.py's rule: more than ``max_bad_fraction`` of the rows malformed fails before anything is
    written, with the counts and line numbers by reason."""
    from utils.data.records import bad_fraction_error

    summary = "; ".join(f"{reason}: {len(v)} (first at {_lines(path, v, 3)})" for reason, v in bad.items())
    if message := bad_fraction_error(sum(map(len, bad.values())), total, max_bad_fraction, f"Malformed: {summary}."):
        raise SuiteError(message)


def batch(a: dict, settings) -> None:
    from utils.data.templates import TemplateError

    rank, world, local, token = _dist()
    if world > 1 and a["device"] == "auto":
        import torch

        if torch.cuda.is_available():
            a = {**a, "device": f"cuda:{local}"}
    out = Path(a["output_file"])
    work = out.with_name(out.name + ".partial")
    quiet = rank != 0
    log = (lambda msg: None) if quiet else None
    # Everything that can be refused is refused before a weight is read: the rows, the model folders, the output.
    rows, bad = read_rows(a["input_file"], a)
    total = len(rows) + sum(len(v) for v in bad.values())
    plan = plan_loading(a)
    key = settings_key(a, plan.info, settings)
    previous = [p for p in [out] + sorted(out.parent.glob(out.name + ".partial*")) if p.is_file()]
    done = _read_done(previous)
    if out.is_file() and out.stat().st_size and not _read_done([out]) and not a["overwrite"]:
        raise SuiteError(f"--output_file {out} exists and holds no answers of this stage; choose another file or "
                         "pass --overwrite to replace it")
    stale = [r for r in done.values() if r.get("generation") != key]
    if stale and not a["overwrite"]:
        raise SuiteError(f"--output_file {out} holds answers made with other settings or another model; pass "
                         "--overwrite to replace them (or choose another file)")
    # Rendering needs only the template: rows it cannot render count as bad before the limit is applied.
    rendered: dict[int, tuple[str, bool]] = {}
    for i, r in enumerate(rows):
        try:
            rendered[i] = render(plan.template, r["messages"], input=r["input"])
        except TemplateError as exc:  # e.g. a multi-turn row and an instruction template
            if a["strict"]:
                raise SuiteError(f"--input_file {a['input_file']}:{r['line']}: {exc} (--strict)") from None
            bad.setdefault(f"the {plan.template.name} template cannot render it (multi-turn rows need a "
                           "conversation template: --prompt_template)", []).append(r["line"])
    check_bad_fraction(a["input_file"], total, bad, a["max_bad_fraction"])
    part = work if world == 1 else work.with_name(f"{work.name}.rank{rank}")
    if stale:  # --overwrite: each rank starts its own file afresh; rank 0 removes the rest
        done = {}
        mine_files = {work.with_name(f"{work.name}.rank{r}") for r in range(world)} if world > 1 else {work}
        for p in previous:
            if p == part or (rank == 0 and p not in mine_files):
                p.unlink(missing_ok=True)
    todo = [r for i, r in enumerate(rows) if i in rendered and json.dumps(r["id"]) not in done]
    # Dealt by position in the input, not in the to-do list: another rank may already have answered (and so
    # removed from its to-do list) rows by the time this one looks.
    mine = [(i, r) for i, r in enumerate(rows)
            if i % world == rank and i in rendered and json.dumps(r["id"]) not in done]
    if rank == 0:
        skipped = sum(len(v) for v in bad.values())
        if bad:
            print(f"generate: skipped {skipped} bad row(s) of {a['input_file']}: " + "; ".join(
                f"{k}: {len(v)} (lines {', '.join(map(str, v[:10]))}{', ...' if len(v) > 10 else ''})"
                for k, v in bad.items()), file=sys.stderr)
        answered = sum(json.dumps(r["id"]) in done for r in rows)
        print(f"generate: {len(rows)} rows, {answered} already answered, {len(todo)} to do"
              + (f" over {world} processes" if world > 1 else ""), file=sys.stderr)
    if not todo and out.is_file() and previous == [out] and not stale:
        # A finished run re-run: nothing is loaded, generated or rewritten.
        if rank == 0:
            print(f"generate: nothing to do: {out} already holds the answers to all {len(rendered)} usable rows of "
                  f"{a['input_file']}, made by this model with these settings (pass --overwrite to answer them "
                  "again)", file=sys.stderr)
            print(out.absolute())
        if world > 1:
            import torch.distributed as td

            td.destroy_process_group()
        return
    prompts, keep, too_long = [], [], []
    engine = None
    if mine:
        engine, _ = build_engine(a, log=log, plan=plan)
        for i, r in mine:
            text, special = rendered[i]
            ids = engine.encode(text, add_special_tokens=special)
            try:
                prompts.append(engine.fit(ids, settings.max_new_tokens, truncate=a["truncate_prompt"]))
                keep.append(r)
            except ValueError as exc:
                if a["strict"]:
                    raise SuiteError(f"--input_file {a['input_file']}:{r['line']}: {exc} (--strict; or pass "
                                     "--truncate_prompt)") from None
                too_long.append(r["line"])
    if too_long:
        print(f"generate: skipped {len(too_long)} row(s) whose prompt does not fit the context with "
              f"--max_new_tokens {settings.max_new_tokens} (lines {', '.join(map(str, too_long[:10]))}"
              f"{', ...' if len(too_long) > 10 else ''}); pass --truncate_prompt to cut them", file=sys.stderr)
    from tqdm import tqdm

    started = time.perf_counter()
    new_tokens = 0
    pending: list[dict] = []
    _cut_torn_tail(part)
    bar = tqdm(total=len(prompts), desc="generate", unit="row", file=sys.stderr, disable=quiet or not prompts)
    stop = StopSignals()
    try:
        with open(part, "a", encoding="utf-8") as f:
            def on_result(i: int, c) -> None:
                nonlocal new_tokens
                r = keep[i]
                new_tokens += c.new_tokens
                pending.append({**r["row"], "id": r["id"], "line": r["line"], "response": c.text,
                                "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                                "new_tokens": c.new_tokens, "model_id": plan.info["model_id"], "generation": key})
                bar.update(1)
                if len(pending) >= a["batch_size"]:
                    stop.write(f, pending)

            try:
                if prompts:
                    engine.generate(prompts, settings, batch_size=a["batch_size"], on_result=on_result)
                stop.write(f, pending)
                stop.writing = True  # every answer is written: a signal from here on need not cut the merge short
            except Stopped:
                stop.writing = True  # a second signal must not cut the last lines short
                _append(f, pending)
                raise
    except Stopped as exc:
        bar.close()
        kept = len(_read_done([part]))
        print(f"\ngenerate: stopped by {exc}; {kept} answers kept in {part}; re-run the same command to resume "
              "(answered rows are skipped)", file=sys.stderr)
        sys.exit(130 if str(exc) == "SIGINT" else 143)
    finally:
        stop.restore()
    bar.close()
    took = time.perf_counter() - started
    if world > 1 and rank != 0:
        marker = out.with_name(f"{out.name}.partial.rank{rank}.done")
        marker.write_text(token)
    if world > 1 and rank == 0:
        _wait_for_ranks(out, world, token)
    if rank == 0:
        merged = _read_done([p for p in [out] + sorted(out.parent.glob(out.name + ".partial*")) if p.is_file()])
        ordered = [merged[json.dumps(r["id"])] for r in rows if json.dumps(r["id"]) in merged]
        # Nothing new (every row left is one that cannot be answered, e.g. too long): the output stays as it is.
        unchanged = out.is_file() and not stale and set(merged) == set(_read_done([out]))
        if not unchanged:
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                _append(f, ordered)
            os.replace(tmp, out)
        for p in out.parent.glob(out.name + ".partial*"):
            p.unlink()
        if engine is not None and engine.bad_logit_rows:
            print(f"generate: repaired NaN/inf logits in {engine.bad_logit_rows} decoding step(s)", file=sys.stderr)
        missing = len(rows) - len(ordered)
        head = (f"generate: nothing new: {out} already holds {len(ordered)} answers" if unchanged else
                f"generate: wrote {len(ordered)} answers to {out}")
        print(head + (f" ({missing} rows unanswered)" if missing else "")
              + f"; this run: {len(prompts)} rows" + (f" on rank 0 of {world}" if world > 1 else "")
              + f", {new_tokens} new tokens in {took:.1f}s ({new_tokens / max(took, 1e-9):.1f} tokens/s, "
              f"{len(prompts) / max(took, 1e-9):.2f} rows/s)", file=sys.stderr)
        print(out.absolute())
    if world > 1:
        import torch.distributed as td

        td.destroy_process_group()


if __name__ == "__main__":
    run(main)
