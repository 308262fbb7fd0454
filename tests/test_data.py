"""Tests of utils/data/records.py (reading, parsing, format detection) and of prepare_data's handling of bad rows.

Real data is read in place from ``SHARED``; everything else is written under pytest's tmp paths.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DATA, REAL_SETS, STORIES
from utils.data.records import (FORMATS, MOSS_FIELDS, ROW_ERRORS, Columns, DataError, Example, Record, RowError, detect_format, load_examples, parse_record, read_records)
from utils.data.templates import ROLES, Message

MOSS_FILE = DATA / "moss" / "moss_sft_sample.jsonl"
REAL_COUNTS = {"alpaca": 7473, "moss": 1120, "pair": 100, "sharegpt": 140}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL: dicts/lists are dumped, str is written as-is, bytes are written raw."""
    chunks = []
    for line in lines:
        if isinstance(line, bytes):
            chunks.append(line)
        elif isinstance(line, str):
            chunks.append(line.encode("utf-8"))
        else:
            chunks.append(json.dumps(line, ensure_ascii=False).encode("utf-8"))
    path.write_bytes(b"\n".join(chunks) + b"\n")
    return path


def split(items):
    recs = [r for r in items if isinstance(r, Record)]
    errs = [r for r in items if isinstance(r, RowError)]
    assert len(recs) + len(errs) == len(items)
    return recs, errs


def roles(example: Example) -> list[str]:
    return [m.role for m in example.messages]


def parse(value, fmt, columns=Columns()):
    return parse_record(Record("f.jsonl", 7, value), fmt, columns)


def first_moss_row() -> dict:
    with open(MOSS_FILE, encoding="utf-8") as f:
        return json.loads(f.readline())


def alpaca(i: int) -> dict:
    return {"instruction": f"Question number {i}?", "input": "", "output": f"Answer number {i}."}


def sharegpt(*turns) -> dict:
    return {"conversations": [{"from": r, "value": v} for r, v in turns]}


def run_prepare(argv: list[str]) -> tuple[int, str, str]:
    """prepare_data in-process; (exit code, stdout, stderr)."""
    import prepare_data
    from utils.cli import run

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run(prepare_data.main, argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def base_argv(data_paths, output_dir) -> list[str]:
    return ["--base_model", str(STORIES), "--data_path", *map(str, data_paths), "--output_dir", str(output_dir),
            "--val_set_size", "0", "--prompt_template_name", "vicuna_v1.1"]


# --------------------------------------------------------------------------------------------------
# 1. Reading files
# --------------------------------------------------------------------------------------------------


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\n\n   \n{"a": 2}\r\n\t\n{"a": 3}\n\n')
    recs, errs = split(list(read_records(p)))
    assert errs == []
    assert [(r.line, r.value) for r in recs] == [(1, {"a": 1}), (4, {"a": 2}), (6, {"a": 3})]
    assert all(r.path == str(p) for r in recs)


def test_json_array_pretty_printed_line_numbers(tmp_path):
    values = [{"instruction": f"q{i}", "output": "x\ny" * i, "n": [i, {"k": i}]} for i in range(5)]
    text = json.dumps(values, indent=2)
    p = tmp_path / "d.json"
    p.write_text(text, encoding="utf-8")
    expected = [n for n, line in enumerate(text.split("\n"), start=1) if line == "  {"]
    assert len(expected) == 5
    recs, errs = split(list(read_records(p)))
    assert errs == []
    assert [r.value for r in recs] == values
    assert [r.line for r in recs] == expected


def test_json_array_elements_on_irregular_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"a": 1}, {"a": 2},\n\n\n   {"a":\n 3}\n,\n{"a": 4}]\n', encoding="utf-8")
    recs, errs = split(list(read_records(p)))
    assert errs == []
    assert [(r.line, r.value["a"]) for r in recs] == [(1, 1), (1, 2), (4, 3), (7, 4)]


def test_real_pretty_printed_array_line_numbers():
    path = REAL_SETS["alpaca"]
    lines = path.read_text(encoding="utf-8").split("\n")
    starts = [n for n, line in enumerate(lines, start=1) if line.strip() == "{"]
    recs, errs = split(list(read_records(path)))
    assert errs == []
    assert len(recs) == REAL_COUNTS["alpaca"] == len(starts)
    assert [r.line for r in recs] == starts
    assert recs[0].line == 2 and recs[1].line == 7


