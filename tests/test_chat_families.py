"""Conversations train on the tokens each model family reads at inference (issue 26, item 3).

For every chat family of tests/families.py (Llama 3.1, Qwen2.5, Mistral v0.3, Gemma 2 and 3, Phi-3, Phi-4,
SmolLM2), every conversational layout `data=pairs` detects (TRL messages with a prompt and with TRL's implicit
prompt, ShareGPT / LLaMA-Factory, Alpaca) and single- and multi-turn rows with and without a system message:
prompt + chosen (and prompt + rejected) is token for token `apply_chat_template(conversation + [answer],
tokenize=True)`, or the row is refused by reason where the family's template refuses it. Then where responses
end: sampling stops at every end-of-turn id of the generation config, the tokenizer's EOS and the template's end
of turn, and everything that asks whether a response ended (truncated counts, PPO's missing-EOS penalty, the
reward model's score position) reads the same set.
"""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from families import CHAT_FAMILIES, CONVERSATIONS, LAYOUTS, assert_tokens_as_at_inference, family
from dpo_exp.data import prompt_token_ids
from dpo_exp.data.chat import end_of_turn_id
from dpo_exp.data.formats import DataFileError, load
from dpo_exp.evaluation import truncated_fraction
from dpo_exp.models import sample, stop_token_ids


def write_row(tmp_path, *rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def refuses(spec, conversation) -> bool:
    """The family's template cannot give this row training tokens: Gemma 2 refuses a system message; Mistral's
    keeps it only while a user turn is last, so the prompt is not the start of the answered conversation."""
    return conversation.system is not None and spec.system in ("refused", "dropped_once_answered")


# every layout with every conversation it can hold (Alpaca: one user turn)
ROWS = [(layout, name) for layout in sorted(LAYOUTS) for name in sorted(CONVERSATIONS)
        if LAYOUTS[layout][0](CONVERSATIONS[name]) is not None]


@pytest.mark.parametrize("layout,conversation", ROWS)
@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_prompt_and_response_tokens_are_the_familys_template_rendering(tmp_path, name, layout, conversation):
    fam, conv = family(name), CONVERSATIONS[conversation]
    make_row, field = LAYOUTS[layout]
    row = make_row(conv)
    if refuses(fam.spec, conv):  # skipped by reason after a row the template takes (the same without the system)
        path = write_row(tmp_path, make_row(dataclasses.replace(conv, system=None)), row)
        result = load("auto", path=str(path), tokenizer=fam.tokenizer)
        assert len(result.pairs) == 1 and result.skipped == {f"bad_messages:{field}": 1}
        with pytest.raises(DataFileError, match=f"line 2: field '{field}': "):
            load("auto", path=str(path), tokenizer=fam.tokenizer, on_invalid="error")
        return
    path = write_row(tmp_path, row)
    result = load("auto", path=str(path), tokenizer=fam.tokenizer)
    assert result.skipped == {}
    pair = result.pairs[0]
    assert_tokens_as_at_inference(fam.tokenizer, conv, pair)
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids.count(fam.end_of_turn_id) == 1  # the template's own end of turn, once; no EOS appended
    sft = load("auto", path=str(path), tokenizer=fam.tokenizer, kind="sft").pairs[0]
    assert (sft.prompt_ids, sft.chosen_ids, sft.rejected) == (pair.prompt_ids, pair.chosen_ids, None)


def pair_of(name, conversation="single_system", layout="sharegpt", tmp_path=None):
    fam, conv = family(name), CONVERSATIONS[conversation]
    path = write_row(tmp_path, LAYOUTS[layout][0](conv))
    return fam, load("auto", path=str(path), tokenizer=fam.tokenizer).pairs[0]


def tokens(fam, ids):
    return fam.tokenizer.convert_ids_to_tokens(ids)


def test_llama3s_template_writes_the_one_bos(tmp_path):
    """Llama 3's template writes <|begin_of_text|> and its tokenizer adds it to a text: the prompt holds it once
    (the tokenizer's own special tokens would have given a second)."""
    fam, pair = pair_of("llama3.1", tmp_path=tmp_path)
    bos = fam.tokenizer.bos_token_id
    assert pair.prompt_ids[0] == bos and pair.prompt_ids.count(bos) == 1
    assert fam.tokenizer(pair.prompt)["input_ids"][:2] == [bos, bos]  # what adding special tokens gives
    assert prompt_token_ids(fam.tokenizer, pair.prompt).count(bos) == 1
    assert tokens(fam, pair.chosen_ids)[-1] == "<|eot_id|>"


def test_a_plain_text_prompt_keeps_the_tokenizers_special_tokens():
    """Text rows (hh, tldr, imdb, sampled prompts) are read as before: a Llama-style tokenizer gives them its BOS;
    only a text that begins with a special token (a template's) is taken as already formatted."""
    tok = family("llama2-base").tokenizer
    assert prompt_token_ids(tok, "\n\nHuman: hi there\n\nAssistant:") == tok("\n\nHuman: hi there\n\nAssistant:")["input_ids"]
    assert prompt_token_ids(tok, "hi there")[0] == tok.bos_token_id
    assert prompt_token_ids(tok, "<s>hi there").count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name,ending", [
    ("qwen2.5", ["<|im_end|>", "Ċ"]), ("smollm2", ["<|im_end|>", "Ċ"]), ("gemma-2", ["<end_of_turn>", "\n"]),
    ("gemma-3", ["<end_of_turn>", "\n"]), ("phi-3", ["<|end|>", "<|endoftext|>"]), ("phi-4", ["<|im_end|>"]),
    ("mistral-v0.3", ["</s>"]), ("llama3.1", ["<|eot_id|>"])])
