"""utils/evaluation/llmzoo.py and eval/llmzoo_metric.py: LLMZoo's review protocol with exact parity.

The real-data tests read LLMZoo's stored English reviews under ../shared/data/llmzoo (the questions, the four
models' answers, the rules, and for each of five dimensions the judge's reviews with the metric.json and
ordering.txt LLMZoo's scripts computed from them); they are skipped when ../shared is absent. The synthetic
tests cover what the stored sets do not: ties in the ranking, unread verdicts, skipped categories,
horizontal mode and score mode. Expected figures are worked out here from LLMZoo's definitions, by hand.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA
from utils.cli import run
from utils.errors import SuiteError, UsageError
from utils.evaluation.llmzoo import (NUM_STR, SYSTEM_MESSAGE, check_rule, llmzoo_metric, load_rules, num_str,
                                     order_battles, ordering_txt, parse_order, parse_review, parse_score,
                                     read_review_file, review_messages, review_record, review_set, score_battles)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "eval" / "llmzoo_metric.py"
LLMZOO = DATA / "llmzoo"
REVIEWS = LLMZOO / "reviews" / "en"
DIMENSIONS = ["general", "relevance", "diversity", "coherence", "immersion"]
#: The answer files of en/general's four models, in its metadata.model_ids order.
ANSWER_FILES = ["answer_gpt35.jsonl", "answer_Phoenix-chat-7b.jsonl", "answer_Chimera-chat-13b.jsonl",
                "answer_Chimera-chat-7b.jsonl"]
#: The 5 of the 290 stored English reviews that hold no ordering of all four assistants: (dimension, question).
#: Their stored orders were not written by LLMZoo's parser (which gives -1 on them); the judge wrote "all four
#: are equal (=)" in prose, or (diversity 38) ranked only three of the four.
NO_ORDERING = {("diversity", 38), ("coherence", 10), ("coherence", 35), ("coherence", 63), ("immersion", 25)}
SCORE_RULES = REPO / "templates" / "judge" / "llmzoo_score.json"

needs_shared = pytest.mark.skipif(not REVIEWS.is_dir(), reason=f"LLMZoo's stored reviews are not at {REVIEWS} "
                                  "(the shared data folder beside the repository)")


def load_script():
    """eval/llmzoo_metric.py as a module (eval/ is not a package; dataclasses need it in sys.modules)."""
    if "eval_llmzoo_metric" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eval_llmzoo_metric", SCRIPT)
        module = sys.modules["eval_llmzoo_metric"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["eval_llmzoo_metric"]


def in_process(capsys, *args: str) -> tuple[dict, str]:
    """The script's main as its command line runs it, here (no interpreter start): (report, stderr)."""
    run(load_script().main, list(args))
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def review(qid, values, category="generic", models=("ref", "a", "b"), mode="order", text="") -> dict:
    """A synthetic review in LLMZoo's record format."""
    return {"reviewer_id": "judge", "lang": "en", "question_id": qid, "answer_ids": [f"{m}-{qid}" for m in models],
            "category": category, "metadata": {"question": f"q{qid}", "answers": [f"{m} says" for m in models],
                                               "model_ids": list(models)},
            "text": text, mode: list(values)}


def synthetic(records: list[dict], mode: str = "order"):
    return review_set(enumerate(records, 1), "synthetic.jsonl", mode=mode)


def row(*cells) -> str:
    """One ordering.txt line: 30-character columns, as LLMZoo's '{0:<30}{1:<30}{2:<30}'."""
    return "".join(str(c).ljust(30) for c in cells) + "\n"


HEADER = row("Model", "Ranking Score", "Rank")


# -- the prompt --------------------------------------------------------------------------------------------


