"""Policy and reference models: loading, log-probs of responses, sampling.

Log-probs are always taken from float32 logits: a bf16 log-softmax measurably changes
DPO training (reference.md §5: accuracy 0.75 vs 0.95).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dpo_exp.data import collate_sequences

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no EOS token; responses need one")
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
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model


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


@dataclass
class SequenceLogps:
    logps: torch.Tensor   # (N,) summed log-probs of response tokens
    lengths: torch.Tensor  # (N,) response token counts


def sequence_logps(model: PreTrainedModel, batch: dict) -> SequenceLogps:
    """Summed log π(response | prompt) for each row of a left-padded batch (data.collate_sequences).

    Only the positions that predict a real response token go through the LM head (a boolean
    `logits_to_keep`), so padding and prompt positions never cost a (V,)-wide float32 row.
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["response_mask"].to(device)                     # (N, R) over the last R tokens
    n, total = input_ids.shape
    width = mask.shape[1]
    if width >= total:
        raise ValueError("every sequence needs at least one prompt token before its response")
    predicts = torch.zeros((n, total), dtype=torch.bool, device=device)
    predicts[:, total - width - 1:total - 1] = mask               # position t predicts token t + 1
    out = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), logits_to_keep=predicts, use_cache=False)
    logits = out.logits if out.logits.dim() == 2 else out.logits[predicts]  # (K, V), row-major order
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    labels = input_ids[:, -width:][mask]                                    # (K,)
    token_logps = -F.cross_entropy(logits, labels, reduction="none")
    rows = torch.arange(n, device=device).unsqueeze(1).expand(n, width)[mask]
    logps = torch.zeros(n, dtype=token_logps.dtype, device=device).index_add(0, rows, token_logps)
    return SequenceLogps(logps, mask.sum(-1))


@dataclass
class Samples:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]   # sampled tokens up to and including EOS (if emitted)
    texts: list[str]                # decoded responses, special tokens removed, spacing kept exactly


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 128) -> Samples:
    """Sample one response per prompt with the KV cache (model.generate), left-padded batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[start:start + batch_size])
        batch = collate_sequences(chunk, [[] for _ in chunk], tokenizer.pad_token_id)
        # temperature 0 means greedy decoding (the paper's TL;DR evaluation includes T = 0)
        decoding = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0
                    else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
        out = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            **decoding)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id) + 1]
            responses.append(row)
    model.train(was_training)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples([list(p) for p in prompt_ids], responses, texts)


@torch.no_grad()
def logps_of_samples(model: PreTrainedModel, samples: Samples, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N,) summed log-probs of sampled responses under `model` (for KL estimates)."""
    out = []
    for start in range(0, len(samples.response_ids), batch_size):
        end = start + batch_size
        batch = collate_sequences(samples.prompt_ids[start:end], samples.response_ids[start:end], pad_id)
        out.append(sequence_logps(model, batch).logps.cpu())
    return torch.cat(out)
