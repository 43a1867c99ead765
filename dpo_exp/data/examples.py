"""Rows → validated examples → tokenized batches. The one tokenization path of dpo_exp.

Tokenization follows the DPO authors' code for text: prompt and responses are tokenized
separately, EOS is appended to each response, a long prompt is truncated to
max_prompt_length (keeping its end by default), and responses are cut to fit
max_length. Only response tokens carry loss. Pairs that carry their token ids (sampled
pairs; conversations rendered by a chat template, `dpo_exp.data.chat`) keep them.

Batches are *left*-padded by default: every sequence ends at the last column, so the
response tokens of a whole batch sit in its last R columns. Pairs can instead share their
prompt and be packed without padding (`PairLayout`). A collated batch is a `Batch`, whose fields
say which layout has them. Every layout gives the same log-prob targets: `keep` (N, L), the
positions whose logits are computed (the model projects only those to the vocabulary,
`logits_to_keep`, which saves the LM-head cost of the prompt), and per response token its
predicting kept position (`source`), its id (`labels`), its sequence (`sequence`) and its place
in that sequence's row of per-token outputs (`offset`); `lengths` counts each sequence's
response tokens.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from dpo_exp.data.chat import prompt_token_ids, starts_with_special_token  # noqa: F401  (prompt_token_ids: re-exported)
from dpo_exp.errors import ConfigError

# Attention implementations that take a layout mask, which shared prompts need: a dense (N, 1, L, L) one (sdpa,
# eager) or flex attention's block-sparse BlockMask (layout_mask_mod).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
# FlashAttention kernels take no mask but run packed sequences as one row told apart by restarting positions
# (transformers' variable-length path): they pack, but cannot share a prompt.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and its responses as text, with the exact token ids where text alone does not say them.

    With `chosen_ids` set, tokenization uses the stored ids as they are: sampled pairs keep the prompt's ids
    and each response's sampled tokens (with its end token only if the model emitted one); conversations keep
    the tokens their chat template gives them (`dpo_exp.data.chat`: the prompt with the generation prompt, each
    response through the template's end of turn). Text pairs (datasets) are tokenized, and EOS is appended to
    each response, as the DPO authors did. The texts stay the assistant's plain answers either way.
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
    chosen_ids: list[int]      # response tokens, EOS (a conversation's: the template's end of turn) included
    rejected_ids: list[int]


def save_pairs(pairs: Sequence[PreferencePair], path: Path) -> None:
    path.write_text("".join(p.to_json() + "\n" for p in pairs))


def load_pairs(path: Path) -> list[PreferencePair]:
    with open(path) as handle:
        return [PreferencePair(**json.loads(line)) for line in handle if line.strip()]


def tokenize_pair(tokenizer, pair: PreferencePair, index: int, max_length: int, max_prompt_length: int,
                  keep_prompt_end: bool = True) -> TokenizedPair:
    stored = pair.chosen_ids is not None  # sampled or template tokens, never re-tokenized
    prompt = (list(pair.prompt_ids) if stored and pair.prompt_ids is not None
              else prompt_token_ids(tokenizer, pair.prompt))
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if keep_prompt_end else prompt[:max_prompt_length]
    room = max(max_length - len(prompt), 0)
    if stored:  # sampled pairs fit (config validation: prompt + max_new_tokens <= max_length); conversations are cut
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


@dataclass
class Batch:
    """The tensors of one forward pass: N rows of width L holding S sequences (a prompt and one response each),
    in one of the layouts of `PairLayout`. Padded (collate_sequences; collate_pairs with PADDED): one left-padded
    row per sequence, S = N. Shared prompt and packed (collate_pairs): rows of blocks, a prompt and the
    responses that continue it. A field that only some layouts have says which; it is None in the others.

    The log-prob targets (keep ... offset) say which positions are projected to the vocabulary and which
    response token each predicts, in any layout; T counts the batch's response tokens, K the kept positions.
    """
    input_ids: torch.Tensor       # (N, L)
    position_ids: torch.Tensor    # (N, L)
    attention_mask: torch.Tensor  # padded: (N, L), 1 at tokens, 0 at padding; shared/packed: (N, L, L) bool, True
                                  # where query position i of a row may attend to key position j
    lengths: torch.Tensor         # (S,) response tokens of each sequence
    # padded only: (N, R) True at response tokens, the last R columns (R: the longest response)
    response_mask: Optional[torch.Tensor] = None
    # the log-prob targets: shared/packed batches carry them; a padded batch derives them from its rows
    # (`with_targets`, at the forward), so any subset of its rows stays consistent
    keep: Optional[torch.Tensor] = None      # (N, L) bool, the positions whose logits are computed (row-major: K)
    source: Optional[torch.Tensor] = None    # (T,) per response token, its predicting kept position, 0..K-1
    labels: Optional[torch.Tensor] = None    # (T,) its token id
    sequence: Optional[torch.Tensor] = None  # (T,) its sequence, 0..S-1
    offset: Optional[torch.Tensor] = None    # (T,) its place in its sequence's row of per-token outputs
    # shared/packed only: the attention rule's inputs (layout_mask_mod)
    block: Optional[torch.Tensor] = None     # (N, L) the block of each position, -1 at padding
    segment: Optional[torch.Tensor] = None   # (N, L) 0 in a prompt, s >= 1 in its block's s-th response
    # collate_pairs only: (B,) dataset positions of the pairs; sequences 0..B-1 are their chosen responses,
    # B..2B-1 their rejected ones (with_rejected)
    index: Optional[torch.Tensor] = None

    @property
    def padded(self) -> bool:
        return self.response_mask is not None

    @property
    def pairs(self) -> int:
        """How many pairs a collate_pairs batch holds."""
        return int(self.index.shape[0])

    def with_targets(self) -> "Batch":
        """The batch with its log-prob targets: derived from the rows of a padded batch, else its own."""
        if not self.padded:
            return self
        return replace(self, **padded_targets(self.input_ids, self.response_mask))

    def rows(self, index: torch.Tensor) -> "Batch":
        """The padded batch of these rows (PPO's minibatches); its targets follow from its rows."""
        if not self.padded or self.index is not None:
            raise ValueError("only a padded batch of sequences (collate_sequences) is cut into rows")
        return Batch(self.input_ids[index], self.position_ids[index], self.attention_mask[index],
                     self.lengths[index], self.response_mask[index])

    def to(self, device: torch.device) -> "Batch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def collate_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> Batch:
    """Left-pad prompt+response sequences, one per row: a padded Batch (input_ids, attention_mask, position_ids,
    response_mask over the last R columns, lengths). The log-prob targets follow from these rows (`padded_targets`,
    at the forward).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    resp_width = max(max(len(r) for r in responses), 1)
    if any(responses) and resp_width >= width:
        raise ValueError("every sequence needs at least one prompt token before its response")
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
    return Batch(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 lengths=response_mask.sum(-1), response_mask=response_mask)


def padded_targets(input_ids: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """The log-prob targets of a left-padded batch, from its rows alone (so a batch cut into row subsets, as
    PPO's minibatches are, stays consistent): position t predicts token t + 1, responses in the last R columns."""
    n, width = input_ids.shape
    resp_width = response_mask.shape[1]
    keep = torch.zeros((n, width), dtype=torch.bool, device=input_ids.device)
    keep[:, width - resp_width - 1:width - 1] = response_mask
    rows, columns = response_mask.nonzero(as_tuple=True)  # row-major, as the kept logits are
    return {"keep": keep, "source": torch.arange(rows.shape[0], device=input_ids.device),
            "labels": input_ids[:, -resp_width:][response_mask], "sequence": rows, "offset": columns,
            "lengths": response_mask.sum(-1)}


@dataclass(frozen=True)
class PairLayout:
    """How a batch of pairs is laid out for its forward pass (trainer.share_prompt, trainer.pack).

    - padded (both off): one left-padded row per sequence, chosen rows then rejected rows;
    - share_prompt: one row per pair, [prompt, chosen, rejected], the prompt run once; chosen and rejected
      attend to the prompt and to themselves, not to each other, and both continue the prompt's positions;
    - pack: the pairs' blocks (a shared [prompt, chosen, rejected], or [prompt, chosen] and [prompt, rejected])
      packed into rows of at most pack_length tokens, attention block-diagonal and positions restarting at
      each block, so no FLOP is spent on padding. pack_length null: the micro-batch's longest block; a block
      longer than pack_length gets a row of its own.
    Every layout gives the same log-probs (tests/test_layout.py), in the same order: chosen, then rejected.
    """
    share_prompt: bool = False
    pack: bool = False
    pack_length: Optional[int] = None

    @property
    def padded(self) -> bool:
        return not (self.share_prompt or self.pack)

    @classmethod
    def of(cls, trainer, attention: str) -> "PairLayout":
        """The layout a trainer config asks for (trainer.share_prompt, trainer.pack, trainer.pack_length) with
        the model's attention implementation: share_prompt null shares wherever the attention takes a layout
        mask (MASKED_ATTENTION), where it is as fast as padded rows or faster (scripts/bench_dpo.py --layouts)."""
        share = trainer.share_prompt if trainer.share_prompt is not None else attention in MASKED_ATTENTION
        return cls(bool(share), bool(trainer.pack), trainer.pack_length)


PADDED = PairLayout()


def validate_pair_layout(cfg: Any) -> None:
    """The layout trainer.share_prompt / trainer.pack ask for runs with model.attn_implementation."""
    t, attention = cfg.trainer, cfg.model.attn_implementation
    if t.share_prompt and attention not in MASKED_ATTENTION:
        raise ConfigError(
            f"trainer.share_prompt needs an attention that takes a mask (model.attn_implementation="
            f"{' | '.join(MASKED_ATTENTION)}), not {attention}; set trainer.share_prompt=false to use it"
            + (" (trainer.pack=true still packs with it)" if attention in VARLEN_ATTENTION else ""))
    if t.pack and attention not in MASKED_ATTENTION + VARLEN_ATTENTION:
        raise ConfigError(
            f"trainer.pack needs model.attn_implementation={' | '.join(MASKED_ATTENTION + VARLEN_ATTENTION)}, "
            f"not {attention}; set trainer.pack=false to use it")
    if attention == "flex_attention" and _trains_on_cpu(t.device):
        raise ConfigError("model.attn_implementation=flex_attention trains only on a GPU (torch's flex attention "
                          "has no backward pass on the CPU); use sdpa here")


def _trains_on_cpu(device: str) -> bool:
    return device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, with_rejected: bool = True,
                  layout: PairLayout = PADDED) -> Batch:
    """A micro-batch of pairs for one forward pass of chosen and rejected responses: a Batch in the layout, of 2B
    sequences (B with with_rejected=False) in the order chosen then rejected, with the pairs' `index`.
    """
    if layout.padded or (not layout.pack and not with_rejected):  # one response per prompt: nothing to share
        prompts = [p.prompt_ids for p in pairs]
        responses = [p.chosen_ids for p in pairs]
        if with_rejected:
            prompts = prompts + prompts
            responses = responses + [p.rejected_ids for p in pairs]
        batch = collate_sequences(prompts, responses, pad_id)
    else:
        batch = _collate_blocks(pairs, pad_id, with_rejected, layout)
    batch.index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch


# A block: a prompt and the responses that continue it, each response with its output sequence number.
Block = tuple[list[int], list[tuple[list[int], int]]]


def _collate_blocks(pairs: Sequence[TokenizedPair], pad_id: int, with_rejected: bool, layout: PairLayout) -> Batch:
    b = len(pairs)
    blocks: list[Block] = []
    for i, p in enumerate(pairs):
        if not p.prompt_ids:
            raise ValueError("every sequence needs at least one prompt token before its response")
        if with_rejected and layout.share_prompt:
            blocks.append((p.prompt_ids, [(p.chosen_ids, i), (p.rejected_ids, b + i)]))
        else:
            blocks.append((p.prompt_ids, [(p.chosen_ids, i)]))
            if with_rejected:
                blocks.append((p.prompt_ids, [(p.rejected_ids, b + i)]))
    sizes = [len(prompt) + sum(len(r) for r, _ in responses) for prompt, responses in blocks]
    rows = _pack(sizes, layout.pack_length or max(sizes)) if layout.pack else [[k] for k in range(len(blocks))]
    width = max(sum(sizes[k] for k in row) for row in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    block_of = torch.full((n, width), -1, dtype=torch.long)    # block number of each position, -1: padding
    segment = torch.zeros((n, width), dtype=torch.long)        # 0: prompt, s >= 1: the block's s-th response
    keep = torch.zeros((n, width), dtype=torch.bool)
    targets: list[tuple[int, int, int, int, int]] = []         # (row, predicting column, label, sequence, offset)
    for r, row in enumerate(rows):
        start = 0
        for k in row:
            prompt, responses = blocks[k]
            p = len(prompt)
            input_ids[r, start:start + p] = torch.tensor(prompt)
            position_ids[r, start:start + p] = torch.arange(p)
            block_of[r, start:start + p] = k
            column = start + p
            for s, (response, sequence) in enumerate(responses, start=1):
                m = len(response)
                input_ids[r, column:column + m] = torch.tensor(response, dtype=torch.long)
                position_ids[r, column:column + m] = torch.arange(p, p + m)
                block_of[r, column:column + m] = k
                segment[r, column:column + m] = s
                predictors = [start + p - 1] + list(range(column, column + m - 1))  # the last prompt token, then each previous
                targets += [(r, c, t, sequence, j) for j, (c, t) in enumerate(zip(predictors, response))]
                column += m
            start = column
    rows_t, cols_t, labels, sequence, offset = (torch.tensor(v, dtype=torch.long) for v in zip(*targets))
    keep[rows_t, cols_t] = True
    flat = torch.full((n * width,), -1, dtype=torch.long)
    flat[keep.flatten()] = torch.arange(int(keep.sum()))                  # kept logits are row-major
    columns = torch.arange(width)
    mask = layout_mask_mod(block_of, segment)(torch.arange(n)[:, None, None], None, columns[:, None], columns)
    lengths = torch.zeros(2 * b if with_rejected else b, dtype=torch.long).index_add_(0, sequence, torch.ones_like(sequence))
    return Batch(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, lengths=lengths, keep=keep,
                 source=flat[rows_t * width + cols_t], labels=labels, sequence=sequence, offset=offset,
                 block=block_of, segment=segment)


def layout_mask_mod(block: torch.Tensor, segment: torch.Tensor):
    """The shared/packed layouts' attention rule as a mask function of (row, head, query, key) indices, the form
    flex attention's create_block_mask takes; called on broadcast index tensors it gives the dense (N, L, L) mask.

    block, segment: (N, L), each position's block (-1: padding) and part of it (0: the prompt, s >= 1: the s-th
    response). A position sees the earlier positions of its own block that are prompt or its own response;
    a padding position sees itself only (no empty softmax row).
    """
    def visible(b, h, q, kv):
        query_block, key_segment = block[b, q], segment[b, kv]
        same = (query_block == block[b, kv]) & (query_block >= 0) & (kv <= q)
        return (same & ((key_segment == 0) | (key_segment == segment[b, q]))) | (q == kv)

    return visible


def _pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """Blocks into rows of at most `capacity` tokens, first fit in decreasing size (a longer block: its own row);
    each row keeps its blocks in their original order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        for r, free in enumerate(room):
            if sizes[k] <= free:
                rows[r].append(k)
                room[r] -= sizes[k]
                break
        else:
            rows.append([k])
            room.append(capacity - sizes[k])
    return [sorted(row) for row in rows]
