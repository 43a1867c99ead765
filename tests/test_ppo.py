"""PPO (RLHF) baseline: every formula against hand-computed values, then tiny end-to-end runs."""
import math

import pytest
import torch

from conftest import build_loop, make_cfg
from dpo_exp.algorithms import Resources
from dpo_exp.algorithms.reward_model import RewardModelEvaluator, bradley_terry_loss, normalise_reward_model
from dpo_exp.algorithms.rl import (AdaptiveKLController, FixedKLController, apply_missing_eos_penalty,
                                   clipped_policy_loss, clipped_value_loss, gae, per_token_rewards, whiten)
from dpo_exp.algorithms.scorers import GoldScorer, RewardModelScorer
from dpo_exp.validation import validate
from dpo_exp.errors import ConfigError
from dpo_exp.data import TokenizedPair, collate_sequences
from dpo_exp.models import ScalarHeadModel, freeze, load_model, make_value_model, sample, sequence_logps
from dpo_exp.reference import Reference

PAD, BOS, EOS, VOCAB = 0, 1, 2, 32


class ListSink:
    def __init__(self):
        self.rows, self.tables = [], []

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})

    def table(self, name, columns, rows, step):
        self.tables.append((name, step))


# ---------------------------------------------------------------------------- pure functions

def test_gae_three_tokens_by_hand():
    # γ = 1, λ = 0.95, r = [0.1, −0.2, 1.0], V = [0.5, 0.4, 0.6]; V after the last token = 0.
    # δ2 = r2 − V2           = 1.0 − 0.6        = 0.4
    # δ1 = r1 + V2 − V1      = −0.2 + 0.6 − 0.4 = 0.0
    # δ0 = r0 + V1 − V0      = 0.1 + 0.4 − 0.5  = 0.0
    # A2 = δ2 = 0.4;  A1 = δ1 + 0.95·A2 = 0.38;  A0 = δ0 + 0.95·A1 = 0.361
    # returns = A + V = [0.861, 0.78, 1.0]
    r, v = torch.tensor([[0.1, -0.2, 1.0]]), torch.tensor([[0.5, 0.4, 0.6]])
    adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.361, 0.38, 0.4]]))
    torch.testing.assert_close(ret, torch.tensor([[0.861, 0.78, 1.0]]))

    # the same episode with one padding column before it (our left-padded layout) or after it
    # (right-padded), garbage in the padded slot: identical numbers, 0 at the pad
    left = gae(torch.tensor([[9.0, 0.1, -0.2, 1.0]]), torch.tensor([[9.0, 0.5, 0.4, 0.6]]),
               torch.tensor([[False, True, True, True]]))
    right = gae(torch.tensor([[0.1, -0.2, 1.0, 9.0]]), torch.tensor([[0.5, 0.4, 0.6, 9.0]]),
                torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(left[0], torch.tensor([[0.0, 0.361, 0.38, 0.4]]))
    torch.testing.assert_close(right[0], torch.tensor([[0.361, 0.38, 0.4, 0.0]]))
    torch.testing.assert_close(left[1][:, 1:], right[1][:, :3])


def test_whiten_uses_valid_tokens_only():
    # valid x = [1, 3, 5]: mean 3, unbiased var = (4 + 0 + 4)/2 = 4, std 2 → [−1, 0, 1]
    x, mask = torch.tensor([[1.0, 3.0], [5.0, 100.0]]), torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    # shift_mean=False: scaled but the mean (3) added back → [2, 3, 4]
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[2.0, 3.0], [4.0, 0.0]]))


def test_clipped_policy_loss_inside_and_outside_the_clip():
    # ε = 0.2; tokens (ratio, A):            −A·r    −A·clip(r)  max    clipped?
    #   (1.1, +1)  inside                     −1.1    −1.1        −1.1   no
    #   (1.5, +1)  above 1+ε, A > 0           −1.5    −1.2        −1.2   yes
    #   (0.5, −1)  below 1−ε, A < 0           +0.5    +0.8        +0.8   yes
    #   (0.5, +1)  below 1−ε but A > 0        −0.5    −0.8        −0.5   no (pessimistic bound)
    #   (100, +1)  masked out
    # loss = (−1.1 − 1.2 + 0.8 − 0.5)/4 = −0.5; clipfrac = 2/4
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 100.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    old = torch.zeros(1, 5)
    logps = ratios.log().requires_grad_(True)
    loss, clipfrac, approx_kl = clipped_policy_loss(logps, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-0.5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)
    lr = [math.log(1.1), math.log(1.5), math.log(0.5), math.log(0.5)]
    assert approx_kl.item() == pytest.approx(0.5 * sum(x * x for x in lr) / 4, rel=1e-6)
    loss.backward()
    # d/dlogp of −A·exp(logp)/4 = −A·r/4 where unclipped is active; 0 where the clip is active or masked
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.1 / 4, 0.0, 0.0, -0.5 / 4, 0.0]]))


