"""eval/judge.py and utils/evaluation/judging.py: MT-bench-style judging against the fake judge of fake_judge.py.

Position swap (a judge that always prefers position A gets nothing but inconsistent ties; a consistent one
gets the right winners), single grading with unparseable outputs kept and counted, the --max_unparsed and
--strict exit codes, bad inputs refused with file:line before any request, multi-turn conversations in the
prompt, and resumption: a rerun sends nothing, a killed run sends only what it had not received.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA
from fake_judge import FakeJudge, Fault
from utils.cli import run
from utils.errors import SuiteError
from utils.evaluation import judging

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "eval" / "judge.py"
LLMZOO = DATA / "llmzoo"
needs_llmzoo = pytest.mark.skipif(not (LLMZOO / "answers").is_dir(), reason=f"needs the LLMZoo answers in {LLMZOO}")


def load_script():
    """eval/judge.py as a module (eval/ is not a package; dataclasses need it in sys.modules)."""
    if "eval_judge" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eval_judge", SCRIPT)
        module = sys.modules["eval_judge"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["eval_judge"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


#: Synthetic answers carry their quality: "quality N" (the consistent judges below read it).
QUALITY = re.compile(r"quality (\d+)")


def synthetic(tmp_path: Path, qualities: dict[str, int], n: int = 4) -> tuple[str, list[str]]:
    """A question file of ``n`` questions and one LLMZoo-format answer file per model, each answer of the
    model's quality."""
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": i, "text": f"Question number {i}?", "category": "generic" if i % 2 else "writing"}
        for i in range(1, n + 1)])
    files = []
    for model, q in qualities.items():
        files.append(write_jsonl(tmp_path / f"answer_{model}.jsonl", [
            {"question_id": i, "text": f"{model}'s answer to {i}, of quality {q}.", "answer_id": f"{model}-{i}",
             "model_id": model, "metadata": {}} for i in range(1, n + 1)]))
    return questions, files


def user_message(body: dict) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


def always_a(body: dict) -> str:
    return "Assistant A's answer is clearly better.\n\n[[A]]"


def by_quality(body: dict) -> str:
    """A consistent pairwise judge: the answer of higher quality wins, whatever its position ([[C]] on a tie)."""
    a, b = (int(x) for x in QUALITY.findall(user_message(body))[:2])
    return "Comparing the two.\n" + ("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")


def judge_args(judge: FakeJudge, out: Path, *flags: str) -> list[str]:
    return ["--judge_base_url", judge.url, "--judge_model", "fake-judge", "--output_dir", str(out), *flags]


def in_process(capsys, *args: str) -> tuple[int, dict | None, str]:
    """The script's main as its command line runs it, here: (exit code, report or None, stderr)."""
    code = 0
    try:
        run(load_script().main, list(args))
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


# -- the parsers ---------------------------------------------------------------------------------------------------


def test_rating_parser_reads_the_verdict_or_says_why_not():
    assert judging.parse_rating("Solid answer.\nRating: [[7]]") == 7.0
    assert judging.parse_rating("Rating: [[ 8.5 ]]") == 8.5
    assert judging.parse_rating("Rating: [6]") == 6.0  # one bracket after the label
    assert judging.parse_rating("[[4]] overall; I stand by [[4]].") == 4.0  # the same rating twice
    assert judging.read_rating("A fine answer, I would say 8 out of 10.") == (None, "no rating in the form Rating: [[x]]")
    assert judging.read_rating("See [3] for details.")[0] is None  # a bare [3] is a citation, not a rating
    assert judging.read_rating("Rating: [[x]] ... Rating: [[x]]")[0] is None  # the prompt's own placeholder
    assert judging.read_rating("Rating: [[3]] no wait, Rating: [[9]]") == (None, "several different ratings: [[3]], [[9]]")
    assert judging.read_rating("Rating: [[11]]") == (None, "rating 11 is outside 1-10")
    assert judging.read_rating("Rating: [[0]]") == (None, "rating 0 is outside 1-10")
    assert judging.read_rating(None) == (None, "no output")


