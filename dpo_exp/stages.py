"""Cached stages before preference training: π_SFT and the task's preference pairs.

Both are entries of dpo_exp.cache keyed by everything that determines them, so the four
jobs of `-m loss.beta=0.05,0.1,0.5,1` train π_SFT and sample pairs once between them.
With model.chat_template, π_SFT's folder holds the model and tokenizer with that template
(dpo_exp.models.templates): the SFT stage applies it, and a given model (sft.train=false,
sft.checkpoint) gets it in a cache entry of its own (`chat_model`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from dpo_exp import distributed
from dpo_exp.algorithms import ALGORITHMS, Resources
from dpo_exp.algorithms.reward_model import RewardModelEvaluator, normalise_reward_model
from dpo_exp.cache import cache_key, get_or_build
from dpo_exp.data import PreferencePair, load_pairs, prompt_token_ids, save_pairs, tokenize_dataset
from dpo_exp.data.formats import conversational
from dpo_exp.loggers import FileSink, RunLogger, console
from dpo_exp.loop import Loop, LoopSettings, count_flops, seed_everything
from dpo_exp.models import (ScalarHeadModel, load_model, load_tokenizer, new_model, resolve_device, stop_token_ids,
                            torch_dtype)
from dpo_exp.models import templates
from dpo_exp.models.sampling import keeping

CACHE_VERSION = 5  # bump when code changes what an entry holds (5: sampled pairs keep their token ids)
COST_FILE = "cost.json"
# Conversations are tokenized as their chat template renders the whole conversation (dpo_exp.data.chat); keys of
# layouts that may hold them carry this, so entries made before are not reused. Text-only keys are as they were.
CHAT_TOKENS = 1


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else dict(node)


def _data_key(data) -> dict:
    """The data section as cache keys hold it: the file-layout settings only where they are set (a default
    data.format and an empty data.columns key as before they existed, so existing cache entries still match)."""
    out = _plain(data)
    out["columns"] = {k: v for k, v in (out.get("columns") or {}).items() if v}
    for key in ("format", "columns"):
        if not out.get(key):
            out.pop(key, None)
    return out


# Model settings that make π_SFT; the rest (LoRA, block_class, gradient checkpointing, the reference's dtype,
# attention kernel) only change how later stages train or run, never the SFT weights' values.
SFT_MODEL_KEYS = ("name", "name_or_path", "architecture", "tokenizer", "policy_dtype", "trust_remote_code")


def sft_key(cfg) -> dict:
    """What determines π_SFT: the task name, the data section except data.max_length (the SFT stage cuts
    sequences at sft.max_length), SFT_MODEL_KEYS of the model and its chat template where one is set, the whole
    sft section except sft.checkpoint and sft.save_every, the seed and trainer.precision. Not the loss, β, LoRA or
    anything of the later stages."""
    sft = _plain(cfg.sft)
    sft.pop("checkpoint")
    sft.pop("save_every", None)  # how often the build checkpoints, not what it builds
    data = _data_key(cfg.data)
    data.pop("max_length")
    model = {k: v for k, v in _plain(cfg.model).items() if k in SFT_MODEL_KEYS}
    if cfg.model.chat_template:
        model["chat_template"] = templates.resolve(cfg.model.chat_template).key()
    key = {"version": CACHE_VERSION, "task": cfg.task.name, "data": data, "model": model, "sft": sft,
           "seed": cfg.seed, "precision": str(cfg.trainer.precision)}
    if _conversational(cfg.data):
        key["chat_tokens"] = CHAT_TOKENS
    return key


def _conversational(data) -> bool:
    """The data's layout may hold conversations (what it gives then depends on the chat template)."""
    return conversational(data.format or data.name)


def tokenizer_source(cfg, sft_dir: str) -> str:
    """π_SFT's tokenizer: with model.chat_template the one saved with π_SFT (it holds the template), else
    model.tokenizer, π_SFT's folder or the model's."""
    if cfg.model.chat_template:
        return sft_dir
    return cfg.model.tokenizer or (sft_dir if Path(sft_dir).is_dir() else cfg.model.name_or_path)


