"""Entry point: `python -m dpo_exp.train [GROUP=OPTION ...] [KEY=VALUE ...] [-m]`.

compose (Hydra, typed schema) → validate → π_SFT (cached) → preference pairs (cached)
→ policy, reference → algorithm → training loop with evaluation → metrics.jsonl,
summary.json, W&B. Returns the configured objective for Hydra sweepers.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from dpo_exp.algorithms import SFTAlgorithm, build_algorithm
from dpo_exp.config import ConfigError, LossConfig, LossName, RewardSource, register_configs, validate
from dpo_exp.data import prompt_token_ids, tokenize_pairs
from dpo_exp.evaluation import EvalPrompts, Evaluator
from dpo_exp.loggers import FileSink, RunLogger, WandbSink
from dpo_exp.models import AdapterDisabled, apply_lora, freeze, load_model, load_tokenizer, resolve_device, torch_dtype
from dpo_exp.reference import Reference
from dpo_exp.ppo import GoldScorer, PPOConfig, PPOTrainer, RewardModelScorer, ScalarHeadModel, make_value_model
from dpo_exp.stages import preference_data, reward_model_dir, sft_policy, stage_costs, tokenizer_source
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


@dataclass
class Prepared:
    """What every algorithm starts from: the task, π_SFT, the tokenizer and the pairs."""
    task: object
    sft_dir: str
    tokenizer: object
    train_pairs: list
    eval_pairs: list
    train_tok: list
    eval_tok: list
    skipped: dict
    device: torch.device


def prepare(cfg) -> Prepared:
    device = resolve_device(cfg.trainer.device)
    task = build_task(cfg)
    sft_dir = sft_policy(cfg, task)
    tokenizer = load_tokenizer(tokenizer_source(cfg, sft_dir), cfg.model.trust_remote_code)
    train_pairs, eval_pairs, skipped = preference_data(cfg, task, sft_dir, tokenizer)
    if not train_pairs:
        raise ValueError(f"no training pairs left after validation (skipped: {skipped})")
    lengths = (cfg.data.max_length, cfg.data.max_prompt_length, task.keep_prompt_end)
    return Prepared(task, sft_dir, tokenizer, train_pairs, eval_pairs, tokenize_pairs(tokenizer, train_pairs, *lengths),
                    tokenize_pairs(tokenizer, eval_pairs, *lengths), skipped, device)


def build_policy(cfg, prep: Prepared):
    """π_SFT as the trainable policy (with a LoRA adapter when model.lora.r > 0)."""
    m = cfg.model
    seed_everything(cfg.seed)
    policy = load_model(prep.sft_dir, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code)
    policy.to(prep.device)
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if m.lora.r > 0:
        policy = apply_lora(policy, m.lora)
        if m.gradient_checkpointing:
            policy.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return policy


def build_reference(cfg, prep: Prepared, policy, resident: bool) -> Optional[Reference]:
    if not cfg.reference.enabled:
        return None
    m = cfg.model
    ref_path = cfg.reference.name_or_path or prep.sft_dir

    def load_reference():
        if m.lora.r > 0 and cfg.reference.name_or_path is None:
            return AdapterDisabled(policy)  # π_ref = π_SFT = the policy's frozen base weights
        model = load_model(ref_path, torch_dtype(m.reference_dtype), m.attn_implementation, m.trust_remote_code)
        return freeze(model.to(prep.device))

    return Reference(load_reference, resident=resident, precision=cfg.trainer.precision.value)


def build_evaluator(cfg, prep: Prepared, algorithm, reference) -> Evaluator:
    prompts = list(prep.task.eval_prompts(prep.tokenizer, prep.eval_pairs))
    ids = [prompt_token_ids(prep.tokenizer, p) for p in prompts]
    return Evaluator(algorithm, reference, prep.eval_tok, EvalPrompts(prompts, ids), prep.tokenizer,
                     prep.task.gold_reward, cfg.task.generation, cfg.eval, cfg.trainer.eval_batch_size,
                     cfg.trainer.precision.value, cfg.seed)


def save_merged_lora(cfg, policy, tokenizer, output_dir: Path) -> None:
    if cfg.model.lora.r > 0 and cfg.model.lora.merge_on_save and cfg.trainer.save_final:
        merged = output_dir / "checkpoints" / "final" / "merged"
        policy.merge_and_unload().save_pretrained(merged)  # training is over: merging in place is safe
        tokenizer.save_pretrained(merged)


def run_preference(cfg, prep: Prepared, logger: RunLogger) -> dict:
    """SFT (Preferred-FT) and the DPO family: the shared training loop."""
    algorithm = build_algorithm(cfg.loss)
    policy = build_policy(cfg, prep)
    resident = algorithm.needs_reference and not cfg.reference.precompute
    reference = build_reference(cfg, prep, policy, resident)
    if reference is not None and algorithm.needs_reference and cfg.reference.precompute:
        reference.precompute("train", prep.train_tok, prep.tokenizer.pad_token_id, cfg.trainer.eval_batch_size)
    output_dir = Path(cfg.paths.output_dir)
    trainer = Trainer(policy, algorithm, prep.train_tok, prep.tokenizer.pad_token_id, cfg.trainer, cfg.optimizer,
                      logger, output_dir, cfg.seed, reference=reference,
                      evaluator=build_evaluator(cfg, prep, algorithm, reference), tokenizer=prep.tokenizer)
    final = trainer.fit()
    save_merged_lora(cfg, policy, prep.tokenizer, output_dir)
    return {**final, "steps": trainer.step}


def run_reward_model(cfg, prep: Prepared, logger: RunLogger) -> dict:
    """Train (or find in the cache) the Bradley-Terry reward model and report its held-out metrics."""
    folder = reward_model_dir(cfg, prep)
    metrics = json.loads((folder / "final_metrics.json").read_text())
    logger.log(metrics, int(metrics.get("step", 0)))
    return {**metrics, "steps": int(metrics.get("step", 0)), "reward_model": str(folder)}


def run_ppo(cfg, prep: Prepared, logger: RunLogger) -> dict:
    """PPO from π_SFT against the reward model (ppo.reward=model) or the task's gold reward (PPO-GT)."""
    m = cfg.model
    policy = build_policy(cfg, prep)
    if RewardSource(cfg.ppo.reward) is RewardSource.model:
        rm = ScalarHeadModel.from_pretrained(reward_model_dir(cfg, prep), dtype=torch_dtype(m.policy_dtype),
                                             attn_implementation=m.attn_implementation, device=prep.device)
        score_fn = RewardModelScorer(rm, prep.tokenizer.pad_token_id, precision=cfg.trainer.precision.value)
        value_model = make_value_model(reward_model=rm)  # the value model starts from the reward model
    else:
        score_fn = GoldScorer(prep.task.gold_reward)
        sft = load_model(prep.sft_dir, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code)
        value_model = make_value_model(policy=sft.to(prep.device))  # no reward model: from π_SFT, zero head
    reference = build_reference(cfg, prep, policy, resident=True)
    evaluator = build_evaluator(cfg, prep, SFTAlgorithm(LossConfig(name=LossName.sft, beta=cfg.loss.beta)),
                                reference)
    prompt_texts = sorted({p.prompt for p in prep.train_pairs})
    section = OmegaConf.to_container(cfg.ppo, resolve=True, enum_to_str=True)
    names = {f.name for f in fields(PPOConfig)}
    ppo_cfg = PPOConfig(**{k: v for k, v in section.items() if k in names}, precision=cfg.trainer.precision.value,
                        seed=cfg.seed, show_progress=cfg.trainer.show_progress)
    seed_everything(cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    trainer = PPOTrainer(policy, reference, score_fn, value_model, prep.tokenizer,
                         [prompt_token_ids(prep.tokenizer, t) for t in prompt_texts], ppo_cfg, logger, output_dir,
                         prompt_texts=prompt_texts, evaluator=evaluator, eval_every=cfg.ppo.eval_every,
                         eval_at_start=cfg.trainer.eval_at_start, save_final=cfg.trainer.save_final,
                         count_flops_enabled=cfg.trainer.count_flops)
    final = trainer.fit()
    save_merged_lora(cfg, policy, prep.tokenizer, output_dir)
    return {**final, "steps": trainer.step}


RUNNERS = {LossName.ppo: run_ppo, LossName.reward_model: run_reward_model}  # everything else: run_preference


def run(cfg: DictConfig) -> dict:
    """One experiment, end to end; returns its summary (final evaluation and bookkeeping)."""
    validate(cfg)
    started = time.perf_counter()
    seed_everything(cfg.seed)
    prep = prepare(cfg)
    logger = build_logger(cfg, Path(cfg.paths.output_dir))
    try:
        result = RUNNERS.get(LossName(cfg.loss.name), run_preference)(cfg, prep, logger)
        summary = {**result, "train_pairs": len(prep.train_tok), "eval_pairs": len(prep.eval_tok),
                   "sft_policy": prep.sft_dir, "wall_seconds": time.perf_counter() - started,
                   **stage_costs(cfg, prep), **{f"data/skipped/{reason}": n for reason, n in prep.skipped.items()}}
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
        objective = next((k for k in ("eval/gold_reward", "eval/rewards/accuracies", "eval/accuracy") if k in summary),
                         "eval/gold_reward")
    if objective not in summary:
        raise ConfigError(f"objective={objective} is not in summary.json; available: {', '.join(sorted(summary))}")
    return float(summary[objective])


if __name__ == "__main__":
    main()
