"""Typed configuration: dataclasses registered with Hydra's ConfigStore.

The yaml files in conf/ are merged onto these schemas, so an unknown key or a value
of the wrong type fails when the config is composed. `validate` then checks the
relations between keys (β > 0, ε in range, a reference for losses that need one)
before any model is loaded. Units and meanings of every key are in the yaml comments.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

# Attention implementations that take a layout mask, which shared prompts need: a dense (N, 1, L, L) one (sdpa,
# eager) or flex attention's block-sparse BlockMask (dpo_exp.data.examples.layout_mask_mod).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
# FlashAttention kernels take no mask but run packed sequences as one row told apart by restarting positions
# (transformers' variable-length path): they pack, but cannot share a prompt.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


class Choice(str, Enum):
    """A config option spelled as a string; prints (and interpolates, e.g. in experiment_name) as its value."""

    def __str__(self) -> str:
        return self.value


class OptimizerName(Choice):
    rmsprop = "rmsprop"
    adamw = "adamw"


class Schedule(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class LoggerName(Choice):
    none = "none"
    wandb = "wandb"


@dataclass
class LoraConfig:
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    merge_on_save: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: Optional[str] = None
    architecture: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    policy_dtype: str = "float32"
    reference_dtype: str = "float32"
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    block_class: Optional[str] = None
    chat_template: Optional[str] = None  # a dpo_exp.models.templates name or a Jinja file; None: the tokenizer's
    lora: LoraConfig = field(default_factory=LoraConfig)


class OnInvalid(Choice):
    skip = "skip"
    error = "error"


class Truncation(Choice):
    keep_end = "keep_end"
    keep_start = "keep_start"


@dataclass
class ColumnsConfig:
    """The file's own column for each field a layout reads (data.columns.prompt=question); None: the field's name.
    Every field of dpo_exp.data.formats.FIELDS, so a misspelt one fails at composition."""
    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    conversations: Optional[str] = None
    system: Optional[str] = None
    instruction: Optional[str] = None
    input: Optional[str] = None
    history: Optional[str] = None
    human_ref_A: Optional[str] = None
    human_ref_B: Optional[str] = None
    labels: Optional[str] = None
    score_A: Optional[str] = None
    score_B: Optional[str] = None
    query: Optional[str] = None
    reference_responses: Optional[str] = None
    postprocessed_response: Optional[str] = None
    preferred: Optional[str] = None
    text: Optional[str] = None


@dataclass
class DataConfig:
    name: str = MISSING
    format: Optional[str] = None          # the file's layout; None: data.name's own, "auto": from the first row
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # layout field -> the file's column
    path: Optional[str] = None
    eval_path: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = "test"
    eval_size: int = 256
    max_train_examples: Optional[int] = None
    on_invalid: OnInvalid = OnInvalid.skip
    min_score_ratio: Optional[float] = None
    truncation: Truncation = Truncation.keep_end
    num_train_texts: int = 4000
    num_eval_texts: int = 400
    max_length: int = 512
    max_prompt_length: int = 256
    vocab_size: int = 1024
    excerpt_tokens: Optional[int] = None  # task=sentiment: SFT texts end at their last sentence end within this many tokens


@dataclass
class GenerationConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 128


class TruncatedSamples(Choice):
    drop = "drop"
    keep = "keep"


@dataclass
class TaskConfig:
    name: str = MISSING
    prompt_min_tokens: int = 2
    prompt_max_tokens: int = 8
    num_train_prompts: int = 512
    num_eval_pair_prompts: int = 64
    samples_per_prompt: int = 4
    min_reward_gap: float = 0.0
    gold_reward: Optional[str] = "vader"
    truncated_samples: TruncatedSamples = TruncatedSamples.drop
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class LossConfig:
    name: str = "dpo"  # a registered algorithm (dpo_exp.algorithms.REGISTRY); unknown names fail in validate
    beta: float = 0.1
    reference_free: bool = False
    label_smoothing: float = 0.0
    alpha: float = 1.0
    gamma: float = 0.5


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.rmsprop
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    alpha: float = 0.99
    warmup_steps: int = 150
    schedule: Schedule = Schedule.constant
    max_grad_norm: float = 10.0


@dataclass
class SFTConfig:
    checkpoint: Optional[str] = None
    train: bool = True
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 32
    max_length: int = 128
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name=OptimizerName.adamw, lr=1e-3, warmup_steps=20, schedule=Schedule.cosine, max_grad_norm=1.0))


@dataclass
class ReferenceConfig:
    enabled: bool = True
    name_or_path: Optional[str] = None
    precompute: Optional[bool] = None  # None: auto (train.precomputes_reference)


@dataclass
class FSDPConfig:
    """How FSDP2 shards models when the run has more than one process (torchrun); ignored otherwise."""
    reshard_after_forward: bool = True
    mixed_precision: bool = True
    cpu_offload: bool = False
    timeout_minutes: float = 60.0


@dataclass
class TrainerConfig:
    batch_size: int = 64
    grad_accumulation_steps: int = 1
    micro_batch_tokens: Optional[int] = None
    eval_batch_size: int = 64
    epochs: float = 1.0
    max_steps: Optional[int] = None
    eval_every: int = 100
    eval_at_start: bool = True
    log_every: int = 10
    save_every: Optional[int] = None
    save_final: bool = True
    keep_checkpoints: int = 2
    resume: bool = True
    max_skipped_steps: int = 10
    device: str = "auto"
    precision: Precision = Precision.fp32
    show_progress: bool = True
    count_flops: bool = False
    reuse_freed_memory: bool = True  # on the CPU: freed tensors' memory reused (dpo_exp.loop.reuse_freed_memory)
    logits_chunk_tokens: Optional[int] = None  # LM-head chunk (dpo_exp.models.logps.chunk_size); None: auto, 0: off
    share_prompt: Optional[bool] = None  # None: on where the attention takes a mask (PairLayout.of)
    pack: bool = False
    pack_length: Optional[int] = None
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class EvalConfig:
    num_prompts: int = 128
    samples_per_prompt: int = 1
    table_rows: int = 8
    kl: bool = True
    temperatures: List[float] = field(default_factory=list)
    judge: Optional[str] = None            # judge the run's samples when it ends: a conf/judge option (api, hf, ...)
    judge_overrides: List[str] = field(default_factory=list)  # more `python -m dpo_exp.judge` overrides


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "dpo_exp"
    entity: Optional[str] = None
    mode: str = "online"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = MISSING
    cache_dir: str = MISSING


class RewardSource(Choice):
    model = "model"
    gold = "gold"


@dataclass
class PPOSection:
    reward: RewardSource = RewardSource.model
    total_iterations: int = 100
    total_episodes: Optional[int] = None
    rollout_batch_size: int = 64
    minibatch_size: int = 16
    micro_batch_size: Optional[int] = None
    ppo_epochs: int = 4
    lr: float = 3e-6
    value_lr: Optional[float] = None
    anneal_lr: bool = False
    max_grad_norm: Optional[float] = 1.0
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    target_kl: Optional[float] = None
    horizon: int = 10000
    temperature: float = 0.7
    max_new_tokens: int = 48
    missing_eos_penalty: Optional[float] = -1.0
    whiten_advantages: bool = True
    eval_every: int = 10
    adam_eps: float = 1e-5
    weight_decay: float = 0.0
    forward_batch_size: int = 64
    generation_batch_size: int = 64


@dataclass
class RewardModelSection:
    epochs: float = 1.0
    batch_size: int = 32
    eval_every: int = 50
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        name=OptimizerName.adamw, lr=1e-5, eps=1e-5, warmup_steps=0, schedule=Schedule.constant, max_grad_norm=1.0))


@dataclass
class OnlineDPOSection:
    annotator: RewardSource = RewardSource.model
    loss: str = "dpo"
    temperature: float = 1.0
    max_new_tokens: Optional[int] = None
    generation_batch_size: int = 128


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    task: TaskConfig = MISSING
    loss: LossConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    sft: SFTConfig = field(default_factory=SFTConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ppo: PPOSection = field(default_factory=PPOSection)
    reward_model: RewardModelSection = field(default_factory=RewardModelSection)
    online_dpo: OnlineDPOSection = field(default_factory=OnlineDPOSection)
    experiment_name: str = "default"
    run_name: Optional[str] = None
    seed: int = 0
    objective: str = "auto"


def register_configs() -> None:
    """Register the top-level schema (conf/config.yaml lists it first in its defaults) and the run-directory
    resolver."""
    ConfigStore.instance().store(name="config_schema", node=Config)
    if not OmegaConf.has_resolver("dpo_exp.run_dir"):
        OmegaConf.register_new_resolver("dpo_exp.run_dir", run_dir_name, use_cache=True)


def run_dir_name(run_name: Optional[str], experiment_name: str) -> str:
    """A single run's folder under outputs/runs/, the same for every rank and every restart where it can be:
    run_name when given (rerunning the same command then resumes); else the SLURM job id (stable across
    requeues) or torchrun's rendezvous id (shared by all ranks); else the start time."""
    if run_name:
        return str(run_name)
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
               else env["SLURM_JOB_ID"])
        return f"slurm-{job}_{experiment_name}"
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # torchrun without --rdzv-id or --standalone: the node's agent process names it
            import socket
            run_id = f"{socket.gethostname()}-{os.getppid()}"
        return f"torchrun-{run_id}_{experiment_name}"
    import datetime
    return datetime.datetime.now().strftime(f"%Y-%m-%d/%H-%M-%S_{experiment_name}")


