"""utils/evaluation/ranking.py and eval/rank.py: online Elo and Bradley-Terry with bootstrap intervals.

The synthetic battles are drawn (seeded) from four models of known Bradley-Terry strengths, so the fit and its
intervals can be checked against the truth; the Elo figures are worked out by hand from FastChat's update rule.
The real-data test reads LLMZoo's stored English ``general`` reviews under ../shared (skipped when absent): the
mean rank there puts chimera-13b ahead of gpt-3.5-turbo, and the fit says the data cannot tell them apart.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA
from utils.cli import run
from utils.errors import SuiteError
from utils.evaluation import ranking
from utils.evaluation.llmzoo import battles_from_order
from utils.evaluation.ranking import (bootstrap, bradley_terry, competition_ranks, online_elo,
                                      plot_rankings, rankings, read_battles, read_review_battles, rankings_table)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "eval" / "rank.py"
GENERAL = DATA / "llmzoo" / "reviews" / "en" / "general"
#: True Bradley-Terry strengths in Elo points; the fit's anchor is the mean, so the truth it should find is
#: each strength minus their mean (150), plus 1000.
TRUE = {"m0": 0.0, "m1": 100.0, "m2": 200.0, "m3": 300.0}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

needs_shared = pytest.mark.skipif(not GENERAL.is_dir(), reason=f"LLMZoo's stored reviews are not at {GENERAL} "
                                  "(the shared data folder beside the repository)")


def load_script():
    """eval/rank.py as a module (eval/ is not a package; dataclasses need it in sys.modules)."""
    if "eval_rank" not in sys.modules:
        spec = importlib.util.spec_from_file_location("eval_rank", SCRIPT)
        module = sys.modules["eval_rank"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["eval_rank"]


def in_process(capsys, *args: str) -> tuple[dict, str]:
    """The script's main as its command line runs it, here (no interpreter start): (report, stderr)."""
    run(load_script().main, list(args))
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def sampled_battles(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` battles, each between two distinct models drawn uniformly, won with Bradley-Terry's probability."""
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    strength = np.array(list(TRUE.values()))
    i = rng.integers(0, len(names), size=n)
    j = (i + rng.integers(1, len(names), size=n)) % len(names)
    won = rng.random(n) < 1 / (1 + 10 ** ((strength[j] - strength[i]) / 400))
    return [(names[a], names[b], "a" if w else "b") for a, b, w in zip(i, j, won)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def review(qid: int, order: list[int], models=("x", "y", "z")) -> dict:
    """An LLMZoo order-mode review record (the fields rank.py reads, plus the rest of LLMZoo's format)."""
    return {"reviewer_id": "gpt-3.5-turbo", "lang": "en", "question_id": qid, "answer_ids": ["?"] * len(models),
            "category": "generic", "metadata": {"question": "q", "answers": ["a"] * len(models),
                                                "model_ids": list(models)},
            "text": "...", "order": order}


# --------------------------------------------------------------------------------------------------
# Bradley-Terry recovers known strengths
# --------------------------------------------------------------------------------------------------


def test_bradley_terry_recovers_known_strengths():
    battles = sampled_battles(4000, seed=0)
    result = rankings(battles, bootstrap=1000, seed=0)
    bt = {name: row["bt"]["rating"] for name, row in result["models"].items()}
    for name, strength in TRUE.items():
        assert abs((bt[name] - bt["m0"]) - strength) < 30, (name, bt)
    assert sum(bt.values()) / len(bt) == pytest.approx(1000, abs=1e-9)  # the anchor: the mean is 1000
    assert list(result["models"]) == ["m3", "m2", "m1", "m0"]
    assert [row["rank"] for row in result["models"].values()] == [1, 2, 3, 4]
    assert [row["rank_ci"] for row in result["models"].values()] == [1, 2, 3, 4]  # 100 points apart: separated
    assert all(pair["ci_low"] > 0 for pair in result["adjacent"])
    assert result["bt"]["mle_exists"] and result["bootstrap"]["degenerate_rounds"] == 0
    # Online Elo (K=4, order-dependent) finds the same order.
    elo = [row["elo"]["rating"] for row in result["models"].values()]
    assert elo == sorted(elo, reverse=True)


def test_the_95_percent_intervals_cover_the_truth_95_percent_of_the_time():
    """One draw's four intervals all cover the truth only about 0.95^4 = 81% of the time, so coverage is counted
    over 40 seeded draws: 160 per-model intervals (the truth: strength - 150 + 1000, the anchor being the mean)
    and 120 intervals of adjacent differences (the truth: 100). Intervals half as wide would cover ~68%."""
    mean = np.mean(list(TRUE.values()))
    covered, covered_diff = [], []
    for seed in range(40):
        result = rankings(sampled_battles(500, seed=100 + seed), bootstrap=300, seed=seed)
        for name, row in result["models"].items():
            covered.append(row["bt"]["ci_low"] <= 1000 + TRUE[name] - mean <= row["bt"]["ci_high"])
        for pair in result["adjacent"]:
            truth = TRUE[pair["ahead"]] - TRUE[pair["behind"]]
            covered_diff.append(pair["ci_low"] <= truth <= pair["ci_high"])
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)
    assert 0.88 <= np.mean(covered_diff) <= 1.0, np.mean(covered_diff)


def test_the_bt_fit_is_the_likelihood_maximum():
    """30 wins, 20 ties and 10 losses of a against b: a scores 40 of 60, odds 2, so 400 log10(2) points apart
    (the default prior of 0.01 virtual ties moves it by a few hundredths of a point)."""
    battles = [("a", "b", "a")] * 30 + [("b", "a", "tie")] * 20 + [("b", "a", "a")] * 10
    exact = bradley_terry(battles, prior=1e-9)
    assert exact["a"] - exact["b"] == pytest.approx(400 * math.log10(2), abs=1e-6)
    assert exact["a"] + exact["b"] == pytest.approx(2000, abs=1e-9)
    default = bradley_terry(battles)
    assert default["a"] - default["b"] == pytest.approx(400 * math.log10(2), abs=0.1)


def test_ties_count_as_half_a_win_each_way():
    one_each = [("a", "b", "a"), ("a", "b", "b")]
    two_ties = [("a", "b", "tie"), ("b", "a", "tie")]
    assert bradley_terry(one_each) == pytest.approx(bradley_terry(two_ties))
    assert bradley_terry(two_ties) == pytest.approx({"a": 1000, "b": 1000})
    # Elo: a tie between equals moves nothing; a tie with a weaker model costs the stronger one.
    assert online_elo([("a", "b", "tie")]) == {"a": 1000, "b": 1000}
    after = online_elo([("a", "b", "a"), ("a", "b", "tie")])
    assert after["a"] < 1002 and after["b"] > 998
    # a: 1 win + 1 tie + 0 losses out of 2 against b with the other order, and the counts say so
    result = rankings([("a", "b", "a"), ("b", "a", "tie"), ("c", "a", "b")], bootstrap=0)
    assert {n: (r["wins"], r["ties"], r["losses"], r["battles"]) for n, r in result["models"].items()} == {
        "a": (2, 1, 0, 3), "b": (0, 1, 1, 2), "c": (0, 0, 1, 1)}


# --------------------------------------------------------------------------------------------------
# Online Elo
# --------------------------------------------------------------------------------------------------


def test_online_elo_against_a_hand_computed_case():
    """FastChat's update, K=4, base 10, scale 400, from 1000:
    1. a beats b, both 1000: expected 0.5 each, so a = 1000 + 4 * 0.5 = 1002, b = 998.
    2. a ties b: a's expected score is 1 / (1 + 10^(-4/400)) = 0.5057562, so a = 1002 + 4 * (0.5 - 0.5057562)
       = 1001.9769752 and b = 998.0230248.
    3. c beats b (winner "b" is model_b): b expects 1 / (1 + 10^(1.9769752/400)) = 0.4971548, so b loses
       4 * 0.4971548 = 1.9886197: b = 996.0344051, c = 1001.9886197."""
    got = online_elo([("a", "b", "a"), ("a", "b", "tie"), ("b", "c", "b")])
    assert list(got) == ["a", "b", "c"]
    assert got == pytest.approx({"a": 1001.9769752, "b": 996.0344051, "c": 1001.9886197}, abs=1e-6)
    assert sum(got.values()) == pytest.approx(3000)  # zero-sum updates
    assert online_elo([("a", "b", "a")], k=32, init=1500) == {"a": 1516, "b": 1484}


def test_online_elo_depends_on_the_order_and_bradley_terry_does_not():
    battles = [("a", "b", "a")] * 5 + [("a", "b", "b")] * 5
    assert online_elo(battles) != online_elo(battles[::-1])
    assert bradley_terry(battles) == pytest.approx(bradley_terry(battles[::-1]))


# --------------------------------------------------------------------------------------------------
# Bootstrap, degenerate data, input checks
# --------------------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_vectorised_fits_match_the_generic_path_and_batches_do_not_matter(monkeypatch):
    battles = sampled_battles(300, seed=3)
    vectorised = bootstrap(battles, online_elo, rounds=40, seed=7)
    generic = bootstrap(battles, lambda b: online_elo(b), rounds=40, seed=7)  # refitted one resample at a time
    for model in vectorised:
        assert vectorised[model] == pytest.approx(generic[model], abs=1e-9)
    bt = bootstrap(battles, bradley_terry, rounds=40, seed=7)
    bt_generic = bootstrap(battles, lambda b: bradley_terry(b), rounds=40, seed=7)
    for model in bt:
        assert bt[model] == pytest.approx(bt_generic[model], abs=1e-6)
    assert bootstrap(battles, bradley_terry, rounds=40, seed=8) != bt
    monkeypatch.setattr(ranking, "CHUNK_CELLS", 1000)  # ~3 rounds per batch: the same resamples
    assert bootstrap(battles, bradley_terry, rounds=40, seed=7) == bt
    for model, ci in bt.items():
        assert ci["ci_low"] < bradley_terry(battles)[model] < ci["ci_high"]


def test_a_thousand_rounds_on_a_thousand_battles_take_well_under_a_few_seconds():
    battles = sampled_battles(1000, seed=1)
    start = time.perf_counter()
    result = rankings(battles, bootstrap=1000, seed=0)
    assert time.perf_counter() - start < 5  # ~0.3 s here; generous for a loaded CI machine
    assert result["bootstrap"]["rounds"] == 1000


def test_a_model_that_never_wins_is_finite_and_flagged():
    battles = [("a", "b", "a"), ("b", "a", "b"), ("a", "b", "tie"), ("c", "a", "b"), ("c", "b", "b")] * 3
    result = rankings(battles, bootstrap=200, seed=0)
    assert not result["bt"]["mle_exists"]
    assert result["bt"]["components"] == [["a", "b"], ["c"]]
    assert list(result["models"]) == ["a", "b", "c"]
    c = result["models"]["c"]["bt"]
    assert all(math.isfinite(v) for v in c.values()) and c["rating"] < 500  # far below, and finite
    assert result["bootstrap"]["degenerate_rounds"] == 200  # c never wins in any resample either
    # Where the data do give a maximum, the rounds without one are counted, not hidden.
    mixed = battles + [("c", "a", "a")]
    assert rankings(mixed, bootstrap=200, seed=0)["bt"]["mle_exists"]
    assert 0 < rankings(mixed, bootstrap=200, seed=0)["bootstrap"]["degenerate_rounds"] < 200


@pytest.mark.parametrize("battles,message", [
    ([("a", "a", "a")], "against itself"),
    ([("a", "b", "model_a")], "winner must be one of a, b, tie"),
    ([("a", "b")], "is not (model_a, model_b, winner)"),
    ([("a", "b", "a")] * 0, "at least two models"),
    ([("a", "", "a")], "non-empty strings"),
])
def test_bad_battles_are_refused(battles, message):
    with pytest.raises(SuiteError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rankings(battles)


def test_competition_ranks():
    assert competition_ranks([3.0, 5.0, 5.0, 1.0]) == [3, 1, 1, 4]


# --------------------------------------------------------------------------------------------------
# LLMZoo orderings as battles, and the files
# --------------------------------------------------------------------------------------------------


def test_an_llmzoo_ordering_gives_its_pairs():
    assert battles_from_order(["w", "x", "y", "z"], [2, 1, 2, 4]) == [
        ("w", "x", "b"), ("w", "y", "tie"), ("w", "z", "a"), ("x", "y", "a"), ("x", "z", "a"), ("y", "z", "a")]
    assert battles_from_order(["x", "y", "z"], [-1, -1, -1]) == []
    assert len(battles_from_order([f"m{i}" for i in range(9)], list(range(1, 10)))) == 36


def test_review_files_read_with_unparsed_reviews_counted_and_bad_lines_named(tmp_path):
    good = write_jsonl(tmp_path / "review.jsonl", [review(1, [1, 2, 2]), review(2, [-1, -1, -1]),
                                                   review(3, [3, 1, 2])])
    got = read_review_battles(str(good))
    assert got.records == 3 and got.unparsed == [2] and got.skipped == [] and got.lines == [1, 1, 1, 3, 3, 3]
    assert got.battles == [("x", "y", "a"), ("x", "z", "a"), ("y", "z", "tie"),
                           ("x", "y", "b"), ("x", "z", "b"), ("y", "z", "a")]
    score = {k: v for k, v in review(4, [1, 2, 3]).items() if k != "order"} | {"score": [7, 8, 9]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [review(1, [1, 2, 2]), "{not json", review(1, [1, 1, 1]),
                                               review(5, [1, 2]), score, review(6, [0, 1, 2])])
    with pytest.raises(SuiteError) as err:
        read_review_battles(str(bad))
    text = str(err.value)
    for expected in (f"not valid JSON: {bad}:2", f"duplicate question_id: {bad}:3", f"differ in length: {bad}:4",
                     f"a score-mode review (no 'order'): rankings take order-mode reviews: {bad}:5",
                     f"ranks must be 1..3 (or all -1 for a review that did not parse): {bad}:6"):
        assert expected in text, text
    assert text.startswith(f"--review_file {bad}: ")
    # coding and math reviews are left out, as LLMZoo's metric leaves them out, and counted.
    math_review = review(7, [1, 2, 3]) | {"category": "math"}
    mixed = read_review_battles(str(write_jsonl(tmp_path / "mixed.jsonl", [math_review, review(8, [1, 2, 3])])))
    assert mixed.skipped == [1] and mixed.lines == [2, 2, 2] and len(mixed.battles) == 3
    none = write_jsonl(tmp_path / "none.jsonl", [review(1, [-1, -1, -1]), math_review])
    with pytest.raises(SuiteError, match="no battle in the file .2 review.s., 1 without a parsed order, 1 in the "
                                         "categories coding and math"):
        read_review_battles(str(none))


def test_battle_files_in_fastchat_form_and_as_a_json_array(tmp_path):
    rows = [{"model_a": "p", "model_b": "q", "winner": "model_a", "judge": "x"},
            {"model_a": "q", "model_b": "p", "winner": "tie (bothbad)"},
            {"model_a": "p", "model_b": "q", "winner": "b"}]
    jsonl = read_battles(str(write_jsonl(tmp_path / "b.jsonl", rows)))
    array = tmp_path / "b.json"
    array.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    assert jsonl.battles == read_battles(str(array)).battles == [("p", "q", "a"), ("q", "p", "tie"), ("p", "q", "b")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"model_a": "p", "winner": "a"},
                                               {"model_a": "p", "model_b": "p", "winner": "a"},
                                               {"model_a": "p", "model_b": "q", "winner": "A"}, "[1]"])
    with pytest.raises(SuiteError) as err:
        read_battles(str(bad))
    for expected in (f"no 'model_b' field: {bad}:2", f"the same model: {bad}:3", "winner must be one of", f"{bad}:4",
                     f"not a JSON object: {bad}:5"):
        assert expected in str(err.value)


# --------------------------------------------------------------------------------------------------
# The real data: LLMZoo's en/general reviews
# --------------------------------------------------------------------------------------------------


@needs_shared
def test_llmzoo_general_mean_rank_order_is_not_a_separation():
    """LLMZoo's ordering.txt: chimera-13b 1.643 ahead of the reference (gpt-3.5-turbo, "turbo") 1.757. On the
    same 420 pairwise outcomes Bradley-Terry puts the two 2.5 points apart (gpt-3.5-turbo the higher, as it
    happens), with overlapping intervals, a shared rank_ci, and a difference whose interval spans 0."""
    source = read_review_battles(str(GENERAL / "review.jsonl"))
    assert len(source.battles) == 420 and source.unparsed == []
    reviews = [json.loads(line) for line in (GENERAL / "review.jsonl").read_text(encoding="utf-8").splitlines()]
    mean_rank = {m: np.mean([r["order"][r["metadata"]["model_ids"].index(m)] for r in reviews])
                 for m in reviews[0]["metadata"]["model_ids"]}
    assert round(mean_rank["chimera-13b"], 3) == 1.643 and round(mean_rank["gpt-3.5-turbo"], 3) == 1.757
    assert "chimera-13b                   1.6428571428571428" in (GENERAL / "ordering.txt").read_text()

    # The prior of 0.01 virtual ties per pair moves the fit by hundredths of a point at most here.
    exact, default = bradley_terry(source.battles, prior=1e-9), bradley_terry(source.battles)
    assert all(abs(default[m] - exact[m]) < 0.02 for m in exact)
    result = rankings(source.battles, bootstrap=1000, seed=0)
    chimera, turbo = result["models"]["chimera-13b"], result["models"]["gpt-3.5-turbo"]
    assert abs(chimera["bt"]["rating"] - turbo["bt"]["rating"]) < 3
    assert chimera["bt"]["ci_low"] < turbo["bt"]["ci_high"] and turbo["bt"]["ci_low"] < chimera["bt"]["ci_high"]
    assert chimera["elo"]["ci_low"] < turbo["elo"]["ci_high"] and turbo["elo"]["ci_low"] < chimera["elo"]["ci_high"]
    assert chimera["rank_ci"] == turbo["rank_ci"] == 1
    first = result["adjacent"][0]
    assert {first["ahead"], first["behind"]} == {"chimera-13b", "gpt-3.5-turbo"}
    assert first["ci_low"] < 0 < first["ci_high"] and 0.3 < first["ahead_share"] < 0.7
    # chimera-7b is last and the data separate it from the rest.
    assert list(result["models"])[-1] == "chimera-7b" and result["models"]["chimera-7b"]["rank_ci"] == 4
    assert all(row["battles"] == 210 for row in result["models"].values())
    table = rankings_table(result)
    assert "gpt-3.5-turbo vs chimera-13b: Bradley-Terry +2.5 [" in table
    assert [row["elo"]["rating"] for row in result["models"].values()] == pytest.approx(
        list(online_elo(source.battles)[m] for m in result["models"]))


# --------------------------------------------------------------------------------------------------
# The figure and the command line
# --------------------------------------------------------------------------------------------------


def test_the_png_is_valid_and_matplotlib_reads_it_back(tmp_path):
    from matplotlib.image import imread

    result = rankings(sampled_battles(400, seed=2), bootstrap=100, seed=0)
    path = plot_rankings(result, tmp_path / "rankings.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    image = imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rankings.png"]  # no temporary left
    plot_rankings(result, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == data  # the same result, the same bytes
    plot_rankings(rankings(sampled_battles(50, seed=2), bootstrap=0), tmp_path / "points.png")  # no intervals
    assert (tmp_path / "points.png").read_bytes().startswith(PNG_MAGIC)


@needs_shared
def test_the_command_line_end_to_end(tmp_path):
    battles = write_jsonl(tmp_path / "battles.jsonl", [{"model_a": "gpt-3.5-turbo", "model_b": "mine", "winner": w}
                                                       for w in ["model_a", "b", "tie", "a", "a"]])
    out = tmp_path / "ranked"
    done = subprocess.run([sys.executable, str(SCRIPT), "--battles", str(battles), "--review_file",
                           str(GENERAL / "review.jsonl"), "--bootstrap", "200", "--output_dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["battles"] == 425 and set(report["models"]) == {"gpt-3.5-turbo", "chimera-13b", "phoenix-7b",
                                                                  "chimera-7b", "mine"}
    assert [f["kind"] for f in report["inputs"]] == ["battles", "reviews"]
    assert report["inputs"][1]["battles"] == 420 and report["inputs"][1]["reviews_without_order"] == 0
    assert report["inputs"][1]["reviews_skipped"] == 0 and "reviews_skipped" not in report["inputs"][0]
    assert report["bootstrap"]["rounds"] == 200
    assert "rank rank_ci  model" in done.stderr and "Bradley-Terry" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["battles.jsonl", "pipeline.json", "rankings.png", "report.json"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    rows = [json.loads(line) for line in (out / "battles.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 425 and rows[0] == {"model_a": "gpt-3.5-turbo", "model_b": "mine", "winner": "a",
                                            "source": f"{battles}:1"}
    assert rows[5]["source"] == f"{GENERAL / 'review.jsonl'}:1"
    assert (out / "rankings.png").read_bytes().startswith(PNG_MAGIC)
    meta = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    assert meta["stage"] == "rank" and set(meta["files"]) == {"battles.jsonl", "rankings.png", "report.json"}


def test_in_process_rerun_is_a_no_op_and_a_different_one_is_refused(tmp_path, capsys):
    battles = write_jsonl(tmp_path / "b.jsonl", [{"model_a": a, "model_b": b, "winner": w}
                                                 for a, b, w in sampled_battles(200, seed=5)])
    out = tmp_path / "out"
    first, err = in_process(capsys, "--battles", str(battles), "--bootstrap", "50", "--output_dir", str(out))
    assert "wrote" in err and list(first["models"])[0] == "m3"
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again, err = in_process(capsys, "--battles", str(battles), "--bootstrap", "50", "--output_dir", str(out))
    assert again == first and "nothing to do" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    with pytest.raises(SystemExit) as exit_:
        in_process(capsys, "--battles", str(battles), "--bootstrap", "50", "--seed", "1", "--output_dir", str(out))
    assert exit_.value.code == 1 and "pass --overwrite" in capsys.readouterr().err
    other, _ = in_process(capsys, f"--battles={battles}", "--bootstrap=50", "--seed=1", f"--output_dir={out}",
                          "--overwrite")
    assert other["bootstrap"]["seed"] == 1 and other["models"] != first["models"]


def test_bad_flags_are_all_reported_before_any_work(tmp_path, capsys):
    battles = write_jsonl(tmp_path / "b.jsonl", [{"model_a": "p", "model_b": "q", "winner": "a"}])
    with pytest.raises(SystemExit) as exit_:
        in_process(capsys, "--battles", f"{battles},{battles}", "--review_file", str(tmp_path / "missing.jsonl"),
                   "--bootstrap", "-1")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    for expected in ("a file is named twice", f"--review_file {tmp_path / 'missing.jsonl'}: no such file",
                     "--bootstrap must be between 0"):
        assert expected in err, err
    with pytest.raises(SystemExit) as exit_:
        in_process(capsys)
    assert exit_.value.code == 2 and "nothing to rank" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"model_a": "p", "model_b": "q", "winner": "a"}, "{torn"])
    with pytest.raises(SystemExit) as exit_:
        in_process(capsys, "--battles", str(bad))
    assert exit_.value.code == 1 and f"not valid JSON: {bad}:2" in capsys.readouterr().err


def test_a_ranking_without_a_likelihood_maximum_is_said_on_stderr(tmp_path, capsys):
    battles = write_jsonl(tmp_path / "b.jsonl", [{"model_a": a, "model_b": b, "winner": w} for a, b, w in
                                                 [("p", "q", "a"), ("q", "p", "a"), ("p", "r", "a"), ("q", "r", "a")]])
    report, err = in_process(capsys, "--battles", str(battles), "--bootstrap", "20")
    assert not report["bt"]["mle_exists"] and report["bt"]["components"] == [["p", "q"], ["r"]]
    assert "(p, q | r) between which every battle went the same way" in err
    assert "20 of 20 bootstrap resamples had no maximum-likelihood fit" in err
