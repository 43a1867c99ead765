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
