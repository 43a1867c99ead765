"""Composition: every option of every group composes, typos fail at composition, and
relations between keys fail before any model loads with a message that says what to do."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import assert_valid_hub_ids, compose_judging, hub_values
from dpo_exp.components import register_configs
from dpo_exp.validation import validate
from dpo_exp.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def compose_cfg(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "paths.output_dir=/tmp/dpo_exp_compose"])
    OmegaConf.resolve(cfg)
    return cfg


JUDGING_GROUPS = ("judge", "judge_prompt")  # groups of conf/judging.yaml (python -m dpo_exp.judge), not of training


def group_options(groups=None):
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "local"):
        if (group.name in JUDGING_GROUPS) != (groups == JUDGING_GROUPS):
            continue
        for option in sorted(group.glob("*.yaml")):
            if not option.stem.startswith("_"):  # _base.yaml and the like: shared keys, not options
                yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(group_options(JUDGING_GROUPS)))
def test_every_judging_option_composes_into_the_judging_schema(override):
    cfg = compose_judging(override, "runs=[x]", "cache_dir=/tmp/x")
    group, option = override.split("=")
    assert cfg[group].name == option


@pytest.mark.parametrize("override", list(group_options()))
def test_every_option_of_every_group_composes_and_validates(override):
    cfg = compose_cfg([override])
    validate(cfg)


def test_every_yaml_key_has_a_comment():
    missing = []
    for path in CONF.rglob("*.yaml"):
        block = None  # indentation of a key whose value is a block scalar (| or >): its text lines are not keys
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if block is not None and (not stripped or indent > block):
                continue
            block = indent if re.match(r"[\w.]+: [|>][-+]?(\s+#.*)?$", stripped) else None
            if not stripped or stripped.startswith(("#", "- ")) or stripped.endswith(":"):
                continue  # comments, defaults-list entries, and section headers
            if ":" in stripped and "#" not in stripped:
                missing.append(f"{path.relative_to(CONF)}:{number}: {stripped}")
    assert not missing, "yaml keys without a one-line comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("override, fragment", [
    ("loss.betta=0.1", "betta"),                 # unknown key
    ("loss.beta=large", "beta"),                 # wrong type
    ("loss=dop", "dop"),                         # not an algorithm: Hydra lists the options of the group
    ("optimizer=adam", "adam"),                  # not an option of the group
    ("trainer.batch_size=8.5", "batch_size"),   # float for an int
])
def test_typos_fail_at_composition(override, fragment):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    assert fragment in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("overrides, message", [
    (["loss.beta=0"], "loss.beta must be > 0"),
    (["loss.beta=-1"], "loss.beta must be > 0"),
    (["loss=cdpo", "loss.label_smoothing=0.5"], r"label_smoothing must be in \[0, 0.5\)"),
    (["loss=rdpo", "loss.label_smoothing=-0.1"], r"label_smoothing must be in \[0, 0.5\)"),
    (["reference.enabled=false"], "needs a reference model"),
    (["trainer.batch_size=10", "trainer.grad_accumulation_steps=4"], "does not divide evenly"),
    (["data.max_prompt_length=176"], "leaves no room for a response"),
    (["data.max_length=100"], "must hold a prompt .* and a sample of task.generation.max_new_tokens=160"),
    (["task.generation.temperature=0.7"], "eval.kl=true estimates KL.*temperature=0.7"),
    (["task.generation.top_k=50"], "eval.kl=true estimates KL.*top_k=50"),
    (["sft.checkpoint=/no/such/folder"], "is not a folder"),
    (["data.excerpt_tokens=96"], r"0 < data.excerpt_tokens < sft.max_length=96"),
    (["task=preference", "data=hh", "data.excerpt_tokens=32"], "it needs task=sentiment"),
    (["model.attn_implementation=flash_attention_2", "trainer.share_prompt=true"],
     r"share_prompt needs an attention that takes a mask.*trainer.pack=true still packs"),
    (["model.attn_implementation=some_kernel", "trainer.pack=true", "trainer.share_prompt=false"],
     "trainer.pack needs model.attn_implementation="),
    (["model.attn_implementation=flex_attention", "trainer.device=cpu"], "flex attention has no backward pass on the CPU"),
])
def test_invalid_combinations_fail_before_any_model_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(overrides))


def test_flash_attention_packs_with_prompts_shared_by_default_off():
    """trainer.share_prompt null means off where the attention takes no mask, so packing alone is asked for."""
    validate(compose_cfg(["model.attn_implementation=flash_attention_2", "trainer.pack=true"]))


def test_an_unknown_algorithm_name_lists_the_registered_ones():
    from dpo_exp.algorithms import ALGORITHMS

    with pytest.raises(ConfigError, match="unknown algorithm loss.name='dop'; registered: ") as info:
        validate(compose_cfg(["loss.name=dop"]))
    assert all(name in str(info.value) for name in ALGORITHMS)
    with pytest.raises(ConfigCompositionException, match="dop") as info:  # loss=dop: Hydra names the options
        compose_cfg(["loss=dop"])
    assert "online_dpo" in str(info.value) + str(info.value.__cause__)


def test_every_registered_algorithm_has_a_loss_option_and_vice_versa():
    from dpo_exp.algorithms import ALGORITHMS

    options = {p.stem for p in (CONF / "loss").glob("*.yaml") if not p.stem.startswith("_")}
    assert options == set(ALGORITHMS)
    for name in options:  # each yaml selects the algorithm of its own name
        assert compose_cfg([f"loss={name}"]).loss.name == name


def test_a_misspelt_block_class_fails_when_the_policy_is_built(smoke_cfg):
    from dpo_exp import train as train_module

    with pytest.raises(ConfigError, match="LlamaDecoderLayr.*LlamaDecoderLayer"):
        train_module.run(smoke_cfg("model.block_class=LlamaDecoderLayr"))


def test_losses_without_reference_may_disable_it():
    for loss in ("simpo", "sft"):
        validate(compose_cfg([f"loss={loss}", "reference.enabled=false"]))
    validate(compose_cfg(["loss.reference_free=true", "reference.enabled=false"]))


def test_cli_typo_exits_with_the_key_named():
    proc = subprocess.run([sys.executable, "-m", "dpo_exp.train", "loss.betta=0.1"], capture_output=True, text=True,
                          cwd=CONF.parent, timeout=120)
    assert proc.returncode != 0
    assert "betta" in proc.stderr


# ---- yaml values as written: no glued comments, valid hub ids --------------------------------------

def test_no_yaml_value_swallows_its_comment():
    """`key: value# comment` makes the comment part of the value (YAML needs whitespace before #)."""
    glued = []
    for path in CONF.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\S#", line.split(" #")[0] if not line.lstrip().startswith("#") else ""):
                glued.append(f"{path.relative_to(CONF)}:{number}: {line.strip()}")
    assert not glued, "values with a comment glued on (put a space before #):\n" + "\n".join(glued)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml")))
def test_hub_ids_written_in_yaml_are_valid(path):
    import yaml

    assert_valid_hub_ids(hub_values(yaml.safe_load((CONF / path).read_text()) or {}), path)


@pytest.mark.parametrize("override", [o for o in group_options() if o.split("=")[0] in ("experiment", "model", "data")])
def test_hub_ids_of_every_composed_preset_and_option_are_valid(override):
    cfg = OmegaConf.to_container(compose_cfg([override]), enum_to_str=True)
    assert_valid_hub_ids(hub_values(cfg), override)


def test_the_glued_comment_check_sees_a_glued_comment(tmp_path):
    assert re.search(r"\S#", "hub_name: CarperAI/openai_summarize_comparisons# datasets name".split(" #")[0])
    with pytest.raises(AssertionError, match="not a valid hub id"):
        assert_valid_hub_ids([("hub_name", "CarperAI/openai_summarize_comparisons# datasets name")], "x.yaml")


# ---- closed schemas: `+key=value` is refused like `key=value` --------------------------------------

@pytest.mark.parametrize("override, schema, key", [
    ("loss.betta=0.5", "PreferenceLossConfig", "loss.betta"),
    ("model.lora.rr=3", "LoraConfig", "model.lora.rr"),
    ("trainer.max_stepz=3", "TrainerConfig", "trainer.max_stepz"),
])
def test_an_unknown_key_fails_with_the_same_message_with_or_without_plus(override, schema, key):
    name = key.rsplit(".", 1)[1]
    message = f"Key '{name}' not in '{schema}'"
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg([override])
    assert message in str(info.value.__cause__) and key in str(info.value.__cause__)
    for prefix in ("+", "++"):  # Hydra adds the key to the typed node; validate refuses it before anything loads
        with pytest.raises(ConfigError) as refused:
            validate(compose_cfg([prefix + override]))
        assert message in str(refused.value) and f"full_key: {key}" in str(refused.value)
    assert "did you mean" in str(refused.value)


def test_plus_typos_fail_on_the_command_line_before_anything_runs(tmp_path, capsys):
    from conftest import run_cli

    with pytest.raises(AssertionError, match="exited with 2"):  # an expected error: one message, no traceback
        run_cli("+loss.betta=0.5", "debug=smoke", f"paths.root_dir={tmp_path}")
    err = capsys.readouterr().err
    assert "Key 'betta' not in 'PreferenceLossConfig'" in err and "Traceback" not in err
    assert not (tmp_path / "outputs" / "cache").exists()  # nothing was trained
    with pytest.raises(ConfigError, match="Key 'foo' not in 'Config'"):
        validate(compose_cfg(["+foo=1"]))
    validate(compose_cfg(["+model.architecture.rope_theta=10000.0"]))  # a free-form section stays open


def test_every_field_a_layout_reads_can_be_renamed_in_config_and_a_misspelt_one_fails_before_anything_loads():
    """data.columns takes the fields the registered layouts read (a user's layout adds its own)."""
    from dpo_exp.data.formats import LAYOUTS, fields

    every = sorted({f for _, layout in LAYOUTS.items() for f in layout.fields})
    assert every == sorted(fields()) and {"prompt", "chosen", "rejected", "conversations", "history"} <= set(every)
    validate(compose_cfg([f"+data.columns.{field}=column_{i}" for i, field in enumerate(every)]))
    with pytest.raises(ConfigError, match=r"data.columns.promt=question: promt is not a field any layout reads "
                                          r"\(did you mean data.columns.prompt\?\)"):
        validate(compose_cfg(["+data.columns.promt=question"]))
