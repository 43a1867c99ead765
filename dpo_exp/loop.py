"""The training loop every algorithm shares: the π_SFT stage, the DPO family, Preferred-FT, the
reward model, PPO and online DPO.

An iteration asks the algorithm for its experience (a batch of pairs; or rollouts of the
current policy, which PPO turns into epochs × minibatches of optimizer steps), then runs each
optimizer step: the step's data is cut into `grad_accumulation_steps` micro-batches, each
micro-batch's summed loss is divided by the normaliser of the WHOLE step (pairs, or tokens),
so k micro-batches give exactly the gradient of one batch of their union; then every trained
model is clipped and stepped with its own optimizer and schedule; a step whose loss or gradient
norm is not finite is skipped whole and counted. The loop also owns the evaluation cadence,
resumable checkpoints (dpo_exp.checkpoint) and resuming from them, SIGTERM/SIGUSR1 (checkpoint,
then stop), FLOP and wall-clock accounting, the progress bar and logging.
It knows no algorithm by name.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from dpo_exp.algorithms.base import Algorithm, Experience
from dpo_exp import checkpoint, distributed
from dpo_exp.config import OptimizerConfig, OptimizerName, Schedule
from dpo_exp.errors import ConfigError
from dpo_exp.evaluation import EVAL_TABLE, SWEEP_COLUMNS, TABLE_COLUMNS
from dpo_exp.loggers import RunLogger, console, progress
from dpo_exp.metrics import MetricSums

Evaluate = Callable[[Any, int], tuple[dict, dict]]  # (model, step) -> (metrics, tables)


@dataclass
class LoopSettings:
    """The loop's knobs; `from_trainer` reads them from the trainer section (algorithms may override some)."""
    grad_accumulation_steps: int = 1  # micro-batches per optimizer step
    micro_batch_tokens: Optional[int] = None  # instead: cut each step into micro-batches of at most this many tokens
    eval_every: int = 100             # iterations between evaluations (and at the end)
    eval_at_start: bool = True        # evaluate before the first iteration
    log_every: int = 10               # iterations per logged window of train metrics
    save_every: Optional[int] = None  # iterations between checkpoints; None: only the final one
    save_final: bool = True           # save checkpoints/final
    keep_checkpoints: int = 2         # newest step checkpoints kept (final is always kept); 0 keeps all
    resume: bool = False              # continue from the newest complete checkpoint in output_dir/checkpoints
    max_skipped_steps: int = 10       # optimizer steps skipped for a non-finite loss or grad norm before stopping
    show_progress: bool = True        # progress bar with ETA
    count_flops: bool = False         # count executed FLOPs (FlopCount); slows every step, hence off by default
    reuse_freed_memory: bool = True   # training on the CPU: reuse_freed_memory() before the first step

    @classmethod
    def from_trainer(cls, trainer, **overrides) -> "LoopSettings":
        """The settings of a trainer section (TrainerConfig), every field read from its own trainer key, then
        `overrides` (an algorithm's loop_overrides, a cached stage's cadence). A trainer without one of the keys,
        or a field that no key sets, is an error: a renamed key must not fall back to a default unnoticed."""
        def key(name: str) -> Any:
            try:
                return getattr(trainer, name)
            except AttributeError:  # omegaconf's missing-key error is one too
                raise ConfigError(f"the trainer section has no key {name!r}, which the training loop reads") from None

        values = dict(
            grad_accumulation_steps=key("grad_accumulation_steps"),
            micro_batch_tokens=key("micro_batch_tokens"),
            eval_every=key("eval_every"),
            eval_at_start=key("eval_at_start"),
            log_every=key("log_every"),
            save_every=key("save_every"),
            save_final=key("save_final"),
            keep_checkpoints=key("keep_checkpoints"),
            resume=key("resume"),
            max_skipped_steps=key("max_skipped_steps"),
            show_progress=key("show_progress"),
            count_flops=key("count_flops"),
            reuse_freed_memory=key("reuse_freed_memory"),
        )
        unset = [f.name for f in fields(cls) if f.name not in values]
        if unset:
            raise TypeError(f"LoopSettings.from_trainer sets no value for {', '.join(unset)}: read each from its "
                            "trainer key there")
        return cls(**{**values, **overrides})


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    By default every allocation above 32 MB (a step's logits, activations, their gradients) is a fresh mmap, and
    the kernel zero-fills each of its pages at first touch: on the CPU that page faulting, not arithmetic, is most
    of an elementwise op's time. Process-wide and permanent: the process then keeps its peak heap, which is what a
    training process holds anyway. Returns whether it took effect (False off glibc, e.g. macOS).
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


class _NoCount:
    def get_total_flops(self) -> int:
        return 0


class FlopCount(TorchDispatchMode):
    """The FLOPs of the ops a block executes, as dispatched (matmuls, convolutions and attention, by torch's own
    FLOP formulas, `torch.utils.flop_counter.flop_registry`), so measured rather than estimated from parameter
    counts. The total only: torch's FlopCounterMode also attributes FLOPs to modules through hooks on every module
    call, which costs more; this gives its totals (tests/test_layout.py). Dispatching every op through Python still
    slows each step, hence trainer.count_flops is off by default."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self) -> int:
        return self.total


@contextlib.contextmanager
def count_flops(enabled: bool = True):
    """Count the FLOPs the block executes (FlopCount)."""
    if not enabled:
        yield _NoCount()
        return
    with FlopCount() as counter:
        yield counter


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
    progress_ = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule is Schedule.linear:
        return 1.0 - progress_
    return 0.5 * (1.0 + math.cos(math.pi * progress_))


class Preempted(Exception):
    """SIGTERM / SIGUSR1 / SIGUSR2 arrived: the current iteration finished and a checkpoint was written.
    `forward`, when set, runs the handler that was installed before the loop's (submitit's requeue)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, forward: Optional[Callable[[], None]] = None):
        self.signal_name, self.step, self.checkpoint, self.forward = signal_name, step, checkpoint, forward
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint {checkpoint}; rerun the "
                         "same command to resume")


