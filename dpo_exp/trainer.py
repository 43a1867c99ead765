"""The training loop: batching, gradient accumulation, clipping, schedule, eval, checkpoints.

It knows nothing of the algorithm beyond its declarations (`uses_rejected`,
`needs_reference`), its normaliser and its per-pair loss.

Gradient accumulation averages correctly: each micro-batch's summed loss is divided by
the normaliser of the whole optimizer step (pairs for preference losses, response tokens
for SFT), so k micro-batches give exactly the gradient of one batch of their union.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from dpo_exp.algorithms import PairLogps
from dpo_exp.config import OptimizerConfig, OptimizerName, Schedule, TrainerConfig
from dpo_exp.data import TokenizedPair, collate_pairs
from dpo_exp.evaluation import EVAL_TABLE, SWEEP_COLUMNS, TABLE_COLUMNS, Evaluator
from dpo_exp.loggers import RunLogger
from dpo_exp.models import autocast, sequence_logps
from dpo_exp.reference import Reference


class _NoCount:
    def get_total_flops(self) -> int:
        return 0


@contextlib.contextmanager
def count_flops(enabled: bool = True):
    """Count the FLOPs the block executes (torch's FlopCounterMode: matmuls and attention,
    as dispatched, so measured rather than estimated from parameter counts)."""
    if not enabled:
        yield _NoCount()
        return
    with FlopCounterMode(display=False) as counter:
        yield counter


def evaluate_and_log(evaluator: Evaluator, policy, step: int, logger: RunLogger, flops: float,
                     train_seconds: float) -> dict:
    """One evaluation, logged with the cost of reaching it (for frontiers and compute comparisons).

    Shared by every training loop, so DPO, SFT and PPO evaluation points compare directly.
    """
    start = time.perf_counter()
    metrics, tables = evaluator(policy, step)
    metrics["eval/seconds"] = time.perf_counter() - start
    metrics["cost/train_flops"] = float(flops)
    metrics["cost/train_seconds"] = train_seconds
    logger.log(metrics, step)
    for name, rows in tables.items():
        if rows:
            logger.table(name, TABLE_COLUMNS if name == EVAL_TABLE else SWEEP_COLUMNS, rows, step)
    return {"step": step, **metrics}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params, cfg: OptimizerConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if OptimizerName(cfg.name) is OptimizerName.adamw:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: Schedule) -> float:
    """Linear warm-up from 0 (DPO authors: min(1, (step+1)/(warmup+1))), then the decay schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule is Schedule.constant or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule is Schedule.linear:
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


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