@pytest.mark.parametrize("kind", ["jsonl", "array"])
def test_utf8_bom_accepted(tmp_path, kind):
    p = tmp_path / f"d.{kind}"
    body = '{"a": "é"}\n{"a": "b"}\n' if kind == "jsonl" else '[\n{"a": "é"},\n{"a": "b"}\n]\n'
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    recs, errs = split(list(read_records(p)))
    assert errs == []
    assert [r.value["a"] for r in recs] == ["é", "b"]
    assert [r.line for r in recs] == ([1, 2] if kind == "jsonl" else [2, 3])


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"])
def test_empty_file_raises_data_error(tmp_path, content):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match="is empty") as info:
        list(read_records(p))
    assert str(p) in str(info.value)


def test_missing_file_raises_data_error(tmp_path):
    p = tmp_path / "no-such-file.jsonl"
    with pytest.raises(DataError) as info:
        list(read_records(p))
    assert str(p) in str(info.value)
    with pytest.raises(DataError):
        load_examples(str(p), "auto", Columns())


def test_invalid_utf8_line_is_row_error_others_read(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        b'{"instruction": "caf\xe9", "output": "x"}',
        {"instruction": "c", "output": "d"},
        b'{"instruction": "\xff\xfe", "output": "x"}',
    ])
    items = list(read_records(p))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("RowError", 2), ("Record", 3), ("RowError", 4)]
    assert [i.category for i in items if isinstance(i, RowError)] == ["invalid_utf8", "invalid_utf8"]
    assert all(i.path == str(p) for i in items)


def test_invalid_utf8_in_json_array_element(tmp_path):
    p = tmp_path / "d.json"
    p.write_bytes(b'[\n {"a": "ok"},\n {"a": "caf\xe9"},\n {"a": "fine"}\n]\n')
    items = list(read_records(p))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 2), ("RowError", 3), ("Record", 4)]
    assert items[1].category == "invalid_utf8"


def test_truncated_jsonl_line_is_invalid_json(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        '{"instruction": "a", "outp',
        {"instruction": "c", "output": "d"},
        '{"a": 1} {"b": 2}',
    ])
    items = list(read_records(p))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("RowError", 2), ("Record", 3), ("RowError", 4)]
    assert items[1].category == items[3].category == "invalid_json"


def test_truncated_json_array_keeps_elements_before_break(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"a": 1},\n  {"a": 2},\n  {"a": 3, "b": "trunc', encoding="utf-8")
    items = list(read_records(p))
    recs, errs = split(items)
    assert [(r.line, r.value) for r in recs] == [(2, {"a": 1}), (3, {"a": 2})]
    assert len(errs) == 1 and errs[0].category == "invalid_json"
    assert errs[0].line == 4 and errs[0].path == str(p)
    assert isinstance(items[-1], RowError)


def test_jsonl_lone_surrogate_escape_is_invalid_utf8(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        r'{"instruction": "x\ud800y", "output": "b"}',
    ])
    items = list(read_records(p))
    assert isinstance(items[0], Record)
    assert isinstance(items[1], RowError) and items[1].category == "invalid_utf8" and items[1].line == 2