def test_num_str_is_llmzoos_num2str_and_other_counts_are_refused():
    assert NUM_STR == {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
    rule = {"role": "Assistant", "prompt": "Rank {num_str} assistants, 1 - {num}, in order."}
    assert "Rank nine assistants, 1 - 9" in review_messages("q", ["x"] * 9, rule)[1]["content"]
    for n in (0, 1, 10):
        with pytest.raises(UsageError, match="2 to 9 answers"):
            review_messages("q", ["x"] * n, rule)
    with pytest.raises(UsageError, match="2 to 9"):
        num_str(True)


def test_a_rule_with_other_braces_or_no_prompt_is_refused():
    with pytest.raises(UsageError, match=r"only \{num\} and \{num_str\}"):
        review_messages("q", ["a", "b"], {"role": "Assistant", "prompt": "reply as {\"order\": [...]}"})
    with pytest.raises(UsageError, match="'prompt'"):
        review_messages("q", ["a", "b"], {"role": "Assistant"})


@needs_shared
def test_the_review_prompt_of_question_1_is_byte_identical_to_llmzoos_format():
    question = jsonl(LLMZOO / "questions-en.jsonl")[0]
    answers = [next(a for a in jsonl(LLMZOO / "answers" / name) if a["question_id"] == 1) for name in ANSWER_FILES]
    stored = jsonl(REVIEWS / "general" / "review.jsonl")[0]
    # The stored review shows these four answers, in this order: so this is the prompt its judge was sent.
    assert stored["question_id"] == 1 and stored["metadata"]["question"] == question["text"]
    assert stored["metadata"]["answers"] == [a["text"] for a in answers]
    assert stored["metadata"]["model_ids"] == [a["model_id"] for a in answers] == [
        "gpt-3.5-turbo", "phoenix-7b", "chimera-13b", "chimera-7b"]
    assert stored["answer_ids"] == [a["answer_id"] for a in answers]
    rule = json.loads((LLMZOO / "prompt_all.json").read_text(encoding="utf-8"))["general"]

    messages = review_messages(question["text"], [a["text"] for a in answers], rule)

    prompt = rule["prompt"].replace("{num_str}", "four").replace("{num}", "4")
    expected = "[Question]\nHow can I improve my time management skills?\n\n"
    for i, answer in enumerate(answers, 1):
        expected += ("\n\n" if i > 1 else "") + f"[Assistant {i}]\n" + answer["text"] + f"\n\n[End of Assistant {i}]"
    expected += "\n\n[System]\n" + prompt + "\n\n"
    assert messages == [
        {"role": "system",
         "content": "You are a helpful and precise assistant for checking the quality of the answer."},
        {"role": "user", "content": expected}]
    assert SYSTEM_MESSAGE == messages[0]["content"]
    content = messages[1]["content"]
    assert "the performance of four AI assistants" in content and "among Assistant 1 - Assistant 4" in content
    assert "{num" not in content and content.endswith("equivalent overall performance ('=').\n\n")


# -- the parsers -------------------------------------------------------------------------------------------


def test_parse_order_is_llmzoos_parse_order_cot():
    assert parse_order("Thus: Assistant 2 > Assistant 1 = Assistant 3 > Assistant 4", 4) == [2, 1, 2, 4]
    assert parse_order("Assistant 1 = Assistant 2 = Assistant 3", 3) == [1, 1, 1]
    assert parse_order("Assistant 3 > Assistant 1 > Assistant 2", 3) == [2, 3, 1]
    # ">=" and ">>" are read as ">"
    assert parse_order("Assistant 2 >= Assistant 1 >> Assistant 3", 3) == [2, 1, 3]
    # the first chain that names all n wins; shorter ones before it are passed over
    assert parse_order("Assistant 1 > Assistant 2 first, then Assistant 3 = Assistant 2 > Assistant 1", 3) == [3, 1, 1]
    two_chains = "Assistant 1 > Assistant 2 = Assistant 3\nAssistant 3 > Assistant 2 > Assistant 1"
    assert parse_order(two_chains, 3) == [1, 2, 2]
    # competition ranking: after two equals, the next rank skips one
    assert parse_order("Assistant 4 = Assistant 2 > Assistant 1 = Assistant 3", 4) == [3, 1, 3, 1]


@pytest.mark.parametrize("text, n, reason", [
    ("All four assistants are equally good (=).", 4, "no ordering line"),
    ("Assistant 2 > Assistant 1 = Assistant 3.", 4, "name 3 of them"),
    ("Assistant 1 > Assistant 5 > Assistant 2", 3, "names Assistant 5, but there are 3"),
    ("Assistant 1 > Assistant 1 > Assistant 2", 3, "names Assistant 1 twice and leaves out Assistant 3"),
    ("Assistant 0 > Assistant 1", 2, "names Assistant 0"),
])
def test_parse_order_reports_failure_instead_of_inventing_an_order(text, n, reason):
    parsed = parse_review(text, n, "order")
    assert parsed.values == [-1] * n and not parsed.ok and reason in parsed.error
    assert parse_order(text, n) == [-1] * n


@needs_shared
def test_parse_order_gives_the_stored_order_of_285_of_the_290_english_reviews_and_fails_on_the_other_5():
    agree, failed = 0, set()
    for dimension in DIMENSIONS:
        for record in jsonl(REVIEWS / dimension / "review.jsonl"):
            parsed = parse_review(record["text"], 4, "order")
            if parsed.values == record["order"]:
                agree += 1
            else:
                assert parsed.values == [-1] * 4 and parsed.error, (dimension, record["question_id"])
                failed.add((dimension, record["question_id"]))
    assert (agree, failed) == (285, NO_ORDERING)


@pytest.mark.parametrize("text, n, expected", [
    ("Assistant 1 is fine, Assistant 2 better.\n7 8.5", 2, [7.0, 8.5]),  # a last line of numbers
    ("Some reasoning.\nScores: 7 8.5 9", 3, [7.0, 8.5, 9.0]),  # numbers that end the text
    ("Some reasoning. Final scores 6 7.", 2, [6.0, 7.0]),  # trailing numbers, the final dot dropped
    ("Assistant 1: 7\nAssistant 2: 9.5\nSo Assistant 2 wins!", 2, [7.0, 9.5]),  # "Assistant i: x"
    ("8 9\n", 2, [8.0, 9.0]),
])
def test_parse_score_reads_llmzoos_three_forms(text, n, expected):
    assert parse_score(text, n) == expected and parse_review(text, n, "score").ok


@pytest.mark.parametrize("text, n, reason", [
    ("reasoning\n7 8 9", 2, "give 3 numbers, not 2"),
    ("reasoning\n7  8", 2, "not numbers separated by single spaces"),  # two spaces
    ("Assistant 1: 7, Assistant 2: 8", 2, "give 1 numbers"),  # LLMZoo reads only the trailing number here
    ("Scores: 7, 8", 2, "give 1 numbers"),  # commas in the numbers that end the text are not read
    ("Assistant 1: 7, and the other one loses!", 2, "no 'Assistant 2: <score>'"),
    ("Both are fine. I cannot decide.", 2, "no scores at the end"),  # a final dot: LLMZoo looks only there
    ("Assistant 1: 7\nAssistant 2: 8 \n  ", 2, "no scores at the end"),  # LLMZoo searches the unstripped text there
    ("I cannot decide", 2, "the last line is not numbers"),
])
def test_parse_score_failures_are_minus_one_with_a_reason(text, n, reason):
    parsed = parse_review(text, n, "score")
    assert parsed.values == [-1] * n and reason in parsed.error
    assert parse_score(text, n) == [-1] * n


# -- the record and its reading ----------------------------------------------------------------------------


@needs_shared
def test_review_record_has_the_stored_files_key_order_and_keeps_a_parse_error():
    stored = jsonl(REVIEWS / "general" / "review.jsonl")[0]
    question = jsonl(LLMZOO / "questions-en.jsonl")[0]
    answers = [next(a for a in jsonl(LLMZOO / "answers" / name) if a["question_id"] == 1) for name in ANSWER_FILES]

    record = review_record(question, answers, stored["text"], mode="order", reviewer_id="gpt-3.5-turbo",
                           review_id=1)

    assert json.dumps(record, ensure_ascii=False) == json.dumps(stored, ensure_ascii=False)
    without_id = review_record(question, answers, "no verdict here", mode="order", reviewer_id="judge")
    assert list(without_id) == [k for k in stored if k != "review_id"] + ["parse_error"]
    assert without_id["order"] == [-1] * 4 and "no ordering line" in without_id["parse_error"]
    assert list(without_id["metadata"]) == ["question", "answers", "model_ids"]
    with pytest.raises(SuiteError, match="'answer_id' is missing"):
        review_record(question, [{"model_id": "m", "text": "t"}] * 2, "x", mode="order", reviewer_id="j")


def test_a_kept_parse_error_is_the_reason_reported_and_scores_round_trip(tmp_path):
    question = {"question_id": 3, "text": "Why?", "category": "generic"}
    answers = [{"answer_id": f"id{i}", "model_id": m, "text": f"answer {i}"} for i, m in enumerate(["x", "y"])]
    good = review_record(question, answers, "reasoning\n6 8", mode="score", reviewer_id="judge")
    bad = review_record({**question, "question_id": 4}, answers, "unsure", mode="score", reviewer_id="judge")
    assert good["score"] == [6.0, 8.0] and "parse_error" not in good and good["lang"] == "en"
    reviews = read_review_file(write_jsonl(tmp_path / "review.jsonl", [good, bad]), mode="score")
    assert reviews.errors == {4: bad["parse_error"]} and reviews.where(4).endswith("review.jsonl:2")
    assert score_battles(reviews) == [("x", "y", "b")]


@pytest.mark.parametrize("lines, message", [
    (["{\"question_id\": 1, \"categ"], "review.jsonl:1: not JSON"),
    ([review(1, [1, 2, 3]), review(1, [1, 2, 3])], "review.jsonl:2: question_id 1 again (first at line 1)"),
    ([review(1, [1, 2, 3]), review(2, [1, 2, 3], models=("ref", "b", "a"))], "review.jsonl:2: metadata.model_ids"),
    ([review(1, [1, 0, 3])], "rank below 1"),
    ([review(1, [1, 2])], "not a list of 3 numbers"),
    ([review(1, [1, 2, 3], models=("ref", "a", "a"))], "repeats a model"),
    ([review(1, [7, 8, 9], mode="score")], "no 'order' field"),
])
def test_a_review_file_the_metric_cannot_use_is_refused_with_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "review.jsonl", lines)
    with pytest.raises(SuiteError) as exc:
        read_review_file(path)
    assert message in str(exc.value)


