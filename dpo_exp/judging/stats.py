"""Win rates with the counts behind them, bootstrap intervals, and the position-bias check."""
from __future__ import annotations

from typing import Sequence

import numpy as np

OUTCOMES = ("policy", "baseline", "tie", "invalid")
SCORE = {"policy": 1.0, "tie": 0.5, "baseline": 0.0}  # a tie is half a win; invalid answers are left out


def win_rate(winners: Sequence[str], resamples: int = 2000, seed: int = 0) -> dict:
    """The policy's win rate over usable verdicts (ties count half), with every count and a bootstrap 95%
    interval over comparisons (percentile, `resamples` draws).

    Unusable answers (`invalid`) are counted apart and left out of the rate, never silently dropped.
    """
    unknown = set(winners) - set(OUTCOMES)
    if unknown:
        raise ValueError(f"unknown verdicts {sorted(unknown)}; expected {OUTCOMES}")
    counts = {outcome: sum(w == outcome for w in winners) for outcome in OUTCOMES}
    scores = np.array([SCORE[w] for w in winners if w != "invalid"])
    out = {"comparisons": len(winners), "judged": int(len(scores)), "wins": counts["policy"],
           "losses": counts["baseline"], "ties": counts["tie"], "invalid": counts["invalid"]}
    mean, low, high = bootstrap(scores, resamples, seed)
    return {**out, "win_rate": mean, "ci_low": low, "ci_high": high}


def agreement(first: Sequence[str], second: Sequence[str], resamples: int = 2000, seed: int = 0) -> dict:
    """How often two verdicts on the same comparisons name the same winner (e.g. one judged in each order, or
    a judge against recorded verdicts), over the pairs where both are usable, with a bootstrap 95% interval."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} verdicts against {len(second)}")
    both = [(a, b) for a, b in zip(first, second) if a != "invalid" and b != "invalid"]
    same = np.array([float(a == b) for a, b in both])
    out = {"pairs": len(first), "usable": len(both)}
    mean, low, high = bootstrap(same, resamples, seed)
    return {**out, "agreement": mean, "ci_low": low, "ci_high": high}


def bootstrap(values: np.ndarray, resamples: int, seed: int) -> tuple:
    """(mean, 2.5th, 97.5th percentile of the means of `resamples` resamples with replacement); all None for no
    values."""
    if not len(values):
        return None, None, None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)
