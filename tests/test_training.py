"""The pieces of the loop a researcher relies on: log-probs, batching, accumulation, schedule."""
import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import build_loop, make_cfg
from dpo_exp.algorithms import Resources
from dpo_exp.algorithms.base import PairBatch, batch_plan
from dpo_exp.config import Schedule
from dpo_exp.data import PreferencePair, TokenizedPair, collate_pairs, collate_sequences
from dpo_exp.loop import lr_multiplier
from dpo_exp.losses import VARIANTS
from dpo_exp.models import sequence_logps
from dpo_exp.reference import Reference


def test_left_padded_layout_puts_responses_in_the_last_columns():
    batch = collate_sequences([[1, 5], [1, 5, 6]], [[7, 2], [8, 9, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[0, 0, 1, 5, 7, 2], [1, 5, 6, 8, 9, 2]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert batch.response_mask.tolist() == [[False, True, True], [True, True, True]]


@pytest.fixture
def tiny_gpt2():
    """GPT-2 has learned absolute position embeddings: a wrong position offset under left padding changes its
    log-probs by a lot (rotary Llama is blind to a constant offset)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double().eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequence_logps_equal_an_unpadded_forward(tiny_lm, tiny_gpt2, arch):
    model = tiny_lm[0] if arch == "llama" else tiny_gpt2
    prompts, responses = [[1, 5], [1, 5, 6, 7]], [[7, 9, 2], [8, 2]]
    batched = sequence_logps(model, collate_sequences(prompts, responses, pad_id=0))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        logits = model(ids).logits[0, len(p) - 1:-1]          # predictions of the response tokens
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum()
        torch.testing.assert_close(batched.logps[i], expected, rtol=1e-6, atol=1e-6)
        assert batched.lengths[i].item() == len(r)


def test_left_padded_positions_matter_for_gpt2(tiny_gpt2):
    """The check above can fail: positions 0..L-1 counted from the padding change GPT-2's log-probs."""
    batch = collate_sequences([[1, 5], [1, 5, 6, 7]], [[7, 9, 2], [8, 2]], pad_id=0)
    naive = dataclasses.replace(batch, position_ids=torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids))
    assert (sequence_logps(tiny_gpt2, batch).logps - sequence_logps(tiny_gpt2, naive).logps).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_sampling_equals_sampling_each_prompt_alone(tiny_lm, tiny_gpt2, arch):
    """Greedy generation from a left-padded batch gives each prompt's own continuation, and the log-probs
    of the samples equal an unpadded forward (the KL estimate rests on both)."""
    from types import SimpleNamespace

    from dpo_exp.models import logps_of_samples, sample

    model = tiny_lm[0] if arch == "llama" else tiny_gpt2
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2, batch_decode=lambda ids, **kw: [str(i) for i in ids])
    prompts = [[1, 5], [1, 5, 6, 7, 9], [1]]
    together = sample(model, tok, prompts, max_new_tokens=6, temperature=0)
    for i, prompt in enumerate(prompts):
        alone = sample(model, tok, [prompt], max_new_tokens=6, temperature=0)
        assert together.response_ids[i] == alone.response_ids[0]
    logps = logps_of_samples(model, together, pad_id=0, batch_size=8)
    for i, (p, r) in enumerate(zip(prompts, together.response_ids)):
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
        expected = F.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum()
        torch.testing.assert_close(logps[i], expected.to(logps.dtype), rtol=1e-5, atol=1e-5)


def test_sequence_logps_of_an_empty_response_is_zero_and_leaves_other_rows_alone(tiny_lm):
    model, _ = tiny_lm
    prompts, responses = [[1, 5, 6], [1, 5]], [[], [7, 9, 2]]
    batched = sequence_logps(model, collate_sequences(prompts, responses, pad_id=0))
    alone = sequence_logps(model, collate_sequences(prompts[1:], responses[1:], pad_id=0))
    assert batched.logps[0].item() == 0.0 and batched.lengths.tolist() == [0, 3]
    torch.testing.assert_close(batched.logps[1], alone.logps[0], rtol=1e-6, atol=1e-6)


def test_batch_plan_keeps_every_example_and_reshuffles_each_epoch():
    plan = batch_plan(10, batch_size=4, epochs=2, max_steps=None, seed=0)
    assert [len(b) for b in plan] == [4, 4, 4, 4, 4]
    flat = [i for b in plan for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert [len(b) for b in batch_plan(10, 4, 1, None, 0)] == [4, 4, 2]  # remainder kept, not dropped


def test_warmup_is_linear_from_zero_then_schedule():
    assert lr_multiplier(0, 4, 100, Schedule.constant) == 1 / 5
    assert lr_multiplier(3, 4, 100, Schedule.constant) == 4 / 5
    assert lr_multiplier(50, 4, 100, Schedule.constant) == 1.0
    assert lr_multiplier(4, 4, 104, Schedule.linear) == 1.0
    assert abs(lr_multiplier(54, 4, 104, Schedule.linear) - 0.5) < 1e-9
    assert abs(lr_multiplier(104, 4, 104, Schedule.cosine)) < 1e-9


def _pairs():
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 32, (n,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(i, [1] + rand(2 + i % 3), rand(2 + i % 4) + [2], rand(1 + i % 5) + [2]) for i in range(6)]


def _grads_after_one_step(tiny_lm, loss_name, accumulation):

    policy, ref = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    cfg = make_cfg({"loss": {"name": loss_name, "beta": 0.1}, "trainer": {"batch_size": 6},
                    "optimizer": {"lr": 1e-3, "warmup_steps": 0, "max_grad_norm": 0.0}})
    res = Resources(cfg, None, torch.device("cpu"), policy=policy, reference=Reference(lambda: ref, resident=True),
                    train_pairs=_pairs())
    loop = build_loop(cfg, res, grad_accumulation_steps=accumulation)
    grads = {}
    for p in policy.parameters():  # keep each gradient before the optimizer step clears it
        p.register_post_accumulate_grad_hook(lambda param: grads.__setitem__(id(param), param.grad.clone()))
    metrics = loop.optimizer_step(PairBatch(_pairs(), 0, with_rejected=loss_name != "sft"))
    return [grads[id(p)] for p in policy.parameters()], metrics.means()


def test_gradient_accumulation_equals_one_large_batch(tiny_lm):
    for loss in ("dpo", "sft"):  # per-pair mean and per-token mean
        full, m1 = _grads_after_one_step(tiny_lm, loss, 1)
        accumulated, m3 = _grads_after_one_step(tiny_lm, loss, 3)
        for a, b in zip(full, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert abs(m1["loss"] - m3["loss"]) < 1e-10


def test_sft_loss_is_per_token_nll_of_chosen(tiny_lm):
    policy = tiny_lm[0]
    pairs = _pairs()
    _, metrics = _grads_after_one_step(tiny_lm, "sft", 2)
    batch = collate_pairs(pairs, 0, with_rejected=False)
    with torch.no_grad():
        out = sequence_logps(policy, batch)
    assert abs(metrics["loss"] - (-out.logps.sum() / out.lengths.sum()).item()) < 1e-10


def test_dropout_is_off_in_models_we_build():
    from dpo_exp.models import new_model

    class Tok:  # the four things new_model reads from a tokenizer
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return 50

    model = new_model({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "resid_pdrop": 0.3,
                       "embd_pdrop": 0.3, "attn_pdrop": 0.3}, Tok(), torch.float32, "eager")
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)


# ---- responses that are only EOS ------------------------------------------------------------------

def test_an_empty_response_is_its_eos_and_a_pair_without_room_is_dropped_and_counted(tmp_path):
    from dpo_exp.data import tokenize_dataset, tokenize_pair
    from dpo_exp.models import load_tokenizer, train_tokenizer

    train_tokenizer(["a good film", "a bad film", "the end"], 300, tmp_path)
    tok = load_tokenizer(str(tmp_path))
    eos = tok.eos_token_id
    pair = tokenize_pair(tok, PreferencePair("a good", "", " film"), 0, max_length=32, max_prompt_length=16)
    assert pair.chosen_ids == [eos]  # the sample stopped at once: one token, its EOS
    assert pair.rejected_ids[-1] == eos and len(pair.rejected_ids) > 1
    sft = tokenize_pair(tok, PreferencePair("", "the end"), 0, max_length=32, max_prompt_length=16)
    assert sft.rejected_ids == []  # an SFT example has no rejected response at all
    prompt_len = len(tokenize_pair(tok, PreferencePair("a good film the end", "x", "y"), 0, 64, 64).prompt_ids)
    pairs = [PreferencePair("a good film the end", "", " film"), PreferencePair("a", "", " bad")]
    kept, dropped = tokenize_dataset(tok, pairs, max_length=prompt_len, max_prompt_length=prompt_len)
    assert dropped == {"no_response_tokens": 1}
    assert [p.index for p in kept] == [0] and kept[0].chosen_ids == [eos]


def _short_pairs():
    # EOS-only chosen, EOS-only rejected, both EOS-only, and one- and two-token responses
    return [TokenizedPair(0, [1, 5], [2], [7, 8, 2]), TokenizedPair(1, [1, 6, 9], [10, 2], [2]),
            TokenizedPair(2, [1, 4], [2], [2]), TokenizedPair(3, [1, 3, 3], [11, 2], [12, 13, 2])]


@pytest.mark.parametrize("loss_name", sorted(set(VARIANTS) | {"sft"}))
def test_every_pair_loss_is_finite_with_a_finite_gradient_on_eos_only_and_very_short_responses(tiny_lm, loss_name):

    policy, ref = copy.deepcopy(tiny_lm[0]), tiny_lm[1]
    own = {"gamma": 1.0} if loss_name == "simpo" else {}  # SimPO's margin
    cfg = make_cfg({"loss": {"name": loss_name, "beta": 2.0 if loss_name == "simpo" else 0.1, **own},
                    "trainer": {"batch_size": 4}, "optimizer": {"lr": 1e-3, "warmup_steps": 0}})
    res = Resources(cfg, None, torch.device("cpu"), policy=policy, reference=Reference(lambda: ref, resident=True),
                    train_pairs=_short_pairs())
    loop = build_loop(cfg, res)
    grads = []
    for p in policy.parameters():
        p.register_post_accumulate_grad_hook(lambda param: grads.append(param.grad.clone()))
    metrics = loop.optimizer_step(PairBatch(_short_pairs(), 0, with_rejected=loss_name != "sft"))
    loss = metrics.means()["loss"]
    assert torch.isfinite(torch.as_tensor(loss)), f"{loss_name}: loss {loss}"
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{loss_name}: non-finite gradient"
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("loss_name", ["simpo", "rpo"])
def test_length_normalised_losses_train_on_sampled_pairs_that_hold_empty_completions(smoke_cfg, monkeypatch,
                                                                                    loss_name):
    """The default task's sampled pairs include completions that stopped at once (decoded text ""):
    simpo and rpo divide by response length, which was 0/0 before an empty response kept its EOS."""
    from conftest import read_jsonl
    from dpo_exp import train as train_module

    from dpo_exp import pipeline

    real = pipeline.preference_data

    def with_empty_completions(cfg, task, sft_dir, tokenizer):
        train, evaluation, skipped = real(cfg, task, sft_dir, tokenizer)
        emptied = [PreferencePair(p.prompt, "", p.rejected) if i % 3 == 0 else
                   PreferencePair(p.prompt, p.chosen, "") if i % 3 == 1 else p for i, p in enumerate(train)]
        return emptied, [PreferencePair(p.prompt, "", p.rejected) for p in evaluation], skipped

    monkeypatch.setattr(pipeline, "preference_data", with_empty_completions)
    cfg = smoke_cfg(f"loss={loss_name}", *(["loss.gamma=1.0"] if loss_name == "simpo" else []))
    summary = train_module.run(cfg)
    losses = [r["train/loss"] for r in read_jsonl(Path(cfg.paths.output_dir) / "metrics.jsonl") if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(summary["eval/loss"]) and math.isfinite(summary["eval/kl"])


# ---- sampled pairs keep the tokens the model produced ------------------------------------------------------

def test_a_sampled_pair_is_never_re_tokenized_and_a_cut_sample_has_no_eos_term(tmp_path, tiny_lm):
    from dpo_exp.data import load_pairs, save_pairs, tokenize_pair
    from dpo_exp.models import load_tokenizer, train_tokenizer

    train_tokenizer(["a good film", "a bad film", "the end"], 300, tmp_path)
    tok = load_tokenizer(str(tmp_path))
    eos = tok.eos_token_id
    # stored ids (a cut chosen sample without EOS, a rejected one that stopped) are used as they are
    pair = PreferencePair("a good", "x", "y", prompt_ids=[1, 5], chosen_ids=[7, 8], rejected_ids=[9, eos])
    save_pairs([pair], tmp_path / "pairs.jsonl")
    loaded = load_pairs(tmp_path / "pairs.jsonl")[0]
    assert loaded == pair
    t = tokenize_pair(tok, loaded, 0, max_length=32, max_prompt_length=16)
    assert (t.prompt_ids, t.chosen_ids, t.rejected_ids) == ([1, 5], [7, 8], [9, eos])
    model = tiny_lm[0]
    batch = collate_pairs([t], pad_id=0)
    logps = sequence_logps(model, batch).logps
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 8]])).logits[0]
    two_tokens = F.log_softmax(logits, -1)[[1, 2], [7, 8]].sum()  # the two sampled tokens and no EOS after them
    torch.testing.assert_close(logps[0], two_tokens, rtol=1e-6, atol=1e-6)
    text_pair = tokenize_pair(tok, PreferencePair("a good", " film", " bad"), 0, 32, 16)
    assert text_pair.chosen_ids[-1] == eos  # a dataset's text response still gets EOS, as the authors'


