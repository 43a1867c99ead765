"""Entry point: `python -m dpo_exp.train [GROUP=OPTION ...] [KEY=VALUE ...] [-m]`.

compose (Hydra, typed schema) → validate → π_SFT (cached) → preference pairs (cached)
→ policy, reference → algorithm → training loop with evaluation → metrics.jsonl,
summary.json, W&B. Returns the configured objective for Hydra sweepers.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from dpo_exp.algorithms import build_algorithm
from dpo_exp.config import ConfigError, register_configs, validate
from dpo_exp.data import prompt_token_ids, tokenize_pairs
from dpo_exp.evaluation import EvalPrompts, Evaluator
from dpo_exp.loggers import FileSink, RunLogger, WandbSink
from dpo_exp.models import AdapterDisabled, apply_lora, freeze, load_model, load_tokenizer, resolve_device, torch_dtype
from dpo_exp.reference import Reference
from dpo_exp.stages import preference_data, sft_policy, tokenizer_source
from dpo_exp.tasks import build_task
from dpo_exp.trainer import Trainer, seed_everything

register_configs()
transformers_logging.disable_progress_bar()  # one progress bar (ours), not one per weight load


def build_logger(cfg, output_dir: Path) -> RunLogger:
    sinks: list = [FileSink(output_dir)]
    if cfg.logger.name.value == "wandb":
        group, name = None, cfg.experiment_name
        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                group = Path(hc.sweep.dir).name  # one W&B group per sweep
            if hc.job.override_dirname:
                name = f"{cfg.experiment_name}/{hc.job.override_dirname}"
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        sinks.append(WandbSink(cfg.logger, output_dir, config, name, group))
    return RunLogger(sinks)


def run(cfg: DictConfig) -> dict:
    """One experiment, end to end; returns its summary (final evaluation and bookkeeping)."""
    validate(cfg)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    device = resolve_device(cfg.trainer.device)
    task = build_task(cfg)
    algorithm = build_algorithm(cfg.loss)

    sft_dir = sft_policy(cfg, task)
    tokenizer = load_tokenizer(tokenizer_source(cfg, sft_dir), cfg.model.trust_remote_code)
    train_pairs, eval_pairs, skipped = preference_data(cfg, task, sft_dir, tokenizer)
    if not train_pairs:
        raise ValueError(f"no training pairs left after validation (skipped: {skipped})")
    lengths = (cfg.data.max_length, cfg.data.max_prompt_length, task.keep_prompt_end)
    train_tok = tokenize_pairs(tokenizer, train_pairs, *lengths)
    eval_tok = tokenize_pairs(tokenizer, eval_pairs, *lengths)

    m = cfg.model
    seed_everything(cfg.seed)
    policy = load_model(sft_dir, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code).to(device)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    lora = m.lora.r > 0
    if lora:
        policy = apply_lora(policy, m.lora)
        if m.gradient_checkpointing:
            policy.enable_input_require_grads()  # checkpointed blocks need an input that requires grad

    reference = None
    if cfg.reference.enabled:
        ref_path = cfg.reference.name_or_path or sft_dir

        def load_reference():
            if lora and cfg.reference.name_or_path is None:
                return AdapterDisabled(policy)  # π_ref = π_SFT = the policy's frozen base weights
            model = load_model(ref_path, torch_dtype(m.reference_dtype), m.attn_implementation, m.trust_remote_code)
            return freeze(model.to(device))

        resident = algorithm.needs_reference and not cfg.reference.precompute
        reference = Reference(load_reference, resident=resident, precision=cfg.trainer.precision.value)
        if algorithm.needs_reference and cfg.reference.precompute:
            reference.precompute("train", train_tok, tokenizer.pad_token_id, cfg.trainer.eval_batch_size)

    prompts = list(task.eval_prompts(tokenizer, eval_pairs))
    evaluator = Evaluator(
        algorithm, reference, eval_tok, EvalPrompts(prompts, [prompt_token_ids(tokenizer, p) for p in prompts]),
        tokenizer, task.gold_reward, cfg.task.generation, cfg.eval, cfg.trainer.eval_batch_size,
        cfg.trainer.precision.value, cfg.seed)
    logger = build_logger(cfg, output_dir)
    try:
        trainer = Trainer(policy, algorithm, train_tok, tokenizer.pad_token_id, cfg.trainer, cfg.optimizer, logger,
                          output_dir, cfg.seed, reference=reference, evaluator=evaluator, tokenizer=tokenizer)
        final = trainer.fit()
        if lora and m.lora.merge_on_save and cfg.trainer.save_final:
            merged = output_dir / "checkpoints" / "final" / "merged"
            policy.merge_and_unload().save_pretrained(merged)  # training is over: merging in place is safe
            tokenizer.save_pretrained(merged)
        summary = {**final, "steps": trainer.step, "train_pairs": len(train_tok), "eval_pairs": len(eval_tok),
                   "sft_policy": sft_dir, "wall_seconds": time.perf_counter() - started,
                   **{f"data/skipped/{reason}": n for reason, n in skipped.items()}}
        logger.summary(summary)
    finally:
        logger.finish()
    print_summary(summary, cfg)
    return summary


def print_summary(summary: dict, cfg) -> None:
    def fmt(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    loss = cfg.loss.name.value
    lines = [
        f"== dpo_exp summary: {cfg.experiment_name}, loss={loss}, beta={cfg.loss.beta}, {summary['steps']} steps, "
        f"{summary['wall_seconds']:.0f}s",
        f"gold reward  pi_ref (pi_SFT): {fmt('eval/gold_reward_ref')}   policy: {fmt('eval/gold_reward')}",
        f"KL(pi||pi_ref): {fmt('eval/kl')} +- {fmt('eval/kl_stderr')} nats (sequence level)",
        f"held-out preference accuracy (implicit reward): {fmt('eval/rewards/accuracies')}",
        f"rows skipped by reason: {skipped}" if (skipped := {k[13:]: v for k, v in summary.items()
                                                            if k.startswith("data/skipped/")}) else "rows skipped: none",
        f"run directory: {cfg.paths.output_dir}",
    ]
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    summary = run(cfg)
    objective = cfg.objective
    if objective == "auto":  # the gold reward where the task has one, else held-out preference accuracy
        objective = "eval/gold_reward" if "eval/gold_reward" in summary else "eval/rewards/accuracies"
    if objective not in summary:
        raise ConfigError(f"objective={objective} is not in summary.json; available: {', '.join(sorted(summary))}")
    return float(summary[objective])


if __name__ == "__main__":
    main()
