"""What a task is to the rest of dpo_exp, and the registry that names them (task=NAME)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence

from dpo_exp.data import PreferencePair
from dpo_exp.evaluation import GoldReward
from dpo_exp.registry import Registry

# task=NAME selects one; each registers its own config dataclass (a dpo_exp.config.TaskConfig) and validate.
TASKS: Registry[type] = Registry("task", "task.name", group="task")


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

    @classmethod
    def judge_prompt(cls, cfg) -> str:
        """The judging prompt (a conf/judge_prompt option) that judge_prompt=auto uses for this task's samples."""


def build_task(cfg) -> Task:
    return TASKS[cfg.task.name](cfg)