def test_clipped_value_loss():
    # c = 0.2, V_old = 0, R = 1:  V     V_clip   (V−R)²  (V_clip−R)²  max    clipped?
    #                            0.1    0.1      0.81    0.81         0.81   no
    #                            0.5    0.2      0.25    0.64         0.64   yes
    #                           −0.5   −0.2      2.25    1.44         2.25   no
    # loss = ½·(0.81 + 0.64 + 2.25)/3 = 0.616667; clipfrac = 1/3
    values = torch.tensor([[0.1, 0.5, -0.5, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, clipfrac = clipped_value_loss(values, torch.zeros(1, 4), torch.ones(1, 4), mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 3.7 / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_per_token_kl_penalty_score_at_last_token_and_missing_eos():
    # β = 0.1; log π − log π_ref: row 0 [0.2, −0.1, 0.5], row 1 [pad, 0.4, 0.0] (left-padded layout)
    # row 0: [−0.02, 0.01, −0.05 + 1.0] ; row 1: [0, −0.04, 0 + 2.0]
    logps = torch.tensor([[0.2, -0.1, 0.5], [5.0, 0.4, 0.0]])
    ref = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    score = torch.tensor([1.0, 2.0])
    rewards = per_token_rewards(score, logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.02, 0.01, 0.95], [0.0, -0.04, 2.0]]))
    # right-padded layout: the score goes to the last VALID token, not the last column
    rp = per_token_rewards(score[:1], torch.tensor([[0.4, 0.0, 5.0]]), torch.zeros(1, 3),
                           torch.tensor([[True, True, False]]), kl_coef=0.1)
    torch.testing.assert_close(rp[0], torch.tensor([-0.04, 0.0 + 1.0, 0.0]))
    # row 1 never emitted EOS: its score 2.0 is replaced by the fixed penalty −1 → last reward −1.0
    penalised = apply_missing_eos_penalty(score, torch.tensor([True, False]), -1.0)
    torch.testing.assert_close(penalised, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(per_token_rewards(penalised, logps, ref, mask, 0.1)[1], torch.tensor([0.0, -0.04, -1.0]))
    assert apply_missing_eos_penalty(score, torch.tensor([True, False]), None) is score  # None disables


def test_kl_controllers():
    # β = 0.1, target 6, horizon 1000, n_steps 100 → β·(1 + e·0.1), e = clip(KL/6 − 1, −0.2, 0.2)
    cases = [(6.6, 0.1 * (1 + 0.1 * 0.1)),    # above target, e = 0.1            → 0.101
             (5.4, 0.1 * (1 - 0.1 * 0.1)),    # below target, e = −0.1           → 0.099
             (12.0, 0.1 * (1 + 0.2 * 0.1)),   # e = 1 clipped to 0.2             → 0.102
             (0.0, 0.1 * (1 - 0.2 * 0.1))]    # e = −1 clipped to −0.2           → 0.098
    for kl, expected in cases:
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
        ctl.update(kl, n_steps=100)
        assert ctl.value == pytest.approx(expected, rel=1e-12)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 100)
    assert fixed.value == 0.05


def test_bradley_terry_loss():
    # −log σ(2 − 0) = log(1 + e^−2) = 0.126928; −log σ(0) = log 2 = 0.693147, one per pair
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-2)), math.log(2)], rel=1e-6)


