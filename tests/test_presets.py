"""The paper's experiments as presets: they carry the paper's settings, and each runs end to
end here at tiny scale on the real local data (skipped with a reason when it is absent). The model presets (the
paper's models and current chat models) match their published architectures, checked offline."""
import json
import sys
from typing import NamedTuple

import pytest

from conftest import SHARED_DATA, run_cli
from dpo_exp import train as train_module

needs_shared = pytest.mark.skipif(not SHARED_DATA.exists(),
                                  reason=f"{SHARED_DATA} (real dataset samples) is absent in this checkout")

TINY_OVERRIDES = {
    "paper_imdb": [f"data.path={SHARED_DATA}/imdb/train.jsonl.gz", f"data.eval_path={SHARED_DATA}/imdb/test.jsonl.gz"],
    "paper_tldr": [f"data.path={SHARED_DATA}/tldr/oai1b_judged.csv.gz"],
    # no HH file in the hub's two-transcript layout is here: the same HH data repacked as SHP
    "paper_hh": ["data=shp", f"data.path={SHARED_DATA}/hh_helpful_shp/test.jsonl.gz"],
    "imdb_small": [],
}


@pytest.mark.parametrize("preset, model, data, beta", [
    ("paper_imdb", "gpt2-large", "imdb", 0.1),
    ("paper_hh", "EleutherAI/pythia-2.8b", "hh", 0.1),
    ("paper_tldr", "EleutherAI/gpt-j-6b", "tldr", 0.5),
])
def test_paper_presets_carry_the_papers_settings(smoke_cfg, preset, model, data, beta):
    from hydra import compose, initialize_config_dir
    from conftest import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}", "paths.output_dir=/tmp/unused"])
    assert cfg.model.name_or_path == model and cfg.data.name == data
    assert cfg.loss.name == "dpo" and cfg.loss.beta == beta
    assert cfg.optimizer.name.value == "rmsprop" and cfg.optimizer.lr == 1e-6 and cfg.optimizer.warmup_steps == 150
    assert cfg.trainer.batch_size == 64 and cfg.optimizer.max_grad_norm == 10.0
    assert cfg.model.reference_dtype == "float16"
    if preset != "paper_imdb":  # the authors' SFT used the same optimizer settings as DPO
        assert cfg.sft.optimizer.name.value == "rmsprop" and cfg.sft.optimizer.lr == 1e-6


@needs_shared
@pytest.mark.parametrize("preset", sorted(TINY_OVERRIDES))
def test_preset_runs_end_to_end_at_tiny_scale_through_the_cli(tmp_path, preset):
    """`python -m dpo_exp.train experiment=NAME debug=smoke ...`, as a user types it (compose alone is not enough)."""
    run_dir = tmp_path / "run"
    run_cli(f"experiment={preset}", "debug=smoke", *TINY_OVERRIDES[preset], "optimizer.lr=1e-3",
            "optimizer.warmup_steps=0", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_pairs"] > 0
    assert "eval/kl" in summary
    if "eval/gold_reward_ref" in summary or preset in ("paper_imdb", "imdb_small"):  # sampled pairs, a gold reward
        assert "eval/gold_reward" in summary and "eval/gold_reward_ref" in summary
    else:
        assert {"eval/rewards/accuracies", "eval/loss"} <= set(summary)
    assert (run_dir / "checkpoints" / "final" / "config.json").exists()


@needs_shared
def test_invalid_rows_of_the_real_ultrafeedback_sample_are_counted(smoke_cfg):
    cfg = smoke_cfg("task=preference", "data=ultrafeedback",
                    f"data.path={SHARED_DATA}/ultrafeedback/train_1000.jsonl.gz",
                    f"data.eval_path={SHARED_DATA}/ultrafeedback/eval_200.jsonl.gz")
    summary = train_module.run(cfg)
    assert summary["data/skipped/train/chosen_equals_rejected"] == 4
    assert summary["data/skipped/train/empty:chosen"] == 1
    assert summary["data/skipped/train/empty:rejected"] == 1


# ---- model presets: the paper's models and current chat models, checked offline against their architectures ----

class Published(NamedTuple):
    hub_id: str
    billions: float     # parameters, as the model card states them
    block_class: str    # transformers' decoder-layer class (FSDP's unit)
    policy_dtype: str
    reference_dtype: str
    attention: str


MODEL_PRESETS = {
    "gpt2_large": Published("gpt2-large", 0.774, "GPT2Block", "float32", "float16", "sdpa"),
    "pythia_2_8b": Published("EleutherAI/pythia-2.8b", 2.78, "GPTNeoXLayer", "float32", "float16", "sdpa"),
    "gpt_j_6b": Published("EleutherAI/gpt-j-6b", 6.05, "GPTJBlock", "float32", "float16", "sdpa"),
    "smollm2_135m": Published("HuggingFaceTB/SmolLM2-135M-Instruct", 0.135, "LlamaDecoderLayer", "float32", "float32",
                              "sdpa"),
    "llama3_1_8b_instruct": Published("meta-llama/Llama-3.1-8B-Instruct", 8.03, "LlamaDecoderLayer", "float32",
                                      "bfloat16", "sdpa"),
    "qwen2_5_7b_instruct": Published("Qwen/Qwen2.5-7B-Instruct", 7.62, "Qwen2DecoderLayer", "float32", "bfloat16",
                                     "sdpa"),
    "qwen3_8b": Published("Qwen/Qwen3-8B", 8.19, "Qwen3DecoderLayer", "float32", "bfloat16", "sdpa"),
    "mistral_7b_instruct": Published("mistralai/Mistral-7B-Instruct-v0.3", 7.25, "MistralDecoderLayer", "float32",
                                     "bfloat16", "sdpa"),
    # transformers refuses sdpa for Gemma-2: it cannot soft-cap attention logits
    "gemma2_9b_it": Published("google/gemma-2-9b-it", 9.24, "Gemma2DecoderLayer", "float32", "bfloat16", "eager"),
}


def compose_model(option: str):
    from hydra import compose, initialize_config_dir
    from conftest import ROOT

    from dpo_exp.components import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model={option}", "paths.output_dir=/tmp/unused"])


def test_every_hub_model_option_has_a_published_architecture():
    """A conf/model option naming a hub model (not the generic `hf`) is listed here and in scripts/memory_table.py,
    so its size, blocks and memory are known without a download."""
    import yaml
    from conftest import ROOT

    from test_memory_table import load_script

    hub_options = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if not p.stem.startswith("_")
                   and p.stem != "hf" and (yaml.safe_load(p.read_text()) or {}).get("name_or_path")}
    assert hub_options == set(MODEL_PRESETS) == set(load_script().ARCHITECTURES)


