"""Pairwise judges behind one interface: which of two responses to a prompt is better.

A `Comparison` holds the policy's response, the baseline's, and the order they are shown in (drawn per
comparison from a seeded RNG, as in the DPO paper). A judge answers about what it was shown: the first
or the second response, a tie, or an unusable answer; `Judge.judge` maps that back to the policy or the
baseline, so the order never leaks into the result.

- `GoldJudge`: the task's gold reward (IMDb-style tasks); the higher score wins.
- `RewardModelJudge`: dpo_exp's Bradley-Terry reward model (a folder with scalar_head.json) or any
  AutoModelForSequenceClassification reward model; the higher score wins.
- `HFJudge`: a local chat model through transformers, shown the task's judging prompt; the verdict is read
  from the next-token probabilities of the two answer tokens ("1", "2"), never by parsing free text.
- `APIJudge` (dpo_exp.judging.api): any OpenAI-compatible chat-completions endpoint.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from dpo_exp.judging.config import JudgeConfig
from dpo_exp.errors import ConfigError
from dpo_exp.registry import Registry

CHOICES = ("first", "second", "tie", "invalid")


@dataclass(frozen=True)
class Comparison:
    prompt: str
    policy: str
    baseline: str
    policy_first: bool  # shown order: the policy's response as response 1

    @property
    def shown(self) -> tuple[str, str]:
        return (self.policy, self.baseline) if self.policy_first else (self.baseline, self.policy)

    def flipped(self) -> "Comparison":
        return Comparison(self.prompt, self.policy, self.baseline, not self.policy_first)


@dataclass(frozen=True)
class Verdict:
    winner: str  # policy | baseline | tie | invalid
    raw: str     # the judge's own answer (text, probabilities or scores), for the record


def winner_of(choice: str, comparison: Comparison) -> str:
    """A judge's answer about the shown order mapped back to the policy or the baseline."""
    if choice not in CHOICES:
        raise ValueError(f"a judge answered {choice!r}; expected one of {CHOICES}")
    if choice in ("tie", "invalid"):
        return choice
    return "policy" if (choice == "first") == comparison.policy_first else "baseline"


class Judge(ABC):
    name: str = ""

    @abstractmethod
    def choose(self, comparisons: Sequence[Comparison]) -> list[tuple[str, str]]:
        """(choice about the shown order, raw answer) for each comparison."""

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        return [Verdict(winner_of(choice, c), raw) for c, (choice, raw) in zip(comparisons, self.choose(comparisons))]

    def tally(self) -> dict:
        """What judging cost (requests, tokens, money) where that means something."""
        return {}


class ScoringJudge(Judge):
    """A judge that scores each response alone: the higher score wins, equal scores tie."""

    @abstractmethod
    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response)."""

    def choose(self, comparisons: Sequence[Comparison]) -> list[tuple[str, str]]:
        prompts = [c.prompt for c in comparisons]
        first = self.scores(prompts, [c.shown[0] for c in comparisons])
        second = self.scores(prompts, [c.shown[1] for c in comparisons])
        out = []
        for a, b in zip(first, second):
            choice = "first" if a > b else "second" if b > a else "tie"
            out.append((choice, f"scores {a:.6g} | {b:.6g}"))
        return out


class GoldJudge(ScoringJudge):
    name = "gold"

    def __init__(self, gold_reward: Optional[Callable[[Sequence[str], Sequence[str]], list[float]]]):
        from dpo_exp.algorithms.scorers import GoldScorer

        if gold_reward is None:
            raise ValueError("judge=gold needs a task with a gold reward (task=sentiment); this run's task has none")
        self.scorer = GoldScorer(gold_reward)

    def scores(self, prompts, responses) -> list[float]:
        return self.scorer.scores(list(prompts), list(responses))


class RewardModelJudge(ScoringJudge):
    """dpo_exp's reward model (ScalarHeadModel folder) or a hub/local AutoModelForSequenceClassification."""

    name = "reward_model"

    def __init__(self, path: str, device: torch.device, batch_size: int = 32, max_length: int = 1024):
        from dpo_exp.algorithms.scorers import RewardModelScorer
        from dpo_exp.models import ScalarHeadModel, load_tokenizer

        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.tokenizer = load_tokenizer(path)
        if (Path(path) / "scalar_head.json").is_file():
            self.model = ScalarHeadModel.from_pretrained(path, device=device).eval()
            self.dpo_exp_model = True
            self.scorer = RewardModelScorer(self.model, self.tokenizer.pad_token_id, batch_size)
        else:
            from transformers import AutoModelForSequenceClassification

            self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
            self.dpo_exp_model = False

    @torch.no_grad()
    def scores(self, prompts, responses) -> list[float]:
        tok = self.tokenizer
        if self.dpo_exp_model:  # as it was trained: prompt ids, response ids, its end token, scored there
            from dpo_exp.data import prompt_token_ids
            from dpo_exp.data.chat import end_of_turn_id

            end = end_of_turn_id(tok)  # a response ends as the policy's samples do: the template's end of turn, or EOS
            end = tok.eos_token_id if end is None else end
            prompt_ids = [prompt_token_ids(tok, p) for p in prompts]
            response_ids = [(tok.encode(r, add_special_tokens=False) + [end])[-self.max_length:] for r in responses]
            return self.scorer.scores(prompt_ids, response_ids).tolist()
        out: list[float] = []
        for s in range(0, len(prompts), self.batch_size):
            chunk = list(zip(prompts[s:s + self.batch_size], responses[s:s + self.batch_size]))
            enc = tok([p + r for p, r in chunk], return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length).to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        return out