@pytest.mark.parametrize("ppo, message", [
    ({"rollout_batch_size": 10, "minibatch_size": 4}, "does not divide evenly"),
    ({"minibatch_size": 16, "micro_batch_size": 5}, "does not divide evenly"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"target_kl": -1.0}, "target_kl must be > 0"),
])
def test_config_rejects_inconsistent_ppo_settings(ppo, message):
    cfg = make_cfg({"loss": {"name": "ppo"}, "ppo": ppo, "model": {"architecture": {"model_type": "llama"}},
                    "task": {"gold_reward": "vader"}})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


# ---------------------------------------------------------------------------- models

def test_token_logps_sum_to_sequence_logps_and_scale_with_temperature(tiny_lm):
    policy, _ = tiny_lm
    batch = collate_sequences([[1, 5], [1, 5, 6, 7]], [[7, 9, 2], [8, 2]], pad_id=0)
    out = sequence_logps(policy, batch, temperature=1.0, per_token=True, with_entropy=True)
    token, entropy = out.tokens, out.entropy
    torch.testing.assert_close(token.sum(-1), out.logps)
    assert token[1, 0] == 0 and entropy[1, 0] == 0 and (entropy[batch.response_mask] > 0).all()
    # temperature T: log softmax(logits/T) of the last token of row 1 (EOS after [1,5,6,7,8])
    logits = policy(torch.tensor([[1, 5, 6, 7, 8]])).logits[0, -1]
    hot = sequence_logps(policy, batch, temperature=0.7, per_token=True).tokens
    torch.testing.assert_close(hot[1, -1], torch.log_softmax(logits / 0.7, -1)[2])
    # the entropy of π at a response position, by its definition −Σ p log p
    first = torch.log_softmax(policy(torch.tensor([[1, 5]])).logits[0, -1], -1)
    torch.testing.assert_close(entropy[0, 0], -(first.exp() * first).sum())