# -- the metric on LLMZoo's stored reviews -----------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_the_metric_reproduces_llmzoos_metric_json_and_ordering_txt_byte_for_byte(dimension):
    folder = REVIEWS / dimension
    result = llmzoo_metric(read_review_file(folder / "review.jsonl"))
    assert result.metric_json() == (folder / "metric.json").read_text(encoding="utf-8")
    assert result.ordering_txt() == (folder / "ordering.txt").read_text(encoding="utf-8")
    assert (result.unparsed, result.skipped, result.reference) == ([], {"coding": 0, "math": 0}, "gpt-3.5-turbo")
    assert result.denominator == (10 if dimension == "immersion" else 70)


@needs_shared
def test_the_script_reproduces_en_general_byte_for_byte_and_an_identical_rerun_is_a_no_op(tmp_path):
    out = tmp_path / "general"
    command = [sys.executable, str(SCRIPT), "--review_file", str(REVIEWS / "general" / "review.jsonl"),
               "--output_dir", str(out)]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    for name in ("metric.json", "ordering.txt"):
        assert (out / name).read_bytes() == (REVIEWS / "general" / name).read_bytes(), name
    report = json.loads(first.stdout)
    assert report["unparsed"] == {"count": 0, "rows": []} and report["denominator"] == 70
    assert report["ordering"][:2] == [["chimera-13b", 1.6428571428571428, 1], ["turbo", 1.7571428571428571, 2]]
    assert sorted(p.name for p in out.iterdir()) == ["metric.json", "ordering.txt", "pipeline.json", "report.json"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)

    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr and json.loads(again.stdout) == report
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@needs_shared
def test_a_question_file_gives_the_same_bytes_and_a_question_without_review_is_named(tmp_path, capsys):
    out = tmp_path / "relevance"
    report, _ = in_process(capsys, "--review_file", str(REVIEWS / "relevance" / "review.jsonl"), "--output_dir",
                           str(out), "--question_file", str(LLMZOO / "questions-en.jsonl"))
    assert (out / "metric.json").read_bytes() == (REVIEWS / "relevance" / "metric.json").read_bytes()
    assert report["question_file"]["path"] == str((LLMZOO / "questions-en.jsonl").resolve())
    # immersion reviewed only the 10 roleplay questions: the 70-question file leaves 60 without a review
    with pytest.raises(SuiteError, match="no review for 60 of the 70 questions: 1, 2, 3"):
        load_script().main(review_file=str(REVIEWS / "immersion" / "review.jsonl"),
                           question_file=str(LLMZOO / "questions-en.jsonl"))


