"""Building models: tokenizers, causal LMs from a config or a checkpoint, LoRA, dtypes, devices."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dpo_exp.distributed import launched_world_size
from dpo_exp.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """trainer.device as a device; under torchrun `auto` and `cuda` are this rank's own GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    with loadable(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {name_or_path} has no EOS token; responses need one")
    if tokenizer.pad_token_id is None:  # e.g. gpt2; masks make the pad id's value irrelevant
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """A byte-level BPE tokenizer trained on `texts` (tokenizers library), saved with save_pretrained.

    Special tokens: <pad> (distinct from EOS, as RLHF code needs), <s> (BOS, prepended to
    every encoded text) and </s> (EOS, appended to responses by the data pipeline).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            padding_side="left").save_pretrained(out_dir)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in policy and reference (DPO authors' default): log-probs must be deterministic."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def new_model(architecture: dict, tokenizer, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """A randomly initialised causal LM from transformers config kwargs."""
    kwargs = dict(architecture)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    disable_dropout(model)
    return model


def load_model(name_or_path: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False) -> PreTrainedModel:
    with loadable(name_or_path, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model


@contextlib.contextmanager
def loadable(name_or_path: str, what: str):
    """A model or tokenizer that cannot be loaded (no such folder, a hub name without a network, a folder
    without weights) as a ConfigError that says which and why, not a traceback from deep in transformers."""
    try:
        yield
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        offline = "" if Path(name_or_path).exists() else (
            " (a hub name needs a network, or the model in the local Hugging Face cache; a folder must exist)")
        raise ConfigError(f"cannot load the {what} {name_or_path!r}: {reason}{offline}") from err


def apply_lora(model: PreTrainedModel, lora) -> nn.Module:
    """Wrap the policy with a peft LoRA adapter (model.lora.r > 0); only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules="all-linear" if targets == ["all-linear"] else targets)
    return get_peft_model(model, config)


class AdapterDisabled(nn.Module):
    """π_ref of a LoRA policy: the policy's own base weights with the adapter switched off.

    No second copy of the weights exists; forward and generate run the shared base model.
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model

    @property
    def generation_config(self):
        """The policy's: where its samples stop (dpo_exp.models.templates.stop_token_ids)."""
        return self.peft_model.generation_config

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    @torch.no_grad()
    def generate(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model.generate(**kwargs)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


