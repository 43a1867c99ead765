"""The typed schema of `python -m dpo_exp.judge` (conf/judging.yaml): unknown keys and wrong types fail at
composition, as for training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

JUDGES = ("gold", "reward_model", "hf", "api")


@dataclass
class JudgeConfig:
    name: str = MISSING                    # gold | reward_model | hf | api
    # reward_model and hf: a model folder or hub id (reward_model: null uses the run's cached reward model)
    path: Optional[str] = None
    gguf_file: Optional[str] = None        # hf: a GGUF file inside `path` (SmolLM2 from scripts/fetch_smollm2.py)
    batch_size: int = 16
    max_length: int = 2048                 # tokens of a judged text (longer ones are cut)
    device: str = "auto"
    # api: an OpenAI-compatible chat-completions endpoint
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the NAME of the variable holding the key; never the key
    max_concurrency: int = 8
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 8
    price_per_million_input: Optional[float] = None
    price_per_million_output: Optional[float] = None


@dataclass
class JudgePromptConfig:
    name: str = MISSING                    # auto | summary | dialogue | review
    system: str = ""
    user: str = ""


@dataclass
class JudgingConfig:
    judge: JudgeConfig = MISSING
    judge_prompt: JudgePromptConfig = MISSING
    runs: List[str] = field(default_factory=list)
    calibrate: Optional[str] = None
    baseline: str = "initial"
    temperatures: Optional[List[float]] = None
    step: Optional[int] = None
    position_check: float = 0.1
    bootstrap: int = 2000
    seed: int = 0
    max_prompts: Optional[int] = None
    sample_missing: bool = True
    cache_dir: str = "outputs/cache"
    wandb: bool = True


def register_judging_configs() -> None:
    ConfigStore.instance().store(name="judging_schema", node=JudgingConfig)