def test_jsonl_first_record_a_list_does_not_hide_later_lines(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [[1, 2], {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    items = list(read_records(p))
    assert [i.line for i in items] == [1, 2, 3]
    assert [i.value for i in items[1:]] == [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]


def test_deeply_nested_jsonl_line_is_row_error(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [
        {"instruction": "a", "output": "b"},
        '{"a": ' + "[" * 100_000,
        {"instruction": "c", "output": "d"},
    ])
    items = list(read_records(p))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("RowError", 2), ("Record", 3)]
    assert items[1].category == "invalid_json"


# --------------------------------------------------------------------------------------------------
# 2. Formats
# --------------------------------------------------------------------------------------------------


def test_alpaca_without_input():
    ex = parse({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca")
    assert ex.messages == [Message("user", "Add 2 and 3."), Message("assistant", "5")]
    assert ex.input is None
    assert (ex.path, ex.line) == ("f.jsonl", 7)
    assert parse({"instruction": "Hi", "output": "Hello"}, "alpaca").input is None


def test_alpaca_with_input():
    ex = parse({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}, "alpaca")
    assert ex.messages == [Message("user", "Translate to French."), Message("assistant", "Bonjour")]
    assert ex.input == "Good morning"


def test_sharegpt_roles_case_insensitive_with_system():
    value = {"id": "x", "conversations": [
        {"from": "System", "value": "Be brief."},
        {"from": "HUMAN", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": " Human ", "value": "Bye"},
        {"from": "GPT", "value": "Bye!"},
    ]}
    ex = parse(value, "sharegpt")
    assert ex.messages == [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
                           Message("user", "Bye"), Message("assistant", "Bye!")]
    assert ex.notes == []


def test_openai_messages_with_text_parts():
    value = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "General Kenobi"},
    ]}
    ex = parse(value, "openai")
    assert ex.messages == [Message("system", "sys"), Message("user", "Hello there"), Message("assistant", "General Kenobi")]


def test_openai_non_text_part_is_wrong_type():
    value = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                          {"role": "assistant", "content": "ok"}]}
    with pytest.raises(RowError) as info:
        parse(value, "openai")
    assert info.value.category == "wrong_type"


def test_moss_real_row_turns_in_numeric_order():
    row = first_moss_row()
    chat = row["chat"]
    assert list(chat) == ["turn_1", "turn_2"]
    t1, t2 = chat["turn_1"], chat["turn_2"]
    t10 = {**t1, "Human": "<|Human|>: tenth question<eoh>\n", "MOSS": "<|MOSS|>: tenth answer<eom>\n"}
    shuffled = {**row, "chat": {"turn_10": t10, "turn_2": t2, "turn_1": t1}}
    ex = parse(shuffled, "moss")
    assert roles(ex) == ["system"] + ["user", "thought", "command", "result", "assistant"] * 3
    assert ex.messages[0] == Message("system", row["meta_instruction"])
    users = [m.content for m in ex.messages if m.role == "user"]
    assert users == ["一个三角形的其中两边分别是16，12，第三条边长度是多少？", "好的，请帮我计算一下这个三角形的面积。",
                     "tenth question"]
    replies = [m.content for m in ex.messages if m.role == "assistant"]
    assert replies == ["这个三角形的第三条边长度是8√5。", "经过计算，这个三角形的面积约为109.86平方单位。", "tenth answer"]
    # turn 1: ' None' placeholder -> 'None'; Results body keeps its leading newline
    assert ex.messages[3] == Message("command", "None")
    assert ex.messages[4] == Message("result", "\nNone\n")
    assert ex.messages[2].content.startswith("这是一个基本的几何问题")
    assert ex.messages[2].content.endswith("x=8√5")
    result2 = ex.messages[9]
    assert result2.role == "result" and result2.content.startswith("\nCalculate(") and result2.content.endswith("'No result.'\n")
    # the unshuffled row parses to the first two turns, identically
    assert parse(row, "moss").messages == ex.messages[:11]


def test_pair_with_history():
    value = {"prompt": "q3", "response": "a3", "history": [["q1", "a1"], ["q2", "a2"]]}
    ex = parse(value, "pair")
    assert ex.messages == [Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"),
                           Message("assistant", "a2"), Message("user", "q3"), Message("assistant", "a3")]
    assert parse({"prompt": "q", "response": "a", "history": []}, "pair").messages == [Message("user", "q"), Message("assistant", "a")]
    assert parse({"prompt": "q", "response": "a", "history": None}, "pair").messages == [Message("user", "q"), Message("assistant", "a")]


def test_pair_custom_columns_adgen(tmp_path):
    cols = Columns(prompt="content", response="summary")
    value = {"content": "类型#裤*版型#宽松", "summary": "宽松的阔腿裤"}
    ex = parse(value, "pair", cols)
    assert ex.messages == [Message("user", "类型#裤*版型#宽松"), Message("assistant", "宽松的阔腿裤")]
    p = write_lines(tmp_path / "adgen.json", [value, {"content": "c2", "summary": "s2"}])
    fmt, rows = load_examples(str(p), "auto", cols)
    assert fmt == "pair"
    assert [r.messages[-1].content for r in rows] == ["宽松的阔腿裤", "s2"]
    with pytest.raises(DataError):
        load_examples(str(p), "auto", Columns())


