"""The preference layouts other tools keep their data in, written here from those layouts' documentation:
ShareGPT / LLaMA-Factory, TRL's standard rows with an implicit prompt, Alpaca, any file through a column
mapping; the layout detected from the first row; conversations tokenized as their chat template renders them
(every model family's template: tests/test_chat_families.py)."""
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT
from dpo_exp.data import PreferencePair, tokenize_pair
from dpo_exp.data.formats import DataFileError, detect, load

SMOLLM2 = ROOT / "outputs" / "models" / "SmolLM2-135M-Instruct"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def turn(who, text):
    return {"from": who, "value": text}


SHAREGPT = [  # LLaMA-Factory's preference layout (ranking: true): prompt turns, then one chosen and one rejected turn
    {"conversations": [turn("human", "hi there")], "chosen": turn("gpt", "Hello!"), "rejected": turn("gpt", "Go.")},
    {"conversations": [turn("human", "hi"), turn("gpt", "hello"), turn("human", "there")], "system": "Be kind.",
     "chosen": turn("gpt", "Yes?"), "rejected": turn("gpt", "What.")},
    {"conversations": [turn("human", "weather?"), turn("function_call", '{"name": "w"}'),
                       turn("observation", "sunny")], "chosen": turn("gpt", "Sunny."), "rejected": turn("gpt", "Rain.")},
]


def test_sharegpt_rows_are_rendered_with_the_chat_template(tmp_path, chat_tokenizer):
    result = load("auto", path=str(write_jsonl(tmp_path / "dpo_en_demo.jsonl", SHAREGPT)), tokenizer=chat_tokenizer)
    assert result.layout == "sharegpt" and result.detected and "[sharegpt layout, detected" in result.summary()
    first = result.pairs[0]
    assert (first.prompt, first.chosen, first.rejected) == ("<|user|>\nhi there\n<|assistant|>\n", "Hello!", "Go.")
    assert result.pairs[1].prompt == ("<|system|>\nBe kind.\n<|user|>\nhi\n<|assistant|>\nhello<eos>\n<|user|>\n"
                                      "there\n<|assistant|>\n")  # the system field is kept, first
    assert result.pairs[2].prompt == ('<|user|>\nweather?\n<|assistant|>\n{"name": "w"}<eos>\n<|tool|>\nsunny\n'
                                      "<|assistant|>\n")  # function_call is the assistant's, observation a tool turn
    sft = load("sharegpt", path=str(tmp_path / "dpo_en_demo.jsonl"), tokenizer=chat_tokenizer, kind="sft")
    assert [p.chosen for p in sft.pairs] == ["Hello!", "Yes?", "Sunny."]


@pytest.mark.parametrize("row,reason,detail", [
    ({"conversations": [turn("human", "q")], "chosen": turn("gpt", "a"), "rejected": turn("human", "b")},
     "bad_messages:rejected", "from='human'"),
    ({"conversations": [turn("narrator", "q")], "chosen": turn("gpt", "a"), "rejected": turn("gpt", "b")},
     "bad_messages:conversations", "unknown role from='narrator'"),
    ({"conversations": [turn("human", "q"), turn("gpt", "a")], "chosen": turn("gpt", "a"), "rejected": turn("gpt", "b")},
     "bad_messages:conversations", "ends with an assistant turn"),
    ({"conversations": [], "chosen": turn("gpt", "a"), "rejected": turn("gpt", "b")},
     "bad_messages:conversations", "non-empty list"),
    ({"conversations": [turn("human", "q")], "chosen": turn("gpt", " "), "rejected": turn("gpt", "b")},
     "empty:chosen", "empty response"),
    ({"conversations": [turn("human", "q")], "chosen": turn("gpt", "same"), "rejected": turn("gpt", "same")},
     "chosen_equals_rejected", "identical"),
])
def test_bad_sharegpt_rows_are_skipped_by_reason_or_named(tmp_path, chat_tokenizer, row, reason, detail):
    path = write_jsonl(tmp_path / "prefs.jsonl", [SHAREGPT[0], row])
    result = load("sharegpt", path=str(path), tokenizer=chat_tokenizer)
    assert len(result.pairs) == 1 and result.skipped == {reason: 1}
    field = reason.split(":")[1] if ":" in reason else "rejected"
    with pytest.raises(DataFileError, match=re.escape(f"{path}: line 2: field '{field}': ") + ".*" + re.escape(detail)):
        load("sharegpt", path=str(path), tokenizer=chat_tokenizer, on_invalid="error")


def test_trl_standard_rows_with_an_implicit_prompt_split_at_a_word(tmp_path):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five"},
            {"chosen": "same", "rejected": "same"},
            {"chosen": "Yes", "rejected": "No"}]
    result = load("auto", path=str(write_jsonl(tmp_path / "implicit.jsonl", rows)))
    assert result.layout == "pairs"
    assert result.pairs == [PreferencePair("The sky is", " blue.", " green."), PreferencePair("Q: 2+2? A:", " 4", " five")]
    assert result.skipped == {"chosen_equals_rejected": 1, "missing_key:prompt": 1}


