"""PPO for RLHF (the DPO paper's PPO baseline), on plain PyTorch + transformers.

Follows "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) and TRL's
last PPOTrainer (v0.11–0.x `PPOTrainer`, `trl/trainer/ppo_trainer.py`):

- Rollouts are sampled from the policy with the KV cache (`dpo_exp.models.sample`, i.e.
  `model.generate`), pure temperature sampling (no top-k/top-p), responses cut after EOS.
- Per-token reward r_t = −β·(log π(y_t) − log π_ref(y_t)) at every response token, plus the
  score (reward model or gold reward) at the last response token. A response that never
  emitted EOS gets `missing_eos_penalty` as its score instead (None disables).
- GAE with γ = 1, λ = 0.95; returns = advantages (before whitening) + values; advantages are
  whitened over the valid tokens of the rollout batch.
- Clipped policy loss (ε = 0.2) and clipped value loss (0.5·max(...), clip 0.2), several
  PPO epochs over shuffled minibatches of each rollout batch, AdamW (ε = 1e-5), grad clipping.
- KL control: fixed β, or the adaptive controller of Ziegler et al. (2019).

Layout. Every batch is LEFT-padded by `dpo_exp.data.collate_sequences`: each sequence
ends at the last column, so a batch of R-token-wide responses sits in its last R columns
and `response_mask` (B, R) is right-aligned (False before a short response, True on it).
Consequences used throughout:
- the last response token (EOS when present) of EVERY row is the last column;
- the value of response token t (the state before y_t is chosen) is read at column
  L − R − 1 + t, i.e. `scalars[:, -R-1:-1]`, the same shift as the logits.
The pure functions below (`per_token_rewards`, `gae`, ...) take general contiguous masks,
so left- and right-aligned layouts give the same results (tests check both).

Temperature. When rollouts are sampled at temperature T, PPO's log-probs (old, new and
π_ref) are those of the temperature-scaled distributions softmax(logits / T), as in TRL:
the importance ratio is then the ratio of the distribution the samples really came
from, and the KL penalty compares π_T with π_ref,T. Consequently `train/kl` is
KL(π_T ‖ π_ref,T), while the Evaluator's `eval/kl` uses T = 1 log-probs.

Value model. ONE choice: a separate `ScalarHeadModel` (causal-LM backbone + linear head).
With a learned reward model it is a deep copy of the reward model (TRL / N+ details: value
initialised from the reward model); with a gold reward it is a copy of the initial policy
with a zero-initialised head (lm-human-preferences). See `make_value_model`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dpo_exp.data import TokenizedPair, collate_pairs, collate_sequences
from dpo_exp.loggers import RunLogger
from dpo_exp.models import autocast, disable_dropout, load_model, sample, torch_dtype
from dpo_exp.reference import Reference
from dpo_exp.trainer import count_flops, evaluate_and_log

# (prompt_texts, prompt_ids, response_ids, response_texts) -> (B,) float scores
ScoreFn = Callable[[Sequence[str], Sequence[list[int]], Sequence[list[int]], Sequence[str]], torch.Tensor]

HEAD_FILE = "score_head.safetensors"
HEAD_CONFIG = "scalar_head.json"


# ======================================================================================
# Pure functions. B = batch rows, T = response columns; masks are bool (B, T), contiguous.
# ======================================================================================

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


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss −log σ(r(y_w) − r(y_l)), mean over pairs. (B,), (B,) → ()."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


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


def response_token_logps(model: nn.Module, batch: dict, temperature: float = 1.0,
                         with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log π_T(y_t | ·) of the response tokens of a left-padded batch, float32 logits.

    The per-token form of `dpo_exp.models.sequence_logps` (same slicing and float32 upcast;
    summed at T = 1 it equals it — tested), with logits divided by the sampling temperature.
    Returns logps (B, R), 0 at masked positions, and optionally the entropy (B, R) of π_T.
    """
    device = next(model.parameters()).device
    mask = batch["response_mask"].to(device)
    width = mask.shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1]                                            # (B, R, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    labels = batch["input_ids"][:, -width:].to(device)                     # (B, R)
    log_z = logits.logsumexp(-1)                                           # (B, R)
    logps = (logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_z) * mask
    entropy = None
    if with_entropy:  # H = log Z − Σ p·logit
        entropy = (log_z - (torch.softmax(logits, -1) * logits).sum(-1)) * mask
    return logps, entropy


