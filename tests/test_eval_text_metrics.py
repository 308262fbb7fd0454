"""eval/text_metrics.py and utils/evaluation/text_metrics.py: ChatGLM-6B's ROUGE-1/2/L and BLEU-4 on generations.

The Chinese figures are the ones ChatGLM-6B's ptuning/main.py prints for the two pairs (pinned by the issue);
the English ones are computed here with rouge_chinese and nltk directly, on whitespace words.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from utils.cli import run
from utils.errors import UsageError
from utils.evaluation.text_metrics import METRICS, score_pair, text_metrics

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "eval" / "text_metrics.py"

# (prediction, label): ChatGLM's recipe gives these means (the figures).
PINNED_PAIRS = [("这件衬衫的款式非常宽松，适合夏天穿着。", "这件衬衫采用宽松的版型，夏天穿着很舒适。"),
                ("简约的设计，显瘦又百搭", "简约百搭的设计，穿上显瘦")]
PINNED = {"rouge-1": 66.0326, "rouge-2": 23.8095, "rouge-l": 61.6848, "bleu-4": 30.39065}


def load_script():
    """eval/text_metrics.py as a module (eval/ is not a package; dataclasses need it in sys.modules)."""
    if "eval_text_metrics" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eval_text_metrics", SCRIPT)
        module = sys.modules["eval_text_metrics"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["eval_text_metrics"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def in_process(capsys, *args: str) -> tuple[dict, str]:
    """The script's main as its command line runs it, here (no interpreter start): (report, stderr)."""
    run(load_script().main, list(args))
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_the_pinned_chinese_example_through_the_library():
    got = text_metrics(PINNED_PAIRS)
    assert set(got) == set(METRICS)
    for metric, value in PINNED.items():
        assert got[metric] == pytest.approx(value, abs=1e-4), metric


def test_the_pinned_example_through_the_script_and_the_output_dir_rerun_is_a_no_op(tmp_path):
    preds = write_jsonl(tmp_path / "generated_predictions.txt",
                        [{"labels": label, "predict": pred} for pred, label in PINNED_PAIRS])
    out = tmp_path / "report"
    first = script("--predictions", str(preds), "--output_dir", str(out))
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    for metric, value in PINNED.items():
        assert report[metric] == pytest.approx(value, abs=1e-4), metric
    assert report["examples"] == 2 and report["empty"] == 0 and report["lang"] == "zh"
    assert report["predictions"]["path"] == str(preds.resolve())
    assert set(report["libraries"]) == {"jieba", "rouge-chinese", "nltk"}
    assert "Building prefix dict" not in first.stderr  # jieba's start-up log is quietened
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["line"], r["empty"]) for r in rows] == [(1, 1, False), (2, 2, False)]
    assert rows[0] == {"id": 1, "line": 1, **score_pair(*PINNED_PAIRS[0]), "empty": False}
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report

    mtime = (out / "scores.jsonl").stat().st_mtime_ns
    again = script("--predictions", str(preds), "--output_dir", str(out))
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr
    assert json.loads(again.stdout) == report
    assert (out / "scores.jsonl").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("lang, text", [
    ("zh", "这件衬衫的款式非常宽松，适合夏天穿着，简约百搭。"),
    ("en", "the quick brown fox jumps over the lazy dog today"),
])
def test_an_identical_prediction_scores_100_on_all_four(lang, text):
    assert score_pair(text, text, lang) == {m: 100.0 for m in METRICS}


def test_lang_en_counts_whitespace_words_where_zh_counts_jieba_words_and_characters():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred, ref = "The cats were sitting on the mats.", "The cat sat on the mat."
    hyp, gold = pred.split(), ref.split()
    rouge = Rouge().get_scores(" ".join(hyp), " ".join(gold))[0]
    expected = {m: round(rouge[m]["f"] * 100, 4) for m in ("rouge-1", "rouge-2", "rouge-l")}
    expected["bleu-4"] = round(sentence_bleu([gold], hyp, smoothing_function=SmoothingFunction().method3) * 100, 4)
    en, zh = score_pair(pred, ref, "en"), score_pair(pred, ref, "zh")
    assert en == expected
    # "cats" shares most of its letters with "cat", "mats." with "mat.": character-level BLEU credits them, word-level
    # BLEU does not; jieba splits the final "." off, so zh's ROUGE finds one more word in common.
    assert zh["bleu-4"] > en["bleu-4"]
    assert zh["rouge-1"] > en["rouge-1"]


def test_empty_texts_score_zero_and_count_in_the_means():
    full = "简约百搭的设计，穿上显瘦"
    assert score_pair("", full) is None and score_pair(full, " \n\t") is None and score_pair("", "", "en") is None
    assert score_pair("。", "。") is not None  # punctuation is a token to rouge_chinese: not empty
    got = text_metrics([(full, full), ("", full), (full, "   ")])
    assert got == pytest.approx({m: 100.0 / 3 for m in METRICS})


