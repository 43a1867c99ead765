"""Shared prompts and padding-free packing give the log-probs (and gradients) of the plain left-padded layout."""
import pytest
import torch

from dpo_exp.data import PairLayout, PreferencePair, TokenizedPair, collate_pairs, tokenize_pair
from dpo_exp.models import PairLogps, sequence_logps

LAYOUTS = {"shared": PairLayout(share_prompt=True), "packed": PairLayout(pack=True),
           "shared+packed": PairLayout(share_prompt=True, pack=True),
           "packed, 12-token rows": PairLayout(share_prompt=True, pack=True, pack_length=12)}


def tiny_model(arch: str, attention: str):
    """Float32, as the issue's tolerance is stated; GPT-2's learned absolute positions make a wrong position
    restart visible, Llama's rotary ones a wrong mask."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = attention
    return model.float().eval()


PAIRS = [TokenizedPair(0, [1, 5, 6], [7, 9, 2], [8, 2]),
         TokenizedPair(1, [1], [4, 2], [3, 3, 3, 2]),          # a one-token (empty text) prompt
         TokenizedPair(2, [1, 5, 6, 7, 8, 9, 10], [11, 2], [12, 13, 2]),
         TokenizedPair(3, [1, 4], [2], [5, 6, 7, 8, 9, 2])]   # an EOS-only response


def pair_logps(model, pairs, layout, with_rejected=True) -> PairLogps:
    return PairLogps.split(sequence_logps(model, collate_pairs(pairs, 0, with_rejected, layout)), with_rejected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_gives_the_padded_log_probs_and_gradients(arch, attention, name):
    model = tiny_model(arch, attention)
    expected = pair_logps(model, PAIRS, PairLayout())
    (expected.chosen.sum() - 2 * expected.rejected.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = pair_logps(model, PAIRS, LAYOUTS[name])
    (got.chosen.sum() - 2 * got.rejected.sum()).backward()
    torch.testing.assert_close(got.chosen, expected.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.rejected, expected.rejected, rtol=0, atol=1e-5)
    assert got.chosen_length.tolist() == [3, 2, 2, 1] and got.rejected_length.tolist() == [2, 4, 3, 6]
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5)


def test_a_shared_prompt_runs_the_prompt_once_and_packing_leaves_no_padding():
    padded = collate_pairs(PAIRS, 0)
    shared = collate_pairs(PAIRS, 0, layout=LAYOUTS["shared"])
    packed = collate_pairs(PAIRS, 0, layout=PairLayout(share_prompt=True, pack=True, pack_length=20))
    assert padded.input_ids.shape == (8, 10) and shared.input_ids.shape == (4, 12)
    # blocks of 8, 7, 12 and 9 tokens, first fit decreasing into 20-token rows: pairs 0 and 2, pairs 1 and 3
    assert packed.input_ids.shape == (2, 20) and packed.attention_mask.diagonal(dim1=1, dim2=2).all()
    assert packed.position_ids[0].tolist() == list(range(6)) + [3, 4] + list(range(9)) + [7, 8, 9]
    assert not packed.attention_mask[0, 8:, :8].any()  # the second block sees nothing of the first
    # the pair with the 7-token prompt: the rejected response continues the prompt's positions, sees no chosen token
    row = shared.input_ids[2].tolist()
    assert row[:12] == [1, 5, 6, 7, 8, 9, 10, 11, 2, 12, 13, 2]
    assert shared.position_ids[2, :12].tolist() == list(range(9)) + [7, 8, 9]
    mask = shared.attention_mask[2]
    assert mask[9, :7].all() and not mask[9, 7:9].any() and mask[9, 9]  # rejected: prompt and itself
    assert not mask[7, 9:].any()                                           # chosen never sees the rejected one


@pytest.mark.parametrize("keep_prompt_end", [True, False])
def test_truncated_and_empty_prompts_give_the_padded_log_probs(chat_tokenizer, keep_prompt_end):
    """Prompts cut to max_prompt_length from either end, responses cut to max_length, an empty prompt (the
    tokenizer's start token alone): every layout still agrees."""
    model = tiny_model("llama", "sdpa")
    texts = [PreferencePair("hi there hi there hi there hi", "there hi", "hi hi hi there there"),
             PreferencePair("", "hi", "there there"),
             PreferencePair("there", "hi hi hi hi hi hi hi hi", "there")]
    pairs = [tokenize_pair(chat_tokenizer, p, i, max_length=8, max_prompt_length=4, keep_prompt_end=keep_prompt_end)
             for i, p in enumerate(texts)]
    assert len(pairs[0].prompt_ids) == 4 and len(pairs[2].prompt_ids) + len(pairs[2].chosen_ids) == 8
    expected = pair_logps(model, pairs, PairLayout())
    for layout in LAYOUTS.values():
        got = pair_logps(model, pairs, layout)
        torch.testing.assert_close(torch.cat([got.chosen, got.rejected]),
                                   torch.cat([expected.chosen, expected.rejected]), rtol=0, atol=1e-5)


def test_chosen_only_batches_pack_too():
    model = tiny_model("gpt2", "sdpa")
    expected = pair_logps(model, PAIRS, PairLayout(), with_rejected=False)
    got = pair_logps(model, PAIRS, PairLayout(share_prompt=True, pack=True), with_rejected=False)
    assert got.rejected is None
    torch.testing.assert_close(got.chosen, expected.chosen, rtol=0, atol=1e-5)


def test_an_attention_that_takes_no_mask_is_a_clear_error():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot share a prompt"):
        pair_logps(model, PAIRS, LAYOUTS["shared"])
    model.config._attn_implementation = "some_kernel"
    with pytest.raises(ValueError, match="trainer.share_prompt / trainer.pack need model.attn_implementation"):
        pair_logps(model, PAIRS, LAYOUTS["packed"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packing_for_flash_attention_is_one_row_told_apart_by_positions(arch, monkeypatch):
    """FlashAttention takes no mask: packed pairs reach it as one row without padding, the sequences told apart by
    their restarting positions (transformers' variable-length path). sdpa reads such a row the same way (it builds
    the block-diagonal mask from the positions), so running sdpa through that path checks the inputs here."""
    from dpo_exp.models import logps

    model = tiny_model(arch, "sdpa")
    expected = pair_logps(model, PAIRS, PairLayout())
    (expected.chosen.sum() - 2 * expected.rejected.sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    seen = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: seen.append(kw) or real_forward(**kw))
    monkeypatch.setattr(logps, "VARLEN_ATTENTION", ("sdpa",))
    got = pair_logps(model, PAIRS, PairLayout(pack=True, pack_length=12))
    (got.chosen.sum() - 2 * got.rejected.sum()).backward()
    assert seen[0]["attention_mask"] is None
    assert seen[0]["input_ids"].shape == (1, sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids)
                                                for p in PAIRS))  # every token once, no padding
    torch.testing.assert_close(torch.cat([got.chosen, got.rejected]), torch.cat([expected.chosen, expected.rejected]),
                               rtol=0, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5)


def test_flex_attention_runs_the_layouts_with_a_block_mask():
    """Flex attention gets the layouts' rule as a BlockMask (GPU: empty blocks skipped). torch has no flex backward
    on the CPU, so here the forward pass alone (π_ref's and evaluation's log-probs) against padded sdpa."""
    from torch.nn.attention.flex_attention import BlockMask

    from dpo_exp.models import logps

    model = tiny_model("llama", "sdpa")
    with torch.no_grad():
        expected = pair_logps(model, PAIRS, PairLayout())
        model.config._attn_implementation = "flex_attention"
        for name in ("shared", "shared+packed"):
            batch = collate_pairs(PAIRS, 0, True, LAYOUTS[name])
            assert isinstance(logps._model_inputs(model, batch, torch.device("cpu"))["attention_mask"], BlockMask)
            got = PairLogps.split(sequence_logps(model, batch), True)
            torch.testing.assert_close(torch.cat([got.chosen, got.rejected]),
                                       torch.cat([expected.chosen, expected.rejected]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_a_run_with_shared_prompts_packing_and_token_budgets_trains_as_the_padded_one(smoke_cfg, tmp_path, loss,
                                                                                     monkeypatch):
    """The same steps: the loop's per-pair (DPO) and per-token (SFT) means depend neither on the layout nor on
    micro-batches cut by a token budget (trainer.micro_batch_tokens)."""
    from conftest import read_jsonl
    from dpo_exp import train

    from dpo_exp.loop import Loop

    parts = []
    real = Loop.micro_batches

    def counting(self, step_batch):
        out = real(self, step_batch)
        parts.append(len(out))
        return out

    monkeypatch.setattr(Loop, "micro_batches", counting)
    runs = {}
    for name, extra in (("padded", ["trainer.share_prompt=false"]), ("packed", ["trainer.share_prompt=true", "trainer.pack=true"]),
                        ("by tokens", ["trainer.share_prompt=true", "trainer.pack=true", "trainer.micro_batch_tokens=64"])):
        parts.clear()
        cfg = smoke_cfg(f"loss={loss}", "trainer.max_steps=4", "trainer.eval_every=2",
                        f"paths.output_dir={tmp_path / name}", *extra)
        train.run(cfg)
        runs[name] = ([r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "train/loss" in r], parts[-4:])  # π_SFT: cached
    assert len(runs["padded"][0]) == 4 and runs["padded"][1] == [1] * 4
    assert min(runs["by tokens"][1]) > 1  # the token budget cut every step into several micro-batches
    for name in ("packed", "by tokens"):
        for a, b in zip(runs["padded"][0], runs[name][0]):
            assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", [PairLayout(), PairLayout(share_prompt=True, pack=True)], ids=["padded", "packed"])
def test_the_loops_flop_count_is_torchs_flop_counter_total(attention, layout):
    """dpo_exp.loop.FlopCount (no per-module hooks) counts what torch's FlopCounterMode counts, forward and
    backward, and the default layout (prompts shared with sdpa or eager) executes fewer FLOPs than the padded one."""
    from torch.utils.flop_counter import FlopCounterMode

    from dpo_exp.loop import FlopCount

    model = tiny_model("llama", attention)

    def step():
        pair_logps(model, PAIRS, layout).chosen.sum().backward()

    with FlopCounterMode(display=False) as reference:
        step()
    with FlopCount() as ours:
        step()
    assert ours.get_total_flops() == reference.get_total_flops() > 0
    with FlopCount() as shared:
        pair_logps(model, PAIRS, PairLayout(share_prompt=True)).chosen.sum().backward()
    with FlopCount() as padded:
        pair_logps(model, PAIRS, PairLayout()).chosen.sum().backward()
    assert shared.get_total_flops() < padded.get_total_flops()


def test_prompts_are_shared_by_default_where_the_attention_takes_a_mask():
    from dpo_exp.config import TrainerConfig

    default = TrainerConfig()
    assert PairLayout.of(default, "sdpa").share_prompt and PairLayout.of(default, "eager").share_prompt
    assert not PairLayout.of(default, "flash_attention_2").share_prompt  # no mask: padded rows
    assert not PairLayout.of(TrainerConfig(share_prompt=False), "sdpa").share_prompt


@pytest.mark.parametrize("name", LAYOUTS)
def test_per_token_log_probs_and_their_mask_agree_across_layouts(name):
    """What custom algorithms read (tests/test_registry.py): per-token log-probs and `mask` marking where they are;
    a padded batch right-aligns responses and a shared one left-aligns them, but the masked values are the same."""
    model = tiny_model("llama", "sdpa")
    padded = sequence_logps(model, collate_pairs(PAIRS, 0, True, PairLayout()), per_token=True)
    other = sequence_logps(model, collate_pairs(PAIRS, 0, True, LAYOUTS[name]), per_token=True)
    assert padded.mask.sum(-1).tolist() == other.mask.sum(-1).tolist() == padded.lengths.tolist()
    torch.testing.assert_close(other.tokens[other.mask], padded.tokens[padded.mask], rtol=0, atol=1e-5)
    assert (other.tokens[~other.mask] == 0).all()
