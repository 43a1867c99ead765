"""Rows → validated examples → tokenized batches. The one tokenization path of dpo_exp.

Tokenization follows the DPO authors' code: prompt and responses are tokenized
separately, EOS is appended to each response, a long prompt is truncated to
max_prompt_length (keeping its end by default), and responses are cut to fit
max_length. Only response tokens carry loss.

Batches are *left*-padded: every sequence ends at the last column, so the response
tokens of a whole batch sit in its last R columns and the model need only project
those positions to the vocabulary (`logits_to_keep`), which saves the LM-head cost of
the prompt.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and its responses as text; sampled pairs also keep the exact token ids the model produced.

    With `chosen_ids` set (sampled pairs), tokenization uses the stored ids as they are: the prompt's ids,
    and each response's sampled tokens with its EOS only if the model emitted one. Text pairs (datasets)
    are tokenized, and EOS is appended to each response, as the DPO authors did.
    """
    prompt: str
    chosen: str
    rejected: Optional[str] = None  # None for SFT-only examples; "" is a real empty response (EOS only)
    prompt_ids: Optional[list[int]] = None
    chosen_ids: Optional[list[int]] = None
    rejected_ids: Optional[list[int]] = None

    def to_json(self) -> str:
        """One JSON line; fields that are None (an SFT example's rejected, a text pair's ids) are left out."""
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None or k in ("prompt", "chosen")})


@dataclass(frozen=True)
class TokenizedPair:
    index: int                 # position in its dataset; keys precomputed reference log-probs
    prompt_ids: list[int]
    chosen_ids: list[int]      # response tokens, EOS included
    rejected_ids: list[int]


def save_pairs(pairs: Sequence[PreferencePair], path: Path) -> None:
    path.write_text("".join(p.to_json() + "\n" for p in pairs))


def load_pairs(path: Path) -> list[PreferencePair]:
    with open(path) as handle:
        return [PreferencePair(**json.loads(line)) for line in handle if line.strip()]


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt tokens with the tokenizer's own special tokens (BOS for Llama-style)."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:  # an empty prompt still needs a token to condition on
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids


def tokenize_pair(tokenizer, pair: PreferencePair, index: int, max_length: int, max_prompt_length: int,
                  keep_prompt_end: bool = True) -> TokenizedPair:
    sampled = pair.chosen_ids is not None  # the exact sampled tokens, never re-tokenized
    prompt = list(pair.prompt_ids) if sampled and pair.prompt_ids is not None else prompt_token_ids(tokenizer, pair.prompt)
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if keep_prompt_end else prompt[:max_prompt_length]
    room = max(max_length - len(prompt), 0)
    if sampled:  # config validation makes prompt + max_new_tokens fit max_length, so nothing is cut here
        rejected = [] if pair.rejected_ids is None else list(pair.rejected_ids)[:room]
        return TokenizedPair(index, prompt, list(pair.chosen_ids)[:room], rejected)

    def response(text: Optional[str]) -> list[int]:
        if text is None:  # an SFT-only example has no rejected response
            return []
        # An empty text is a response too: a sample that stopped at once is its EOS alone.
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] if text else []) + [tokenizer.eos_token_id]
        return ids[:room]

    return TokenizedPair(index, prompt, response(pair.chosen), response(pair.rejected))


def tokenize_dataset(tokenizer, pairs: Sequence[PreferencePair], max_length: int, max_prompt_length: int,
                     keep_prompt_end: bool = True) -> tuple[list[TokenizedPair], dict[str, int]]:
    """tokenize_pair over a dataset, for training and evaluation: a pair that would keep no token of a response
    (the prompt fills max_length) is dropped and counted ("no_response_tokens"), never trained on with a 0/0 length
    normalisation; kept pairs are indexed 0..n-1 in order (the key of precomputed reference log-probs)."""
    kept: list[TokenizedPair] = []
    for pair in pairs:
        tok = tokenize_pair(tokenizer, pair, len(kept), max_length, max_prompt_length, keep_prompt_end)
        if tok.chosen_ids and (pair.rejected is None or tok.rejected_ids):
            kept.append(tok)
    dropped = len(pairs) - len(kept)
    return kept, ({"no_response_tokens": dropped} if dropped else {})


def collate_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> dict:
    """Left-pad prompt+response sequences.

    Returns input_ids, attention_mask, position_ids: (N, L); response_mask: (N, R) over
    the last R columns, R the longest response.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    resp_width = max(max(len(r) for r in responses), 1)
    n = len(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, resp_width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = p + r
        input_ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq):] = 1
        if r:
            response_mask[i, resp_width - len(r):] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "response_mask": response_mask}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, with_rejected: bool = True) -> dict:
    """Chosen sequences first, then rejected ones: one concatenated forward pass for both.

    Returns the collate_sequences tensors over 2B rows (B with with_rejected=False) and
    `index`: (B,) dataset positions of the pairs.
    """
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs]
    if with_rejected:
        prompts = prompts + prompts
        responses = responses + [p.rejected_ids for p in pairs]
    batch = collate_sequences(prompts, responses, pad_id)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch
