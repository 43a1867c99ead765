"""dpo_exp.data.formats and .files: each dataset on small files written here in its published hub format, the
real samples in ../shared/data (skipped when absent), and every kind of defect, skipped and
counted or raised with file, line/row and field."""
import gzip
import json
import re
from pathlib import Path

import pytest

from dpo_exp.data import PreferencePair
from dpo_exp.data.files import DataFileError, read_rows
from dpo_exp.data.formats import check_lengths, load

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data sample {path} is absent: ../shared/data exists on the project's "
                    "machines only, not in a user's clone")
    return path


def write_jsonl(path: Path, rows) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_csv(path: Path, rows) -> Path:
    import csv

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_json(path: Path, doc) -> Path:
    text = json.dumps(doc)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def assert_skipped_and_raised(tmp_path, name, rows, reason, field, where="line 2", **kwargs):
    """rows[1] is the defect: skipped under `reason`, or named (file, line, field) on error."""
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    result = load(name, path=str(path), **kwargs)
    assert result.skipped == {reason: 1}
    assert result.rows == len(rows) and len(result.pairs) == len(rows) - 1
    with pytest.raises(DataFileError, match=re.escape(f"{path}: {where}: field '{field}': ")):
        load(name, path=str(path), on_invalid="error", **kwargs)


# ---------------------------------------------------------------------------------------------
# Reading files

ROWS = [{"prompt": "p1", "chosen": " a", "rejected": " b"},
        {"prompt": "two\nlines", "chosen": "c", "rejected": "d"}]


@pytest.mark.parametrize("suffix,numbers", [
    (".jsonl", [1, 2]), (".jsonl.gz", [1, 2]), (".json", [1, 2]), (".json.gz", [1, 2]),
    (".csv", [2, 3]), (".csv.gz", [2, 3]),  # header is line 1; the 2nd record starts on line 3
    (".parquet", [1, 2]),
])
def test_read_rows_every_format(tmp_path, suffix, numbers):
    path = tmp_path / f"pairs{suffix}"
    if ".jsonl" in suffix:
        write_jsonl(path, ROWS)
    elif ".json" in suffix:
        write_json(path, ROWS)
    elif ".csv" in suffix:
        write_csv(path, ROWS)
    else:
        write_parquet(path, ROWS)
    got = list(read_rows(str(path)))
    assert [n for n, _ in got] == numbers
    assert [row for _, row in got] == ROWS


def test_read_rows_numbers_are_file_lines(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], "", ROWS[1]])  # blank line 2 is skipped
    assert [n for n, _ in read_rows(jsonl)] == [1, 3]
    rows = [{"query": "first\npost\nTL;DR:", "x": "1"}, {"query": "second", "x": "2"}]
    csv_path = write_csv(tmp_path / "a.csv", rows)  # record 1 spans lines 2-4
    assert [n for n, _ in read_rows(csv_path)] == [2, 5]


def test_read_rows_json_variants(tmp_path):
    wrapped = write_json(tmp_path / "wrapped.json", {"data": ROWS})
    assert [row for _, row in read_rows(wrapped)] == ROWS
    # Dataset.to_json writes JSON Lines under a .json name.
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert [row for _, row in read_rows(lines)] == ROWS


def test_malformed_jsonl_line_names_path_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], '{"prompt": "x", "chosen": ', ROWS[1]])
    with pytest.raises(DataFileError, match=re.escape(f"{path}: line 2: not valid JSON: ")):
        list(read_rows(path))
    with pytest.raises(DataFileError, match=re.escape(f"{path}: line 2: not valid JSON: ")):
        load("pairs", path=str(path))  # skip mode does not hide a file that does not parse


@pytest.mark.parametrize("name,content,message", [
    ("list.jsonl", b'{"a": "1"}\n[1, 2]\n', "line 2: expected a JSON object, got a list"),
    ("latin1.jsonl", b'{"a": "1"}\n{"a": "caf\xe9"}\n', "line 2: not UTF-8 text"),
    ("bad.json", b'[{"a": "1"},\n {"a": ]', "line 2: not valid JSON"),
    ("scalar.json", b'"text"', "expected a list of objects"),
    ("plain.jsonl.gz", b'{"a": "1"}\n', "not a readable gzip file"),
    ("short.csv", b'prompt,chosen,rejected\np,c,r\np,c\n', "line 3: 2 fields, but the header has 3"),
    ("garbage.parquet", b"not parquet at all", "not a valid parquet file"),
])
def test_unparseable_files(tmp_path, name, content, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
        list(read_rows(path))


def test_unsupported_or_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="unsupported file type"):
        read_rows(tmp_path / "pairs.txt")
    with pytest.raises(DataFileError, match="absent.jsonl: no such file"):
        read_rows(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------------------------------------
# hh (Anthropic/hh-rlhf layout)

HH_ROWS = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Sure, how about Miso?",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Cats do not need names."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
               "\n\nAssistant: Why did the chicken cross the road?",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
                 "\n\nAssistant: No."},
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Tofu.",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Dog."},
]


def test_hh_prompt_and_responses_split_exactly(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl.gz", HH_ROWS)
    result = load("hh", path=str(path))
    assert result.rows == 3 and result.skipped == {}
    assert result.pairs[0] == PreferencePair(
        prompt="\n\nHuman: What is a good name for a cat?\n\nAssistant:",
        chosen=" Sure, how about Miso?", rejected=" Cats do not need names.")
    # Multi-turn: the prompt runs to the LAST assistant turn, earlier turns included.
    assert result.pairs[1] == PreferencePair(
        prompt="\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:",
        chosen=" Why did the chicken cross the road?", rejected=" No.")


def test_hh_sft_one_example_per_prompt_last_row_wins(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    result = load("hh", path=str(path), kind="sft")
    assert result.pairs == [
        PreferencePair("\n\nHuman: What is a good name for a cat?\n\nAssistant:", " Maybe Tofu."),
        PreferencePair("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
                       "\n\nAssistant:", " Why did the chicken cross the road?"),
    ]
    assert result.skipped == {"duplicate_prompt": 1} and result.rows == 3


HH_OK = HH_ROWS[0]


@pytest.mark.parametrize("row,reason,field", [
    ({"rejected": HH_OK["rejected"]}, "missing_key:chosen", "chosen"),
    ({"chosen": HH_OK["chosen"]}, "missing_key:rejected", "rejected"),
    ({"chosen": 7, "rejected": HH_OK["rejected"]}, "not_a_string:chosen", "chosen"),
    ({"chosen": None, "rejected": HH_OK["rejected"]}, "not_a_string:chosen", "chosen"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant:", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo"},
     "empty:chosen", "chosen"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "   "}, "empty:rejected", "rejected"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hi\n\nAssistant: Yo "},
     "chosen_equals_rejected", "rejected"),
    ({"chosen": "Human: Hi. Assistant: Yo", "rejected": "x"}, "no_assistant_turn", "chosen"),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Yo", "rejected": "\n\nHuman: Hey\n\nAssistant: Yo"},
     "no_shared_prefix", "rejected"),
])
def test_hh_defects(tmp_path, row, reason, field):
    assert_skipped_and_raised(tmp_path, "hh", [HH_OK, row, HH_ROWS[1]], reason, field)


# ---------------------------------------------------------------------------------------------
# shp (stanfordnlp/SHP layout)

def shp_row(history, a, b, labels, score_a=None, score_b=None):
    row = {"post_id": "x", "domain": "askculinary_train", "history": history,
           "human_ref_A": a, "human_ref_B": b, "labels": labels}
    if score_a is not None:
        row.update(score_A=score_a, score_B=score_b)
    return row


SHP_ROWS = [
    shp_row("How long do I boil an egg?", "Nine minutes.", "Forever.", 1, 30, 5),
    shp_row("How long do I boil an egg?", "Ten.", "Six minutes for soft.", 0, 4, 40),
    shp_row("Is cast iron good?", "Yes.", "Yes, if seasoned.", 0, 10, 15),  # ratio 1.5
]


def test_shp_prompt_responses_and_score_ratio(tmp_path):
    path = write_jsonl(tmp_path / "shp.jsonl", SHP_ROWS)
    result = load("shp", path=str(path))
    assert result.pairs[0] == PreferencePair("\n\nHuman: How long do I boil an egg?\n\nAssistant:",
                                             " Nine minutes.", " Forever.")
    assert result.pairs[1].chosen == " Six minutes for soft." and result.pairs[1].rejected == " Ten."
    assert len(result.pairs) == 3 and result.skipped == {}

    filtered = load("shp", path=str(path), min_score_ratio=2)  # the authors' threshold
    assert len(filtered.pairs) == 2 and filtered.skipped == {"low_score_ratio": 1}
    # A filter, not a defect: error mode does not raise on it.
    assert load("shp", path=str(path), min_score_ratio=2, on_invalid="error").skipped == {"low_score_ratio": 1}


