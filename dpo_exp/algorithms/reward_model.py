"""The Bradley–Terry reward model: π_SFT with a scalar head, trained with −log σ(r(y_w) − r(y_l)).

It is a cached stage (dpo_exp.stages.reward_model_dir) shared by PPO and online DPO; `loss=reward_model`
finds or trains it and reports its held-out accuracy. Its scores are normalised so that π_SFT's
samples have mean 0 (N+ details, "reward normalisation").
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dpo_exp import distributed
from dpo_exp.algorithms.base import ALGORITHMS, Needs, OfflineAlgorithm, StepOutput, validate_beta
from dpo_exp.algorithms.scorers import RewardModelScorer
from dpo_exp.config import LossConfig
from dpo_exp.data import PADDED, Batch, TokenizedPair, collate_pairs
from dpo_exp.metrics import Metric, MetricSums, mean_metric
from dpo_exp.models import ScalarHeadModel, sample


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss −log σ(r(y_w) − r(y_l)) of each pair (Bradley–Terry; Ouyang et al. 2022, eq. 1).
    (B,), (B,) → (B,)."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


def pair_score_metrics(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> dict[str, Metric]:
    """Per pair: accuracy (r(y_w) > r(y_l) strictly) and margin r(y_w) − r(y_l)."""
    return {"accuracy": mean_metric((chosen_scores > rejected_scores).float()),
            "margin": mean_metric(chosen_scores - rejected_scores)}


@ALGORITHMS.register("reward_model", config=LossConfig, validate=validate_beta)
class RewardModelAlgorithm(OfflineAlgorithm):
    """Trains `res.reward_model` (a ScalarHeadModel) on the task's pairs; one step = a batch of pairs."""

    family = "reward_model"
    headline = (("held-out preference accuracy (reward model)", "eval/accuracy"),
                ("held-out mean margin r(y_w) - r(y_l)", "eval/margin"),
                ("held-out loss -log sigmoid(margin)", "eval/loss"))
    sections = ("reward_model",)
    cached = True  # its product is a cache entry that other runs reuse (dpo_exp.stages.reward_model_dir)

    def __init__(self, name: str, cfg: Any, res):
        super().__init__(name, cfg, res)
        self.layout = PADDED  # the scalar head scores each row's last token: one left-padded row per response
        self.scorer = RewardModelScorer(res.reward_model, res.tokenizer.pad_token_id, precision=self.precision,
                                        raw=True)

    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        return Needs(reward_model=True, policy=False)

    @classmethod
    def label(cls, cfg: Any) -> str:
        return "reward model"

    def trained(self) -> dict:
        return {"reward_model": (self.res.reward_model, self.cfg.optimizer)}

    def loss(self, micro: Batch) -> StepOutput:
        scores = self.scorer.score_batch(micro)
        chosen, rejected = scores[:micro.pairs], scores[micro.pairs:]
        return StepOutput(bradley_terry_loss(chosen, rejected).sum(), pair_score_metrics(chosen, rejected))


class RewardModelEvaluator:
    """Held-out loss, accuracy (r_w > r_l strictly) and margin (r_w − r_l), means over pairs."""

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 64, precision: str = "fp32"):
        self.pairs, self.pad_id, self.batch_size, self.precision = list(pairs), pad_id, batch_size, precision

    @torch.no_grad()
    def __call__(self, model: ScalarHeadModel, step: int) -> tuple[dict, dict]:
        if not self.pairs:
            return {}, {}
        scorer = RewardModelScorer(model, self.pad_id, precision=self.precision, raw=True)
        was_training = model.training
        model.eval()
        sums = MetricSums()  # under torchrun each rank sums its share of the pairs
        for rows, real in distributed.shared_batches(len(self.pairs), self.batch_size):
            batch = collate_pairs([self.pairs[i] for i in rows], self.pad_id)
            scores = scorer.score_batch(batch)
            if not real:  # a stand-in batch: this rank had no pairs left
                continue
            chosen, rejected = scores[:batch.pairs], scores[batch.pairs:]
            sums.add("loss", *mean_metric(bradley_terry_loss(chosen, rejected)))
            sums.merge(pair_score_metrics(chosen, rejected))
        model.train(was_training)
        return {f"eval/{name}": value for name, value in distributed.reduce_metrics(sums).means().items()}, {}


@torch.no_grad()
def normalise_reward_model(reward_model: ScalarHeadModel, sft_policy: nn.Module, tokenizer,
                           prompt_ids: Sequence[list[int]], max_new_tokens: int, temperature: float,
                           batch_size: int = 64, precision: str = "fp32") -> dict:
    """Set reward_model.offset = mean raw score of π_SFT samples on `prompt_ids` → {offset, std, n}.

    After this, the score of π_SFT's own samples has mean 0 (N+ details, reward normalisation).
    """
    samples = sample(sft_policy, tokenizer, prompt_ids, max_new_tokens, temperature, batch_size=batch_size)
    raw = RewardModelScorer(reward_model, tokenizer.pad_token_id, batch_size, precision, raw=True).scores(
        samples.prompt_ids, samples.response_ids)
    reward_model.offset = raw.mean().item()
    return {"offset": reward_model.offset, "std": raw.std().item() if len(raw) > 1 else 0.0, "n": len(raw)}
