"""Algorithms, one module each, registered by name (`loss=NAME`):

- preference: the DPO family (dpo, cdpo, rdpo, ipo, hinge, rpo, simpo), on offline pairs;
- sft: per-token NLL of chosen responses (the π_SFT stage and the Preferred-FT baseline);
- reward_model: the Bradley–Terry reward model (a cached stage);
- ppo: PPO from π_SFT against the reward model or the gold reward;
- online_dpo: DPO on pairs sampled from the current policy and labelled by an annotator.
The RL maths (GAE, whitening, clipped losses, KL controllers) is in `rl`, the scorers in
`scorers`, the interface and the registry (ALGORITHMS) in `base`.
"""
from dpo_exp.algorithms import online_dpo, ppo, preference, reward_model, sft  # noqa: F401  (registers them)
from dpo_exp.algorithms.base import (ALGORITHMS, Algorithm, Experience, Needs, OfflineAlgorithm, Resources, StepBatch,
                                     StepOutput, mean_metric)

__all__ = ["ALGORITHMS", "Algorithm", "Experience", "Needs", "OfflineAlgorithm", "Resources", "StepBatch",
           "StepOutput", "mean_metric"]