def test_a_response_ends_as_the_template_ends_the_turn(tmp_path, name, ending):
    """What a template writes after its end of turn belongs to the response: Qwen's and Gemma's newline; Phi-3's
    newline is swallowed by <|end|> (rstrip) and a whole conversation ends with EOS."""
    fam, pair = pair_of(name, conversation="multi", layout="trl_prompt", tmp_path=tmp_path)
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert tokens(fam, ids)[-len(ending):] == ending


def test_qwen_gives_its_default_system_prompt_and_gemma3_folds_a_system_message(tmp_path):
    _, qwen = pair_of("qwen2.5", conversation="single", tmp_path=tmp_path)
    assert qwen.prompt.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                                  "assistant.<|im_end|>\n<|im_start|>user\n")
    _, gemma = pair_of("gemma-3", conversation="single_system", tmp_path=tmp_path)
    assert gemma.prompt == ("<bos><start_of_turn>user\nYou answer in one word.\n\nWhat is 2+2?<end_of_turn>\n"
                            "<start_of_turn>model\n")
    assert pair_of("qwen2.5", conversation="single", tmp_path=tmp_path)[1].prompt_ids[0] != 0  # no BOS: <|im_start|>


def test_a_refused_row_says_why(tmp_path):
    fam, conv = family("gemma-2"), CONVERSATIONS["single_system"]
    path = write_row(tmp_path, LAYOUTS["sharegpt"][0](conv))  # the first row: the error is raised before any check
    with pytest.raises(DataFileError, match="field 'conversations': refused by the chat template: System role not"):
        load("auto", path=str(path), tokenizer=fam.tokenizer, on_invalid="error")
    fam = family("mistral-v0.3")
    with pytest.raises(DataFileError, match="renders the prompt differently once the answer follows it"):
        load("auto", path=str(path), tokenizer=fam.tokenizer, on_invalid="error")
    assert load("auto", path=str(write_row(tmp_path, LAYOUTS["sharegpt"][0](CONVERSATIONS["multi"]))),
                tokenizer=fam.tokenizer).pairs  # without a system message Mistral's rows train


def test_a_template_whose_answer_merges_with_its_prompt_is_a_clear_error(tmp_path):
    """A generation prompt ending in a space: a SentencePiece-style tokenizer joins it to the answer's first word
    ("▁Four."), so no tokens are both the prompt and the answer's start."""
    fam = family("llama2-base")
    fam.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                                   "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    path = write_row(tmp_path, LAYOUTS["trl_prompt"][0](CONVERSATIONS["single_system"]))
    with pytest.raises(DataFileError, match=r"field 'prompt': the answer's first characters merge with the prompt's "
                                            r"last into one token \(' Four.'\)"):
        load("auto", path=str(path), tokenizer=fam.tokenizer, on_invalid="error")


