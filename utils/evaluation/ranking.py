"""Rankings of models from pairwise battles: online Elo and Bradley-Terry, each with bootstrap 95% intervals.

A mean rank (LLMZoo's ``ordering.txt``) or a win count says which model came first, not whether the data can
tell the models apart. Here every outcome is a battle ``(model_a, model_b, winner)`` with ``winner`` one of
``"a"``, ``"b"``, ``"tie"`` (from pairwise judgments, or from LLMZoo orderings: ``battles_from_order``), and
two ratings are fitted, each with a bootstrap percentile interval, so that two models whose intervals
overlap are shown as such:

* **Online Elo** (``online_elo``), FastChat's arena ``compute_elo`` step for step: every rating starts at
  ``init`` (1000), the battles are played in the order given, the expected score is
  ``1 / (1 + base ** ((r_b - r_a) / scale))`` (base 10, scale 400), a tie scores 0.5, and both ratings move
  by ``k`` (4) times the surprise. The result depends on the order of the battles; the mean stays at
  ``init`` (each update is zero-sum).
* **Bradley-Terry** (``bradley_terry``): ``P(i beats j) = 1 / (1 + exp(theta_j - theta_i))`` fitted by
  maximum likelihood (Newton's method on the concave log-likelihood), a tie counted as half a win each way,
  reported on the Elo scale ``1000 + 400 / ln 10 * theta``. The order of the battles does not matter. The
  anchor is the **mean**: the ratings average 1000. Anchoring on one model instead would give that model an
  interval of width zero and load its uncertainty onto every other model; with the mean as the anchor each
  model's interval says how well its own strength is pinned down. Differences between two models do not
  depend on the anchor (``rankings`` reports the adjacent ones with their own intervals).

  The likelihood has no maximum when the models split into two groups such that every battle between them
  went to the same group, or there was none: a model that won every battle, or lost every one, is the common
  case, and a small bootstrap resample meets it often. So ``prior`` (default 0.01) virtual battles per pair
  of models, each a tie, are added: the fit is then always finite, the shift on real data is a small
  fraction of a point (a few hundredths on LLMZoo's reviews), and a group that never lost ends up a thousand
  points or more ahead, which reads as what it is. ``rankings`` says when that happened (``bt.mle_exists``,
  ``bt.components``, and the bootstrap rounds concerned), never silently.

``bootstrap`` resamples the battles with replacement (``rounds`` times, seeded) and refits; the interval is
the 2.5 and 97.5 percentiles (numpy's linear interpolation, as FastChat's ``quantile``). Both fits are
vectorised over the rounds (Elo: one pass over the battles updating every round's ratings at once; BT:
batched Newton steps), so 1000 rounds on 1000 battles take a fraction of a second.

``rankings`` gathers it all per model (points, intervals, battles, wins / ties / losses, rank) and
``plot_rankings`` draws it (matplotlib's Agg canvas, written atomically). ``read_battles`` and
``read_review_battles`` read the two input files of ``eval/rank.py`` with every bad line named.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from utils.args import Group
from utils.errors import SuiteError
from utils.evaluation.llmzoo import SKIPPED_CATEGORIES, battles_from_order
from utils.jsonl import line_refs

Battle = tuple[str, str, str]
WINNERS = ("a", "b", "tie")
#: Winner values read from a battles file, as FastChat's arena battles write them (``tie (bothbad)`` is a tie).
WINNER_NAMES = {"a": "a", "b": "b", "tie": "tie", "model_a": "a", "model_b": "b", "tie (bothbad)": "tie"}
#: Bradley-Terry's natural scale (log-odds) to Elo points: 400 points are a factor of 10 in the odds.
ELO_PER_LOGIT = 400 / math.log(10)
ANCHOR = 1000.0
#: Virtual tied battles per pair of models in the Bradley-Terry fit (see the module docstring).
PRIOR = 0.01
LEVEL = 0.95
#: LLMZoo review categories left out, as LLMZoo's metric leaves them out (the judge is not trusted on them).
_NEWTON_STEPS = 200
_NEWTON_TOL = 1e-10
_MAX_STEP = 2.0  # logits per Newton step: far from the optimum a full step can overshoot


# --------------------------------------------------------------------------------------------------
# Battles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BattleArrays:
    """Battles as arrays: the models (first appearance order), each battle's two model indices and the score
    of model a (1 a win, 0 a loss, 0.5 a tie)."""

    models: list[str]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.a)


#: The most bootstrap resamples a run may ask for.
MAX_BOOTSTRAP = 100_000


@dataclass(frozen=True)
class Resampling(Group):
    """The bootstrap behind the rankings' intervals (eval/rank.py, eval/run.py)."""

    bootstrap: int = 1000
    seed: int = 0

    def problems(self) -> list[str]:
        if not 0 <= self.bootstrap <= MAX_BOOTSTRAP:
            return [f"--bootstrap must be between 0 (no intervals) and {MAX_BOOTSTRAP}, got {self.bootstrap}"]
        return []


