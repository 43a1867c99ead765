"""Preference losses as pure functions of per-sequence log-probs.

Every variant lives in `preference_loss`, so the whole variant space is visible at
once (the habit of the DPO authors' code). Inputs are summed response log-probs of
shape (B,); the returned loss is per pair, shape (B,), so the caller chooses how to
average (the trainer divides by the global batch size for correct accumulation).

Conventions (../shared/docs/reference.md §2), h = policy log-ratio margin:
    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
- ipo uses *summed* log-probs, as the DPO authors' code does (TRL length-normalises).
- simpo uses length-normalised log-probs and no reference.
- rpo's NLL term is the chosen response's NLL per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    uses_reference: bool  # whether the loss reads π_ref log-probs (loss.reference_free=true drops them anyway)
    paper: str


# The variants `preference_loss` implements; each is registered as an algorithm under its name
# (dpo_exp.algorithms.preference), so this table is the only list of them.
VARIANTS = {
    "dpo": Variant(True, "Rafailov et al. 2023"),
    "cdpo": Variant(True, "conservative DPO / label smoothing"),
    "rdpo": Variant(True, "Chowdhury et al. 2024"),
    "ipo": Variant(True, "Azar et al. 2023"),
    "hinge": Variant(True, "SLiC-HF / RSO"),
    "rpo": Variant(True, "Pang et al. 2024"),
    "simpo": Variant(False, "Meng et al. 2024"),
}


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor              # (B,) per-pair loss
    chosen_rewards: torch.Tensor    # (B,) implicit reward β·(log π − log π_ref), detached
    rejected_rewards: torch.Tensor  # (B,)


def preference_loss(
    name: str,
    policy_chosen: torch.Tensor,       # (B,) summed log π(y_w|x)
    policy_rejected: torch.Tensor,     # (B,) summed log π(y_l|x)
    reference_chosen: torch.Tensor | None,    # (B,) summed log π_ref(y_w|x), None if reference-free
    reference_rejected: torch.Tensor | None,  # (B,)
    beta: float,
    *,
    label_smoothing: float = 0.0,     # ε of cdpo (label smoothing) and rdpo (flip rate)
    chosen_length: torch.Tensor | None = None,    # (B,) response tokens, for simpo / rpo
    rejected_length: torch.Tensor | None = None,  # (B,)
    alpha: float = 1.0,               # rpo: weight of the chosen NLL
    gamma: float = 0.5,               # simpo: target reward margin
) -> LossOutput:
    if reference_chosen is None or reference_rejected is None:
        reference_chosen = torch.zeros_like(policy_chosen)
        reference_rejected = torch.zeros_like(policy_rejected)
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing

    if name == "dpo":          # Rafailov et al. 2023, eq. 7
        loss = -F.logsigmoid(beta * h)
    elif name == "cdpo":       # conservative DPO: labels flipped with probability ε
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif name == "rdpo":       # Chowdhury et al. 2024: unbiased under flip rate ε
        loss = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif name == "ipo":        # Azar et al. 2023, on summed log-probs
        loss = (h - 1 / (2 * beta)) ** 2
    elif name == "hinge":      # SLiC-HF / RSO
        loss = torch.relu(1 - beta * h)
    elif name == "rpo":        # DPO + α·NLL(chosen) per token (Pang et al. 2024)
        if chosen_length is None:
            raise ValueError("rpo needs chosen_length")
        loss = -F.logsigmoid(beta * h) - alpha * policy_chosen / chosen_length
    elif name == "simpo":      # Meng et al. 2024: length-normalised, no reference
        if chosen_length is None or rejected_length is None:
            raise ValueError("simpo needs chosen_length and rejected_length")
        chosen_ratio = policy_chosen / chosen_length
        rejected_ratio = policy_rejected / rejected_length
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio) - gamma)
    else:
        raise ValueError(f"unknown preference loss {name!r}; known: {', '.join(VARIANTS)}")

    return LossOutput(loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())

