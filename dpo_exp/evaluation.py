"""Evaluation shared by every algorithm, so numbers compare across SFT, DPO variants and PPO.

- Held-out pairs, for every algorithm with a policy: eval/logps/{chosen,rejected} and, with π_ref,
  eval/log_ratio_accuracy (how often log π/π_ref of the chosen response exceeds the rejected one's; no β).
  Where the algorithm has a pair loss (the DPO family, online DPO, SFT) also eval/loss, its own objective,
  and its own metrics (eval/rewards/* at the algorithm's β for the DPO family). An algorithm without
  such a quantity (PPO) logs no eval/loss and no eval/rewards/*: no stand-in under the same name.
- Generation on held-out prompts: eval/gold_reward (policy) and eval/gold_reward_ref (π_ref on the same
  prompts); eval/truncated_fraction and eval/truncated_fraction_ref, the fraction of samples that hit
  the length cap without emitting a stop token (EOS or the chat template's end of turn,
  `dpo_exp.models.templates.stop_token_ids`); and the KL estimate below.

KL. eval/kl is mean_i Σ_t [log π(y_t|·) − log π_ref(y_t|·)] over y_i ~ π sampled at temperature 1 with
no top-k / top-p (validate refuses eval.kl with other settings), each response cut at
task.generation.max_new_tokens. It is an unbiased estimate of KL(π_c‖π_ref,c), the KL between the two
models' response distributions *with that cap*: a response that reaches the cap counts its first
max_new_tokens tokens and no EOS. That equals the whole-response KL only when no sample is cut
(eval/truncated_fraction = 0); the more are cut, the more the estimate under-counts. eval/kl_stderr is
its standard error over the samples.
- A table of prompts with policy and reference samples.
Sampling uses a fixed seed inside a forked RNG, so every evaluation draws the same noise
(lower-variance curves) and evaluation never changes the training run's randomness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from dpo_exp import distributed
from dpo_exp.algorithms.scorers import GoldReward, GoldScorer
from dpo_exp.data import PADDED, PairLayout, TokenizedPair, collate_pairs
from dpo_exp.metrics import MetricSums, mean_metric
from dpo_exp.models import PairLogps, Samples, autocast, logps_of_samples, sample, sequence_logps
from dpo_exp.reference import Reference

EVAL_TABLE = "eval/samples"
TABLE_COLUMNS = ("step", "prompt", "policy", "policy_gold_reward", "reference", "reference_gold_reward")
SWEEP_COLUMNS = ("step", "temperature", "prompt", "policy")


@dataclass
class EvalPrompts:
    texts: list[str]
    ids: list[list[int]]


class Evaluator:
    """Called by the loop as evaluate(policy, step) -> (metrics, tables).

    Held-out pairs are scored with the algorithm's own pair loss where it has one (see the module
    docstring); every algorithm gets the β-free log-probs and log-ratio accuracy.
    """

    def __init__(self, algorithm, reference: Optional[Reference], pairs: Sequence[TokenizedPair],
                 prompts: EvalPrompts, tokenizer, gold_reward: Optional[GoldReward], generation, eval_cfg,
                 batch_size: int, precision: str, seed: int, layout: PairLayout = PADDED):
        self.algorithm = algorithm
        self.reference = reference
        self.pairs = list(pairs)
        self.tokenizer = tokenizer
        self.gold = GoldScorer(gold_reward) if gold_reward is not None else None
        self.generation = generation
        self.cfg = eval_cfg
        self.batch_size = batch_size
        self.precision = precision
        self.seed = seed
        n = eval_cfg.samples_per_prompt
        self.prompt_texts = [t for t in prompts.texts for _ in range(n)]
        self.prompt_ids = [ids for ids in prompts.ids for _ in range(n)]
        self._reference_samples: Optional[Samples] = None
        self._reference_gold: Optional[list[float]] = None
        self.layout = layout  # of the held-out pairs' batches (trainer.share_prompt, trainer.pack)

    def __call__(self, policy, step: int) -> tuple[dict, dict[str, list[list]]]:
        """Metrics and tables {name: rows} of one evaluation."""
        was_training = policy.training
        policy.eval()
        metrics = self._pair_metrics(policy) if self.pairs else {}
        gen_metrics, rows = self._generation_metrics(policy, step)
        metrics.update(gen_metrics)
        sweep_metrics, tables = self._temperature_sweep(policy, step)
        metrics.update(sweep_metrics)
        policy.train(was_training)
        return metrics, {EVAL_TABLE: rows, **tables}

    @torch.no_grad()
    def _pair_metrics(self, policy) -> dict:
        device = next(policy.parameters()).device
        use_ref = self.reference is not None
        if use_ref and not self.reference.has_table("eval"):
            self.reference.precompute("eval", self.pairs, self.tokenizer.pad_token_id, self.batch_size)
        sums = MetricSums()  # under torchrun each rank sums its share of the pairs
        for rows, real in distributed.shared_batches(len(self.pairs), self.batch_size):
            batch = collate_pairs([self.pairs[i] for i in rows], self.tokenizer.pad_token_id, layout=self.layout)
            with autocast(device, self.precision):
                seq = sequence_logps(policy, batch)
            pol = PairLogps.split(seq, with_rejected=True)
            ref = self.reference.pair_logps(batch, True, table="eval").to(device) if use_ref else None
            out = self.algorithm.pair_loss(pol, ref)
            if not real:  # a stand-in batch of a rank with no pairs left: it ran the passes, it adds nothing
                continue
            pair_metrics = {"logps/chosen": mean_metric(pol.chosen), "logps/rejected": mean_metric(pol.rejected)}
            if ref is not None:
                chosen_ratio, rejected_ratio = pol.chosen - ref.chosen, pol.rejected - ref.rejected
                pair_metrics["log_ratio_accuracy"] = mean_metric((chosen_ratio > rejected_ratio).float())
            if out is not None:
                pair_metrics["loss"] = (out.loss.sum().item(), self.algorithm.normaliser(batch).item())
                pair_metrics.update(out.metrics)
            sums.merge(pair_metrics)
        return {f"eval/{name}": value for name, value in distributed.reduce_metrics(sums).means().items()}

    def _sample(self, model, temperature: Optional[float] = None) -> Samples:
        g = self.generation
        with torch.random.fork_rng(devices=[] if not torch.cuda.is_available() else None):
            torch.manual_seed(self.seed)
            return sample(model, self.tokenizer, self.prompt_ids, g.max_new_tokens,
                          g.temperature if temperature is None else temperature, g.top_k, g.top_p, g.batch_size)

    def _temperature_sweep(self, policy, step: int) -> tuple[dict, dict]:
        """Samples at the paper's evaluation temperatures, for gold rewards and offline win-rate judging."""
        metrics, tables = {}, {}
        for t in self.cfg.temperatures:
            samples = self._sample(policy, t)
            rows = [[step, t, p, r] for p, r in zip(self.prompt_texts, samples.texts)]
            if self.gold is not None:
                metrics[f"eval/gold_reward/T={t:g}"] = mean(self.gold.scores(self.prompt_texts, samples.texts))
            tables[f"eval/samples/T={t:g}"] = rows
        return metrics, tables

    @torch.no_grad()
    def _generation_metrics(self, policy, step: int) -> tuple[dict, list[list]]:
        if not self.prompt_ids:
            return {}, []
        samples = self._sample(policy)
        lengths = torch.tensor([len(r) for r in samples.response_ids], dtype=torch.float)
        metrics = {"eval/response_length": lengths.mean().item(),
                   "eval/truncated_fraction": truncated_fraction(samples)}
        gold = self.gold.scores(self.prompt_texts, samples.texts) if self.gold is not None else None
        if gold is not None:
            metrics["eval/gold_reward"] = mean(gold)
        if self.reference is not None and self.cfg.kl:
            pad = self.tokenizer.pad_token_id
            policy_logps = logps_of_samples(policy, samples, pad, self.batch_size)
            with self.reference.model() as ref_model:
                ref_logps = logps_of_samples(ref_model, samples, pad, self.batch_size)
                if self._reference_samples is None:  # π_ref is fixed: sample it once
                    self._reference_samples = self._sample(ref_model)
                    if self.gold is not None:
                        self._reference_gold = self.gold.scores(self.prompt_texts, self._reference_samples.texts)
            log_ratio = policy_logps - ref_logps  # (N,) sequence-level log π/π_ref of y ~ π
            metrics["eval/kl"] = log_ratio.mean().item()
            metrics["eval/kl_stderr"] = (log_ratio.std().item() / math.sqrt(len(log_ratio))
                                         if len(log_ratio) > 1 else float("nan"))
        if self._reference_samples is not None:
            metrics["eval/truncated_fraction_ref"] = truncated_fraction(self._reference_samples)
        if self._reference_gold is not None:
            metrics["eval/gold_reward_ref"] = mean(self._reference_gold)
        rows = []
        for i in range(min(self.cfg.table_rows, len(samples.texts))):
            ref_text = self._reference_samples.texts[i] if self._reference_samples else None
            rows.append([step, self.prompt_texts[i], samples.texts[i], gold[i] if gold else None, ref_text,
                         self._reference_gold[i] if self._reference_gold else None])
        return metrics, rows


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def truncated_fraction(samples: Samples) -> float:
    """Fraction of sampled responses that stopped at the length cap instead of emitting a stop token."""
    return sum(not ended for ended in samples.ended) / len(samples.ended) if samples.ended else 0.0
