"""Multiple-choice log-likelihood scoring: the core of eval/multiple_choice.py.

Each question's prompt (``utils.evaluation.choice_data.build_prompt``: k shots, the oldest dropped first until
the prompt and its longest answer fit the context) is the context; two sets of continuations are scored after it:

* the answer letters, ``" A"``, ``" B"``, ... (``acc``: the letter with the highest log-likelihood);
* the choice texts, ``" " + text`` (``acc_norm``: the highest log-likelihood divided by the text's length in
  characters, lm-eval's definition; shots keep their letter answers, so one context serves both).

Tokens are split as lm-eval splits them: the continuation's tokens are ``encode(context + continuation)`` after
the first ``len(encode(context))`` tokens. The questions of one subject share their first tokens (the
description and the shots, when every question kept all of them); ``Scorer.choice_logprobs`` runs that prefix
once, each question once on its cache, and each answer on the question's cache.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from utils.evaluation.choice_data import LETTERS, Question, Questions, build_prompt, pick_shots, subject_title
from utils.evaluation.scoring import ChoiceItem, Scorer


@dataclass
class Prompted:
    """A question ready to score: its context's tokens and each continuation's."""

    question: Question
    shots: int  # examples in the prompt
    offered: int  # examples the subject's dev rows offered (k_shot at most): more than ``shots`` when cut to fit
    context: list[int]
    letters: list[list[int]]
    texts: list[list[int]]


def continuation_tokens(encode: Callable[[str], list[int]], context_text: str, context: list[int],
                        continuation: str) -> list[int]:
    """The tokens of ``continuation`` after ``context_text``, as lm-eval splits them."""
    whole = encode(context_text + continuation)
    return whole[len(context):]


def prompt_questions(tokenizer: Any, questions: Questions, k_shot: int, lang: str, context_len: int,
                     names: dict[str, str] | None = None, render: Callable[[str], tuple[str, bool]] | None = None,
                     ) -> tuple[list[Prompted], list[Question]]:
    """(questions with their tokens, questions too long for the context even with no shot).

    ``render``: a chat template (prompt -> (text, add_special_tokens)); then the continuations are the bare
    letters and texts (the assistant's turn starts fresh), as lm-eval does with a chat template."""
    delimiter = "" if render else " "
    ready, too_long = [], []
    for subject, items in questions.evaluated.items():
        name = (names or {}).get(subject) or subject_title(subject)
        pool = questions.shots.get(subject, [])
        for q in items:
            longest = max([delimiter + c for c in q.choices] + [delimiter + LETTERS[len(q.choices) - 1]], key=len)

            def context_of(prompt: str) -> tuple[str, bool]:
                return render(prompt) if render else (prompt, True)

            def encode_with(special: bool) -> Callable[[str], list[int]]:
                return lambda text: tokenizer(text, add_special_tokens=special)["input_ids"]

            def fits(prompt: str) -> bool:
                text, special = context_of(prompt)
                return len(encode_with(special)(text + longest)) <= context_len

            picked = pick_shots(q, pool, k_shot)
            prompt, used = build_prompt(q, picked, lang, name, fits)
            if used == 0 and not fits(prompt):
                too_long.append(q)
                continue
            text, special = context_of(prompt)
            encode = encode_with(special)
            context = encode(text)
            letters = [continuation_tokens(encode, text, context, delimiter + LETTERS[i]) for i in range(len(q.choices))]
            texts = [continuation_tokens(encode, text, context, delimiter + c) for c in q.choices]
            ready.append(Prompted(q, used, len(picked), context, letters, texts))
    return ready, too_long


def _common_prefix(rows: Sequence[list[int]]) -> int:
    n = min(len(r) for r in rows) - 1  # every row keeps at least one token of its own
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def score_prompted(scorer: Scorer, prompted: Sequence[Prompted], batch_size: int = 8, progress: bool = True
                   ) -> list[dict]:
    """One prediction record per question (see ``prediction``), in the order given. Questions are grouped by
    subject; each group's common first tokens run once."""
    groups: dict[str, list[int]] = {}
    for n, p in enumerate(prompted):
        groups.setdefault(p.question.subject, []).append(n)
    out: list[dict | None] = [None] * len(prompted)
    bar = _progress(len(prompted), progress)
    try:
        for indices in groups.values():
            rows = [prompted[n].context for n in indices]
            cut = _common_prefix(rows)
            if cut == 0:  # nothing shared (no BOS, different first tokens): each question alone
                for n in indices:
                    p = prompted[n]
                    out[n] = _score_one(scorer, p.context[:1], [p], batch_size)[0]
                    _tick(bar, 1)
                continue
            prefix = rows[0][:cut]
            for at in range(0, len(indices), batch_size):
                chunk = [prompted[n] for n in indices[at:at + batch_size]]
                for n, record in zip(indices[at:at + batch_size], _score_one(scorer, prefix, chunk, batch_size)):
                    out[n] = record
                _tick(bar, len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return out  # type: ignore[return-value]


def _score_one(scorer: Scorer, prefix: list[int], chunk: Sequence[Prompted], batch_size: int) -> list[dict]:
    items = [ChoiceItem(p.context[len(prefix):], p.letters + p.texts) for p in chunk]
    logprobs = scorer.choice_logprobs(prefix, items, batch_size)
    return [prediction(p, lp) for p, lp in zip(chunk, logprobs)]


def prediction(p: Prompted, logprobs: list[list[float]]) -> dict:
    """The audit record of one question: the per-choice log-likelihoods of letters and texts, and both picks."""
    q = p.question
    n = len(q.choices)
    letters = [math.fsum(v) for v in logprobs[:n]]
    texts = [math.fsum(v) for v in logprobs[n:]]
    chars = [len(c) for c in q.choices]
    normed = [t / max(c, 1) for t, c in zip(texts, chars)]
    pred = max(range(n), key=lambda i: (letters[i], -i))  # ties: the first, as numpy's argmax
    pred_norm = max(range(n), key=lambda i: (normed[i], -i))
    return {"id": q.id, "subject": q.subject, "source": q.source, "answer": LETTERS[q.answer],
            "pred": LETTERS[pred], "correct": pred == q.answer,
            "pred_norm": LETTERS[pred_norm], "correct_norm": pred_norm == q.answer, "shots": p.shots,
            "context_tokens": len(p.context), "loglik_letters": letters, "loglik_choices": texts,
            "choice_chars": chars}


def accuracy(predictions: Sequence[dict]) -> dict:
    """Accuracy (acc and acc_norm) per subject, their macro average (subjects weigh alike) and the micro average
    (questions weigh alike)."""
    subjects: dict[str, list[dict]] = {}
    for p in predictions:
        subjects.setdefault(p["subject"], []).append(p)
    per = {s: {"n": len(v), "acc": sum(p["correct"] for p in v) / len(v),
               "acc_norm": sum(p["correct_norm"] for p in v) / len(v)} for s, v in sorted(subjects.items())}
    n = len(predictions)
    micro = sum(p["correct"] for p in predictions) / n if n else float("nan")
    micro_norm = sum(p["correct_norm"] for p in predictions) / n if n else float("nan")
    return {
        "acc": micro, "acc_norm": micro_norm, "micro_acc": micro, "micro_acc_norm": micro_norm,
        "macro_acc": math.fsum(v["acc"] for v in per.values()) / len(per) if per else float("nan"),
        "macro_acc_norm": math.fsum(v["acc_norm"] for v in per.values()) / len(per) if per else float("nan"),
        "questions": n, "subjects": per,
    }


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="questions", unit="q", file=sys.stderr, dynamic_ncols=True)


def _tick(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)