def sft_policy(cfg, task) -> str:
    """π_SFT: sft.checkpoint, or model.name_or_path itself (sft.train=false), or a cache entry; a given model
    with model.chat_template: its copy with the template (`chat_model`)."""
    if cfg.sft.train and not cfg.sft.checkpoint:
        return str(get_or_build(cfg.paths.cache_dir, "sft", sft_key(cfg),
                                measured(lambda out: train_sft(cfg, task, out)), collective=True))
    given = str(cfg.sft.checkpoint) if cfg.sft.checkpoint else cfg.model.name_or_path
    return chat_model(cfg, given) if cfg.model.chat_template else given


def chat_model_key(cfg, source: str) -> dict:
    """What a given model with model.chat_template depends on: the model (a folder by its resolved path), its
    tokenizer (model.tokenizer, else the model's), the template and the dtype its weights are saved in."""
    def where(name):
        return str(Path(name).resolve()) if name and Path(name).is_dir() else name

    return {"version": CACHE_VERSION, "model": where(source), "tokenizer": where(cfg.model.tokenizer),
            "chat_template": templates.resolve(cfg.model.chat_template).key(), "dtype": cfg.model.policy_dtype}


def chat_model(cfg, source: str) -> str:
    """The given model and its tokenizer with model.chat_template, saved in the cache: the special tokens the
    template needs added, the embeddings resized for them, the end of turn among the generation config's EOS ids."""
    m = cfg.model

    def build(out: Path) -> None:
        console(f"giving {source} the chat template {m.chat_template} ({out.parent})")
        tokenizer = load_tokenizer(m.tokenizer or source, m.trust_remote_code)
        added = templates.apply(tokenizer, templates.resolve(m.chat_template))
        model = load_model(source, torch_dtype(m.policy_dtype), m.attn_implementation, m.trust_remote_code)
        templates.fit_model(model, tokenizer)
        if added:
            console(f"added special tokens {added}; the embeddings now have {len(tokenizer)} rows")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return str(get_or_build(cfg.paths.cache_dir, "chat_model", chat_model_key(cfg, source), build))


def measured(build):
    """Wrap a cache build so the entry records what it cost (cost.json: executed FLOPs, seconds)."""
    def wrapped(out: Path) -> None:
        started = time.perf_counter()
        with count_flops() as counter:  # always counted: stages are paid once and shared
            build(out)
        flops = distributed.reduce_floats([counter.get_total_flops()])[0]  # every rank's share of the work
        if distributed.is_main():
            (out / COST_FILE).write_text(json.dumps({"flops": int(flops), "seconds": time.perf_counter() - started}))
    return wrapped


