"""What an algorithm is to the loop, and the registry that names them.

An algorithm declares what it needs (`Needs`) and supplies only what differs between
algorithms: the experience of an iteration (a batch of offline pairs, or rollouts of the
current policy), its loss on a micro-batch, and its own metrics. The loop
(dpo_exp.loop.Loop) owns accumulation, clipping, optimizers and schedules, evaluation,
checkpoints, accounting and logging, and knows no algorithm by name.

Registering is one decorator, from anywhere (a test file, a user's module):

    @ALGORITHMS.register("my_loss", config=MyLossConfig, validate=check_my_loss)
    class MyLoss(OfflineAlgorithm): ...

`loss=my_loss` then selects it, with a conf/loss/my_loss.yaml whose defaults list `my_loss_schema`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dpo_exp.config import OptimizerConfig, Precision
from dpo_exp.data import PADDED, Batch, PairLayout, TokenizedPair, collate_pairs
from dpo_exp.metrics import Metric, mean_metric  # noqa: F401  (mean_metric: what an algorithm's metrics use)
from dpo_exp.registry import Registry

# loss=NAME selects one; each registers its own config dataclass (a LossConfig) and validate.
ALGORITHMS: Registry[type["Algorithm"]] = Registry("algorithm", "loss.name", group="loss")


def validate_beta(cfg: Any) -> None:
    """loss.beta, which every algorithm has (its loss's own β, or the scale of reported implicit rewards)."""
    if cfg.loss.beta <= 0:
        from dpo_exp.errors import ConfigError

        raise ConfigError(f"loss.beta must be > 0 (got {cfg.loss.beta}); the DPO paper uses 0.1 (0.5 for TL;DR)")


@dataclass(frozen=True)
class Needs:
    """What an algorithm needs built for it; train.py builds exactly this and nothing else."""
    reference: bool = False     # π_ref log-probs while training (a frozen model, or a precomputed table)
    reward_model: bool = False  # the cached Bradley–Terry reward model (dpo_exp.stages.reward_model_dir)
    value_model: bool = False   # a scalar-head value model, trained beside the policy
    rollouts: bool = False      # samples of the current policy at every iteration
    rejected: bool = True       # the rejected response of each offline pair
    policy: bool = True         # a causal-LM policy to train (false: the algorithm trains its own model)


@dataclass
class StepOutput:
    loss: torch.Tensor  # () this micro-batch's loss summed over its units; the loop divides by the step's normaliser
    metrics: dict[str, Metric] = field(default_factory=dict)  # the loop averages each over the whole step


class StepBatch(ABC):
    """The data of one optimizer step; the loop cuts it into micro-batches with `select`."""

    @abstractmethod
    def __len__(self) -> int:
        """Rows (pairs, episodes) in the step."""

    @abstractmethod
    def select(self, rows: np.ndarray) -> Any:
        """The micro-batch of these rows (positions 0..len-1), ready for Algorithm.loss."""


@dataclass
class Experience:
    """What an iteration trains on: one StepBatch per optimizer step (offline: one; PPO: epochs × minibatches)."""
    steps: list[StepBatch]
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. rollout statistics, logged as {label}/name
    counters: dict[str, float] = field(default_factory=dict)  # cumulative (epoch, episodes): logged as the last value
    examples: int = 0   # pairs, sequences or episodes consumed (throughput)
    tokens: int = 0     # tokens fed to the policy (throughput)


@dataclass
class Resources:
    """Everything the builder made for an algorithm, as its `needs` asked."""
    cfg: Any
    tokenizer: Any
    device: torch.device
    policy: Optional[nn.Module] = None
    reference: Any = None                 # dpo_exp.reference.Reference
    reward_model: Optional[nn.Module] = None
    value_model: Optional[nn.Module] = None
    train_pairs: Sequence[TokenizedPair] = ()
    prompt_texts: Sequence[str] = ()      # training prompts (algorithms with rollouts)
    prompt_ids: Sequence[list[int]] = ()
    gold_reward: Any = None               # the task's gold reward, if it has one


class Algorithm(ABC):
    """Base of every algorithm. Subclasses set `family`, `unit` and override what differs; the three
    abstract methods are what every algorithm must say (OfflineAlgorithm supplies the first two)."""

    family: str = ""          # written to summary.json as algorithm/family (frontiers and tables group by it)
    unit: str = "pairs"       # what throughput counts: train/<unit>_per_second
    sections: tuple[str, ...] = ("loss",)  # config sections it reads (validated when it is selected)
    # The printed summary's own lines, (what it is, summary.json key), after the gold reward and KL of the
    # policy's samples where the run has them.
    headline: tuple[tuple[str, str], ...] = (
        ("held-out preference accuracy (implicit reward)", "eval/rewards/accuracies"),
        ("held-out reward margin (implicit reward)", "eval/rewards/margins"))

    def __init__(self, name: str, cfg: Any, res: Resources):
        self.name = name
        self.cfg = cfg
        self.res = res

    # ---- declarations, read before anything is built ---------------------------------------
    @classmethod
    def needs(cls, cfg: Any) -> Needs:
        return Needs()

    @classmethod
    def label(cls, cfg: Any) -> str:
        """How frontiers and tables name a run of this algorithm."""
        return str(cfg.loss.name)

    @classmethod
    def family_of(cls, cfg: Any) -> str:
        return cls.family or str(cfg.loss.name)

    @classmethod
    def loop_overrides(cls, cfg: Any) -> dict:
        """LoopSettings fields that this algorithm sets from its own section (e.g. PPO's eval cadence)."""
        return {}

    # ---- training ---------------------------------------------------------------------------
    def trained(self) -> dict[str, tuple[nn.Module, OptimizerConfig]]:
        """The modules the loop optimises, each with its optimizer settings; 'policy' is saved as the run's model."""
        return {"policy": (self.res.policy, self.cfg.optimizer)}

    @abstractmethod
    def iterations(self) -> int:
        """How many iterations the run takes (known before training: the schedule and the progress bar need it)."""

    def steps_per_iteration(self) -> int:
        return 1

    @abstractmethod
    def experience(self, iteration: int) -> Experience:
        """What iteration `iteration` (0-based) trains on."""

    def normaliser(self, micro: Any) -> torch.Tensor:
        """Units of the micro-batch that the step's loss is a mean over: its pairs, unless the algorithm says
        otherwise (SFT: chosen tokens, PPO: response tokens). Also of held-out pair batches (evaluation)."""
        return torch.tensor(float(micro.pairs))

    @abstractmethod
    def loss(self, micro: Any) -> StepOutput:
        """The micro-batch's loss summed over its units, and its metrics."""

    def end_iteration(self, metrics: dict) -> None:
        """After the iteration's updates (e.g. PPO's KL controller)."""

    def state_dict(self) -> dict:
        """What the algorithm changes as it runs, beyond the trained models (PPO's KL controller, prompt order):
        plain tensors, numbers, lists and dicts, saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned, on resume."""
        del state

    # ---- evaluation on held-out pairs -------------------------------------------------------
    def pair_loss(self, policy, reference) -> Optional[StepOutput]:
        """Loss and metrics of held-out pairs given their log-probs (PairLogps); None: not a pair loss."""
        return None

    @property
    def precision(self) -> str:
        return Precision(self.cfg.trainer.precision).value


# ---- offline pairs ---------------------------------------------------------------------------

def batch_plan(num_examples: int, batch_size: int, epochs: float, max_steps: Optional[int], seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: a fresh permutation per epoch, nothing dropped.

    The last batch of the plan may be smaller than batch_size; its loss is still a correct
    mean because the normaliser counts what the step holds.
    """
    if num_examples == 0:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    total = int(round(epochs * num_examples)) if max_steps is None else max_steps * batch_size
    order: list[int] = []
    while len(order) < total:
        order.extend(rng.permutation(num_examples).tolist())
    order = order[:total]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class PairBatch(StepBatch):
    """Tokenized pairs of one optimizer step; a micro-batch is their collated, concatenated forward."""

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, with_rejected: bool, layout: PairLayout = PADDED):
        self.pairs = list(pairs)
        self.pad_id = pad_id
        self.with_rejected = with_rejected
        self.layout = layout

    def __len__(self) -> int:
        return len(self.pairs)

    def select(self, rows: np.ndarray) -> Batch:
        return collate_pairs([self.pairs[i] for i in rows], self.pad_id, self.with_rejected, self.layout)

    def pair_tokens(self, p: TokenizedPair) -> int:
        """Tokens of one pair as fed to the policy: a shared prompt once, else once per response."""
        sides = 2 if self.with_rejected and not self.layout.share_prompt else 1
        return sides * len(p.prompt_ids) + len(p.chosen_ids) + (len(p.rejected_ids) if self.with_rejected else 0)

    def tokens(self) -> int:
        return sum(map(self.pair_tokens, self.pairs))

    def token_parts(self, rows: np.ndarray, budget: int) -> list[np.ndarray]:
        """`rows` cut, in order, into consecutive parts of at most `budget` tokens (a longer pair alone). The
        step's loss is a mean over all its pairs (or tokens) whatever the parts: the loop divides by the
        normaliser of the whole step."""
        parts, current, used = [], [], 0
        for row in rows.tolist():
            size = self.pair_tokens(self.pairs[row])
            if current and used + size > budget:
                parts.append(np.array(current, dtype=np.int64))
                current, used = [], 0
            current.append(row)
            used += size
        if current:
            parts.append(np.array(current, dtype=np.int64))
        return parts


class OfflineAlgorithm(Algorithm):
    """An algorithm trained on a fixed set of tokenized pairs: trainer.batch_size pairs per step,
    trainer.epochs passes (or trainer.max_steps), a fresh permutation every epoch."""

    def __init__(self, name: str, cfg: Any, res: Resources):
        super().__init__(name, cfg, res)
        t = cfg.trainer
        self.pairs = list(res.train_pairs)
        self.plan = batch_plan(len(self.pairs), t.batch_size, t.epochs, t.max_steps, cfg.seed)
        self.with_rejected = self.needs(cfg).rejected
        self.layout = PairLayout.of(t, cfg.model.attn_implementation)

    def iterations(self) -> int:
        return len(self.plan)

    def experience(self, iteration: int) -> Experience:
        batch = PairBatch([self.pairs[i] for i in self.plan[iteration]], self.res.tokenizer.pad_token_id,
                          self.with_rejected, self.layout)
        epoch = (iteration + 1) * self.cfg.trainer.batch_size / len(self.pairs)
        return Experience([batch], counters={"epoch": epoch}, examples=len(batch), tokens=batch.tokens())