def test_verdict_parser_reads_a_b_c_or_says_why_not():
    assert [judging.parse_verdict(t) for t in ("...\n[[A]]", "[[B]]", "[[C]]", "[[ b ]]")] == ["A", "B", "C", "B"]
    assert judging.read_verdict("Assistant A is better.") == (None, "no verdict [[A]], [[B]] or [[C]]")
    assert judging.read_verdict("[[A]] or maybe [[B]]") == (None, "several different verdicts: [[A]], [[B]]")
    assert judging.parse_verdict("[[A]] ... final: [[A]]") == "A"
    assert judging.read_verdict(None) == (None, "no output")


def test_position_swap_counts_a_verdict_only_when_both_orders_agree():
    # first: model_a shown as A; second: model_b shown as A
    assert judging.pair_outcome("A", "B") == ("a", False)
    assert judging.pair_outcome("B", "A") == ("b", False)
    assert judging.pair_outcome("C", "C") == ("tie", False)
    assert judging.pair_outcome("A", "A") == ("tie", True)  # position A always wins: inconsistent
    assert judging.pair_outcome("B", "B") == ("tie", True)
    assert judging.pair_outcome("A", "C") == ("tie", True)
    assert judging.pair_outcome("A", None) == (None, False)


# -- position swap, end to end -------------------------------------------------------------------------------------


@needs_llmzoo
def test_a_judge_that_always_prefers_position_a_gives_only_inconsistent_ties(tmp_path, capsys):
    answers = [str(LLMZOO / "answers" / f) for f in ("answer_gpt35.jsonl", "answer_Phoenix-chat-7b.jsonl",
                                                     "answer_Chimera-chat-13b.jsonl", "answer_Chimera-chat-7b.jsonl")]
    out = tmp_path / "run"
    with FakeJudge(always_a) as judge:
        code, report, err = in_process(capsys, "--mode", "pairwise", "--baseline", "gpt-3.5-turbo",
                                       "--question_file", str(LLMZOO / "questions-en.jsonl"), "--answer_files",
                                       *answers, *judge_args(judge, out, "--concurrency", "8"))
        assert code == 0, err
        pairs = 70 * 3
        assert judge.requests == 2 * pairs  # every pair in both orders
    assert report["pairs_judged"] == pairs and report["inconsistent"] == pairs
    assert set(report["results"]) == {"phoenix-7b", "chimera-13b", "chimera-7b"}
    for row in report["results"].values():
        assert (row["win"], row["tie"], row["loss"], row["inconsistent"]) == (0, 70, 0, 70)
        assert row["win_rate_adjusted"] == 0.5
    battles = read_jsonl(out / "battles.jsonl")
    assert len(battles) == pairs and {b["winner"] for b in battles} == {"tie"}
    assert {b["model_b"] for b in battles} == {"gpt-3.5-turbo"}
    # each pair was shown both ways round
    judgments = read_jsonl(out / "judgments.jsonl")
    first = [j for j in judgments if j["question_id"] == 1 and j["model_a"] == "phoenix-7b"]
    assert [(j["order"], j["position_a"], j["verdict"], j["winner"]) for j in first] == [
        ("ab", "phoenix-7b", "A", "a"), ("ba", "gpt-3.5-turbo", "A", "b")]
    assert "inconsistent" in err


def test_a_consistent_judge_gives_the_right_winners(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"base": 5, "good": 8, "bad": 2, "same": 5})
    out = tmp_path / "run"
    with FakeJudge(by_quality) as judge:
        code, report, err = in_process(capsys, "--mode", "pairwise", "--baseline", "base", "--question_file",
                                       questions, "--answer_files", *answers, *judge_args(judge, out))
    assert code == 0, err
    rows = {m: (r["win"], r["tie"], r["loss"], r["inconsistent"]) for m, r in report["results"].items()}
    assert rows == {"good": (4, 0, 0, 0), "bad": (0, 0, 4, 0), "same": (0, 4, 0, 0)}
    assert report["results"]["good"]["win_rate"] == 1.0 and report["results"]["bad"]["win_rate"] == 0.0
    assert report["inconsistent"] == 0 and report["unparsed"] == 0
    battles = {(b["model_a"], b["model_b"], b["winner"]) for b in read_jsonl(out / "battles.jsonl")}
    assert battles == {("good", "base", "a"), ("bad", "base", "b"), ("same", "base", "tie")}

    out = tmp_path / "all"
    with FakeJudge(by_quality) as judge:
        code, report, err = in_process(capsys, "--mode", "all_pairs", "--question_file", questions,
                                       "--answer_files", *answers[:3], *judge_args(judge, out))
        assert judge.requests == 3 * 4 * 2
    assert code == 0, err
    assert {m: (r["win"], r["loss"]) for m, r in report["results"].items()} == {
        "base": (4, 4), "good": (8, 0), "bad": (0, 8)}
    assert [(p["model_a"], p["model_b"], p["win"], p["loss"]) for p in report["pairs"]] == [
        ("base", "good", 0, 4), ("base", "bad", 4, 0), ("good", "bad", 4, 0)]


# -- single grading --------------------------------------------------------------------------------------------------


def grade(body: dict) -> str:
    """A single-grading judge: rates the answer's quality, but cannot decide on model "odd" and rates "wild" 12."""
    text = user_message(body)
    if "odd's answer" in text:
        return "I cannot decide on this one."
    quality = int(QUALITY.findall(text)[0])
    return f"Reasonable.\nRating: [[{12 if 'wild' in text else quality}]]"


def test_single_grading_parses_ratings_and_keeps_unparsed_outputs_verbatim(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"good": 8, "bad": 3, "odd": 5, "wild": 6})
    out = tmp_path / "run"
    with FakeJudge(grade) as judge:
        code, report, err = in_process(capsys, "--question_file", questions, "--answer_files", *answers,
                                       *judge_args(judge, out, "--max_unparsed", "1"))
        assert judge.requests == 16
    assert code == 0, err
    results = report["results"]
    assert (results["good"]["mean_rating"], results["good"]["rated"]) == (8.0, 4)
    assert results["bad"]["mean_rating"] == 3.0
    assert results["good"]["by_category"] == {"generic": {"mean_rating": 8.0, "rated": 2},
                                              "writing": {"mean_rating": 8.0, "rated": 2}}
    # unparsed: not scored (no 0 in any mean), counted, listed with the reason
    assert (results["odd"]["mean_rating"], results["odd"]["rated"], results["odd"]["unparsed"]) == (None, 0, 4)
    assert (results["wild"]["mean_rating"], results["wild"]["unparsed"]) == (None, 4)
    assert (report["ok"], report["unparsed"], report["failed"], report["unparsed_fraction"]) == (8, 8, 0, 0.5)
    reasons = {r["reason"] for r in report["not_scored"]}
    assert reasons == {"no rating in the form Rating: [[x]]", "rating 12 is outside 1-10"}
    judgments = read_jsonl(out / "judgments.jsonl")
    assert [j["key"] for j in judgments] == [f"{q}|{m}" for q in range(1, 5) for m in ("good", "bad", "odd", "wild")]
    odd = next(j for j in judgments if j["model"] == "odd")
    assert odd["text"] == "I cannot decide on this one."  # verbatim
    assert (odd["status"], odd["rating"], odd["parse_error"]) == ("unparsed", None, "no rating in the form Rating: [[x]]")
    good = judgments[0]
    assert good["status"] == "ok" and good["rating"] == 8.0 and good["text"].endswith("Rating: [[8]]")
    assert good["messages"][1]["content"].count("good's answer to 1, of quality 8.") == 1
    assert "8 unparsed" in err and report["requests"]["requests"] == 16
    assert json.loads((out / "report.json").read_text()) == report
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["complete"] and set(meta["files"]) == {"judgments.jsonl", "report.json"}


def test_max_unparsed_and_strict_exit_non_zero_after_writing_everything(tmp_path):
    questions, answers = synthetic(tmp_path, {"good": 8, "odd": 5}, n=10)
    out = tmp_path / "run"

    def script(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), "--question_file", questions, "--answer_files", *answers,
                               *judge_args(judge, out, *flags)], cwd=REPO, capture_output=True, text=True, timeout=120)

    with FakeJudge(grade) as judge:
        first = script()  # 10 of 20 unparsed: 50% > 5%
        assert first.returncode == 1, first.stderr
        assert "exceeds --max_unparsed 0.05" in first.stderr
        report = json.loads(first.stdout)  # the report is printed all the same
        assert report["unparsed"] == 10 and report["results"]["good"]["mean_rating"] == 8.0
        assert len(read_jsonl(out / "judgments.jsonl")) == 20 and (out / "report.json").is_file()
        assert judge.requests == 20
        # the threshold is checked again on the no-op re-run, which sends nothing
        assert script("--max_unparsed", "0.5").returncode == 0
        assert script("--max_unparsed", "0.49").returncode == 1
        strict = script("--max_unparsed", "1", "--strict")
        assert strict.returncode == 1 and "--strict" in strict.stderr
        assert judge.requests == 20


# -- bad input -------------------------------------------------------------------------------------------------------


def test_missing_and_duplicate_ids_are_refused_with_file_and_line_before_any_request(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"one": 5, "two": 6})
    bad_questions = write_jsonl(tmp_path / "bad_questions.jsonl", [
        {"question_id": 1, "text": "First?"}, {"text": "No id?"}, {"question_id": 1, "text": "First again?"},
        "{not json", {"question_id": 2, "turns": []}])
    rows = read_jsonl(Path(answers[1]))
    del rows[2]["question_id"]
    rows.append(dict(rows[0]))
    bad_answers = write_jsonl(tmp_path / "bad_answers.jsonl", rows)
    short = write_jsonl(tmp_path / "short.jsonl", read_jsonl(Path(answers[0]))[:2])
    out = tmp_path / "run"
    with FakeJudge(grade) as judge:
        code, report, err = in_process(capsys, "--question_file", bad_questions, "--answer_files", *answers,
                                       *judge_args(judge, out))
        assert code == 1 and report is None
        for line in (f"{bad_questions}:2: no question_id", f"{bad_questions}:3: question_id 1 repeats "
                     f"{bad_questions}:1", f"{bad_questions}:4: not JSON", f"{bad_questions}:5: the question needs"):
            assert line in err
        code, _, err = in_process(capsys, "--question_file", questions, "--answer_files", answers[0], bad_answers,
                                  *judge_args(judge, out))
        assert code == 1
        assert f"{bad_answers}:3: no question_id" in err and f"{bad_answers}:5: question_id 1 repeats {bad_answers}:1" in err
        code, _, err = in_process(capsys, "--question_file", questions, "--answer_files", short, answers[1],
                                  *judge_args(judge, out))
        assert code == 1 and f"{short}: no answer to 2 of the 4 questions: question_id 3, 4" in err
        assert judge.requests == 0
    assert not out.exists()  # nothing written either


def test_flags_are_checked_before_any_work(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"one": 5, "two": 6})
    with FakeJudge(grade) as judge:
        code, _, err = in_process(capsys, "--mode", "pairwise", "--question_file", questions, "--answer_files",
                                  *answers, "--max_unparsed", "2", "--judge_base_url", judge.url)
        assert code == 2
        for problem in ("--mode pairwise needs --baseline", "--max_unparsed must be a fraction",
                        "--judge_model is required", "--output_dir is required"):
            assert problem in err
        code, _, err = in_process(capsys, "--mode", "pairwise", "--baseline", "three", "--question_file", questions,
                                  "--answer_files", *answers, *judge_args(judge, tmp_path / "run"))
        assert code == 2 and "--baseline 'three' is not among the models of --answer_files (one, two)" in err
        code, _, err = in_process(capsys, "--mode", "all_pairs", "--question_file", questions,
                                  "--answer_files", answers[0], *judge_args(judge, tmp_path / "run"))
        assert code == 2 and "at least two files" in err
        assert judge.requests == 0


