"""What the evaluation numbers estimate, checked against exact values.

The KL estimate eval/kl is checked against the exact KL between a tiny policy's and reference's
response distributions, computed by enumerating every response the length cap allows.
"""
import copy
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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    reference = LlamaForCausalLM(config).double().eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.4 * torch.randn_like(p))
    return policy, reference


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
    from dpo_exp.config import register_configs
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
