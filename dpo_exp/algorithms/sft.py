"""SFT: per-token NLL of the chosen response. The π_SFT stage, and the Preferred-FT baseline."""
from __future__ import annotations

from typing import Any, Optional

import torch

from dpo_exp.algorithms.base import ALGORITHMS, Needs, OfflineAlgorithm, StepOutput, mean_metric, validate_beta
from dpo_exp.algorithms.preference import policy_pair_logps
from dpo_exp.config import LossConfig
from dpo_exp.data import Batch
from dpo_exp.models import PairLogps


@ALGORITHMS.register("sft", config=LossConfig, validate=validate_beta)
class SFTAlgorithm(OfflineAlgorithm):
    """Preferred-FT / SFT. The loss is a per-token mean over every chosen token of the whole step."""

    family = "sft"
    unit = "sequences"
    headline = (("held-out NLL per chosen token", "eval/loss"),
                ("held-out log-ratio accuracy (log pi/pi_ref, chosen > rejected)", "eval/log_ratio_accuracy"))

    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        return Needs(rejected=False)

    @classmethod
    def label(cls, cfg: Any) -> str:
        return "Preferred-FT"

    def normaliser(self, micro: Batch) -> torch.Tensor:
        return micro.lengths[:micro.pairs].sum().float()  # chosen tokens

    def loss(self, micro: Batch) -> StepOutput:
        policy = policy_pair_logps(self, micro, False)
        return StepOutput(-policy.chosen.sum(), {"logps/chosen": mean_metric(policy.chosen)})

    def pair_loss(self, policy: PairLogps, reference: Optional[PairLogps]) -> StepOutput:
        """Held-out NLL of the chosen responses (per token, through normaliser); SFT has no implicit reward."""
        return StepOutput(-policy.chosen, {})
