"""Scorers: what a reward-seeking algorithm (PPO, online DPO) maximises or labels with.

A scorer maps (prompt_texts, prompt_ids, response_ids, response_texts) to a (B,) float tensor:
the task's gold reward (`GoldScorer`), or a trained reward model (`RewardModelScorer`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from dpo_exp import distributed
from dpo_exp.data import collate_sequences
from dpo_exp.models import ScalarHeadModel, autocast

# (prompt_texts, prompt_ids, response_ids, response_texts) -> (B,) float scores
ScoreFn = Callable[[Sequence[str], Sequence[list[int]], Sequence[list[int]], Sequence[str]], torch.Tensor]


class GoldScorer:
    """Wraps a task gold reward (prompts, responses) -> list[float] as a PPO score_fn."""

    def __init__(self, gold_reward: Callable[[Sequence[str], Sequence[str]], list[float]]):
        self.gold_reward = gold_reward

    def __call__(self, prompt_texts, prompt_ids, response_ids, response_texts) -> torch.Tensor:
        # each rank of a torchrun job scores its share: every rank then holds the same scores, bit for bit
        scores = distributed.map_shared(range(len(response_texts)), lambda rows: self.gold_reward(
            [prompt_texts[i] for i in rows], [response_texts[i] for i in rows]))
        return torch.tensor(scores, dtype=torch.float32)


class RewardModelScorer:
    """A trained `ScalarHeadModel` as a PPO score_fn: normalised score at the last response
    token (EOS when emitted), computed on the policy's own token ids."""

    def __init__(self, reward_model: ScalarHeadModel, pad_id: int, batch_size: int = 64, precision: str = "fp32"):
        self.model = reward_model
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.precision = precision

    @torch.no_grad()
    def __call__(self, prompt_texts, prompt_ids, response_ids, response_texts) -> torch.Tensor:
        device = self.model.head.weight.device
        was_training = self.model.training
        self.model.eval()

        def score(rows: list[int]) -> list[float]:  # this rank's share under torchrun; all rows otherwise
            out = []
            for s in range(0, len(rows), self.batch_size):
                chunk = rows[s:s + self.batch_size]
                batch = collate_sequences([prompt_ids[i] for i in chunk], [response_ids[i] for i in chunk], self.pad_id)
                with autocast(device, self.precision):
                    out.extend(self.model.score(batch).float().cpu().tolist())
            return out

        scores = distributed.map_shared(range(len(response_ids)), score)
        self.model.train(was_training)
        return torch.tensor(scores, dtype=torch.float32)
