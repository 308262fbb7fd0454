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

import dataclasses
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from utils.args import Group, StageArgs, unfingerprinted
from utils.artifacts import sha256_json
from utils.cli import run
from utils.data.templates import Message, TemplateError
from utils.distributed import from_env
from utils.errors import SuiteError, UsageError
from utils.inference.options import Loading, Prompting, build_engine, plan_loading, render_prompt
from utils.inference.settings import Settings
from utils.jsonl import JsonlAppender, done_keys, key_of, line_refs, read_keyed, write_jsonl
from utils.data.records import bad_fraction_error

EXIT_WORDS = ("exit", "stop", "quit")
CLEAR_WORDS = ("clear", "reset")


# -- flags, by concern ---------------------------------------------------------------------------

_PERMISSION = "a permission: it only allows what is otherwise refused"


@dataclass(frozen=True)
class OneShot(Group):
    """The one-shot request (none of it in batch mode or chat)."""

    instruction: str | None = None
    input: str | None = None
    prompt: str | None = None

    def problems(self) -> list[str]:
        return ["--input goes with --instruction"] if self.input is not None and self.instruction is None else []


@dataclass(frozen=True)
class BatchIO(Group):
    """Batch mode: the files, the row fields, batching and the bad-row rule."""

    input_file: str | None = unfingerprinted(
        None, why="rows are matched by id, so a run resumes whichever file holds them (rows may be added)")
    output_file: str | None = unfingerprinted(None, why="where the answers are written")
    instruction_field: str = "instruction"
    input_field: str = "input"
    text_field: str = "text"
    messages_field: str = "messages"
    id_field: str = ""
    batch_size: int = unfingerprinted(
        16, why="rows decoded together: greedy output does not depend on it, and a resumed run may use another")
    strict: bool = unfingerprinted(False, why="decides whether a bad row stops the run, not what a row's answer is")
    max_bad_fraction: float = unfingerprinted(0.01, why="decides whether the run starts, not what an answer is")
    overwrite: bool = unfingerprinted(False, why=_PERMISSION)

    def problems(self) -> list[str]:
        problems = []
        if (self.input_file is None) != (self.output_file is None):
            problems.append("--input_file and --output_file go together")
        if not 0 <= self.max_bad_fraction <= 1:
            problems.append(f"--max_bad_fraction must be between 0 and 1, got {self.max_bad_fraction}")
        if self.batch_size < 1:
            problems.append(f"--batch_size must be >= 1, got {self.batch_size}")
        return problems


@dataclass(frozen=True)
class GenerateArgs(StageArgs):
    STAGE = "generate"

    loading: Loading
    prompting: Prompting
    request: OneShot
    sampling: Settings
    batch: BatchIO


Args = GenerateArgs


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
    args = GenerateArgs.from_flags(dict(locals()))
    settings, mode = validate(args)
    if mode == "batch":
        return batch(args, settings)
    engine, loaded = build_engine(args.loading, args.prompting, raw=args.request.prompt is not None)
    if mode == "one-shot":
        one_shot(engine, loaded, args.request, args.prompting, settings)
    else:
        chat(engine, loaded, args.prompting, settings)


def validate(args: GenerateArgs):
    """All argument problems at once; returns (settings, mode)."""
    request, io = args.request, args.batch
    settings = args.sampling
    one = [flag for flag, value in (("instruction", request.instruction), ("prompt", request.prompt),
                                    ("input_file", io.input_file)) if value is not None]
    problems = settings.problems() + args.loading.problems()
    if len(one) > 1:
        problems.append(f"--{' and --'.join(one)} exclude each other (one mode at a time)")
    problems += request.problems() + io.problems() + args.prompting.problems() + file_problems(io)
    if problems:
        raise UsageError("\n".join(problems))
    mode = "batch" if io.input_file else "one-shot" if one else "chat"
    return settings, mode


def file_problems(io: BatchIO) -> list[str]:
    """The batch files: the input exists and is not also the output."""
    problems = []
    if io.input_file is not None and not Path(io.input_file).is_file():
        problems.append(f"--input_file {io.input_file}: no such file")
    if io.output_file is not None and io.input_file is not None and \
            Path(io.output_file).absolute() == Path(io.input_file).absolute():
        problems.append("--output_file must not be the input file")
    return problems