# --------------------------------------------------------------------------------------------------
# 3. Malformed rows
# --------------------------------------------------------------------------------------------------

GOOD = {
    "alpaca": {"instruction": "q", "output": "a"},
    "sharegpt": sharegpt(("human", "q"), ("gpt", "a")),
    "openai": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "pair": {"prompt": "q", "response": "a", "history": [["q0", "a0"]]},
}


def _moss_bad_marker():
    row = first_moss_row()
    row["chat"]["turn_2"] = {**row["chat"]["turn_2"], "MOSS": "经过计算<eom>\n"}
    return row


MALFORMED = [
    ("alpaca", {"instruction": "q"}, "missing_field"),
    ("alpaca", {"output": "a"}, "missing_field"),
    ("alpaca", {"instruction": "q", "output": 42}, "wrong_type"),
    ("alpaca", {"instruction": "q", "output": ["a"]}, "wrong_type"),
    ("alpaca", {"instruction": "q", "output": {"text": "a"}}, "wrong_type"),
    ("alpaca", {"instruction": "q", "input": 3, "output": "a"}, "wrong_type"),
    ("alpaca", {"instruction": "q", "output": None}, "missing_field"),
    ("alpaca", {"instruction": "q", "output": ""}, "empty_output"),
    ("alpaca", {"instruction": "q", "output": " \n\t "}, "empty_output"),
    ("alpaca", {"instruction": "  ", "output": "a"}, "empty_prompt"),
    ("alpaca", ["q", "a"], "not_an_object"),
    ("alpaca", '"just a string"', "not_an_object"),
    ("sharegpt", sharegpt(("robot", "q"), ("gpt", "a")), "unknown_role"),
    ("sharegpt", sharegpt(("human", "q"), ("human", "q2"), ("gpt", "a")), "bad_role_order"),
    ("sharegpt", sharegpt(("gpt", "a"), ("human", "q")), "bad_role_order"),
    ("sharegpt", sharegpt(("gpt", "a"),), "bad_role_order"),
    ("sharegpt", sharegpt(("human", "q"), ("gpt", "a"), ("system", "s"), ("gpt", "b")), "bad_role_order"),
    ("sharegpt", {"conversations": []}, "empty_conversation"),
    ("sharegpt", sharegpt(("human", "q"), ("gpt", "  ")), "empty_output"),
    ("sharegpt", {"conversations": "q"}, "wrong_type"),
    ("sharegpt", {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "missing_field"),
    ("openai", {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}, "unknown_role"),
    ("moss", "BAD_MARKER", "malformed_field"),
    ("pair", {"prompt": "q", "response": "a", "history": "q0 a0"}, "wrong_type"),
    ("pair", {"prompt": "q", "response": "a", "history": [["q0", "a0", "x"]]}, "wrong_type"),
    ("pair", {"prompt": "q", "response": "a", "history": [["q0", 1]]}, "wrong_type"),
    ("pair", {"prompt": "q", "response": "a", "history": ["q0", "a0"]}, "wrong_type"),
    ("pair", {"prompt": "q"}, "missing_field"),
    ("pair", {"prompt": "q", "response": ""}, "empty_output"),
]


@pytest.mark.parametrize("fmt,value,category", MALFORMED,
                         ids=[f"{i}-{f}-{c}" for i, (f, _, c) in enumerate(MALFORMED)])
def test_malformed_row_gives_exactly_one_row_error(tmp_path, fmt, value, category):
    if value == "BAD_MARKER":
        value = _moss_bad_marker()
    good = first_moss_row() if fmt == "moss" else GOOD[fmt]
    p = write_lines(tmp_path / "d.jsonl", [good, value, good])
    used, rows = load_examples(str(p), "auto", Columns())
    assert used == fmt
    errs = [r for r in rows if isinstance(r, RowError)]
    assert len(rows) == 3
    assert [(e.category, e.path, e.line) for e in errs] == [(category, str(p), 2)]
    assert all(isinstance(r, Example) for i, r in enumerate(rows) if i != 1)
    assert category in ROW_ERRORS and str(p) + ":2" in str(errs[0])


def test_sharegpt_trailing_user_turn_dropped_with_note():
    ex = parse(sharegpt(("human", "q1"), ("gpt", "a1"), ("human", "unanswered")), "sharegpt")
    assert ex.messages == [Message("user", "q1"), Message("assistant", "a1")]
    assert ex.notes == ["dropped_trailing_user_turn"]
    ex = parse({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}, {"from": "human", "value": "more?"}]}, "sharegpt")
    assert roles(ex) == ["system", "user", "assistant"] and ex.notes == ["dropped_trailing_user_turn"]