@needs_shared
def test_reparse_uses_the_judges_text_and_reports_the_unparsed_beside_llmzoos_denominator(tmp_path, capsys):
    general, _ = in_process(capsys, "--review_file", str(REVIEWS / "general" / "review.jsonl"), "--reparse")
    assert general["metric"] == json.loads((REVIEWS / "general" / "metric.json").read_text(encoding="utf-8"))
    assert general["reparse_changed"] == {"count": 0, "rows": []}

    out = tmp_path / "coherence"
    report, err = in_process(capsys, "--review_file", str(REVIEWS / "coherence" / "review.jsonl"), "--reparse",
                             "--output_dir", str(out))

    assert report["unparsed"]["count"] == 3 and report["denominator"] == 70 and report["counted"] == 67
    assert [r["question_id"] for r in report["unparsed"]["rows"]] == [10, 35, 63]
    assert report["unparsed"]["rows"][0]["where"].endswith("review.jsonl:10")
    assert "no ordering line" in report["unparsed"]["rows"][0]["error"]
    assert report["reparse_changed"]["count"] == 3
    assert "3 of 70 review(s) have no order (-1)" in err and "denominator stays 70" in err
    # the three add nothing, yet still count in the denominator: every mean drops (LLMZoo's rule)
    stored = json.loads((REVIEWS / "coherence" / "metric.json").read_text(encoding="utf-8"))
    assert report["metric"]["phoenix-7b"]["order"]["gpt3.5"] < stored["phoenix-7b"]["order"]["gpt3.5"]
    assert (out / "metric.json").read_text(encoding="utf-8") == json.dumps(report["metric"], indent=4) + "\n"