def fitted_ids(engine, text: str, special: bool, max_new_tokens: int, truncate: bool, what: str) -> list[int]:
    ids = engine.encode(text, add_special_tokens=special)
    try:
        return engine.fit(ids, max_new_tokens, truncate=truncate)
    except ValueError as exc:
        raise SuiteError(f"{what}: {exc}; shorten it, lower --max_new_tokens, or pass --truncate_prompt") from None


# -- one-shot ------------------------------------------------------------------------------------


def one_shot(engine, loaded, request: OneShot, prompting: Prompting, settings) -> None:
    if request.prompt is not None:
        text, special, what = request.prompt, True, "--prompt"
    else:
        system = [Message("system", prompting.system)] if prompting.system else []
        text, special = render_prompt(loaded.template, system + [Message("user", request.instruction)], input=request.input)
        what = "--instruction"
    ids = fitted_ids(engine, text, special, settings.max_new_tokens, prompting.truncate_prompt, what)
    started = time.perf_counter()
    stream = engine.stream(ids, settings, in_context=request.prompt is not None)
    out = sys.stdout
    for chunk in stream:
        out.write(chunk)
        out.flush()
    out.write("\n")
    out.flush()
    completion = stream.completion
    took = time.perf_counter() - started
    print(f"generate: {completion.new_tokens} tokens in {took:.2f}s "
          f"({completion.new_tokens / max(took, 1e-9):.1f} tokens/s), finish: {completion.finish_reason}",
          file=sys.stderr)


# -- chat ----------------------------------------------------------------------------------------


def chat(engine, loaded, prompting: Prompting, settings, stdin=None, stdout=None, stderr=None) -> None:
    """Multi-turn chat: stdin lines in, streamed answers on stdout, prompts and notes on stderr."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    template = loaded.template
    multi_turn = template.kind != "instruction"
    tty = hasattr(stdin, "isatty") and stdin.isatty()
    print(f"chat with {loaded.info.get('model_id')} ({template.name} template). Type clear or reset to forget the "
          "conversation, exit or stop to quit; Ctrl-C stops an answer." +
          ("" if multi_turn else " (An instruction template: every turn is answered on its own.)"), file=stderr)
    history: list = []
    while True:
        query = read_query(stdin, stderr, tty)
        if query is None or query.lower() in EXIT_WORDS:
            break
        if not query:
            continue
        if query.lower() in CLEAR_WORDS:
            history = []
            print("(conversation cleared)", file=stderr)
            continue
        base = [Message("system", prompting.system)] if prompting.system else []
        ids, turns = fit_conversation(engine, template, base, history if multi_turn else [], query, settings, stderr)
        try:
            ids = engine.fit(ids, settings.max_new_tokens, truncate=prompting.truncate_prompt)
        except ValueError as exc:
            print(f"generate: this message is too long: {exc} (pass --truncate_prompt to cut it)", file=stderr)
            continue
        answer = stream_answer(engine, ids, settings, stdout, stderr, tty)
        history = turns + [Message("user", query), Message("assistant", answer)] if multi_turn else []


def read_query(stdin, stderr, tty: bool) -> str | None:
    """The user's next line, stripped ("" for a blank line or Ctrl-C at the prompt); None at end of input."""
    try:
        if tty:
            stderr.write("\nUser: ")
            stderr.flush()
        line = stdin.readline()
    except KeyboardInterrupt:
        stderr.write("\n")
        return ""
    return line.strip() if line else None


def fit_conversation(engine, template, base: list, turns: list, query: str, settings, stderr) -> tuple[list, list]:
    """(prompt ids, the earlier turns kept): the oldest user/assistant pairs go first until the answer fits."""
    dropped = 0
    while True:
        messages = base + turns + [Message("user", query)]
        text, special = render_prompt(template, messages)
        ids = engine.encode(text, add_special_tokens=special)
        if len(ids) + settings.max_new_tokens <= engine.context_len or not turns:
            break
        turns, dropped = turns[2:], dropped + 1
    if dropped:
        print(f"(dropped the {dropped} oldest turn(s) to fit the context)", file=stderr)
    return ids, turns


def stream_answer(engine, ids: list[int], settings, stdout, stderr, tty: bool) -> str:
    """Stream one answer to stdout; Ctrl-C stops the answer, not the chat. Returns the answer's text."""
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
    return stream.completion.text


# -- batch ---------------------------------------------------------------------------------------


