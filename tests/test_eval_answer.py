"""eval/answer.py: a tiny local Llama answers three LLMZoo questions in LLMZoo's answer format with the answers
generate.py gives; a run cut short resumes with only the missing questions and ends with the same file; a re-run
changes nothing and loads no model; answers made otherwise need --overwrite; the endpoint path against the fake
judge (LLMZoo's request, a re-run sends nothing, failures listed and asked again); bad question files and mixed
sources are refused before any work."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from conftest import DATA, STORIES, tiny_model
from fake_judge import Fault, FakeJudge
from utils.cli import run

QUESTIONS = DATA / "llmzoo" / "questions-en.jsonl"
answer_script = importlib.import_module("eval.answer")

pytestmark = pytest.mark.skipif(not QUESTIONS.is_file() or not STORIES.is_dir(),
                                reason=f"shared data not found ({QUESTIONS}, {STORIES}): ../shared is absent")


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    """LLMZoo's first three English questions."""
    path = tmp_path_factory.mktemp("questions") / "q3.jsonl"
    path.write_text("".join(QUESTIONS.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("answer") / "tiny-llama", token_ids=True)


def in_process(args: list[str], capsys) -> tuple[int, dict | None, str]:
    """eval/answer.py's main in this process, as its command line would run it: (exit code, report, stderr)."""
    try:
        run(answer_script.main, args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_local_answers_in_llmzoo_format_equal_generate_and_resume(tmp_path, tiny, three, capsys):
    out = tmp_path / "answer_tiny.jsonl"
    local = ["--base_model", str(tiny), "--question_file", str(three), "--max_new_tokens", "8", "--noprogress"]
    code, report, err = in_process([*local, "--output_file", str(out)], capsys)
    assert code == 0, err
    assert report["new"] == 3 and report["answered"] == 3 and report["model_id"] == "tiny-llama"
    answers = rows(out)
    questions = rows(three)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert list(answers[0]) == ["question_id", "text", "answer_id", "model_id", "category", "lang", "metadata"]
    for a, q in zip(answers, questions):
        assert a["model_id"] == "tiny-llama" and a["category"] == q["category"] and a["lang"] == "en"
        assert a["answer_id"] == answer_script.answer_id("tiny-llama", q["question_id"], a["text"])
        generation = a["metadata"]["generation"]
        assert generation["model"]["template"] == "alpaca" and generation["settings"]["max_new_tokens"] == 8
        assert a["metadata"]["new_tokens"] <= 8

    # The same answers as generate.py's batch mode, which renders a question the same way (the template's user turn).
    import generate

    reference = tmp_path / "generate.jsonl"
    run(generate.main, ["--base_model", str(tiny), "--input_file", str(three), "--output_file", str(reference),
                        "--max_new_tokens", "8"])
    capsys.readouterr()
    assert [a["text"] for a in answers] == [r["response"] for r in rows(reference)]

    # A run cut short: one whole answer and a torn line left; the re-run answers the other two, same file.
    full = out.read_bytes()
    lines = full.decode().splitlines(keepends=True)
    out.write_text(lines[1] + lines[2][:40], encoding="utf-8")
    code, report, err = in_process([*local, "--output_file", str(out)], capsys)
    assert code == 0, err
    assert report["new"] == 2 and "1 already answered, 2 to do" in err
    assert out.read_bytes() == full

    # An identical re-run: nothing loaded, nothing written.
    stamp = out.stat().st_mtime_ns
    code, report, err = in_process([*local, "--output_file", str(out)], capsys)
    assert code == 0 and report["new"] == 0 and "loading" not in err
    assert out.read_bytes() == full and out.stat().st_mtime_ns == stamp

    # Answers made with other settings are not mixed in: refused, or replaced with --overwrite.
    other = [*local[:-3], "--max_new_tokens", "4", "--noprogress", "--output_file", str(out)]
    code, _, err = in_process(other, capsys)
    assert code == 1 and "made with another model or other settings" in err
    code, report, err = in_process([*other, "--overwrite"], capsys)
    assert code == 0 and report["new"] == 3
    assert all(a["metadata"]["generation"]["settings"]["max_new_tokens"] == 4 for a in rows(out))


def test_endpoint_answers_like_prompt_turbo_and_rerun_sends_nothing(tmp_path, three, capsys):
    def answer(body: dict) -> str:
        return "An answer to: " + body["messages"][-1]["content"]

    out = tmp_path / "answer_gpt.jsonl"
    with FakeJudge(responder=answer) as judge:
        endpoint = ["--question_file", str(three), "--output_file", str(out), "--judge_base_url", judge.url,
                    "--judge_model", "gpt-3.5-turbo", "--noprogress"]
        code, report, err = in_process(endpoint, capsys)
        assert code == 0, err
        assert judge.requests == 3 and report["requests"]["requests"] == 3 and report["model_id"] == "gpt-3.5-turbo"
        questions = rows(three)
        # LLMZoo's prompt_turbo.py request: the stripped question as the one user message; greedy here.
        assert sorted(json.dumps(b["messages"]) for b in judge.bodies) == sorted(
            json.dumps([{"role": "user", "content": q["text"].strip()}]) for q in questions)
        assert all(b["temperature"] == 0 and b["max_tokens"] == 512 and "seed" not in b for b in judge.bodies)
        answers = rows(out)
        assert [a["text"] for a in answers] == ["An answer to: " + q["text"] for q in questions]
        assert all(a["model_id"] == "gpt-3.5-turbo" and a["metadata"]["usage"]["completion_tokens"] > 0
                   for a in answers)
        full = out.read_bytes()

        code, report, _ = in_process(endpoint, capsys)
        assert code == 0 and judge.requests == 3 and report["new"] == 0 and out.read_bytes() == full

        # The answers file cut short, and a fresh cache: only the missing question is asked.
        out.write_text("".join(full.decode().splitlines(keepends=True)[:2]), encoding="utf-8")
        code, report, _ = in_process([*endpoint, "--cache_dir", str(tmp_path / "fresh_cache")], capsys)
        assert code == 0 and judge.requests == 4 and report["new"] == 1 and out.read_bytes() == full


def test_endpoint_failures_are_listed_and_asked_again(tmp_path, three, capsys):
    out = tmp_path / "answers.jsonl"
    with FakeJudge(responder=lambda body: "fine") as judge:
        args = ["--question_file", str(three), "--output_file", str(out), "--judge_base_url", judge.url,
                "--judge_model", "m", "--concurrency", "1", "--noprogress"]
        judge.fail(Fault.http(404, "fake judge: no such model today"))
        code, report, err = in_process(args, capsys)
        assert code == 1 and report["failed"] == 1 and report["answered"] == 2
        assert "no such model today" in report["failures"][0]["error"] and "got no answer" in err
        assert len(rows(out)) == 2
        code, report, _ = in_process(args, capsys)
        assert code == 0 and report["new"] == 1 and judge.requests == 4
    assert [a["question_id"] for a in rows(out)] == [q["question_id"] for q in rows(three)]


def test_bad_question_files_are_refused_with_file_and_line_before_any_work(tmp_path, three, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = three.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([lines[0], "{torn", lines[0], '{"text": "no id"}', '{"question_id": 7, "text": ""}',
                              "[1, 2]", lines[1]]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with FakeJudge(responder=lambda body: "x") as judge:
        code, _, err = in_process(["--question_file", str(bad), "--output_file", str(out), "--judge_base_url",
                                   judge.url, "--judge_model", "m"], capsys)
        assert judge.requests == 0
    assert code == 1 and "5 bad line(s)" in err
    for where in (f"{bad}:2: not JSON", f"{bad}:3: duplicate question_id 1 (first at line 1)",
                  f"{bad}:4: no question_id", f"{bad}:5: no text", f"{bad}:6: not a JSON object"):
        assert where in err
    assert not out.exists()


def test_one_source_at_a_time(tmp_path, tiny, three, capsys):
    code, _, err = in_process(["--base_model", str(tiny), "--judge_base_url", "http://127.0.0.1:9/v1",
                               "--judge_model", "m", "--question_file", str(three), "--output_file",
                               str(tmp_path / "a.jsonl"), "--top_k", "5"], capsys)
    assert code == 2
    assert "--base_model applies to a local model" in err and "--top_k applies to a local model" in err
    code, _, err = in_process(["--question_file", str(three), "--output_file", str(tmp_path / "a.jsonl")], capsys)
    assert code == 2 and "--base_model or --lora_weights is required" in err
