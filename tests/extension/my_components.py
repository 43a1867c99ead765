"""A researcher's own components, written outside dpo_exp: one module, plus one yaml for each component a
config group selects (conf/loss/unlikelihood.yaml, conf/judge/length.yaml, conf/task/swapped.yaml).

    DPO_EXP_PLUGINS=my_components python -m dpo_exp.train hydra.searchpath=[file://$PWD/conf] \
        loss=unlikelihood task=swapped data=pairs data.format=qa data.path=qa.jsonl

tests/test_extending.py runs exactly this through the CLI.
"""
from dataclasses import dataclass

import torch

from dpo_exp.algorithms import ALGORITHMS, Needs, OfflineAlgorithm, StepOutput, mean_metric
from dpo_exp.config import LossConfig, TaskConfig
from dpo_exp.data import PreferencePair
from dpo_exp.data.formats import LAYOUTS, Layout, checked_pair, text_field
from dpo_exp.errors import ConfigError
from dpo_exp.judging.config import JudgeConfig
from dpo_exp.judging.judges import JUDGES, ScoringJudge
from dpo_exp.models import sequence_logps
from dpo_exp.tasks import TASKS
from dpo_exp.tasks.preference import PreferenceTask


# ---- a loss: the DPO paper's Unlikelihood baseline ------------------------------------------------------

@dataclass
class UnlikelihoodConfig(LossConfig):
    alpha: float = 1.0  # weight of the rejected response's unlikelihood term


def check_unlikelihood(cfg) -> None:
    if cfg.loss.alpha < 0:
        raise ConfigError(f"loss.alpha must be >= 0 (got {cfg.loss.alpha})")


@ALGORITHMS.register("unlikelihood", config=UnlikelihoodConfig, validate=check_unlikelihood)
class Unlikelihood(OfflineAlgorithm):
    """−log π(y_w) − α·Σ_t log(1 − π(y_l,t | ·)), per pair."""

    family = "unlikelihood"

    @classmethod
    def needs(cls, cfg):
        return Needs()  # no reference, no reward model: the policy and the pairs

    def loss(self, micro):
        out = sequence_logps(self.res.policy, micro, per_token=True)
        b = micro.pairs
        chosen, rejected_tokens = out.logps[:b], out.tokens[b:]
        unlikely = torch.log(-torch.expm1(rejected_tokens.clamp(max=-1e-6))) * out.mask[b:]
        loss = -chosen - self.cfg.loss.alpha * unlikely.sum(-1)
        return StepOutput(loss.sum(), {"logps/chosen": mean_metric(chosen)})


# ---- a file layout: {"question", "good", "bad"} rows ---------------------------------------------------

def read_qa(row, opts):
    question = text_field(row, "question")
    if opts.kind == "sft":
        return PreferencePair(question, text_field(row, "good")), None
    return checked_pair(question, text_field(row, "good"), text_field(row, "bad")), None


LAYOUTS.add("qa", Layout(read_qa, "question, good, bad", ("question", "good", "bad"),
                         matches=lambda row: {"question", "good", "bad"} <= set(row)))


# ---- a task: preference data with a share of its pairs' labels flipped ---------------------------------

@dataclass
class SwappedConfig(TaskConfig):
    swap_every: int = 2  # flip the label of every n-th training pair


def check_swapped(cfg) -> None:
    if cfg.task.swap_every < 1:
        raise ConfigError(f"task.swap_every must be >= 1 (got {cfg.task.swap_every})")


@TASKS.register("swapped", config=SwappedConfig, validate=check_swapped)
class SwappedTask(PreferenceTask):
    name = "swapped"

    def preference_pairs(self, sft_dir, tokenizer):
        train, evaluation, skipped = super().preference_pairs(sft_dir, tokenizer)
        n = self.cfg.task.swap_every
        flipped = [PreferencePair(p.prompt, p.rejected, p.chosen) if i % n == 0 else p for i, p in enumerate(train)]
        return flipped, evaluation, {**skipped, "swapped": sum(1 for i in range(len(train)) if i % n == 0)}


# ---- a judge: the shorter (or longer) response wins ------------------------------------------------------

@dataclass
class LengthJudgeConfig(JudgeConfig):
    prefer: str = "shorter"  # shorter | longer


class LengthJudge(ScoringJudge):
    name = "length"

    def __init__(self, sign: float):
        self.sign = sign

    def scores(self, prompts, responses):
        return [self.sign * len(r) for r in responses]


@JUDGES.register("length", config=LengthJudgeConfig)
def length_judge(cfg, context):
    if cfg.prefer not in ("shorter", "longer"):
        raise ConfigError(f"judge.prefer={cfg.prefer}: shorter or longer")
    return LengthJudge(-1.0 if cfg.prefer == "shorter" else 1.0)
