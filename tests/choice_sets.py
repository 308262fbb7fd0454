"""A small multiple-choice benchmark, and writers for it in MMLU's, C-Eval's and the JSONL layout.

Each question is a plain dict ``{subject, question, choices, answer (0-based int), split}``; the writers lay
a list of them out as the real benchmarks do, so that the readers (and eval/multiple_choice.py) can be tested
on the same questions in every format. ``twelve_questions()`` is the shared set: 3 subjects, each with 2 dev
and 2 test rows, holding what a CSV writer must quote (commas, double quotes, newlines), Chinese text, a
question with surrounding spaces (the prompt strips it) and a choice with a leading space (kept as is).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

LETTERS = "ABCDEFGHIJ"


def twelve_questions() -> list[dict]:
    """The shared 12-question, 3-subject set (a fresh copy each call)."""
    rows = [
        ("abstract_algebra", "dev", "Find the order of the group Z_4.", ["1", "2", "3", "4"], 3),
        ("abstract_algebra", "dev", "Is every cyclic group abelian, yes or no?", ["yes", "no", "only if finite",
                                                                                  "only if infinite"], 0),
        ("abstract_algebra", "test", 'Which, of "these", is a field?', ["Z", "Q", "Z_4", "2Z"], 1),
        ("abstract_algebra", "test", "  How many elements has S_3?  ", [" 6", "3", "9", "1"], 0),
        ("high_school_mathematics", "dev", "What is 2 + 2?\nGive one number.", ["3", "4", "5", "22"], 1),
        ("high_school_mathematics", "dev", "Solve x^2 = 9, x > 0.", ["-3", "0", "3", "9"], 2),
        ("high_school_mathematics", "test", "Line one,\nline two, \"quoted\"\n\nafter a blank line?",
         ["a,b", "c\nd", '"e"', "f"], 3),
        ("high_school_mathematics", "test", "What is 10 / 4?", ["2", "2.5", "3", "4"], 1),
        ("world_religions", "dev", "下列哪一项是正确的？", ["甲", "乙", "丙", "丁"], 2),
        ("world_religions", "dev", "Which city is holy in three religions?", ["Rome", "Jerusalem", "Mecca",
                                                                            "Varanasi"], 1),
        ("world_religions", "test", "Where was the Buddha born?", ["Lumbini", "Delhi", "Lhasa", "Kyoto"], 0),
        ("world_religions", "test", "以下哪个节日，在春天？",
         ["春节", "中秋节", "重阳节", "冬至"], 0),
    ]
    return [{"subject": s, "split": split, "question": q, "choices": c, "answer": a} for s, split, q, c, a in rows]


def _by_file(questions: list[dict]) -> dict[tuple[str, str], list[dict]]:
    files: dict[tuple[str, str], list[dict]] = {}
    for q in questions:
        files.setdefault((q["subject"], q["split"]), []).append(q)
    return files


def _csv_path(folder: Path, subject: str, split: str, nested: bool) -> Path:
    path = Path(folder) / (split if nested else "") / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_mmlu(folder: str | Path, questions: list[dict], nested: bool = False) -> Path:
    """Hendrycks' layout: headerless ``question,A,B,C,D,answer`` files ``{subject}_{split}.csv``, flat in
    ``folder`` or (``nested``) in ``folder/{split}/`` as in the MMLU tarball. Returns ``folder``."""
    for (subject, split), rows in _by_file(questions).items():
        with open(_csv_path(Path(folder), subject, split, nested), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for q in rows:
                writer.writerow([q["question"], *q["choices"], LETTERS[q["answer"]]])
    return Path(folder)


def write_ceval(folder: str | Path, questions: list[dict], nested: bool = False) -> Path:
    """C-Eval's layout: ``{subject}_{split}.csv`` with an ``id,question,A,B,C,D,answer`` header (dev files also
    carry C-Eval's ``explanation`` column), ids counted from 0 in each file. Returns ``folder``."""
    for (subject, split), rows in _by_file(questions).items():
        explain = split == "dev"
        with open(_csv_path(Path(folder), subject, split, nested), "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["id", "question", "A", "B", "C", "D", "answer"] + (["explanation"] if explain else []))
            for n, q in enumerate(rows):
                writer.writerow([n, q["question"], *q["choices"], LETTERS[q["answer"]]]
                                + ([f"because {LETTERS[q['answer']]}"] if explain else []))
    return Path(folder)


def write_jsonl(path: str | Path, questions: list[dict]) -> Path:
    """One JSONL row per question (``split`` is not a field: write the dev rows to their own file), the answer
    as a letter and as a 0-based index on alternate rows, as both are accepted. Returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        for n, q in enumerate(questions):
            answer = LETTERS[q["answer"]] if n % 2 == 0 else q["answer"]
            row = {"subject": q["subject"], "question": q["question"], "choices": q["choices"], "answer": answer}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
