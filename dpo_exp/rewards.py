"""Gold rewards: scorers that no one on this project wrote, used to judge policies.

A gold reward maps (prompts, responses) to one float per response. It scores the full
text (prompt + response), as the DPO paper's sentiment classifier scored the review.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

from dpo_exp.registry import Registry

GoldRewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]
# task.gold_reward=NAME selects one.
GOLD_REWARDS: Registry[GoldRewardFn] = Registry("gold reward", "task.gold_reward")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@GOLD_REWARDS.register("vader")
def vader_positivity(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """VADER's compound sentiment mapped to [0, 1]: (compound + 1) / 2; 1 is most positive."""
    analyzer = _vader()
    return [(analyzer.polarity_scores(p + r)["compound"] + 1) / 2 for p, r in zip(prompts, responses)]


def gold_reward(name: str | None) -> GoldRewardFn | None:
    """The registered gold reward task.gold_reward names (None: the task has none)."""
    return None if name is None else GOLD_REWARDS[name]