# ======================================================================================
# Scalar-head model: reward model and value model
# ======================================================================================

class ScalarHeadModel(nn.Module):
    """A causal-LM backbone (AutoModelForCausalLM) + nn.Linear(hidden, 1): one scalar per token.

    The backbone's base model (`backbone.base_model`, e.g. LlamaModel) gives the final
    hidden states, so the vocabulary projection is never computed. The head runs in float32.
    `offset` is the reward normalisation: `score` returns raw − offset, so that π_SFT's
    samples have mean score 0 (N+ details, "reward normalisation").

    Saved in Hugging Face format: `backbone.save_pretrained(folder)` (a loadable causal LM)
    + `score_head.safetensors` (weight (1, H), bias (1,)) + `scalar_head.json` (offset).
    """

    def __init__(self, backbone: nn.Module, head_init_std: Optional[float] = None, offset: float = 0.0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        # reward head: N(0, 1/sqrt(H+1)) (N+ details); value head from scratch: zeros (lm-human-preferences)
        std = 1.0 / math.sqrt(hidden + 1) if head_init_std is None else head_init_std
        with torch.no_grad():
            if std > 0:
                nn.init.normal_(self.head.weight, std=std)
            else:
                nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.head.to(device=next(backbone.parameters()).device)
        self.offset = float(offset)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, L) ids → (B, L) raw scalars, float32 (one per position; no offset)."""
        body = getattr(self.backbone, "base_model", None)
        if body is not None and body is not self.backbone:
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        else:  # models without a separate base model: ask for the hidden states
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False, output_hidden_states=True).hidden_states[-1]
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # float32 head even under bf16 autocast
            return self.head(hidden.float()).squeeze(-1)

    def forward_batch(self, batch: dict) -> torch.Tensor:
        device = self.head.weight.device
        return self(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["position_ids"].to(device))

    def raw_score(self, batch: dict) -> torch.Tensor:
        """(B,) scalar at each row's last response token = the last column of a left-padded batch."""
        if not bool(batch["attention_mask"][:, -1].all()):
            raise ValueError("ScalarHeadModel.score expects left-padded batches (data.collate_sequences)")
        return self.forward_batch(batch)[:, -1]

    def score(self, batch: dict) -> torch.Tensor:
        """(B,) normalised score: raw − offset."""
        return self.raw_score(batch) - self.offset

    def save_pretrained(self, folder: Union[str, Path], tokenizer=None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous(),
                   "bias": self.head.bias.detach().float().cpu().contiguous()}, str(folder / HEAD_FILE))
        (folder / HEAD_CONFIG).write_text(json.dumps(
            {"offset": self.offset, "hidden_size": self.head.in_features, "format": "dpo_exp.ppo.ScalarHeadModel/1"},
            indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa", device: Optional[Union[str, torch.device]] = None
                        ) -> "ScalarHeadModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        backbone = load_model(str(folder), dtype, attn_implementation)  # dropout off
        if device is not None:
            backbone.to(device)
        meta = json.loads((folder / HEAD_CONFIG).read_text())
        model = cls(backbone, head_init_std=0.0, offset=meta["offset"])
        state = load_file(str(folder / HEAD_FILE))
        with torch.no_grad():
            model.head.weight.copy_(state["weight"])
            model.head.bias.copy_(state["bias"])
        return model


def make_value_model(reward_model: Optional[ScalarHeadModel] = None, policy: Optional[nn.Module] = None
                     ) -> ScalarHeadModel:
    """The value model: a deep copy of the reward model when there is one (its offset is
    irrelevant: values use raw scalars), else a copy of the (initial) policy with a zero head."""
    if reward_model is not None:
        value = copy.deepcopy(reward_model)
    elif policy is not None:
        if hasattr(policy, "peft_config"):
            raise ValueError("make_value_model: pass the plain π_SFT model (e.g. load_model(sft_dir)), not a LoRA "
                             "policy; the value model trains all its weights")
        value = ScalarHeadModel(copy.deepcopy(policy), head_init_std=0.0)
    else:
        raise ValueError("make_value_model needs a reward model or a policy to copy")
    disable_dropout(value)
    value.requires_grad_(True)
    value.train()
    return value


# ======================================================================================
# Score functions: what PPO maximises
# ======================================================================================

class GoldScorer:
    """Wraps a task gold reward (prompts, responses) -> list[float] as a PPO score_fn."""

    def __init__(self, gold_reward: Callable[[Sequence[str], Sequence[str]], list[float]]):
        self.gold_reward = gold_reward

    def __call__(self, prompt_texts, prompt_ids, response_ids, response_texts) -> torch.Tensor:
        return torch.tensor(self.gold_reward(list(prompt_texts), list(response_texts)), dtype=torch.float32)


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
        out = []
        for s in range(0, len(response_ids), self.batch_size):
            batch = collate_sequences(list(prompt_ids[s:s + self.batch_size]),
                                      list(response_ids[s:s + self.batch_size]), self.pad_id)
            with autocast(device, self.precision):
                out.append(self.model.score(batch).float().cpu())
        self.model.train(was_training)
        return torch.cat(out)


# ======================================================================================
# Reward model training (Bradley–Terry) and normalisation
# ======================================================================================

@dataclass
class RewardModelConfig:
    batch_size: int = 32              # pairs per optimizer step
    epochs: float = 1.0               # passes over the training pairs (N+ details: 1)
    lr: float = 1e-5                  # AdamW lr (pretrained models; tiny random-init models want ~1e-3)
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    max_grad_norm: Optional[float] = 1.0
    eval_batch_size: int = 64
    eval_every: int = 50              # optimizer steps between held-out evaluations (and at the end)
    log_every: int = 10               # optimizer steps per train/* logging window
    head_init_std: Optional[float] = None  # None: 1/sqrt(hidden+1)
    normalise: bool = True            # offset = mean raw score of π_SFT samples on the given prompts
    normalise_temperature: float = 0.7     # use PPO's sampling temperature
    normalise_max_new_tokens: int = 48
    normalise_batch_size: int = 64
    precision: str = "fp32"           # fp32 | bf16 (autocast; the head stays float32)
    dtype: str = "float32"            # backbone weights
    seed: int = 0
    show_progress: bool = True


@torch.no_grad()
def evaluate_reward_model(model: ScalarHeadModel, pairs: Sequence[TokenizedPair], pad_id: int,
                          batch_size: int = 64, precision: str = "fp32") -> dict:
    """Held-out loss, accuracy (r_w > r_l strictly) and margin (r_w − r_l), means over pairs."""
    was_training = model.training
    model.eval()
    device = model.head.weight.device
    loss, acc, margin, n = 0.0, 0.0, 0.0, 0
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s:s + batch_size])
        with autocast(device, precision):
            scores = model.raw_score(collate_pairs(chunk, pad_id)).float()
        b = len(chunk)
        chosen, rejected = scores[:b], scores[b:]
        loss += bradley_terry_loss(chosen, rejected).item() * b
        acc += (chosen > rejected).float().sum().item()
        margin += (chosen - rejected).sum().item()
        n += b
    model.train(was_training)
    return {"loss": loss / n, "accuracy": acc / n, "margin": margin / n}


@torch.no_grad()
def normalise_reward_model(reward_model: ScalarHeadModel, sft_policy: nn.Module, tokenizer,
                           prompt_ids: Sequence[list[int]], max_new_tokens: int, temperature: float,
                           batch_size: int = 64, precision: str = "fp32") -> dict:
    """Set reward_model.offset = mean raw score of π_SFT samples on `prompt_ids` → {offset, std, n}.

    After this, the score of π_SFT's own samples has mean 0 (N+ details, reward normalisation).
    """
    samples = sample(sft_policy, tokenizer, prompt_ids, max_new_tokens, temperature, batch_size=batch_size)
    reward_model.offset = 0.0
    raw = RewardModelScorer(reward_model, tokenizer.pad_token_id, batch_size, precision)(
        None, samples.prompt_ids, samples.response_ids, samples.texts)
    reward_model.offset = raw.mean().item()
    return {"offset": reward_model.offset, "std": raw.std().item() if len(raw) > 1 else 0.0, "n": len(raw)}


def train_reward_model(sft_dir: Union[str, Path], train_pairs: Sequence[TokenizedPair],
                       eval_pairs: Sequence[TokenizedPair], tokenizer, cfg: RewardModelConfig,
                       logger: RunLogger, output_dir: Union[str, Path],
                       normalise_prompts: Optional[Sequence[list[int]]] = None,
                       device: Union[str, torch.device] = "cpu", splits: tuple[str, str] = ("train", "eval"),
                       ) -> tuple[ScalarHeadModel, dict]:
    """Train a Bradley–Terry reward model initialised from π_SFT and save it in HF format.

    sft_dir: save_pretrained folder of π_SFT (backbone weights; also the sampler for the
    normalisation). Pairs: TokenizedPair (collate_pairs puts chosen rows then rejected).
    Logs {split}/loss, {split}/accuracy, {split}/margin (splits default ("train", "eval");
    pass e.g. ("rm_train", "rm_eval") when sharing a run directory with PPO) per optimizer
    step, and `{eval split}/offset`, `/sft_score_std` after normalising on `normalise_prompts`.
    Returns (model, final metrics) and writes `output_dir` (ScalarHeadModel.save_pretrained).
    """
    from dpo_exp.trainer import batch_plan  # the loop's batching: a permutation per epoch, nothing dropped

    torch.manual_seed(cfg.seed)
    device = torch.device(device)
    train_split, eval_split = splits
    dtype = torch_dtype(cfg.dtype)
    model = ScalarHeadModel(load_model(str(sft_dir), dtype).to(device), head_init_std=cfg.head_init_std)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    plan = batch_plan(len(train_pairs), cfg.batch_size, cfg.epochs, None, cfg.seed)
    pad = tokenizer.pad_token_id

    def evaluate(step: int) -> dict:
        metrics = {f"{eval_split}/{k}": v for k, v in
                   evaluate_reward_model(model, eval_pairs, pad, cfg.eval_batch_size, cfg.precision).items()}
        logger.log(metrics, step)
        return metrics

    window: list[dict] = []
    final: dict = {}
    for step, indices in enumerate(tqdm(plan, desc="reward model", disable=not cfg.show_progress,
                                        dynamic_ncols=True, mininterval=2.0), start=1):
        chunk = [train_pairs[i] for i in indices]
        with autocast(device, cfg.precision):
            scores = model.raw_score(collate_pairs(chunk, pad)).float()
        chosen, rejected = scores[:len(chunk)], scores[len(chunk):]
        loss = bradley_terry_loss(chosen, rejected)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                       "margin": (chosen - rejected).mean().item()})
        if step % cfg.log_every == 0 or step == len(plan):
            logger.log({f"{train_split}/{k}": float(np.mean([w[k] for w in window])) for k in window[0]}, step)
            window = []
        if eval_pairs and (step % cfg.eval_every == 0 or step == len(plan)):
            final = evaluate(step)
    if cfg.normalise and normalise_prompts:
        sft = load_model(str(sft_dir), dtype).to(device)
        stats = normalise_reward_model(model, sft, tokenizer, normalise_prompts, cfg.normalise_max_new_tokens,
                                       cfg.normalise_temperature, cfg.normalise_batch_size, cfg.precision)
        del sft
        norm = {f"{eval_split}/offset": stats["offset"], f"{eval_split}/sft_score_std": stats["std"]}
        logger.log(norm, len(plan))
        final.update(norm)
    model.save_pretrained(output_dir, tokenizer)
    return model, final


