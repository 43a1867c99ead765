"""PPO for RLHF (the DPO paper's PPO baseline), as an algorithm of the shared loop.

Follows "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) and TRL's last
PPOTrainer; the maths is in dpo_exp.algorithms.rl:

- Each iteration samples one response per prompt from the policy with the KV cache (pure
  temperature sampling), responses cut after their stop token (EOS, or the chat template's end of turn:
  dpo_exp.models.templates.stop_token_ids).
- Per-token reward r_t = −β·(log π(y_t) − log π_ref(y_t)) at every response token, plus the
  score (reward model or gold reward) at the last one. A response that never emitted a stop token gets
  `missing_eos_penalty` as its score instead (null disables).
- GAE with γ = 1, λ = 0.95; returns = advantages (before whitening) + values; advantages are
  whitened over the valid tokens of the rollout batch.
- The iteration's updates: `ppo_epochs` passes over shuffled minibatches of the rollout, each an
  optimizer step of the policy and of the value model (clipped policy loss, clipped value loss).
- KL control: fixed β, or the adaptive controller of Ziegler et al. (2019), updated per iteration.

Layout. Rollout batches are LEFT-padded (dpo_exp.data.collate_sequences): each sequence ends at
the last column, so a batch of R-token-wide responses sits in its last R columns, the last
response token of every row is the last column, and the value of response token t (the state
before y_t) is read at column L − R − 1 + t, i.e. `scalars[:, -R-1:-1]`, as the logits.

Temperature. With rollouts at temperature T, every PPO log-prob (old, new, π_ref) is of
softmax(logits / T), as in TRL: the ratio is then that of the distribution the samples came
from, and `train/kl` is KL(π_T ‖ π_ref,T); the evaluator's `eval/kl` is at T = 1.

Value model: a separate ScalarHeadModel, a copy of the reward model (N+ details), or, with the
gold reward, a copy of π_SFT with a zero head (lm-human-preferences); built by train.py.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpo_exp import distributed
from dpo_exp.algorithms.base import ALGORITHMS, Algorithm, Experience, Needs, StepBatch, StepOutput, validate_beta
from dpo_exp.algorithms.rl import (AdaptiveKLController, FixedKLController, apply_missing_eos_penalty, clipped_policy_loss,
                                   clipped_value_loss, gae, masked_mean, per_token_rewards, whiten)
from dpo_exp.algorithms.scorers import GoldScorer, RewardModelScorer
from dpo_exp.config import LossConfig, OptimizerConfig, OptimizerName, RewardSource, Schedule
from dpo_exp.errors import ConfigError
from dpo_exp.data import Batch, collate_sequences
from dpo_exp.models import autocast, disable_dropout, sample, sequence_logps


@dataclass
class Rollout:
    """The policy's samples and what was computed for them at sampling time; a micro-batch is some of its rows."""
    batch: Batch                # collate_sequences: (B, L) left-padded rows, response_mask (B, R); on the device
    logps: torch.Tensor         # (B, R) old log π_T
    values: torch.Tensor        # (B, R) old V
    advantages: torch.Tensor    # (B, R) (whitened if configured)
    returns: torch.Tensor       # (B, R)

    def rows(self, rows: torch.Tensor) -> "Rollout":
        return Rollout(self.batch.rows(rows), self.logps[rows], self.values[rows], self.advantages[rows],
                       self.returns[rows])


class RolloutRows(StepBatch):
    """One minibatch of a rollout (rows of the rollout batch); micro-batches are sub-selections."""

    def __init__(self, rollout: Rollout, rows: torch.Tensor):
        self.rollout, self.rows = rollout, rows

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, positions: np.ndarray) -> Rollout:
        return self.rollout.rows(self.rows[torch.as_tensor(positions, dtype=torch.long, device=self.rows.device)])


def make_scorer(res, reward: RewardSource, precision: str):
    """The score an algorithm seeks: the reward model's normalised score, or the task's gold reward."""
    if RewardSource(reward) is RewardSource.model:
        return RewardModelScorer(res.reward_model, res.tokenizer.pad_token_id, precision=precision)
    return GoldScorer(res.gold_reward)


def validate_ppo(cfg: Any) -> None:
    validate_beta(cfg)
    p = cfg.ppo
    if p.rollout_batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size={p.rollout_batch_size} does not divide evenly into "
                          f"ppo.minibatch_size={p.minibatch_size}")
    if p.micro_batch_size is not None and p.minibatch_size % p.micro_batch_size:
        raise ConfigError(f"ppo.minibatch_size={p.minibatch_size} does not divide evenly into "
                          f"ppo.micro_batch_size={p.micro_batch_size}")
    if p.target_kl is not None and p.target_kl <= 0:
        raise ConfigError(f"ppo.target_kl must be > 0 nats (got {p.target_kl}); null keeps kl_coef fixed")
    if p.temperature <= 0:
        raise ConfigError("ppo.temperature must be > 0: PPO's log-probs are of the tempered policy")


