"""The typed schema of `python -m dpo_exp.judge` (conf/judging.yaml): unknown keys and wrong types fail at
composition, as for training; the `judge` section's schema is the selected judge's own. A leaf module."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class JudgeConfig:
    """What every judge's section has; a judge's own schema (dpo_exp.judging.judges.JUDGES) adds its settings."""
    name: str = MISSING  # a registered judge


@dataclass
class JudgePromptConfig:
    name: str = MISSING                    # auto | summary | dialogue | review
    system: str = ""
    user: str = ""


@dataclass
class JudgingConfig:
    judge: Any = MISSING  # a JudgeConfig: the selected judge's own schema
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