# --------------------------------------------------------------------------------------------------
# 4. Format detection
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(REAL_SETS))
def test_real_sets_detected_and_parse_cleanly(key):
    path = REAL_SETS[key]
    fmt, rows = load_examples(str(path), "auto", Columns())
    assert fmt == key
    assert len(rows) == REAL_COUNTS[key]
    errors = [r for r in rows if isinstance(r, RowError)]
    assert errors == []
    assert all(r.path == str(path) and r.line >= 1 for r in rows)
    assert all(r.messages[-1].role == "assistant" and r.messages[-1].content.strip() for r in rows)
    assert all(m.role in ROLES for r in rows for m in r.messages)
    lines = [r.line for r in rows]
    assert lines == sorted(set(lines))


def test_undetectable_format_raises_with_keys_and_hint(tmp_path):
    p = write_lines(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}])
    with pytest.raises(DataError) as info:
        load_examples(str(p), "auto", Columns())
    msg = str(info.value)
    assert "question" in msg and "answer" in msg
    assert "--data_format" in msg and str(p) in msg


def test_detection_uses_majority():
    recs = [Record("f", i, sharegpt(("human", "q"), ("gpt", "a"))) for i in range(3)]
    recs.append(Record("f", 4, {"instruction": "q", "output": "a"}))
    recs.append(RowError("invalid_json", "f", 5))
    assert detect_format(recs, "f", Columns()) == "sharegpt"


def test_explicit_format_overrides_detection(tmp_path):
    row = {"instruction": "alpaca q", "output": "alpaca a",
           "conversations": [{"from": "human", "value": "chat q"}, {"from": "gpt", "value": "chat a"}]}
    p = write_lines(tmp_path / "mixed.jsonl", [row, row])
    fmt, rows = load_examples(str(p), "sharegpt", Columns())
    assert fmt == "sharegpt"
    assert [r.messages for r in rows] == [[Message("user", "chat q"), Message("assistant", "chat a")]] * 2
    fmt, rows = load_examples(str(p), "alpaca", Columns())
    assert fmt == "alpaca" and rows[0].messages[0].content == "alpaca q"
    # the real ChatGLM file forced to alpaca: every row lacks 'instruction'
    fmt, rows = load_examples(str(REAL_SETS["pair"]), "alpaca", Columns())
    assert fmt == "alpaca" and len(rows) == 100
    assert {(type(r).__name__, getattr(r, "category", None)) for r in rows} == {("RowError", "missing_field")}


# --------------------------------------------------------------------------------------------------
# 5. End to end through prepare_data
# --------------------------------------------------------------------------------------------------

N_GOOD_ALPACA = 6
SECRET = "SECRET-7f3a"


@pytest.fixture(scope="module")
def bad_row_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("badrows")
    a_lines: list = []
    bad_a = {}
    bad_rows = [
        ("missing_field", {"instruction": "no output here"}),
        ("wrong_type", {"instruction": "typed", "output": 17}),
        ("empty_output", {"instruction": "empty", "output": ""}),
        ("invalid_utf8", b'{"instruction": "caf\xe9", "output": "x"}'),
        ("invalid_json", '{"instruction": "truncated", "outp'),
    ]
    good_a = []
    for i in range(N_GOOD_ALPACA):
        a_lines.append(alpaca(i))
        good_a.append(len(a_lines))
        if i < len(bad_rows):
            cat, row = bad_rows[i]
            a_lines.append(row)
            bad_a[cat] = len(a_lines)
    a_path = write_lines(root / "alpaca.jsonl", a_lines)

    s_lines = [
        sharegpt(("human", "hi"), ("gpt", "hello")),
        sharegpt(("robot", "beep"), ("gpt", "boop")),
        sharegpt(("system", "be nice"), ("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")),
        sharegpt(("human", "one"), ("human", "two"), ("gpt", "three")),
        sharegpt(("human", "q"), ("gpt", "a"), ("human", "left unanswered")),
    ]
    s_path = write_lines(root / "sharegpt.jsonl", s_lines)
    good_s = [1, 3, 5]
    bad_s = {"unknown_role": 2, "bad_role_order": 4}
    out = root / "out"
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], out) + ["--max_bad_fraction", "1"])
    return dict(code=code, stdout=stdout, stderr=stderr, out=out, a_path=a_path, s_path=s_path,
                good_a=good_a, good_s=good_s, bad_a=bad_a, bad_s=bad_s, rows=(len(a_lines), len(s_lines)))


