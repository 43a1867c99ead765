"""Gold rewards: scorers that no one on this project wrote, used to judge policies.

A gold reward maps (prompts, responses) to one float per response. It scores the full
text (prompt + response), as the DPO paper's sentiment classifier scored the review.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_positivity(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """VADER's compound sentiment mapped to [0, 1]: (compound + 1) / 2; 1 is most positive."""
    analyzer = _vader()
    return [(analyzer.polarity_scores(p + r)["compound"] + 1) / 2 for p, r in zip(prompts, responses)]


GOLD_REWARDS = {"vader": vader_positivity}


def gold_reward(name: str | None):
    if name is None:
        return None
    if name not in GOLD_REWARDS:
        raise ValueError(f"unknown gold reward {name!r}; known: {', '.join(GOLD_REWARDS)}")
    return GOLD_REWARDS[name]
