"""`validate(cfg)`: a composed config is checked before any model loads, and fails with a ConfigError saying
what to change.

Each selected component checks its own keys against the rest of the config (the `validate` it registered:
an algorithm its β and ε, a task its room for prompts and samples, the data layout its format and columns,
the pair layout its attention kernel). What is checked here is only what spans sections: keys the loader
does not know, whether the algorithm's needs (a reference model, a gold reward) can be met, batch and
optimizer arithmetic, the evaluation's sampling against its KL estimate.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

from omegaconf import OmegaConf

from dpo_exp.config import Config, RewardSource
from dpo_exp.errors import ConfigError


def algorithm_of(cfg: Any):
    """The registered algorithm class that loss.name selects (ConfigError listing the registered ones)."""
    from dpo_exp.algorithms import ALGORITHMS

    return ALGORITHMS[cfg.loss.name]


def _selected_schemas(cfg: Any) -> dict[str, type]:
    """The schema of each section whose schema is the selected component's own (loss, task)."""
    from dpo_exp.algorithms import ALGORITHMS
    from dpo_exp.tasks import TASKS

    schemas = {}
    for section, registry in (("loss", ALGORITHMS), ("task", TASKS)):
        node = cfg.get(section) if OmegaConf.is_config(cfg) else None
        if node is not None and "name" in node and node.name in registry:
            config = registry.entry(node.name).config
            if config is not None:
                schemas[section] = config
    return schemas


def check_keys(cfg: Any, schema: type = None, prefix: str = "", schemas: dict[str, type] = None) -> None:
    """Every key of a typed section is one its dataclass declares.

    Composition already refuses `loss.betta=0.5`, but Hydra's `+loss.betta=0.5` (and `++`) adds the key to
    the typed node anyway, and the run would silently ignore it; this refuses it with the message
    composition gives for the unprefixed form. Free-form fields (Dict[str, Any], e.g. model.architecture)
    are not checked.
    """
    if schema is None:
        schema, schemas = Config, _selected_schemas(cfg)
    declared = typing.get_type_hints(schema)
    for key in cfg.keys() if OmegaConf.is_config(cfg) else ():
        full_key = f"{prefix}{key}"
        if key not in declared:
            close = difflib.get_close_matches(str(key), declared, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"Key '{key}' not in '{schema.__name__}' (full_key: {full_key}): not a setting{hint}; "
                              f"the keys of {prefix.rstrip('.') or 'the config'} are: {', '.join(declared)}")
        kind = (schemas or {}).get(full_key, declared[key])
        if dataclasses.is_dataclass(kind) and OmegaConf.is_dict(node := cfg._get_node(key)):
            check_keys(node, kind, f"{full_key}.")


def validate(cfg: Any) -> None:
    """Checks that need more than one key; raises ConfigError before any model loads."""
    from dpo_exp.algorithms import ALGORITHMS
    from dpo_exp.data.examples import validate_pair_layout
    from dpo_exp.data.formats import validate_data
    from dpo_exp.rewards import GOLD_REWARDS
    from dpo_exp.tasks import TASKS

    check_keys(cfg)
    algorithm = ALGORITHMS.entry(cfg.loss.name)
    task = TASKS.entry(cfg.task.name)
    for component in (algorithm, task):
        if component.validate is not None:
            component.validate(cfg)
    validate_data(cfg)
    validate_pair_layout(cfg)
    if cfg.task.gold_reward is not None:
        GOLD_REWARDS.entry(cfg.task.gold_reward)
    _check_trainer(cfg.trainer)
    _check_needs(cfg, algorithm.value)
    _check_paths(cfg)
    _check_optimizers(cfg)
    _check_evaluation(cfg)


def _check_trainer(t: Any) -> None:
    if t.batch_size <= 0 or t.grad_accumulation_steps <= 0:
        raise ConfigError("trainer.batch_size and trainer.grad_accumulation_steps must be positive")
    if t.batch_size % t.grad_accumulation_steps:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} does not divide evenly into "
            f"trainer.grad_accumulation_steps={t.grad_accumulation_steps} micro-batches; "
            "pick values whose quotient is a whole number (no examples are ever dropped)")
    if t.micro_batch_tokens is not None and t.micro_batch_tokens <= 0:
        raise ConfigError(f"trainer.micro_batch_tokens must be a positive number of tokens or null "
                          f"(got {t.micro_batch_tokens})")
    if t.pack_length is not None and t.pack_length <= 0:
        raise ConfigError(f"trainer.pack_length must be a positive number of tokens or null (got {t.pack_length})")


def _check_needs(cfg: Any, algorithm: Any) -> None:
    """What the algorithm declares it needs can be built from this config."""
    needs = algorithm.needs(cfg)
    name = str(cfg.loss.name)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"data.max_prompt_length={cfg.data.max_prompt_length} leaves no room for a response "
            f"within data.max_length={cfg.data.max_length}")
    if needs.reference and not cfg.reference.enabled:
        raise ConfigError(
            f"loss={name} needs a reference model but reference.enabled=false; set "
            "reference.enabled=true, use loss.reference_free=true, or pick a loss without one (simpo, sft)")
    if needs.reference and cfg.reference.name_or_path is None and not _has_initial_policy(cfg):
        raise ConfigError(
            f"loss={name} needs a reference model but none is available: set "
            "reference.name_or_path, model.name_or_path or sft.train=true, or use loss.reference_free=true")
    for section, source in (("ppo", "reward"), ("online_dpo", "annotator")):
        if section in algorithm.sections and RewardSource(cfg[section][source]) is RewardSource.gold \
                and not cfg.task.gold_reward:
            raise ConfigError(f"{section}.{source}=gold needs a task with a gold reward; task={cfg.task.name} has "
                              f"none (use {section}.{source}=model)")


def _check_paths(cfg: Any) -> None:
    for key, path in [("sft.checkpoint", cfg.sft.checkpoint), ("reference.name_or_path", cfg.reference.name_or_path),
                      ("model.name_or_path", cfg.model.name_or_path)]:
        if path and _looks_local(path) and not os.path.isdir(path):
            raise ConfigError(f"{key}={path} is not a folder; give a save_pretrained folder or a hub name")


def _check_optimizers(cfg: Any) -> None:
    for key, opt in [("optimizer", cfg.optimizer), ("sft.optimizer", cfg.sft.optimizer),
                     ("reward_model.optimizer", cfg.reward_model.optimizer)]:
        if opt.warmup_steps < 0 or opt.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0 and {key}.warmup_steps >= 0")


def _check_evaluation(cfg: Any) -> None:
    g = cfg.task.generation
    if cfg.eval.kl and (g.temperature != 1.0 or g.top_k != 0 or g.top_p != 1.0):
        raise ConfigError(
            f"eval.kl=true estimates KL(π‖π_ref) from samples of π itself, but task.generation samples at "
            f"temperature={g.temperature}, top_k={g.top_k}, top_p={g.top_p}: set task.generation.temperature=1.0 "
            "task.generation.top_k=0 task.generation.top_p=1.0, or eval.kl=false (eval.temperatures adds sample "
            "tables at other temperatures without touching the KL)")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.isdir(path)


def _has_initial_policy(cfg: Any) -> bool:
    # π_ref defaults to the initial policy, which exists if any source of weights does
    return bool(cfg.sft.checkpoint or cfg.sft.train or cfg.model.name_or_path or cfg.model.architecture)