def test_prepare_data_report_counts_each_bad_row(bad_row_run):
    r = bad_row_run
    assert r["code"] == 0, r["stderr"]
    report = json.loads((r["out"] / "data_report.json").read_text(encoding="utf-8"))
    expected_first = {cat: f"{r['a_path']}:{line}" for cat, line in r["bad_a"].items()}
    expected_first.update({cat: f"{r['s_path']}:{line}" for cat, line in r["bad_s"].items()})
    assert set(report["errors"]) == set(expected_first)
    for cat, where in expected_first.items():
        assert report["errors"][cat]["count"] == 1, cat
        assert report["errors"][cat]["first"] == [where], cat
    src_a, src_s = report["sources"]
    assert (src_a["format"], src_s["format"]) == ("alpaca", "sharegpt")
    assert src_a["bad"] == {cat: 1 for cat in r["bad_a"]}
    assert src_s["bad"] == {cat: 1 for cat in r["bad_s"]}
    assert (src_a["rows"], src_s["rows"]) == r["rows"]
    assert (src_a["kept"], src_s["kept"]) == (len(r["good_a"]), len(r["good_s"]))
    assert src_s["notes"] == {"dropped_trailing_user_turn": 1}
    t = report["totals"]
    assert t["kept"] == len(r["good_a"]) + len(r["good_s"]) == 9
    assert t["bad"] == 7 and t["rows"] == sum(r["rows"])
    assert report["splits"]["train"] == 9 and report["splits"]["validation"] == 0


def test_prepare_data_keeps_exactly_the_good_rows(bad_row_run):
    from datasets import load_from_disk

    r = bad_row_run
    assert r["code"] == 0, r["stderr"]
    train = load_from_disk(str(r["out"] / "dataset" / "train"))
    kept = sorted(zip(train["source"], train["line"]))
    assert kept == sorted([(0, n) for n in r["good_a"]] + [(1, n) for n in r["good_s"]])
    assert "bad 7" in r["stderr"]  # the summary counts the bad rows


def test_val_set_size_zero_output_loads(bad_row_run):
    from datasets import load_from_disk

    assert bad_row_run["code"] == 0, bad_row_run["stderr"]
    ds = load_from_disk(str(bad_row_run["out"] / "dataset"))
    # datasets cannot load an empty split back, so --val_set_size 0 writes no validation split
    assert ds["train"].num_rows == 9 and "validation" not in ds


def _two_bad_files(tmp_path):
    a_path = write_lines(tmp_path / "a.jsonl", [alpaca(0), alpaca(1), {"instruction": SECRET, "output": 5},
                                                 alpaca(2), {"instruction": "x"}, alpaca(3)])
    s_path = write_lines(tmp_path / "s.jsonl", [sharegpt(("human", "hi"), ("gpt", "yo")),
                                                 sharegpt(("human", SECRET), ("gpt", SECRET), ("gpt", "x"))])
    return a_path, s_path


def test_strict_stops_at_first_bad_row(tmp_path):
    a_path, s_path = _two_bad_files(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], out) + ["--strict", "--max_bad_fraction", "1"])
    assert code == 1
    assert f"{a_path}:3" in stderr and "wrong_type" in stderr
    assert f"{a_path}:5" not in stderr and "missing_field" not in stderr and f"{s_path}:2" not in stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_default_max_bad_fraction_fails_without_writing(tmp_path):
    a_path, s_path = _two_bad_files(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], out))
    assert code == 1
    assert "nothing written" in stderr and "max_bad_fraction" in stderr
    assert "3 of 8 rows" in stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_only_bad_rows_no_usable_example(tmp_path):
    p = write_lines(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}, {"instruction": "y"},
                                             '{"instruction": "trunc'])
    out = tmp_path / "out"
    code, stdout, stderr = run_prepare(base_argv([p], out) + ["--max_bad_fraction", "1"])
    assert code == 1
    assert "no usable example" in stderr
    assert not out.exists()