def test_a_prompt_file_with_a_missing_or_unknown_placeholder_is_refused(tmp_path):
    prompt = json.loads((REPO / "templates" / "judge" / "pairwise.json").read_text())
    prompt["user"] = prompt["user"].replace("{answer_b}", "{answer_c}")
    del prompt["multi_turn"]["turn"]
    path = tmp_path / "pairwise.json"
    path.write_text(json.dumps(prompt))
    with pytest.raises(SuiteError) as err:
        judging.load_prompt(path, "pairwise", False)
    for problem in ("user: no {answer_b}", "user: unknown placeholder {answer_c}", "multi_turn.turn must be a "
                    "non-empty string"):
        assert problem in str(err.value)
    with pytest.raises(SuiteError, match="type must be 'single'"):
        judging.load_prompt(path, "single", False)
    for kind, reference in judging.PROMPT_FILES:  # the suite's own prompts pass
        p = judging.load_prompt(REPO / "templates" / "judge" / judging.PROMPT_FILES[kind, reference], kind, reference)
        assert p.multi_turn and p.kind == kind and p.reference is reference


# -- multi-turn and references ---------------------------------------------------------------------------------------


def test_a_multi_turn_question_is_judged_on_the_whole_conversation(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question_id": "mt-1", "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sadder."]},
        {"question_id": "mt-2", "category": "math", "turns": ["What is 2+2?", "And times 3?"],
         "reference": ["4", "12"]},
        {"question_id": "one", "category": "generic", "text": "Say hello."}])
    answers = [write_jsonl(tmp_path / f"{m}.jsonl", [
        {"question_id": "mt-1", "model_id": m, "choices": [{"index": 0, "turns": [f"{m} haiku", f"{m} sadder haiku"]}]},
        {"question_id": "mt-2", "model_id": m, "choices": [{"index": 0, "turns": [f"{m} says 4", f"{m} says 12"]}]},
        {"question_id": "one", "model_id": m, "choices": [{"index": 0, "turns": [f"{m} says hello"]}]}])
        for m in ("alpha", "beta")]
    with FakeJudge(lambda body: "[[C]]") as judge:
        code, report, err = in_process(capsys, "--mode", "all_pairs", "--question_file", questions,
                                       "--answer_files", *answers,
                                       *judge_args(judge, tmp_path / "run", "--concurrency", "1"))
        bodies = judge.bodies  # in plan order: one request at a time
    assert code == 0, err
    assert report["multi_turn_questions"] == 2 and report["reference_questions"] == 1
    assert len(bodies) == 6 and all(b["temperature"] == 0.0 for b in bodies)
    texts = [user_message(b) for b in bodies]

    def in_order(text: str, *parts: str) -> bool:
        """Whether ``parts`` occur in ``text`` one after the other."""
        at = 0
        for part in parts:
            at = text.find(part, at)
            if at < 0:
                return False
            at += len(part)
        return True

    # mt-1, alpha shown as A: both turns of both conversations, each user turn before its answer
    assert in_order(texts[0], "Write a haiku about rain.", "alpha haiku", "Now make it sadder.", "alpha sadder haiku",
                    "Write a haiku about rain.", "beta haiku", "Now make it sadder.", "beta sadder haiku")
    assert in_order(texts[1], "beta haiku", "beta sadder haiku", "alpha haiku", "alpha sadder haiku")
    assert "--- Turn 2, user ---" in texts[0] and "reference" not in texts[0].lower()
    # mt-2 has references: the reference-guided prompt, with the reference conversation
    assert in_order(texts[2], "reference answer ---\n4", "reference answer ---\n12", "alpha says 4", "alpha says 12")
    # a one-turn question gets the one-turn prompt
    assert "=== Question ===\nSay hello." in texts[4] and "Turn 1" not in texts[4]
    judgments = read_jsonl(tmp_path / "run" / "judgments.jsonl")
    assert [(j["question_id"], j["turns"], j["prompt"]) for j in judgments[::2]] == [
        ("mt-1", 2, "pairwise"), ("mt-2", 2, "pairwise_ref"), ("one", 1, "pairwise")]

    # single grading with a reference file: it wins over the question's own references
    refs = write_jsonl(tmp_path / "refs.jsonl", [
        {"question_id": "mt-2", "model_id": "gpt-4", "choices": [{"turns": ["four", "twelve"]}]}])
    with FakeJudge(lambda body: "Rating: [[5]]") as judge:
        code, report, err = in_process(capsys, "--question_file", questions, "--answer_files", answers[0],
                                       "--reference_file", refs,
                                       *judge_args(judge, tmp_path / "single", "--concurrency", "1"))
        texts = [user_message(b) for b in judge.bodies]
    assert code == 0, err
    assert in_order(texts[1], "What is 2+2?", "reference answer ---\nfour", "And times 3?",
                    "reference answer ---\ntwelve", "alpha says 4", "alpha says 12")
    assert report["results"]["alpha"]["mean_rating"] == 5.0


