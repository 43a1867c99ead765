"""Sampling responses with the KV cache (model.generate) from left-padded prompt batches.

A response stops at the first of the model's stop tokens (`dpo_exp.models.templates.stop_token_ids`: the generation
config's EOS ids, the tokenizer's EOS, the chat template's end of turn) and keeps it; `Samples.ended` says which
responses reached one, the one answer to "did the response end" (PPO's missing-EOS penalty, truncated counts)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from transformers import PreTrainedModel

from dpo_exp import distributed
from dpo_exp.data import collate_sequences
from dpo_exp.models.templates import stop_token_ids


@dataclass
class Samples:
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]   # sampled tokens up to and including the first stop token (if emitted)
    texts: list[str]                # decoded responses, special tokens removed, spacing kept exactly
    ended: list[bool]               # the response ends with a stop token (else it reached max_new_tokens)


@torch.no_grad()
def sample(model: PreTrainedModel, tokenizer, prompt_ids: Sequence[list[int]], max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 128) -> Samples:
    """Sample one response per prompt with the KV cache (model.generate), left-padded batches. Inside `keeping`,
    finished batches are kept and an interrupted call continues after them.

    Under torchrun every rank passes the same prompts and gets every response: each samples its own share
    (dpo_exp.distributed.map_shared) with generate(synced_gpus=True), so sharded weights are gathered
    layer by layer as in training and a rank that has finished keeps joining the others' forward passes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seed = distributed.sampling_seed()
    synced = distributed.world_size() > 1
    stops = stop_token_ids(tokenizer, getattr(model, "generation_config", None))

    kept = _next_kept() if distributed.world_size() == 1 else None  # where finished batches are kept, if anywhere

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        responses: list[list[int]] = _resume(kept, prompts, device) if kept else []
        for start in range(len(responses), len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            batch = collate_sequences(chunk, [[] for _ in chunk], tokenizer.pad_token_id)
            # temperature 0 means greedy decoding (the paper's TL;DR evaluation includes T = 0)
            decoding = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature > 0
                        else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
            out = model.generate(
                input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops, synced_gpus=synced, **decoding)
            for row in out[:, batch.input_ids.shape[1]:].tolist():
                end = next((i for i, token in enumerate(row) if token in stops), None)
                responses.append(row if end is None else row[:end + 1])
            if kept:
                _keep(kept, prompts, responses, device)
        return responses

    with _seeded(seed, device):
        responses = distributed.map_shared(prompt_ids, generate)
    model.train(was_training)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Samples([list(p) for p in prompt_ids], responses, texts, [bool(r) and r[-1] in stops for r in responses])


_keeping: list = []  # [folder, calls so far] while `keeping` is active


@contextlib.contextmanager
def keeping(folder: Path) -> Iterator[None]:
    """Inside the block (a single process, e.g. a cache build), each `sample` call keeps its finished batches and the
    random state after them in folder/samples_<call>.pt, written after each batch; the same calls rerun after an
    interruption continue after them and sample the same responses as uninterrupted calls."""
    _keeping.append([Path(folder), 0])
    try:
        yield
    finally:
        _keeping.pop()


def _next_kept() -> Optional[Path]:
    if not _keeping:
        return None
    folder, calls = _keeping[-1]
    _keeping[-1][1] += 1
    return folder / f"samples_{calls}.pt"


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _keep(path: Path, prompts: list[list[int]], responses: list[list[int]], device: torch.device) -> None:
    """Write the finished batches and the random state after them (whole: through a file renamed over the old)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"prompts": prompts, "responses": responses, "rng": _rng_state(device)}, tmp)
    os.replace(tmp, path)


def _resume(path: Path, prompts: list[list[int]], device: torch.device) -> list[list[int]]:
    """The finished batches kept for these prompts, with the random state restored to after them; [] if none."""
    if not path.is_file():
        return []
    saved = torch.load(path, weights_only=True)
    if saved["prompts"] != prompts:  # kept for another call: start over
        return []
    torch.set_rng_state(saved["rng"]["cpu"])
    if saved["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    return saved["responses"]


@contextlib.contextmanager
def _seeded(seed, device: torch.device):
    """Sample under `seed` in a forked generator (this rank's own noise), or as is when seed is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
