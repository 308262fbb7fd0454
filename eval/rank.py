"""Rank models from pairwise battles: online Elo and Bradley-Terry, each with bootstrap 95% intervals.

A mean rank says which model came first, not whether the data can tell two models apart: on LLMZoo's English
``general`` reviews the mean rank puts chimera-13b (1.643) ahead of gpt-3.5-turbo (1.757), while a
Bradley-Terry fit on the same 420 pairwise outcomes puts the two within 3 points with overlapping intervals.
This script reports the ratings with their intervals, a rank that models the data cannot separate share, and
each model against the next one down (the difference, its interval, how often the order holds under
resampling). The algorithms are ``utils.evaluation.ranking``'s.

Inputs, any number of each (``--battles a.jsonl b.jsonl`` or ``--battles=a.jsonl,b.jsonl``):

* ``--battles``: JSONL (or a JSON array) of ``{model_a, model_b, winner}`` records, the fields of FastChat's
  arena battles (``winner``: ``a`` / ``b`` / ``tie``, or FastChat's ``model_a`` / ``model_b`` / ``tie (bothbad)``);
* ``--review_file``: LLMZoo ``review.jsonl`` files (order mode): each review of n models
  (``metadata.model_ids``) gives n(n-1)/2 battles from its stored ``order``, the lower rank winning and equal
  ranks tying; a review whose order holds -1 (the judge's text did not parse) gives none and is counted, and
  so does one in the categories ``coding`` and ``math``, which LLMZoo's metric skips.

Online Elo plays the battles in the order read (the ``--battles`` files, then the ``--review_file`` files, each
from its first line); Bradley-Terry does not depend on the order. A bad line in any file stops the run before
any fit, named with its file:line.

The report (JSON, on stdout; the table on stderr): per model the Bradley-Terry and Elo ratings with their
intervals, battles, wins / ties / losses, ``rank`` and ``rank_ci``; the adjacent differences; the inputs (path,
size, sha256, battles, reviews without an order). With ``--output_dir`` it is also written there with
``battles.jsonl`` (every battle with the file:line it came from), ``rankings.png`` (the ratings with their
interval bars) and ``pipeline.json``; an identical re-run is a no-op.

Examples:
    python eval/rank.py --review_file ../shared/data/llmzoo/reviews/en/general/review.jsonl
    python eval/rank.py --battles runs/judge/battles.jsonl --bootstrap 2000 --seed 1 --output_dir runs/rankings
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.args import Group, StageArgs, unfingerprinted  # noqa: E402
from utils.artifacts import sha256_json, write_json  # noqa: E402
from utils.cli import run  # noqa: E402
from utils.errors import UsageError  # noqa: E402
from utils.evaluation.stage import REPORT_FILE, Destination, EvalOutput, emit, file_record  # noqa: E402
from utils.evaluation.ranking import Resampling  # noqa: E402
from utils.jsonl import line_refs, write_jsonl  # noqa: E402

STAGE = "rank"
PLOT_FILE = "rankings.png"
BATTLES_FILE = "battles.jsonl"
#: The most file:line entries a report lists per kind (the counts are always whole; battles.jsonl has every row).
LISTED = 100
#: Bootstrap rounds beyond which the run is refused (a typo like 1000000 would run for minutes).


@dataclass(frozen=True)
class Inputs(Group):
    """The battle files and review files, in the order their battles are played."""

    battles: list[str] = unfingerprinted((), why="counts as its content (each file's hash, in order, among the "
                                              "inputs)")
    review_file: list[str] = unfingerprinted((), why="counts as its content (each file's hash, in order, among "
                                                  "the inputs)")

    def problems(self) -> list[str]:
        problems = []
        if not self.battles and not self.review_file:
            problems.append("give --battles FILE and/or --review_file FILE (nothing to rank)")
        for flag, paths in (("--battles", self.battles), ("--review_file", self.review_file)):
            problems += [f"{flag} {p}: no such file" for p in paths if not Path(p).is_file()]
        named = [str(Path(p).resolve()) for p in (*self.battles, *self.review_file)]
        twice = sorted({p for p in named if named.count(p) > 1})
        if twice:
            problems.append(f"a file is named twice (its battles would count twice): {', '.join(twice)}")
        return problems


@dataclass(frozen=True)
class RankArgs(StageArgs):
    STAGE = STAGE

    inputs: Inputs
    resampling: Resampling
    destination: Destination


Args = RankArgs


def main(
    *,
    battles: list[str] = (),
    review_file: list[str] = (),
    bootstrap: int = 1000,
    seed: int = 0,
    output_dir: str = "",
    overwrite: bool = False,
) -> None:
    """Rank models from pairwise battles: online Elo and Bradley-Terry with bootstrap 95% intervals.

    Args:
        battles: JSONL (or JSON array) files of {model_a, model_b, winner} records (winner a, b or tie; FastChat's
            model_a, model_b, tie (bothbad) too).
        review_file: LLMZoo review.jsonl files (order mode): each review of n models gives n(n-1)/2 battles, the
            lower rank winning, equal ranks tying; a review whose order is -1, or in the categories coding and
            math (which LLMZoo's metric skips), gives none and is counted.
        bootstrap: Resamples of the battles behind the 95% intervals (0: ratings only).
        seed: Seed of the resampling.
        output_dir: Also write the report (report.json, battles.jsonl, rankings.png, pipeline.json) into this
            folder; an identical re-run is then a no-op.
        overwrite: Replace a different report in --output_dir.
    """
    args = RankArgs.from_flags(dict(locals()))
    problems = args.problems()
    if problems:
        raise UsageError("\n".join(problems))
    out = EvalOutput(args.destination, STAGE)  # a folder this stage may not write is refused before any work
    from utils.evaluation.ranking import LEVEL, PRIOR

    files = [("battles", p) for p in args.inputs.battles] + [("reviews", p) for p in args.inputs.review_file]
    inputs = [{"kind": kind, **file_record(path)} for kind, path in files]
    fp = fingerprint(args, {"files": [[f["kind"], f["sha256"]] for f in inputs],
                            "method": {"prior": PRIOR, "level": LEVEL}})
    stored = out.finished(fp)
    if stored is not None:
        return emit(stored)
    report, table = evaluate(args, files, inputs)
    if out.out is not None:
        from utils.evaluation.ranking import plot_rankings

        # EvalOutput.write's life cycle (staged folder, pipeline.json last, one rename), with the figure added.
        with out.out.produce(fp, args=args.flags(), inputs=inputs) as st:
            write_json(st.dir / REPORT_FILE, report)
            write_jsonl(st.dir / BATTLES_FILE, table)
            plot_rankings(report, st.dir / PLOT_FILE)
        print(f"{STAGE}: wrote {out.out.path}", file=sys.stderr)
    emit(report)


def evaluate(args: RankArgs, files: list[tuple[str, str]], inputs: list[dict]) -> tuple[dict, list[dict]]:
    """(the report, one row per battle), with the table and what was skipped said on stderr."""
    from utils.evaluation.ranking import (SKIPPED_CATEGORIES, rankings, rankings_table, read_battles,
                                          read_review_battles)

    sources = [read_battles(path, "--battles") if kind == "battles" else read_review_battles(path, "--review_file")
               for kind, path in files]
    for record, source in zip(inputs, sources):
        record["records"] = source.records
        record["battles"] = len(source.battles)
        if source.unparsed is not None:
            record["reviews_without_order"] = len(source.unparsed)
            record["reviews_without_order_lines"] = source.unparsed[:LISTED]
            record["reviews_skipped"] = len(source.skipped)
            record["reviews_skipped_lines"] = source.skipped[:LISTED]
            if source.unparsed:
                print(f"{STAGE}: {len(source.unparsed)} of {source.records} review(s) have no parsed order (-1) "
                      f"and give no battle: {line_refs(source.path, source.unparsed)}", file=sys.stderr)
            if source.skipped:
                print(f"{STAGE}: {len(source.skipped)} of {source.records} review(s) are in the categories "
                      f"{' and '.join(SKIPPED_CATEGORIES)}, which LLMZoo's metric skips, and give no battle: "
                      f"{line_refs(source.path, source.skipped)}", file=sys.stderr)
    battles = [b for source in sources for b in source.battles]
    table = [{"model_a": a, "model_b": b, "winner": w, "source": f"{source.path}:{line}"}
             for source in sources for (a, b, w), line in zip(source.battles, source.lines)]
    result = rankings(battles, bootstrap=args.resampling.bootstrap, seed=args.resampling.seed)
    if not result["bt"]["mle_exists"]:
        print(f"{STAGE}: the battles split the models into groups ("
              f"{' | '.join(', '.join(part) for part in result['bt']['components'])}) between which every battle "
              f"went the same way: Bradley-Terry's maximum likelihood does not exist, and the gaps between the "
              f"groups rest on the prior of {result['bt']['prior']} virtual tie(s) per pair", file=sys.stderr)
    if result["bootstrap"]["degenerate_rounds"]:
        print(f"{STAGE}: {result['bootstrap']['degenerate_rounds']} of {result['bootstrap']['rounds']} bootstrap "
              f"resamples had no maximum-likelihood fit (a model, or a group, that never lost or never won "
              f"there); their ratings rest on the prior", file=sys.stderr)
    print(rankings_table(result), file=sys.stderr)
    report = {**result, "inputs": inputs}
    return report, table


def fingerprint(args: RankArgs, inputs: dict) -> str:
    """What determines the report: every flag that counts and ``inputs`` (the files' kinds and hashes, in order,
    and the method's constants). Pure: nothing is read."""
    return sha256_json({"args": args.fingerprint_values(), "inputs": inputs})


if __name__ == "__main__":
    run(main)
