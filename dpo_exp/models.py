"""Policy and reference models: loading, log-probs of responses, sampling.

Log-probs are always taken from float32 logits: a bf16 log-softmax measurably changes
DPO training (reference.md §5: accuracy 0.75 vs 0.95).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
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
    """Summed log π(response | prompt) for each row of a left-padded batch (data.collate_sequences)."""
    device = next(model.parameters()).device
    mask = batch["response_mask"].to(device)
    width = mask.shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1]                          # (N, R, V): predictions of the last R tokens
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    labels = batch["input_ids"][:, -width:].to(device)    # (N, R)
    token_logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    token_logps = token_logps * mask
    return SequenceLogps(token_logps.sum(-1), mask.sum(-1))


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
        out = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
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