# ======================================================================================
# PPO
# ======================================================================================

@dataclass
class PPOConfig:
    """Plain dataclass (Hydra-schema compatible types). Defaults: N+ details / TRL for pretrained models."""

    rollout_batch_size: int = 64          # episodes (prompts, one sample each) per iteration
    minibatch_size: int = 16              # episodes per optimizer step; divides rollout_batch_size
    micro_batch_size: Optional[int] = None  # forward/backward chunk inside a minibatch (None: whole minibatch)
    forward_batch_size: int = 64          # rows per no-grad forward pass in the rollout
    generation_batch_size: int = 64       # rows per model.generate call
    ppo_epochs: int = 4                   # passes over each rollout batch
    total_iterations: int = 100           # rollout+update iterations (ignored if total_episodes is set)
    total_episodes: Optional[int] = None  # if set: iterations = ceil(total_episodes / rollout_batch_size)
    lr: float = 3e-6                      # policy AdamW lr
    value_lr: Optional[float] = None      # value-model AdamW lr (None: lr)
    adam_eps: float = 1e-5                # N+ details: Adam ε 1e-5
    weight_decay: float = 0.0
    anneal_lr: bool = False               # linear decay of both lrs to 0 over the run (TRL's default is on)
    max_grad_norm: Optional[float] = 1.0  # per model; None: no clipping
    clip_range: float = 0.2               # policy ratio clip ε
    value_clip_range: float = 0.2         # value clip c
    gamma: float = 1.0                    # discount
    lam: float = 0.95                     # GAE λ
    kl_coef: float = 0.05                 # β (initial β if target_kl is set)
    target_kl: Optional[float] = None     # None: fixed β; else adaptive controller target (nats, sequence level)
    horizon: int = 10000                  # adaptive controller horizon (episodes)
    temperature: float = 0.7              # sampling temperature; log-probs are of logits/T (> 0)
    max_new_tokens: int = 48              # response length cap
    missing_eos_penalty: Optional[float] = -1.0  # score given to a response without EOS; None: keep its score
    whiten_advantages: bool = True
    precision: str = "fp32"               # fp32 | bf16 autocast (log-probs still from float32 logits)
    seed: int = 0                         # minibatch shuffles and prompt order
    show_progress: bool = True
    save_value_model: bool = True         # also save the value model in checkpoints/final/value_model

    def __post_init__(self):
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(f"ppo minibatch_size={self.minibatch_size} must divide "
                             f"rollout_batch_size={self.rollout_batch_size}")
        if self.micro_batch_size is not None and self.minibatch_size % self.micro_batch_size:
            raise ValueError("ppo micro_batch_size must divide minibatch_size")
        if self.temperature <= 0:
            raise ValueError("PPO samples from the policy: temperature must be > 0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError("target_kl must be > 0 (or None for a fixed kl_coef)")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError("precision must be fp32 or bf16")

    @property
    def iterations(self) -> int:
        if self.total_episodes is not None:
            return math.ceil(self.total_episodes / self.rollout_batch_size)
        return self.total_iterations


@dataclass
class Rollout:
    batch: dict                 # collate_sequences tensors (B, L) + response_mask (B, R), on the device
    logps: torch.Tensor         # (B, R) old log π_T
    ref_logps: torch.Tensor     # (B, R) log π_ref,T
    values: torch.Tensor        # (B, R) old V
    advantages: torch.Tensor    # (B, R) (whitened if configured)
    returns: torch.Tensor       # (B, R)
    scores: torch.Tensor        # (B,) after the missing-EOS penalty
    metrics: dict


class PPOTrainer:
    """PPO-clip RLHF trainer.

    policy: AutoModelForCausalLM (or peft model), trained in place.
    reference: frozen π_ref — an nn.Module, or a `dpo_exp.reference.Reference` (used as
        `with reference.model() as ref`; make it resident, or it is reloaded every iteration).
    score_fn: (prompt_texts, prompt_ids, response_ids, response_texts) -> (B,) tensor;
        `GoldScorer(task.gold_reward)` or `RewardModelScorer(ScalarHeadModel)`.
    value_model: ScalarHeadModel (see `make_value_model`), trained in place.
    prompts: token ids (list of lists, e.g. data.prompt_token_ids); prompt_texts: the same
        prompts as text (given to score_fn; decoded from ids when None).
    evaluator: optional dpo_exp.evaluation.Evaluator, called every `eval_every` iterations,
        at the end, and at the start if eval_at_start.
    Logging: one `logger.log` per iteration at step = iteration (1-based), train/* names.
    """

    def __init__(self, policy: nn.Module, reference, score_fn: ScoreFn, value_model: ScalarHeadModel, tokenizer,
                 prompts: Sequence[list[int]], cfg: PPOConfig, logger: RunLogger, output_dir: Union[str, Path],
                 prompt_texts: Optional[Sequence[str]] = None, evaluator=None, eval_every: int = 10,
                 eval_at_start: bool = True, save_final: bool = True, count_flops_enabled: bool = True):
        if not prompts:
            raise ValueError("PPO needs training prompts")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("PPO needs a tokenizer with pad and EOS tokens")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            # N+ details: pad ≠ EOS. Here masks come from lengths, never from pad ids, so
            # pad == EOS is harmless, but a distinct pad token is the safe layout.
            warnings.warn("pad token == EOS token; dpo_exp.ppo builds masks from lengths, but a distinct "
                          "pad token is recommended", stacklevel=2)
        self.policy = policy
        self.reference = reference
        self.score_fn = score_fn
        self.device = next(policy.parameters()).device
        self.value_model = value_model.to(self.device)
        self.tokenizer = tokenizer
        self.prompts = [list(p) for p in prompts]
        self.prompt_texts = (list(prompt_texts) if prompt_texts is not None
                             else tokenizer.batch_decode(self.prompts, skip_special_tokens=True))
        self.cfg = cfg
        self.logger = logger
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.eval_every = eval_every
        self.eval_at_start = eval_at_start
        self.save_final = save_final
        disable_dropout(self.policy)        # PPO's ratio needs deterministic log-probs
        disable_dropout(self.value_model)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.horizon) if cfg.target_kl is not None
                       else FixedKLController(cfg.kl_coef))
        self.total_iterations = cfg.iterations
        updates = self.total_iterations * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.minibatch_size)
        self.policy_params = [p for p in policy.parameters() if p.requires_grad]
        self.value_params = [p for p in self.value_model.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=cfg.lr, eps=cfg.adam_eps,
                                            weight_decay=cfg.weight_decay)
        self.value_opt = torch.optim.AdamW(self.value_params, lr=cfg.value_lr or cfg.lr, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        decay = (lambda s: max(0.0, 1.0 - s / updates)) if cfg.anneal_lr else (lambda s: 1.0)
        self.policy_sched = torch.optim.lr_scheduler.LambdaLR(self.policy_opt, decay)
        self.value_sched = torch.optim.lr_scheduler.LambdaLR(self.value_opt, decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._prompt_order: list[int] = []
        self.step = 0
        self.episodes = 0
        self.flops = 0  # executed FLOPs of rollouts (generation, π, π_ref, value, reward model) and updates
        self.train_seconds = 0.0
        self.count_flops = count_flops_enabled
        self.last_eval: dict = {}
        self.history: list[dict] = []  # every iteration's metrics (also sent to the logger)

    # ---- reference ------------------------------------------------------------------------
    def _reference_model(self):
        if isinstance(self.reference, Reference):
            return self.reference.model()
        return contextlib.nullcontext(self.reference)

    # ---- rollout --------------------------------------------------------------------------
    def _next_prompts(self) -> list[int]:
        """Indices of the next rollout_batch_size prompts: a fresh seeded permutation per pass."""
        out = []
        while len(out) < self.cfg.rollout_batch_size:
            if not self._prompt_order:
                self._prompt_order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            out.append(self._prompt_order.pop())
        return out

    def _chunks(self, n: int, size: int):
        for s in range(0, n, size):
            yield slice(s, min(n, s + size))

    @staticmethod
    def _rows(batch: dict, rows) -> dict:
        return {k: v[rows] for k, v in batch.items()}

    @torch.no_grad()
    def rollout(self) -> Rollout:
        cfg, tok = self.cfg, self.tokenizer
        idx = self._next_prompts()
        prompt_ids = [self.prompts[i] for i in idx]
        prompt_texts = [self.prompt_texts[i] for i in idx]
        samples = sample(self.policy, tok, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                         batch_size=cfg.generation_batch_size)
        batch = {k: v.to(self.device) for k, v in collate_sequences(prompt_ids, samples.response_ids,
                                                                    tok.pad_token_id).items()}
        mask = batch["response_mask"]                                   # (B, R), right-aligned
        B, L = batch["input_ids"].shape
        R = mask.shape[1]
        logps, entropy, ref_logps, values = [], [], [], []
        self.policy.eval()
        self.value_model.eval()
        with self._reference_model() as ref:
            for rows in self._chunks(B, cfg.forward_batch_size):
                sub = self._rows(batch, rows)
                with autocast(self.device, cfg.precision):
                    lp, ent = response_token_logps(self.policy, sub, cfg.temperature, with_entropy=True)
                    rlp, _ = response_token_logps(ref, sub, cfg.temperature)
                    v = self.value_model.forward_batch(sub)[:, -R - 1:-1]  # V(state before y_t)
                logps.append(lp.float())
                entropy.append(ent.float())
                ref_logps.append(rlp.float())
                values.append(v.float())
        self.policy.train()
        self.value_model.train()
        logps, entropy = torch.cat(logps), torch.cat(entropy)
        ref_logps, values = torch.cat(ref_logps), torch.cat(values) * mask
        raw_scores = self.score_fn(prompt_texts, prompt_ids, samples.response_ids, samples.texts)
        raw_scores = torch.as_tensor(raw_scores, dtype=torch.float32).to(self.device).reshape(B)
        has_eos = torch.tensor([len(r) > 0 and r[-1] == tok.eos_token_id for r in samples.response_ids],
                               device=self.device)
        scores = apply_missing_eos_penalty(raw_scores, has_eos, cfg.missing_eos_penalty)
        kl_coef = self.kl_ctl.value
        rewards = per_token_rewards(scores, logps, ref_logps, mask, kl_coef)   # (B, R)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        seq_kl = ((logps - ref_logps) * mask).sum(-1)                           # (B,) Σ_t log π/π_ref
        metrics = {
            "train/reward": scores.mean().item(),
            "train/reward_raw": raw_scores.mean().item(),  # before the missing-EOS penalty
            "train/kl": seq_kl.mean().item(),
            "train/rlhf_reward": (scores - kl_coef * seq_kl).mean().item(),
            "train/kl_coef": kl_coef,
            "train/entropy": masked_mean(entropy, mask).item(),  # of π_T (logits/T), per token, old policy
            "train/response_length": mask.sum(-1).float().mean().item(),
            "train/eos_fraction": has_eos.float().mean().item(),
            "train/value_mean": masked_mean(values, mask).item(),
        }
        return Rollout(batch, logps, ref_logps, values, advantages, returns, scores, metrics)

    # ---- update ---------------------------------------------------------------------------
    def update(self, ro: Rollout) -> dict:
        cfg = self.cfg
        B = ro.batch["input_ids"].shape[0]
        R = ro.batch["response_mask"].shape[1]
        micro = cfg.micro_batch_size or cfg.minibatch_size
        sums = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "value_clipfrac": 0.0, "approx_kl": 0.0,
                "grad_norm": 0.0, "value_grad_norm": 0.0}
        n_minibatches = 0
        lr = self.policy_sched.get_last_lr()[0]
        value_lr = self.value_sched.get_last_lr()[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.generator).to(self.device)
            for mb in order.split(cfg.minibatch_size):
                n_tokens = ro.batch["response_mask"][mb].sum().clamp(min=1)
                for rows in mb.split(micro):
                    sub = self._rows(ro.batch, rows)
                    mask = sub["response_mask"]
                    weight = (mask.sum() / n_tokens).item()  # micro-batch share of the minibatch's token mean
                    with autocast(self.device, cfg.precision):
                        logps, _ = response_token_logps(self.policy, sub, cfg.temperature)
                    pl, cf, akl = clipped_policy_loss(logps.float(), ro.logps[rows], ro.advantages[rows], mask,
                                                      cfg.clip_range)
                    (pl * weight).backward()
                    with autocast(self.device, cfg.precision):
                        v = self.value_model.forward_batch(sub)[:, -R - 1:-1].float()
                    vl, vcf = clipped_value_loss(v, ro.values[rows], ro.returns[rows], mask, cfg.value_clip_range)
                    (vl * weight).backward()
                    for key, val in (("policy_loss", pl), ("value_loss", vl), ("clipfrac", cf),
                                     ("value_clipfrac", vcf), ("approx_kl", akl)):
                        sums[key] += val.item() * weight
                sums["grad_norm"] += self._clip(self.policy_params)
                sums["value_grad_norm"] += self._clip(self.value_params)
                for opt, sched in ((self.policy_opt, self.policy_sched), (self.value_opt, self.value_sched)):
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                n_minibatches += 1
        metrics = {f"train/{k}": v / n_minibatches for k, v in sums.items()}
        metrics["train/learning_rate"] = lr
        metrics["train/value_learning_rate"] = value_lr
        return metrics

    def _clip(self, params) -> float:
        max_norm = self.cfg.max_grad_norm or float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm).item()

    # ---- the loop -------------------------------------------------------------------------
    def train_iteration(self) -> dict:
        start = time.perf_counter()
        with count_flops(self.count_flops) as counter:  # executed FLOPs, as the DPO trainer counts them
            ro = self.rollout()
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with count_flops(self.count_flops) as update_counter:
            update_metrics = self.update(ro)
        self.flops += counter.get_total_flops() + update_counter.get_total_flops()
        metrics = {**ro.metrics, **update_metrics}
        metrics["train/update_seconds"] = time.perf_counter() - start
        metrics["train/rollout_seconds"] = rollout_seconds
        self.train_seconds += rollout_seconds + metrics["train/update_seconds"]
        metrics["train/seconds"] = self.train_seconds
        self.kl_ctl.update(ro.metrics["train/kl"], self.cfg.rollout_batch_size)
        self.episodes += self.cfg.rollout_batch_size
        self.step += 1
        metrics["train/episodes"] = self.episodes
        metrics["train/flops"] = self.flops
        return metrics

    def fit(self) -> dict:
        """Run all iterations; returns the last evaluation ({"step", eval/...}) or {} without evaluator."""
        if self.evaluator is not None and self.eval_at_start:
            self.evaluate()
        bar = tqdm(total=self.total_iterations, desc="ppo", disable=not self.cfg.show_progress,
                   dynamic_ncols=True, mininterval=2.0)
        while self.step < self.total_iterations:
            metrics = self.train_iteration()
            self.history.append(metrics)
            self.logger.log(metrics, self.step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", kl=f"{metrics['train/kl']:.2f}", refresh=False)
            if self.evaluator is not None and (self.step % self.eval_every == 0 or self.step == self.total_iterations):
                self.evaluate()
        bar.close()
        if self.save_final:
            self.save_checkpoint(self.output_dir / "checkpoints" / "final")
        return self.last_eval

    def evaluate(self) -> dict:
        self.last_eval = evaluate_and_log(self.evaluator, self.policy, self.step, self.logger, self.flops,
                                          self.train_seconds)
        return self.last_eval

    def save_checkpoint(self, path: Path) -> None:
        """Policy (+ tokenizer) via save_pretrained; value model in path/value_model; optimizer
        states, β and RNG state in trainer_state.pt."""
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.cfg.save_value_model:
            self.value_model.save_pretrained(path / "value_model")
        torch.save({"step": self.step, "episodes": self.episodes, "kl_coef": self.kl_ctl.value,
                    "policy_optimizer": self.policy_opt.state_dict(), "value_optimizer": self.value_opt.state_dict(),
                    "config": asdict(self.cfg), "generator": self.generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate()}, path / "trainer_state.pt")