class Diverged(Exception):
    """More optimizer steps were skipped for a non-finite loss or gradient norm than trainer.max_skipped_steps."""

    def __init__(self, record: dict):
        self.record = record
        first = record["first"]
        super().__init__(
            f"training diverged: {record['skipped_steps']} optimizer steps skipped for a non-finite value, more than "
            f"trainer.max_skipped_steps={record['max_skipped_steps']} (first at step {first['step']}: "
            f"{first['metric']}={first['value']}; last at step {record['last']['step']}: {record['last']['metric']}="
            f"{record['last']['value']}); last good checkpoint: {record['checkpoint'] or 'none (trainer.save_every)'}."
            " Lower the learning rate or clip the gradient harder (optimizer.max_grad_norm)")


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGUSR2 (what SLURM sends before a time limit or preemption; USR2 is
    submitit's) instead of dying, so the loop can finish its iteration and checkpoint; the handlers that were
    there before come back on exit, and `forward` hands the signal on to the one that was (submitit requeues
    the job)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    self._previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)

    def forward(self) -> Optional[Callable[[], None]]:
        """A call of the handler that was installed before for the signal received, when it was a function."""
        handler = self._previous.get(self.received or "")
        if not callable(handler):
            return None
        return lambda: handler(getattr(signal, self.received), None)


class Trained:
    """One model the loop optimises: its optimizer, schedule and clipping."""

    def __init__(self, name: str, module: torch.nn.Module, cfg: OptimizerConfig, total_steps: int, primary: bool):
        self.name, self.module, self.cfg = name, module, cfg
        self.prefix = "" if primary else f"{name}_"  # the run's model logs grad_norm; PPO's value model value_grad_norm
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg, next(module.parameters()).device)
        schedule = Schedule(cfg.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.warmup_steps, total_steps, schedule))

    def clip(self) -> float:
        """Clip the gradient in place; returns its norm before clipping (non-finite when the gradient is). For a
        sharded model the norm is of the whole gradient, the same on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        return distributed.local_value(norm).item()

    def step(self) -> float:
        """Step the optimizer and the schedule; returns the lr used."""
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def skip(self) -> None:
        """Drop this step's gradient: no update, the schedule stays where it is."""
        self.optimizer.zero_grad(set_to_none=True)

    def metric_name(self, what: str) -> str:
        return self.prefix + what


