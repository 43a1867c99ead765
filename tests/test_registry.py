"""Adding an algorithm is a class and a decorator outside the package: it then trains through the
normal CLI config, builder and loop, and its declarations decide what is built for it."""
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl
from dataclasses import dataclass

from dpo_exp import pipeline, train as train_module
from dpo_exp.algorithms import ALGORITHMS, Needs, OfflineAlgorithm, StepOutput, mean_metric
from dpo_exp.config import LossConfig
from dpo_exp.validation import validate
from dpo_exp.errors import ConfigError
from dpo_exp.models import sequence_logps


@dataclass
class UnlikelihoodConfig(LossConfig):
    alpha: float = 1.0  # weight of the rejected response's unlikelihood term


class Unlikelihood(OfflineAlgorithm):
    """The DPO paper's Unlikelihood baseline: −log π(y_w) − α·Σ_t log(1 − π(y_l,t | ·)), per pair."""

    family = "unlikelihood"

    @classmethod
    def needs(cls, cfg):
        return Needs()  # no reference, no reward model: nothing but the policy and the pairs

    def normaliser(self, micro):
        return torch.tensor(float(micro.pairs))

    def loss(self, micro):
        out = sequence_logps(self.res.policy, micro, per_token=True)
        b = micro.pairs
        chosen, rejected_tokens = out.logps[:b], out.tokens[b:]
        # log(1 − p) = log(−expm1(log p)), clamped away from p = 1; out.mask: the response tokens, in any layout
        unlikely = torch.log(-torch.expm1(rejected_tokens.clamp(max=-1e-6))) * out.mask[b:]
        loss = -chosen - self.cfg.loss.alpha * unlikely.sum(-1)
        return StepOutput(loss.sum(), {"logps/chosen": mean_metric(chosen)})


@pytest.fixture
def unlikelihood():
    ALGORITHMS.add("unlikelihood", Unlikelihood, config=UnlikelihoodConfig)
    yield Unlikelihood
    ALGORITHMS.remove("unlikelihood")


def test_a_toy_algorithm_registered_in_a_test_trains_through_the_normal_path(smoke_cfg, unlikelihood, monkeypatch):
    built = []
    real = pipeline.build_resources
    monkeypatch.setattr(pipeline, "build_resources",
                        lambda cfg, prep, needs: built.append(needs) or real(cfg, prep, needs))
    cfg = smoke_cfg("loss=sft", "loss.name=unlikelihood", "+loss.alpha=0.5", "optimizer.lr=3e-3",
                    "optimizer.warmup_steps=0", "trainer.max_steps=12")
    summary = train_module.run(cfg)
    assert built == [Needs()]
    assert summary["algorithm/family"] == "unlikelihood" and summary["algorithm/name"] == "unlikelihood"
    assert summary["algorithm/stages"] == ["pair_sampling"] and summary["steps"] == 12
    rows = [r for r in read_jsonl(Path(cfg.paths.output_dir) / "metrics.jsonl") if "train/loss" in r]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert "eval/kl" in summary  # evaluated like every other method
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "final" / "config.json").exists()


def test_without_registration_the_same_name_is_refused_with_the_registered_names(smoke_cfg):
    with pytest.raises(ConfigError, match="unknown algorithm loss.name='unlikelihood'; registered: .*dpo"):
        validate(smoke_cfg("loss=sft", "loss.name=unlikelihood"))


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        ALGORITHMS.register("dpo")(Unlikelihood)