@pytest.mark.parametrize("mode", [["--max_bad_fraction", "1"], []], ids=["tolerant", "default_fails"])
def test_bad_row_contents_not_printed_without_log_flag(tmp_path, mode):
    a_path, s_path = _two_bad_files(tmp_path)
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], tmp_path / "out") + mode)
    assert code == (0 if mode else 1)
    assert SECRET not in stdout and SECRET not in stderr
    if not mode:  # the failure summary names where the bad rows are, not what they hold
        assert f"{a_path}:3" in stderr and f"{s_path}:2" in stderr


def test_strict_does_not_print_row_contents(tmp_path):
    p = write_lines(tmp_path / "s.jsonl", [sharegpt(("human", "hi"), ("gpt", "yo")),
                                           sharegpt((SECRET, "q"), ("gpt", "a"))])
    code, stdout, stderr = run_prepare(base_argv([p], tmp_path / "out") + ["--strict"])
    assert code == 1 and f"{p}:2" in stderr and "unknown_role" in stderr
    assert SECRET not in stdout + stderr


def test_log_bad_rows_prints_each_bad_row_location(tmp_path):
    a_path, s_path = _two_bad_files(tmp_path)
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], tmp_path / "out")
                                       + ["--max_bad_fraction", "1", "--log_bad_rows"])
    assert code == 0, stderr
    for where, cat in [(f"{a_path}:3", "wrong_type"), (f"{a_path}:5", "missing_field"), (f"{s_path}:2", "bad_role_order")]:
        assert any(where in line and cat in line for line in stderr.splitlines()), where


def test_log_bad_rows_prints_row_contents(tmp_path):
    a_path, s_path = _two_bad_files(tmp_path)
    code, stdout, stderr = run_prepare(base_argv([a_path, s_path], tmp_path / "out")
                                       + ["--max_bad_fraction", "1", "--log_bad_rows"])
    assert code == 0, stderr
    assert SECRET in stderr


# --------------------------------------------------------------------------------------------------
# 6. Properties: the row parser and the reader are total
# --------------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)


def _text_or(values):
    return st.text(max_size=10) | st.sampled_from(values) | json_values


role_names = ["human", "gpt", "Human", "GPT", "system", "user", "assistant", "robot", "", " gpt "]
turns = st.lists(st.fixed_dictionaries({}, optional={
    "from": _text_or(role_names), "value": _text_or(["hi", "", "  "]),
    "role": _text_or(role_names), "content": _text_or(["hi", ""]) | st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image"]), "text": _text_or(["x"])}), max_size=3),
}), max_size=5)
moss_values = [f"{start} hi{end}\n" for start, end in [("<|Human|>:", "<eoh>"), ("<|Inner Thoughts|>:", "<eot>"),
                                                        ("<|Commands|>:", "<eoc>"), ("<|Results|>:", "<eor>"),
                                                        ("<|MOSS|>:", "<eom>")]] + ["<|MOSS|>:<eom>", "<|Human|>: <eoh>"]
moss_turn = st.fixed_dictionaries({}, optional={
    k: _text_or(moss_values) for k in ("Human", "Inner Thoughts", "Commands", "Tool Responses", "MOSS")})
biased = (
    st.fixed_dictionaries({}, optional={"instruction": _text_or(["q", " "]), "input": _text_or(["", "i"]),
                                        "output": _text_or(["a", ""])})
    | st.fixed_dictionaries({}, optional={"conversations": turns | json_values, "id": json_values})
    | st.fixed_dictionaries({}, optional={"messages": turns | json_values})
    | st.fixed_dictionaries({}, optional={
        "meta_instruction": _text_or(["You are MOSS."]),
        "chat": st.dictionaries(st.sampled_from(["turn_1", "turn_2", "turn_10", "turn_x", "turn_", "t"]) | st.text(max_size=8),
                                moss_turn | json_values, max_size=3) | json_values})
    | st.fixed_dictionaries({}, optional={
        "prompt": _text_or(["q", ""]), "response": _text_or(["a", " "]),
        "history": st.lists(st.lists(_text_or(["q", "a", ""]), max_size=3) | json_values, max_size=3) | json_values})
)


@st.composite
def near_valid(draw):
    """Well-formed conversations of each format, so the parsers' success paths are exercised too."""
    n = draw(st.integers(1, 3))
    texts = st.text(min_size=1, max_size=8).map(lambda t: t if t.strip() else "x" + t)  # emptiness: see `biased`
    pairs = [(draw(texts), draw(texts)) for _ in range(n)]
    system = draw(st.none() | texts)
    trailing = draw(st.booleans())
    kind = draw(st.sampled_from(["alpaca", "pair", "sharegpt", "openai", "moss"]))
    if kind == "alpaca":
        return {"instruction": pairs[0][0], "input": draw(texts), "output": pairs[0][1]}
    if kind == "pair":
        return {"prompt": pairs[0][0], "response": pairs[0][1], "history": [list(p) for p in pairs[1:]]}
    if kind == "moss":
        markers = dict((name, (start, end)) for name, _, start, end in MOSS_FIELDS)
        chat = {}
        for i, (q, a) in enumerate(pairs, start=1):
            body = {"Human": q, "Inner Thoughts": draw(texts), "Commands": "None", "Tool Responses": "\nNone\n",
                    "MOSS": a}
            chat[f"turn_{i}"] = {k: f"{markers[k][0]} {v}{markers[k][1]}\n" for k, v in body.items()}
        keys = draw(st.permutations(list(chat)))
        return {"meta_instruction": system or "", "chat": {k: chat[k] for k in keys}}
    roles_ = ("human", "gpt", "system") if kind == "sharegpt" else ("user", "assistant", "system")
    turns_ = ([(roles_[2], system)] if system is not None else [])
    turns_ += [t for q, a in pairs for t in ((roles_[0], q), (roles_[1], a))]
    if trailing:
        turns_.append((roles_[0], draw(texts)))
    if kind == "sharegpt":
        return {"conversations": [{"from": r, "value": v} for r, v in turns_]}
    return {"messages": [{"role": r, "content": v} for r, v in turns_]}


any_record_value = json_values | biased | near_valid()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=any_record_value)
def test_row_parser_is_total(value):
    for fmt in FORMATS:
        try:
            ex = parse_record(Record("f.jsonl", 1, value), fmt, Columns())
        except RowError as err:
            assert err.category in ROW_ERRORS
            assert (err.path, err.line) == ("f.jsonl", 1)
        else:
            assert isinstance(ex, Example)
            assert (ex.path, ex.line) == ("f.jsonl", 1)
            assert ex.messages and all(isinstance(m.content, str) and m.role in ROLES for m in ex.messages)
            assert any(m.role == "assistant" and m.content.strip() for m in ex.messages)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=any_record_value)
def test_row_parsers_need_no_catch_all(value):
    """No parser bug is hidden by parse_record's catch-all (which turns any exception into malformed_field)."""
    for fmt in FORMATS:
        try:
            parse_record(Record("f.jsonl", 1, value), fmt, Columns())
        except RowError as err:
            assert err.__cause__ is None, f"{fmt}: {err}"


line_bytes = st.binary(max_size=30) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()) | \
    st.sampled_from([b"", b"  ", b"[", b"]", b",", b"{", b"\xef\xbb\xbf", b"\xff", b'{"a": "\xe9"}', b"\r"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(line_bytes, max_size=6), array=st.booleans())
def test_reader_is_total(tmp_path_factory, lines, array):
    path = tmp_path_factory.mktemp("prop", numbered=True) / "d.jsonl"
    data = b"\n".join(lines)
    if array:
        data = b"[" + b",\n".join(lines) + b"]"
    path.write_bytes(data)
    n_lines = data.count(b"\n") + 1
    try:
        items = list(read_records(path))
    except DataError:
        assert not data.decode("utf-8", "replace").lstrip("\ufeff").strip()
        return
    for item in items:
        assert isinstance(item, (Record, RowError))
        assert item.path == str(path)
        assert 1 <= item.line <= n_lines
        if isinstance(item, RowError):
            assert item.category in ("invalid_json", "invalid_utf8")
    lines_seen = [i.line for i in items]
    assert lines_seen == sorted(lines_seen)