class ConfigError(ValueError):
    """A config that composes but cannot run; the message says what to change."""


def _validate_data_layout(data: Any) -> None:
    from dpo_exp.data.formats import LAYOUTS, NAMES

    if data.format is not None and data.format not in (*NAMES, "auto"):
        raise ConfigError(f"data.format={data.format} is not a layout; one of auto, " + ", ".join(NAMES)
                          + " (" + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()) + ")")


def algorithm_of(cfg: Any):
    """The registered algorithm class that loss.name selects (ConfigError listing the registered ones)."""
    from dpo_exp.algorithms import algorithm_class

    try:
        return algorithm_class(str(cfg.loss.name))
    except KeyError as err:
        raise ConfigError(err.args[0]) from None


def check_keys(cfg: Any, schema: type = None, prefix: str = "") -> None:
    """Every key of a typed section is one its dataclass declares.

    Composition already refuses `loss.betta=0.5`, but Hydra's `+loss.betta=0.5` (and `++`) adds the key to
    the typed node anyway, and the run would silently ignore it; this refuses it with the message
    composition gives for the unprefixed form. Free-form fields (Dict[str, Any], e.g. model.architecture)
    are not checked.
    """
    schema = schema or Config
    declared = typing.get_type_hints(schema)
    for key in cfg.keys() if OmegaConf.is_config(cfg) else ():
        full_key = f"{prefix}{key}"
        if key not in declared:
            close = difflib.get_close_matches(str(key), declared, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"Key '{key}' not in '{schema.__name__}' (full_key: {full_key}): not a setting{hint}; "
                              f"the keys of {prefix.rstrip('.') or 'the config'} are: {', '.join(declared)}")
        kind = declared[key]
        if dataclasses.is_dataclass(kind) and OmegaConf.is_dict(node := cfg._get_node(key)):
            check_keys(node, kind, f"{full_key}.")