def test_a_template_that_never_ends_a_turn_is_an_error(tmp_path):
    fam = family("gpt2")
    fam.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                                   "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    path = write_row(tmp_path, LAYOUTS["trl_prompt"][0](CONVERSATIONS["single"]))
    with pytest.raises(DataFileError, match="ends an assistant turn with no special token.*would never stop"):
        load("auto", path=str(path), tokenizer=fam.tokenizer)


# ---- where a response ends ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CHAT_FAMILIES)
def test_the_stop_tokens_are_the_generation_configs_eos_ids_the_eos_and_the_end_of_turn(name):
    from transformers import GenerationConfig

    fam = family(name)
    assert end_of_turn_id(fam.tokenizer) == fam.end_of_turn_id  # read from the template's rendering
    stops = stop_token_ids(fam.tokenizer, GenerationConfig(eos_token_id=fam.generation_eos))
    assert len(stops) == len(set(stops))
    assert set(stops) == {*fam.generation_eos, fam.tokenizer.eos_token_id, fam.end_of_turn_id}
    if name == "llama3.1":  # [128001, 128008, 128009] in the real vocabulary
        assert set(tokens(fam, stops)) == {"<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"}


class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM whose generate() continues each prompt with a scripted row (padding after it) and
    records what it was asked."""

    def __init__(self, continuations: list[list[int]], eos_ids: list[int], pad: int):
        from transformers import GenerationConfig

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig(eos_token_id=eos_ids)
        self.continuations, self.pad, self.calls = continuations, pad, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append(kwargs)
        rows = [row[:max_new_tokens] + [self.pad] * (max_new_tokens - len(row[:max_new_tokens]))
                for row in self.continuations[:input_ids.shape[0]]]
        self.continuations = self.continuations[input_ids.shape[0]:]
        return torch.cat([input_ids, torch.tensor(rows, dtype=torch.long)], 1)


@pytest.mark.parametrize("name", ["llama3.1", "qwen2.5", "gemma-2", "phi-3"])
def test_sampling_stops_at_every_stop_token_and_says_which_responses_ended(name):
    fam = family(name)
    tok = fam.tokenizer
    stops = stop_token_ids(tok, SimpleNamespace(eos_token_id=fam.generation_eos))
    word = tok.convert_tokens_to_ids(tok.tokenize("hello")[0])
    scripted = [[word, word, stop, word, word] for stop in stops] + [[word] * 5]  # one row per stop; one cut
    model = ScriptedModel(scripted, fam.generation_eos, tok.pad_token_id if tok.pad_token_id is not None else 0)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    out = sample(model, tok, [[word]] * len(scripted), max_new_tokens=5, temperature=0)
    assert set(model.calls[0]["eos_token_id"]) == set(stops)  # generate stops at each of them too
    assert out.response_ids == [[word, word, stop] for stop in stops] + [[word] * 5]
    assert out.ended == [True] * len(stops) + [False]
    assert truncated_fraction(out) == pytest.approx(1 / len(scripted))
    assert all("<" not in text for text in out.texts)  # stop tokens are not part of the text


def test_the_reward_model_reads_its_score_where_a_sample_stops():
    """Qwen's template writes a newline after <|im_end|>; a sample stops at <|im_end|>. The reward model scores both
    at <|im_end|> (its end ids: the policy's stop tokens), so pairs and samples are scored at the same token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_exp.data import collate_sequences
    from dpo_exp.models import ScalarHeadModel

    fam = family("qwen2.5")
    tok = fam.tokenizer
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    end, newline = fam.end_of_turn_id, tok.convert_tokens_to_ids("Ċ")
    prompt, answer = [fam.id("<|im_start|>"), 40, 41], [50, 51, end]
    batch = collate_sequences([prompt, prompt], [answer + [newline], answer], pad_id=tok.pad_token_id)
    scored = ScalarHeadModel(backbone, end_ids=stop_token_ids(tok, SimpleNamespace(eos_token_id=fam.generation_eos)))
    with torch.no_grad():
        written, sampled = scored.raw_score(batch).tolist()
        assert written == pytest.approx(sampled, abs=1e-5)
        scored.end_ids = []  # none: the last token, the newline for the first row
        last = scored.raw_score(batch).tolist()
    assert last[1] == pytest.approx(sampled, abs=1e-5) and abs(last[0] - written) > 1e-6
