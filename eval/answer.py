"""Answers to a question set in LLMZoo's format, from a local artifact or from any OpenAI-compatible endpoint.

The first step of LLMZoo's review protocol (their ``prompt_turbo.py``, generalised): questions JSONL
(``{question_id, text, category, lang}``, LLMZoo's ``questions-en.jsonl``) in, answers JSONL out, one
``{question_id, text, answer_id, model_id, category, lang, metadata}`` row per question, which
``eval/review.py`` (and LLMZoo's own ``eval_gpt_review_all.py``) read as they are.

Two sources:

* a local artifact (``--base_model`` / ``--lora_weights``, anything generate.py loads), through the batch
  engine, each question the user's turn of the artifact's template (``--prompt_template`` to choose another);
* the model behind an OpenAI-compatible ``/v1/chat/completions`` (``--judge_base_url`` and ``--judge_model``,
  the judge client's flags, ``utils.judge``: retries, disk cache, concurrency and rate limit), each question
  one user message, as LLMZoo's ``prompt_turbo.py`` sends it.

The question text is stripped first, as LLMZoo does. Answers are appended to ``--output_file`` as they
arrive (whole, fsynced lines) and the file is rewritten in question order at the end, so a killed run keeps
what it had and a re-run answers only the questions left; a finished run re-run reads nothing heavy and
changes nothing. Each answer's ``metadata.generation`` records the model and every decoding setting with
their fingerprint, and a file holding answers made otherwise is refused (``--overwrite`` replaces them).
``answer_id`` is a hash of the model id, the question id and the answer, so the same answer keeps its id.

A question file with an unreadable line, a row without ``question_id`` or ``text``, or a duplicate id is
refused with every such file:line before anything is loaded or sent. A question the endpoint could not answer
after all retries is listed and left out (a re-run asks again), and the run ends non-zero.

The report (JSON, on stdout): counts (questions, answered, new, failed), the model, and for an endpoint the
request counts and token usage.

Examples:
    python eval/answer.py --lora_weights runs/lora --question_file questions-en.jsonl \\
        --output_file answers/answer_mylora.jsonl --max_new_tokens 512
    python eval/answer.py --judge_base_url http://127.0.0.1:8000/v1 --judge_model gpt-3.5-turbo \\
        --question_file questions-en.jsonl --output_file answers/answer_gpt35.jsonl
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import Lock, sha256_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import SuiteError, UsageError  # noqa: E402
from utils.evaluation.stage import emit, file_record  # noqa: E402
from utils.inference.options import Loading, Prompting  # noqa: E402
from utils.inference.settings import Settings  # noqa: E402
from utils.jsonl import JsonlAppender, key_of, object_lines, read_jsonl, write_jsonl  # noqa: E402
from utils.judge import JudgeOptions  # noqa: E402

STAGE = "answer"
#: The most file:line entries an error lists (the count is always whole).
LISTED = 20
_PERMISSION = "a permission: it only allows what is otherwise refused"


# -- questions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One row of a questions file: its id, text, optional category and language, and where it was read."""

    id: Any
    text: str
    category: str | None
    lang: str | None
    line: int


def read_questions(path: str | Path, flag: str = "--question_file", need_category: bool = False) -> list[Question]:
    """The questions of an LLMZoo questions JSONL file (``{question_id, text, category, lang}`` rows), in file
    order. Blank lines are skipped.

    Raises:
        SuiteError: every bad line at once (not JSON, not an object, no ``question_id``, no ``text``, a
            duplicate id, no ``category`` when ``need_category``), as ``path:line: why``; an unreadable or
            empty file.
    """
    rows, bad = object_lines(path, flag)
    questions, first_line = [], {}
    for n, row in rows:
        why = row_problem(row, need_category)
        if why:
            bad.append(f"{path}:{n}: {why}")
            continue
        key = key_of(row["question_id"])
        if key in first_line:
            bad.append(f"{path}:{n}: duplicate question_id {row['question_id']!r} (first at line {first_line[key]})")
            continue
        first_line[key] = n
        questions.append(Question(row["question_id"], row["text"], row.get("category"), row.get("lang"), n))
    if bad:
        raise SuiteError(f"{flag} {path}: {len(bad)} bad line(s), nothing done:\n  " + "\n  ".join(bad[:LISTED])
                         + (f"\n  ... and {len(bad) - LISTED} more" if len(bad) > LISTED else ""))
    if not questions:
        raise SuiteError(f"{flag} {path}: no question in it")
    return questions