def validate(cfg: Any) -> None:
    """Checks that need more than one key; raises ConfigError before any model loads.

    What is checked follows the selected algorithm's declarations (its needs, and the config
    sections it reads), never its name.
    """
    from dpo_exp.losses import VARIANTS

    check_keys(cfg)
    algorithm = algorithm_of(cfg)
    needs = algorithm.needs(cfg)
    loss = cfg.loss
    name = str(loss.name)
    if loss.beta <= 0:
        raise ConfigError(f"loss.beta must be > 0 (got {loss.beta}); the DPO paper uses 0.1 (0.5 for TL;DR)")
    if not 0 <= loss.label_smoothing < 0.5:
        raise ConfigError(
            f"loss.label_smoothing must be in [0, 0.5) (got {loss.label_smoothing}); "
            "it is the assumed probability that a preference label is flipped (cdpo, rdpo)")
    if loss.reference_free and not (name in VARIANTS and VARIANTS[name].uses_reference):
        raise ConfigError(f"loss.reference_free=true only applies to reference-based preference losses, not {name}")
    t = cfg.trainer
    if t.batch_size <= 0 or t.grad_accumulation_steps <= 0:
        raise ConfigError("trainer.batch_size and trainer.grad_accumulation_steps must be positive")
    if t.batch_size % t.grad_accumulation_steps:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} does not divide evenly into "
            f"trainer.grad_accumulation_steps={t.grad_accumulation_steps} micro-batches; "
            "pick values whose quotient is a whole number (no examples are ever dropped)")
    attention = cfg.model.attn_implementation
    if t.share_prompt and attention not in MASKED_ATTENTION:
        raise ConfigError(
            f"trainer.share_prompt needs an attention that takes a mask (model.attn_implementation="
            f"{' | '.join(MASKED_ATTENTION)}), not {attention}; set trainer.share_prompt=false to use it"
            + (" (trainer.pack=true still packs with it)" if attention in VARLEN_ATTENTION else ""))
    if t.pack and attention not in MASKED_ATTENTION + VARLEN_ATTENTION:
        raise ConfigError(
            f"trainer.pack needs model.attn_implementation={' | '.join(MASKED_ATTENTION + VARLEN_ATTENTION)}, "
            f"not {attention}; set trainer.pack=false to use it")
    if attention == "flex_attention" and _trains_on_cpu(t.device):
        raise ConfigError("model.attn_implementation=flex_attention trains only on a GPU (torch's flex attention "
                          "has no backward pass on the CPU); use sdpa here")
    _validate_data_layout(cfg.data)
    if t.micro_batch_tokens is not None and t.micro_batch_tokens <= 0:
        raise ConfigError(f"trainer.micro_batch_tokens must be a positive number of tokens or null "
                          f"(got {t.micro_batch_tokens})")
    if t.pack_length is not None and t.pack_length <= 0:
        raise ConfigError(f"trainer.pack_length must be a positive number of tokens or null (got {t.pack_length})")
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
    for key, path in [("sft.checkpoint", cfg.sft.checkpoint), ("reference.name_or_path", cfg.reference.name_or_path),
                      ("model.name_or_path", cfg.model.name_or_path)]:
        if path and _looks_local(path) and not os.path.isdir(path):
            raise ConfigError(f"{key}={path} is not a folder; give a save_pretrained folder or a hub name")
    for key, opt in [("optimizer", cfg.optimizer), ("sft.optimizer", cfg.sft.optimizer),
                     ("reward_model.optimizer", cfg.reward_model.optimizer)]:
        if opt.warmup_steps < 0 or opt.lr <= 0:
            raise ConfigError(f"{key}.lr must be > 0 and {key}.warmup_steps >= 0")
    g = cfg.task.generation
    if cfg.task.name == "sentiment":  # sampled pairs keep their exact tokens: a prompt and a whole sample must fit
        prompt_room = cfg.task.prompt_max_tokens + 1  # the prefix and a BOS
        if cfg.data.max_prompt_length < prompt_room or cfg.data.max_length < prompt_room + g.max_new_tokens:
            raise ConfigError(
                f"data.max_length={cfg.data.max_length} (data.max_prompt_length={cfg.data.max_prompt_length}) must "
                f"hold a prompt of task.prompt_max_tokens={cfg.task.prompt_max_tokens} tokens plus BOS and a sample of "
                f"task.generation.max_new_tokens={g.max_new_tokens}: set data.max_length>={prompt_room + g.max_new_tokens}")
    n = cfg.data.excerpt_tokens
    if n is not None and (cfg.task.name != "sentiment" or not 0 < n < cfg.sft.max_length):
        raise ConfigError(f"data.excerpt_tokens={n} cuts task=sentiment's SFT reviews at a sentence end: it needs "
                          f"task=sentiment (got {cfg.task.name}) and 0 < data.excerpt_tokens < sft.max_length="
                          f"{cfg.sft.max_length}; null keeps whole texts")
    if cfg.eval.kl and (g.temperature != 1.0 or g.top_k != 0 or g.top_p != 1.0):
        raise ConfigError(
            f"eval.kl=true estimates KL(π‖π_ref) from samples of π itself, but task.generation samples at "
            f"temperature={g.temperature}, top_k={g.top_k}, top_p={g.top_p}: set task.generation.temperature=1.0 "
            "task.generation.top_k=0 task.generation.top_p=1.0, or eval.kl=false (eval.temperatures adds sample "
            "tables at other temperatures without touching the KL)")
    if "ppo" in algorithm.sections:
        _validate_ppo(cfg)
    if "online_dpo" in algorithm.sections:
        o = cfg.online_dpo
        if o.loss not in VARIANTS or not VARIANTS[o.loss].uses_reference:
            raise ConfigError(f"online_dpo.loss={o.loss} must be a reference-based preference loss: "
                              f"{', '.join(n for n, v in VARIANTS.items() if v.uses_reference)}")
        if o.temperature <= 0:
            raise ConfigError("online_dpo.temperature must be > 0: pairs are samples of the policy")
    for section, source in (("ppo", "reward"), ("online_dpo", "annotator")):
        if section in algorithm.sections and RewardSource(cfg[section][source]) is RewardSource.gold \
                and not cfg.task.gold_reward:
            raise ConfigError(f"{section}.{source}=gold needs a task with a gold reward; task={cfg.task.name} has "
                              f"none (use {section}.{source}=model)")


