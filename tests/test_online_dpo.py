"""Online DPO: fresh pairs from the current policy, labelled by the annotator, exact sampled tokens,
ties dropped and counted, and agreement with the gold reward when a reward model labels."""
import torch

from conftest import make_cfg
from dpo_exp.algorithms import ALGORITHMS, Resources
from dpo_exp.models import ScalarHeadModel, freeze
from dpo_exp.reference import Reference
from test_ppo import BOS, EOS, tiny_llama, tiny_tokenizer

MAX_NEW = 5


def count_t7(prompts, responses):
    """Gold reward on text: how many times the word t7 occurs (coarse on purpose, so ties happen)."""
    return [float(r.split().count("t7")) for r in responses]


def online(annotator="gold", reward_model=None, batch_size=16):
    tokenizer = tiny_tokenizer()
    cfg = make_cfg({"loss": {"name": "online_dpo", "beta": 0.1}, "trainer": {"batch_size": batch_size, "max_steps": 2},
                    "online_dpo": {"annotator": annotator, "max_new_tokens": MAX_NEW}})
    prompts = [[BOS, 3 + i] for i in range(16)]
    policy = tiny_llama(seed=0)
    res = Resources(cfg, tokenizer, torch.device("cpu"), policy=policy,
                    reference=Reference(lambda: freeze(tiny_llama(seed=0)), resident=True),
                    reward_model=reward_model, prompt_ids=prompts, prompt_texts=tokenizer.batch_decode(prompts),
                    gold_reward=count_t7)
    return ALGORITHMS["online_dpo"]("online_dpo", cfg, res), tokenizer


def test_pairs_are_the_sampled_tokens_ordered_by_the_annotator_and_ties_are_dropped():
    algorithm, tokenizer = online()
    torch.manual_seed(0)
    experience = algorithm.experience(0)
    (step,) = experience.steps
    assert 0 < len(step) < 16  # some prompts tie under this coarse gold reward, some do not
    assert experience.metrics["ties"] == 1 - len(step) / 16
    for pair in step.pairs:
        chosen, rejected = tokenizer.decode(pair.chosen_ids), tokenizer.decode(pair.rejected_ids)
        assert count_t7(None, [chosen])[0] > count_t7(None, [rejected])[0]
        for ids in (pair.chosen_ids, pair.rejected_ids):  # sampled tokens as they are: EOS only where emitted
            assert len(ids) <= MAX_NEW and (EOS not in ids[:-1])
    cut = [ids for p in step.pairs for ids in (p.chosen_ids, p.rejected_ids) if ids[-1] != EOS]
    assert all(len(ids) == MAX_NEW for ids in cut)  # a response without EOS is one that hit the cap
    # π_ref log-probs were computed once with the pairs, and the loss uses them
    micro = step.select(list(range(len(step))))
    assert micro.reference_chosen.shape == (len(step),)
    out = algorithm.loss(micro)
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected"} <= set(out.metrics)


def test_a_reward_model_annotator_reports_its_agreement_with_the_gold_reward():
    rm = ScalarHeadModel(tiny_llama(seed=3))  # a random reward model: agreement is whatever it is, not 1
    algorithm, _ = online("model", reward_model=rm)
    torch.manual_seed(0)
    metrics = algorithm.experience(0).metrics
    assert 0.0 <= metrics["annotator_agreement"] <= 1.0
    assert metrics["ties"] == 0.0  # continuous scores never tie unless the two samples are identical
    gold_annotated, _ = online("gold")
    torch.manual_seed(0)
    assert "annotator_agreement" not in gold_annotated.experience(0).metrics  # the gold reward agrees with itself