@pytest.mark.parametrize("mode", ["drop", "keep"])
def test_sampled_pairs_store_exact_tokens_and_cut_samples_are_dropped_and_counted(smoke_cfg, tmp_path, mode):
    from dpo_exp import train as train_module
    from dpo_exp.data import load_pairs, tokenize_dataset
    from dpo_exp.models import load_tokenizer

    cache = tmp_path / f"cache_{mode}"
    # a vocabulary and SFT budget at which the tiny model's reviews fit and it learns to stop, sometimes
    cfg = smoke_cfg(f"paths.cache_dir={cache}", f"task.truncated_samples={mode}", "task.generation.max_new_tokens=48",
                    "data.vocab_size=1024", "sft.max_steps=120")
    summary = train_module.run(cfg)
    folder = next((cache / "pairs").glob("*/COMPLETE")).parent
    pairs = load_pairs(folder / "train.jsonl") + load_pairs(folder / "eval.jsonl")
    tok = load_tokenizer(summary["sft_policy"])
    eos = tok.eos_token_id
    ends = [ids[-1] == eos for p in pairs for ids in (p.chosen_ids, p.rejected_ids)]
    cut = summary.get("data/skipped/train/truncated_sample", 0) + summary.get("data/skipped/eval/truncated_sample", 0)
    if mode == "drop":
        assert all(ends) and cut > 0  # at 48 tokens some samples were cut: dropped, and counted
    else:
        assert not all(ends) and cut == 0  # kept, without an EOS the model never sampled
    for p in pairs:  # the text the gold reward scored is the decoded stored tokens
        assert p.chosen == tok.decode(p.chosen_ids, skip_special_tokens=True)
        assert all(t != eos for t in p.chosen_ids[:-1]) and len(p.chosen_ids) <= 48
    tokenized, _ = tokenize_dataset(tok, pairs, cfg.data.max_length, cfg.data.max_prompt_length)
    assert [(t.chosen_ids, t.rejected_ids) for t in tokenized] == [(p.chosen_ids, p.rejected_ids) for p in pairs]


