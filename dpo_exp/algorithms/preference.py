"""The DPO family: every preference loss of dpo_exp.losses on chosen/rejected log-probs, offline."""
from __future__ import annotations

from typing import Any, Optional

import torch

from dpo_exp.algorithms.base import Needs, OfflineAlgorithm, StepOutput, mean_metric, register
from dpo_exp.losses import VARIANTS, preference_loss
from dpo_exp.models import PairLogps, autocast, sequence_logps


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: PairLogps) -> dict:
    """The shared metric scheme of pair losses (names of the DPO authors' code and TRL), per pair."""
    return {
        "rewards/chosen": mean_metric(chosen_rewards),
        "rewards/rejected": mean_metric(rejected_rewards),
        "rewards/margins": mean_metric(chosen_rewards - rejected_rewards),
        "rewards/accuracies": mean_metric((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": mean_metric(policy.chosen),
        "logps/rejected": mean_metric(policy.rejected),
    }


def policy_pair_logps(algorithm, batch: dict, with_rejected: bool) -> PairLogps:
    """Policy log-probs of a collated micro-batch (one concatenated chosen+rejected forward)."""
    policy = algorithm.res.policy
    device = next(policy.parameters()).device
    with autocast(device, algorithm.precision):
        seq = sequence_logps(policy, batch)
    return PairLogps.split(seq, with_rejected)


def reference_pair_logps(algorithm, batch: dict, with_rejected: bool, table: Optional[str]) -> PairLogps:
    device = next(algorithm.res.policy.parameters()).device
    return algorithm.res.reference.pair_logps(batch, with_rejected, table=table).to(device)


@register(*VARIANTS)
class PreferenceAlgorithm(OfflineAlgorithm):
    """DPO and its variants (loss.name picks the variant): one step = a batch of pairs."""

    family = "dpo-family"

    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        uses_reference = VARIANTS[str(cfg.loss.name)].uses_reference and not cfg.loss.reference_free
        return Needs(reference=uses_reference)

    @classmethod
    def label(cls, cfg: Any) -> str:
        return f"{str(cfg.loss.name).upper()} β={cfg.loss.beta:g}"

    def __init__(self, name: str, cfg: Any, res):
        super().__init__(name, cfg, res)
        self.uses_reference = self.needs(cfg).reference

    def normaliser(self, micro: dict) -> torch.Tensor:
        return torch.tensor(float(micro["index"].shape[0]))  # pairs

    def loss(self, micro: dict) -> StepOutput:
        policy = policy_pair_logps(self, micro, True)
        reference = reference_pair_logps(self, micro, True, "train") if self.uses_reference else None
        out = self.pair_loss(policy, reference)
        out.loss = out.loss.sum()
        return out

    def pair_loss(self, policy: PairLogps, reference: Optional[PairLogps]) -> StepOutput:
        return preference_step(self.name, self.cfg.loss, policy, reference if self.uses_reference else None)


def preference_step(variant: str, loss_cfg, policy: PairLogps, reference: Optional[PairLogps]) -> StepOutput:
    """Per-pair loss of a DPO-family variant (loss.beta, label_smoothing, alpha, gamma) and its reward metrics;
    shared by offline and online DPO. reference None: the reference-free form."""
    out = preference_loss(
        variant, policy.chosen, policy.rejected, None if reference is None else reference.chosen,
        None if reference is None else reference.rejected, loss_cfg.beta, label_smoothing=loss_cfg.label_smoothing,
        alpha=loss_cfg.alpha, gamma=loss_cfg.gamma, chosen_length=policy.chosen_length,
        rejected_length=policy.rejected_length)
    return StepOutput(out.loss, reward_metrics(out.chosen_rewards, out.rejected_rewards, policy))
