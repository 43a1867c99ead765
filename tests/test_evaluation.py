"""What the evaluation numbers estimate, checked against exact values.

The KL estimate eval/kl is checked against the exact KL between a tiny policy's and reference's
response distributions, computed by enumerating every response the length cap allows.
"""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from dpo_exp.data import collate_sequences
from dpo_exp.evaluation import EvalPrompts, Evaluator
from dpo_exp.models import sequence_logps
from dpo_exp.reference import Reference

PAD, BOS, EOS = 0, 1, 2
VOCAB = 5
CAP = 3
PROMPT = [BOS, 3]


@pytest.fixture(scope="module")
def policy_and_reference():
    from conftest import perturbed_llama_pair

    return perturbed_llama_pair(vocab_size=VOCAB, num_layers=1, max_positions=16, noise=0.4)


def every_response():
    """All responses sampling can give with max_new_tokens=CAP: k non-EOS tokens then EOS (k < CAP), or CAP
    non-EOS tokens (cut at the cap, no EOS). Any token may be sampled, pad and BOS included."""
    others = [t for t in range(VOCAB) if t != EOS]
    for k in range(CAP):
        for body in itertools.product(others, repeat=k):
            yield [*body, EOS]
    yield from (list(body) for body in itertools.product(others, repeat=CAP))


def exact(policy, reference):
    responses = list(every_response())
    batch = collate_sequences([PROMPT] * len(responses), responses, pad_id=PAD)
    with torch.no_grad():
        log_p = sequence_logps(policy, batch).logps
        log_q = sequence_logps(reference, batch).logps
    p = log_p.exp()
    truncated = torch.tensor([r[-1] != EOS for r in responses], dtype=torch.float64)
    return p.sum().item(), (p * (log_p - log_q)).sum().item(), (p * truncated).sum().item()


def test_the_kl_estimate_matches_the_exact_kl_of_the_capped_response_distributions(policy_and_reference):
    policy, reference = policy_and_reference
    total, kl, p_truncated = exact(policy, reference)
    assert total == pytest.approx(1.0, abs=1e-9)  # the enumeration is the whole response space
    n = 4000
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS,
                                batch_decode=lambda ids, **kw: [" ".join(map(str, r)) for r in ids])
    generation = SimpleNamespace(max_new_tokens=CAP, temperature=1.0, top_k=0, top_p=1.0, batch_size=1000)
    eval_cfg = SimpleNamespace(samples_per_prompt=n, kl=True, temperatures=[], table_rows=0)
    evaluator = Evaluator(None, Reference(lambda: reference, resident=True), [], EvalPrompts(["x"], [PROMPT]),
                          tokenizer, None, generation, eval_cfg, batch_size=1000, precision="fp32", seed=0)
    metrics, _ = evaluator._generation_metrics(policy, step=0)
    assert 0.05 < kl and metrics["eval/kl_stderr"] < kl / 5  # a real difference, measured precisely enough
    assert abs(metrics["eval/kl"] - kl) < 4 * metrics["eval/kl_stderr"], (metrics["eval/kl"], kl)
    print(f"exact KL {kl:.4f}, estimate {metrics['eval/kl']:.4f} +- {metrics['eval/kl_stderr']:.4f}; "
          f"P(cut) {p_truncated:.3f}, sampled {metrics['eval/truncated_fraction']:.3f}")
    binomial = math.sqrt(p_truncated * (1 - p_truncated) / n)
    assert 0.05 < p_truncated < 0.95
    assert abs(metrics["eval/truncated_fraction"] - p_truncated) < 4 * binomial


# ---- held out means held out --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [[], ["experiment=imdb_small"]], ids=["synthetic", "imdb_small"])
def test_evaluation_prompts_and_held_out_pair_prompts_are_never_training_prompts(tmp_path, overrides):
    """Every prompt behind eval/gold_reward and eval/kl, and every held-out pair's prompt, differs (as a string)
    from every training prompt, at the task's real sizes."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import ROOT, SHARED_DATA
    from dpo_exp.components import register_configs
    from dpo_exp.models import load_tokenizer
    from dpo_exp.tasks import build_task

    if overrides and not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"paths.root_dir={ROOT}", "paths.output_dir=/tmp/unused"])
    OmegaConf.resolve(cfg)
    task = build_task(cfg)
    task.train_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    train = set(task.train_prompts(tokenizer))
    evaluation = task.eval_prompts(tokenizer, [])
    held_out_pairs = task.held_out_pair_prompts(tokenizer)
    assert len(evaluation) == cfg.eval.num_prompts and len(held_out_pairs) == cfg.task.num_eval_pair_prompts
    assert not train & set(evaluation) and not train & set(held_out_pairs)
    # and the held-out prompts are not just the longest prefixes: their lengths spread like the training ones
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in evaluation]
    assert min(lengths) <= cfg.task.prompt_min_tokens + 2


# ---- SFT reviews that end, so samples end ----------------------------------------------------------

class WordTokenizer:
    """One token per whitespace-separated word: lengths a reader can count."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


@pytest.mark.parametrize("text, max_tokens, expected", [
    ("One two three. Four five six! Seven eight", 4, "One two three."),
    ("One two three. Four five six! Seven eight", 7, "One two three. Four five six!"),
    ('He said "no way." Then he left', 5, 'He said "no way."'),          # the closing quote stays
    ("Loved it. Would watch again", 5, "Loved it. Would watch again"),   # fits: whole, even without a full stop
    ("Version 2.0 of the film is long. Yes", 6, None),                   # "2.0" is no sentence end; the first is too long
    ("A first sentence far too long for the budget. Short.", 3, None),
])
def test_an_excerpt_ends_at_the_last_sentence_end_within_the_budget(text, max_tokens, expected):
    from dpo_exp.tasks.sentiment import excerpt

    assert excerpt(text, WordTokenizer(), max_tokens) == expected


def test_imdb_sft_examples_are_excerpts_that_end_with_eos(tmp_path):
    """data=imdb's SFT reviews (data.excerpt_tokens=64) each end at a sentence end within 64 tokens and are
    tokenized with their EOS, so π_SFT learns to stop; whole reviews (null) are mostly cut without EOS."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import ROOT, SHARED_DATA
    from dpo_exp.components import register_configs
    from dpo_exp.data import tokenize_dataset
    from dpo_exp.models import load_tokenizer
    from dpo_exp.tasks import build_task

    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent")
    register_configs()

    def task_of(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["experiment=imdb_small", "data.num_train_texts=300",
                                               f"paths.root_dir={ROOT}", "paths.output_dir=/tmp/unused", *overrides])
        OmegaConf.resolve(cfg)
        return cfg, build_task(cfg)

    cfg, task = task_of()
    task.train_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    eos = tokenizer.eos_token_id
    pairs = task.sft_examples(tokenizer)
    tokenized, _ = tokenize_dataset(tokenizer, pairs, cfg.sft.max_length, 8)
    assert 0.8 * len(task.train_texts) < len(pairs) < len(task.train_texts)  # a few have no early sentence end
    for pair, tok in zip(pairs, tokenized):
        assert pair.chosen[-1] in ".!?\"')]" or pair.chosen in task.train_texts
        assert len(tok.chosen_ids) <= 64 + 1 and tok.chosen_ids[-1] == eos
    cfg, task = task_of("data.excerpt_tokens=null", "sft.max_length=128")
    whole, _ = tokenize_dataset(tokenizer, task.sft_examples(tokenizer), cfg.sft.max_length, 8)
    assert len(whole) == 300 and sum(t.chosen_ids[-1] != eos for t in whole) > 0.5 * len(whole)
