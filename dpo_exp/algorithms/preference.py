"""The DPO family: every preference loss of dpo_exp.losses on chosen/rejected log-probs, offline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dpo_exp.algorithms.base import ALGORITHMS, Needs, OfflineAlgorithm, StepOutput, mean_metric, validate_beta
from dpo_exp.config import LossConfig
from dpo_exp.errors import ConfigError
from dpo_exp.data import Batch
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


def policy_pair_logps(algorithm, batch: Batch, with_rejected: bool) -> PairLogps:
    """Policy log-probs of a collated micro-batch (one concatenated chosen+rejected forward)."""
    policy = algorithm.res.policy
    device = next(policy.parameters()).device
    with autocast(device, algorithm.precision):
        seq = sequence_logps(policy, batch)
    return PairLogps.split(seq, with_rejected)


def reference_pair_logps(algorithm, batch: Batch, with_rejected: bool, table: Optional[str]) -> PairLogps:
    device = next(algorithm.res.policy.parameters()).device
    return algorithm.res.reference.pair_logps(batch, with_rejected, table=table).to(device)


@dataclass
class PreferenceLossConfig(LossConfig):
    """dpo, ipo, hinge."""
    reference_free: bool = False  # true: drop the π_ref terms (a uniform reference)


@dataclass
class SmoothedLossConfig(PreferenceLossConfig):
    """cdpo, rdpo: the labels are assumed flipped with probability ε."""
    label_smoothing: float = 0.0  # ε in [0, 0.5)


@dataclass
class RPOConfig(PreferenceLossConfig):
    alpha: float = 1.0  # weight of the chosen response's per-token NLL


@dataclass
class SimPOConfig(LossConfig):
    """SimPO has no reference model."""
    gamma: float = 0.5  # target reward margin γ


VARIANT_CONFIGS = {"cdpo": SmoothedLossConfig, "rdpo": SmoothedLossConfig, "rpo": RPOConfig, "simpo": SimPOConfig}


def validate_label_smoothing(cfg: Any) -> None:
    if "label_smoothing" in cfg.loss and not 0 <= cfg.loss.label_smoothing < 0.5:
        raise ConfigError(
            f"loss.label_smoothing must be in [0, 0.5) (got {cfg.loss.label_smoothing}); "
            "it is the assumed probability that a preference label is flipped (cdpo, rdpo)")


def validate_preference(cfg: Any) -> None:
    validate_beta(cfg)
    validate_label_smoothing(cfg)


def _register_variants(cls):
    for variant in VARIANTS:
        ALGORITHMS.add(variant, cls, config=VARIANT_CONFIGS.get(variant, PreferenceLossConfig),
                       validate=validate_preference)
    return cls


@_register_variants
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

    def loss(self, micro: Batch) -> StepOutput:
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
    settings = {key: loss_cfg[key] for key in ("label_smoothing", "alpha", "gamma") if key in loss_cfg}
    out = preference_loss(
        variant, policy.chosen, policy.rejected, None if reference is None else reference.chosen,
        None if reference is None else reference.rejected, loss_cfg.beta, chosen_length=policy.chosen_length,
        rejected_length=policy.rejected_length, **settings)
    return StepOutput(out.loss, reward_metrics(out.chosen_rewards, out.rejected_rewards, policy))
