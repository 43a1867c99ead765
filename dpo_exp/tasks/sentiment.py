"""Controlled sentiment generation, the DPO paper's IMDb experiment (§6.1), at any scale.

π_SFT is fine-tuned on reviews; prompts are review prefixes of 2–8 tokens; training
pairs are made by sampling `samples_per_prompt` completions per prompt from π_SFT and
labelling every pair of them with the gold reward (4 samples → 6 pairs, as the paper).
"""
from __future__ import annotations

import random
from pathlib import Path

from dpo_exp.data import formats
from dpo_exp.data import PreferencePair, prompt_token_ids
from dpo_exp.models import load_model, resolve_device, sample, torch_dtype, train_tokenizer
from dpo_exp.rewards import gold_reward
from dpo_exp.tasks.synthetic_reviews import corpus


class SentimentTask:
    name = "sentiment"
    keep_prompt_end = True

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
            raise ValueError(f"task=sentiment reads data=synthetic_reviews or data=imdb, not {data.name!r}")
        self.gold_reward = gold_reward(cfg.task.gold_reward)

    def sft_examples(self, tokenizer=None) -> list[PreferencePair]:
        return [PreferencePair(prompt="", chosen=text) for text in self.train_texts]

    def train_tokenizer(self, out_dir: Path) -> None:
        train_tokenizer(self.train_texts, self.cfg.data.vocab_size, out_dir)

    def _prefixes(self, texts: list[str], n: int, tokenizer, seed: int) -> list[str]:
        """Prefixes of 2–8 tokens (task.prompt_min_tokens..prompt_max_tokens) of n texts."""
        rng = random.Random(seed)
        t = self.cfg.task
        out = []
        for text in (texts * (n // max(1, len(texts)) + 1))[:n]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            k = rng.randint(t.prompt_min_tokens, t.prompt_max_tokens)
            out.append(tokenizer.decode(ids[:k]))  # exact text, so re-tokenizing gives ids[:k]
        return out

    def eval_prompts(self, tokenizer, eval_pairs) -> list[str]:
        del eval_pairs  # prompts are fresh prefixes of held-out reviews
        return self._prefixes(self.eval_texts, self.cfg.eval.num_prompts, tokenizer, seed=self.cfg.seed + 2)

    def preference_pairs(self, sft_dir: Path, tokenizer) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
        t = self.cfg.task
        train_prompts = self._prefixes(self.train_texts, t.num_train_prompts, tokenizer, seed=self.cfg.seed)
        eval_prompts = self._prefixes(self.eval_texts[::-1], t.num_eval_pair_prompts, tokenizer, seed=self.cfg.seed + 1)
        policy = load_model(str(sft_dir), torch_dtype(self.cfg.model.policy_dtype), self.cfg.model.attn_implementation)
        policy.to(resolve_device(self.cfg.trainer.device))
        return (self._labelled_pairs(policy, tokenizer, train_prompts),
                self._labelled_pairs(policy, tokenizer, eval_prompts), {})

    def _labelled_pairs(self, policy, tokenizer, prompts: list[str]) -> list[PreferencePair]:
        t = self.cfg.task
        g = t.generation
        n = t.samples_per_prompt
        ids = [prompt_token_ids(tokenizer, p) for p in prompts for _ in range(n)]
        samples = sample(policy, tokenizer, ids, g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.batch_size)
        rewards = self.gold_reward([p for p in prompts for _ in range(n)], samples.texts)
        pairs = []
        for i, prompt in enumerate(prompts):
            group = list(zip(samples.texts[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n]))
            for a in range(n):
                for b in range(a + 1, n):
                    (text_a, r_a), (text_b, r_b) = group[a], group[b]
                    if abs(r_a - r_b) < max(t.min_reward_gap, 1e-9) or text_a == text_b:
                        continue  # a tie carries no preference
                    chosen, rejected = (text_a, text_b) if r_a > r_b else (text_b, text_a)
                    pairs.append(PreferencePair(prompt, chosen, rejected))
        return pairs


def _reviews(data, split: str) -> list[str]:
    """IMDb review texts of a split, from data.path / data.eval_path or the hub."""
    path = data.path if split == "train" else data.eval_path
    hub_split = data.train_split if split == "train" else data.eval_split
    result = formats.load("imdb", path=path, hub_name=None if path else data.hub_name, split=hub_split,
                          on_invalid=data.on_invalid.value, kind="sft")
    texts = [pair.chosen for pair in result.pairs]
    random.Random(0).shuffle(texts)  # files are sorted by label; a prefix must hold both
    return texts
