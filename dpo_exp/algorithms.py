"""Algorithms: a batch of pairs → per-pair loss and metrics. The loop knows none of them.

An algorithm declares what it needs (`needs_reference`, `uses_rejected`); the builder
in train.py reads those declarations instead of checking loss names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dpo_exp.config import LossConfig, LossName, needs_reference
from dpo_exp.losses import preference_loss
from dpo_exp.models import SequenceLogps


@dataclass
class PairLogps:
    chosen: torch.Tensor             # (B,) summed log-probs
    rejected: Optional[torch.Tensor]  # (B,) or None when the rejected side was not computed
    chosen_length: torch.Tensor      # (B,) response tokens
    rejected_length: Optional[torch.Tensor]

    def to(self, device: torch.device) -> "PairLogps":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairLogps(move(self.chosen), move(self.rejected), move(self.chosen_length), move(self.rejected_length))

    @classmethod
    def split(cls, seq: SequenceLogps, with_rejected: bool) -> "PairLogps":
        if not with_rejected:
            return cls(seq.logps, None, seq.lengths, None)
        b = seq.logps.shape[0] // 2
        return cls(seq.logps[:b], seq.logps[b:], seq.lengths[:b], seq.lengths[b:])


@dataclass
class StepOutput:
    loss: torch.Tensor                 # (B,) per-pair loss; the trainer sums and divides by `normaliser`
    metrics: dict[str, torch.Tensor]   # name -> (B,) per-pair values, averaged by the logger


class PreferenceAlgorithm:
    """The DPO family: every loss of dpo_exp.losses on chosen/rejected log-probs."""

    uses_rejected = True

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.name = LossName(cfg.name).value
        self.needs_reference = needs_reference(cfg)

    def normaliser(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(batch["index"].shape[0]))  # pairs

    def __call__(self, policy: PairLogps, reference: Optional[PairLogps]) -> StepOutput:
        use_ref = self.needs_reference and reference is not None
        out = preference_loss(
            self.name, policy.chosen, policy.rejected,
            reference.chosen if use_ref else None, reference.rejected if use_ref else None,
            self.cfg.beta, label_smoothing=self.cfg.label_smoothing, alpha=self.cfg.alpha, gamma=self.cfg.gamma,
            chosen_length=policy.chosen_length, rejected_length=policy.rejected_length)
        return StepOutput(out.loss, reward_metrics(out.chosen_rewards, out.rejected_rewards, policy))


class SFTAlgorithm:
    """Preferred-FT / SFT: per-token NLL of the chosen response."""

    needs_reference = False
    uses_rejected = False
    name = "sft"

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg

    def normaliser(self, batch: dict) -> torch.Tensor:
        b = batch["index"].shape[0]
        return batch["response_mask"][:b].sum().float()  # chosen tokens: a per-token mean over the whole step

    def __call__(self, policy: PairLogps, reference: Optional[PairLogps]) -> StepOutput:
        metrics = {"logps/chosen": policy.chosen.detach()}
        if policy.rejected is not None:
            metrics["logps/rejected"] = policy.rejected.detach()
            if reference is not None:  # at evaluation: the implicit reward of the SFT policy, same β
                beta = self.cfg.beta
                metrics = reward_metrics(beta * (policy.chosen - reference.chosen).detach(),
                                         beta * (policy.rejected - reference.rejected).detach(), policy)
        return StepOutput(-policy.chosen, metrics)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: PairLogps) -> dict:
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }


def build_algorithm(cfg: LossConfig):
    return SFTAlgorithm(cfg) if LossName(cfg.name) is LossName.sft else PreferenceAlgorithm(cfg)