def test_a_reference_loaded_per_block_is_freed_after_it_even_through_a_reference_cycle(tiny_lm):
    """A non-resident π_ref is loaded for each evaluation: the previous one must be gone before the next loads
    (two in memory is what the non-resident mode avoids), a plain one by its reference count alone, one that a
    reference cycle holds by a collection before the next load."""
    import gc
    import weakref

    loaded = []

    def load():
        model = copy.deepcopy(tiny_lm[1])
        model.config.owner = model  # a reference cycle, as a wrapped model can hold
        loaded.append(weakref.ref(model))
        return model

    reference = Reference(load, resident=False)
    gc.disable()  # no automatic collection may do the work for it
    try:
        with reference.model() as model:
            model(torch.tensor([[1, 2, 3]]))
        del model
        assert loaded[0]() is not None  # only the cycle holds it now
        with reference.model():
            assert loaded[0]() is None  # collected before the second model was loaded
    finally:
        gc.enable()


def test_token_log_probs_and_their_gradient_are_the_log_softmax_ones():
    """The fused token log-probs (a row may predict two targets, as a shared prompt's last position does): values
    by hand and against torch's log_softmax, the gradient against autograd through log_softmax and against
    finite differences, in float64."""
    from dpo_exp.models.logps import TokenLogps

    by_hand = TokenLogps.apply(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64), torch.tensor([0, 0]),
                               torch.tensor([1, 0]))
    torch.testing.assert_close(by_hand, torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64))
    torch.manual_seed(0)
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    source, labels = torch.tensor([0, 1, 1, 2, 3, 3, 4]), torch.tensor([3, 0, 6, 2, 2, 5, 1])
    weights = torch.randn(7, dtype=torch.float64)
    got, expected = TokenLogps.apply(logits, source, labels), torch.log_softmax(logits, -1)[source, labels]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad((got * weights).sum(), logits)[0],
                               torch.autograd.grad((expected * weights).sum(), logits)[0])
    assert torch.autograd.gradcheck(lambda x: TokenLogps.apply(x, source, labels), (logits,))


