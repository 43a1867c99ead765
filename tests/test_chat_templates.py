"""Base models with conversational data (issue 26, item 4): `model.chat_template=NAME|PATH`.

The named templates (chatml, llama3, zephyr, alpaca) and a Jinja file on the base families' tokenizers (GPT-2,
Pythia, GPT-J, a Llama base model): the special tokens each needs are added, conversations in every layout are
tokenized as the template renders them, the model's embeddings grow for the new tokens (only when the tokenizer
outgrows them) and its generation config stops at the template's end of turn, and the tokenizer with its
template is saved with π_SFT, the checkpoint and its Hugging Face export. Without a template, conversational
rows say which option to set. Then a LLaMA-Factory ShareGPT file trains end to end through the CLI at the smoke
budget with a GPT-2-style tokenizer (chatml) and a Llama-style base model (a Jinja file).
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_jsonl, run_cli
from families import BASE_FAMILIES, CONVERSATIONS, LAYOUTS, assert_tokens_as_at_inference, family
from dpo_exp.errors import ConfigError
from dpo_exp.data.chat import end_of_turn_id
from dpo_exp.data.formats import DataFileError, load
from dpo_exp.models import templates
from dpo_exp.models.templates import TEMPLATES

ROWS = [(layout, name) for layout in sorted(LAYOUTS) for name in sorted(CONVERSATIONS)
        if LAYOUTS[layout][0](CONVERSATIONS[name]) is not None]


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("name", BASE_FAMILIES)
def test_a_named_template_on_a_base_tokenizer(tmp_path, name, template):
    fam = family(name)
    tok = fam.tokenizer
    assert not tok.chat_template
    before = len(tok)
    added = templates.apply(tok, TEMPLATES[template])
    assert added == list(TEMPLATES[template].special_tokens)  # none of them was in the base vocabulary
    assert [tok.convert_tokens_to_ids(t) for t in added] == list(range(before, before + len(added)))
    assert all(tok.added_tokens_decoder[tok.convert_tokens_to_ids(t)].special for t in added)
    end = TEMPLATES[template].end_of_turn or tok.eos_token
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids(end)  # the registry's end of turn, read from a rendering
    for i, (layout, conversation) in enumerate(ROWS):
        conv = CONVERSATIONS[conversation]
        path = write_rows(tmp_path / f"{i}.jsonl", [LAYOUTS[layout][0](conv)])
        pair = load("auto", path=str(path), tokenizer=tok).pairs[0]
        assert_tokens_as_at_inference(tok, conv, pair)
        assert pair.prompt.startswith(tok.bos_token) or template == "chatml"  # a special token first, either way


def test_a_template_over_a_chat_models_own_adds_no_token_it_already_has(tmp_path):
    """Qwen2.5's tokenizer with chatml: its <|im_start|> / <|im_end|> keep their ids, nothing grows."""
    fam = family("qwen2.5")
    size, im_end = len(fam.tokenizer), fam.id("<|im_end|>")
    assert templates.apply(fam.tokenizer, TEMPLATES["chatml"]) == [] and len(fam.tokenizer) == size
    assert fam.tokenizer.chat_template == TEMPLATES["chatml"].jinja and end_of_turn_id(fam.tokenizer) == im_end
    conv = CONVERSATIONS["multi"]
    pair = load("auto", path=str(write_rows(tmp_path / "p.jsonl", [LAYOUTS["trl_prompt"][0](conv)])),
                tokenizer=fam.tokenizer).pairs[0]
    assert_tokens_as_at_inference(fam.tokenizer, conv, pair)
    assert not pair.prompt.startswith("<|im_start|>system")  # chatml writes no default system turn, Qwen's did


def test_a_jinja_file_is_a_template_and_its_control_tokens_are_added(tmp_path):
    jinja = tmp_path / "turns.jinja"
    jinja.write_text("{% for m in messages %}<|turn|>{{ m['role'] }}: {{ m['content'] }}<|done|>{{ '\\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}<|turn|>assistant: {% endif %}")
    template = templates.resolve(str(jinja))
    assert template.special_tokens == ("<|turn|>", "<|done|>") and template.jinja == jinja.read_text()
    fam = family("pythia")
    assert templates.apply(fam.tokenizer, template) == ["<|turn|>", "<|done|>"]
    assert end_of_turn_id(fam.tokenizer) == fam.tokenizer.convert_tokens_to_ids("<|done|>")
    conv = CONVERSATIONS["multi_system"]
    pair = load("auto", path=str(write_rows(tmp_path / "p.jsonl", [LAYOUTS["sharegpt"][0](conv)])),
                tokenizer=fam.tokenizer).pairs[0]
    assert_tokens_as_at_inference(fam.tokenizer, conv, pair)


def test_a_template_that_is_neither_a_name_nor_a_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'chatlm' is neither a template name \\(chatml, llama3, zephyr, alpaca\\)"):
        templates.resolve("chatlm")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ConfigError, match="broken.jinja: line 1: "):
        templates.resolve(str(broken))


def test_conversational_rows_without_a_template_say_which_option_to_set(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [LAYOUTS["sharegpt"][0](CONVERSATIONS["single"])])
    with pytest.raises(DataFileError, match="set one with model.chat_template=chatml \\| llama3 \\| zephyr \\| "
                                            "alpaca \\(or a Jinja file\\)"):
        load("auto", path=str(path), tokenizer=family("gpt2").tokenizer)
    with pytest.raises(DataFileError, match="model.tokenizer=<a folder or hub name> \\(and model.chat_template="):
        load("auto", path=str(path))  # a model built from a config: no tokenizer to render with yet


def tiny_model(vocab_size: int, tok, kind: str = "llama"):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=256,
                                          **ids))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=512, **ids))


