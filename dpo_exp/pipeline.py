"""What a run is built from, for both entry points (`python -m dpo_exp.train` and `python -m dpo_exp.judge`).

`prepare(cfg)` makes what every algorithm starts from: the task, π_SFT (a cached stage), the tokenizer and the
tokenized pairs. `train_algorithm` builds exactly what the selected algorithm declares it needs (`Needs`: the
policy, π_ref or its precomputed log-probs, the reward and value models, rollout prompts) and trains it
through the shared loop. The cached stages themselves (π_SFT, sampled pairs, the reward model) are in
`dpo_exp.stages`. Nothing here imports an entry point.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from dpo_exp import checkpoint, distributed
from dpo_exp.algorithms import Needs, Resources
from dpo_exp.cache import CHECKPOINTS, get_or_build
from dpo_exp.data import PairLayout, prompt_token_ids, tokenize_dataset
from dpo_exp.data.files import check_readable
from dpo_exp.errors import ConfigError, DataFileError, writing
from dpo_exp.evaluation import EvalPrompts, Evaluator
from dpo_exp.loggers import FileSink, RunLogger, WandbSink, is_main_process
from dpo_exp.loop import Diverged, Loop, LoopSettings, seed_everything
from dpo_exp.distributed import find_blocks
from dpo_exp.models import (AdapterDisabled, ScalarHeadModel, apply_lora, freeze, load_model,
                            load_tokenizer, make_value_model, resolve_device, torch_dtype)
from dpo_exp.reference import Reference
from dpo_exp.stages import preference_data, reward_model_dir, sft_policy, tokenizer_source
from dpo_exp.tasks import build_task
from dpo_exp.validation import algorithm_of


def build_logger(cfg, output_dir: Path) -> RunLogger:
    if not is_main_process():
        return RunLogger([])
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


def data_source(cfg) -> str:
    """Where the training data comes from, as an error message names it."""
    d = cfg.data
    return d.path or (f"{d.hub_name}[{d.train_split}]" if d.hub_name else f"data={d.name}")


def check_data_files(data) -> None:
    """data.path and data.eval_path exist and their first rows parse, before any stage runs: a wrong name or a
    broken file fails in seconds, not after π_SFT has trained (a held-out file is otherwise first read then)."""
    for path in (data.path, data.eval_path):
        if path:
            check_readable(path)


def prepare(cfg) -> Prepared:
    device = resolve_device(cfg.trainer.device)
    task = build_task(cfg)
    check_data_files(cfg.data)
    sft_dir = sft_policy(cfg, task)
    tokenizer = load_tokenizer(tokenizer_source(cfg, sft_dir), cfg.model.trust_remote_code)
    train_pairs, eval_pairs, skipped = preference_data(cfg, task, sft_dir, tokenizer)
    if not train_pairs:
        raise DataFileError(f"{data_source(cfg)}: no training pairs left after validation (skipped: {skipped})")
    lengths = (cfg.data.max_length, cfg.data.max_prompt_length, task.keep_prompt_end)
    train_tok, train_dropped = tokenize_dataset(tokenizer, train_pairs, *lengths)
    eval_tok, eval_dropped = tokenize_dataset(tokenizer, eval_pairs, *lengths)
    skipped = {**skipped, **{f"train/{k}": v for k, v in train_dropped.items()},
               **{f"eval/{k}": v for k, v in eval_dropped.items()}}
    if not train_tok:
        raise DataFileError(f"{data_source(cfg)}: no training pairs left after tokenization (skipped: {skipped}); "
                            f"raise data.max_length={cfg.data.max_length} or lower data.max_prompt_length="
                            f"{cfg.data.max_prompt_length}")
    return Prepared(task, sft_dir, tokenizer, train_pairs, eval_pairs, train_tok, eval_tok, skipped, device)


# ---- building what an algorithm needs ------------------------------------------------------------

def build_policy(cfg, prep: Prepared):
    """π_SFT as the trainable policy (with a LoRA adapter when model.lora.r > 0)."""
    m = cfg.model
    seed_everything(cfg.seed)
    policy = load_model(prep.sft_dir, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code)
    policy.to(prep.device)
    try:
        find_blocks(policy, m.block_class)  # a misspelt block_class fails here, not when sharding starts
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if m.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if m.lora.r > 0:
        policy = apply_lora(policy, m.lora)
        if m.gradient_checkpointing:
            policy.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return distributed.shard_as_configured(policy, cfg)


def build_reference(cfg, prep: Prepared, policy, resident: bool) -> Optional[Reference]:
    if not cfg.reference.enabled:
        return None
    m = cfg.model
    ref_path = cfg.reference.name_or_path or prep.sft_dir

    def load_reference():
        if m.lora.r > 0 and cfg.reference.name_or_path is None:
            return AdapterDisabled(policy)  # π_ref = π_SFT = the policy's frozen base weights
        model = load_model(ref_path, torch_dtype(m.reference_dtype), m.attn_implementation, m.trust_remote_code)
        return distributed.shard_as_configured(freeze(model.to(prep.device)), cfg)

    return Reference(load_reference, resident=resident, precision=cfg.trainer.precision.value,
                     layout=PairLayout.of(cfg.trainer, cfg.model.attn_implementation), store=reference_store(cfg, ref_path))


def reference_store(cfg, ref_path: str):
    """Reference log-prob tables in the cache (`reference_logps/<key>/logps.pt`), keyed by what determines them:
    π_ref (a folder by its resolved path, which for π_SFT is its own cache key; else the hub name), its dtype, the
    precision and attention they are computed in, and the token ids of the pairs (which carry the data, the
    tokenizer and truncation). Under torchrun every rank computes its share and rank 0 writes."""
    m = cfg.model
    reference = str(Path(ref_path).resolve()) if Path(ref_path).is_dir() else ref_path

    def store(pairs, compute):
        key = {"reference": reference, "dtype": m.reference_dtype, "precision": cfg.trainer.precision.value,
               "attention": m.attn_implementation, "pairs": pairs_digest(pairs)}

        def build(out: Path) -> None:
            chosen, rejected = compute(out / CHECKPOINTS)  # finished chunks are kept there: a rerun continues
            if distributed.is_main():
                torch.save({"chosen": chosen, "rejected": rejected}, out / "logps.pt")

        folder = get_or_build(cfg.paths.cache_dir, "reference_logps", key, build, collective=True)
        table = torch.load(folder / "logps.pt")
        return table["chosen"], table["rejected"]

    return store


def pairs_digest(pairs) -> str:
    """A hash of the pairs' indices and token ids, in order."""
    digest = hashlib.sha256()
    for p in pairs:
        digest.update(np.asarray([p.index, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids), *p.prompt_ids,
                                  *p.chosen_ids, *p.rejected_ids], dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def build_resources(cfg, prep: Prepared, needs: Needs) -> Resources:
    """Exactly what the algorithm declared: nothing it does not need is loaded."""
    m = cfg.model
    res = Resources(cfg, prep.tokenizer, prep.device, train_pairs=prep.train_tok, gold_reward=prep.task.gold_reward)
    if needs.policy:
        res.policy = build_policy(cfg, prep)
    if needs.reward_model:
        res.reward_model = ScalarHeadModel.from_pretrained(reward_model_dir(cfg, prep), dtype=torch_dtype(m.policy_dtype),
                                                           attn_implementation=m.attn_implementation, device=prep.device)
    if needs.value_model:
        if res.reward_model is not None:
            res.value_model = make_value_model(reward_model=res.reward_model)  # value starts from the reward model
        else:
            sft = load_model(prep.sft_dir, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code)
            res.value_model = make_value_model(policy=sft.to(prep.device))  # from π_SFT with a zero head
        res.value_model = distributed.shard_as_configured(res.value_model, cfg)
    if res.reward_model is not None:
        # after the value model copied it whole
        res.reward_model = distributed.shard_as_configured(freeze(res.reward_model), cfg)
    # π_ref is always built (lazily when training needs none) so that every method's eval/kl is measured alike
    precompute = precomputes_reference(cfg, prep, needs)
    resident = needs.reference and not precompute
    res.reference = build_reference(cfg, prep, res.policy, resident)
    if precompute:
        res.reference.precompute("train", prep.train_tok, prep.tokenizer.pad_token_id, cfg.trainer.eval_batch_size)
    if needs.rollouts:
        res.prompt_texts = sorted({p.prompt for p in prep.train_pairs})
        res.prompt_ids = [prompt_token_ids(prep.tokenizer, t) for t in res.prompt_texts]
    return res


def precomputes_reference(cfg, prep: Prepared, needs: Needs) -> bool:
    """reference.precompute, or when null (auto) whenever training reaches every training pair: the table then
    costs one π_ref pass over the pairs, no more than a resident π_ref, and every later epoch, job of a sweep
    and resumed run reads it instead of running π_ref. Never for rollouts (their pairs are new every step)."""
    if not needs.reference or needs.rollouts:
        return False
    if cfg.reference.precompute is not None:
        return bool(cfg.reference.precompute)
    t, n = cfg.trainer, len(prep.train_tok)
    return (t.max_steps * t.batch_size if t.max_steps is not None else t.epochs * n) >= n


def build_evaluator(cfg, prep: Prepared, algorithm, reference) -> Evaluator:
    prompts = list(prep.task.eval_prompts(prep.tokenizer, prep.eval_pairs))
    ids = [prompt_token_ids(prep.tokenizer, p) for p in prompts]
    return Evaluator(algorithm, reference, prep.eval_tok, EvalPrompts(prompts, ids), prep.tokenizer,
                     prep.task.gold_reward, cfg.task.generation, cfg.eval, cfg.trainer.eval_batch_size,
                     cfg.trainer.precision.value, cfg.seed, PairLayout.of(cfg.trainer, cfg.model.attn_implementation))


def save_merged_lora(cfg, policy, tokenizer, output_dir: Path, sft_dir: str) -> None:
    if not (cfg.model.lora.r > 0 and cfg.model.lora.merge_on_save and cfg.trainer.save_final):
        return
    final = output_dir / "checkpoints" / "final"
    if distributed.world_size() == 1:
        merged = policy.merge_and_unload()  # training is over: merging in place is safe
    elif distributed.is_main():  # the policy is sharded: merge the exported adapter into a fresh π_SFT on rank 0
        from peft import PeftModel

        base = load_model(sft_dir, torch_dtype(cfg.model.policy_dtype), cfg.model.attn_implementation,
                          cfg.model.trust_remote_code)
        merged = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    if distributed.is_main():  # refused: checkpoints/final stays whole, a rerun resumes from it and merges again
        with writing(final / "merged", checkpoint.describe(final), remove=final / "merged"):
            merged.save_pretrained(final / "merged")
            tokenizer.save_pretrained(final / "merged")


# ---- running -----------------------------------------------------------------------------------

def train_algorithm(cfg, prep: Prepared, logger: RunLogger) -> dict:
    """Build what the selected algorithm needs and train it through the shared loop."""
    cls = algorithm_of(cfg)
    res = build_resources(cfg, prep, cls.needs(cfg))
    seed_everything(cfg.seed)  # the algorithm starts from the same RNG state whatever loading consumed
    algorithm = cls(str(cfg.loss.name), cfg, res)
    output_dir = Path(cfg.paths.output_dir)
    loop = Loop(algorithm, LoopSettings.from_trainer(cfg.trainer, **cls.loop_overrides(cfg)), logger, output_dir,
                evaluate=build_evaluator(cfg, prep, algorithm, res.reference), tokenizer=prep.tokenizer,
                run_config=run_config(cfg))
    try:
        final = loop.fit()
    except Diverged as err:  # the run stops; its summary says where and why
        return {**loop.last_eval, "steps": loop.step, "status": "diverged", "diverged": err.record, "error": str(err)}
    if res.policy is not None:
        save_merged_lora(cfg, res.policy, prep.tokenizer, output_dir, prep.sft_dir)
    return {**final, "steps": loop.step, "status": "complete", "skipped_steps": len(loop.skipped),
            **({"resumed_from": str(loop.resumed_from)} if loop.resumed_from else {})}


def run_config(cfg) -> dict:
    """The resolved config, as written into checkpoints and compared on resume."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def agree_on_run_directory(cfg) -> None:
    """Every rank of a torchrun job writes and resumes in rank 0's run directory (ranks started a second apart
    can name a timestamped folder differently)."""
    chosen = distributed.broadcast_object(str(cfg.paths.output_dir))
    if chosen != str(cfg.paths.output_dir):
        OmegaConf.update(cfg, "paths.output_dir", chosen)


def record_the_model_that_runs(cfg) -> None:
    """model.architecture builds a model only when model.name_or_path is null; a run that loads a checkpoint
    (debug=smoke model.name_or_path=..., which keeps the smoke budget's tiny architecture) records no
    architecture, in its config and in the .hydra/config.yaml Hydra wrote before the run started."""
    if not (cfg.model.name_or_path and cfg.model.architecture):
        return
    OmegaConf.update(cfg, "model.architecture", {}, merge=False)
    recorded = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
    if distributed.is_main() and recorded.is_file():
        composed = OmegaConf.load(recorded)
        composed.model = OmegaConf.to_container(cfg.model, resolve=True)
        OmegaConf.save(composed, recorded)


def check_resume(cfg) -> None:
    """trainer.resume=false refuses to continue a run: a run directory that already holds checkpoints is an
    error, never silently trained over."""
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    if not cfg.trainer.resume and checkpoint.candidates(folder):  # intact or not: the folder is an earlier run's
        raise ConfigError(f"{folder} holds checkpoints of an earlier run and trainer.resume=false: pick another "
                          "run directory (run_name=...) or resume it (trainer.resume=true)")


def report_cached_stage(cfg, prep: Prepared, logger: RunLogger) -> dict:
    """An algorithm whose product is a shared cache entry (the reward model): find or train it, and report it in
    the run's own folder and W&B run: its training curves and its final evaluation."""
    folder = reward_model_dir(cfg, prep)
    curves = folder / "metrics.jsonl"  # its training curves (train/loss, train/accuracy, ...) as it was trained
    for line in curves.read_text().splitlines() if curves.exists() else []:
        row = json.loads(line)
        logger.log({k: v for k, v in row.items() if k != "step"}, int(row["step"]))
    metrics = json.loads((folder / "final_metrics.json").read_text())
    logger.log(metrics, int(metrics.get("step", 0)))
    return {**metrics, "steps": int(metrics.get("step", 0)), "reward_model": str(folder)}