@pytest.mark.parametrize("option", sorted(MODEL_PRESETS))
def test_model_preset_composes_with_its_hub_id_dtypes_and_attention(option):
    from dpo_exp.validation import validate

    cfg = compose_model(option)
    validate(cfg)
    published = MODEL_PRESETS[option]
    assert cfg.model.name == option and cfg.model.name_or_path == published.hub_id
    assert (cfg.model.policy_dtype, cfg.model.reference_dtype) == (published.policy_dtype, published.reference_dtype)
    assert cfg.model.attn_implementation == published.attention and cfg.model.block_class == published.block_class
    assert not cfg.model.architecture  # used only without a hub model; the smoke budget's tiny model merges into it


@pytest.mark.parametrize("option", sorted(MODEL_PRESETS))
def test_model_preset_block_class_attention_and_size_match_the_published_architecture(option):
    """Built from the published config on the meta device (no download, no memory): block_class is the model's own
    decoder-layer class (in its modeling module and its _no_split_modules, one per layer), the preset's attention
    builds (sdpa wherever the model supports it), and the parameter count is the model card's within 1%."""
    from dpo_exp.models import find_blocks
    from test_memory_table import load_script

    cfg = compose_model(option)
    model, config = load_script().meta_model(option, cfg.model.attn_implementation)
    cls = type(model)
    block_class = cfg.model.block_class
    assert isinstance(getattr(sys.modules[cls.__module__], block_class, None), type), (cls.__module__, block_class)
    assert block_class in cls._no_split_modules
    assert len(find_blocks(model, block_class)) == config.num_hidden_layers
    assert model.config._attn_implementation == cfg.model.attn_implementation
    assert (cfg.model.attn_implementation == "sdpa") == bool(cls._supports_sdpa)
    params = sum(p.numel() for p in model.parameters())
    assert params / 1e9 == pytest.approx(MODEL_PRESETS[option].billions, rel=0.01)


@pytest.mark.parametrize("option", sorted(MODEL_PRESETS))
def test_the_smoke_budget_runs_a_model_preset_as_the_tiny_model(smoke_cfg, option):
    """`model=X debug=smoke` trains the tiny model offline: the preset adds nothing to its architecture (a vocab_size
    there would clash with the trained tokenizer's in dpo_exp.models.loading.new_model)."""
    from dpo_exp.validation import validate

    cfg = smoke_cfg(f"model={option}")
    validate(cfg)
    assert cfg.model.name_or_path is None and cfg.model.architecture == smoke_cfg("model=hf").model.architecture