class HFJudge(Judge):
    """A local chat model shown the judging prompt; its verdict is whichever of the answer tokens "1" and "2"
    it gives the higher next-token probability (both probabilities are the raw answer)."""

    name = "hf"

    def __init__(self, path: str, template: dict, device: torch.device, batch_size: int = 8,
                 gguf_file: Optional[str] = None, max_length: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"  # keep the question at the end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
        self.template, self.device, self.batch_size, self.max_length = template, device, batch_size, max_length
        self.answer_ids = [self._answer_id(a) for a in ("1", "2")]

    def _answer_id(self, answer: str) -> int:
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"judge=hf needs {answer!r} to be one token of {self.tokenizer.name_or_path}; it is {ids}")
        return ids[0]

    def text(self, comparison: Comparison) -> str:
        messages = render(self.template, comparison)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer: "

    @torch.no_grad()
    def choose(self, comparisons: Sequence[Comparison]) -> list[tuple[str, str]]:
        from dpo_exp.loggers import progress

        out = []
        with progress(len(comparisons), "judging") as bar:
            for s in range(0, len(comparisons), self.batch_size):
                out += self._choose_batch(comparisons[s:s + self.batch_size])
                bar.update(min(self.batch_size, len(comparisons) - s))
        return out

    def _choose_batch(self, comparisons: Sequence[Comparison]) -> list[tuple[str, str]]:
        """One left-padded forward pass: the next-token probabilities of "1" and "2" after each prompt."""
        enc = self.tokenizer([self.text(c) for c in comparisons], return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_length, add_special_tokens=False).to(self.device)
        probs = self.model(**enc, logits_to_keep=1).logits[:, -1].float().softmax(-1)[:, self.answer_ids].cpu()
        out = []
        for p1, p2 in probs.tolist():
            choice = "first" if p1 > p2 else "second" if p2 > p1 else "tie"
            out.append((choice, f"p(1)={p1:.4g} p(2)={p2:.4g}"))
        return out


def render(template: dict, comparison: Comparison) -> list[dict]:
    """The chat messages of one comparison: the template's system and user texts with {prompt}, {first} and
    {second} filled in (the responses in their shown order)."""
    first, second = comparison.shown
    fields = {"prompt": comparison.prompt.strip(), "first": first.strip(), "second": second.strip()}
    messages = [{"role": "system", "content": template["system"].format(**fields)}] if template.get("system") else []
    return messages + [{"role": "user", "content": template["user"].format(**fields)}]


# ---- judge=NAME ---------------------------------------------------------------------------------------

@dataclass
class JudgeContext:
    """What a judge may be built from besides its own settings; each is asked for only by the judges that use
    it (None: not available here, e.g. when calibrating against recorded verdicts there is no run)."""
    gold_reward: Optional[Callable[[], Any]] = None       # the judged run's task's gold reward
    reward_model: Optional[Callable[[], str]] = None      # the judged run's cached reward model folder
    template: Callable[[], dict] = dict                   # the judging prompt (judge_prompt)
    cache_dir: Path = Path("outputs/cache")               # where answers worth keeping are kept


# judge=NAME selects one: a builder (judge config, JudgeContext) -> Judge, with its own config dataclass.
JUDGES: Registry[Callable[[Any, JudgeContext], Judge]] = Registry("judge", "judge.name", group="judge")


def _device(cfg) -> torch.device:
    from dpo_exp.models import resolve_device

    return resolve_device(cfg.device)


@JUDGES.register("gold", config=JudgeConfig)
def gold_judge(cfg, context: JudgeContext) -> Judge:
    if context.gold_reward is None:
        raise ConfigError("judge=gold scores with a run's task; it cannot judge recorded verdicts")
    return GoldJudge(context.gold_reward())


@dataclass
class RewardModelJudgeConfig(JudgeConfig):
    path: Optional[str] = None   # a model folder or hub id; None: the judged run's cached reward model
    batch_size: int = 32
    max_length: int = 1024       # tokens of a scored text (longer ones are cut)
    device: str = "auto"


@JUDGES.register("reward_model", config=RewardModelJudgeConfig)
def reward_model_judge(cfg, context: JudgeContext) -> Judge:
    path = cfg.path
    if path is None:
        if context.reward_model is None:
            raise ConfigError("judge=reward_model needs judge.path=... here (no run to take its reward model from)")
        path = context.reward_model()
    return RewardModelJudge(str(path), _device(cfg), cfg.batch_size, cfg.max_length)


@dataclass
class HFJudgeConfig(JudgeConfig):
    path: str = "outputs/models/SmolLM2-135M-Instruct"  # a model folder or hub id
    gguf_file: Optional[str] = None  # a GGUF file inside `path`
    batch_size: int = 8
    max_length: int = 2048           # tokens of a judging prompt (longer ones are cut at the start)
    device: str = "auto"


@JUDGES.register("hf", config=HFJudgeConfig)
def hf_judge(cfg, context: JudgeContext) -> Judge:
    return HFJudge(cfg.path, context.template(), _device(cfg), cfg.batch_size, cfg.gguf_file, cfg.max_length)