def test_the_model_grows_embeddings_for_the_new_tokens_and_stops_at_the_end_of_turn(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = family("gpt2")
    tok = fam.tokenizer
    model = tiny_model(len(tok), tok, "gpt2")
    templates.apply(tok, TEMPLATES["chatml"])
    templates.fit_model(model, tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.get_input_embeddings().num_embeddings == len(tok) == 402
    assert model.get_output_embeddings().weight.shape[0] == 402 and model.config.vocab_size == 402
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, im_end}
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    saved, reloaded = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)
    assert saved.chat_template == TEMPLATES["chatml"].jinja  # the export renders as it was trained
    assert saved.convert_tokens_to_ids("<|im_end|>") == im_end and end_of_turn_id(saved) == im_end
    assert set(reloaded.generation_config.eos_token_id) == {tok.eos_token_id, im_end}  # and stops there

    gptj = family("gpt-j")  # GPT-J's embeddings are padded beyond its tokenizer: the new tokens fit
    padded = tiny_model(512, gptj.tokenizer, "gpt2")
    templates.apply(gptj.tokenizer, TEMPLATES["llama3"])
    templates.fit_model(padded, gptj.tokenizer)
    assert padded.get_input_embeddings().num_embeddings == 512


def test_the_cache_keys_hold_the_template_only_where_it_can_matter(smoke_cfg):
    from dpo_exp.stages import pairs_key, sft_key

    plain = sft_key(smoke_cfg())  # the default experiment's keys are as they were
    assert "chat_template" not in plain["model"] and "chat_tokens" not in plain
    chat = sft_key(smoke_cfg("model.chat_template=chatml"))
    assert chat["model"]["chat_template"]["name"] == "chatml"
    assert sft_key(smoke_cfg("task=preference", "data=pairs"))["chat_tokens"] == 1
    tok = family("qwen2.5").tokenizer
    assert "chat_template" not in pairs_key(smoke_cfg("task=preference", "data=hh"), "sft", tok)
    assert pairs_key(smoke_cfg("task=preference", "data=pairs"), "sft", tok)["chat_template"]


# ---- end to end ------------------------------------------------------------------------------------------------

def sharegpt_file(folder: Path) -> Path:
    """scripts/example_preference_files.py's LLaMA-Factory ShareGPT file (a system text, one question, two answers)."""
    spec = importlib.util.spec_from_file_location("example_preference_files",
                                                  ROOT / "scripts" / "example_preference_files.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    rows = examples.layouts(examples.questions(48, seed=0))["sharegpt.json"]
    path = folder / "sharegpt.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def check_export(final: Path, template: str, end_token: str) -> None:
    """The run's Hugging Face export: the tokenizer with the template, embeddings for its tokens, and a
    generation config that stops at its end of turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final)
    assert tok.chat_template == template
    end = tok.convert_tokens_to_ids(end_token)
    assert end_of_turn_id(tok) == end and end in model.generation_config.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_a_sharegpt_file_trains_a_gpt2_style_tokenizer_with_chatml_through_the_cli(tmp_path):
    data = sharegpt_file(tmp_path)
    tokenizer_dir = tmp_path / "gpt2_tokenizer"
    family("gpt2").tokenizer.save_pretrained(tokenizer_dir)
    run = tmp_path / "run"
    run_cli("debug=smoke", "task=preference", "data=pairs", f"data.path={data}", f"model.tokenizer={tokenizer_dir}",
            "model.chat_template=chatml", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["train_pairs"] > 0 and summary["steps"] == 4
    assert not list(run.glob("*.log"))  # log records go to the console: no empty Hydra log file in the run folder
    check_export(run / "checkpoints" / "final", TEMPLATES["chatml"].jinja, "<|im_end|>")
    check_export(Path(summary["sft_policy"]), TEMPLATES["chatml"].jinja, "<|im_end|>")  # π_SFT's folder too
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and all(r["prompt"].startswith("<|im_start|>system\nAnswer with the sum.<|im_end|>\n"
                                                  "<|im_start|>user\nWhat is ") for r in samples)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") for r in samples)


def test_a_sharegpt_file_trains_a_llama_style_base_model_with_a_jinja_file_through_the_cli(tmp_path):
    """A given base model (sft.train=false) with a template from a file: a cached copy with the template's tokens
    added and the embeddings resized becomes π_SFT, and the run trains and exports it."""
    data = sharegpt_file(tmp_path)
    fam = family("llama2-base")
    base = tmp_path / "llama_base"
    tiny_model(len(fam.tokenizer), fam.tokenizer).save_pretrained(base)
    fam.tokenizer.save_pretrained(base)
    jinja = tmp_path / "llama3.jinja"
    jinja.write_text(TEMPLATES["llama3"].jinja)
    run = tmp_path / "run"
    run_cli("debug=smoke", "task=preference", "data=pairs", f"data.path={data}", f"model.name_or_path={base}",
            "sft.train=false", f"model.chat_template={jinja}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["train_pairs"] > 0
    sft = Path(summary["sft_policy"])
    assert sft.parent == (tmp_path / "cache" / "chat_model").resolve() and (sft / "COMPLETE").exists()
    check_export(run / "checkpoints" / "final", TEMPLATES["llama3"].jinja, "<|eot_id|>")
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "final")
    assert final.get_input_embeddings().num_embeddings == len(fam.tokenizer) + 3  # the three header/turn tokens
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and all(r["prompt"].startswith("<s><|start_header_id|>system<|end_header_id|>\n\n") for r in samples)
    # the recorded config is the one that ran: the given model, not the smoke budget's tiny architecture
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run / ".hydra" / "config.yaml").model
    assert recorded.name == str(base) and recorded.name_or_path == str(base) and not recorded.architecture