def tiny_llama(seed=0, layers=1, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(config)


def tiny_tokenizer():
    """Word-level tokenizer over "<pad> <s> </s> t3 … t31" (ids 0..31), pad ≠ EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")


def marker_pairs(n, seed, marker=5):
    """chosen contains the marker token somewhere, rejected does not; both end in EOS."""
    g = torch.Generator().manual_seed(seed)
    others = [t for t in range(3, VOCAB) if t != marker]
    pick = lambda k: [others[i] for i in torch.randint(len(others), (k,), generator=g).tolist()]  # noqa: E731
    pairs = []
    for i in range(n):
        k = 2 + i % 4
        chosen = pick(k)
        chosen.insert(int(torch.randint(k + 1, (1,), generator=g)), marker)
        pairs.append(TokenizedPair(i, [BOS] + pick(1 + i % 3), chosen + [EOS], pick(k + 1) + [EOS]))
    return pairs


def test_reward_model_learns_marker_and_round_trips(tmp_path):
    """The reward-model algorithm in the shared loop: it learns which response holds a marker token."""
    tokenizer = tiny_tokenizer()
    sft_dir = tmp_path / "sft"
    tiny_llama(seed=1).save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    sink = ListSink()
    prompts = [[BOS, 3 + i] for i in range(16)]
    cfg = make_cfg({"loss": {"name": "reward_model"}, "trainer": {"batch_size": 16, "epochs": 4},
                    "optimizer": {"name": "adamw", "lr": 3e-3, "warmup_steps": 0, "max_grad_norm": 1.0}})
    torch.manual_seed(0)
    model = ScalarHeadModel(load_model(str(sft_dir), torch.float32))
    res = Resources(cfg, tokenizer, torch.device("cpu"), reward_model=model, train_pairs=marker_pairs(256, seed=0))
    loop = build_loop(cfg, res, [sink], tmp_path, evaluate=RewardModelEvaluator(marker_pairs(64, seed=1), PAD),
                      eval_every=16, log_every=8, eval_at_start=False, save_final=False)
    final = loop.fit()
    assert final["eval/accuracy"] > 0.9, final
    keys = set().union(*[r.keys() for r in sink.rows])
    assert {"train/loss", "train/accuracy", "train/margin", "eval/loss", "eval/accuracy", "eval/margin"} <= keys
    losses = [r["train/loss"] for r in sink.rows if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0]  # the Bradley–Terry loss falls
    # normalised: the offset is the mean raw score of π_SFT samples (with the same seed)
    torch.manual_seed(321)
    stats = normalise_reward_model(model, load_model(str(sft_dir), torch.float32), tokenizer, prompts * 4, 6, 1.0)
    torch.manual_seed(321)
    again = sample(load_model(str(sft_dir), torch.float32), tokenizer, prompts * 4, 6, 1.0)
    scorer = RewardModelScorer(model, PAD)
    normalised = scorer(None, again.prompt_ids, again.response_ids, None)
    assert abs(normalised.mean().item()) < 1e-5 and stats["n"] == 64 and model.offset != 0.0
    # save/load round trip (HF folder + head + offset) reproduces the scores exactly
    model.save_pretrained(tmp_path / "rm", tokenizer)
    loaded = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    assert loaded.offset == model.offset
    torch.testing.assert_close(RewardModelScorer(loaded, PAD)(None, again.prompt_ids, again.response_ids, None),
                               normalised)


def test_the_reward_models_users_score_alike(tmp_path):
    """PPO's scorer, the reward model's held-out evaluation and judge=reward_model give one pair the same
    scores: they score through one path (RewardModelScorer)."""
    from dpo_exp.judging.judges import RewardModelJudge

    tokenizer = tiny_tokenizer()
    model = ScalarHeadModel(tiny_llama(seed=2), end_ids=[EOS])
    model.offset = 0.25
    model.save_pretrained(tmp_path / "rm", tokenizer)
    prompts = ["t3 t4", "t5", "t6 t7 t8"]
    chosen, rejected = ["t9 t10", "t11", "t12 t13 t14"], ["t15", "t16 t17", "t18"]
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt_ids = [ids(p) for p in prompts]
    chosen_ids, rejected_ids = [ids(r) + [EOS] for r in chosen], [ids(r) + [EOS] for r in rejected]

    scorer = RewardModelScorer(model, PAD, batch_size=2)
    chosen_scores, rejected_scores = scorer.scores(prompt_ids, chosen_ids), scorer.scores(prompt_ids, rejected_ids)
    judge = RewardModelJudge(str(tmp_path / "rm"), torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(torch.tensor(judge.scores(prompts, chosen)), chosen_scores)
    torch.testing.assert_close(torch.tensor(judge.scores(prompts, rejected)), rejected_scores)

    pairs = [TokenizedPair(i, p, c, r) for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids))]
    metrics, _ = RewardModelEvaluator(pairs, PAD, batch_size=2)(model, 0)
    margin = chosen_scores - rejected_scores  # the offset cancels
    assert metrics["eval/margin"] == pytest.approx(margin.mean().item(), abs=1e-6)
    assert metrics["eval/accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert metrics["eval/loss"] == pytest.approx(bradley_terry_loss(chosen_scores, rejected_scores).mean().item(),
                                                 abs=1e-6)


# ---------------------------------------------------------------------------- PPO end to end

TARGET = 7


def count_target(prompt_texts, response_texts):
    """Gold reward on text: the fraction of the response's words that are the TARGET token (0 if empty)."""
    out = []
    for text in response_texts:
        words = text.split()
        out.append(sum(w == f"t{TARGET}" for w in words) / max(1, len(words)))
    return out


def ppo_cfg(**ppo):
    return make_cfg({"loss": {"name": "ppo"}, "ppo": {"reward": "gold", "missing_eos_penalty": None, **ppo}})


def test_ppo_raises_gold_reward_on_a_tiny_task(tmp_path):
    import copy

    tokenizer = tiny_tokenizer()
    policy = tiny_llama(seed=0)
    ref = freeze(copy.deepcopy(policy))
    value = make_value_model(policy=policy)
    prompts = [[BOS, 3 + i, 10 + i] for i in range(8)]
    cfg = ppo_cfg(rollout_batch_size=32, minibatch_size=16, ppo_epochs=4, total_iterations=16, lr=1e-3,
                  value_lr=1e-3, kl_coef=0.05, temperature=0.7, max_new_tokens=6)
    res = Resources(cfg, tokenizer, torch.device("cpu"), policy=policy, reference=Reference(lambda: ref, resident=True),
                    value_model=value, prompt_ids=prompts, prompt_texts=tokenizer.batch_decode(prompts),
                    gold_reward=count_target)
    sink = ListSink()
    torch.manual_seed(0)
    build_loop(cfg, res, [sink], tmp_path, count_flops=True).fit()
    rows = sink.rows
    names = {"train/reward", "train/kl", "train/rlhf_reward", "train/kl_coef", "train/policy_loss",
             "train/value_loss", "train/clipfrac", "train/value_clipfrac", "train/approx_kl", "train/entropy",
             "train/response_length", "train/eos_fraction", "train/rollout_seconds", "train/update_seconds",
             "train/learning_rate", "train/value_learning_rate", "train/grad_norm", "train/value_grad_norm",
             "train/episodes", "train/flops"}
    assert names <= rows[0].keys()
    first = sum(r["train/reward"] for r in rows[:3]) / 3
    last = sum(r["train/reward"] for r in rows[-3:]) / 3
    print(f"gold reward: first 3 iterations {first:.3f}, last 3 {last:.3f}; KL {rows[-1]['train/kl']:.3f}")
    assert last > first + 0.15, [round(r["train/reward"], 3) for r in rows]
    assert rows[-1]["train/kl"] > 0
    assert rows[-1]["train/episodes"] == 16 * 32 and rows[-1]["train/flops"] > rows[0]["train/flops"] > 0
    assert (tmp_path / "checkpoints" / "final" / "config.json").exists()
    assert (tmp_path / "checkpoints" / "final" / "value" / "score_head.safetensors").exists()
    state = torch.load(tmp_path / "checkpoints" / "final" / "trainer_state.pt", weights_only=True)
    assert state["loop"]["step"] == 16 and state["loop"]["algorithm"]["episodes"] == 16 * 32
    assert set(state["schedulers"]) == {"policy", "value"}
    assert (tmp_path / "checkpoints" / "final" / "state" / ".metadata").exists()  # models + optimizers (DCP)


def test_ppo_adaptive_kl_with_reward_model_scorer_and_reference_object(tmp_path):
    """Wiring: a Reference object for π_ref, a reward-model scorer, adaptive β, micro-batches, evaluation."""
    tokenizer = tiny_tokenizer()
    policy = tiny_llama(seed=0)
    rm = ScalarHeadModel(tiny_llama(seed=2))
    reference = Reference(lambda: freeze(tiny_llama(seed=0)), resident=True)
    cfg = ppo_cfg(reward="model", rollout_batch_size=8, minibatch_size=4, micro_batch_size=2, ppo_epochs=2,
                  total_iterations=2, lr=1e-3, kl_coef=0.2, target_kl=0.01, horizon=8, max_new_tokens=4, eval_every=1)
    prompts = [[BOS, 3], [BOS, 4, 5]]
    res = Resources(cfg, tokenizer, torch.device("cpu"), policy=policy, reference=reference, reward_model=rm,
                    value_model=make_value_model(reward_model=rm), prompt_ids=prompts,
                    prompt_texts=tokenizer.batch_decode(prompts))
    sink = ListSink()
    calls = []

    def evaluator(policy, step):  # the dpo_exp.evaluation.Evaluator call signature
        calls.append(step)
        return {"eval/gold_reward": 0.5}, {"eval/samples": [[step, "p", "y", 0.5, "r", 0.4]]}

    loop = build_loop(cfg, res, [sink], tmp_path, evaluate=evaluator, save_final=False)
    assert loop.settings.grad_accumulation_steps == 2 and loop.settings.eval_every == 1
    final = loop.fit()
    assert calls == [0, 1, 2] and final["step"] == 2 and sink.tables == [("eval/samples", s) for s in (0, 1, 2)]
    first, second = [r for r in sink.rows if "train/reward" in r]
    # the first iteration starts with π = π_ref: KL exactly 0 → e = −0.2 → β·(1 − 0.2·8/8) = 0.16
    assert first["train/kl"] == pytest.approx(0.0, abs=1e-5)
    assert second["train/kl_coef"] == pytest.approx(0.2 * 0.8)
    assert first["train/approx_kl"] < 1e-2  # the first minibatch sees ratio 1
    assert all(math.isfinite(v) for v in second.values())


def test_gold_scorer_wraps_a_task_reward():
    scorer = GoldScorer(lambda prompts, responses: [float(len(r)) for r in responses])
    torch.testing.assert_close(scorer(["a", "b"], None, None, ["xy", "z"]), torch.tensor([2.0, 1.0]))
