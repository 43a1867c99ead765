"""Entry point: `python -m dpo_exp.train [GROUP=OPTION ...] [KEY=VALUE ...] [-m]`.

compose (Hydra, typed schema) → validate → π_SFT (cached) → preference pairs (cached)
→ what the algorithm declares it needs (policy, π_ref, reward model, value model, prompts)
→ the shared loop with evaluation → metrics.jsonl, summary.json, W&B.
Returns the configured objective for Hydra sweepers.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from transformers.utils import logging as transformers_logging

from dpo_exp import components, distributed
from dpo_exp.conf_path import CONF_DIR
from dpo_exp.errors import ConfigError, readable_errors
from dpo_exp.judging.winrates import judge_after_training
from dpo_exp.loggers import is_main_process
from dpo_exp.loop import Preempted, seed_everything
from dpo_exp.models import resolve_device
from dpo_exp.models.logps import set_logits_chunk_tokens
from dpo_exp.pipeline import (agree_on_run_directory, build_logger, check_resume, prepare, record_the_model_that_runs,
                              report_cached_stage, train_algorithm)
from dpo_exp.stages import stage_costs, stages_paid
from dpo_exp.validation import algorithm_of, validate

components.register_configs()
transformers_logging.disable_progress_bar()  # one progress bar (ours), not one per weight load


def run(cfg: DictConfig) -> dict:
    """One experiment, end to end; returns its summary (final evaluation and bookkeeping)."""
    validate(cfg)
    set_logits_chunk_tokens(cfg.trainer.logits_chunk_tokens)
    distributed.adopt_submitit_environment()
    distributed.init(resolve_device(cfg.trainer.device).type == "cuda", cfg.trainer.fsdp.timeout_minutes)
    agree_on_run_directory(cfg)
    record_the_model_that_runs(cfg)
    check_resume(cfg)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    prep = prepare(cfg)
    cls = algorithm_of(cfg)
    logger = build_logger(cfg, Path(cfg.paths.output_dir))
    try:
        result = (report_cached_stage if getattr(cls, "cached", False) else train_algorithm)(cfg, prep, logger)
        summary = {**result, "train_pairs": len(prep.train_tok), "eval_pairs": len(prep.eval_tok),
                   "sft_policy": prep.sft_dir, "wall_seconds": time.perf_counter() - started,
                   "algorithm/name": str(cfg.loss.name), "algorithm/family": cls.family_of(cfg),
                   "algorithm/label": cls.label(cfg), "algorithm/stages": stages_paid(cls.needs(cfg)),
                   "algorithm/needs": asdict(cls.needs(cfg)),
                   **stage_costs(cfg, prep), **{f"data/skipped/{reason}": n for reason, n in prep.skipped.items()}}
        logger.summary(summary)
    finally:
        logger.finish()
    print_summary(summary, cfg, cls)
    if cfg.eval.judge and summary.get("status") == "complete" and distributed.is_main():
        judge_after_training(cfg)
    if summary.get("status") == "diverged":
        raise RunStopped(summary["error"], exit_code=1)
    return summary


class RunStopped(Exception):
    """The run stopped before its end on purpose (diverged, preempted); the message says why, exit_code is the
    process status the command ends with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


AUTO_OBJECTIVES = ("eval/gold_reward", "eval/rewards/accuracies", "eval/accuracy")  # objective=auto: the first present
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the checkpoint is written; requeue the same command to resume


def summary_lines(summary: dict, cfg, algorithm) -> list[str]:
    """The printed summary: the gold reward and KL of the policy's samples where the run measured them, then the
    algorithm's own headline numbers (Algorithm.headline)."""
    def fmt(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"== dpo_exp summary: {cfg.experiment_name}, {algorithm.label(cfg)} (loss={cfg.loss.name}), "
             f"{summary['steps']} steps, {summary['wall_seconds']:.0f}s"]
    if "eval/gold_reward" in summary:
        lines.append(f"gold reward  pi_ref (pi_SFT): {fmt('eval/gold_reward_ref')}   policy: {fmt('eval/gold_reward')}")
    if "eval/kl" in summary:
        lines.append(f"KL(pi||pi_ref): {fmt('eval/kl')} +- {fmt('eval/kl_stderr')} nats (sequence level)")
    lines += [f"{title}: {fmt(key)}" for title, key in algorithm.headline if key in summary]
    skipped = {k[len("data/skipped/"):]: v for k, v in summary.items() if k.startswith("data/skipped/")}
    lines.append(f"rows skipped by reason: {skipped}" if skipped else "rows skipped: none")
    lines.append(f"run directory: {cfg.paths.output_dir}")
    return lines


def print_summary(summary: dict, cfg, algorithm) -> None:
    if is_main_process():
        print("\n".join(summary_lines(summary, cfg, algorithm)))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    with readable_errors(cfg.paths.output_dir):
        return _main(cfg)


def _main(cfg: DictConfig) -> float:
    try:
        summary = run(cfg)
    except Preempted as err:  # the whole process stops, a sweep too; rerunning it resumes each job where it was
        print(f"[dpo_exp] {err}", flush=True)
        if err.forward is not None:  # under submitit (hydra/launcher=slurm): it requeues the job, then exits
            err.forward()
        sys.exit(PREEMPTED_EXIT_CODE)
    except RunStopped as err:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"[dpo_exp] {err}", flush=True)
        sys.exit(err.exit_code)
    objective = cfg.objective
    if objective == "auto":  # the gold reward where the task has one, else held-out preference accuracy
        objective = next((k for k in AUTO_OBJECTIVES if k in summary), None)
        if objective is None:  # an algorithm and task that measure none of them: nothing for a sweeper to rank
            return float("nan")
    if objective not in summary:
        raise ConfigError(f"objective={objective} is not in summary.json; available: {', '.join(sorted(summary))}")
    return float(summary[objective])


if __name__ == "__main__":
    main()
