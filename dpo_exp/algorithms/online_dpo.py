"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

Each step: trainer.batch_size prompts; two responses per prompt sampled from the CURRENT policy;
an annotator (the trained reward model, or the task's gold reward) labels each pair; a
DPO-family step (online_dpo.loss, default dpo) against π_ref = π_SFT on the labelled pairs.
Pairs keep the exact sampled tokens (EOS only where the policy emitted it). A pair the
annotator scores equal is dropped (`ties`). With a learned annotator and a task that has a
gold reward, `annotator_agreement` is how often the annotator's label matches the gold one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_exp.algorithms.base import ALGORITHMS, Algorithm, Experience, Needs, PairBatch, StepOutput, batch_plan, validate_beta
from dpo_exp.algorithms.ppo import make_scorer
from dpo_exp.algorithms.preference import policy_pair_logps, preference_step, validate_label_smoothing
from dpo_exp.algorithms.scorers import GoldScorer
from dpo_exp.config import LossConfig, RewardSource
from dpo_exp.errors import ConfigError
from dpo_exp.losses import VARIANTS
from dpo_exp.data import Batch, PairLayout, TokenizedPair, collate_pairs
from dpo_exp.models import PairLogps, sample


@dataclass(kw_only=True)
class ReferencedPairs(Batch):
    """A micro-batch of labelled pairs with their π_ref log-probs."""
    reference_chosen: torch.Tensor    # (B,) summed log π_ref of the chosen responses
    reference_rejected: torch.Tensor  # (B,) of the rejected ones


class OnlinePairBatch(PairBatch):
    """Freshly labelled pairs with their π_ref log-probs, computed once when they were sampled."""

    def __init__(self, pairs, pad_id: int, reference: PairLogps, layout: PairLayout):
        super().__init__(pairs, pad_id, with_rejected=True, layout=layout)
        self.reference = reference

    def select(self, rows) -> ReferencedPairs:
        batch = collate_pairs([self.pairs[i] for i in rows], self.pad_id, layout=self.layout)
        index = torch.as_tensor(rows, dtype=torch.long)
        return ReferencedPairs(**vars(batch), reference_chosen=self.reference.chosen[index],
                               reference_rejected=self.reference.rejected[index])


@dataclass
class OnlineDPOLossConfig(LossConfig):
    """β and the settings of the DPO-family loss each step takes (online_dpo.loss)."""
    label_smoothing: float = 0.0  # ε of online_dpo.loss=cdpo|rdpo
    alpha: float = 1.0            # NLL weight of online_dpo.loss=rpo


def validate_online_dpo(cfg: Any) -> None:
    validate_beta(cfg)
    validate_label_smoothing(cfg)
    o = cfg.online_dpo
    if o.loss not in VARIANTS or not VARIANTS[o.loss].uses_reference:
        raise ConfigError(f"online_dpo.loss={o.loss} must be a reference-based preference loss: "
                          f"{', '.join(n for n, v in VARIANTS.items() if v.uses_reference)}")
    if o.temperature <= 0:
        raise ConfigError("online_dpo.temperature must be > 0: pairs are samples of the policy")


@ALGORITHMS.register("online_dpo", config=OnlineDPOLossConfig, validate=validate_online_dpo)
class OnlineDPO(Algorithm):
    """The plan is over training prompts (batch_size prompts per step), not over fixed pairs."""

    family = "online-dpo"
    sections = ("loss", "online_dpo")

    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        return Needs(reference=True, reward_model=RewardSource(cfg.online_dpo.annotator) is RewardSource.model,
                     rollouts=True)

    @classmethod
    def label(cls, cfg: Any) -> str:
        annotator = "RM" if RewardSource(cfg.online_dpo.annotator) is RewardSource.model else "gold"
        return f"Online DPO β={cfg.loss.beta:g} ({annotator})"

    def __init__(self, name: str, cfg: Any, res):
        super().__init__(name, cfg, res)
        t = cfg.trainer
        self.o = cfg.online_dpo
        if not res.prompt_ids:
            raise ValueError("online DPO needs training prompts")
        self.plan = batch_plan(len(res.prompt_ids), t.batch_size, t.epochs, t.max_steps, cfg.seed)
        self.score = make_scorer(res, self.o.annotator, self.precision)
        # with a learned annotator, how often it agrees with the task's gold reward
        self.gold = (GoldScorer(res.gold_reward) if res.gold_reward is not None
                     and RewardSource(self.o.annotator) is RewardSource.model else None)
        self.layout = PairLayout.of(t, cfg.model.attn_implementation)

    def iterations(self) -> int:
        return len(self.plan)

    @torch.no_grad()
    def experience(self, iteration: int) -> Experience:
        o, res, tok = self.o, self.res, self.res.tokenizer
        idx = self.plan[iteration]
        prompt_ids = [res.prompt_ids[i] for i in idx for _ in range(2)]     # rows 2i, 2i+1: one prompt's two samples
        prompt_texts = [res.prompt_texts[i] for i in idx for _ in range(2)]
        max_new = o.max_new_tokens or self.cfg.task.generation.max_new_tokens
        samples = sample(res.policy, tok, prompt_ids, max_new, o.temperature, batch_size=o.generation_batch_size)
        scores = torch.as_tensor(self.score(prompt_texts, prompt_ids, samples.response_ids, samples.texts),
                                 dtype=torch.float32).reshape(-1, 2)
        gold = (self.gold(prompt_texts, prompt_ids, samples.response_ids, samples.texts).reshape(-1, 2)
                if self.gold is not None else None)
        pairs, agree, judged = [], 0, 0
        for i in range(len(idx)):
            a, b = samples.response_ids[2 * i], samples.response_ids[2 * i + 1]
            gap = (scores[i, 0] - scores[i, 1]).item()
            if a == b or abs(gap) < 1e-9:
                continue  # a tie carries no preference
            chosen, rejected = (a, b) if gap > 0 else (b, a)
            pairs.append(TokenizedPair(len(pairs), prompt_ids[2 * i], chosen, rejected))
            if gold is not None and (gold_gap := (gold[i, 0] - gold[i, 1]).item()) != 0:
                judged += 1
                agree += int((gold_gap > 0) == (gap > 0))
        metrics = {"ties": 1.0 - len(pairs) / len(idx), "annotator_score": scores.mean().item(),
                   "response_length": sum(map(len, samples.response_ids)) / len(samples.response_ids)}
        if judged:
            metrics["annotator_agreement"] = agree / judged
        if not pairs:
            return Experience([], metrics)
        # π_ref is fixed: once per pair (under torchrun each rank scores a share of the pairs)
        chosen, rejected = res.reference.logps_of_pairs(pairs, tok.pad_token_id, self.cfg.trainer.eval_batch_size)
        lengths = lambda side: torch.tensor([len(getattr(p, side)) for p in pairs])  # noqa: E731
        step = OnlinePairBatch(pairs, tok.pad_token_id, PairLogps(chosen, rejected, lengths("chosen_ids"),
                                                                  lengths("rejected_ids")), self.layout)
        return Experience([step], metrics, examples=len(pairs), tokens=step.tokens())

    def loss(self, micro: ReferencedPairs) -> StepOutput:
        policy = policy_pair_logps(self, micro, True)
        device = policy.chosen.device
        reference = PairLogps(micro.reference_chosen.to(device), micro.reference_rejected.to(device),
                              policy.chosen_length, policy.rejected_length)
        out = self.pair_loss(policy, reference)
        out.loss = out.loss.sum()
        return out

    def pair_loss(self, policy: PairLogps, reference) -> StepOutput:
        return preference_step(self.o.loss, self.cfg.loss, policy, reference)