def test_shp_sft_target_is_highest_scoring_preferred_response(tmp_path):
    path = write_jsonl(tmp_path / "shp.jsonl", SHP_ROWS)
    result = load("shp", path=str(path), kind="sft")
    assert result.pairs[0] == PreferencePair("\n\nHuman: How long do I boil an egg?\n\nAssistant:",
                                             " Six minutes for soft.")  # score 40 beats 30
    assert len(result.pairs) == 2 and result.skipped == {"duplicate_prompt": 1}


def test_shp_from_csv_with_string_labels(tmp_path):
    path = write_csv(tmp_path / "shp.csv.gz", SHP_ROWS)  # every value comes back as text
    result = load("shp", path=str(path), min_score_ratio=2.0)
    assert [p.chosen for p in result.pairs] == [" Nine minutes.", " Six minutes for soft."]


@pytest.mark.parametrize("row,reason,field,kwargs", [
    (shp_row("q", "a", "b", 2), "bad_value:labels", "labels", {}),
    (shp_row("q", "a", "", 1), "empty:human_ref_B", "human_ref_B", {}),
    (shp_row("", "a", "b", 1), "empty:history", "history", {}),
    (shp_row("q", "same", "same", 0), "chosen_equals_rejected", "rejected", {}),
    (shp_row("q", "a", "b", 1, "many", 3), "bad_value:score_A", "score_A", {"min_score_ratio": 2}),
    (shp_row("q", "a", "b", 1, 0, 3), "bad_value:score_A", "score_A", {"min_score_ratio": 2}),
])
def test_shp_defects(tmp_path, row, reason, field, kwargs):
    ok = shp_row("q", "good", "bad", 1, 10, 1)
    assert_skipped_and_raised(tmp_path, "shp", [ok, row, ok], reason, field, **kwargs)


# ---------------------------------------------------------------------------------------------
# tldr: CarperAI/openai_summarize_comparisons layout, and the OpenAI-format judged CSV

def test_tldr_hub_layout_moves_marker_into_prompt(tmp_path):
    rows = [{"prompt": "SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat sleeps all day.",
             "chosen": "TL;DR: my cat sleeps a lot", "rejected": "TL;DR: cats"}]
    path = write_parquet(tmp_path / "comparisons.parquet", rows)
    pair = load("tldr", path=str(path)).pairs[0]
    assert pair == PreferencePair("SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat sleeps all day.\nTL;DR:",
                                  " my cat sleeps a lot", " cats")
    sft = load("tldr", path=str(path), kind="sft").pairs[0]
    assert sft == PreferencePair(pair.prompt, " my cat sleeps a lot")


def test_tldr_hub_layout_prompt_already_ending_with_marker(tmp_path):
    rows = [{"prompt": "POST: text\n\nTL;DR:", "chosen": "short", "rejected": " long one"}]
    pair = load("tldr", path=str(write_jsonl(tmp_path / "c.jsonl", rows))).pairs[0]
    assert pair == PreferencePair("POST: text\n\nTL;DR:", " short", " long one")


TLDR_JUDGED = [
    {"": "0", "query": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "postprocessed_response": "  ours one",
     "reference_responses": "  ref one", "explanation": "", "preferred": "reference"},
    {"": "1", "query": "SUBREDDIT: r/b\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "postprocessed_response": "ours two",
     "reference_responses": "ref two", "explanation": "", "preferred": "ours"},
    {"": "2", "query": "SUBREDDIT: r/c\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "postprocessed_response": "ours three",
     "reference_responses": "ref three", "explanation": "", "preferred": ""},
]


def test_tldr_judged_csv(tmp_path):
    path = write_csv(tmp_path / "judged.csv", TLDR_JUDGED)
    result = load("tldr", path=str(path))
    assert result.pairs == [
        PreferencePair(TLDR_JUDGED[0]["query"], "  ref one", "  ours one"),   # whitespace kept
        PreferencePair(TLDR_JUDGED[1]["query"], " ours two", " ref two"),     # a space added
    ]
    assert result.skipped == {"no_preference": 1} and result.rows == 3
    sft = load("tldr", path=str(path), kind="sft")
    assert [p.chosen for p in sft.pairs] == ["  ref one", " ref two", " ref three"]
    assert all(p.rejected is None for p in sft.pairs) and sft.skipped == {}