@needs_shared
def test_order_battles_of_en_general_agree_with_llmzoos_winning_counts():
    reviews = read_review_file(REVIEWS / "general" / "review.jsonl")
    battles = order_battles(reviews)
    assert len(battles) == 70 * 6 == 420
    metric = json.loads((REVIEWS / "general" / "metric.json").read_text(encoding="utf-8"))
    for model, entry in metric.items():
        outcomes = [w for a, b, w in battles if (a, b) == ("gpt-3.5-turbo", model)]
        assert [outcomes.count(w) for w in ("a", "tie", "b")] == [
            entry["winning"]["gpt3.5"], entry["winning"]["tie"], entry["winning"]["model"]], model
    assert order_battles(jsonl(REVIEWS / "general" / "review.jsonl")) == battles


# -- the metric on synthetic reviews -----------------------------------------------------------------------


def test_unread_verdicts_add_nothing_but_keep_llmzoos_denominator_and_skipped_categories_do_not_count():
    reviews = synthetic([review(1, [1, 2, 3]), review(2, [2, 1, 1]), review(3, [-1, -1, -1]),
                         review(4, [1, 1, 1], category="coding"), review(5, [3, 2, 1], category="math")])
    result = llmzoo_metric(reviews)
    assert (result.questions, result.skipped, result.denominator, result.unparsed, result.counted) == (
        5, {"coding": 1, "math": 1}, 3, [3], 2)
    assert result.metric == {
        "a": {"winning": {"gpt3.5": 1, "tie": 0, "model": 1, "%model": 1 / 3},
              "order": {"gpt3.5": 3 / 3, "model": 3 / 3},
              "score": {"gpt3.5": 15 / 3, "model": 15 / 3, "%model": 1.0}},
        "b": {"winning": {"gpt3.5": 1, "tie": 0, "model": 1, "%model": 1 / 3},
              "order": {"gpt3.5": 3 / 3, "model": 4 / 3},
              "score": {"gpt3.5": 15 / 3, "model": (10 / 3 + 10) / 3, "%model": (10 / 3 + 10) / 15}},
    }
    # a and the reference tie on 1.0 and share rank 1; b, next, is ranked 3 (competition ranking)
    assert result.ordering_txt() == HEADER + row("a", 1.0, 1) + row("turbo", 1.0, 1) + row("b", 4 / 3, 3)
    battles = order_battles(reviews)
    assert battles == [("ref", "a", "a"), ("ref", "b", "a"), ("a", "b", "a"),
                       ("ref", "a", "b"), ("ref", "b", "b"), ("a", "b", "tie")]
    assert len(order_battles(reviews, skip_categories=())) == 12


def test_horizontal_mode_gives_order_and_score_per_model_and_no_reference():
    models = ("x", "y", "z")
    reviews = synthetic([review(1, [1, 2, 2], models=models), review(2, [3, 1, 2], models=models)])
    result = llmzoo_metric(reviews, horizontal=True)
    assert result.reference is None
    assert result.metric == {"x": {"order": 2.0, "score": (10 + 10 / 3) / 2}, "y": {"order": 1.5, "score": 7.5},
                             "z": {"order": 2.0, "score": 5.0}}
    assert result.ordering_txt() == HEADER + row("y", 1.5, 1) + row("x", 2.0, 2) + row("z", 2.0, 2)
    assert ordering_txt(result.metric, horizontal=True) == result.ordering_txt()


