"""eval/run.py, a whole evaluation run for cron, against the fake judge of fake_judge.py (and, in the slow test,
serve.py serving stories260K).

One run writes every file of the run folder (config, summary, tables, rankings.png, every raw judge output) and
points ``latest`` at it; the identical command again sends no request and changes no file; a killed run
resumes with only the missing requests while a second invocation at the same time is refused on the lock; a
run whose requests failed stays unfinished and the next invocation asks only those; unparseable verdicts are
kept, counted in summary.json and on stderr, and bounded by --max_unparsed / --strict after everything is
written; bad inputs are refused with file:line before any request; a config file (JSON or YAML) with paths
relative to it and an answer set made in the run; the API key is never written anywhere.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import DATA, REPO, STORIES
from fake_judge import Fault, FakeJudge, llmzoo_question, replay_from_reviews
from utils.cli import run

ZOO = DATA / "llmzoo"
REVIEWS = ZOO / "reviews" / "en"
RULES = ZOO / "prompt_all.json"
#: en/general's models, in its order (gpt-3.5-turbo is the reference).
ANSWERS = [ZOO / "answers" / f"answer_{name}.jsonl" for name in
           ("gpt35", "Phoenix-chat-7b", "Chimera-chat-13b", "Chimera-chat-7b")]
MODELS = ["gpt-3.5-turbo", "phoenix-7b", "chimera-13b", "chimera-7b"]
SECRET = "sk-test-0123456789abcdef-never-written"
GARBAGE = "They all have merits; I would rather not rank them."

pytestmark = pytest.mark.skipif(not ZOO.is_dir(), reason=f"LLMZoo data not found at {ZOO} (../shared is absent)")
run_script = importlib.import_module("eval.run")


# -- helpers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replays() -> dict[str, dict[str, str]]:
    return {d: replay_from_reviews(REVIEWS / d / "review.jsonl") for d in ("general", "relevance")}


@pytest.fixture()
def questions(tmp_path) -> Path:
    """The first 10 of LLMZoo's English questions (the stored answer files cover them, and more)."""
    path = tmp_path / "questions-10.jsonl"
    path.write_text("".join((ZOO / "questions-en.jsonl").read_text(encoding="utf-8").splitlines(True)[:10]),
                    encoding="utf-8")
    return path


def responder(replays: dict[str, dict[str, str]], dimension_of=None, garbage=()):
    """A judge for every kind of request: LLMZoo review prompts get the stored review of their dimension (told
    apart by the rule's first words), pairwise prompts a verdict for the longer answer (the same in both orders),
    single prompts a rating; questions in ``garbage`` get an unparseable text."""
    def answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        question = llmzoo_question(user)
        if question is not None:
            if question in garbage:
                return GARBAGE
            dimension = "relevance" if "[System]\nRelevance:" in user else "general"
            return replays[dimension][question]
        if "=== Answer of assistant A ===" in user:
            a = user.split("=== Answer of assistant A ===")[1].split("=== End of assistant A's answer ===")[0]
            b = user.split("=== Answer of assistant B ===")[1].split("=== End of assistant B's answer ===")[0]
            return "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
        if "Rating" in user or "rating" in user:
            return f"Rating: [[{len(user) % 9 + 1}]]"
        return f"An answer to: {user[:40]}"
    return answer


def flags(judge: FakeJudge, questions: Path, out: Path, *extra: str, dimensions=("general", "relevance"),
          modes=("single", "pairwise")) -> list[str]:
    return ["--question_file", str(questions), "--answer_files", *map(str, ANSWERS), "--rules", str(RULES),
            "--dimensions", *dimensions, *(["--judge_modes", *modes] if modes else []),
            *(["--baseline", "gpt-3.5-turbo"] if "pairwise" in modes else []),
            "--judge_base_url", judge.url, "--judge_model", "gpt-3.5-turbo", "--bootstrap", "100",
            "--output_dir", str(out), *extra]