def test_tldr_judged_defects_name_the_csv_line(tmp_path):
    rows = [dict(TLDR_JUDGED[0], query="POST: two\nlines\n\nTL;DR:"),   # lines 2-5
            dict(TLDR_JUDGED[1], preferred="both")]                      # line 6
    path = write_csv(tmp_path / "judged.csv", rows)
    assert load("tldr", path=str(path)).skipped == {"bad_value:preferred": 1}
    with pytest.raises(DataFileError, match=re.escape(f"{path}: line 6: field 'preferred': ")):
        load("tldr", path=str(path), on_invalid="error")


# ---------------------------------------------------------------------------------------------
# imdb

def test_imdb_sft_only(tmp_path):
    rows = [{"id": "0_2", "text": "Great film.<br /><br />Loved it.", "label": 1, "rating": 9},
            {"id": "1_3", "text": "<br />", "label": 0, "rating": 3}]
    path = write_jsonl(tmp_path / "imdb.jsonl.gz", rows)
    result = load("imdb", path=str(path), kind="sft")
    assert result.pairs == [PreferencePair("", "Great film.  Loved it.")]
    assert result.skipped == {"empty:text": 1}
    with pytest.raises(ValueError, match="imdb has no preference pairs.*kind='sft'"):
        load("imdb", path=str(path))


# ---------------------------------------------------------------------------------------------
# ultrafeedback / generic pairs: plain strings and chat style

PAIR_OK = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