@ALGORITHMS.register("ppo", config=LossConfig, validate=validate_ppo)
class PPO(Algorithm):
    unit = "episodes"
    headline = ()  # the gold reward and KL of its samples say it all
    sections = ("loss", "ppo")

    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        return Needs(reference=True, reward_model=RewardSource(cfg.ppo.reward) is RewardSource.model,
                     value_model=True, rollouts=True, rejected=False)

    @classmethod
    def family_of(cls, cfg: Any) -> str:
        return "ppo" if RewardSource(cfg.ppo.reward) is RewardSource.model else "ppo-gt"

    @classmethod
    def label(cls, cfg: Any) -> str:
        p = cfg.ppo
        if RewardSource(p.reward) is RewardSource.gold:
            return "PPO-GT"
        return f"PPO target KL={p.target_kl:g}" if p.target_kl else f"PPO β={p.kl_coef:g}"

    def iterations(self) -> int:
        p = self.p
        return math.ceil(p.total_episodes / p.rollout_batch_size) if p.total_episodes else p.total_iterations

    @classmethod
    def loop_overrides(cls, cfg: Any) -> dict:
        p = cfg.ppo
        micro = p.micro_batch_size or p.minibatch_size
        return {"eval_every": p.eval_every, "log_every": 1, "grad_accumulation_steps": p.minibatch_size // micro}

    def __init__(self, name: str, cfg: Any, res):
        super().__init__(name, cfg, res)
        p = cfg.ppo
        tok = res.tokenizer
        if not res.prompt_ids:
            raise ValueError("PPO needs training prompts")
        if tok.pad_token_id == tok.eos_token_id:
            # N+ details: pad ≠ EOS. Masks here come from lengths, never from pad ids, so pad == EOS
            # is harmless, but a distinct pad token is the safe layout.
            warnings.warn("pad token == EOS token; PPO builds masks from lengths, but a distinct pad token "
                          "is recommended", stacklevel=2)
        self.p = p
        self.policy, self.value_model = res.policy, res.value_model
        disable_dropout(self.policy)        # PPO's ratio needs deterministic log-probs
        disable_dropout(self.value_model)
        self.score = make_scorer(res, p.reward, self.precision)
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.target_kl, p.horizon) if p.target_kl is not None
                       else FixedKLController(p.kl_coef))
        self.generator = torch.Generator().manual_seed(cfg.seed)  # prompt order and minibatch shuffles
        self._prompt_order: list[int] = []
        self.episodes = 0

    def trained(self) -> dict[str, tuple[torch.nn.Module, OptimizerConfig]]:
        p = self.p

        def adamw(lr: float) -> OptimizerConfig:  # N+ details: Adam ε 1e-5; TRL anneals lr linearly to 0
            return OptimizerConfig(name=OptimizerName.adamw, lr=lr, eps=p.adam_eps, weight_decay=p.weight_decay,
                                   warmup_steps=0, schedule=Schedule.linear if p.anneal_lr else Schedule.constant,
                                   max_grad_norm=p.max_grad_norm or 0.0)
        return {"policy": (self.policy, adamw(p.lr)), "value": (self.value_model, adamw(p.value_lr or p.lr))}

    def steps_per_iteration(self) -> int:
        return self.p.ppo_epochs * (self.p.rollout_batch_size // self.p.minibatch_size)

    # ---- experience: one rollout -----------------------------------------------------------
    def _next_prompts(self) -> list[int]:
        """Indices of the next rollout_batch_size prompts: a fresh seeded permutation per pass."""
        out = []
        while len(out) < self.p.rollout_batch_size:
            if not self._prompt_order:
                self._prompt_order = torch.randperm(len(self.res.prompt_ids), generator=self.generator).tolist()
            out.append(self._prompt_order.pop())
        return out

    @torch.no_grad()
    def experience(self, iteration: int) -> Experience:
        p, tok, device = self.p, self.res.tokenizer, self.res.device
        idx = self._next_prompts()
        prompt_ids = [self.res.prompt_ids[i] for i in idx]
        prompt_texts = [self.res.prompt_texts[i] for i in idx]
        samples = sample(self.policy, tok, prompt_ids, p.max_new_tokens, p.temperature,
                         batch_size=p.generation_batch_size)
        batch = collate_sequences(prompt_ids, samples.response_ids, tok.pad_token_id).to(device)
        mask = batch.response_mask                                      # (B, R), right-aligned
        B, R = mask.shape
        self.policy.eval()
        self.value_model.eval()

        def forward(rows: list[int]) -> list[torch.Tensor]:  # under torchrun: this rank's share of the rollout
            out = []
            with self.res.reference.model() as ref:
                for s in range(0, len(rows), p.forward_batch_size):
                    index = torch.tensor(rows[s:s + p.forward_batch_size], device=device)
                    sub = batch.rows(index)
                    with autocast(device, self.precision):
                        pol = sequence_logps(self.policy, sub, p.temperature, per_token=True, with_entropy=True)
                        rlp = sequence_logps(ref, sub, p.temperature, per_token=True).tokens
                        v = self.value_model.forward_batch(sub)[:, -R - 1:-1]  # V(state before y_t)
                    # (b, 4, R): log π_T, entropy, log π_ref,T, V per token
                    out.extend(torch.stack([pol.tokens.float(), pol.entropy.float(), rlp.float(), v.float()], 1).cpu())
            return out

        per_token = torch.stack(distributed.map_shared(range(B), forward)).to(device)  # (B, 4, R) on every rank
        self.policy.train()
        self.value_model.train()
        logps, entropy, ref_logps, values = per_token.unbind(1)
        values = values * mask
        raw_scores = self.score(prompt_texts, prompt_ids, samples.response_ids, samples.texts)
        raw_scores = torch.as_tensor(raw_scores, dtype=torch.float32).to(device).reshape(B)
        has_eos = torch.tensor(samples.ended, dtype=torch.bool, device=device)  # ended at a stop token
        scores = apply_missing_eos_penalty(raw_scores, has_eos, p.missing_eos_penalty)
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(scores, logps, ref_logps, mask, kl_coef)   # (B, R)
        advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, mask)
        seq_kl = ((logps - ref_logps) * mask).sum(-1)                           # (B,) Σ_t log π/π_ref
        self.episodes += B
        metrics = {
            "reward": scores.mean().item(),
            "reward_raw": raw_scores.mean().item(),  # before the missing-EOS penalty
            "kl": seq_kl.mean().item(),
            "rlhf_reward": (scores - kl_coef * seq_kl).mean().item(),
            "kl_coef": kl_coef,
            "entropy": masked_mean(entropy, mask).item(),  # of π_T (logits/T), per token, old policy
            "response_length": mask.sum(-1).float().mean().item(),
            "eos_fraction": has_eos.float().mean().item(),
            "value_mean": masked_mean(values, mask).item(),
        }
        rollout = Rollout(batch, logps, values, advantages, returns)
        steps = []
        for _ in range(p.ppo_epochs):
            order = torch.randperm(B, generator=self.generator).to(device)
            steps.extend(RolloutRows(rollout, mb) for mb in order.split(p.minibatch_size))
        tokens = int(batch.attention_mask.sum().item()) * p.ppo_epochs
        return Experience(steps, metrics, {"episodes": self.episodes}, examples=B, tokens=tokens)

    # ---- update: one micro-batch of a minibatch --------------------------------------------
    def normaliser(self, micro: Rollout) -> torch.Tensor:
        return micro.batch.response_mask.sum().float()  # response tokens: PPO's losses are token means

    def loss(self, micro: Rollout) -> StepOutput:
        p, mask = self.p, micro.batch.response_mask
        R = mask.shape[1]
        n = mask.sum()
        with autocast(self.res.device, self.precision):
            logps = sequence_logps(self.policy, micro.batch, p.temperature, per_token=True).tokens
            values = self.value_model.forward_batch(micro.batch)[:, -R - 1:-1]
        pl, clipfrac, approx_kl = clipped_policy_loss(logps.float(), micro.logps, micro.advantages, mask,
                                                      p.clip_range)
        vl, value_clipfrac = clipped_value_loss(values.float(), micro.values, micro.returns, mask,
                                                p.value_clip_range)
        count = float(n.item())
        token_mean = lambda x: (x.detach() * n, count)  # noqa: E731  (a token mean, re-weighted over the step)
        return StepOutput((pl + vl) * n, {"policy_loss": token_mean(pl), "value_loss": token_mean(vl),
                                          "clipfrac": token_mean(clipfrac), "value_clipfrac": token_mean(value_clipfrac),
                                          "approx_kl": token_mean(approx_kl)})

    def end_iteration(self, metrics: dict) -> None:
        self.kl_ctl.update(metrics["kl"], self.p.rollout_batch_size)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_ctl.value, "episodes": self.episodes, "generator": self.generator.get_state(),
                "prompt_order": list(self._prompt_order)}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.value, self.episodes = float(state["kl_coef"]), int(state["episodes"])
        self.generator.set_state(state["generator"])
        self._prompt_order = list(state["prompt_order"])