def test_alpaca_rows_with_and_without_a_chat_template(tmp_path, chat_tokenizer):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "chosen": "5", "rejected": "6"},
            {"instruction": "Say hi", "input": "", "chosen": "hi", "rejected": "bye", "system": "Be brief."}]
    path = tmp_path / "alpaca.json"  # a JSON array, as LLaMA-Factory's and Alpaca's files are
    path.write_text(json.dumps(rows, indent=2))
    plain = load("auto", path=str(path))
    assert plain.layout == "alpaca"
    assert plain.pairs[0].prompt == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    assert plain.pairs[1] == PreferencePair("### Instruction:\nSay hi\n\n### Response:\n", "hi", "bye")
    chat = load("alpaca", path=str(path), tokenizer=chat_tokenizer)
    assert chat.pairs[0].prompt == "<|user|>\nAdd the numbers.\n\n2 and 3\n<|assistant|>\n"
    assert chat.pairs[1].prompt == "<|system|>\nBe brief.\n<|user|>\nSay hi\n<|assistant|>\n"


def test_other_column_names_through_a_mapping(tmp_path):
    """The SHP-style question / response_j / response_k layout (j preferred), renamed in config."""
    rows = [{"question": "Why?", "response_j": " Because.", "response_k": " No idea."},
            {"question": "How?", "response_j": "", "response_k": " Somehow."}]
    path = write_jsonl(tmp_path / "stack.jsonl", rows)
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    result = load("auto", path=str(path), columns=columns)
    assert result.pairs == [PreferencePair("Why?", " Because.", " No idea.")] and result.skipped == {"empty:chosen": 1}
    with pytest.raises(DataFileError, match=re.escape("line 2: field 'response_j' (data.columns.chosen): empty text")):
        load("auto", path=str(path), columns=columns, on_invalid="error")
    with pytest.raises(ValueError, match="data.columns: promt is not a field"):
        load("auto", path=str(path), columns={"promt": "question"})


def test_an_unknown_layout_lists_the_columns_and_the_layouts_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "stack.jsonl", [{"question": "Why?", "response_j": "a", "response_k": "b"}])
    with pytest.raises(DataFileError) as err:
        load("auto", path=str(path))
    message = str(err.value)
    assert f"{path}: line 1: its columns ['question', 'response_j', 'response_k'] fit no known layout" in message
    assert "sharegpt: conversations" in message and "data.columns.prompt=question" in message


def test_detection_tells_the_published_layouts_apart():
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    assert detect(hh) == ["hh"]
    assert detect({"prompt": "p", "chosen": "a", "rejected": "b"}) == ["pairs"]
    assert detect({"chosen": [{"role": "user", "content": "q"}], "rejected": []}) == ["pairs"]
    assert detect(SHAREGPT[0]) == ["sharegpt"]
    assert detect({"instruction": "i", "chosen": "a", "rejected": "b"}) == ["alpaca"]
    assert detect({"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}) == ["shp"]
    assert detect({"query": "q", "reference_responses": "r", "preferred": ""}) == ["tldr"]
    assert detect({"text": "a review"}) == []


def test_a_conversations_responses_end_as_its_template_ends_them_with_no_eos_appended(tmp_path, chat_tokenizer):
    """A conversation's response tokens are the template's, its one EOS included (none is appended); a text pair
    still gets its EOS at tokenization, as the DPO authors gave it."""
    pair = load("auto", path=str(write_jsonl(tmp_path / "p.jsonl", SHAREGPT[:1])), tokenizer=chat_tokenizer).pairs[0]
    eos = chat_tokenizer.eos_token_id
    for tok in (tokenize_pair(chat_tokenizer, pair, 0, max_length=32, max_prompt_length=16),
                tokenize_pair(chat_tokenizer, PreferencePair(pair.prompt, "there", "hi hi"), 0, 32, 16)):
        for response in (tok.chosen_ids, tok.rejected_ids):
            assert response[-1] == eos and response.count(eos) == 1


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer_config.json").exists(),
                    reason="SmolLM2-135M-Instruct not fetched (python scripts/fetch_smollm2.py)")
def test_smollm2s_template_tokenizes_a_pair_as_it_renders_the_whole_conversation(tmp_path):
    """Prompt + response is token for token the template's own rendering of the conversation with the
    assistant's answer, as apply_chat_template tokenizes it at inference: the generation prompt opens the answer,
    and the response runs through the template's end of turn (<|im_end|>) and the newline it writes after it."""
    from dpo_exp.models import load_tokenizer

    tokenizer = load_tokenizer(str(SMOLLM2))
    rows = [{"conversations": [turn("human", "What is 2+2?")], "system": "You answer in one word.",
             "chosen": turn("gpt", "Four."), "rejected": turn("gpt", "Five, I think.")}]
    pair = load("auto", path=str(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer=tokenizer).pairs[0]
    assert pair.prompt.endswith("<|im_start|>assistant\n") and "You answer in one word." in pair.prompt
    tok = tokenize_pair(tokenizer, pair, 0, max_length=256, max_prompt_length=128)
    for answer, ids in (("Four.", tok.chosen_ids), ("Five, I think.", tok.rejected_ids)):
        whole = tokenizer.apply_chat_template(
            [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "What is 2+2?"},
             {"role": "assistant", "content": answer}], tokenize=True)["input_ids"]
        assert tok.prompt_ids + ids == whole
        assert ids.count(tokenizer.eos_token_id) == 1 and ids[-2] == tokenizer.eos_token_id  # <|im_end|>, "\n"