def test_references_joined_by_id_with_bad_rows_counted_and_empty_rows_listed(tmp_path, capsys):
    pairs = {"a": ("简约的设计，显瘦又百搭", "简约百搭的设计，穿上显瘦"),
             "b": ("这件衬衫的款式非常宽松。", "这件衬衫采用宽松的版型。"),
             "c": ("  ", "夏天穿着很舒适"),  # empty prediction
             "d": ("夏天穿着很舒适", "")}  # empty reference
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        {"id": "b", "line": 2, "response": pairs["b"][0]},
        "{not json",
        {"id": "a", "line": 1, "response": pairs["a"][0]},
        {"id": "c", "response": pairs["c"][0]},
        {"id": "a", "response": "again"},  # duplicate id
        {"id": "d", "response": pairs["d"][0]},
        {"id": "e", "response": 5},  # not a string
        {"id": "zz", "response": "no such reference"},
    ])
    refs = tmp_path / "refs.json"  # a JSON array, as alpaca data comes: element k (from 1) on line k + 1
    elements = [{"id": k, "instruction": "q", "output": v[1]} for k, v in pairs.items()]
    elements += [{"id": "lonely", "output": "nobody answered this"}, {"id": "x"}]
    refs.write_text("[\n" + ",\n".join(json.dumps(e, ensure_ascii=False) for e in elements) + "\n]\n",
                    encoding="utf-8")
    report, err = in_process(capsys, "--predictions", str(answers), "--pred_field", "response",
                             "--references", str(refs), "--ref_field", "output")
    assert report["examples"] == 4
    expected = text_metrics([pairs[k] for k in "bacd"])
    assert {m: report[m] for m in METRICS} == pytest.approx(expected)
    assert report["empty"] == 2
    assert [(e["id"], e["where"], e["empty"]) for e in report["empty_rows"]] == [
        ("c", f"{answers}:4", "prediction"), ("d", f"{answers}:6", "reference")]
    bad = {reason: v["rows"] for reason, v in report["malformed"]["predictions"].items()}
    assert bad == {"not valid JSON": [f"{answers}:2"], "duplicate id": [f"{answers}:5"],
                   "'response' is not a string": [f"{answers}:7"], "no reference with this id": [f"{answers}:8"]}
    assert report["malformed"]["references"] == {"no 'output' field": {"count": 1, "rows": [f"{refs}:7"]}}
    assert report["references_without_prediction"] == {"count": 1, "rows": [f"{refs}:6"]}
    assert report["skipped"] == 5
    assert f"not valid JSON: {answers}:2" in err and "1 reference(s) have no prediction" in err


def test_rows_without_an_id_are_joined_by_number_as_generate_names_them(tmp_path, capsys):
    """generate.py's answers to rows without an id carry the row's number as "id": its position in a JSON array."""
    refs = tmp_path / "dev.json"
    refs.write_text(json.dumps([{"instruction": "q", "output": "简约百搭的设计"}, {"instruction": "q", "output": "宽松"}],
                               indent=2), encoding="utf-8")
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"id": 2, "line": 2, "response": "宽松"},
                                                       {"id": 1, "line": 1, "response": "简约百搭的设计"}])
    report, _ = in_process(capsys, "--predictions", str(answers), "--pred_field", "response", "--references",
                           str(refs), "--ref_field", "output")
    assert report["examples"] == 2 and report["rouge-1"] == 100.0
    assert report["references_without_prediction"]["count"] == 0


def test_strict_makes_a_bad_row_fatal_naming_its_line(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"labels": "好的", "predict": "好的"}, {"labels": "好的"}])
    done = script("--predictions", str(preds), "--strict")
    assert done.returncode == 1 and done.stdout == ""
    assert f"{preds}:2: no 'predict' field (--strict)" in done.stderr
    assert "Traceback" not in done.stderr


def test_every_argument_problem_is_reported_at_once(tmp_path):
    main = load_script().main
    with pytest.raises(UsageError) as exc:
        main(predictions=str(tmp_path / "missing.jsonl"), references=str(tmp_path / "nope.json"), lang="fr")
    text = str(exc.value)
    assert "--predictions" in text and "--references" in text and "--lang must be one of zh, en" in text
    with pytest.raises(UsageError, match="scored against itself"):
        main(predictions=str(write_jsonl(tmp_path / "p.jsonl", [{"predict": "x"}])), ref_field="predict")


def test_a_mistyped_flag_fails_before_any_work(tmp_path):
    preds = write_jsonl(tmp_path / "p.jsonl", [{"labels": "好的", "predict": "好的"}])
    out = tmp_path / "report"
    done = script("--predictions", str(preds), "--output_dir", str(out), "--ref_feild", "output")
    assert done.returncode == 2 and done.stdout == ""
    assert "did you mean --ref_field" in done.stderr
    assert not out.exists()
