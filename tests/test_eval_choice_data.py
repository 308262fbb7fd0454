"""utils/evaluation/choice_data.py: the MMLU / C-Eval / JSONL readers and lm-eval's multiple-choice prompts.

Fast: small files written here, no model (the length callback of build_prompt is ``len``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest

from choice_sets import LETTERS, twelve_questions, write_ceval, write_jsonl, write_mmlu
from utils.errors import SuiteError, UsageError
from utils.evaluation.choice_data import (Question, build_prompt, header_text, pick_shots, question_text, read_questions,
                                          shot_text, subject_title)

EN_HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
ZH_HEADER = "以下是中国关于{}考试的单项选择题，请选出其中的正确答案。\n\n"


# -- helpers ------------------------------------------------------------------------------------------------


def plain(grouped: dict[str, list[Question]]) -> dict[str, list[dict]]:
    """Questions as the writers' dicts (without id, source, format), to compare formats with each other."""
    return {s: [{"subject": q.subject, "split": q.split, "question": q.question, "choices": list(q.choices),
                 "answer": q.answer} for q in rows] for s, rows in grouped.items()}


def expected(questions: list[dict], split: str, subjects=None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for q in questions:
        if q["split"] == split and (subjects is None or q["subject"] in subjects):
            out.setdefault(q["subject"], []).append(q)
    return out


def write_pair(folder: Path, questions: list[dict]) -> tuple[Path, Path]:
    """The JSONL layout: the non-dev rows in test.jsonl, the dev rows in dev.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    test = write_jsonl(folder / "test.jsonl", [q for q in questions if q["split"] != "dev"])
    return test, write_jsonl(folder / "dev.jsonl", [q for q in questions if q["split"] == "dev"])


def read_three(tmp_path: Path, questions: list[dict], **kwargs) -> dict:
    mmlu = read_questions(data_dir=str(write_mmlu(tmp_path / "mmlu", questions)), **kwargs)
    ceval = read_questions(data_dir=str(write_ceval(tmp_path / "ceval", questions)), **kwargs)
    test, dev = write_pair(tmp_path / "jsonl", questions)
    jsonl = read_questions(data_file=str(test), dev_file=str(dev), **kwargs)
    return {"mmlu": mmlu, "ceval": ceval, "jsonl": jsonl}


def csv_first_line(cells: list) -> str:
    """The first physical line of a row as the csv module writes it (a quoted newline ends it early)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue().split("\n")[0]


def line_of(path: Path, where: str) -> str:
    """The text of the line a ``path:line`` source points at."""
    name, line = where.rsplit(":", 1)
    assert name == str(path)
    return path.read_text(encoding="utf-8").split("\n")[int(line) - 1]


def lines_file(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def q_of(subject="s", question="What?", choices=("a", "b", "c", "d"), answer=0, id="1", split="test"):
    return Question(subject, question, tuple(choices), answer, id, split, "x:1")


# -- readers ------------------------------------------------------------------------------------------------


def test_the_three_formats_read_the_same_questions(tmp_path):
    questions = twelve_questions()
    read = read_three(tmp_path, questions)
    subjects = sorted({q["subject"] for q in questions})
    for kind, got in read.items():
        assert got.format == kind
        assert list(got.evaluated) == subjects and list(got.shots) == subjects
        assert plain(got.evaluated) == expected(questions, "test"), kind
        assert plain(got.shots) == expected(questions, "dev"), kind
        assert got.bad == {}
        assert all(Path(f).is_file() for f in got.files)
    assert len(read["mmlu"].files) == len(read["ceval"].files) == 6 and len(read["jsonl"].files) == 2
    # ids: C-Eval's column; else subject/split/row number
    for s in subjects:
        assert [q.id for q in read["ceval"].evaluated[s]] == ["0", "1"]
        assert [q.id for q in read["mmlu"].evaluated[s]] == [f"{s}/test/1", f"{s}/test/2"]
        assert [q.id for q in read["mmlu"].shots[s]] == [f"{s}/dev/1", f"{s}/dev/2"]
    rows = [q for q in questions if q["split"] == "test"]
    jsonl_ids = {q.question: q.id for qs in read["jsonl"].evaluated.values() for q in qs}
    assert [jsonl_ids[q["question"]] for q in rows] == [f"{q['subject']}/test/{n}" for n, q in enumerate(rows, 1)]


def test_sources_point_at_the_first_line_of_each_row(tmp_path):
    read = read_three(tmp_path, twelve_questions())
    for kind in ("mmlu", "ceval"):
        for q in (q for group in (read[kind].evaluated, read[kind].shots) for qs in group.values() for q in qs):
            path = Path(q.source.rsplit(":", 1)[0])
            cells = [q.question, *q.choices, LETTERS[q.answer]]
            text = line_of(path, q.source)
            assert text.startswith(csv_first_line(cells) if kind == "mmlu" else csv_first_line([q.id, *cells])), q
    for q in (q for qs in read["jsonl"].evaluated.values() for q in qs):
        path = Path(q.source.rsplit(":", 1)[0])
        assert json.loads(line_of(path, q.source))["question"] == q.question


def test_csv_quoting_keeps_commas_quotes_and_newlines_and_counts_lines_from_the_row_start(tmp_path):
    questions = [q for q in twelve_questions() if q["subject"] == "high_school_mathematics"]
    folder = write_mmlu(tmp_path / "mmlu", questions)
    path = folder / "high_school_mathematics_test.csv"
    before = path.read_text(encoding="utf-8")
    assert before.count("\n") > 2  # the first row spans several lines
    with open(path, "a", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerow(["too", "few", "columns"])
    got = read_questions(data_dir=str(folder))
    assert plain(got.evaluated) == expected(questions, "test")
    first, second = got.evaluated["high_school_mathematics"]
    assert first.question == "Line one,\nline two, \"quoted\"\n\nafter a blank line?" and first.choices[1] == "c\nd"
    lines = before.split("\n")
    assert second.source == f"{path}:{lines.index('What is 10 / 4?,2,2.5,3,4,B') + 1}"
    assert got.bad == {"wrong number of columns": [f"{path}:{len(lines)}"]}  # the line after the last newline


def test_broken_quoting_is_a_file_error_naming_the_row(tmp_path):
    path = lines_file(tmp_path / "d" / "algebra_test.csv", ["q1,a,b,c,d,A", 'q2,"a,b,c,d,A', "q3,a,b,c,d,B"])
    with pytest.raises(SuiteError, match=re.escape(f"{path}:2: not valid CSV")):
        read_questions(data_dir=str(path.parent))


def test_the_tarball_layout_in_subfolders(tmp_path):
    questions = twelve_questions()
    for kind, write in (("mmlu", write_mmlu), ("ceval", write_ceval)):
        folder = write(tmp_path / kind / "data", questions, nested=True)
        # Hendrycks' auxiliary training data is no split, though one of its files is named like one
        lines_file(folder / "auxiliary_train" / "mc_test.csv", ["not,a,benchmark"])
        got = read_questions(data_dir=str(tmp_path / kind))
        assert got.format == kind and got.bad == {}
        assert plain(got.evaluated) == expected(questions, "test") and plain(got.shots) == expected(questions, "dev")
        assert sorted(Path(f).parent.name for f in got.files) == ["dev"] * 3 + ["test"] * 3


def test_other_splits_and_scoring_the_dev_split(tmp_path):
    questions = twelve_questions()
    val = [dict(q, split="val") for q in questions if q["split"] == "test"]
    for kind, write in (("mmlu", write_mmlu), ("ceval", write_ceval)):
        got = read_questions(data_dir=str(write(tmp_path / kind, questions + val)), split="val")
        assert plain(got.evaluated) == expected(val, "val") and plain(got.shots) == expected(questions, "dev"), kind
    test, dev = write_pair(tmp_path / "jsonl", questions)
    got = read_questions(data_file=str(test), dev_file=str(dev), split="val")
    assert plain(got.evaluated) == expected(val, "val")  # the data file's rows take the split's name
    got = read_questions(data_dir=str(tmp_path / "mmlu"), split="dev")
    assert plain(got.evaluated) == plain(got.shots) == expected(questions, "dev")
    assert len(got.files) == 3  # each dev file read once


def test_a_subject_without_dev_rows_gets_no_shots(tmp_path):
    questions = [q for q in twelve_questions() if not (q["subject"] == "world_religions" and q["split"] == "dev")]
    for kind, got in read_three(tmp_path, questions).items():
        assert got.shots["world_religions"] == [] and got.bad == {}, kind
        q = got.evaluated["world_religions"][0]
        assert build_prompt(q, got.shots["world_religions"][:5], "en", "world religions", lambda t: True)[1] == 0


def test_malformed_mmlu_rows_are_counted_with_path_and_line(tmp_path):
    d = tmp_path / "mmlu"
    test = lines_file(d / "algebra_test.csv", [
        "good,a,b,c,d,A",
        "few,a,b,c,A",                       # 2
        ",a,b,c,d,B",                        # 3
        "   ,a,b,c,d,B",                     # 4
        "letter,a,b,c,d,E",                  # 5
        "none,a,b,c,d,",                     # 6
        "",
        "last,a,b,c,d,D",                    # 8
    ])
    dev = lines_file(d / "algebra_dev.csv", ["shot,a,b,c,d,C", "shot,a,b,c,d,c"])
    got = read_questions(data_dir=str(d))
    assert got.bad == {"wrong number of columns": [f"{test}:2"], "empty question": [f"{test}:3", f"{test}:4"],
                       "answer not among the choices": [f"{test}:5", f"{test}:6", f"{dev}:2"]}
    assert [(q.question, q.answer, q.source) for q in got.evaluated["algebra"]] == [
        ("good", 0, f"{test}:1"), ("last", 3, f"{test}:8")]
    # ids count every row, so fixing a bad row does not renumber the others
    assert [q.id for q in got.evaluated["algebra"]] == ["algebra/test/1", "algebra/test/7"]
    assert [q.question for q in got.shots["algebra"]] == ["shot"]


def test_malformed_ceval_rows_are_counted_with_path_and_line(tmp_path):
    d = tmp_path / "ceval"
    test = lines_file(d / "law_val.csv", [
        "id,question,A,B,C,D,answer",
        "0,good,a,b,c,d,A",
        "1,few,a,b,c,A",                     # 3
        "2,no answer,a,b,c,d,",              # 4
        "0,duplicate,a,b,c,d,B",             # 5
        '3,"multi\nline",a,b,c,d,X',         # 6-7
        "4,,a,b,c,d,A",                      # 8
        "5,fine,a,b,c,d,D",                  # 9
    ])
    dev = lines_file(d / "law_dev.csv", ["id,question,A,B,C,D,answer,explanation", "0,shot,a,b,c,d,B,why",
                                         "1,shot,a,b,c,d,B"])
    got = read_questions(data_dir=str(d), split="val")
    assert got.format == "ceval"
    assert got.bad == {"wrong number of columns": [f"{test}:3", f"{dev}:3"],
                       "answer not among the choices": [f"{test}:4", f"{test}:6"],
                       "duplicate id": [f"{test}:5"], "empty question": [f"{test}:8"]}
    assert [(q.id, q.answer) for q in got.evaluated["law"]] == [("0", 0), ("5", 3)]
    assert [q.id for q in got.shots["law"]] == ["0"]


JSONL_ROWS = [  # (line text, reason it is bad or None)
    (json.dumps({"subject": "s", "question": "ok letter", "choices": ["a", "b"], "answer": "B"}), None),
    ("", None),
    ('{"subject": "s", "question": "torn', "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}), "no subject"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a"], "answer": 0}), "wrong number of choices"),
    (json.dumps({"subject": "s", "question": "q", "choices": list("abcdefghijk"), "answer": 0}),
     "wrong number of choices"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a", "b"], "answer": "C"}),
     "answer not among the choices"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a", "b"], "answer": 2}),
     "answer not among the choices"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a", "b"], "answer": True}),
     "answer not among the choices"),
    (json.dumps({"subject": "s", "question": " ", "choices": ["a", "b"], "answer": 0}), "empty question"),
    (json.dumps({"subject": "s", "choices": ["a", "b"], "answer": 0}), "empty question"),
    (json.dumps({"subject": "s", "question": "q", "choices": "ab", "answer": 0}), "choices is not a list"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a", 2], "answer": 0}), "a choice is not a string"),
    (json.dumps({"subject": "s", "question": "q", "choices": ["a", "b"], "answer": 0, "id": {"n": 1}}),
     "id is not a string or an integer"),
    (json.dumps({"subject": "s", "id": 7, "question": "ten", "choices": list("abcdefghij"), "answer": 9}), None),
    (json.dumps({"subject": "s", "id": "7", "question": "q", "choices": ["a", "b"], "answer": 0}), "duplicate id"),
]


def test_malformed_jsonl_rows_are_counted_with_path_and_line(tmp_path):
    path = lines_file(tmp_path / "q.jsonl", [text for text, _ in JSONL_ROWS])
    dev = lines_file(tmp_path / "dev.jsonl", [json.dumps({"subject": "s", "question": "shot", "choices": ["a", "b"],
                                                          "answer": 1}), "nope",
                                              json.dumps({"subject": "other", "question": "", "choices": []})])
    want: dict[str, list[str]] = {}
    for line, (_, reason) in enumerate(JSONL_ROWS, 1):
        if reason:
            want.setdefault(reason, []).append(f"{path}:{line}")
    want.setdefault("not JSON", []).append(f"{dev}:2")  # a dev row of another subject is not read at all
    got = read_questions(data_file=str(path), dev_file=str(dev))
    assert got.bad == want
    assert [(q.question, q.answer, q.id, q.source) for q in got.evaluated["s"]] == [
        ("ok letter", 1, "s/test/1", f"{path}:1"), ("ten", 9, "7", f"{path}:{len(JSONL_ROWS) - 1}")]
    assert [q.question for q in got.shots["s"]] == ["shot"] and got.shots["s"][0].split == "dev"


def test_a_json_array_is_read_with_the_line_of_each_element(tmp_path):
    rows = [{"subject": "s", "question": f"q{n}", "choices": ["a", "b", "c"], "answer": n % 3} for n in range(3)]
    rows[1]["choices"] = ["only one"]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    starts = [n for n, line in enumerate(path.read_text().split("\n"), 1) if line == "  {"]
    got = read_questions(data_file=str(path), split="val")
    assert [(q.question, q.split, q.source) for q in got.evaluated["s"]] == [
        ("q0", "val", f"{path}:{starts[0]}"), ("q2", "val", f"{path}:{starts[2]}")]
    assert got.bad == {"wrong number of choices": [f"{path}:{starts[1]}"]}
    # A truncated array: the elements before the break are read, the break is a bad row (the rest cannot be
    # located), as every JSON reader of the suite counts it.
    rows[1]["choices"] = ["a", "b"]
    path.write_text(json.dumps(rows, indent=2)[:-4], encoding="utf-8")
    got = read_questions(data_file=str(path), split="val")
    assert [q.question for q in got.evaluated["s"]] == ["q0", "q1"] and list(got.bad) == ["not JSON"]


def test_strict_stops_at_the_first_malformed_row_naming_it(tmp_path):
    mmlu = lines_file(tmp_path / "mmlu" / "a_test.csv", ["q,a,b,c,d,A", '"two\nlines",a,b,c,d,A', "q,a,b,c,d,Z"])
    with pytest.raises(SuiteError, match=re.escape(f"--data_dir {mmlu}:4: answer not among the choices (--strict")):
        read_questions(data_dir=str(mmlu.parent), strict=True)
    assert read_questions(data_dir=str(mmlu.parent)).bad == {"answer not among the choices": [f"{mmlu}:4"]}
    ceval = lines_file(tmp_path / "ceval" / "a_val.csv",
                       ["id,question,A,B,C,D,answer", "0,q,a,b,c,d,A", "0,q,a,b,c,d,A"])
    with pytest.raises(SuiteError, match=re.escape(f"{ceval}:3: duplicate id (--strict")):
        read_questions(data_dir=str(ceval.parent), split="val", strict=True)
    path = lines_file(tmp_path / "q.jsonl", [text for text, _ in JSONL_ROWS])
    with pytest.raises(SuiteError, match=re.escape(f"--data_file {path}:3: not JSON (--strict")):
        read_questions(data_file=str(path), strict=True)
    good = write_jsonl(tmp_path / "good.jsonl", twelve_questions()[:1])
    dev = lines_file(tmp_path / "dev.jsonl", ["{}"])
    with pytest.raises(SuiteError, match=re.escape(f"--dev_file {dev}:1: no subject (--strict")):
        read_questions(data_file=str(good), dev_file=str(dev), strict=True)


def test_ceval_test_split_has_no_answers_and_the_error_says_score_val(tmp_path):
    folder = write_ceval(tmp_path / "ceval", twelve_questions())
    for path in folder.glob("*_test.csv"):
        rows = list(csv.reader(path.open(encoding="utf-8", newline="")))
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([rows[0]] + [r[:-1] + [""] for r in rows[1:]])
    with pytest.raises(SuiteError, match=r"no usable question.*--split val"):
        read_questions(data_dir=str(folder))
    with pytest.raises(SuiteError, match=r":2: answer not among the choices \(--strict; .*--split val"):
        read_questions(data_dir=str(folder), strict=True)


def test_subjects_restricts_and_an_unknown_one_lists_the_available(tmp_path):
    questions = twelve_questions()
    for kind, got in read_three(tmp_path, questions, subjects=["world_religions", "abstract_algebra"]).items():
        assert plain(got.evaluated) == expected(questions, "test", {"world_religions", "abstract_algebra"}), kind
        assert plain(got.shots) == expected(questions, "dev", {"world_religions", "abstract_algebra"}), kind
        if kind != "jsonl":
            assert not any("high_school" in f for f in got.files)
    for source in ({"data_dir": str(tmp_path / "mmlu")}, {"data_file": str(tmp_path / "jsonl" / "test.jsonl")}):
        with pytest.raises(UsageError, match="unknown subject.*astrology.*available: abstract_algebra, "
                                             "high_school_mathematics, world_religions"):
            read_questions(**source, subjects=["astrology"])


def test_arguments_and_files_that_cannot_be_used(tmp_path):
    mmlu = write_mmlu(tmp_path / "mmlu", twelve_questions())
    test, dev = write_pair(tmp_path / "jsonl", twelve_questions())
    for kwargs in ({}, {"data_dir": str(mmlu), "data_file": str(test)}, {"data_dir": str(mmlu), "dev_file": str(dev)},
                   {"data_dir": str(mmlu), "split": "train"}):
        with pytest.raises(UsageError):
            read_questions(**kwargs)
    with pytest.raises(SuiteError, match="--data_dir .*nowhere: no such folder"):
        read_questions(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(SuiteError, match="--data_file .*nothing.jsonl: no such file"):
        read_questions(data_file=str(tmp_path / "nothing.jsonl"))
    with pytest.raises(SuiteError, match=r"no \*_val.csv file.*\*_dev.csv, \*_test.csv files: pass --split test"):
        read_questions(data_dir=str(mmlu), split="val")
    bad = tmp_path / "bytes"
    bad.mkdir()
    (bad / "a_test.csv").write_bytes(b"caf\xe9,a,b,c,d,A\n")
    with pytest.raises(SuiteError, match=re.escape(f"{bad / 'a_test.csv'}: cannot read it as UTF-8")):
        read_questions(data_dir=str(bad))
    (tmp_path / "bytes.jsonl").write_bytes(b"\xff\n")
    with pytest.raises(SuiteError, match="--data_file .*bytes.jsonl: no usable question .not valid UTF-8: 1"):
        read_questions(data_file=str(tmp_path / "bytes.jsonl"))
    mixed = tmp_path / "mixed"
    lines_file(mixed / "a_test.csv", ["q,a,b,c,d,A"])
    lines_file(mixed / "b_test.csv", ["id,question,A,B,C,D,answer", "0,q,a,b,c,d,A"])
    with pytest.raises(SuiteError, match="mixes headerless MMLU files .*a_test.csv.* with C-Eval .*b_test.csv"):
        read_questions(data_dir=str(mixed))
    twice = write_mmlu(tmp_path / "twice", twelve_questions(), nested=True)
    write_mmlu(twice, [q for q in twelve_questions() if q["subject"] == "abstract_algebra" and q["split"] == "test"])
    with pytest.raises(SuiteError, match="two test files for subject abstract_algebra: .*twice/abstract_alg"):
        read_questions(data_dir=str(twice))
    assert read_questions(data_dir=str(twice), subjects=["world_religions"]).bad == {}  # other subjects are fine
    empty = lines_file(tmp_path / "empty" / "a_test.csv", ["q,a,b"])
    detail = f"no usable question (wrong number of columns: 1 (first at {empty}:1))"
    with pytest.raises(SuiteError, match=re.escape(detail)):
        read_questions(data_dir=str(empty.parent))


def test_a_utf8_bom_is_not_part_of_the_ceval_header(tmp_path):
    folder = write_ceval(tmp_path / "ceval", twelve_questions())
    for path in folder.glob("*.csv"):
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_questions(data_dir=str(folder)).format == "ceval"


# -- prompts ------------------------------------------------------------------------------------------------


def block(q: dict, cue: str) -> str:
    """lm-eval's doc_to_text, written out: stripped question, one ``X. choice`` line per choice, the cue."""
    text = q["question"].strip()
    for letter, choice in zip(LETTERS, q["choices"]):
        text += "\n" + letter + ". " + choice
    return text + "\n" + cue


def as_question(q: dict, n: int) -> Question:
    return Question(q["subject"], q["question"], tuple(q["choices"]), q["answer"], str(n), q["split"], "x:1")


@pytest.mark.parametrize("lang, cue, header, name", [
    ("en", "Answer:", EN_HEADER, "high school mathematics"),
    ("zh", "答案：", ZH_HEADER, "高中数学"),
])
def test_prompts_character_for_character(lang, cue, header, name):
    rows = [q for q in twelve_questions() if q["subject"] == "high_school_mathematics"]
    dev, test = [q for q in rows if q["split"] == "dev"], [q for q in rows if q["split"] == "test"]
    shots = [as_question(q, n) for n, q in enumerate(dev)]
    for n, q in enumerate(test):
        want = header.format(name)
        for s in dev:
            want += block(s, cue) + " " + "ABCD"[s["answer"]] + "\n\n"
        want += block(q, cue)
        assert build_prompt(as_question(q, 10 + n), shots, lang, name, lambda t: True) == (want, 2)
        assert build_prompt(as_question(q, 10 + n), [], lang, name, lambda t: True) == (header.format(name)
                                                                                          + block(q, cue), 0)
    assert question_text(shots[0], lang) == block(dev[0], cue)
    assert shot_text(shots[1], lang) == block(dev[1], cue) + " C"
    # the question is stripped, the choices are not
    spaced = as_question(next(q for q in twelve_questions() if q["question"].startswith("  How")), 0)
    assert question_text(spaced, lang) == f"How many elements has S_3?\nA.  6\nB. 3\nC. 9\nD. 1\n{cue}"


def test_as_many_letters_as_choices():
    q = q_of(choices=[f"c{n}" for n in range(10)], answer=9)
    assert question_text(q, "en").split("\n")[1:] == [f"{letter}. c{n}" for n, letter in enumerate("ABCDEFGHIJ")] + [
        "Answer:"]
    assert shot_text(q, "en").endswith("Answer: J")
    assert question_text(q_of(choices=["yes", "no"]), "zh") == "What?\nA. yes\nB. no\n答案："
    with pytest.raises(ValueError):
        question_text(q, "fr")


def test_subject_title_is_lm_evals_mmlu_name():
    assert subject_title("high_school_mathematics") == "high school mathematics"
    assert subject_title("anatomy") == "anatomy"


def test_few_shot_drops_the_oldest_shot_first():
    shots = [q_of(question=f"shot {n}", id=f"d{n}", split="dev", answer=n) for n in range(4)]
    q = q_of(question="the question")
    header = EN_HEADER.format("s")
    examples = [block({"question": s.question, "choices": s.choices}, "Answer:") + f" {'ABCD'[s.answer]}\n\n"
                for s in shots]
    last = block({"question": "the question", "choices": "abcd"}, "Answer:")
    full = [header + "".join(examples[k:]) + last for k in range(5)]  # full[k]: without the k oldest shots
    for k in range(4):
        assert build_prompt(q, shots, "en", "s", lambda t: len(t) <= len(full[k])) == (full[k], 4 - k)
    asked = []

    def nothing_fits(text: str) -> bool:
        asked.append(text)
        return False

    assert build_prompt(q, shots, "en", "s", nothing_fits) == (full[4], 0)
    assert asked == full[:4]  # the 0-shot prompt is returned for the caller to judge


def test_a_question_is_not_its_own_example(tmp_path):
    got = read_questions(data_dir=str(write_mmlu(tmp_path / "mmlu", twelve_questions())), split="dev")
    pool = got.shots["abstract_algebra"]
    first, second = got.evaluated["abstract_algebra"]
    prompt, used = build_prompt(first, pool, "en", "abstract algebra", lambda t: True)
    assert used == 1 and first.question not in prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
    assert pick_shots(first, pool, 5) == [second] and pick_shots(second, pool, 1) == [first]
    assert pick_shots(q_of(subject="abstract_algebra"), pool, 1) == [first]


def test_prompts_match_the_installed_lm_eval_tasks():
    """The same prompts from lm-eval 0.4.13's own task files, template engine and turn builder."""
    import lm_eval
    import yaml
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import apply_template

    tasks = Path(lm_eval.__file__).parent / "tasks"
    mmlu_names = 0
    for path in sorted((tasks / "mmlu" / "default").glob("mmlu_*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["description"] == EN_HEADER.format(subject_title(config["dataset_name"])), path
        mmlu_names += 1
    assert mmlu_names == 57
    rows = twelve_questions()
    for lang, base, example in (("en", "mmlu/default/_default_template_yaml", "mmlu/default/mmlu_anatomy.yaml"),
                                ("zh", "ceval/_default_ceval_yaml", "ceval/ceval-valid_law.yaml")):
        config = yaml.safe_load((tasks / base).read_text(encoding="utf-8"))
        description = yaml.safe_load((tasks / example).read_text(encoding="utf-8"))["description"]
        # the Chinese subject name, cut out of lm-eval's description so that the rest of it is checked
        name = subject_title("anatomy") if lang == "en" else description[7:description.index("的单项")]

        def doc(q):
            if lang == "en":
                return {"question": q["question"], "choices": q["choices"], "answer": q["answer"]}
            return {"question": q["question"], **dict(zip("ABCD", q["choices"])), "answer": LETTERS[q["answer"]]}

        def target(q):
            d = doc(q)
            return d["answer"] if lang == "en" else int(apply_template(config["doc_to_target"], d))

        dev = [q for q in rows if q["split"] == "dev"][:3]
        for q in (q for q in rows if q["split"] == "test"):
            turns = []
            for s in dev:
                turns += ConfigurableTask.build_qa_turn(None, q=apply_template(config["doc_to_text"], doc(s)),
                                                        c=config["doc_to_choice"], a=target(s), tgt_delim=" ",
                                                        few_delim="\n\n")
            turns += ConfigurableTask.build_qa_turn(None, q=apply_template(config["doc_to_text"], doc(q)), few_delim="")
            theirs = description + "".join(m.to_text() for m in turns)
            ours = build_prompt(as_question(q, 99), [as_question(s, n) for n, s in enumerate(dev)], lang, name,
                                lambda t: True)
            if lang == "zh":  # C-Eval's header (with 考试, as its paper and our issue write it); lm-eval drops the word
                ours_header = header_text("zh", name)
                assert ours[0].startswith(ours_header) and description == ours_header.replace("考试", "")
                ours = (description + ours[0][len(ours_header):], ours[1])
            assert ours == (theirs, 3)