def row_problem(row: Any, need_category: bool = False) -> str | None:
    """Why a parsed line is not a usable question, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    qid = row.get("question_id")
    if qid is None:
        return "no question_id"
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        return f"question_id {qid!r} is neither an integer nor a string"
    if not isinstance(row.get("text"), str) or not row["text"].strip():
        return "no text (a non-empty string)"
    for name in ("category", "lang"):
        if row.get(name) is not None and not isinstance(row[name], str):
            return f"{name} {row[name]!r} is not a string"
    if need_category and not isinstance(row.get("category"), str):
        return "no category (LLMZoo's metric skips coding and math by it)"
    return None


def answer_id(model_id: str, question_id: Any, text: str) -> str:
    """A stable id for one answer: a short hash of the model id, the question id and the answer text (LLMZoo
    draws a random shortuuid; a re-run here gives the same answer the same id)."""
    return hashlib.sha256(json.dumps([model_id, question_id, text], ensure_ascii=False).encode()).hexdigest()[:22]


def answer_record(question: Question, text: str, model_id: str, metadata: dict) -> dict:
    """One answer row in LLMZoo's layout (their local-model answer files: category and lang after model_id)."""
    row = {"question_id": question.id, "text": text, "answer_id": answer_id(model_id, question.id, text),
           "model_id": model_id}
    for name in ("category", "lang"):
        if getattr(question, name) is not None:
            row[name] = getattr(question, name)
    row["metadata"] = metadata
    return row


# -- flags, by concern -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files(Group):
    """The questions, the answers file and what is written in each answer."""

    question_file: str = unfingerprinted(
        "", why="rows are matched by question_id, so a run resumes whichever file holds them (rows may be added)")
    output_file: str = unfingerprinted("", why="where the answers are written")
    model_id: str = ""
    overwrite: bool = unfingerprinted(False, why=_PERMISSION)

    def problems(self) -> list[str]:
        problems = []
        if not self.question_file:
            problems.append("--question_file is required")
        elif not Path(self.question_file).is_file():
            problems.append(f"--question_file {self.question_file}: no such file")
        if not self.output_file:
            problems.append("--output_file is required")
        elif self.question_file and Path(self.output_file).absolute() == Path(self.question_file).absolute():
            problems.append("--output_file must not be the question file")
        elif Path(self.output_file).is_dir():
            problems.append(f"--output_file {self.output_file} is a folder")
        return problems


@dataclass(frozen=True)
class Batching(Group):
    """How the local model's answers are batched (none of it changes an answer)."""

    batch_size: int = unfingerprinted(
        16, why="rows decoded together: greedy output does not depend on it, and a resumed run may use another")
    progress: bool = unfingerprinted(True, why="how progress is shown")

    def problems(self) -> list[str]:
        return [] if self.batch_size >= 1 else [f"--batch_size must be >= 1, got {self.batch_size}"]


@dataclass(frozen=True)
class AnswerArgs(StageArgs):
    STAGE = STAGE

    files: Files
    loading: Loading
    prompting: Prompting
    sampling: Settings
    endpoint: JudgeOptions
    batching: Batching

    @property
    def source(self) -> str:
        """``endpoint`` when --judge_base_url names one, else ``local``."""
        return "endpoint" if self.endpoint.judge_base_url else "local"


Args = AnswerArgs

#: Decoding flags that only the local engine has: OpenAI's chat API takes none of them.
LOCAL_ONLY_SETTINGS = ("min_new_tokens", "top_k", "num_beams", "repetition_penalty", "length_penalty",
                       "regulation_start", "max_time")
#: Flags that name or load a local model (refused with an endpoint).
LOCAL_ONLY_FLAGS = ("base_model", "lora_weights", "prompt_template", "truncate_prompt", "load_8bit", "load_4bit")


