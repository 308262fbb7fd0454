"""eval/review.py end to end against the replaying fake judge: LLMZoo's en/general and en/relevance come out byte
for byte (review.jsonl lines, metric.json, ordering.txt); a re-run sends nothing and changes no file; a run cut
short resumes with only the missing requests; unparseable verdicts are kept verbatim, counted and bounded by
--max_unparsed / --strict; failed requests are retried by the next run; bad inputs (missing answers, duplicate
ids, unreadable lines, too many files) are refused with file:line before any request; score mode with our own
rules."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO
from fake_judge import Fault, FakeJudge, llmzoo_question, replay_from_reviews
from utils.cli import run

ZOO = DATA / "llmzoo"
REVIEWS = ZOO / "reviews" / "en"
QUESTIONS = ZOO / "questions-en.jsonl"
RULES = ZOO / "prompt_all.json"
#: The answer files of en/general's model_ids, in that order (gpt-3.5-turbo, phoenix-7b, chimera-13b, chimera-7b).
ANSWERS = [ZOO / "answers" / f"answer_{name}.jsonl" for name in
           ("gpt35", "Phoenix-chat-7b", "Chimera-chat-13b", "Chimera-chat-7b")]
GARBAGE = "All four answers have their merits; I cannot rank them."

pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason=f"LLMZoo data not found at {ZOO} (../shared is absent)")
review_script = importlib.import_module("eval.review")


def flags(judge: FakeJudge, out: Path, dimension: str = "general", answers=ANSWERS, *extra: str) -> list[str]:
    return ["--question_file", str(QUESTIONS), "--answer_files", *map(str, answers), "--rules", str(RULES),
            "--dimension", dimension, "--judge_base_url", judge.url, "--judge_model", "gpt-3.5-turbo",
            "--output_dir", str(out), *extra]


def script(*args: str) -> subprocess.CompletedProcess:
    """eval/review.py as a shell runs it."""
    return subprocess.run([sys.executable, "eval/review.py", *args], cwd=REPO, capture_output=True, text=True)


def in_process(args: list[str], capsys) -> tuple[int, dict | None, str]:
    """eval/review.py's main in this process, as its command line would run it: (exit code, report, stderr)."""
    try:
        run(review_script.main, args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def without_key(line: str) -> str:
    """A review.jsonl line of ours as LLMZoo's script would have written it (our review_key left out)."""
    record = json.loads(line)
    record.pop("review_key")
    return json.dumps(record, ensure_ascii=False)


@pytest.fixture(scope="module")
def replays() -> dict[str, dict[str, str]]:
    return {d: replay_from_reviews(REVIEWS / d / "review.jsonl") for d in ("general", "relevance")}


@pytest.mark.parametrize("dimension", ["general", "relevance"])
def test_review_reproduces_llmzoo_byte_for_byte_and_a_rerun_sends_nothing(tmp_path, replays, dimension):
    out = tmp_path / dimension
    with FakeJudge(replay=replays[dimension]) as judge:
        proc = script(*flags(judge, out, dimension))
        assert proc.returncode == 0, proc.stderr
        assert judge.requests == 70
        # What LLMZoo sends: its system message, its user message, temperature 0, no max_tokens.
        body = judge.bodies[0]
        assert body["temperature"] == 0 and "max_tokens" not in body and body["model"] == "gpt-3.5-turbo"
        assert body["messages"][0] == {"role": "system", "content": "You are a helpful and precise assistant for "
                                                                    "checking the quality of the answer."}
        stored = REVIEWS / dimension
        for name in ("metric.json", "ordering.txt"):
            assert (out / name).read_bytes() == (stored / name).read_bytes(), name
        # Every record is LLMZoo's stored line, plus our review_key.
        ours = (out / "review.jsonl").read_text(encoding="utf-8").splitlines()
        assert [without_key(line) for line in ours] == (stored / "review.jsonl").read_text(
            encoding="utf-8").splitlines()
        report = json.loads(proc.stdout)
        assert report["unparsed"]["count"] == 0 and report["failed"]["count"] == 0 and report["reviews"] == 70
        assert report["models"] == ["gpt-3.5-turbo", "phoenix-7b", "chimera-13b", "chimera-7b"]
        assert report["requests"]["requests"] == 70
        assert json.loads((out / "report.json").read_text()) == report
        assert json.loads((out / "pipeline.json").read_text())["complete"] is True
        before = files_of(out)

        again = script(*flags(judge, out, dimension))
        assert again.returncode == 0, again.stderr
        assert judge.requests == 70, "an identical re-run sent requests"
        assert "nothing sent" in again.stderr and json.loads(again.stdout) == report
        assert files_of(out) == before


def test_a_run_cut_short_resumes_with_only_the_missing_requests(tmp_path, replays, capsys):
    """A review.jsonl left by a killed run (40 whole lines and a torn one, no pipeline.json) is resumed: only the
    30 missing reviews are asked (from a judge with an empty cache), and the result is the uncut run's."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    with FakeJudge(replay=replays["general"]) as judge:
        assert in_process(flags(judge, full), capsys)[0] == 0
    lines = (full / "review.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    cut.mkdir()
    (cut / "review.jsonl").write_text("".join(lines[:40]) + lines[40][:100], encoding="utf-8")
    with FakeJudge(replay=replays["general"]) as judge:
        code, report, err = in_process(flags(judge, cut), capsys)
        assert code == 0, err
        assert judge.requests == 30 and report["new"] == 30
        assert "40 already reviewed, 30 to ask" in err
        for name in ("review.jsonl", "metric.json", "ordering.txt"):
            assert (cut / name).read_bytes() == (full / name).read_bytes(), name

        # The same judge at another address: a different run for the finished folder, but nothing is asked again.
        reviews = (full / "review.jsonl").read_bytes()
        code, _, err = in_process(flags(judge, full), capsys)
        assert code == 1 and "holds a different review output" in err
        code, report, err = in_process(flags(judge, full, "general", ANSWERS, "--overwrite"), capsys)
        assert code == 0 and report["new"] == 0 and judge.requests == 30
        assert (full / "review.jsonl").read_bytes() == reviews


def test_unparseable_verdicts_are_kept_counted_and_bounded(tmp_path, replays, capsys):
    """Two of 70 verdicts unreadable (2.9%): kept verbatim with order [-1]*4 and a parse_error, counted on stderr
    and in the report, the metric keeps LLMZoo's denominator; the run passes. --max_unparsed 0.02 or --strict
    make the same folder end non-zero, with every file written."""
    table = dict(replays["general"])
    bad = sorted(table)[:2]
    for question in bad:
        table[question] = GARBAGE
    out = tmp_path / "out"
    with FakeJudge(replay=table) as judge:  # one endpoint throughout: the judge's URL is part of the review
        code, report, err = in_process(flags(judge, out), capsys)
        assert code == 0, err
        assert report["unparsed"]["count"] == 2 and "2 of 70 verdict(s) could not be parsed" in err
        records = [json.loads(line) for line in (out / "review.jsonl").read_text(encoding="utf-8").splitlines()]
        kept = [r for r in records if r["metadata"]["question"] in bad]
        assert len(kept) == 2
        assert all(r["text"] == GARBAGE and r["order"] == [-1] * 4 and r["parse_error"] for r in kept)
        assert {row["question_id"] for row in report["unparsed"]["rows"]} == {r["question_id"] for r in kept}
        assert report["denominator"] == 70 and report["counted"] == 68  # LLMZoo's quirk, reported beside it
        metric = json.loads((out / "metric.json").read_text())
        assert sum(metric["phoenix-7b"]["winning"][k] for k in ("gpt3.5", "tie", "model")) == 68

        code, report, err = in_process(flags(judge, out, "general", ANSWERS, "--max_unparsed", "0.02"), capsys)
        assert code == 1 and "more than --max_unparsed 2.0%" in err and report["unparsed"]["count"] == 2
        code, _, err = in_process(flags(judge, out, "general", ANSWERS, "--strict"), capsys)
        assert code == 1 and "--strict: 2 of 70" in err
        assert judge.requests == 70


def test_failed_requests_are_reported_and_retried_by_the_next_run(tmp_path, replays, capsys):
    """A request the judge refuses (400: not retried) is listed with the server's message; no metric is written
    and the folder stays unfinished; the next run asks only for it and finishes."""
    out = tmp_path / "out"
    with FakeJudge(replay=replays["general"]) as judge:
        judge.fail(Fault.http(400, "fake judge: bad request for this one"))
        code, report, err = in_process(flags(judge, out), capsys)
        assert code == 1 and judge.requests == 70
        assert report["failed"]["count"] == 1 and "bad request for this one" in report["failed"]["rows"][0]["error"]
        assert "failed after all retries" in err
        assert not (out / "metric.json").exists() and json.loads((out / "pipeline.json").read_text())["complete"] is False
        assert len((out / "review.jsonl").read_text().splitlines()) == 69

        code, report, err = in_process(flags(judge, out), capsys)
        assert code == 0, err
        assert judge.requests == 71 and report["new"] == 1
    assert (out / "metric.json").read_bytes() == (REVIEWS / "general" / "metric.json").read_bytes()


def test_missing_answers_are_named_before_any_request(tmp_path, capsys):
    partial = tmp_path / "answer_partial.jsonl"
    rows = [json.loads(line) for line in ANSWERS[1].read_text(encoding="utf-8").splitlines()]
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows if r["question_id"] not in (3, 17)))
    with FakeJudge(responder=lambda body: "Assistant 1 > Assistant 2") as judge:
        code, _, err = in_process(flags(judge, tmp_path / "out", "general", [ANSWERS[0], partial]), capsys)
        assert judge.requests == 0
    assert code == 1 and f"{partial}: no answer to 2 of the 70 questions: question_id 3, 17" in err
    assert not (tmp_path / "out").exists()


def test_bad_lines_and_duplicate_ids_are_refused_with_file_and_line(tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    lines = QUESTIONS.read_text(encoding="utf-8").splitlines()
    questions.write_text("\n".join(lines[:3] + ["{not json", lines[1], '{"question_id": 9}'] + lines[3:]) + "\n")
    answers = tmp_path / "a.jsonl"
    answer_lines = ANSWERS[2].read_text(encoding="utf-8").splitlines()
    answers.write_text("\n".join(answer_lines[:2] + [answer_lines[0]] + answer_lines[2:]) + "\n")
    with FakeJudge(responder=lambda body: "Assistant 1 > Assistant 2") as judge:
        code, _, err = in_process(["--question_file", str(questions), "--answer_files", str(ANSWERS[0]),
                                   str(ANSWERS[1]), "--rules", str(RULES), "--dimension", "general",
                                   "--judge_base_url", judge.url, "--judge_model", "m",
                                   "--output_dir", str(tmp_path / "out")], capsys)
        assert code == 1
        assert f"{questions}:4: not JSON" in err and f"{questions}:5: duplicate question_id 2" in err
        assert f"{questions}:6: no text" in err
        code, _, err = in_process(["--question_file", str(QUESTIONS), "--answer_files", str(ANSWERS[0]), str(answers),
                                   "--rules", str(RULES), "--dimension", "general", "--judge_base_url", judge.url,
                                   "--judge_model", "m", "--output_dir", str(tmp_path / "out")], capsys)
        assert code == 1 and f"{answers}:3: duplicate question_id 1 (first at line 1)" in err
        assert judge.requests == 0


def test_two_to_nine_answer_files_and_rules_that_fit_the_mode(tmp_path, capsys):
    with FakeJudge(responder=lambda body: "x") as judge:
        code, _, err = in_process(flags(judge, tmp_path / "out", "general", [ANSWERS[0]] * 10), capsys)
        assert code == 2 and "compares 2 to 9 answer files" in err and "got 10" in err
        code, _, err = in_process(flags(judge, tmp_path / "out", "general", ANSWERS[:1]), capsys)
        assert code == 2 and "got 1" in err
        # LLMZoo's order rules do not ask for scores.
        code, _, err = in_process(flags(judge, tmp_path / "out", "general", ANSWERS, "--mode", "score"), capsys)
        assert code == 2 and "never says 'score'" in err
        code, _, err = in_process(flags(judge, tmp_path / "out", "nonsense"), capsys)
        assert code == 2 and "--dimension 'nonsense' is not in --rules" in err
        assert judge.requests == 0


def test_score_mode_with_our_rules(tmp_path, capsys):
    """--mode score without --rules uses templates/judge/llmzoo_score.json; each model's mean score is the judge's
    scores summed over the questions; there is no ordering.txt."""
    scores = {}

    def judge_scores(body: dict) -> str:
        question = llmzoo_question(body["messages"][-1]["content"])
        scores[question] = (len(question) % 5 + 5, 7)
        return f"Assistant 1 is fine.\nAssistant 2 is fine.\n{scores[question][0]} {scores[question][1]}"

    out = tmp_path / "score"
    with FakeJudge(responder=judge_scores) as judge:
        args = ["--question_file", str(QUESTIONS), "--answer_files", str(ANSWERS[0]), str(ANSWERS[2]),
                "--dimension", "relevance", "--mode", "score", "--judge_base_url", judge.url, "--judge_model", "m",
                "--output_dir", str(out)]
        code, report, err = in_process(args, capsys)
        assert code == 0, err
        rules = json.loads((REPO / "templates" / "judge" / "llmzoo_score.json").read_text())
        prompt = rules["relevance"]["prompt"].format(num=2, num_str="two")
        assert judge.bodies[0]["messages"][1]["content"].endswith(f"[System]\n{prompt}\n\n")
    records = [json.loads(line) for line in (out / "review.jsonl").read_text().splitlines()]
    assert all("score" in r and "order" not in r for r in records)
    metric = json.loads((out / "metric.json").read_text())
    assert metric["chimera-13b"]["score"]["model"] == pytest.approx(7.0)
    assert metric["chimera-13b"]["score"]["gpt3.5"] == pytest.approx(sum(s[0] for s in scores.values()) / 70)
    assert not (out / "ordering.txt").exists() and report["ordering"] is None


def test_reviews_asked_otherwise_need_overwrite(tmp_path, replays, capsys):
    """The same folder with the answers in another order: its reviews were asked otherwise and are refused;
    with --overwrite they are replaced (asked again), and the order is the new one."""
    out = tmp_path / "out"
    table = replays["general"]
    with FakeJudge(replay=table) as judge:
        assert in_process(flags(judge, out), capsys)[0] == 0
        swapped = [ANSWERS[1], ANSWERS[0], ANSWERS[2], ANSWERS[3]]
        code, _, err = in_process(flags(judge, out, "general", swapped), capsys)
        assert code == 1 and "pass --overwrite" in err and judge.requests == 70
        code, report, err = in_process(flags(judge, out, "general", swapped, "--overwrite"), capsys)
        assert code == 0, err
        assert judge.requests == 140 and report["models"][:2] == ["phoenix-7b", "gpt-3.5-turbo"]
        first = json.loads((out / "review.jsonl").read_text().splitlines()[0])
        assert first["metadata"]["model_ids"][0] == "phoenix-7b"


def test_our_review_file_feeds_llmzoo_metric(tmp_path, replays, capsys):
    """review.jsonl is LLMZoo's format: eval/llmzoo_metric.py on it writes the same metric.json as review.py."""
    out = tmp_path / "out"
    with FakeJudge(replay=replays["relevance"]) as judge:
        assert in_process(flags(judge, out, "relevance"), capsys)[0] == 0
    metric = importlib.import_module("eval.llmzoo_metric")
    run(metric.main, ["--review_file", str(out / "review.jsonl"), "--output_dir", str(tmp_path / "metric")])
    capsys.readouterr()
    for name in ("metric.json", "ordering.txt"):
        assert (tmp_path / "metric" / name).read_bytes() == (out / name).read_bytes()
    shutil.rmtree(tmp_path / "metric")
