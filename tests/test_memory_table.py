"""scripts/memory_table.py: exact parameter counts from the architectures, and the sharding arithmetic."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "scripts" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_table"] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return {(r["preset"], r["GPUs"], r["variant"]): r for r in load_script().rows_for("paper_hh", [1, 8])}


@pytest.mark.parametrize("model, published", [("gpt2_large", 0.774), ("pythia_2_8b", 2.775), ("gpt_j_6b", 6.05)])
def test_parameter_counts_are_the_published_model_sizes(model, published):
    script = load_script()
    shape = script.shape_of(*script.meta_model(model))
    assert shape.params / 1e9 == pytest.approx(published, rel=0.005)
    assert shape.layers * shape.block_params < shape.params  # embeddings and head are outside the blocks


def test_sharding_divides_the_states_and_the_batch_and_lora_drops_the_reference(rows):
    one, eight = rows[("paper_hh", 1, "full")], rows[("paper_hh", 8, "full")]
    for column in ("policy", "grads", "optimizer", "reference"):
        assert eight[column] == pytest.approx(one[column] / 8)
    # Pythia 2.8B in float32 under RMSprop: 4 bytes of weights, grads and moments per parameter
    assert one["policy"] == pytest.approx(2.775 * 4, rel=0.005) and one["optimizer"] == pytest.approx(one["grads"])
    assert one["reference"] == pytest.approx(2.775 * 2, rel=0.005)  # float16, as the authors kept it
    assert eight["micro-batch (seq.)"] == one["micro-batch (seq.)"] // 8 and eight["activations"] < one["activations"] / 6
    lora = rows[("paper_hh", 1, "LoRA r=16")]
    assert lora["reference"] == 0 and lora["optimizer"] < one["optimizer"] / 50
    ckpt = rows[("paper_hh", 1, "full + grad. ckpt")]
    assert ckpt["activations"] < one["activations"] / 4
    offload = rows[("paper_hh", 8, "CPU offload")]
    assert offload["policy"] == offload["optimizer"] == 0 and offload["CPU"] > 0
    assert offload["total per GPU"] < eight["total per GPU"]


# ---- the LM head's logits: one chunk of trainer.logits_chunk_tokens rows, not every kept position ----

@pytest.mark.parametrize("kept, vocab, chunk, expected", [
    (128 * 256, 128256, 130, 133_386_240),        # Llama-3.1, auto chunk 2**24 // 128,256 = 130 rows: 2 x 130 x V x 4 B
    (128 * 256, 128256, 0, 33_621_540_864),       # chunking off: all 32,768 kept positions, 2 x 32,768 x V x 4 B
    (128 * 256, 256000, 65, 133_120_000),         # Gemma-2, auto chunk 2**24 // 256,000 = 65 rows
    (100, 50257, 1335, 40_205_600),               # fewer kept positions than a chunk: all 100 at once
    (523, 128256, 523, 536_623_104),              # exactly one chunk
])
def test_logits_term_by_hand(kept, vocab, chunk, expected):
    assert load_script().logits_bytes(kept, vocab, chunk) == expected


def test_a_chat_model_row_holds_one_chunk_of_logits_and_shows_the_unchunked_figure():
    # paper_hh on Llama-3.1-8B: 64 pairs = 128 sequences on 1 GPU, 16 on 8; 512 tokens with prompts of at most
    # 256, so 256 kept positions per sequence; auto chunk 130 rows of a 128,256-token vocabulary
    rows = {(r["GPUs"], r["variant"]): r for r in load_script().rows_for("paper_hh:llama3_1_8b_instruct", [1, 8])}
    one, eight = rows[(1, "full")], rows[(8, "full")]
    assert one["model"] == "llama3_1_8b_instruct" and one["preset"] == "paper_hh"
    assert one["logits"] == eight["logits"] == pytest.approx(0.13338624)
    assert one["logits unchunked"] == pytest.approx(33.621540864)
    assert eight["logits unchunked"] == pytest.approx(33.621540864 / 8)
    for row in (one, eight):
        parts = ("policy", "grads", "optimizer", "reference", "gathered blocks", "activations", "logits")
        assert row["total per GPU"] == pytest.approx(sum(row[c] for c in parts))
        assert row["total unchunked"] - row["total per GPU"] == pytest.approx(row["logits unchunked"] - row["logits"])
    # float32 policy under RMSprop (the experiment's optimizer), π_ref in bfloat16
    assert one["policy"] == pytest.approx(8.03 * 4, rel=0.005)
    assert one["reference"] == pytest.approx(8.03 * 2, rel=0.005)


@pytest.mark.parametrize("setting, expected", [
    ("trainer.logits_chunk_tokens=0", 1_648_361_472),     # off: 16 x 256 positions x 50,304 x 4 B x 2
    ("trainer.logits_chunk_tokens=1024", 412_090_368),    # 1,024 rows x 50,304 x 4 B x 2
    ("trainer.logits_chunk_tokens=8192", 1_648_361_472),  # a chunk larger than the 4,096 kept positions: all at once
])
def test_the_chunk_setting_of_the_run_sets_the_logits_term(setting, expected):
    [row] = [r for r in load_script().rows_for("paper_hh", [8], [setting]) if r["variant"] == "full"]
    assert row["logits"] == pytest.approx(expected / 1e9) and row["logits unchunked"] == pytest.approx(1.648361472)


def test_the_unchunked_columns_are_shown_on_request(capsys):
    script = load_script()
    script.main(["--presets", "paper_imdb", "--gpus", "8"])
    header = capsys.readouterr().out.splitlines()[0]
    assert "logits" in header and "unchunked" not in header
    script.main(["--presets", "paper_imdb", "--gpus", "8", "--unchunked", "--markdown"])
    header = capsys.readouterr().out.splitlines()[0]
    assert "| logits | total per GPU | CPU | logits unchunked | total unchunked |" in header
