import copy
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

@pytest.fixture(autouse=True, scope="session")
def one_thread_for_tiny_models():
    """Smoke-budget models (width 16-32) are far too small for intra-op threads to pay: on this
    2-core machine one thread ran the every-algorithm tests in 20 s instead of 26 s. Subprocesses
    (the full default run, the multiruns) keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_llama_pair(vocab_size: int, num_layers: int, max_positions: int, noise: float):
    """A float64 Llama (pad 0, BOS 1, EOS 2) as reference and a copy with Gaussian noise added to every weight as
    policy, so policy ≠ reference by an amount the test chooses."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ref = LlamaForCausalLM(config).double().eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(noise * torch.randn_like(p))
    return policy, ref


@pytest.fixture
def tiny_lm():
    """A 2-layer Llama in float64 with a perturbed copy as policy, so policy ≠ reference."""
    return perturbed_llama_pair(vocab_size=32, num_layers=2, max_positions=64, noise=0.05)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A word-level tokenizer with a small chat template that, like real ones, refuses a
    conversation opening with an assistant turn and closes an assistant turn with EOS (then a newline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "hi", "there"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('a conversation starts with a user or system turn') }}{% endif %}"
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tokenizer


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the session's end-to-end runs: π_SFT is trained once, as in a sweep."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def smoke_cfg(tmp_path, shared_cache):
    """Compose the real config with debug=smoke (a tiny budget) into a fresh run directory."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dpo_exp.components import register_configs

    register_configs()

    def make(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["debug=smoke", f"paths.cache_dir={shared_cache}",
                                               f"paths.output_dir={tmp_path / 'run'}", *overrides])
        OmegaConf.resolve(cfg)
        return cfg

    return make


def read_jsonl(path):
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_wandb_records(path):
    """Records of an offline W&B run file (.wandb): a 7-byte header, then LevelDB-log blocks
    of 32 KiB holding protobuf `Record`s split into FULL/FIRST/MIDDLE/LAST fragments."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # block trailer too small for a header: skip to the next block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def make_cfg(overrides=None):
    """The typed schema with its defaults plus `overrides` (nested dicts): for tests that build
    an algorithm and a loop directly, without a task or a model on disk. The loss section is the selected
    algorithm's own schema (overrides["loss"]["name"], default dpo), the task the preference task's."""
    from omegaconf import OmegaConf

    from dpo_exp.algorithms import ALGORITHMS
    from dpo_exp.config import Config, DataConfig, ModelConfig, OptimizerConfig, TaskConfig

    name = str(((overrides or {}).get("loss") or {}).get("name", "dpo"))
    loss = ALGORITHMS.entry(name).config or ALGORITHMS.entry("sft").config
    base = OmegaConf.structured(Config(model=ModelConfig(name="test"), data=DataConfig(name="test"),
                                       task=TaskConfig(name="preference"), loss=loss(name=name),
                                       optimizer=OptimizerConfig()))
    base.trainer.show_progress = False
    return OmegaConf.merge(base, overrides or {})


def build_loop(cfg, res, sinks=(), output_dir="/tmp/dpo_exp_test_unused", evaluate=None, **settings):
    """The algorithm cfg.loss.name selects, on `res` (dpo_exp.algorithms.Resources), in the shared loop."""
    from dpo_exp.algorithms import ALGORITHMS
    from dpo_exp.loggers import RunLogger
    from dpo_exp.loop import Loop, LoopSettings

    cls = ALGORITHMS[cfg.loss.name]
    algorithm = cls(cfg.loss.name, cfg, res)
    loop_settings = LoopSettings.from_trainer(cfg.trainer, **{**cls.loop_overrides(cfg), **settings})
    return Loop(algorithm, loop_settings, RunLogger(list(sinks)), output_dir, evaluate=evaluate)


def run_cli(*args: str, module: str = "dpo_exp.train") -> None:
    """`python -m MODULE ARGS`, run as `-m` runs it (runpy, as __main__) but in this process, so each run
    skips interpreter and torch start-up: the same Hydra parsing, composition and run directory."""
    import runpy
    import sys
    import warnings

    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with warnings.catch_warnings():  # the test imported the module already; running it as __main__ is intended
            warnings.filterwarnings("ignore", message=f"'{module}' found in sys.modules", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit_:  # Hydra exits non-zero on a failed run
        if exit_.code not in (0, None):
            raise AssertionError(f"python -m {module} {' '.join(args)} exited with {exit_.code}") from exit_
    finally:
        sys.argv = argv


def compose_judging(*overrides: str):
    """conf/judging.yaml (python -m dpo_exp.judge) composed with `overrides`."""
    from hydra import compose, initialize_config_dir

    from dpo_exp.components import register_configs as register_judging_configs

    register_judging_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("judging", overrides=list(overrides))


HUB_KEYS = ("hub_name", "name_or_path", "tokenizer")


def hub_values(node, prefix=""):
    """(key, value) of every hub_name / name_or_path / tokenizer string in a plain (nested dict) config."""
    for key, value in (node.items() if isinstance(node, dict) else ()):
        if isinstance(value, dict):
            yield from hub_values(value, f"{prefix}{key}.")
        elif key in HUB_KEYS and isinstance(value, str):
            yield f"{prefix}{key}", value


def is_local_path(value: str) -> bool:
    """A folder rather than a hub id: absolute, relative, home, an interpolation, or under outputs/ (made by a
    command, e.g. scripts/fetch_smollm2.py)."""
    return value.startswith(("/", ".", "~", "${", "outputs/"))


def assert_valid_hub_ids(values, where: str) -> None:
    """Every value that is not a local path must be a hub id datasets and transformers accept."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    for key, value in values:
        if is_local_path(value):
            continue
        try:
            validate_repo_id(value)  # what datasets.load_dataset and from_pretrained call on a hub id
        except HFValidationError as err:
            raise AssertionError(f"{where}: {key}={value!r} is not a valid hub id: {err}") from None