class Trainer:
    def __init__(self, policy, algorithm, train_pairs: Sequence[TokenizedPair], pad_id: int,
                 trainer_cfg: TrainerConfig, optimizer_cfg: OptimizerConfig, logger: RunLogger,
                 output_dir: Path, seed: int, reference: Optional[Reference] = None,
                 evaluator: Optional[Evaluator] = None, tokenizer=None, label: str = "train"):
        self.policy = policy
        self.algorithm = algorithm
        self.pairs = list(train_pairs)
        self.pad_id = pad_id
        self.cfg = trainer_cfg
        self.opt_cfg = optimizer_cfg
        self.logger = logger
        self.output_dir = Path(output_dir)
        self.reference = reference
        self.evaluator = evaluator
        self.tokenizer = tokenizer
        self.label = label
        self.device = next(policy.parameters()).device
        self.precision = trainer_cfg.precision.value if hasattr(trainer_cfg.precision, "value") else trainer_cfg.precision
        self.plan = batch_plan(len(self.pairs), trainer_cfg.batch_size, trainer_cfg.epochs, trainer_cfg.max_steps, seed)
        self.total_steps = len(self.plan)
        self.optimizer = build_optimizer(policy.parameters(), optimizer_cfg, self.device)
        schedule = Schedule(optimizer_cfg.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, optimizer_cfg.warmup_steps, self.total_steps, schedule))
        self.step = 0
        self.flops = 0
        self.train_seconds = 0.0  # wall-clock of training steps, evaluation excluded
        self.last_eval: dict = {}

    # ---- one optimizer step -------------------------------------------------------------
    def accumulate_gradients(self, pairs: Sequence[TokenizedPair]) -> dict:
        """Forward and backward over the micro-batches of one step; returns the step's metrics."""
        algo = self.algorithm
        k = min(self.cfg.grad_accumulation_steps, len(pairs))
        micro = [collate_pairs(chunk, self.pad_id, with_rejected=algo.uses_rejected)
                 for chunk in np.array_split(np.array(pairs, dtype=object), k)]
        normaliser = sum(algo.normaliser(b) for b in micro).to(self.device)
        loss_total = 0.0
        values: dict[str, list[torch.Tensor]] = {}
        for batch in micro:
            with autocast(self.device, self.precision):
                seq = sequence_logps(self.policy, batch)
            policy_logps = PairLogps.split(seq, algo.uses_rejected)
            ref = None
            if algo.needs_reference:
                ref = self.reference.pair_logps(batch, algo.uses_rejected, table="train").to(self.device)
            out = algo(policy_logps, ref)
            loss = out.loss.sum() / normaliser
            loss.backward()
            loss_total += loss.item()
            for key, value in out.metrics.items():
                values.setdefault(key, []).append(value.detach().float().cpu())
        metrics = {f"{self.label}/{k}": torch.cat(v).mean().item() for k, v in values.items()}
        metrics[f"{self.label}/loss"] = loss_total
        return metrics

    def optimizer_step(self) -> dict:
        """Clip, step, advance the schedule; returns grad norm (before clipping) and the lr used."""
        max_norm = self.opt_cfg.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {f"{self.label}/grad_norm": grad_norm.item(), f"{self.label}/learning_rate": lr}

    def train_step(self, pairs: Sequence[TokenizedPair]) -> dict:
        with count_flops(self.cfg.count_flops) as counter:
            metrics = self.accumulate_gradients(pairs)
        self.flops += counter.get_total_flops()
        metrics.update(self.optimizer_step())
        metrics[f"{self.label}/flops"] = float(self.flops)  # cumulative: forward + backward of policy and π_ref
        return metrics

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        self.policy.train()
        if self.evaluator is not None and self.cfg.eval_at_start:
            self.evaluate()
        window: list[dict] = []
        pairs_seen, tokens_seen, window_seconds = 0, 0, 0.0
        bar = tqdm(total=self.total_steps, desc=self.label, disable=not self.cfg.show_progress,
                   dynamic_ncols=True, mininterval=2.0)
        while self.step < self.total_steps:
            batch_pairs = [self.pairs[i] for i in self.plan[self.step]]
            started = time.perf_counter()
            window.append(self.train_step(batch_pairs))
            step_seconds = time.perf_counter() - started  # training only: evaluation and saving excluded
            window_seconds += step_seconds
            self.train_seconds += step_seconds
            self.step += 1
            pairs_seen += len(batch_pairs)
            tokens_seen += sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in batch_pairs)
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1][f'{self.label}/loss']:.4f}", refresh=False)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                metrics = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                metrics[f"{self.label}/flops"] = window[-1][f"{self.label}/flops"]  # cumulative, not a mean
                metrics[f"{self.label}/seconds"] = self.train_seconds  # cumulative training wall-clock
                metrics[f"{self.label}/pairs_per_second"] = pairs_seen / window_seconds
                metrics[f"{self.label}/tokens_per_second"] = tokens_seen / window_seconds
                metrics[f"{self.label}/epoch"] = self.step * self.cfg.batch_size / len(self.pairs)
                self.logger.log(metrics, self.step)
                window, pairs_seen, tokens_seen, window_seconds = [], 0, 0, 0.0
            if self.evaluator is not None and (self.step % self.cfg.eval_every == 0 or self.step == self.total_steps):
                self.evaluate()
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step != self.total_steps:
                self.save_checkpoint(self.output_dir / "checkpoints" / f"step_{self.step}")
        bar.close()
        if self.cfg.save_final:
            self.save_checkpoint(self.output_dir / "checkpoints" / "final")
        return self.last_eval

    def evaluate(self) -> dict:
        self.last_eval = evaluate_and_log(self.evaluator, self.policy, self.step, self.logger, self.flops,
                                          self.train_seconds)
        return self.last_eval

    def save_checkpoint(self, path: Path) -> None:
        """Hugging Face format (save_pretrained) plus optimizer, scheduler and RNG state beside it."""
        path.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state(), "python_rng": random.getstate()},
                   path / "trainer_state.pt")