def _validate_ppo(cfg: Any) -> None:
    p = cfg.ppo
    if p.rollout_batch_size % p.minibatch_size:
        raise ConfigError(f"ppo.rollout_batch_size={p.rollout_batch_size} does not divide evenly into "
                          f"ppo.minibatch_size={p.minibatch_size}")
    if p.micro_batch_size is not None and p.minibatch_size % p.micro_batch_size:
        raise ConfigError(f"ppo.minibatch_size={p.minibatch_size} does not divide evenly into "
                          f"ppo.micro_batch_size={p.micro_batch_size}")
    if p.target_kl is not None and p.target_kl <= 0:
        raise ConfigError(f"ppo.target_kl must be > 0 nats (got {p.target_kl}); null keeps kl_coef fixed")
    if p.temperature <= 0:
        raise ConfigError("ppo.temperature must be > 0: PPO's log-probs are of the tempered policy")


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or os.path.isdir(path)


def _trains_on_cpu(device: str) -> bool:
    from dpo_exp.models.loading import resolve_device

    return resolve_device(device).type == "cpu"


def _has_initial_policy(cfg: Any) -> bool:
    # π_ref defaults to the initial policy, which exists if any source of weights does
    return bool(cfg.sft.checkpoint or cfg.sft.train or cfg.model.name_or_path or cfg.model.architecture)
