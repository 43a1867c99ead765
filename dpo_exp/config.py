"""Typed configuration: the dataclasses that conf/ is merged onto, registered with Hydra's ConfigStore.

The yaml files in conf/ are merged onto these schemas, so an unknown key or a value of the wrong type fails
when the config is composed. Sections that depend on the selected component (`loss`, `task`) get their
schema from the component itself (`dpo_exp.registry`); `LossConfig` and `TaskConfig` are the fields every
one of them has. Checks between keys live with what they guard and run in `dpo_exp.validation.validate`.
Units and meanings of every key are in the yaml comments.

This module is a leaf: it imports nothing of dpo_exp.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

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
class DataConfig:
    name: str = MISSING
    format: Optional[str] = None          # the file's layout; None: data.name's own, "auto": from the first row
    columns: Any = field(default_factory=dict)  # layout field -> the file's column; preference data's schema: one key per field a registered layout reads (dpo_exp.components)
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
    """What every task has; a task's own schema (dpo_exp.tasks.TASKS) adds its settings."""
    name: str = MISSING
    gold_reward: Optional[str] = None  # a registered gold reward (dpo_exp.rewards.GOLD_REWARDS)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class LossConfig:
    """What every algorithm's section has; an algorithm's own schema (dpo_exp.algorithms.ALGORITHMS) adds its
    settings."""
    name: str = MISSING  # a registered algorithm
    beta: float = 0.1    # β: the loss's own, or only the scale of the implicit rewards reported on held-out pairs


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
    save_every: Optional[int] = 500  # steps between checkpoints in the build folder (an interrupted build resumes)
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
    save_every: Optional[int] = 500  # steps between checkpoints in the build folder (an interrupted build resumes)
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
    task: Any = MISSING   # a TaskConfig: the selected task's own schema
    loss: Any = MISSING   # a LossConfig: the selected algorithm's own schema
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
    """Register the top-level schema (conf/config.yaml lists it first in its defaults). The components' own
    schemas and the resolvers are registered by dpo_exp.components.register_configs."""
    ConfigStore.instance().store(name="config_schema", node=Config)