def in_process(args: list[str], capsys) -> tuple[int, dict | None, str]:
    """eval/run.py's main in this process, as its command line runs it: (exit code, stdout JSON, stderr)."""
    try:
        run(run_script.main, args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and link under ``root``: bytes (a link: its target) and mtime."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("->", os.readlink(path), st.st_mtime_ns)
        elif path.is_file():
            out[str(path.relative_to(root))] = (path.read_bytes(), st.st_mtime_ns)
    return out


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG whose chunks are whole and whose CRCs hold (else AssertionError)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, kinds, size = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    return size


def run_folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    return folder


def cached_responses(folder: Path) -> int:
    """Whole responses in the run's judge cache."""
    path = folder / "cache" / "judge_cache.jsonl"
    if not path.is_file():
        return 0
    keys = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keys.add(json.loads(line)["key"])
        except (ValueError, KeyError, TypeError):
            pass
    return len(keys)


# -- one run, then the identical command -------------------------------------------------------------------------


def test_a_run_writes_every_file_and_the_identical_command_sends_nothing(tmp_path, questions, replays, capsys,
                                                                          monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "runs"
    with FakeJudge(responder=responder(replays)) as judge:
        code, summary, err = in_process(flags(judge, questions, out), capsys)
        assert code == 0, err
        # 10 questions: 2 dimensions x 10 reviews, 4 models x 10 ratings, 3 pairs x 2 orders x 10 verdicts.
        assert judge.requests == 20 + 40 + 60
        assert all(h.get("authorization") == f"Bearer {SECRET}" for h in judge.headers)
        folder = run_folder(out)
        assert folder.name == summary["fingerprint"][:12] == summary["run"]
        assert os.readlink(out / "latest") == folder.name

        for name in ("config.json", "summary.json", "results.md", "results.csv", "rankings.png", "pipeline.json",
                     "review/general/review.jsonl", "review/general/metric.json", "review/general/ordering.txt",
                     "review/relevance/review.jsonl", "review/relevance/metric.json",
                     "review/relevance/ordering.txt", "judge/single/judgments.jsonl",
                     "judge/pairwise/judgments.jsonl", "judge/pairwise/battles.jsonl",
                     "rankings/review-general.png", "rankings/review-relevance.png", "rankings/judge-pairwise.png"):
            assert (folder / name).is_file(), name
        width, height = png_size(folder / "rankings.png")
        assert width > 300 and height > 100
        for png in (folder / "rankings").iterdir():
            png_size(png)
        assert json.loads((folder / "summary.json").read_text()) == summary
        meta = json.loads((folder / "pipeline.json").read_text())
        assert meta["complete"] is True and meta["stage"] == "eval_run" and meta["fingerprint"] == summary["fingerprint"]
        assert "summary.json" in meta["files"] and "review/general/review.jsonl" in meta["files"]

        # The summary: inputs with their hashes, the judge, the counts, the scores, rankings with intervals.
        assert summary["judge"] == {"base_url": judge.url, "model": "gpt-3.5-turbo"}
        assert summary["models"] == MODELS
        assert summary["inputs"]["question_file"]["sha256"] == hashlib.sha256(questions.read_bytes()).hexdigest()
        assert [a["file"]["sha256"] for a in summary["inputs"]["answer_sets"]] == [
            hashlib.sha256(p.read_bytes()).hexdigest() for p in ANSWERS]
        assert summary["inputs"]["rules"]["sha256"] == hashlib.sha256(RULES.read_bytes()).hexdigest()
        assert summary["requests"]["total"]["requests"] == 120 == summary["requests"]["last_invocation"]["requests"]
        assert summary["requests"]["total"]["failed"] == 0 and summary["requests"]["total"]["cached"] == 0
        assert {k: v["count"] for k, v in summary["unparsed"].items()} == {
            "review/general": 0, "review/relevance": 0, "judge/single": 0, "judge/pairwise": 0}
        general = summary["scores"]["review/general"]
        assert general["reference"] == "gpt-3.5-turbo" and general["counted"] == 10
        metric = json.loads((folder / "review/general/metric.json").read_text())
        assert general["models"]["chimera-13b"]["mean_rank"] == metric["chimera-13b"]["order"]["model"]
        assert set(summary["scores"]["judge/single"]["models"]) == set(MODELS)
        ranks = summary["rankings"]
        assert set(ranks["sources"]) == {"review/general", "review/relevance", "judge/pairwise"}
        assert ranks["pooled"]["battles"] == sum(s["battles"] for s in ranks["sources"].values())
        for result in [s["result"] for s in ranks["sources"].values()] + [ranks["pooled"]["result"]]:
            assert list(result["models"]) and all(m["bt"]["ci_low"] <= m["bt"]["rating"] <= m["bt"]["ci_high"]
                                                  for m in result["models"].values())
        assert summary["checks"]["passed"] is True

        # The tables: results.md is what was printed; results.csv has the same figures, one per row.
        table = (folder / "results.md").read_text()
        assert table.rstrip("\n") in err
        assert "| chimera-13b |" in table and "## Ranking: pooled" in table
        rows = (folder / "results.csv").read_text().splitlines()
        assert rows[0] == "table,source,model,metric,value,ci_low,ci_high"
        assert any(r.startswith("ranking,pooled,chimera-13b,bt,") for r in rows)
        assert f"score,review/general,chimera-13b,mean_rank,{metric['chimera-13b']['order']['model']},," in rows

        # The key went in the header and nowhere else; config.json names its variable.
        config = json.loads((folder / "config.json").read_text())
        assert config["judge_api_key_env"] == "OPENAI_API_KEY" and config["dimensions"] == ["general", "relevance"]
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path

        before = snapshot(tmp_path)
        code, again, err = in_process(flags(judge, questions, out), capsys)
        assert code == 0, err
        assert judge.requests == 120, "the identical command sent requests"
        assert "already holds this run" in err and "nothing sent" in err and table.rstrip("\n") in err
        assert again == summary
        assert snapshot(tmp_path) == before, "the identical command changed a file"

        # The resolved config is a config: the same run again, from any directory.
        code, _, err = in_process(["--config", str(folder / "config.json")], capsys)
        assert code == 0 and "nothing sent" in err and judge.requests == 120
        assert snapshot(tmp_path) == before


# -- killed, concurrent, failed ----------------------------------------------------------------------------------


def test_a_killed_run_resumes_with_only_the_missing_requests_and_a_concurrent_one_is_refused(
        tmp_path, questions, replays, capsys):
    """The run is killed (SIGKILL) half way, while a second invocation on the same folder is refused on its
    lock; the identical command then sends only the requests whose answers the killed run never received."""
    out = tmp_path / "runs"
    with FakeJudge(responder=responder(replays), delay=0.1) as judge:
        args = flags(judge, questions, out, "--concurrency", "2", modes=())
        proc = subprocess.Popen([sys.executable, "eval/run.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while judge.requests < 4 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode()
            code, report, err = in_process(args, capsys)
            assert code == 1 and report is None and "in use by another run" in err
            while judge.requests < 8 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        folder = run_folder(out)
        assert json.loads((folder / "pipeline.json").read_text())["complete"] is False
        assert not (out / "latest").exists() and not (folder / "summary.json").exists()
        received = cached_responses(folder)
        assert 0 < received < 20
        sent_before = judge.requests

        code, summary, err = in_process(args, capsys)
        assert code == 0, err
        assert judge.requests - sent_before == 20 - received
        assert summary["requests"]["last_invocation"]["requests"] == 20 - received
        assert os.readlink(out / "latest") == folder.name
        for dimension in ("general", "relevance"):
            lines = (folder / "review" / dimension / "review.jsonl").read_text().splitlines()
            assert [json.loads(line)["question_id"] for line in lines] == list(range(1, 11))


def test_failed_requests_leave_the_run_unfinished_and_the_next_invocation_asks_only_them(
        tmp_path, questions, replays, capsys):
    out = tmp_path / "runs"
    with FakeJudge(responder=responder(replays)) as judge:
        judge.fail(Fault.http(400, "fake judge: refused"), Fault.http(400, "fake judge: refused"))
        code, summary, err = in_process(flags(judge, questions, out, modes=("single",)), capsys)
        assert code == 1 and summary is None
        assert "did not finish" in err and "re-run the same command" in err and "fake judge: refused" in err
        folder = run_folder(out)
        assert json.loads((folder / "pipeline.json").read_text())["complete"] is False
        assert not (out / "latest").exists() and not (folder / "summary.json").exists()
        assert judge.requests == 20 + 40

        code, summary, err = in_process(flags(judge, questions, out, modes=("single",)), capsys)
        assert code == 0, err
        assert judge.requests == 62 and summary["requests"]["last_invocation"]["requests"] == 2
        assert summary["requests"]["total"]["failed"] == 0
        assert os.readlink(out / "latest") == folder.name


# -- unparseable outputs ------------------------------------------------------------------------------------------


def test_unparsed_outputs_are_kept_counted_and_bounded_by_max_unparsed_and_strict(tmp_path, questions, replays,
                                                                                    capsys):
    """One of 10 general reviews unparseable (10% > 5%): kept verbatim with order [-1]*4, counted in summary.json
    and on stderr; the run writes everything, points latest at it and exits 1. The same run with --max_unparsed
    0.2 passes (nothing sent, nothing written); --strict fails again."""
    texts = [json.loads(line)["text"] for line in questions.read_text().splitlines()]
    out = tmp_path / "runs"
    with FakeJudge(responder=responder(replays, garbage={texts[3]})) as judge:
        code, summary, err = in_process(flags(judge, questions, out, modes=("single",)), capsys)
        assert code == 1
        folder = run_folder(out)
        assert os.readlink(out / "latest") == folder.name
        assert json.loads((folder / "pipeline.json").read_text())["complete"] is True
        for name in ("summary.json", "results.md", "results.csv", "rankings.png", "config.json"):
            assert (folder / name).is_file(), name
        # review/relevance got the same question's garbage too: both dimensions show one of ten.
        assert summary["unparsed"]["review/general"]["count"] == summary["unparsed"]["review/relevance"]["count"] == 1
        assert summary["unparsed"]["review/general"]["fraction"] == pytest.approx(0.1)
        example = summary["unparsed"]["review/general"]["examples"][0]
        assert example["question_id"] == 4 and example["reason"]
        assert summary["checks"]["passed"] is False
        assert "review/general: 1 of 10 judge output(s) (10.0%) could not be parsed" in err
        assert "more than --max_unparsed 0.05" in err
        kept = [json.loads(line) for line in (folder / "review/general/review.jsonl").read_text().splitlines()]
        bad = [r for r in kept if r["question_id"] == 4]
        assert bad[0]["text"] == GARBAGE and bad[0]["order"] == [-1] * 4 and bad[0]["parse_error"]
        assert summary["rankings"]["sources"]["review/general"]["reviews_without_order"] == 1
        assert summary["steps"]["judge/single"]["unparsed"] == 0
        sent = judge.requests

        before = snapshot(tmp_path)
        code, again, err = in_process(flags(judge, questions, out, "--max_unparsed", "0.2", modes=("single",)),
                                      capsys)
        assert code == 0, err
        assert again["checks"]["passed"] is True and "nothing sent" in err
        code, again, err = in_process(flags(judge, questions, out, "--max_unparsed", "0.2", "--strict",
                                            modes=("single",)), capsys)
        assert code == 1 and "--strict: review/general" in err
        assert judge.requests == sent and snapshot(tmp_path) == before


# -- bad inputs ----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_file_and_line_before_any_request(tmp_path, questions, replays, capsys):
    broken_questions = tmp_path / "q-broken.jsonl"
    lines = questions.read_text().splitlines()
    broken_questions.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:] + [lines[0]]) + "\n")
    partial = tmp_path / "answer_partial.jsonl"
    rows = ANSWERS[1].read_text().splitlines()
    partial.write_text("\n".join(rows[:4] + rows[5:10] + [rows[0]]) + "\n")  # 1 twice
    out = tmp_path / "runs"
    with FakeJudge(responder=responder(replays)) as judge:
        args = flags(judge, broken_questions, out)
        code, _, err = in_process(args, capsys)
        assert code == 1
        assert f"{broken_questions}:3: not" in err and f"{broken_questions}:12: duplicate question_id 1" in err
        args = flags(judge, questions, out)
        args[args.index(str(ANSWERS[1]))] = str(partial)
        code, _, err = in_process(args, capsys)
        assert code == 1
        assert f"{partial}:10: duplicate question_id 1" in err and err.count(f"{partial}:10:") == 1
        missing = tmp_path / "answer_missing.jsonl"
        missing.write_text("\n".join(rows[:4] + rows[5:10]) + "\n")
        args[args.index(str(partial))] = str(missing)
        code, _, err = in_process(args, capsys)
        assert code == 1 and f"{missing}: no answer to 1 of the 10 questions: question_id 5" in err
        args = flags(judge, questions, out)
        args[args.index("--baseline") + 1] = "nobody"
        code, _, err = in_process(args, capsys)
        assert code == 1 and "--baseline 'nobody' is not among the models of --answer_files" in err

        config = tmp_path / "bad.json"
        config.write_text(json.dumps({"question_file": str(questions), "answer_files": [str(p) for p in ANSWERS],
                                      "dimension": ["general"], "bootstrap": "many",
                                      "judge_base_url": judge.url, "judge_model": "m", "output_dir": str(out)}))
        code, _, err = in_process(["--config", str(config)], capsys)
        assert code == 2
        assert "unknown key 'dimension' (did you mean 'dimensions'?)" in err and "bootstrap expects an integer" in err

        spec = {"model_id": "mine", "judge_base_url": judge.url, "judge_model": "m", "max_new_token": 8}
        config.write_text(json.dumps({"question_file": str(questions), "answer_files": [str(ANSWERS[0]), spec],
                                      "dimensions": ["general"], "rules": str(RULES), "judge_base_url": judge.url,
                                      "judge_model": "m", "output_dir": str(out)}))
        code, _, err = in_process(["--config", str(config)], capsys)
        assert code == 1
        assert "--answer_files entry 2: unknown key 'max_new_token' (did you mean 'max_new_tokens'?)" in err
        assert judge.requests == 0
    assert not out.exists()


# -- a config file, answers made in the run ------------------------------------------------------------------------


def test_a_config_file_with_relative_paths_and_answers_made_in_the_run(tmp_path, questions, replays, capsys):
    """The config's paths are read from its folder; its second answer set is made by eval/answer.py against an
    endpoint; the run's name is its fingerprint, so the same settings in YAML (or the run's own config.json)
    find the same, finished run. A flag on the command line wins over the file."""
    conf = tmp_path / "conf"
    conf.mkdir()
    out = tmp_path / "runs"

    def judge_or_answer(body: dict) -> str:
        user = body["messages"][-1]["content"]
        if llmzoo_question(user) is not None:
            return "Assistant 2 > Assistant 1"
        if "Rating" in user:
            return "Rating: [[6]]"
        return f"A short answer to: {user}"

    with FakeJudge(responder=judge_or_answer) as judge:
        settings = {
            "question_file": os.path.relpath(questions, conf),
            "answer_files": [os.path.relpath(ANSWERS[0], conf),
                             {"model_id": "echo", "judge_base_url": judge.url, "judge_model": "echo-1",
                              "max_new_tokens": 32}],
            "rules": os.path.relpath(RULES, conf), "dimensions": ["general"], "judge_modes": ["single"],
            "judge_base_url": judge.url, "judge_model": "judge-1", "bootstrap": 50, "output_dir": "../runs",
        }
        (conf / "eval.json").write_text(json.dumps(settings, indent=2))
        code, summary, err = in_process(["--config", str(conf / "eval.json")], capsys)
        assert code == 0, err
        folder = out / summary["run"]
        assert folder.is_dir() and summary["run"] == summary["fingerprint"][:12]
        answers = [json.loads(line) for line in (folder / "answers" / "answer_echo.jsonl").read_text().splitlines()]
        assert len(answers) == 10 and all(a["model_id"] == "echo" and a["text"].startswith("A short answer to")
                                          for a in answers)
        # 10 answers, 10 reviews, 20 ratings.
        assert judge.requests == 40 and summary["steps"]["answers/echo"]["requests"]["requests"] == 10
        assert summary["models"] == ["gpt-3.5-turbo", "echo"]
        generated = summary["inputs"]["answer_sets"][1]["generated"]
        assert generated["model"] == {"endpoint": judge.url, "model": "echo-1"} and generated["key"]
        assert summary["scores"]["review/general"]["models"]["echo"]["vs_reference"]["wins"] == 10
        config = json.loads((folder / "config.json").read_text())
        assert config["question_file"] == str(questions) and config["output_dir"] == str(out)
        assert config["answer_files"][1]["model_id"] == "echo"

        try:
            import yaml
        except ImportError:
            yaml = None
        if yaml is not None:
            (conf / "eval.yaml").write_text(yaml.safe_dump(settings))
        before = snapshot(tmp_path)
        if yaml is not None:
            code, again, err = in_process(["--config", str(conf / "eval.yaml")], capsys)
            assert code == 0 and "nothing sent" in err and again["run"] == summary["run"]
        code, again, err = in_process(["--config", str(folder / "config.json")], capsys)
        assert code == 0 and "nothing sent" in err and again["run"] == summary["run"]
        assert judge.requests == 40 and snapshot(tmp_path) == before

        # The command line wins over the file: another bootstrap is another run, in another folder (with a cache
        # of its own, so everything is asked again there).
        code, other, err = in_process(["--config", str(conf / "eval.json"), "--bootstrap", "20",
                                       "--run_name", "fewer-resamples"], capsys)
        assert code == 0, err
        assert other["run"] == "fewer-resamples" and other["rankings"]["sources"]["review/general"]["result"][
            "bootstrap"]["rounds"] == 20
        assert os.readlink(out / "latest") == "fewer-resamples"
        assert generated["key"] == other["inputs"]["answer_sets"][1]["generated"]["key"]
        assert other["inputs"]["answer_sets"][1]["generated"]["file"]["sha256"]

        # The same name for other settings: refused; with --overwrite, replaced (its judge cache is kept, so
        # nothing is asked again).
        sent = judge.requests
        named = ["--config", str(conf / "eval.json"), "--bootstrap", "30", "--run_name", "fewer-resamples"]
        code, _, err = in_process(named, capsys)
        assert code == 1 and "holds a different eval_run output" in err and "--overwrite" in err
        code, replaced, err = in_process([*named, "--overwrite"], capsys)
        assert code == 0, err
        assert replaced["rankings"]["sources"]["review/general"]["result"]["bootstrap"]["rounds"] == 30
        assert judge.requests == sent and replaced["requests"]["last_invocation"]["cached"] == 40


# -- a real judge ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
def test_serve_py_as_the_judge_its_unparseable_verdicts_are_counted_and_kept(tmp_path):
    """serve.py serving stories260K judges a 3-question, 2-answer LLMZoo review (a short rule of ours, so that
    the prompt fits the model's 512 tokens). The model writes children's stories, not verdicts: every review is
    kept with its text and order [-1, -1], counted in summary.json and on stderr, and the run writes every file
    and exits 1 on --max_unparsed. It needs the real server (a subprocess loading a model), hence slow."""
    from serving import start_server

    questions = tmp_path / "questions-3.jsonl"
    questions.write_text("".join((ZOO / "questions-en.jsonl").read_text(encoding="utf-8").splitlines(True)[:3]))
    answers = []
    for model, text in (("short", "Plan your day and rest."), ("shorter", "Sleep.")):
        path = tmp_path / f"answer_{model}.jsonl"
        path.write_text("".join(json.dumps({"question_id": i, "text": text, "answer_id": f"{model}-{i}",
                                            "model_id": model}) + "\n" for i in (1, 2, 3)))
        answers.append(str(path))
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"brief": {"role": "Assistant", "prompt": "Give the order of the {num_str} "
                                           "answers, best first, as: Assistant 1 > Assistant 2."}}))
    out = tmp_path / "runs"
    # A conversation template: the review has a system message (alpaca, the model's default, has none).
    with start_server("--base_model", str(STORIES), "--model_name", "stories", "--prompt_template",
                      "vicuna_v1.1") as server:
        proc = subprocess.run([sys.executable, "eval/run.py", "--question_file", str(questions), "--answer_files",
                               *answers, "--rules", str(rules), "--dimensions", "brief", "--review_max_tokens", "24",
                               "--judge_base_url", server.url + "/v1", "--judge_model", "stories",
                               "--bootstrap", "100", "--output_dir", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout.strip(), proc.stderr
    summary = json.loads(proc.stdout)
    folder = out / summary["run"]
    assert os.readlink(out / "latest") == summary["run"]
    for name in ("config.json", "summary.json", "results.md", "results.csv", "rankings.png", "pipeline.json",
                 "review/brief/review.jsonl", "review/brief/metric.json", "review/brief/ordering.txt"):
        assert (folder / name).is_file(), name
    png_size(folder / "rankings.png")
    assert summary["unparsed"]["review/brief"]["count"] == 3 and summary["steps"]["review/brief"]["failed"] == 0
    assert summary["requests"]["total"]["requests"] == 3
    records = [json.loads(line) for line in (folder / "review/brief/review.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(isinstance(r["text"], str) and r["order"] == [-1, -1] and r["parse_error"]
                                     for r in records)
    assert summary["rankings"]["sources"]["review/brief"]["result"] is None
    assert "review/brief: 3 of 3 judge output(s) could not be parsed" in proc.stderr
    assert "more than --max_unparsed 0.05" in proc.stderr
    assert (folder / "results.md").read_text().rstrip("\n") in proc.stderr


@pytest.mark.skipif(not STORIES.is_dir(), reason=f"stories260K not found at {STORIES}")
def test_the_example_config_is_valid():
    """examples/eval_run.json (paths into ../shared, read from its folder) passes every check a run makes before
    its first request: the flags, the files, the rules of each dimension, the answer set made by stories260K."""
    args = run_script.RunArgs.from_flags(run_script.resolve_flags(
        {**run_script.flag_defaults(), "config": str(REPO / "examples" / "eval_run.json")}))
    assert args.problems() + run_script.cross_problems(args) == []
    plan = run_script.plan_run(args)
    assert plan.models == ["gpt-3.5-turbo", "phoenix-7b", "chimera-13b", "stories260K"]
    assert args.folder.output_dir == str(REPO / "runs" / "eval")
