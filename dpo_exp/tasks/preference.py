"""Offline preference data: the DPO paper's TL;DR and Anthropic HH runs, SHP, UltraFeedback
and users' own prompt/chosen/rejected files.

π_SFT is trained on the dataset's SFT targets (the chosen response, or TL;DR's reference
summary); DPO trains on its pairs. Held-out pairs come from the dataset's eval file or
split, else from prompts held out of the training file (by prompt, so no prompt is in
both). Generation-based evaluation samples the held-out prompts.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from dpo_exp.config import TaskConfig, Truncation
from dpo_exp.data import formats
from dpo_exp.errors import ConfigError
from dpo_exp.data import PreferencePair
from dpo_exp.models import train_tokenizer
from dpo_exp.rewards import gold_reward
from dpo_exp.tasks.base import TASKS


def validate_preference_task(cfg: Any) -> None:
    if cfg.data.excerpt_tokens is not None:
        raise ConfigError(f"data.excerpt_tokens={cfg.data.excerpt_tokens} cuts task=sentiment's SFT reviews at a "
                          "sentence end: it needs task=sentiment (got preference, whose responses are trained on "
                          "whole); null keeps whole texts")


@TASKS.register("preference", config=TaskConfig, validate=validate_preference_task)
class PreferenceTask:
    name = "preference"

    @classmethod
    def judge_prompt(cls, cfg) -> str:
        """The file layout's (summary for TL;DR, dialogue otherwise)."""
        layout = cfg.data.format if cfg.data.format not in (None, "auto") else cfg.data.name
        return formats.LAYOUTS[layout].judge_prompt if layout in formats.LAYOUTS else "dialogue"

    def __init__(self, cfg):
        self.cfg = cfg
        self.keep_prompt_end = Truncation(cfg.data.truncation) is Truncation.keep_end
        self.gold_reward = gold_reward(cfg.task.gold_reward)
        self._eval_prompts: list[str] = []

    # ---- reading ------------------------------------------------------------------------
    def _has_eval_source(self) -> bool:
        d = self.cfg.data
        return bool(d.eval_path or (d.hub_name and not d.path and d.eval_split))

    def _load(self, split: str, kind: str, tokenizer) -> formats.LoadResult:
        d = self.cfg.data
        path = d.path if split == "train" else d.eval_path
        return formats.load(
            d.format or d.name, path=path, hub_name=None if path else d.hub_name,
            split=d.train_split if split == "train" else d.eval_split, hub_config=d.hub_config,
            on_invalid=d.on_invalid.value, tokenizer=tokenizer, min_score_ratio=d.min_score_ratio, kind=kind,
            columns={field: column for field, column in d.columns.items() if column})

    def _held_out_prompts(self, pairs: list[PreferencePair]) -> set[str]:
        """Prompts held out of the training file when there is no eval source (by prompt, seeded)."""
        if self._has_eval_source():
            return set()
        prompts = sorted({p.prompt for p in pairs})
        random.Random(self.cfg.seed).shuffle(prompts)
        held, count = set(), 0
        per_prompt = Counter(p.prompt for p in pairs)
        for prompt in prompts:
            if count >= self.cfg.data.eval_size:
                break
            held.add(prompt)
            count += per_prompt[prompt]
        return held

    def _limit(self, items: list) -> list:
        n = self.cfg.data.max_train_examples
        return items if n is None else items[:n]

    # ---- the Task interface -------------------------------------------------------------
    def sft_examples(self, tokenizer) -> list[PreferencePair]:
        held = self._held_out_prompts(self._load("train", "pairs", tokenizer).pairs)
        examples = [p for p in self._load("train", "sft", tokenizer).pairs if p.prompt not in held]
        return self._limit(examples)

    def train_tokenizer(self, out_dir: Path) -> None:
        examples = self.sft_examples(None)
        train_tokenizer((p.prompt + p.chosen for p in examples), self.cfg.data.vocab_size, out_dir)

    def preference_pairs(self, sft_dir: Path, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
        train = self._load("train", "pairs", tokenizer)
        skipped = {f"train/{k}": v for k, v in train.skipped.items()}
        if self._has_eval_source():
            evaluation = self._load("eval", "pairs", tokenizer)
            skipped.update({f"eval/{k}": v for k, v in evaluation.skipped.items()})
            eval_pairs = evaluation.pairs[:self.cfg.data.eval_size]
            train_pairs = train.pairs
        else:
            held = self._held_out_prompts(train.pairs)
            eval_pairs = [p for p in train.pairs if p.prompt in held]
            train_pairs = [p for p in train.pairs if p.prompt not in held]
        print(f"[dpo_exp] {train.summary()}")
        return self._limit(train_pairs), eval_pairs, skipped

    def eval_prompts(self, tokenizer, eval_pairs: list[PreferencePair]) -> list[str]:
        return list(dict.fromkeys(p.prompt for p in eval_pairs))[:self.cfg.eval.num_prompts]

    def reference_responses(self, tokenizer, eval_pairs: list[PreferencePair]) -> dict[str, str]:
        """The dataset's SFT target of each held-out prompt: TL;DR's human reference summary (not the
        preferred summary of the pair, which in the judged file is often the model's), HH's chosen response;
        the held-out pair's chosen response where the file has no SFT target for the prompt."""
        prompts = {p.prompt for p in eval_pairs}
        out: dict[str, str] = {}
        split = "eval" if self._has_eval_source() else "train"
        for example in self._load(split, "sft", tokenizer).pairs:
            if example.prompt in prompts:
                out.setdefault(example.prompt, example.chosen)
        for pair in eval_pairs:
            out.setdefault(pair.prompt, pair.chosen)
        return out