# -- resumption ------------------------------------------------------------------------------------------------------


def test_an_identical_rerun_sends_no_request_and_changes_no_file(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"base": 5, "good": 8})
    out = tmp_path / "run"
    with FakeJudge(by_quality) as judge:
        flags = ["--mode", "pairwise", "--baseline", "base", "--question_file", questions, "--answer_files",
                 *answers, *judge_args(judge, out)]
        code, first, _ = in_process(capsys, *flags)
        assert code == 0 and judge.requests == 8
        files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code, again, err = in_process(capsys, *flags)
        assert code == 0 and judge.requests == 8 and again == first
        assert "nothing to do" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
        # without the folder's judgments the client's cache still answers: nothing sent
        code, third, err = in_process(capsys, *flags[:-2], "--output_dir", str(tmp_path / "other"),
                                      "--cache_dir", str(out / "cache"))
        assert code == 0 and judge.requests == 8 and third["requests"]["cached"] == 8


def test_a_killed_run_resumes_sending_only_the_missing_requests(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"a": 5, "b": 6, "c": 7}, n=6)  # 18 judgments
    out = tmp_path / "run"
    with FakeJudge(grade, delay=0.05) as judge:
        flags = ["--question_file", questions, "--answer_files", *answers,
                 *judge_args(judge, out, "--concurrency", "1")]
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *flags], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        path = out / "judgments.jsonl"
        while time.time() < deadline and (not path.is_file() or len(path.read_text().splitlines()) < 6):
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=30)
        assert proc.returncode != 0
        kept = len(read_jsonl(path))
        assert 6 <= kept < 18
        with open(path, "a", encoding="utf-8") as f:
            f.write('{"key": "torn')  # as if killed mid-write
        sent = judge.requests
        code, report, err = in_process(capsys, *flags)
        assert code == 0, err
        resumed = judge.requests - sent
        assert report["requests"]["reused"] >= kept
        assert resumed == 18 - report["requests"]["reused"] - report["requests"]["cached"] < 18 - kept + 1
        judgments = read_jsonl(path)
        assert [j["key"] for j in judgments] == [f"{q}|{m}" for q in range(1, 7) for m in "abc"]
        assert report["ok"] == 18
        code, _, _ = in_process(capsys, *flags)
        assert code == 0 and judge.requests == sent + resumed


def test_a_failed_request_is_counted_and_asked_again_on_the_rerun(tmp_path, capsys):
    questions, answers = synthetic(tmp_path, {"a": 5, "b": 6})
    out = tmp_path / "run"
    with FakeJudge(grade) as judge:
        judge.fail(Fault.http(400, "context too long"))
        flags = ["--question_file", questions, "--answer_files", *answers,
                 *judge_args(judge, out, "--concurrency", "1", "--max_unparsed", "0.2")]
        code, report, err = in_process(capsys, *flags)
        assert code == 0, err  # 1 of 8 is within 20%
        assert (report["failed"], report["ok"]) == (1, 7) and judge.requests == 8
        failed = next(r for r in report["not_scored"])
        assert failed["status"] == "failed" and "context too long" in failed["reason"]
        stored = next(j for j in read_jsonl(out / "judgments.jsonl") if j["status"] == "failed")
        assert stored["text"] is None and "context too long" in stored["error"]
        code, report, err = in_process(capsys, *flags)
        assert code == 0 and judge.requests == 9  # only the failed one again
        assert (report["failed"], report["ok"]) == (0, 8) and "asking them again" in err
