"""docs/configuration.md is generated from conf/ by scripts/config_reference.py: it must be current, and the
generator must read whatever conf/ holds (any defaults list, schemas named in it, nested groups, global packages)
without a list of its own to keep up to date."""
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["config_reference"] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return load_script()


def test_the_committed_configuration_reference_is_current(reference):
    expected = reference.render(ROOT / "conf", ignore=reference.ignored_patterns(ROOT, ROOT / "conf"))
    committed = reference.OUT.read_text() if reference.OUT.is_file() else ""
    assert committed == expected, (f"docs/configuration.md is stale (conf/ or a schema changed): regenerate it with "
                                   f"`{reference.COMMAND}` and commit the result")


def test_every_option_file_and_key_of_conf_is_in_the_reference(reference):
    text = reference.OUT.read_text()
    conf = reference.read_conf(ROOT / "conf", reference.ignored_patterns(ROOT, ROOT / "conf"))
    missing = []
    for group in conf.groups.values():
        for name, option in group.options.items():
            heading = f"`{name}.yaml`" if name.startswith("_") else f"`{group.name}={name}`"
            if f"### {heading}" not in text:
                missing.append(f"{option.path.relative_to(ROOT)}: no section {heading}")
            missing += [f"{option.path.relative_to(ROOT)}: {k.path}" for k in option.keys if f"`{k.path}`" not in text]
    assert not missing, "\n".join(missing)


def test_check_fails_on_a_stale_file_and_names_the_command(reference, tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n")
    assert reference.main(["--check", "--out", str(stale)]) == 1
    assert reference.COMMAND in capsys.readouterr().err
    assert reference.main(["--out", str(stale)]) == 0
    assert reference.main(["--check", "--out", str(stale)]) == 0


# ---- a conf/ of every shape the generator must read --------------------------------------------------

@dataclass
class ToyLoss:
    name: str = "dpo"
    beta: float = 0.1
    gamma: float = 0.5  # a key only the schema declares


@dataclass
class ToySchema:
    loss: ToyLoss = field(default_factory=ToyLoss)
    trainer_steps: int = 3  # steps (no yaml sets it)
    tags: List[str] = field(default_factory=list)
    extra: Optional[int] = None


TOY = {
    "config.yaml": """# python -m toy.train: the entry point.
defaults:
  - config_schema          # the typed schema
  - loss: dpo              # the algorithm
  - optional local: default  # a machine's own settings
  - experiment: null       # presets
  - override hydra/job_logging: stdout  # console only
  - sweep: [a, b]          # a list as an option
  - {}
  - _self_
seed: 0                    # the seed
""",
    "loss/dpo.yaml": """# DPO.
defaults:
  - dpo_schema             # this option's schema, registered with it
  - _base                  # shared keys
  - _self_
name: dpo                  # the loss
beta: 0.1
prompt: |-  # a block of text
  first line
  second line
""",
    "loss/_base.yaml": "# Keys every loss shares.\nreference_free: false  # drop π_ref\n",
    "loss/empty.yaml": "",
    "loss/comments_only.yaml": "# nothing but a comment\n",
    "loss/no_defaults.yaml": "defaults:\nname: x  # a name\n",
    "experiment/preset.yaml": """# @package _global_
# A preset.
defaults:
  - override /loss: dpo
loss:
  beta: 0.5                # stronger
nested:
  deeper:
    key: [1, 2]            # a list
""",
    "hydra/launcher/slurm.yaml": "defaults:\n  - submitit_slurm\nnodes: 1  # nodes per job\n",
    "local/default.yaml": "seed: 1  # ignored, as .gitignore says\n",
}


@pytest.fixture
def toy_conf(tmp_path):
    conf = tmp_path / "conf"
    for name, text in TOY.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    return conf


def test_any_defaults_list_is_read_and_schemas_are_skipped(reference, toy_conf):
    text = reference.render(toy_conf, schema_lookup=lambda name, modules: None, ignore=["local/*.yaml"])
    assert "### `loss=dpo`" in text and "### `experiment=preset`" in text and "### `hydra/launcher=slurm`" in text
    assert "*builds on `_base`.*" in text                  # dpo_schema is a schema, not something it builds on
    assert "dpo_schema" not in text.split("### `loss=dpo`")[1].split("###")[0]
    assert "*sets `loss=dpo`.*" in text                     # an override in a preset
    assert "| `nested.deeper.key` | `[1, 2]` | a list |" in text
    assert "| `prompt` | `first line …` | a block of text |" in text
    assert "| `beta` | `0.1` | — |" in text                 # a key without a comment is shown, not refused
    assert "ignored, as .gitignore says" not in text       # conf/local/*.yaml stays on the machine
    assert "| `local` (optional) | `default` |" in text
    assert "[`loss`](#group-loss)" in text and "the algorithm" in text


def test_the_schemas_named_add_the_keys_no_yaml_sets(reference, toy_conf):
    asked = []

    def lookup(name, modules):
        asked.append((name, modules))
        return {"config_schema": ToySchema, "loss/dpo_schema": ToyLoss}.get(name)

    text = reference.render(toy_conf, schema_lookup=lookup, ignore=["local/*.yaml"])
    assert asked[0] == ("config_schema", ["toy.train"])    # with the module the entry point's header runs
    assert ("loss/dpo_schema", []) in asked                # an option's own schema, where the registry stores it
    assert "| `trainer_steps` | `3` | `int` | steps (no yaml sets it) | `test_config_reference.ToySchema` |" in text
    schema_only = text.split("Keys of `loss` no option file sets")[1].split("\n## ")[0]
    assert "`loss.gamma`" in schema_only and "`loss.beta`" not in schema_only  # a yaml sets loss.beta
    dpo = text.split("### `loss=dpo`")[1].split("\n### ")[0]
    assert "Keys only its schema declares" in dpo and "| `gamma` | `0.5` | `float` |" in dpo
    assert "| `beta` | `0.1` | `float`" not in dpo           # the option sets it