class Loop:
    def __init__(self, algorithm: Algorithm, settings: LoopSettings, logger: RunLogger, output_dir: Path,
                 evaluate: Optional[Evaluate] = None, tokenizer=None, label: str = "train",
                 run_config: Optional[dict] = None):
        self.algorithm = algorithm
        self.settings = settings
        self.logger = logger
        self.output_dir = Path(output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.evaluate_fn = evaluate
        self.tokenizer = tokenizer
        self.label = label
        self.run_config = run_config         # written into checkpoints; a resume must match it
        self.iterations = algorithm.iterations()
        total_steps = self.iterations * algorithm.steps_per_iteration()
        self.trained = [Trained(name, module, opt_cfg, total_steps, primary=i == 0)
                        for i, (name, (module, opt_cfg)) in enumerate(algorithm.trained().items())]
        self.model = self.trained[0].module  # evaluated, and saved as the run's model
        if settings.reuse_freed_memory and next(self.model.parameters()).device.type == "cpu":
            reuse_freed_memory()
        self.step = 0                        # iterations done (= optimizer steps for offline algorithms)
        self.flops = 0
        self.train_seconds = 0.0             # wall-clock of training, evaluation and saving excluded
        self.last_eval: dict = {}
        self.resumed_from: Optional[Path] = None
        self.skipped: list[dict] = []        # optimizer steps skipped for a non-finite value
        self.last_checkpoint: Optional[Path] = None
        self._window: list[dict] = []        # iterations since the last train log, and their throughput
        self._window_counts = [0, 0, 0.0]    # examples, tokens, seconds

    # ---- one optimizer step -----------------------------------------------------------------
    def optimizer_step(self, step_batch) -> Optional[MetricSums]:
        """Forward and backward over the micro-batches of one step, then clip and step every model. A step whose
        loss or gradient norm is not finite updates nothing and returns None (counted in self.skipped)."""
        algo = self.algorithm
        micro = self.micro_batches(step_batch)
        mine = sum((algo.normaliser(m) for m, real in micro if real), torch.tensor(0.0))
        normaliser = distributed.reduce_sum(mine)  # of the whole step, over every rank
        sums = MetricSums()
        sums.add("loss", 0.0, 1.0)  # the step's loss is one value per step: its micro-batches' shares add up
        for i, (batch, real) in enumerate(micro):
            for model in self.trained:  # sharded models reduce gradients once per step, after its last micro-batch
                distributed.set_gradient_sync(model.module, i == len(micro) - 1)
            out = algo.loss(batch)
            if not real:  # this rank has no rows left for this micro-batch: join the collectives, add nothing
                (out.loss * 0.0).backward()
                continue
            loss = out.loss / normaliser.to(out.loss.device)
            loss.backward()
            sums.add("loss", loss.item(), 0.0)
            sums.merge(out.metrics)
        if distributed.world_size() > 1:
            sums = distributed.reduce_metrics(sums)
            sums.set_count("loss", 1.0)  # each rank's share is already divided by the global normaliser
        norms = {model.metric_name("grad_norm"): model.clip() for model in self.trained}  # before clipping
        bad = next(((name, value) for name, value in [("loss", sums["loss"][0]), *norms.items()]
                    if not math.isfinite(value)), None)
        if bad is not None:
            for model in self.trained:
                model.skip()
            self.skipped.append({"step": self.step + 1, "metric": f"{self.label}/{bad[0]}", "value": str(bad[1])})
            return None
        for model in self.trained:
            sums.add(model.metric_name("grad_norm"), norms[model.metric_name("grad_norm")], 1.0)
            sums.add(model.metric_name("learning_rate"), model.step(), 1.0)
        return sums

    def micro_batches(self, step_batch) -> list[tuple[Any, bool]]:
        """This rank's micro-batches of one step, each with whether it holds rows. One process: the step cut into
        grad_accumulation_steps parts, or (trainer.micro_batch_tokens) into consecutive parts of at most that many
        tokens. N processes: this rank's slice (distributed.step_slice) cut into as many parts as every other
        rank; a part with no rows is a stand-in (the step's first row, weight 0), since every rank must run as
        many forward and backward passes as the others."""
        n = len(step_batch)
        budget = self.settings.micro_batch_tokens
        if budget is not None and hasattr(step_batch, "token_parts"):
            parts = step_batch.token_parts(distributed.step_slice(n), budget)
            k = max(distributed.gather_objects(len(parts)))  # every rank runs as many passes as the busiest
            parts += [np.array([], dtype=np.int64)] * (k - len(parts))
        else:
            k = min(self.settings.grad_accumulation_steps, max(1, math.ceil(n / distributed.world_size())))
            parts = np.array_split(distributed.step_slice(n), k)
        return [(step_batch.select(rows), True) if len(rows) else (step_batch.select(np.array([0])), False)
                for rows in parts]

    def train_iteration(self) -> tuple[dict, float, Experience]:
        """Experience, then the iteration's optimizer steps; returns its metrics (names without the
        label), its training seconds and the experience (for throughput)."""
        started = time.perf_counter()
        flops_before = self.flops
        with count_flops(self.settings.count_flops) as counter:
            experience: Experience = self.algorithm.experience(self.step)
        self.flops += counter.get_total_flops()
        experience_seconds = time.perf_counter() - started
        started = time.perf_counter()
        sums = MetricSums()
        with count_flops(self.settings.count_flops) as counter:
            for step_batch in experience.steps:
                step_sums = self.optimizer_step(step_batch)
                if step_sums is not None:  # None: a skipped step
                    sums.merge(step_sums)
        self.flops += counter.get_total_flops()
        update_seconds = time.perf_counter() - started
        if distributed.world_size() > 1:  # every rank counted its own work; the run's cost is the sum
            self.flops = flops_before + distributed.reduce_floats([self.flops - flops_before])[0]
        metrics = sums.means()
        metrics.update(experience.metrics)
        if self.algorithm.needs(self.algorithm.cfg).rollouts:
            metrics["rollout_seconds"] = experience_seconds
            metrics["update_seconds"] = update_seconds
        seconds = experience_seconds + update_seconds
        self.train_seconds += seconds
        self.algorithm.end_iteration(metrics)
        self.step += 1
        if len(self.skipped) > self.settings.max_skipped_steps:
            raise Diverged({"skipped_steps": len(self.skipped), "max_skipped_steps": self.settings.max_skipped_steps,
                            "first": self.skipped[0], "last": self.skipped[-1],
                            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None})
        return metrics, seconds, experience

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        for model in self.trained:
            model.module.train()
        if self.settings.resume:
            self.restore()
        if self.resumed_from is None:  # from step 0: what a run killed before its first checkpoint logged goes
            self.logger.start_over()
        if self.evaluate_fn is not None and self.settings.eval_at_start and self.resumed_from is None:
            self.evaluate()
        with StopSignals() as stop, progress(self.iterations, self.label, self.settings.show_progress) as bar:
            bar.update(self.step)
            while self.step < self.iterations:
                self.run_iteration(bar)
                stopping = distributed.any_rank(stop.received is not None)  # the ranks stop at the same step
                if stopping and self.step < self.iterations:  # after the last step, finishing is quicker
                    path = self.checkpoints / f"step_{self.step}"
                    if self.last_checkpoint != path:
                        self.save_checkpoint(path)
                    raise Preempted(stop.received or "SIGTERM", self.step, path, stop.forward())
        if self.settings.save_final and self.resumed_from != self.checkpoints / "final":
            self.save_checkpoint(self.checkpoints / "final", final=True)
        return self.last_eval

    def run_iteration(self, bar) -> None:
        """One iteration, then what falls due after it: the train log, an evaluation, a checkpoint."""
        metrics, seconds, experience = self.train_iteration()
        self._window.append(metrics)
        counts = self._window_counts
        counts[0] += experience.examples
        counts[1] += experience.tokens
        counts[2] += seconds
        bar.update(1)
        bar.set_postfix(**{k: f"{metrics[k]:.4g}" for k in ("loss", "reward", "kl") if k in metrics}, refresh=False)
        last = self.step == self.iterations
        if self.step % self.settings.log_every == 0 or last:
            window = self._window
            keys = dict.fromkeys(k for m in window for k in m)
            logged = {f"{self.label}/{k}": float(np.mean([m[k] for m in window if k in m])) for k in keys}
            logged.update({f"{self.label}/{k}": float(v) for k, v in experience.counters.items()})  # last value
            if self.settings.count_flops:
                logged[f"{self.label}/flops"] = float(self.flops)    # cumulative
            logged[f"{self.label}/seconds"] = self.train_seconds    # cumulative training wall-clock
            logged[f"{self.label}/{self.algorithm.unit}_per_second"] = counts[0] / max(counts[2], 1e-9)
            logged[f"{self.label}/tokens_per_second"] = counts[1] / max(counts[2], 1e-9)
            if self.skipped:
                logged[f"{self.label}/skipped_steps"] = float(len(self.skipped))  # cumulative
            self.logger.log(logged, self.step)
            self._window, self._window_counts = [], [0, 0, 0.0]
        if self.evaluate_fn is not None and (self.step % self.settings.eval_every == 0 or last):
            self.evaluate()
        if self.settings.save_every and self.step % self.settings.save_every == 0 and not last:
            self.save_checkpoint(self.checkpoints / f"step_{self.step}")

    def evaluate(self) -> dict:
        """One evaluation, logged with the cost of reaching it (for frontiers and compute comparisons)."""
        start = time.perf_counter()
        metrics, tables = self.evaluate_fn(self.model, self.step)
        metrics["eval/seconds"] = time.perf_counter() - start
        if self.settings.count_flops:
            metrics["cost/train_flops"] = float(self.flops)
        metrics["cost/train_seconds"] = self.train_seconds
        self.logger.log(metrics, self.step)
        for name, rows in tables.items():
            if rows:
                self.logger.table(name, TABLE_COLUMNS if name == EVAL_TABLE else SWEEP_COLUMNS, rows, self.step)
        self.last_eval = {"step": self.step, **metrics}
        return self.last_eval

    # ---- checkpoints ------------------------------------------------------------------------
    def loop_state(self) -> dict:
        return {"step": self.step, "flops": int(self.flops), "train_seconds": self.train_seconds,
                "last_eval": self.last_eval, "skipped": self.skipped, "window": self._window,
                "window_counts": self._window_counts, "algorithm": self.algorithm.state_dict()}

    def save_checkpoint(self, path: Path, final: bool = False) -> None:
        """A resumable checkpoint (dpo_exp.checkpoint); `final` also exports the run's model in Hugging Face
        format (save_pretrained, with the tokenizer) and other trained models in sub-folders (e.g. value/). A write
        the machine refuses raises WriteFailed naming the newest checkpoint, which a rerun resumes from."""
        def export(folder: Path) -> None:  # on every rank: a sharded model's weights are gathered to rank 0
            for i, model in enumerate(self.trained):
                distributed.save_pretrained(model.module, folder if i == 0 else folder / model.name)
            if self.tokenizer is not None and distributed.is_main():
                self.tokenizer.save_pretrained(folder)

        checkpoint.save(path, self.trained, self.loop_state(), self.run_config, export if final else None,
                        intact=self.last_checkpoint)
        self.last_checkpoint = path
        checkpoint.prune(self.checkpoints, self.settings.keep_checkpoints)

    def restore(self) -> None:
        """Continue from the newest intact checkpoint (checkpoint.latest: damaged ones are skipped), if there is one,
        after checking that it was written by this run's config; metrics.jsonl and samples.jsonl are cut back to what
        that checkpoint had seen."""
        path = checkpoint.latest(self.checkpoints)
        if path is None:
            return
        saved = checkpoint.saved_config(path)
        if self.run_config is not None and saved is not None:
            diff = checkpoint.config_differences(saved, self.run_config)
            if diff:
                raise ConfigError(
                    f"{path} was written by a run whose config differs from this one in: {'; '.join(diff)}. "
                    "Rerun with the same config to resume, or start a new run elsewhere (run_name=..., or "
                    "trainer.resume=false to refuse resuming)")
        state = checkpoint.load(path, self.trained)
        self.step, self.flops, self.train_seconds = state["step"], state["flops"], state["train_seconds"]
        self.last_eval, self.skipped = state["last_eval"], state["skipped"]
        self._window, self._window_counts = state["window"], state["window_counts"]
        self.algorithm.load_state_dict(state["algorithm"])
        self.logger.rewind(self.step)
        self.resumed_from = self.last_checkpoint = path
        console(f"resuming from {path} (step {self.step} of {self.iterations})")