def test_cpu_training_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    """A 64 MB tensor allocated again after being freed: by default a fresh mmap, every page faulted in anew;
    after reuse_freed_memory() (what the loop does on the CPU) the freed pages come back without faults."""
    import subprocess
    import sys

    script = """
import resource, torch
from dpo_exp.loop import reuse_freed_memory

def faults_of_a_reallocation():
    torch.ones(2**24).sum()  # allocate, touch, free
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_a_reallocation()
assert reuse_freed_memory()
faults_of_a_reallocation()  # the first heap-backed one may grow the heap
print(default, faults_of_a_reallocation())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    default, reused = map(int, done.stdout.split())
    assert default > 0 and reused * 10 < default  # 64 MB: 16,384 faults in 4 KiB pages, 32 in huge pages


@pytest.mark.parametrize("reuse", [True, False])
def test_the_loop_reuses_freed_memory_when_training_on_the_cpu_unless_told_not_to(tiny_lm, monkeypatch, reuse):
    from dpo_exp import loop as loop_module

    calls = []
    monkeypatch.setattr(loop_module, "reuse_freed_memory", lambda: calls.append(True) or True)
    cfg = make_cfg({"loss": {"name": "sft"}, "trainer": {"batch_size": 2, "reuse_freed_memory": reuse}})
    res = Resources(cfg, None, torch.device("cpu"), policy=copy.deepcopy(tiny_lm[0]), train_pairs=_pairs())
    build_loop(cfg, res)
    assert calls == ([True] if reuse else [])


def test_loop_settings_read_every_field_from_its_own_trainer_key():
    """A renamed trainer key, or a loop setting no trainer key sets, fails instead of falling back to a default."""
    from omegaconf import OmegaConf

    from dpo_exp.config import TrainerConfig
    from dpo_exp.errors import ConfigError
    from dpo_exp.loop import LoopSettings

    trainer = OmegaConf.structured(TrainerConfig(eval_every=7, resume=True, micro_batch_tokens=64, keep_checkpoints=0))
    settings = LoopSettings.from_trainer(trainer, log_every=3)
    assert settings.log_every == 3  # an override
    assert all(getattr(settings, f.name) == trainer[f.name] for f in dataclasses.fields(LoopSettings)
               if f.name != "log_every")

    renamed = OmegaConf.to_container(trainer)
    renamed["evaluate_every"] = renamed.pop("eval_every")
    with pytest.raises(ConfigError, match="eval_every"):
        LoopSettings.from_trainer(OmegaConf.create(renamed))

    @dataclasses.dataclass
    class MoreSettings(LoopSettings):
        evals_to_keep: int = 3  # a setting that from_trainer does not read

    with pytest.raises(TypeError, match="evals_to_keep"):
        MoreSettings.from_trainer(trainer)