def test_score_mode_compares_scores_the_higher_the_better_and_has_no_ordering():
    reviews = synthetic([review(1, [8.0, 9.0], models=("ref", "a"), mode="score"),
                         review(2, [7.0, 7.0], models=("ref", "a"), mode="score"),
                         review(3, [-1, -1], models=("ref", "a"), mode="score")], mode="score")
    result = llmzoo_metric(reviews)
    assert result.metric == {"a": {"winning": {"gpt3.5": 0, "tie": 1, "model": 1, "%model": 1 / 3},
                                   "score": {"gpt3.5": 5.0, "model": 16 / 3, "%model": 16 / 15}}}
    assert result.ordering() is None and result.ordering_txt() is None and result.unparsed == [3]
    assert llmzoo_metric(reviews, horizontal=True).metric == {"ref": {"score": 5.0}, "a": {"score": 16 / 3}}
    assert score_battles(reviews) == [("ref", "a", "b"), ("ref", "a", "tie")]


def test_when_no_verdict_was_read_the_ratio_is_null_and_the_ranks_are_llmzoos_zeros():
    result = llmzoo_metric(synthetic([review(1, [-1, -1], models=("ref", "a"))]))
    assert result.metric["a"]["score"] == {"gpt3.5": 0.0, "model": 0.0, "%model": None}
    assert '"%model": null' in result.metric_json()
    assert result.ordering_txt() == HEADER + row("a", 0.0, 0) + row("turbo", 0.0, 0)
    assert order_battles(synthetic([review(1, [-1, -1], models=("ref", "a"))])) == []
    with pytest.raises(SuiteError, match="nothing to score"):
        llmzoo_metric(synthetic([review(1, [1, 2], category="math", models=("ref", "a"))]))


def test_the_script_in_score_mode_writes_metric_json_only(tmp_path, capsys):
    path = write_jsonl(tmp_path / "review.jsonl", [review(2, [6.0, 8.5], models=("ref", "a"), mode="score"),
                                                   review(1, [-1, -1], models=("ref", "a"), mode="score")])
    out = tmp_path / "out"
    report, err = in_process(capsys, "--review_file", str(path), "--output_dir", str(out), "--mode", "score",
                             "--horiz=True")
    assert sorted(p.name for p in out.iterdir()) == ["metric.json", "pipeline.json", "report.json"]
    assert (out / "metric.json").read_text(encoding="utf-8") == (
        '{\n    "ref": {\n        "score": 3.0\n    },\n    "a": {\n        "score": 4.25\n    }\n}\n')
    assert report["ordering"] is None and report["unparsed"]["count"] == 1 and report["horizontal"] is True
    assert "review.jsonl:2" in err


def test_bad_flags_are_all_reported_before_any_work(tmp_path):
    with pytest.raises(UsageError) as exc:
        load_script().main(review_file=str(tmp_path / "missing.jsonl"), mode="rank",
                           question_file=str(tmp_path / "q.jsonl"))
    message = str(exc.value)
    assert "--review_file" in message and "--mode must be one of order, score" in message
    assert "--question_file" in message


# -- the rules ---------------------------------------------------------------------------------------------


@needs_shared
def test_our_score_rules_cover_every_dimension_of_prompt_all_and_ask_for_a_line_parse_score_reads():
    order_rules = load_rules(LLMZOO / "prompt_all.json")
    score_rules = load_rules(SCORE_RULES)
    assert list(score_rules) == list(order_rules)
    for dimension, rule in score_rules.items():
        assert rule["role"] == "Assistant" and rule["description"]
        for n in NUM_STR:
            check_rule(score_rules, dimension, "score", n)
        with pytest.raises(UsageError, match="never says 'order'"):
            check_rule(score_rules, dimension, "order", 4)
        check_rule(order_rules, dimension, "order", 4)
        with pytest.raises(UsageError, match="never says 'score'"):
            check_rule(order_rules, dimension, "score", 4)
        prompt = review_messages("q", ["a"] * 4, rule)[1]["content"]
        assert "four scores" in prompt and "Assistant 4 last" in prompt
    # a verdict written as the rules ask is read
    assert parse_score("Assistant 1 is thorough; Assistant 2 is vague.\n8 5.5", 2) == [8.0, 5.5]
    with pytest.raises(UsageError, match="--dimension 'style'"):
        check_rule(score_rules, "style", "score", 2)
