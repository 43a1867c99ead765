"""Controlled sentiment generation, the DPO paper's IMDb experiment (§6.1), at any scale.

π_SFT is fine-tuned on reviews; prompts are review prefixes of 2–8 tokens; training
pairs are made by sampling `samples_per_prompt` completions per prompt from π_SFT and
labelling every pair of them with the gold reward (4 samples → 6 pairs, as the paper).
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dpo_exp.config import TaskConfig, TruncatedSamples
from dpo_exp.errors import ConfigError
from dpo_exp.data import formats
from dpo_exp.data import PreferencePair, prompt_token_ids
from dpo_exp.models import load_model, resolve_device, sample, torch_dtype, train_tokenizer
from dpo_exp.rewards import gold_reward
from dpo_exp.tasks.base import TASKS
from dpo_exp.tasks.synthetic_reviews import corpus


@dataclass
class SentimentTaskConfig(TaskConfig):
    gold_reward: Optional[str] = "vader"
    prompt_min_tokens: int = 2
    prompt_max_tokens: int = 8
    num_train_prompts: int = 512
    num_eval_pair_prompts: int = 64
    samples_per_prompt: int = 4
    min_reward_gap: float = 0.0
    truncated_samples: TruncatedSamples = TruncatedSamples.drop


def validate_sentiment(cfg: Any) -> None:
    """Sampled pairs keep their exact tokens, so a prompt and a whole sample must fit in data.max_length."""
    g = cfg.task.generation
    prompt_room = cfg.task.prompt_max_tokens + 1  # the prefix and a BOS
    if cfg.data.max_prompt_length < prompt_room or cfg.data.max_length < prompt_room + g.max_new_tokens:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} (data.max_prompt_length={cfg.data.max_prompt_length}) must "
            f"hold a prompt of task.prompt_max_tokens={cfg.task.prompt_max_tokens} tokens plus BOS and a sample of "
            f"task.generation.max_new_tokens={g.max_new_tokens}: set data.max_length>={prompt_room + g.max_new_tokens}")
    n = cfg.data.excerpt_tokens
    if n is not None and not 0 < n < cfg.sft.max_length:
        raise ConfigError(f"data.excerpt_tokens={n} cuts task=sentiment's SFT reviews at a sentence end: it needs "
                          f"0 < data.excerpt_tokens < sft.max_length={cfg.sft.max_length}; null keeps whole texts")


@TASKS.register("sentiment", config=SentimentTaskConfig, validate=validate_sentiment)
class SentimentTask:
    name = "sentiment"
    keep_prompt_end = True

    @classmethod
    def judge_prompt(cls, cfg) -> str:
        return "review"

    def __init__(self, cfg):
        self.cfg = cfg
        data = cfg.data
        if data.name == "synthetic_reviews":
            texts = corpus(data.num_train_texts + data.num_eval_texts, seed=cfg.seed)
            self.train_texts, self.eval_texts = texts[:data.num_train_texts], texts[data.num_train_texts:]
        elif data.name == "imdb":
            self.train_texts = _reviews(data, "train")[:data.num_train_texts]
            self.eval_texts = _reviews(data, "eval")[:data.num_eval_texts]
        else:
            raise ConfigError(f"task=sentiment reads data=synthetic_reviews or data=imdb, not data={data.name}; "
                              "preference files (data=pairs, hh, shp, tldr, ultrafeedback) need task=preference")
        self.gold_reward = gold_reward(cfg.task.gold_reward)

    def sft_examples(self, tokenizer=None) -> list[PreferencePair]:
        """The training texts as SFT examples (the whole text is the response, so EOS follows it). With
        data.excerpt_tokens each text is first cut at its last sentence end within that many tokens, so π_SFT
        learns to finish a short review instead of being cut mid-review at sft.max_length; a text with no
        sentence end that early is left out."""
        n = self.cfg.data.excerpt_tokens
        texts = self.train_texts if n is None else [excerpt(text, tokenizer, n) for text in self.train_texts]
        return [PreferencePair(prompt="", chosen=text) for text in texts if text is not None]

    def train_tokenizer(self, out_dir: Path) -> None:
        train_tokenizer(self.train_texts, self.cfg.data.vocab_size, out_dir)

    def _prefixes(self, texts: list[str], n: int, tokenizer, seed: int, exclude: frozenset = frozenset()) -> list[str]:
        """n prefixes of 2–8 tokens (task.prompt_min_tokens..prompt_max_tokens) of the texts, taken in turn
        (cycling), leaving out any prefix in `exclude` (the training prompts, for held-out prompts)."""
        rng = random.Random(seed)
        t = self.cfg.task
        out: list[str] = []
        for tries, text in enumerate(itertools.cycle(texts) if texts else ()):
            if len(out) == n:
                break
            if tries >= 20 * n + len(texts):
                raise ConfigError(f"only {len(out)} of {n} prefixes of the {len(texts)} held-out texts are not also "
                                 "training prompts; use more held-out texts (data.num_eval_texts) or fewer prompts")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            k = rng.randint(t.prompt_min_tokens, t.prompt_max_tokens)
            prefix = tokenizer.decode(ids[:k])  # exact text, so re-tokenizing gives ids[:k]
            if prefix not in exclude:
                out.append(prefix)
        return out

    def train_prompts(self, tokenizer) -> list[str]:
        return self._prefixes(self.train_texts, self.cfg.task.num_train_prompts, tokenizer, seed=self.cfg.seed)

    def eval_prompts(self, tokenizer, eval_pairs) -> list[str]:
        """Fresh prefixes of held-out reviews, none of them a training prompt (as a string)."""
        del eval_pairs
        return self._prefixes(self.eval_texts, self.cfg.eval.num_prompts, tokenizer, seed=self.cfg.seed + 2,
                              exclude=frozenset(self.train_prompts(tokenizer)))

    def reference_responses(self, tokenizer, eval_pairs) -> dict[str, str]:
        """Reviews have no reference continuation: the held-out pairs' chosen samples, by prompt."""
        out: dict[str, str] = {}
        for pair in eval_pairs:
            out.setdefault(pair.prompt, pair.chosen)
        return out

    def held_out_pair_prompts(self, tokenizer, train_prompts: list[str] | None = None) -> list[str]:
        """Prompts of the held-out pairs: prefixes of held-out reviews, none of them a training prompt."""
        train_prompts = self.train_prompts(tokenizer) if train_prompts is None else train_prompts
        return self._prefixes(self.eval_texts[::-1], self.cfg.task.num_eval_pair_prompts, tokenizer,
                              seed=self.cfg.seed + 1, exclude=frozenset(train_prompts))

    def preference_pairs(self, sft_dir: Path, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
        train_prompts = self.train_prompts(tokenizer)
        eval_prompts = self.held_out_pair_prompts(tokenizer, train_prompts)
        policy = load_model(str(sft_dir), torch_dtype(self.cfg.model.policy_dtype), self.cfg.model.attn_implementation)
        policy.to(resolve_device(self.cfg.trainer.device))
        train, train_cut = self._labelled_pairs(policy, tokenizer, train_prompts)
        held_out, eval_cut = self._labelled_pairs(policy, tokenizer, eval_prompts)
        skipped = {f"{split}/truncated_sample": cut for split, cut in (("train", train_cut), ("eval", eval_cut)) if cut}
        return train, held_out, skipped

    def _labelled_pairs(self, policy, tokenizer, prompts: list[str]) -> tuple[list[PreferencePair], int]:
        """Every pair of a prompt's samples, chosen by the gold reward; pairs keep the exact sampled tokens.

        A sample that reached max_new_tokens without a stop token (EOS) is dropped before pairing with
        task.truncated_samples=drop (the default; the count is returned) or kept, without an EOS, with keep.
        """
        t = self.cfg.task
        g = t.generation
        n = t.samples_per_prompt
        ids = [prompt_token_ids(tokenizer, p) for p in prompts for _ in range(n)]
        samples = sample(policy, tokenizer, ids, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.batch_size)
        rewards = self.gold_reward([p for p in prompts for _ in range(n)], samples.texts)  # the stored tokens' text
        drop = TruncatedSamples(t.truncated_samples) is TruncatedSamples.drop
        pairs, cut = [], 0
        for i, prompt in enumerate(prompts):
            group = []
            for j in range(i * n, (i + 1) * n):
                response = samples.response_ids[j]
                if drop and not samples.ended[j]:
                    cut += 1
                    continue
                group.append((response, samples.texts[j], rewards[j]))
            for (ids_a, text_a, r_a), (ids_b, text_b, r_b) in itertools.combinations(group, 2):
                if abs(r_a - r_b) < max(t.min_reward_gap, 1e-9) or ids_a == ids_b:
                    continue  # a tie carries no preference
                (c_ids, c_text), (r_ids, r_text) = ((ids_a, text_a), (ids_b, text_b)) if r_a > r_b else \
                    ((ids_b, text_b), (ids_a, text_a))
                pairs.append(PreferencePair(prompt, c_text, r_text, prompt_ids=ids[i * n], chosen_ids=c_ids,
                                            rejected_ids=r_ids))
        return pairs, cut


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def excerpt(text: str, tokenizer, max_tokens: int) -> str | None:
    """The text up to its last sentence end (., ! or ?, with closing quotes or brackets) whose prefix is at most
    max_tokens tokens (a text that fits is returned whole); None when even the first sentence is longer."""
    if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= max_tokens:
        return text
    best = None
    for match in _SENTENCE_END.finditer(text):
        if len(tokenizer(text[:match.end()], add_special_tokens=False)["input_ids"]) > max_tokens:
            break
        best = match.end()
    return None if best is None else text[:best]


def _reviews(data, split: str) -> list[str]:
    """IMDb review texts of a split, from data.path / data.eval_path or the hub."""
    path = data.path if split == "train" else data.eval_path
    hub_split = data.train_split if split == "train" else data.eval_split
    result = formats.load("imdb", path=path, hub_name=None if path else data.hub_name, split=hub_split,
                          on_invalid=data.on_invalid.value, kind="sft")
    texts = [pair.chosen for pair in result.pairs]
    random.Random(0).shuffle(texts)  # files are sorted by label; a prefix must hold both
    return texts
