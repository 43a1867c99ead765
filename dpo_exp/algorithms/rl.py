"""The RL maths of PPO, as pure functions of tensors (no models), each tested by hand.

B = batch rows, T = response columns; masks are bool (B, T) and contiguous per row, so left-
and right-aligned layouts give the same results. Sources: "The N+ Implementation Details of
RLHF with PPO" (Huang et al. 2024), TRL's last PPOTrainer, Ziegler et al. (2019).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (token-level mean over the whole batch, as TRL). () scalar."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over mask; Bessel-corrected like TRL's masked_var (n/(n−1)) when n > 1."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(B, T) → (B, T): (x − mean)/sqrt(var + eps) over the valid tokens of the batch.

    shift_mean=False adds the mean back (scale only), as TRL's `masked_whiten`.
    Masked positions are set to 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(out.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) contiguous mask → (B,) column of each row's last valid token (0 for an empty row)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * cols).argmax(-1)


def per_token_rewards(score: torch.Tensor, policy_logps: torch.Tensor, ref_logps: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·(log π(y_t) − log π_ref(y_t)) on every response token, + score at the last one.

    score: (B,); policy_logps, ref_logps: (B, T) per-token log-probs; mask: (B, T) → (B, T),
    0 at masked positions. (The k1 KL estimator, TRL's default.)
    """
    mask_f = mask.to(policy_logps.dtype)
    rewards = -kl_coef * (policy_logps - ref_logps) * mask_f
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_token = mask.any(-1)
    rewards[rows[has_token], last_token_index(mask)[has_token]] += score[has_token].to(rewards.dtype)
    return rewards


def apply_missing_eos_penalty(score: torch.Tensor, has_eos: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """(B,) scores with rows that never emitted EOS replaced by the fixed `penalty` score (e.g. −1).

    N+ details §"EOS trick": a truncated response gets a constant low score instead of its
    reward-model score. penalty=None leaves scores unchanged.
    """
    if penalty is None:
        return score
    return torch.where(has_eos.to(score.device), score, torch.full_like(score, float(penalty)))


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's valid tokens → (advantages, returns), (B, T).

    δ_t = r_t + γ·V_{t+1} − V_t  (V_{t+1} = 0 after the last valid token: the episode ends)
    A_t = δ_t + γλ·A_{t+1}       (A_{t+1} = 0 after the last valid token)
    returns_t = A_t + V_t        (before any whitening of A)
    Works for left- or right-aligned contiguous masks: the next token exists iff mask[t+1].
    rewards, values, mask: (B, T). Masked positions come out 0.
    """
    mask_f = mask.to(values.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    next_valid = torch.zeros_like(mask_f[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value * next_valid - values[:, t]
        adv = (delta + gamma * lam * next_adv * next_valid) * mask_f[:, t]
        advantages[:, t] = adv
        next_adv, next_value, next_valid = adv, values[:, t], mask_f[:, t]
    returns = (advantages + values) * mask_f
    return advantages, returns


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO-clip (Schulman et al. 2017), token level. All inputs (B, T) → scalars.

    ratio = exp(log π − log π_old); loss = mean_t max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε));
    clipfrac = fraction of tokens where the clipped term is the larger one (i.e. is used);
    approx_kl = ½·mean (log π − log π_old)²  (TRL's estimator of KL(π_old ‖ π)).
    """
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logps.dtype), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 / TRL), inputs (B, T) → (loss, clipfrac) scalars.

    V_clip = V_old + clip(V − V_old, −c, c); loss = ½·mean_t max((V − R)², (V_clip − R)²).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clipfrac.detach()


class FixedKLController:
    """β constant."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019) §2.2: e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps/horizon).

    current_kl: mean sequence-level KL of the rollout (nats); n_steps: episodes in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL control needs target > 0 and horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon
