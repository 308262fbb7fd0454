"""prepare_data.py as a stage: output folder, reuse, atomicity, inspection, real data sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import prepare_data
from conftest import DATA, REAL_SETS, STORIES
from utils.artifacts import META_FILE, read_meta, sha256_file
from utils.cli import run
from utils.data.encode import IGNORE_INDEX


def prepare(out: Path, *extra: str, data=None, base=STORIES) -> None:
    data = data or [REAL_SETS["pair"]]
    run(prepare_data.main, ["--base_model", str(base), "--data_path", *map(str, data), "--output_dir", str(out), *extra])


def fails(capsys, out, *extra, data=None, code=1) -> str:
    with pytest.raises(SystemExit) as exc:
        prepare(out, *extra, data=data)
    assert exc.value.code == code
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "chatglm"
    prepare(out, "--cutoff_len", "1024", "--val_set_size", "10")
    return out


def test_output_folder_is_self_describing(prepared):
    from datasets import load_from_disk

    meta = read_meta(prepared)
    assert meta["stage"] == "prepare_data" and meta["complete"] is True
    assert meta["args"]["cutoff_len"] == 1024 and meta["args"]["data_path"] == [str(REAL_SETS["pair"])]
    assert meta["base_model"]["path"] == str(STORIES)
    assert meta["base_model"]["tokenizer_files"]["tokenizer.json"] == sha256_file(STORIES / "tokenizer.json")
    assert meta["inputs"][0]["sha256"] == sha256_file(REAL_SETS["pair"]) and meta["inputs"][0]["format"] == "pair"
    files = {p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file() and p.name != META_FILE}
    assert set(meta["files"]) == files
    for name, digest in meta["files"].items():
        assert sha256_file(prepared / name) == digest
    template = json.loads((prepared / "template.json").read_text(encoding="utf-8"))
    assert template["name"] == "chatglm" and template["single_turn_user_format"] == "{content}"
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()
    ds = load_from_disk(str(prepared / "dataset"))
    assert len(ds["validation"]) == 10 and len(ds["train"]) + 10 == 100
    row = ds["train"][0]
    assert set(row) == {"input_ids", "labels", "length", "source", "line"}
    assert row["length"] == len(row["input_ids"]) == len(row["labels"]) and row["source"] == 0
    assert any(l != IGNORE_INDEX for l in row["labels"]) and row["labels"][0] == IGNORE_INDEX


def test_report_counts_and_ratios(prepared):
    report = json.loads((prepared / "data_report.json").read_text(encoding="utf-8"))
    t = report["totals"]
    assert t["rows"] == 100 and t["kept"] == 100 and t["bad"] == 0 and t["dropped"] == 0
    src = report["sources"][0]
    assert src["trained_tokens"] == t["trained_tokens"] and 0 < src["trained_ratio"] < 1
    assert sum(report["length_histogram"]["counts"]) == 100
    assert report["splits"] == {"train": 90, "validation": 10, "seed": 42}


def test_rerun_is_a_noop(prepared, capsys):
    before = (prepared / META_FILE).stat().st_mtime_ns
    prepare(prepared, "--cutoff_len", "1024", "--val_set_size", "10", "--inspect", "1")
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err
    assert (prepared / META_FILE).stat().st_mtime_ns == before
    assert captured.out.strip().endswith(str(prepared))


def test_different_inputs_need_overwrite(tmp_path, capsys):
    out = tmp_path / "d"
    prepare(out, "--cutoff_len", "1024")
    first = read_meta(out)["fingerprint"]
    err = fails(capsys, out, "--cutoff_len", "512")
    assert "--overwrite" in err and read_meta(out)["fingerprint"] == first
    prepare(out, "--cutoff_len", "512", "--overwrite")
    assert read_meta(out)["fingerprint"] != first
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no staging or backup folder left behind


def test_foreign_folder_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = fails(capsys, out)  # with --overwrite the stage's files go in beside it: see test_lifecycle.py
    assert "not written by this suite" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import utils.artifacts

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(utils.artifacts, "finish_meta", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_split_is_deterministic_and_sized(tmp_path):
    from datasets import load_from_disk

    prepare(tmp_path / "a", "--val_set_size", "0.2", "--cutoff_len", "1024")
    prepare(tmp_path / "b", "--val_set_size", "0.2", "--cutoff_len", "1024")
    prepare(tmp_path / "c", "--val_set_size", "0.2", "--cutoff_len", "1024", "--seed", "7")
    val = [load_from_disk(str(tmp_path / d / "dataset"))["validation"]["line"] for d in "abc"]
    assert len(val[0]) == 20 and val[0] == val[1] and val[0] != val[2]


def test_val_set_size_too_large(tmp_path, capsys):
    err = fails(capsys, tmp_path / "o", "--val_set_size", "100", "--cutoff_len", "1024")
    assert "--val_set_size" in err and not (tmp_path / "o").exists()


def test_bad_arguments_reported_together(tmp_path, capsys):
    err = fails(capsys, tmp_path / "o", "--cutoff_len", "1", "--val_set_size", "2.5", "--max_bad_fraction", "3",
                data=[tmp_path / "missing.json"], code=2)
    for text in ("--cutoff_len", "--val_set_size", "--max_bad_fraction", "missing.json"):
        assert text in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_inspect_marks_trained_text(tmp_path, capsys):
    """Slow: The whole alpaca set of ../shared through the stage (its first rows are the ones shown)."""
    prepare(tmp_path / "o", "--inspect", "2", "--cutoff_len", "1024", data=[REAL_SETS["alpaca"]])
    out = capsys.readouterr().out
    assert out.count("--- ") == 2 and "⟦" in out and "⟧" in out
    prompt, trained = out.split("--- ", 1)[1].split("⟦", 1)
    assert "### Response:" in prompt and "### Response:" not in trained.split("⟧")[0]
    assert trained.split("⟧")[0].endswith("</s>")


@pytest.mark.slow
def test_mixed_formats_need_one_template(tmp_path, capsys):
    """Slow: Two whole real data sets of ../shared through the stage, refused then prepared."""
    data = [REAL_SETS["alpaca"], REAL_SETS["sharegpt"]]
    err = fails(capsys, tmp_path / "o", data=data, code=2)
    assert "--prompt_template_name" in err and "alpaca" in err and "vicuna_v1.1" in err
    prepare(tmp_path / "o", "--prompt_template_name", "vicuna_v1.1", "--cutoff_len", "1024", data=data)
    report = json.loads((tmp_path / "o" / "data_report.json").read_text(encoding="utf-8"))
    assert [s["format"] for s in report["sources"]] == ["alpaca", "sharegpt"]
    assert [s["rows"] for s in report["sources"]] == [7473, 140]


def test_custom_columns_adgen_style(tmp_path):
    rows = [{"content": f"类型#上衣*颜色#{c}", "summary": f"这件{c}色的上衣很好看。"} for c in "红黄蓝绿白黑"]
    path = tmp_path / "adgen.json"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    prepare(tmp_path / "o", "--prompt_column", "content", "--response_column", "summary", "--val_set_size", "0",
            data=[path])
    meta = read_meta(tmp_path / "o")
    assert meta["inputs"][0]["format"] == "pair" and meta["template"]["name"] == "chatglm"


def test_cutoff_beyond_model_context_warns(tmp_path, capsys):
    prepare(tmp_path / "o", "--cutoff_len", "4096")
    assert "exceeds the model's context of 512" in capsys.readouterr().err


def test_trust_remote_code_is_off_by_default(tmp_path, capsys):
    """A tokenizer that needs custom code is refused (naming the flag), and its code never runs."""
    base = tmp_path / "remote"
    base.mkdir()
    sentinel = tmp_path / "ran"
    (base / "tok.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    (base / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    (base / "config.json").write_text(json.dumps({"model_type": "custom_thing"}))
    with pytest.raises(SystemExit) as exc:
        prepare(tmp_path / "o", base=base)
    assert exc.value.code == 1
    assert "--trust_remote_code" in capsys.readouterr().err
    assert not sentinel.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt,extra", [
    ("alpaca", ["--cutoff_len", "1024"]),
    ("moss", ["--cutoff_len", "2048", "--mask_mode", "moss"]),
    ("pair", []),
    ("sharegpt", ["--prompt_template_name", "phoenix", "--cutoff_len", "1024"]),
])
@pytest.mark.slow
def test_real_data_sets(tmp_path, fmt, extra):
    """Slow: Each real data set of ../shared goes through the whole stage, tokenizer and all."""
    out = tmp_path / fmt
    prepare(out, *extra, data=[REAL_SETS[fmt]])
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    src = report["sources"][0]
    assert src["format"] == fmt and src["bad"] == {}
    assert src["kept"] + sum(src["dropped"].values()) == src["rows"]
    assert src["kept"] >= 0.95 * src["rows"]
    assert 0.05 < src["trained_ratio"] < 0.95
    assert report["splits"]["train"] + report["splits"]["validation"] == src["kept"]
    assert os.path.isdir(out / "dataset" / "train")
    assert DATA.is_dir()


def test_strict_does_not_turn_length_policy_into_failure(tmp_path):
    """--strict stops on malformed rows only; examples dropped by --on_overlength drop are counted."""
    prepare(tmp_path / "o", "--strict", "--on_overlength", "drop", "--cutoff_len", "500", "--val_set_size", "0")
    report = json.loads((tmp_path / "o" / "data_report.json").read_text(encoding="utf-8"))
    assert report["sources"][0]["dropped"].get("overlength", 0) > 0 and report["totals"]["bad"] == 0


def test_on_overlength_error_stops_with_location(tmp_path, capsys):
    err = fails(capsys, tmp_path / "o", "--on_overlength", "error", "--cutoff_len", "300")
    assert "overlength" in err and "data_sample.jsonl:" in err and not (tmp_path / "o").exists()


def test_bad_fraction_error_keeps_length_drops_apart(tmp_path, capsys):
    """Rows dropped by the length policy are listed apart from malformed rows (only those count against
    --max_bad_fraction), each with its count and first locations."""
    src = tmp_path / "mixed.jsonl"
    lines = Path(REAL_SETS["pair"]).read_text(encoding="utf-8").splitlines()
    src.write_text("\n".join(lines + ['{"prompt": "no response here"}'] * 5) + "\n", encoding="utf-8")
    err = fails(capsys, tmp_path / "o", "--on_overlength", "drop", "--cutoff_len", "600", data=[src])
    err = err[err.index("error:"):]
    n = len(lines) + 5
    assert f"5 of {n} rows are malformed" in err and "nothing written" in err
    malformed, _, dropped = err.partition("Dropped by the length policy")
    assert f"Malformed: missing_field: 5 (first at {src}:{len(lines) + 1}" in malformed
    assert "overlength" not in malformed and dropped.split(":", 1)[1].lstrip().startswith("overlength: ")
    assert "not counted as malformed" in dropped and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--data_path", "tatsu-lab/alpaca"),
                                        ("--base_model", "meta-llama/Llama-2-7b-hf")])
def test_hub_id_is_told_nothing_is_downloaded(tmp_path, capsys, flag, value):
    args = {"--base_model": str(STORIES), "--data_path": str(REAL_SETS["pair"]), flag: value}
    with pytest.raises(SystemExit) as exc:
        run(prepare_data.main, [*[x for kv in args.items() for x in kv], "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{flag} {value}: no such" in err and "never downloads anything" in err
