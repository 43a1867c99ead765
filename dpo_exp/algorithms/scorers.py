"""Scorers: one number per (prompt, response), what a reward-seeking algorithm (PPO, online DPO) maximises
or labels with, what evaluation and judges report.

- `GoldScorer`: the task's gold reward, a function of texts (dpo_exp.rewards);
- `RewardModelScorer`: a `ScalarHeadModel` (the Bradley–Terry reward model) on token ids, the one path that
  scores with it: training's PPO and online DPO, the reward model's held-out evaluation
  (dpo_exp.algorithms.reward_model) and `judge=reward_model` (dpo_exp.judging.judges).

Both are `ScoreFn`s, and both score a torchrun job's rows in shares, every rank getting all the scores.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from dpo_exp import distributed
from dpo_exp.data import Batch, collate_sequences
from dpo_exp.models import ScalarHeadModel, autocast

GoldReward = Callable[[Sequence[str], Sequence[str]], list[float]]  # (prompts, responses) -> rewards
# (prompt_texts, prompt_ids, response_ids, response_texts) -> (B,) float scores
ScoreFn = Callable[[Sequence[str], Sequence[list[int]], Sequence[list[int]], Sequence[str]], torch.Tensor]


class GoldScorer:
    """A task's gold reward: `scores` as numbers, or called as a ScoreFn."""

    def __init__(self, gold_reward: GoldReward):
        self.gold_reward = gold_reward

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One gold reward per (prompt, response); each rank of a torchrun job scores its share, every rank then
        holds the same scores, bit for bit."""
        return distributed.map_shared(range(len(responses)), lambda rows: self.gold_reward(
            [prompts[i] for i in rows], [responses[i] for i in rows]))

    def __call__(self, prompt_texts, prompt_ids, response_ids, response_texts) -> torch.Tensor:
        return torch.tensor(self.scores(prompt_texts, response_texts), dtype=torch.float32)


class RewardModelScorer:
    """A `ScalarHeadModel`'s score of responses given as token ids (the policy's own, or tokenized as in
    training): read at the response's end token (ScalarHeadModel), normalised (raw − offset) unless `raw`."""

    def __init__(self, reward_model: ScalarHeadModel, pad_id: int, batch_size: int = 64, precision: str = "fp32",
                 raw: bool = False):
        self.model = reward_model
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.precision = precision
        self.raw = raw

    def score_batch(self, batch: Batch) -> torch.Tensor:
        """(N,) float32 scores of a padded batch's rows, on the model's device; with a gradient where one is
        recorded (the reward model's training)."""
        with autocast(self.model.head.weight.device, self.precision):
            scores = self.model.raw_score(batch) if self.raw else self.model.score(batch)
        return scores.float()

    @torch.no_grad()
    def scores(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]]) -> torch.Tensor:
        """(N,) float32 scores on the CPU, batch_size rows per forward pass, in eval mode; under torchrun each
        rank scores its share of the rows and every rank gets them all."""
        was_training = self.model.training
        self.model.eval()

        def score(rows: list[int]) -> list[float]:
            out = []
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s:s + self.batch_size]
                batch = collate_sequences([prompt_ids[i] for i in chunk], [response_ids[i] for i in chunk], self.pad_id)
                out.extend(self.score_batch(batch).cpu().tolist())
            return out

        scores = distributed.map_shared(range(len(response_ids)), score)
        self.model.train(was_training)
        return torch.tensor(scores, dtype=torch.float32)

    def __call__(self, prompt_texts, prompt_ids, response_ids, response_texts) -> torch.Tensor:
        return self.scores(prompt_ids, response_ids)