@pytest.mark.parametrize("row,reason,field", [
    ({"chosen": "a", "rejected": "b"}, "missing_key:prompt", "prompt"),
    ({"prompt": "q", "rejected": "b"}, "missing_key:chosen", "chosen"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "not_a_string:chosen", "chosen"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "not_a_string:prompt", "prompt"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty:prompt", "prompt"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty:rejected", "rejected"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected", "rejected"),
    ({"prompt": "q", "chosen": " same", "rejected": "same\n"}, "chosen_equals_rejected", "rejected"),
])
@pytest.mark.parametrize("name", ["pairs", "ultrafeedback"])
def test_pair_defects(tmp_path, name, row, reason, field):
    assert_skipped_and_raised(tmp_path, name, [PAIR_OK, row, PAIR_OK], reason, field)


def test_plain_pairs_kept_verbatim(tmp_path):
    rows = [{"prompt": "Say hi", "chosen": " hi", "rejected": "bye", "metadata": {"score_chosen": 9.0}}]
    result = load("ultrafeedback", path=str(write_jsonl(tmp_path / "u.jsonl", rows)))
    assert result.pairs == [PreferencePair("Say hi", " hi", "bye")]
    sft = load("pairs", path=str(write_jsonl(tmp_path / "u.jsonl", rows)), kind="sft")
    assert sft.pairs == [PreferencePair("Say hi", " hi")]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT_ROWS = [
    # HuggingFaceH4/ultrafeedback_binarized: prompt string, whole conversations.
    {"prompt": "What is 2+2?", "chosen": [user("What is 2+2?"), assistant("4")],
     "rejected": [user("What is 2+2?"), assistant("5")], "score_chosen": 9.0, "score_rejected": 2.0},
    # TRL's implicit prompt: no prompt column, the shared leading messages are the prompt.
    {"chosen": [{"role": "system", "content": "Be brief."}, user("Capital of France?"), assistant("Paris.")],
     "rejected": [{"role": "system", "content": "Be brief."}, user("Capital of France?"), assistant("Rome.")]},
    # Prompt as messages, responses as the assistant turn only (leading space kept).
    {"prompt": [user("hi there")], "chosen": [assistant(" Hello!")], "rejected": [assistant(" Go away.")]},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_chat_rows_rendered_with_chat_template(tmp_path, chat_tokenizer, suffix):
    path = tmp_path / f"chat{suffix}"
    if suffix == ".parquet":
        # Parquet wants one schema for a column; the three layouts go in separate files there.
        for i, row in enumerate(CHAT_ROWS):
            write_parquet(tmp_path / f"chat{i}.parquet", [row])
        pairs = [p for i in range(3) for p in
                 load("ultrafeedback", path=str(tmp_path / f"chat{i}.parquet"), tokenizer=chat_tokenizer).pairs]
    else:
        pairs = load("ultrafeedback", path=str(write_jsonl(path, CHAT_ROWS)), tokenizer=chat_tokenizer).pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [  # the texts; the ids: tests/test_chat_families.py
        ("<|user|>\nWhat is 2+2?\n<|assistant|>\n", "4", "5"),
        ("<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n", "Paris.", "Rome."),
        ("<|user|>\nhi there\n<|assistant|>\n", " Hello!", " Go away."),
    ]


def test_chat_rows_sft(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    result = load("pairs", path=str(path), tokenizer=chat_tokenizer, kind="sft")
    assert [(p.chosen, p.rejected) for p in result.pairs] == [("4", None), ("Paris.", None), (" Hello!", None)]
    assert result.pairs[1].prompt == "<|system|>\nBe brief.\n<|user|>\nCapital of France?\n<|assistant|>\n"


def test_chat_rows_need_a_chat_template(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [PAIR_OK, CHAT_ROWS[0]])
    with pytest.raises(DataFileError, match=re.escape(f"{path}: line 2: ") + ".*tokenizer with a chat template"):
        load("ultrafeedback", path=str(path))
    plain = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(DataFileError, match="tokenizer with a chat template"):
        load("ultrafeedback", path=str(path), tokenizer=plain, on_invalid="skip")


@pytest.mark.parametrize("row,reason,field", [
    ({"prompt": "q", "chosen": [user("q"), "not a message"], "rejected": [user("q"), assistant("b")]},
     "bad_messages:chosen", "chosen"),
    ({"prompt": "q", "chosen": [user("other"), assistant("a")], "rejected": [user("q"), assistant("b")]},
     "no_shared_prefix", "chosen"),
    ({"prompt": "q", "chosen": [user("q"), assistant("a"), assistant("more")],
      "rejected": [user("q"), assistant("b")]}, "bad_messages:chosen", "chosen"),
    ({"prompt": "q", "chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("")]},
     "empty:rejected", "rejected"),
    ({"prompt": "q", "chosen": [user("q")], "rejected": [user("q"), assistant("b")]}, "empty:chosen", "chosen"),
    ({"prompt": "q", "chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("x")]},
     "chosen_equals_rejected", "rejected"),
    ({"chosen": [assistant("a")], "rejected": [assistant("b")]}, "missing_key:prompt", "prompt"),
    ({"chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("x")]},
     "chosen_equals_rejected", "rejected"),  # implicit prompt, identical conversations
    ({"prompt": [assistant("I start")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
     "bad_messages:prompt", "prompt"),  # refused by the chat template
])
def test_chat_defects(tmp_path, chat_tokenizer, row, reason, field):
    assert_skipped_and_raised(tmp_path, "ultrafeedback", [CHAT_ROWS[0], row, CHAT_ROWS[2]], reason, field,
                              tokenizer=chat_tokenizer)


# ---------------------------------------------------------------------------------------------
# Arguments, hub, wrong formats, lengths

def test_bad_arguments(tmp_path):
    path = str(write_jsonl(tmp_path / "p.jsonl", [PAIR_OK]))
    with pytest.raises(ValueError, match="on_invalid must be 'skip' or 'error'"):
        load("pairs", path=path, on_invalid="warn")
    with pytest.raises(ValueError, match="unknown dataset 'hhrlhf'"):
        load("hhrlhf", path=path)
    with pytest.raises(ValueError, match="kind must be"):
        load("pairs", path=path, kind="dpo")
    with pytest.raises(ValueError, match="min_score_ratio"):
        load("hh", path=path, min_score_ratio=2)
    with pytest.raises(ValueError, match="Anthropic/hh-rlhf"):
        load("hh")


def test_a_file_in_another_format_is_an_error_not_an_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIR_OK, PAIR_OK])
    with pytest.raises(DataFileError, match=r"none of its 2 rows is a valid 'hh' row \(no_assistant_turn 2\)"
                                            r".*'prompt', 'chosen', 'rejected'"):
        load("hh", path=str(path))


def test_hub_rows_through_datasets(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return [HH_ROWS[0], {"chosen": HH_OK["chosen"], "rejected": HH_OK["chosen"]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load("hh", hub_name="Anthropic/hh-rlhf", split="test")
    assert calls == [("Anthropic/hh-rlhf", None, "test")]
    assert result.source == "Anthropic/hh-rlhf[test]" and result.skipped == {"chosen_equals_rejected": 1}
    with pytest.raises(DataFileError, match=re.escape("Anthropic/hh-rlhf[test]: row 2: field 'rejected': ")):
        load("hh", hub_name="Anthropic/hh-rlhf", split="test", on_invalid="error")
    # A local path takes precedence over the hub.
    local = load("hh", path=str(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)), hub_name="Anthropic/hh-rlhf")
    assert len(calls) == 2 and local.rows == 3


def test_check_lengths(chat_tokenizer):
    pairs = [PreferencePair("hi there hi there", " a", " b"), PreferencePair("hi", " a", " b")]
    # Prompt cut to 4 tokens leaves no room in 4: the long prompt goes, the short one stays.
    kept, skipped = check_lengths(pairs, chat_tokenizer, max_length=4, max_prompt_length=4)
    assert kept == pairs[1:] and skipped == {"prompt_too_long": 1}
    kept, skipped = check_lengths(pairs, chat_tokenizer, max_length=4, max_prompt_length=3)
    assert kept == pairs and skipped == {}


# ---------------------------------------------------------------------------------------------
# The real samples in ../shared/data

def test_real_ultrafeedback_defects_counted():
    train = load("ultrafeedback", path=str(shared("ultrafeedback/train_1000.jsonl.gz")))
    assert train.rows == 1000 and len(train.pairs) == 994
    assert train.skipped == {"chosen_equals_rejected": 4, "empty:chosen": 1, "empty:rejected": 1}
    evaluation = load("ultrafeedback", path=str(shared("ultrafeedback/eval_200.jsonl.gz")))
    assert evaluation.rows == 200 and len(evaluation.pairs) == 199
    assert evaluation.skipped == {"chosen_equals_rejected": 1}
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in train.pairs)
    with pytest.raises(DataFileError, match=r"train_1000\.jsonl\.gz: line \d+: field '(chosen|rejected)': "):
        load("ultrafeedback", path=str(shared("ultrafeedback/train_1000.jsonl.gz")), on_invalid="error")


def test_real_hh_helpful_in_shp_format():
    path = str(shared("hh_helpful_shp/test.jsonl.gz"))
    result = load("shp", path=path)
    assert result.rows == 2344 and len(result.pairs) == 2338
    assert result.skipped == {"chosen_equals_rejected": 2, "empty:human_ref_A": 2, "empty:human_ref_B": 2}
    first = result.pairs[0]  # labels == 1: human_ref_A preferred
    assert first.prompt == ("\n\nHuman: Do you know why turkeys became the official food of "
                            "thanksgiving?\n\nAssistant:")
    multi_turn = next(p for p in result.pairs if "butterflies are in my area" in p.prompt)
    assert multi_turn.prompt.startswith("\n\nHuman: How can I find out what types of butterflies are in my area?"
                                        "\n\nAssistant: Which location are you in?\n\nHuman: I am in Oregon.")
    assert multi_turn.prompt.endswith("\n\nHuman: Great. What are some common species then?\n\nAssistant:")
    assert "HUMAN:" not in multi_turn.prompt and "ASSISTANT:" not in multi_turn.prompt
    assert first.chosen.startswith(" To be honest, I don\u2019t know anything about that.")
    assert first.rejected.startswith(" I know that the American Indians")
    # SFT: every history is distinct and the 4 empty responses are all dispreferred ones.
    sft = load("shp", path=path, kind="sft")
    assert sft.rows == 2344 and len(sft.pairs) == 2344 and sft.skipped == {}


def test_real_tldr_judged():
    path = str(shared("tldr/oai1b_judged.csv.gz"))
    result = load("tldr", path=path)
    assert result.rows == 1945 and len(result.pairs) == 1000 and result.skipped == {"no_preference": 945}
    assert all(p.prompt.endswith("TL;DR:") and p.chosen[:1].isspace() and p.rejected[:1].isspace()
               for p in result.pairs)
    sft = load("tldr", path=path, kind="sft")
    assert sft.rows == 1945 and len(sft.pairs) == 1945 and sft.skipped == {}


def test_real_imdb_reviews():
    result = load("imdb", path=str(shared("imdb/test.jsonl.gz")), kind="sft")
    assert result.rows == 25000 and len(result.pairs) == 25000 and result.skipped == {}
    assert all(p.prompt == "" and "<br />" not in p.chosen for p in result.pairs)