def encode_battles(battles: Iterable[Battle]) -> BattleArrays:
    """Check and index ``battles``.

    Raises:
        SuiteError: a battle that is not ``(model_a, model_b, winner)`` with two different model names and a
            winner in ``WINNERS``, or fewer than two models.
    """
    index: dict[str, int] = {}
    a, b, score, bad = [], [], [], []
    for n, battle in enumerate(battles):
        try:
            model_a, model_b, winner = battle
        except (TypeError, ValueError):
            bad.append(f"battle {n}: {battle!r} is not (model_a, model_b, winner)")
            continue
        if not (isinstance(model_a, str) and isinstance(model_b, str) and model_a and model_b):
            bad.append(f"battle {n}: model names must be non-empty strings, got {model_a!r}, {model_b!r}")
        elif model_a == model_b:
            bad.append(f"battle {n}: {model_a!r} against itself")
        elif winner not in WINNERS:
            bad.append(f"battle {n}: winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        else:
            a.append(index.setdefault(model_a, len(index)))
            b.append(index.setdefault(model_b, len(index)))
            score.append({"a": 1.0, "b": 0.0, "tie": 0.5}[winner])
    if bad:
        more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise SuiteError("bad battles: " + "; ".join(bad[:10]) + more)
    if len(index) < 2:
        raise SuiteError(f"a ranking needs battles between at least two models; got {len(a)} battle(s) "
                         f"naming {len(index)} model(s)")
    return BattleArrays(list(index), np.array(a, dtype=np.intp), np.array(b, dtype=np.intp),
                        np.array(score, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Online Elo
# --------------------------------------------------------------------------------------------------


def online_elo(battles: Iterable[Battle], k: float = 4, base: float = 10, scale: float = 400,
               init: float = 1000) -> dict[str, float]:
    """FastChat's arena Elo: the battles played once, in order (see the module docstring).

    Returns:
        {model: rating}, models in order of first appearance.
    """
    enc = battles if isinstance(battles, BattleArrays) else encode_battles(battles)
    ratings = _elo_rounds(enc, np.arange(len(enc))[None, :], k=k, base=base, scale=scale, init=init)[0]
    return dict(zip(enc.models, map(float, ratings)))


def _elo_rounds(enc: BattleArrays, idx: np.ndarray, *, k: float = 4, base: float = 10, scale: float = 400,
                init: float = 1000) -> np.ndarray:
    """Online Elo over each row of ``idx`` (rounds x battles, indices into ``enc``) at once: (rounds, models)."""
    rounds, steps = idx.shape
    m = len(enc.models)
    ratings = np.full(rounds * m, float(init))  # flat: round r's model i at r * m + i
    # Battle-major, contiguous, flat positions: each step reads one row of each (much faster than 2-D fancy
    # indexing of a column).
    offset = (np.arange(rounds) * m)[:, None]
    flat_a = np.ascontiguousarray((enc.a[idx] + offset).T)
    flat_b = np.ascontiguousarray((enc.b[idx] + offset).T)
    scores = np.ascontiguousarray(enc.score[idx].T)
    for t in range(steps):
        a, b, s = flat_a[t], flat_b[t], scores[t]
        ra, rb = ratings[a], ratings[b]
        # Both expectations computed as FastChat does (not eb = 1 - ea), so the floats are the same.
        ea = 1 / (1 + base ** ((rb - ra) / scale))
        eb = 1 / (1 + base ** ((ra - rb) / scale))
        ratings[a] = ra + k * (s - ea)
        ratings[b] = rb + k * (1 - s - eb)
    return ratings.reshape(rounds, m)


# --------------------------------------------------------------------------------------------------
# Bradley-Terry
# --------------------------------------------------------------------------------------------------


def bradley_terry(battles: Iterable[Battle], prior: float = PRIOR) -> dict[str, float]:
    """Bradley-Terry ratings by maximum likelihood, ties as half a win each way, on the Elo scale with a mean
    of 1000 (see the module docstring for the anchor and ``prior``).

    Returns:
        {model: rating}, models in order of first appearance.
    """
    enc = battles if isinstance(battles, BattleArrays) else encode_battles(battles)
    theta = _bt_rounds(enc, np.arange(len(enc))[None, :], prior=prior)[0]
    return dict(zip(enc.models, map(float, ANCHOR + ELO_PER_LOGIT * theta)))


def _win_counts(enc: BattleArrays, idx: np.ndarray) -> np.ndarray:
    """(rounds, m, m): w[r, i, j] = the wins of i over j in round r's battles, a tie half a win each way."""
    rounds = idx.shape[0]
    m = len(enc.models)
    offset = (np.arange(rounds) * m * m)[:, None]
    a, b, s = enc.a[idx], enc.b[idx], enc.score[idx]
    flat = np.bincount((offset + a * m + b).ravel(), weights=s.ravel(), minlength=rounds * m * m)
    flat += np.bincount((offset + b * m + a).ravel(), weights=(1 - s).ravel(), minlength=rounds * m * m)
    return flat.reshape(rounds, m, m)


def _bt_rounds(enc: BattleArrays, idx: np.ndarray, *, prior: float = PRIOR) -> np.ndarray:
    """Bradley-Terry log-strengths (mean 0) for each row of ``idx`` at once: (rounds, models)."""
    if not prior > 0:
        raise SuiteError(f"the Bradley-Terry prior must be > 0 (virtual tied battles per pair), got {prior}")
    return _bt_fit(_win_counts(enc, idx), prior)


def _bt_fit(wins: np.ndarray, prior: float) -> np.ndarray:
    """Newton's method on the log-likelihood sum_ij w_ij log sigmoid(theta_i - theta_j), batched over rounds.

    The Hessian is minus a weighted graph Laplacian, singular along the all-ones direction (adding a constant
    changes nothing); adding 1 1^T makes it definite, and since the gradient sums to zero the step then sums to
    zero too, so theta keeps its mean at 0.
    """
    rounds, m, _ = wins.shape
    w = wins + (prior / 2) * (1 - np.eye(m))
    games = w + w.transpose(0, 2, 1)
    theta = np.zeros((rounds, m))
    ones = np.ones((m, m))
    for _ in range(_NEWTON_STEPS):
        p = 1 / (1 + np.exp(theta[:, None, :] - theta[:, :, None]))  # p[r, i, j] = P(i beats j)
        grad = (w - games * p).sum(axis=2)
        weight = games * p * (1 - p)
        laplacian = -weight  # its diagonal is 0: no model battles itself
        laplacian[:, np.arange(m), np.arange(m)] = weight.sum(axis=2)
        step = np.linalg.solve(laplacian + ones, grad[..., None])[..., 0]
        biggest = np.abs(step).max(axis=1, keepdims=True)
        step = step * np.minimum(1.0, _MAX_STEP / np.maximum(biggest, 1e-300))
        theta += step
        if biggest.max() < _NEWTON_TOL:
            break
    else:
        raise SuiteError(f"the Bradley-Terry fit did not converge in {_NEWTON_STEPS} Newton steps "
                         f"(largest last step {biggest.max():.3g})")
    return theta - theta.mean(axis=1, keepdims=True)


def _reach(wins: np.ndarray) -> np.ndarray:
    """(..., m, m) booleans: whether j can be reached from i along "won (or tied) at least once against" edges."""
    m = wins.shape[-1]
    reach = (wins > 0) | np.eye(m, dtype=bool)
    for _ in range(max(1, math.ceil(math.log2(m)))):  # each squaring doubles the path length covered
        reach = np.matmul(reach.astype(np.int64), reach.astype(np.int64)) > 0
    return reach


def _components(wins: np.ndarray) -> list[list[int]]:
    """The strongly connected parts of the graph "i won (or tied) at least once against j", largest first.
    The maximum-likelihood fit exists exactly when there is one part (Zermelo 1929; Ford 1957)."""
    reach = _reach(wins)
    both = reach & reach.T
    parts, seen = [], set()
    for i in range(len(both)):
        if i not in seen:
            part = [j for j in range(len(both)) if both[i, j]]
            seen.update(part)
            parts.append(part)
    return sorted(parts, key=lambda part: (-len(part), part[0]))


def _mle_exists(wins: np.ndarray) -> np.ndarray:
    """Per round (wins: rounds x m x m): whether the maximum-likelihood fit exists (one strongly connected part)."""
    return _reach(wins).all(axis=(1, 2))


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------

Fit = Callable[..., dict]
_WINNER_OF = {1.0: "a", 0.0: "b", 0.5: "tie"}
#: Rounds x battles drawn per batch: bounds the memory of a bootstrap on many battles (a few hundred MB at most).
CHUNK_CELLS = 4_000_000


def bootstrap_indices(n: int, rounds: int, seed: int) -> Iterator[np.ndarray]:
    """Battle indices drawn with replacement, ``rounds`` rows of ``n`` in all, yielded in batches of at most
    ``CHUNK_CELLS`` indices: the same (n, rounds, seed) always gives the same resamples."""
    rng = np.random.default_rng(seed)
    size = max(1, CHUNK_CELLS // max(1, n))
    for start in range(0, rounds, size):
        yield rng.integers(0, n, size=(min(size, rounds - start), n))


def bootstrap_samples(battles: Iterable[Battle] | BattleArrays, fit: Fit, rounds: int = 1000, seed: int = 0,
                      **fit_args: Any) -> tuple[list[str], np.ndarray]:
    """(models, ratings: rounds x models) of ``fit`` refitted on ``rounds`` resamples of the battles.

    ``online_elo`` and ``bradley_terry`` run vectorised over all rounds; any other ``fit`` (battles ->
    {model: rating}) is called once per resample, and a model absent from a resample gets NaN there.
    """
    enc = battles if isinstance(battles, BattleArrays) else encode_battles(battles)
    batches = []
    for idx in bootstrap_indices(len(enc), rounds, seed):
        if fit is online_elo:
            batches.append(_elo_rounds(enc, idx, **fit_args))
        elif fit is bradley_terry:
            batches.append(ANCHOR + ELO_PER_LOGIT * _bt_rounds(enc, idx, **fit_args))
        else:
            batch = np.full((len(idx), len(enc.models)), np.nan)
            for r, row in enumerate(idx):
                got = fit([(enc.models[enc.a[i]], enc.models[enc.b[i]], _WINNER_OF[float(enc.score[i])])
                           for i in row], **fit_args)
                batch[r] = [got.get(model, np.nan) for model in enc.models]
            batches.append(batch)
    return enc.models, np.concatenate(batches)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) percentile interval of each column (NaN rounds left out)."""
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap(battles: Iterable[Battle], fit: Fit, rounds: int = 1000, seed: int = 0, *, level: float = LEVEL,
              **fit_args: Any) -> dict[str, dict[str, float]]:
    """Bootstrap percentile intervals of ``fit``'s ratings: {model: {"ci_low", "ci_high"}} (95% by default).

    Args:
        battles: (model_a, model_b, winner) tuples.
        fit: ``online_elo``, ``bradley_terry`` (both vectorised) or any battles -> {model: rating} function.
        rounds: Resamples of the battles, drawn with replacement, each as many as the battles.
        seed: Seed of the resampling (numpy's default generator).
        level: Coverage of the interval.
        fit_args: Passed to ``fit`` (e.g. ``k`` for Elo).
    """
    if rounds < 1:
        raise SuiteError(f"bootstrap rounds must be at least 1, got {rounds}")
    models, samples = bootstrap_samples(battles, fit, rounds, seed, **fit_args)
    low, high = percentile_interval(samples, level)
    return {model: {"ci_low": float(lo), "ci_high": float(hi)} for model, lo, hi in zip(models, low, high)}


# --------------------------------------------------------------------------------------------------
# The ranking report
# --------------------------------------------------------------------------------------------------


def competition_ranks(values: Sequence[float], descending: bool = True) -> list[int]:
    """1-based competition ranks ("1224"): equal values share a rank and the next rank skips."""
    sign = -1 if descending else 1
    ordered = sorted(sign * v for v in values)
    return [ordered.index(sign * v) + 1 for v in values]


def rankings(battles: Iterable[Battle], bootstrap: int = 1000, seed: int = 0, *, level: float = LEVEL,
             k: float = 4, prior: float = PRIOR) -> dict:
    """Elo and Bradley-Terry ratings with bootstrap intervals, per model, best first.

    Args:
        battles: (model_a, model_b, winner) tuples, winner in ``WINNERS``; their order matters to Elo only.
        bootstrap: Resamples for the intervals (0: points only, the intervals are None).
        seed: Seed of the resampling; both fits see the same resamples.
        level: Coverage of the intervals.
        k: Elo's K factor.
        prior: Virtual tied battles per pair in the Bradley-Terry fit.

    Returns:
        ``models``: {model: {rank, rank_ci, bt: {rating, ci_low, ci_high}, elo: {...}, battles, wins, ties,
        losses}} in rank order. ``rank`` is the competition rank of the BT rating (the fit that does not
        depend on the order of the battles); ``rank_ci`` is 1 + the number of models whose BT interval lies
        wholly above this model's (as the LMSYS leaderboard ranks), so models the data cannot separate share
        it. ``adjacent``: each model against the next one down, the BT difference with its own bootstrap
        interval and the share of resamples in which the higher one stays ahead. Then the settings and what
        the fit met: ``bt.mle_exists`` and ``bt.components`` (see the module docstring),
        ``bootstrap.degenerate_rounds`` (resamples without a maximum-likelihood fit).
    """
    if bootstrap < 0:
        raise SuiteError(f"bootstrap rounds must be >= 0, got {bootstrap}")
    if not prior > 0:
        raise SuiteError(f"the Bradley-Terry prior must be > 0 (virtual tied battles per pair), got {prior}")
    enc = encode_battles(battles)
    models, m = enc.models, len(enc.models)
    everything = np.arange(len(enc))[None, :]
    elo = _elo_rounds(enc, everything, k=k)[0]
    wins = _win_counts(enc, everything)
    bt = ANCHOR + ELO_PER_LOGIT * _bt_fit(wins, prior)[0]
    parts = _components(wins[0])

    low = {"elo": [None] * m, "bt": [None] * m}
    high = {"elo": [None] * m, "bt": [None] * m}
    degenerate, bt_samples = None, None
    if bootstrap:
        elo_batches, bt_batches, exists = [], [], []
        for idx in bootstrap_indices(len(enc), bootstrap, seed):
            elo_batches.append(_elo_rounds(enc, idx, k=k))
            round_wins = _win_counts(enc, idx)
            bt_batches.append(ANCHOR + ELO_PER_LOGIT * _bt_fit(round_wins, prior))
            exists.append(_mle_exists(round_wins))
        elo_samples, bt_samples = np.concatenate(elo_batches), np.concatenate(bt_batches)
        degenerate = int((~np.concatenate(exists)).sum())
        for name, samples in (("elo", elo_samples), ("bt", bt_samples)):
            lo, hi = percentile_interval(samples, level)
            low[name], high[name] = [float(x) for x in lo], [float(x) for x in hi]

    ranks = competition_ranks(list(bt))
    order = sorted(range(m), key=lambda i: (ranks[i], i))
    counts = _outcomes(enc)
    table = {}
    for i in order:
        above = sum(1 for j in range(m) if bootstrap and low["bt"][j] > high["bt"][i])
        table[models[i]] = {
            "rank": ranks[i],
            "rank_ci": above + 1 if bootstrap else None,
            "bt": {"rating": float(bt[i]), "ci_low": low["bt"][i], "ci_high": high["bt"][i]},
            "elo": {"rating": float(elo[i]), "ci_low": low["elo"][i], "ci_high": high["elo"][i]},
            **counts[i],
        }
    adjacent = []
    for upper, lower in zip(order, order[1:]):
        pair = {"ahead": models[upper], "behind": models[lower], "bt_difference": float(bt[upper] - bt[lower]),
                "ci_low": None, "ci_high": None, "ahead_share": None}
        if bt_samples is not None:
            diff = bt_samples[:, upper] - bt_samples[:, lower]
            lo, hi = percentile_interval(diff[:, None], level)
            pair.update(ci_low=float(lo[0]), ci_high=float(hi[0]), ahead_share=float((diff > 0).mean()))
        adjacent.append(pair)
    return {
        "models": table,
        "adjacent": adjacent,
        "battles": len(enc),
        "bt": {"scale": "1000 + 400/ln(10) * theta", "anchor": "the mean of all models' ratings is 1000",
               "ties": "half a win each way", "prior": prior, "mle_exists": len(parts) == 1,
               "components": [[models[i] for i in part] for part in parts] if len(parts) > 1 else None},
        "elo": {"k": k, "base": 10, "scale": 400, "init": 1000, "order": "the battles as given"},
        "bootstrap": {"rounds": bootstrap, "seed": seed, "level": level, "degenerate_rounds": degenerate,
                      "interval": "percentile"},
    }


def _outcomes(enc: BattleArrays) -> list[dict[str, int]]:
    """Each model's battles, wins, ties and losses."""
    m = len(enc.models)
    win = enc.score == 1.0
    tie = enc.score == 0.5
    loss = enc.score == 0.0
    wins = np.bincount(enc.a[win], minlength=m) + np.bincount(enc.b[loss], minlength=m)
    losses = np.bincount(enc.a[loss], minlength=m) + np.bincount(enc.b[win], minlength=m)
    ties = np.bincount(enc.a[tie], minlength=m) + np.bincount(enc.b[tie], minlength=m)
    return [{"battles": int(wins[i] + ties[i] + losses[i]), "wins": int(wins[i]), "ties": int(ties[i]),
             "losses": int(losses[i])} for i in range(m)]


def rankings_table(result: dict) -> str:
    """The human table of a ``rankings`` result (for stderr): one line per model, best first, then each model
    against the next one down."""
    ci = result["bootstrap"]["rounds"] > 0

    def cell(fit: dict) -> str:
        text = f"{fit['rating']:7.1f}"
        return text + (f" [{fit['ci_low']:6.1f}, {fit['ci_high']:6.1f}]" if ci else "")

    width = max(len("model"), *(len(name) for name in result["models"]))
    span = len(cell({"rating": 0.0, "ci_low": 0.0, "ci_high": 0.0}))
    lines = [f"{'rank':>4} {'rank_ci':>7}  {'model':<{width}}  {'Bradley-Terry':<{span}}  {'online Elo':<{span}}  "
             f"{'battles':>7} {'wins':>5} {'ties':>5} {'losses':>6}"]
    for name, row in result["models"].items():
        lines.append(f"{row['rank']:>4} {row['rank_ci'] if ci else '-':>7}  {name:<{width}}  {cell(row['bt'])}  "
                     f"{cell(row['elo'])}  {row['battles']:>7} {row['wins']:>5} {row['ties']:>5} {row['losses']:>6}")
    for pair in result["adjacent"]:
        text = f"{pair['ahead']} vs {pair['behind']}: Bradley-Terry {pair['bt_difference']:+.1f}"
        if ci:
            text += (f" [{pair['ci_low']:+.1f}, {pair['ci_high']:+.1f}], ahead in "
                     f"{100 * pair['ahead_share']:.1f}% of the resamples")
        lines.append(text)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------


def plot_rankings(result: dict, path: str | Path) -> Path:
    """Draw a ``rankings`` result into the PNG ``path``: one panel per fit (Bradley-Terry, online Elo), models
    best first, point estimates with their interval bars. Written to a temporary dot-file renamed into place,
    so a reader (or a hash manifest) never sees half an image."""
    # The figure API with the Agg canvas: no display, no pyplot global state (safe in any process).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    names = list(result["models"])
    rows = list(result["models"].values())
    fig = Figure(figsize=(10, 1.2 + 0.45 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(names))[::-1]  # best at the top
    level = result["bootstrap"]["level"]
    for ax, (fit, title) in zip(axes, (("bt", "Bradley-Terry (MLE)"), ("elo", "online Elo"))):
        points = np.array([row[fit]["rating"] for row in rows])
        if result["bootstrap"]["rounds"]:
            low = np.array([row[fit]["ci_low"] for row in rows])
            high = np.array([row[fit]["ci_high"] for row in rows])
            # The bar is the interval itself, drawn apart from the point: an online Elo point may fall outside
            # its bootstrap interval (the order of the battles moves it), which errorbar could not show.
            ax.hlines(y, low, high, color="C0", linewidth=1.5)
            ax.plot(low, y, "|", high, y, "|", color="C0", markersize=10)
            title += f", {round(100 * level)}% bootstrap intervals"
        ax.plot(points, y, "o", color="C0", markersize=5)
        ax.axvline(ANCHOR, color="grey", linewidth=0.8, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rating (Elo scale)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{row['rank']}. {name}" for name, row in zip(names, rows)])
    fig.suptitle(f"{result['battles']} battles, {len(names)} models", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    try:
        # No Software stamp: the file holds the picture alone.
        fig.savefig(str(tmp), format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# Reading the inputs of eval/rank.py
# --------------------------------------------------------------------------------------------------


@dataclass
class BattleSource:
    """Battles read from one file, each with the line it came from, and what was skipped."""

    path: str
    battles: list[Battle]
    lines: list[int]
    records: int = 0
    unparsed: list[int] | None = None  # reviews whose order holds -1: no battle (lines)
    skipped: list[int] | None = None  # reviews in SKIPPED_CATEGORIES: no battle (lines)


_UNREADABLE = {"invalid_json": "not valid JSON", "invalid_utf8": "not valid UTF-8"}


def _records(path: str, flag: str):
    from utils.data.records import DataError, RowError, read_records

    try:
        for item in read_records(path):
            yield item, isinstance(item, RowError)
    except DataError as exc:
        raise SuiteError(str(exc).replace("--data_path", flag)) from None


def read_battles(path: str, flag: str = "--battles") -> BattleSource:
    """A battles file: JSONL (or a JSON array, as FastChat's ``clean_battle`` files) of records with
    ``model_a``, ``model_b`` and ``winner`` (``a`` / ``b`` / ``tie``, or FastChat's ``model_a`` / ``model_b`` /
    ``tie`` / ``tie (bothbad)``); other fields are ignored.

    Raises:
        SuiteError: naming every bad line (``path:line``) and why, or a file with no battle.
    """
    out = BattleSource(path, [], [])
    bad: dict[str, list[int]] = {}
    for item, broken in _records(path, flag):
        if broken:
            bad.setdefault(_UNREADABLE[item.category], []).append(item.line)
            continue
        rec, line = item.value, item.line
        out.records += 1
        reason = None
        if not isinstance(rec, dict):
            reason = "not a JSON object"
        else:
            missing = [f for f in ("model_a", "model_b", "winner") if f not in rec]
            if missing:
                reason = f"no {missing[0]!r} field"
            elif not all(isinstance(rec[f], str) and rec[f] for f in ("model_a", "model_b")):
                reason = "model_a and model_b must be non-empty strings"
            elif rec["model_a"] == rec["model_b"]:
                reason = "model_a and model_b are the same model"
            elif rec["winner"] not in WINNER_NAMES:
                reason = f"winner must be one of {', '.join(map(repr, WINNER_NAMES))}"
        if reason:
            bad.setdefault(reason, []).append(line)
            continue
        out.battles.append((rec["model_a"], rec["model_b"], WINNER_NAMES[rec["winner"]]))
        out.lines.append(line)
    _refuse(flag, path, bad)
    if not out.battles:
        raise SuiteError(f"{flag} {path}: no battle in the file")
    return out


def read_review_battles(path: str, flag: str = "--review_file") -> BattleSource:
    """An LLMZoo ``review.jsonl`` (order mode) as battles: each review of n models (``metadata.model_ids``)
    gives n(n-1)/2 battles (``battles_from_order``) from its stored ``order`` (LLMZoo computed its metrics from
    it). A review whose order holds -1 gives none and is counted (``unparsed``); so does one in
    ``SKIPPED_CATEGORIES`` (``skipped``), so that the ranking and LLMZoo's metric read the same reviews.

    Raises:
        SuiteError: naming every bad line (not JSON, no order, an order that does not fit the model ids, a
            duplicate question id, a score-mode review), or a file with no battle.
    """
    out = BattleSource(path, [], [], unparsed=[], skipped=[])
    bad: dict[str, list[int]] = {}
    seen: set[str] = set()
    for item, broken in _records(path, flag):
        if broken:
            bad.setdefault(_UNREADABLE[item.category], []).append(item.line)
            continue
        rec, line = item.value, item.line
        out.records += 1
        reason = _review_problem(rec, seen)
        if reason:
            bad.setdefault(reason, []).append(line)
            continue
        if rec.get("category") in SKIPPED_CATEGORIES:
            out.skipped.append(line)
            continue
        got = battles_from_order(rec["metadata"]["model_ids"], rec["order"])
        if not got:
            out.unparsed.append(line)
        out.battles += got
        out.lines += [line] * len(got)
    _refuse(flag, path, bad)
    if not out.battles:
        raise SuiteError(f"{flag} {path}: no battle in the file ({out.records} review(s), "
                         f"{len(out.unparsed)} without a parsed order, {len(out.skipped)} in the categories "
                         f"{' and '.join(SKIPPED_CATEGORIES)} that LLMZoo's metric skips)")
    return out


def _review_problem(rec: Any, seen: set[str]) -> str | None:
    """Why an LLMZoo review record cannot give battles, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    ids = rec.get("metadata", {}).get("model_ids") if isinstance(rec.get("metadata"), dict) else None
    if not (isinstance(ids, list) and len(ids) >= 2 and all(isinstance(x, str) and x for x in ids)):
        return "no metadata.model_ids (a list of at least two model names)"
    if len(set(ids)) != len(ids):
        return "metadata.model_ids names a model twice"
    if "order" not in rec:
        return ("a score-mode review (no 'order'): rankings take order-mode reviews" if "score" in rec
                else "no 'order' field")
    order = rec["order"]
    if not (isinstance(order, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in order)):
        return "'order' is not a list of integers"
    if len(order) != len(ids):
        return "'order' and metadata.model_ids differ in length"
    if -1 not in order and not all(1 <= x <= len(ids) for x in order):
        return f"'order' ranks must be 1..{len(ids)} (or all -1 for a review that did not parse)"
    qid = rec.get("question_id")
    if qid is not None:
        key = repr(qid)
        if key in seen:
            return "duplicate question_id"
        seen.add(key)
    return None


def _refuse(flag: str, path: str, bad: dict[str, list[int]]) -> None:
    if bad:
        raise SuiteError(f"{flag} {path}: " + "; ".join(f"{reason}: {line_refs(path, sorted(lines))}"
                                                         for reason, lines in bad.items()))