def entry_cost(folder: Path) -> dict:
    path = Path(folder) / COST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def train_sft(cfg, task, out: Path) -> None:
    """The SFT stage: NLL on the task's SFT examples, saved with save_pretrained into `out`. The tokenizer, the
    model and the examples are loaded before it says it trains, so a missing or broken data file or a model that
    cannot be loaded is reported as itself, not under "training π_SFT"."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.trainer.device)
    source = cfg.model.tokenizer or cfg.model.name_or_path
    if source:
        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    else:
        if distributed.is_main():
            task.train_tokenizer(out)
        distributed.barrier()  # the other ranks read rank 0's tokenizer
        tokenizer = load_tokenizer(str(out))
    if cfg.model.chat_template:  # before the examples: conversations are tokenized through it
        templates.apply(tokenizer, templates.resolve(cfg.model.chat_template))
    dtype = torch_dtype(cfg.model.policy_dtype)
    if cfg.model.name_or_path:
        model = load_model(cfg.model.name_or_path, dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    else:
        model = new_model(OmegaConf.to_container(cfg.model.architecture), tokenizer, dtype, cfg.model.attn_implementation)
    if cfg.model.chat_template:
        templates.fit_model(model, tokenizer)  # rows for its special tokens; its end of turn stops generation
    model = distributed.shard_as_configured(model.to(device), cfg)
    s = cfg.sft
    examples, _ = tokenize_dataset(tokenizer, task.sft_examples(tokenizer), s.max_length,  # room for a response token:
                                   min(cfg.data.max_prompt_length, s.max_length - 1), task.keep_prompt_end)  # none dropped
    stage = stage_config(cfg, "sft", s.optimizer, batch_size=s.batch_size, epochs=s.epochs, max_steps=s.max_steps)
    algorithm = ALGORITHMS["sft"]("sft", stage, Resources(stage, tokenizer, device, policy=model,
                                                               train_pairs=examples))
    console(f"training π_SFT into the cache ({out.parent})")
    settings = LoopSettings.from_trainer(stage.trainer, log_every=10, save_final=False, eval_at_start=False,
                                         save_every=s.save_every, resume=True)  # continues an interrupted build
    logger = stage_logger(out)
    try:
        Loop(algorithm, settings, logger, out, label="sft").fit()
    finally:
        logger.finish()
    distributed.save_pretrained(model, out)
    if distributed.is_main():
        tokenizer.save_pretrained(out)


def stage_logger(out: Path) -> RunLogger:
    """A cache stage's metrics.jsonl (written by rank 0). The stage's Loop cuts it back to the checkpoint it resumes
    from, or empties it when it starts from step 0 (Loop.fit: logger.start_over)."""
    return RunLogger([FileSink(out)] if distributed.is_main() else [])


def stage_config(cfg, algorithm: str, optimizer, **trainer):
    """The run's config as a cached stage sees it: its algorithm, its optimizer section, its batching."""
    return OmegaConf.merge(cfg, {"loss": {"name": algorithm}, "optimizer": optimizer,
                                 "trainer": {"grad_accumulation_steps": 1, **trainer}})


def pairs_key(cfg, sft_dir: str, tokenizer=None) -> dict:
    """What determines the preference pairs: π_SFT's folder (itself a key of everything SFT depends on), the
    whole task and data sections (prompts, sampling, the gold reward; the dataset's files and filters), the seed
    and, for layouts that may hold conversations, the tokenizer's chat template. Not the model's training
    settings, the loss or β."""
    key = {"version": CACHE_VERSION, "sft": sft_dir, "task": _plain(cfg.task), "data": _data_key(cfg.data),
           "seed": cfg.seed}
    template = getattr(tokenizer, "chat_template", None)
    if _conversational(cfg.data) and template:
        key["chat_template"] = cache_key(template)
        key["chat_tokens"] = CHAT_TOKENS
    return key