ID_FIELDS = ("id", "question_id", "conversation_id")


def read_rows(path: str, io: BatchIO, system: str | None = None) -> tuple[list[dict], dict]:
    """Rows of ``path`` as {line, id, row, messages, input}; bad rows counted by reason with line numbers.

    Raises:
        SuiteError: an unreadable or empty file, no usable row, or (with --strict) the first bad row.
    """
    bad: dict[str, list[int]] = {}

    def problem(reason: str, line: int) -> None:
        if io.strict:
            raise SuiteError(f"--input_file {path}:{line}: {reason} (--strict)")
        bad.setdefault(reason, []).append(line)

    rows: list[dict] = []
    seen_ids: set = set()
    for n, rec in read_records(path, problem):
        row = read_row(n, rec, io, system, seen_ids, problem)
        if row is not None:
            seen_ids.add(key_of(row["id"]))
            rows.append(row)
    if not rows:
        detail = "; ".join(f"{k}: {len(v)}" for k, v in bad.items())
        raise SuiteError(f"--input_file {path}: no usable row ({detail or 'no rows'})")
    return rows, bad


def read_records(path: str, problem) -> list[tuple[int, Any]]:
    """(line or array position, value) of a JSONL file or a JSON array; a line that is not JSON goes to ``problem``."""
    try:
        raw = Path(path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--input_file {path}: cannot read it ({exc})") from None
    if not raw.strip():
        raise SuiteError(f"--input_file {path}: empty file")
    text = raw.lstrip()
    if text.startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as exc:
            raise SuiteError(f"--input_file {path}: not valid JSON ({exc})") from None
    records = []
    for n, line in enumerate(raw.split("\n"), 1):  # not splitlines(): U+2028 and friends may sit inside a row
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError:
            problem("not valid JSON", n)
    return records


def read_row(n: int, rec: Any, io: BatchIO, system: str | None, seen_ids: set, problem) -> dict | None:
    """One row as {line, id, row, messages, input}, or None after reporting why it is bad to ``problem``."""
    if not isinstance(rec, dict):
        return problem("not a JSON object", n)
    rid = rec.get(io.id_field) if io.id_field else next((rec[f] for f in ID_FIELDS if f in rec), None)
    if io.id_field and rid is None:
        return problem(f"no {io.id_field!r} field", n)
    rid = n if rid is None else rid
    if key_of(rid) in seen_ids:
        return problem(f"duplicate id {rid!r}", n)
    found = row_messages(n, rec, io, problem)
    if found is None:
        return None
    messages, extra = found
    if system and messages[0].role != "system":
        messages = [Message("system", system)] + messages
    return {"line": n, "id": rid, "row": rec, "messages": messages, "input": extra or None}


def row_messages(n: int, rec: dict, io: BatchIO, problem) -> tuple[list, str | None] | None:
    """(messages, input) of a messages row or an instruction / text row, or None after reporting to ``problem``."""
    if io.messages_field in rec:
        msgs = rec[io.messages_field]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            return problem(f"{io.messages_field!r} is not a list of {{role, content}}", n)
        if msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]  # a reference answer is not part of the prompt
        messages = [Message(m["role"], m["content"]) for m in msgs]
        if not any(m.role == "user" for m in messages):
            return problem("no user message", n)
        return messages, None
    query = rec.get(io.instruction_field, rec.get(io.text_field))
    if not isinstance(query, str) or not query.strip():
        return problem(f"no {io.instruction_field!r} or {io.text_field!r} text", n)
    extra = rec.get(io.input_field) if io.instruction_field in rec else None
    if extra is not None and not isinstance(extra, str):
        return problem(f"{io.input_field!r} is not a string", n)
    return [Message("user", query)], extra


# What of the loaded model determines the answers (utils.inference.loading's record of it).
MODEL_RECORD = ("base_model", "adapter", "template", "dtype", "quantization")


