"""Cached stages before preference training: π_SFT and the task's preference pairs.

Both are entries of dpo_exp.cache keyed by everything that determines them, so the four
jobs of `-m loss.beta=0.05,0.1,0.5,1` train π_SFT and sample pairs once between them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from dpo_exp.algorithms import SFTAlgorithm
from dpo_exp.cache import cache_key, get_or_build
from dpo_exp.config import LossConfig, LossName, OptimizerConfig, OptimizerName, Schedule, TrainerConfig
from dpo_exp.data import PreferencePair, load_pairs, save_pairs, tokenize_pairs
from dpo_exp.loggers import FileSink, RunLogger
from dpo_exp.models import load_model, load_tokenizer, new_model, resolve_device, torch_dtype
from dpo_exp.trainer import Trainer, count_flops, seed_everything

CACHE_VERSION = 3  # bump when code changes what an entry holds
COST_FILE = "cost.json"


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else dict(node)


def sft_key(cfg) -> dict:
    sft = _plain(cfg.sft)
    sft.pop("checkpoint")
    model = _plain(cfg.model)
    for unused in ("reference_dtype", "gradient_checkpointing", "attn_implementation"):
        model.pop(unused)
    return {"version": CACHE_VERSION, "task": cfg.task.name, "data": _plain(cfg.data), "model": model, "sft": sft,
            "seed": cfg.seed, "precision": str(cfg.trainer.precision)}


def tokenizer_source(cfg, sft_dir: str) -> str:
    return cfg.model.tokenizer or (sft_dir if Path(sft_dir).is_dir() else cfg.model.name_or_path)


def sft_policy(cfg, task) -> str:
    """π_SFT: sft.checkpoint, or model.name_or_path itself (sft.train=false), or a cache entry."""
    if cfg.sft.checkpoint:
        return str(cfg.sft.checkpoint)
    if not cfg.sft.train:
        return cfg.model.name_or_path
    return str(get_or_build(cfg.paths.cache_dir, "sft", sft_key(cfg), measured(lambda out: train_sft(cfg, task, out))))


def measured(build):
    """Wrap a cache build so the entry records what it cost (cost.json: executed FLOPs, seconds)."""
    def wrapped(out: Path) -> None:
        started = time.perf_counter()
        with count_flops() as counter:  # always counted: stages are paid once and shared
            build(out)
        (out / COST_FILE).write_text(json.dumps({"flops": counter.get_total_flops(),
                                                 "seconds": time.perf_counter() - started}))
    return wrapped


def entry_cost(folder: Path) -> dict:
    path = Path(folder) / COST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def train_sft(cfg, task, out: Path) -> None:
    """The SFT stage: NLL on the task's SFT examples, saved with save_pretrained into `out`."""
    print(f"[dpo_exp] training π_SFT into the cache ({out.parent})")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    source = cfg.model.tokenizer or cfg.model.name_or_path
    if source:
        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    else:
        task.train_tokenizer(out)
        tokenizer = load_tokenizer(str(out))
    dtype = torch_dtype(cfg.model.policy_dtype)
    if cfg.model.name_or_path:
        model = load_model(cfg.model.name_or_path, dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    else:
        model = new_model(OmegaConf.to_container(cfg.model.architecture), tokenizer, dtype, cfg.model.attn_implementation)
    model.to(device)
    s = cfg.sft
    examples = tokenize_pairs(tokenizer, task.sft_examples(tokenizer), s.max_length, min(cfg.data.max_prompt_length, s.max_length - 1),
                              task.keep_prompt_end)
    trainer_cfg = TrainerConfig(batch_size=s.batch_size, epochs=s.epochs, max_steps=s.max_steps, log_every=10,
                                save_final=False, eval_at_start=False, device=cfg.trainer.device,
                                precision=cfg.trainer.precision, show_progress=cfg.trainer.show_progress)
    optimizer_cfg = OptimizerConfig(name=OptimizerName.adamw, lr=s.lr, warmup_steps=s.warmup_steps,
                                    schedule=Schedule.cosine, max_grad_norm=1.0)
    logger = RunLogger([FileSink(out)])
    Trainer(model, SFTAlgorithm(LossConfig(name=LossName.sft)), examples, tokenizer.pad_token_id, trainer_cfg,
            optimizer_cfg, logger, out, cfg.seed, label="sft").fit()
    logger.finish()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def pairs_key(cfg, sft_dir: str) -> dict:
    return {"version": CACHE_VERSION, "sft": sft_dir, "task": _plain(cfg.task), "data": _plain(cfg.data),
            "seed": cfg.seed}


def preference_data(cfg, task, sft_dir: str, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train, eval, skipped rows by reason) of the task, cached: for sampled tasks this is the costly part."""
    key = pairs_key(cfg, sft_dir)

    def build(out: Path) -> None:
        print(f"[dpo_exp] building preference pairs into the cache ({out.parent})")
        seed_everything(cfg.seed)
        train, evaluation, skipped = task.preference_pairs(Path(sft_dir), tokenizer)
        save_pairs(train, out / "train.jsonl")
        save_pairs(evaluation, out / "eval.jsonl")
        (out / "skipped.json").write_text(json.dumps(skipped, indent=2, sort_keys=True))

    folder = get_or_build(cfg.paths.cache_dir, "pairs", key, measured(build))
    skipped = json.loads((folder / "skipped.json").read_text())
    return load_pairs(folder / "train.jsonl"), load_pairs(folder / "eval.jsonl"), skipped


def reward_model_key(cfg, sft_dir: str) -> dict:
    return {"version": CACHE_VERSION, "pairs": pairs_key(cfg, sft_dir), "reward_model": _plain(cfg.reward_model),
            "normalise": {"temperature": cfg.ppo.temperature, "max_new_tokens": cfg.ppo.max_new_tokens},
            "model": {"dtype": cfg.model.policy_dtype}, "precision": str(cfg.trainer.precision), "seed": cfg.seed}


def reward_model_dir(cfg, prep) -> Path:
    """The Bradley-Terry reward model on the task's pairs, trained once and cached (π_SFT + scalar head).

    Its scores are normalised so that π_SFT's samples at PPO's temperature have mean 0.
    """
    from dpo_exp.data import prompt_token_ids
    from dpo_exp.ppo import RewardModelConfig, train_reward_model

    def build(out: Path) -> None:
        print(f"[dpo_exp] training the reward model into the cache ({out.parent})")
        seed_everything(cfg.seed)
        r = cfg.reward_model
        rm_cfg = RewardModelConfig(batch_size=r.batch_size, epochs=r.epochs, lr=r.lr, max_grad_norm=r.max_grad_norm,
                                   eval_every=r.eval_every, normalise_temperature=cfg.ppo.temperature,
                                   normalise_max_new_tokens=cfg.ppo.max_new_tokens, dtype=cfg.model.policy_dtype,
                                   precision=cfg.trainer.precision.value, seed=cfg.seed,
                                   show_progress=cfg.trainer.show_progress)
        prompts = sorted({p.prompt for p in prep.train_pairs})
        logger = RunLogger([FileSink(out)])
        try:
            _, final = train_reward_model(prep.sft_dir, prep.train_tok, prep.eval_tok, prep.tokenizer, rm_cfg, logger,
                                          out, normalise_prompts=[prompt_token_ids(prep.tokenizer, p) for p in prompts],
                                          device=prep.device)
        finally:
            logger.finish()
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))

    return get_or_build(cfg.paths.cache_dir, "reward_model", reward_model_key(cfg, prep.sft_dir), measured(build))


def stage_costs(cfg, prep) -> dict:
    """FLOPs and seconds of the cached stages this run relies on (paid once, shared by the runs that reuse them)."""
    from dpo_exp.config import LossName, RewardSource

    costs = {}
    stages = [("sft", Path(cfg.paths.cache_dir) / "sft" / cache_key(sft_key(cfg))),
              ("pair_sampling", Path(cfg.paths.cache_dir) / "pairs" / cache_key(pairs_key(cfg, prep.sft_dir)))]
    name = LossName(cfg.loss.name)
    if name is LossName.reward_model or (name is LossName.ppo and RewardSource(cfg.ppo.reward) is RewardSource.model):
        stages.append(("reward_model", Path(cfg.paths.cache_dir) / "reward_model"
                       / cache_key(reward_model_key(cfg, prep.sft_dir))))
    for stage, folder in stages:
        cost = entry_cost(folder)
        if cost:
            costs[f"cost/{stage}_flops"] = cost["flops"]
            costs[f"cost/{stage}_seconds"] = cost["seconds"]
    return costs