def preference_data(cfg, task, sft_dir: str, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train, eval, skipped rows by reason) of the task, cached: for sampled tasks this is the costly part."""
    key = pairs_key(cfg, sft_dir, tokenizer)

    def build(out: Path) -> None:
        console(f"building preference pairs into the cache ({out.parent})")
        seed_everything(cfg.seed)
        with keeping(out):  # finished sampling batches, from which an interrupted build continues
            train, evaluation, skipped = task.preference_pairs(Path(sft_dir), tokenizer)
        save_pairs(train, out / "train.jsonl")
        save_pairs(evaluation, out / "eval.jsonl")
        (out / "skipped.json").write_text(json.dumps(skipped, indent=2, sort_keys=True))
        for kept in out.glob("samples_*.pt*"):  # only a resumed build needs them
            kept.unlink()

    folder = get_or_build(cfg.paths.cache_dir, "pairs", key, measured(build))
    skipped = json.loads((folder / "skipped.json").read_text())
    return load_pairs(folder / "train.jsonl"), load_pairs(folder / "eval.jsonl"), skipped


def reward_model_key(cfg, sft_dir: str, tokenizer=None) -> dict:
    """What determines the reward model: the pairs' key, the reward_model section but its save_every, PPO's sampling
    temperature and max_new_tokens (its scores are normalised on π_SFT's samples at them), the model's dtype,
    trainer.precision and the seed."""
    section = _plain(cfg.reward_model)
    section.pop("save_every", None)  # how often the build checkpoints, not what it builds
    return {"version": CACHE_VERSION, "pairs": pairs_key(cfg, sft_dir, tokenizer),
            "reward_model": section,
            "normalise": {"temperature": cfg.ppo.temperature, "max_new_tokens": cfg.ppo.max_new_tokens},
            "model": {"dtype": cfg.model.policy_dtype}, "precision": str(cfg.trainer.precision), "seed": cfg.seed}


def reward_model_dir(cfg, prep) -> Path:
    """The Bradley-Terry reward model on the task's pairs, trained once and cached (π_SFT + scalar head).

    Its scores are normalised so that π_SFT's samples at PPO's temperature have mean 0.
    """
    def build(out: Path) -> None:
        console(f"training the reward model into the cache ({out.parent})")
        seed_everything(cfg.seed)
        r, device, tok = cfg.reward_model, prep.device, prep.tokenizer
        dtype = torch_dtype(cfg.model.policy_dtype)
        backbone = load_model(prep.sft_dir, dtype).to(device)
        # scored where the policy's samples stop (its stop tokens), also on pairs whose template writes on after it
        model = ScalarHeadModel(backbone, end_ids=stop_token_ids(tok, backbone.generation_config))
        model = distributed.shard_as_configured(model, cfg)
        stage = stage_config(cfg, "reward_model", r.optimizer, batch_size=r.batch_size, epochs=r.epochs, max_steps=None)
        algorithm = ALGORITHMS["reward_model"]("reward_model", stage,
                                                    Resources(stage, tok, device, reward_model=model,
                                                              train_pairs=prep.train_tok))
        precision = str(cfg.trainer.precision)
        evaluate = RewardModelEvaluator(prep.eval_tok, tok.pad_token_id, cfg.trainer.eval_batch_size, precision)
        settings = LoopSettings.from_trainer(stage.trainer, eval_every=r.eval_every, log_every=10,
                                             save_every=r.save_every, resume=True,  # continues an interrupted build
                                             eval_at_start=False, save_final=False)
        logger = stage_logger(out)
        try:
            final = Loop(algorithm, settings, logger, out, evaluate=evaluate if prep.eval_tok else None).fit()
            prompts = sorted({p.prompt for p in prep.train_pairs})
            sft = distributed.shard_as_configured(load_model(prep.sft_dir, dtype).to(device), cfg)
            stats = normalise_reward_model(model, sft, tok, [prompt_token_ids(tok, p) for p in prompts],
                                           cfg.ppo.max_new_tokens, cfg.ppo.temperature, precision=precision)
            norm = {"eval/offset": stats["offset"], "eval/sft_score_std": stats["std"]}
            logger.log(norm, algorithm.iterations())
            final.update(norm)
        finally:
            logger.finish()
        distributed.save_pretrained(model, out, tokenizer=tok)
        if distributed.is_main():
            (out / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))

    return get_or_build(cfg.paths.cache_dir, "reward_model", reward_model_key(cfg, prep.sft_dir, prep.tokenizer),
                        measured(build), collective=True)


def stages_paid(needs) -> list[str]:
    """The cached stages a method pays for besides π_SFT (shared by every method and reported apart):
    the sampled pairs if it learns from them, directly or through a reward model; the reward model."""
    stages = ["pair_sampling"] if (not needs.rollouts or needs.reward_model) else []
    return stages + (["reward_model"] if needs.reward_model else [])


def stage_costs(cfg, prep) -> dict:
    """FLOPs and seconds of the cached stages this run relies on (paid once, shared by the runs that reuse them)."""
    from dpo_exp.validation import algorithm_of

    costs = {}
    stages = [("sft", Path(cfg.paths.cache_dir) / "sft" / cache_key(sft_key(cfg))),
              ("pair_sampling", Path(cfg.paths.cache_dir) / "pairs" / cache_key(pairs_key(cfg, prep.sft_dir,
                                                                                          prep.tokenizer)))]
    if algorithm_of(cfg).needs(cfg).reward_model:
        stages.append(("reward_model", Path(cfg.paths.cache_dir) / "reward_model"
                       / cache_key(reward_model_key(cfg, prep.sft_dir, prep.tokenizer))))
    for stage, folder in stages:
        cost = entry_cost(folder)
        if cost:
            costs[f"cost/{stage}_flops"] = cost["flops"]
            costs[f"cost/{stage}_seconds"] = cost["seconds"]
    return costs