def fingerprint(args: GenerateArgs, inputs: dict) -> str:
    """What determines a batch's answers: every flag that counts (``args.fingerprint_values()``) and ``inputs``,
    the record of the model the flags resolved to. Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


def settings_key(args: GenerateArgs, info: dict) -> dict:
    """Every answer's ``generation`` record: the model, adapter, template, dtype and every decoding setting, and
    the fingerprint of all that determines the answers, which resumed rows must share."""
    inputs = {"model": {k: info.get(k) for k in MODEL_RECORD}}
    prompting = args.prompting
    return {**inputs, "settings": args.sampling.fingerprint_values(), "truncate_prompt": prompting.truncate_prompt,
            "system": prompting.system, "prompt_template": prompting.prompt_template or None,
            "fingerprint": fingerprint(args, inputs)}


def made_with(record: dict, key: dict) -> bool:
    generation = record.get("generation")
    return isinstance(generation, dict) and generation.get("fingerprint") == key["fingerprint"]


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

        # Signal handlers can only be installed from the main thread (batch() called from a worker thread, as a
        # server might, keeps the default behaviour).
        main = threading.current_thread() is threading.main_thread()
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if not self.writing:
            raise Stopped(self.requested)

    def write(self, appender: JsonlAppender, records: list[dict]) -> None:
        """Append ``records`` (then emptied) as whole, durable lines; a signal received meanwhile is raised after."""
        self.writing = True
        try:
            appender.append(records)
            records.clear()
        finally:
            self.writing = False
        if self.requested:
            raise Stopped(self.requested)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_bad_fraction(path: str, total: int, bad: dict[str, list[int]], max_bad_fraction: float) -> None:
    """prepare_data.py's rule: more than ``max_bad_fraction`` of the rows malformed fails before anything is
    written, with the counts and line numbers by reason."""

    summary = "; ".join(f"{reason}: {len(v)} (first at {line_refs(path, v, 3)})" for reason, v in bad.items())
    if message := bad_fraction_error(sum(map(len, bad.values())), total, max_bad_fraction, f"Malformed: {summary}."):
        raise SuiteError(message)


def _first(lines: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, lines[:limit])) + (", ..." if len(lines) > limit else "")


@dataclass
class Job:
    """One batch run, worked out before any weight is read: the rows, the model plan, what earlier runs left."""

    out: Path
    part: Path  # this process's answers while the run goes on
    rows: list[dict]
    rendered: dict[int, tuple[str, bool]]  # row index -> (prompt text, add_special_tokens), renderable rows only
    plan: Any
    key: dict
    previous: list[Path]  # the output and partial files found at the start
    done: dict[str, dict]  # rows already answered with these settings, by key_of(id)
    stale: bool  # earlier answers made otherwise (--overwrite: they are being replaced)

    def pending(self, rank: int = 0, world: int = 1) -> list[tuple[int, dict]]:
        """(index, row) of the usable rows not answered yet that fall to ``rank``. Dealt by position in the input,
        not in the to-do list: another rank may already have answered (and so removed from its to-do list) rows by
        the time this one looks."""
        return [(i, r) for i, r in enumerate(self.rows)
                if i % world == rank and i in self.rendered and key_of(r["id"]) not in self.done]


def partial_files(out: Path) -> list[Path]:
    """The output and every partial file of an earlier or parallel run (completion markers included)."""
    return [p for p in [out] + sorted(out.parent.glob(out.name + ".partial*")) if p.is_file()]


def batch(args: GenerateArgs, settings) -> None:
    dist = from_env("generate")
    # The run token (rank 0's, broadcast once, before any library code can issue collectives of its own) marks this
    # run's completion files; ranks report completion through files rather than barriers, which model loading may
    # pair with its own.
    token = dist.broadcast(uuid.uuid4().hex)
    loading = args.loading
    if dist.active and loading.device == "auto" and dist.device != "cpu":
        loading = dataclasses.replace(loading, device=dist.device)
    job = plan_batch(args, loading, dist)
    report_rows(job, args.batch, dist)
    if not job.pending() and job.out.is_file() and job.previous == [job.out] and not job.stale:
        # A finished run re-run: nothing is loaded, generated or rewritten.
        if dist.main:
            print(f"generate: nothing to do: {job.out} already holds the answers to all {len(job.rendered)} usable "
                  f"rows of {args.batch.input_file}, made by this model with these settings (pass --overwrite to "
                  "answer them again)", file=sys.stderr)
            print(job.out.absolute())
        dist.close()
        return
    log = None if dist.main else (lambda msg: None)
    engine, prompts, keep = fit_prompts(job, job.pending(dist.rank, dist.world_size), loading, args, settings, log)
    started = time.perf_counter()
    new_tokens = answer(job, engine, prompts, keep, settings, args.batch.batch_size, quiet=not dist.main)
    took = time.perf_counter() - started
    if dist.active and not dist.main:
        job.out.with_name(f"{job.out.name}.partial.rank{dist.rank}.done").write_text(token)
    if dist.active and dist.main:
        _wait_for_ranks(job.out, dist.world_size, token)
    if dist.main:
        written, unchanged = merge(job)
        if engine is not None and engine.bad_logit_rows:
            print(f"generate: repaired NaN/inf logits in {engine.bad_logit_rows} decoding step(s)", file=sys.stderr)
        print(summary(job, written, unchanged, len(prompts), new_tokens, took, dist.world_size), file=sys.stderr)
        print(job.out.absolute())
    dist.close()


def plan_batch(args: GenerateArgs, loading: Loading, dist) -> Job:
    """Everything that can be refused is refused before a weight is read: the rows, the model folders, the output;
    with --overwrite, answers made otherwise are removed."""
    io = args.batch
    out = Path(io.output_file)
    work = out.with_name(out.name + ".partial")
    rows, bad = read_rows(io.input_file, io, args.prompting.system)
    total = len(rows) + sum(len(v) for v in bad.values())
    plan = plan_loading(loading, args.prompting)
    key = settings_key(args, plan.info)
    previous = partial_files(out)
    done = read_keyed(previous)
    stale = check_output(out, done, key, io.overwrite)
    rendered = render_rows(rows, plan.template, bad, io)
    check_bad_fraction(io.input_file, total, bad, io.max_bad_fraction)
    part = work if not dist.active else work.with_name(f"{work.name}.rank{dist.rank}")
    if stale:  # --overwrite: each rank starts its own file afresh; rank 0 removes the rest
        done = {}
        ranks = {work.with_name(f"{work.name}.rank{r}") for r in range(dist.world_size)} if dist.active else {work}
        for p in previous:
            if p == part or (dist.main and p not in ranks):
                p.unlink(missing_ok=True)
    if dist.main and bad:
        print(f"generate: skipped {sum(len(v) for v in bad.values())} bad row(s) of {io.input_file}: " + "; ".join(
            f"{k}: {len(v)} (lines {_first(v)})" for k, v in bad.items()), file=sys.stderr)
    return Job(out, part, rows, rendered, plan, key, previous, done, stale)


def check_output(out: Path, done: dict[str, dict], key: dict, overwrite: bool) -> bool:
    """Refuse an output file that is not ours, or holds answers made otherwise (unless --overwrite); returns
    whether it holds such answers."""
    if out.is_file() and out.stat().st_size and not read_keyed([out]) and not overwrite:
        raise SuiteError(f"--output_file {out} exists and holds no answers of this stage; choose another file or "
                         "pass --overwrite to replace it")
    stale = any(not made_with(r, key) for r in done.values())
    if stale and not overwrite:
        raise SuiteError(f"--output_file {out} holds answers made with other settings or another model; pass "
                         "--overwrite to replace them (or choose another file)")
    return stale


def render_rows(rows: list[dict], template, bad: dict[str, list[int]], io: BatchIO) -> dict[int, tuple[str, bool]]:
    """Prompts of the rows the template can render (rendering needs only the template); the others are added to
    ``bad``, before the bad-row limit is applied."""

    rendered: dict[int, tuple[str, bool]] = {}
    for i, r in enumerate(rows):
        try:
            rendered[i] = render_prompt(template, r["messages"], input=r["input"])
        except TemplateError as exc:  # e.g. a multi-turn row and an instruction template
            if io.strict:
                raise SuiteError(f"--input_file {io.input_file}:{r['line']}: {exc} (--strict)") from None
            bad.setdefault(f"the {template.name} template cannot render it (multi-turn rows need a "
                           "conversation template: --prompt_template)", []).append(r["line"])
    return rendered


def report_rows(job: Job, io: BatchIO, dist) -> None:
    if dist.main:
        answered = sum(key_of(r["id"]) in job.done for r in job.rows)
        print(f"generate: {len(job.rows)} rows, {answered} already answered, {len(job.pending())} to do"
              + (f" over {dist.world_size} processes" if dist.active else ""), file=sys.stderr)


def fit_prompts(job: Job, mine: list[tuple[int, dict]], loading: Loading, args: GenerateArgs, settings, log):
    """(engine, prompt ids, their rows) for this process's rows; the model is loaded only when there are some.
    Prompts too long for the context are skipped and listed (or, with --strict, fail)."""
    prompts, keep, too_long = [], [], []
    engine = None
    if mine:
        engine, _ = build_engine(loading, args.prompting, log=log, plan=job.plan)
        for i, r in mine:
            text, special = job.rendered[i]
            ids = engine.encode(text, add_special_tokens=special)
            try:
                prompts.append(engine.fit(ids, settings.max_new_tokens, truncate=args.prompting.truncate_prompt))
                keep.append(r)
            except ValueError as exc:
                if args.batch.strict:
                    raise SuiteError(f"--input_file {args.batch.input_file}:{r['line']}: {exc} (--strict; or pass "
                                     "--truncate_prompt)") from None
                too_long.append(r["line"])
    if too_long:
        print(f"generate: skipped {len(too_long)} row(s) whose prompt does not fit the context with "
              f"--max_new_tokens {settings.max_new_tokens} (lines {_first(too_long)}); pass --truncate_prompt to "
              "cut them", file=sys.stderr)
    return engine, prompts, keep


def answer(job: Job, engine, prompts: list, keep: list[dict], settings, batch_size: int, quiet: bool) -> int:
    """Generate and append the answers to ``job.part``, a batch of whole, fsynced lines at a time; SIGTERM or
    Ctrl-C keeps every whole answer and exits 143 / 130 saying how to resume. Returns the new tokens."""
    from tqdm import tqdm

    new_tokens = 0
    pending: list[dict] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="row", file=sys.stderr, disable=quiet or not prompts)
    stop = StopSignals()
    try:
        with JsonlAppender(job.part) as appender:
            def on_result(i: int, completion) -> None:
                nonlocal new_tokens
                row = keep[i]
                new_tokens += completion.new_tokens
                pending.append({**row["row"], "id": row["id"], "line": row["line"], "response": completion.text,
                                "finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
                                "new_tokens": completion.new_tokens, "model_id": job.plan.info["model_id"],
                                "generation": job.key})
                bar.update(1)
                if len(pending) >= batch_size:
                    stop.write(appender, pending)

            try:
                if prompts:
                    engine.generate(prompts, settings, batch_size=batch_size, on_result=on_result)
                stop.write(appender, pending)
                stop.writing = True  # every answer is written: a signal from here on need not cut the merge short
            except Stopped:
                stop.writing = True  # a second signal must not cut the last lines short
                appender.append(pending)
                raise
    except Stopped as exc:
        bar.close()
        kept = len(read_keyed([job.part]))
        print(f"\ngenerate: stopped by {exc}; {kept} answers kept in {job.part}; re-run the same command to resume "
              "(answered rows are skipped)", file=sys.stderr)
        sys.exit(130 if str(exc) == "SIGINT" else 143)
    finally:
        stop.restore()
    bar.close()
    return new_tokens


def merge(job: Job) -> tuple[int, bool]:
    """Rank 0: write the output in input order (atomically, and only when something changed) and remove the
    partial files. Returns (answers in the output, whether it was left as it was)."""
    out = job.out
    merged = read_keyed(partial_files(out))
    ordered = [merged[key_of(r["id"])] for r in job.rows if key_of(r["id"]) in merged]
    # Nothing new (every row left is one that cannot be answered, e.g. too long): the output stays as it is.
    unchanged = out.is_file() and not job.stale and set(merged) == done_keys([out])
    if not unchanged:
        write_jsonl(out, ordered)
    for p in out.parent.glob(out.name + ".partial*"):
        p.unlink()
    return len(ordered), unchanged


def summary(job: Job, written: int, unchanged: bool, answered: int, new_tokens: int, took: float, world: int) -> str:
    """The closing line: the output, and this run's rows, tokens and speed."""
    missing = len(job.rows) - written
    head = (f"generate: nothing new: {job.out} already holds {written} answers" if unchanged else
            f"generate: wrote {written} answers to {job.out}")
    return (head + (f" ({missing} rows unanswered)" if missing else "")
            + f"; this run: {answered} rows" + (f" on rank 0 of {world}" if world > 1 else "")
            + f", {new_tokens} new tokens in {took:.1f}s ({new_tokens / max(took, 1e-9):.1f} tokens/s, "
            f"{answered / max(took, 1e-9):.2f} rows/s)")


if __name__ == "__main__":
    run(main)