def main(
    base_model: str = "",
    lora_weights: str = "",
    *,
    question_file: str = "",
    output_file: str = "",
    model_id: str = "",
    prompt_template: str = "",
    system: str | None = None,
    truncate_prompt: bool = False,
    max_new_tokens: int = 512,
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
    batch_size: int = 16,
    progress: bool = True,
    judge_base_url: str = "",
    judge_model: str = "",
    judge_api_key_env: str = "OPENAI_API_KEY",
    cache_dir: str = "",
    max_retries: int = 5,
    timeout: float = 60.0,
    concurrency: int = 4,
    rpm: float = 0.0,
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
    """Answer an LLMZoo question set with a local artifact or an OpenAI-compatible endpoint (LLMZoo's format).

    Args:
        base_model: Local model folder, or a finetune.py output folder (its base, adapter and template are used).
        lora_weights: An adapter folder or a finetune.py output folder; its base model is read from its
            metadata unless --base_model is given.
        question_file: JSONL of {question_id, text, category, lang} rows (LLMZoo's questions-en.jsonl).
        output_file: JSONL answers, one {question_id, text, answer_id, model_id, category, lang, metadata} row
            per question; resumed after a crash (answered questions are skipped).
        model_id: The model_id written in every answer (default: the artifact's folder name, or --judge_model).
        prompt_template: Local model: the template name or JSON path (default: the one the artifact was
            trained with; alpaca if it carries none).
        system: A system message before each question (default: the template's own, or none for an endpoint).
        truncate_prompt: Local model: cut a question too long for the context to its last tokens, instead of
            failing before any answer.
        max_new_tokens: Most tokens per answer (max_tokens for an endpoint; LLMZoo's max_gen_len was 512).
        min_new_tokens: Local model: fewest tokens before EOS is allowed.
        temperature: Sampling temperature; 0 means greedy (and makes a re-run reproduce the answers).
        top_p: Nucleus sampling (1: off); sent to an endpoint when not 1.
        top_k: Local model: keep the k most likely tokens when sampling (0: off).
        num_beams: Local model: beam search with this many beams (1: off; needs --temperature 0).
        repetition_penalty: Local model: penalty on tokens already present (1: off).
        length_penalty: Local model: MOSS length regulation factor (1: off).
        regulation_start: Local model: new tokens after which --length_penalty starts.
        max_time: Local model: stop each answer after this many seconds (0: no limit).
        stop: Extra stop strings (the template's apply too; sent to an endpoint as stop).
        seed: Seed for sampling (sent to an endpoint when --temperature > 0).
        batch_size: Local model: questions decoded together (greedy answers do not depend on it).
        progress: Show a progress bar on stderr.
        judge_base_url: Answer with the model behind this OpenAI-compatible endpoint instead of a local one
            (e.g. http://127.0.0.1:8000/v1; serve.py's server is one).
        judge_model: The endpoint's model name (required with --judge_base_url).
        judge_api_key_env: Name of the environment variable holding the endpoint's API key (the key itself is
            never written anywhere; unset: no key is sent).
        cache_dir: Endpoint: the request cache folder, shareable between runs (default: OUTPUT_FILE.cache
            beside the answers).
        max_retries: Endpoint: retries of a request on 429, 5xx, timeouts and connection errors.
        timeout: Endpoint: seconds per request.
        concurrency: Endpoint: requests in flight at most.
        rpm: Endpoint: requests per minute at most (0: no limit).
        overwrite: Replace answers in --output_file made with another model or other settings.
        load_8bit: Load the base model in 8-bit (bitsandbytes).
        load_4bit: Load the base model in 4-bit NF4 (bitsandbytes).
        dtype: auto (fp32 on CPU, bf16 or fp16 on GPUs), fp32, bf16 or fp16 (not on CPU).
        device: auto, cpu, cuda, cuda:N or mps.
        device_map: Spread the model over all GPUs by layer: auto / balanced or sequential.
        max_memory: Memory per device for --device_map, e.g. 0=20GiB,1=20GiB,cpu=64GiB.
        fast: The lean decode path for Llama-shaped models: auto (where it applies), on (required) or off.
        trust_remote_code: Allow custom model code from the model folder to run.
        allow_pickle_weights: Accept pytorch_model.bin / adapter_model.bin (loaded with weights_only=True).
        allow_base_mismatch: Apply an adapter to a base whose fingerprint differs from the one it was trained on.
    """
    args = AnswerArgs.from_flags(dict(locals()))
    validate(args)
    questions = read_questions(args.files.question_file)
    out = Path(args.files.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Lock(out.with_name(f".{out.name}.lock"), f"--output_file {out}"):
        if args.source == "endpoint":
            report = answer_with_endpoint(args, questions, out)
        else:
            report = answer_locally(args, questions, out)
    emit(report)
    if report["failed"]:
        raise SuiteError(f"{report['failed']} question(s) got no answer (listed above); the other answers are in "
                         f"{out}; re-run the same command to ask again")


def validate(args: AnswerArgs) -> None:
    """Every argument problem at once, before anything is read."""
    problems = args.files.problems() + args.sampling.problems() + args.batching.problems()
    defaults = {f.name: f.default for g in (Loading, Prompting, Settings) for f in fields(g)}
    if args.source == "endpoint":
        problems += args.endpoint.problems()
        given = {**args.loading.values(), **args.prompting.values(), **args.sampling.values()}
        for name in LOCAL_ONLY_FLAGS + LOCAL_ONLY_SETTINGS:
            if given[name] != defaults[name]:
                problems.append(f"--{name} applies to a local model, not to an endpoint (--judge_base_url)")
    else:
        problems += args.loading.problems() + args.prompting.problems()
        if args.endpoint.judge_model:
            problems.append("--judge_model goes with --judge_base_url (the endpoint to answer with)")
    if problems:
        raise UsageError("\n".join(problems))


def fingerprint(args: AnswerArgs, inputs: dict) -> str:
    """What determines the answers: every flag that counts and ``inputs``, the record of the model (the
    artifact's hashes, or the endpoint's model). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


# -- the answers file --------------------------------------------------------------------------------


@dataclass
class Previous:
    """What an earlier run left in the output file: answers made with these settings, by question id."""

    done: dict[str, dict]
    order: list[str]  # the keys of all records in file order (to tell whether a rewrite changes anything)


def read_previous(out: Path, key: str, overwrite: bool) -> Previous:
    """The answers already in ``out`` made with ``key`` (the generation fingerprint); answers made otherwise
    are refused, or with --overwrite dropped. A torn last line (a killed run) is ignored (and cut on append)."""
    if not out.is_file() or not out.stat().st_size:
        return Previous({}, [])
    try:
        records, bad_lines = read_jsonl(out)
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"--output_file {out}: cannot read it ({exc})") from None
    rows = [r for r in records if isinstance(r, dict) and "question_id" in r and "text" in r]
    if not rows and not overwrite:
        raise SuiteError(f"--output_file {out} exists and holds no answers; choose another file or pass "
                         "--overwrite to replace it")
    ours = [r for r in rows if made_with(r, key)]
    if len(ours) < len(rows) and not overwrite:
        raise SuiteError(f"--output_file {out} holds {len(rows) - len(ours)} answer(s) made with another model or "
                         "other settings; pass --overwrite to replace them (or choose another file)")
    done = {key_of(r["question_id"]): r for r in ours}
    order = [key_of(r["question_id"]) for r in rows]
    if len(ours) < len(rows) or bad_lines or len(order) != len(set(order)):
        order = []  # stale answers, a damaged or torn line, repeats: the rewrite at the end changes the file
    return Previous(done, order)


def made_with(record: dict, key: str) -> bool:
    generation = (record.get("metadata") or {}).get("generation") if isinstance(record.get("metadata"), dict) else None
    return isinstance(generation, dict) and generation.get("fingerprint") == key


def finish(out: Path, questions: list[Question], previous: Previous, new: dict[str, dict]) -> int:
    """Rewrite ``out`` in question order when this run changed anything (answers of questions no longer in the
    file kept after them). Returns the number of answers to these questions in it."""
    merged = {**previous.done, **new}
    keys = [key_of(q.id) for q in questions]
    asked = set(keys)
    ordered = [k for k in keys if k in merged] + [k for k in previous.order if k not in asked and k in merged]
    if new or ordered != previous.order:
        write_jsonl(out, [merged[k] for k in ordered])
    return sum(k in merged for k in keys)


# -- local artifact ----------------------------------------------------------------------------------


def answer_locally(args: AnswerArgs, questions: list[Question], out: Path) -> dict:
    """Answer the questions not answered yet with the local artifact (loaded only when there are some)."""
    from utils.data.templates import Message, TemplateError
    from utils.evaluation.stage import artifact_record
    from utils.inference.options import build_engine, plan_loading, render_prompt

    plan = plan_loading(args.loading, args.prompting, stage=STAGE)
    model = artifact_record(plan)
    inputs = {"model": model}
    key = fingerprint(args, inputs)
    generation = {"model": model, "settings": args.sampling.to_json(), "system": args.prompting.system,
                  "truncate_prompt": args.prompting.truncate_prompt, "fingerprint": key}
    model_id = args.files.model_id or plan.info["model_id"]
    previous = read_previous(out, key, args.files.overwrite)
    todo = [q for q in questions if key_of(q.id) not in previous.done]
    print(f"{STAGE}: {len(questions)} questions, {len(questions) - len(todo)} already answered, {len(todo)} to do "
          f"with {model_id}", file=sys.stderr)
    system = [Message("system", args.prompting.system)] if args.prompting.system else []
    rendered, bad = [], []
    for q in todo:
        try:
            rendered.append(render_prompt(plan.template, system + [Message("user", q.text.strip())]))
        except TemplateError as exc:
            bad.append(f"{args.files.question_file}:{q.line}: {exc}")
    if bad:
        raise SuiteError("the template cannot render these questions, nothing answered:\n  " + "\n  ".join(bad))
    new: dict[str, dict] = {}
    tokens = {"prompt_tokens": 0, "new_tokens": 0}
    if todo:
        engine, _ = build_engine(args.loading, args.prompting, plan=plan, stage=STAGE)
        prompts = fit_prompts(engine, todo, rendered, args)
        generate_answers(engine, todo, prompts, args, model_id, generation, out, new, tokens)
    total = finish(out, questions, previous, new)
    report = {"output_file": str(out.absolute()), "source": "local", "model_id": model_id,
              "questions": len(questions), "answered": total, "new": len(new), "failed": 0, "failures": [],
              **tokens, "model": model, "question_file": file_record(args.files.question_file)}
    print(f"{STAGE}: {'wrote' if new else 'nothing new:'} {total} answers in {out}", file=sys.stderr)
    return report


def fit_prompts(engine, todo: list[Question], rendered: list[tuple[str, bool]], args: AnswerArgs) -> list[list[int]]:
    """Token ids of every prompt, each fitting the context with --max_new_tokens; a question that does not fit
    fails the run before any answer (unless --truncate_prompt)."""
    prompts, too_long = [], []
    for q, (text, special) in zip(todo, rendered):
        ids = engine.encode(text, add_special_tokens=special)
        try:
            prompts.append(engine.fit(ids, args.sampling.max_new_tokens, truncate=args.prompting.truncate_prompt))
        except ValueError as exc:
            too_long.append(f"{args.files.question_file}:{q.line}: {exc}")
    if too_long:
        raise SuiteError(f"{len(too_long)} question(s) do not fit the context, nothing answered (lower "
                         "--max_new_tokens or pass --truncate_prompt):\n  " + "\n  ".join(too_long[:LISTED]))
    return prompts


def generate_answers(engine, todo: list[Question], prompts: list[list[int]], args: AnswerArgs, model_id: str,
                     generation: dict, out: Path, new: dict, tokens: dict) -> None:
    """Decode in batches, each answer appended to ``out`` as a whole, durable line as soon as it is finished."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc=STAGE, unit="answer", file=sys.stderr, disable=not args.batching.progress)
    with JsonlAppender(out) as appender:
        def on_result(i: int, completion) -> None:
            q = todo[i]
            meta = {"finish_reason": completion.finish_reason, "prompt_tokens": completion.prompt_tokens,
                    "new_tokens": completion.new_tokens, "generation": generation}
            row = answer_record(q, completion.text, model_id, meta)
            appender.append([row])
            new[key_of(q.id)] = row
            tokens["prompt_tokens"] += completion.prompt_tokens
            tokens["new_tokens"] += completion.new_tokens
            bar.update(1)

        engine.generate(prompts, args.sampling, batch_size=args.batching.batch_size, on_result=on_result)
    bar.close()


# -- OpenAI-compatible endpoint --------------------------------------------------------------------


def chat_request(question: Question, args: AnswerArgs):
    """The request for one question: the (optional) system message and the stripped question as the user's
    message, as LLMZoo's prompt_turbo.py sends it; sampling fields only where they differ from greedy."""
    from utils.judge import ChatRequest

    settings = args.sampling
    messages = ([{"role": "system", "content": args.prompting.system}] if args.prompting.system else []) + \
        [{"role": "user", "content": question.text.strip()}]
    extra = []
    if settings.top_p != 1.0:
        extra.append(("top_p", settings.top_p))
    if settings.stop:
        extra.append(("stop", list(settings.stop)))
    return ChatRequest(messages=tuple(messages), temperature=settings.temperature,
                       max_tokens=settings.max_new_tokens, seed=settings.seed if settings.temperature > 0 else None,
                       extra=tuple(sorted(extra)), key=key_of(question.id))


def answer_with_endpoint(args: AnswerArgs, questions: list[Question], out: Path) -> dict:
    """Ask the endpoint the questions not answered yet, appending each answer as it arrives."""
    from utils.judge import JudgeClient

    judge = args.endpoint
    model = {"endpoint": judge.judge_base_url, "model": judge.judge_model}
    key = fingerprint(args, {"model": model})
    generation = {"model": model, "settings": args.sampling.to_json(), "system": args.prompting.system,
                  "fingerprint": key}
    model_id = args.files.model_id or judge.judge_model
    previous = read_previous(out, key, args.files.overwrite)
    todo = [q for q in questions if key_of(q.id) not in previous.done]
    print(f"{STAGE}: {len(questions)} questions, {len(questions) - len(todo)} already answered, {len(todo)} to ask "
          f"{judge.judge_model} at {judge.judge_base_url}", file=sys.stderr)
    new: dict[str, dict] = {}
    failures: list[dict] = []
    by_key = {key_of(q.id): q for q in todo}
    cache = judge.cache_dir or str(out.with_name(out.name + ".cache"))
    stats: dict = {}
    if todo:
        with JudgeClient(judge, cache) as client, JsonlAppender(out) as appender:
            def on_result(result) -> None:
                q = by_key[result.request.key]
                if result.text is None:
                    failures.append({"question_id": q.id, "where": f"{args.files.question_file}:{q.line}",
                                     "error": result.error})
                    print(f"{STAGE}: question {q.id!r} ({args.files.question_file}:{q.line}) got no answer: "
                          f"{result.error}", file=sys.stderr)
                    return
                row = answer_record(q, result.text, model_id, {"usage": result.usage, "generation": generation})
                appender.append([row])
                new[key_of(q.id)] = row

            client.complete_many([chat_request(q, args) for q in todo], on_result=on_result, desc=STAGE)
            stats = client.stats()
    total = finish(out, questions, previous, new)
    print(f"{STAGE}: {'wrote' if new else 'nothing new:'} {total} answers in {out}"
          + (f"; {len(failures)} question(s) got no answer" if failures else ""), file=sys.stderr)
    return {"output_file": str(out.absolute()), "source": "endpoint", "model_id": model_id,
            "questions": len(questions), "answered": total, "new": len(new), "failed": len(failures),
            "failures": failures, "requests": stats, "model": model,
            "question_file": file_record(args.files.question_file)}


if __name__ == "__main__":
    run(main)
