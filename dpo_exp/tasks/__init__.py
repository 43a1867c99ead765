"""Tasks: what an experiment is — its SFT texts, how preference pairs are obtained,
its evaluation prompts and (optionally) a gold reward. `build_task` picks one by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence

from dpo_exp.config import ConfigError
from dpo_exp.data import PreferencePair
from dpo_exp.evaluation import GoldReward


class Task(Protocol):
    name: str
    keep_prompt_end: bool              # truncate long prompts keeping their end (else their start)
    gold_reward: Optional[GoldReward]

    def sft_examples(self, tokenizer) -> list[PreferencePair]:
        """Examples of the SFT stage that makes π_SFT (prompt, chosen = target)."""

    def train_tokenizer(self, out_dir: Path) -> None:
        """Train and save_pretrained a tokenizer, for models built from a config."""

    def preference_pairs(self, sft_dir: Path, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
        """(train, eval, skipped-rows-by-reason); may sample π_SFT at sft_dir."""

    def eval_prompts(self, tokenizer, eval_pairs: Sequence[PreferencePair]) -> Sequence[str]:
        """Held-out prompts for generation-based evaluation."""

    def reference_responses(self, tokenizer, eval_pairs: Sequence[PreferencePair]) -> dict[str, str]:
        """prompt -> the dataset's reference response to each held-out prompt (the win-rate baseline)."""


def build_task(cfg) -> Task:
    from dpo_exp.tasks.preference import PreferenceTask
    from dpo_exp.tasks.sentiment import SentimentTask

    tasks = {"sentiment": SentimentTask, "preference": PreferenceTask}
    if cfg.task.name not in tasks:
        raise ConfigError(f"unknown task {cfg.task.name!r}; known: {', '.join(tasks)}")
    return tasks[cfg.task.name](cfg)
