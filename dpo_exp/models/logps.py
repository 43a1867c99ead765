"""The one log-prob path: log π(response tokens | prompt) of a batch in any layout (left-padded, shared
prompt, packed; dpo_exp.data.examples).

Every algorithm takes its log-probs here: summed per sequence (DPO family, SFT, evaluation,
KL), or per token with an optional entropy (PPO, online DPO), at temperature 1 or at the
sampling temperature (PPO's π_T = softmax(logits / T)).

Only the positions that predict a real response token go through the LM head (a boolean
`logits_to_keep`), so padding and prompt positions never cost a (V,)-wide row, and the
kept logits are upcast to float32 before the log-softmax: a bf16 log-softmax measurably
changes DPO training (reference.md §5: accuracy 0.75 vs 0.95).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from dpo_exp import distributed
from dpo_exp.config import MASKED_ATTENTION, VARLEN_ATTENTION
from dpo_exp.data import collate_sequences
from dpo_exp.data.examples import layout_mask_mod, padded_targets
from dpo_exp.models.sampling import Samples


@dataclass
class SequenceLogps:
    logps: torch.Tensor                    # (N,) summed log-probs of response tokens
    lengths: torch.Tensor                  # (N,) response token counts
    tokens: Optional[torch.Tensor] = None  # (N, R) per-token log-probs, 0 off the response (per_token=True)
    entropy: Optional[torch.Tensor] = None  # (N, R) entropy of π_T at each response token (with_entropy=True)
    mask: Optional[torch.Tensor] = None     # (N, R) True at response tokens: where tokens/entropy are, in any layout


@dataclass
class PairLogps:
    chosen: torch.Tensor             # (B,) summed log-probs
    rejected: Optional[torch.Tensor]  # (B,) or None when the rejected side was not computed
    chosen_length: torch.Tensor      # (B,) response tokens
    rejected_length: Optional[torch.Tensor]

    def to(self, device: torch.device) -> "PairLogps":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairLogps(move(self.chosen), move(self.rejected), move(self.chosen_length), move(self.rejected_length))

    @classmethod
    def split(cls, seq: SequenceLogps, with_rejected: bool) -> "PairLogps":
        """Rows of a collate_pairs batch: chosen first, then rejected."""
        if not with_rejected:
            return cls(seq.logps, None, seq.lengths, None)
        b = seq.logps.shape[0] // 2
        return cls(seq.logps[:b], seq.logps[b:], seq.lengths[:b], seq.lengths[b:])


def sequence_logps(model: PreTrainedModel, batch: dict, temperature: float = 1.0, per_token: bool = False,
                   with_entropy: bool = False) -> SequenceLogps:
    """log π_T(response | prompt) of every sequence of a batch in any layout (data.collate_sequences,
    data.collate_pairs with a PairLayout).

    batch: input_ids, position_ids (N, L); attention_mask, an (N, L) padding mask or an (N, L, L) boolean
    mask; the targets keep, source, labels, sequence, offset and lengths (data.examples). temperature:
    log-probs of softmax(logits / T) (T = 1: π itself). Per-token outputs are (S, R), each token at its offset.
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a temperature > 0 (got {temperature})")
    device = next(model.parameters()).device
    if "response_mask" in batch:  # left-padded: the targets follow from its rows
        batch = {**batch, **padded_targets(batch["input_ids"], batch["response_mask"])}
    inputs = _model_inputs(model, batch, device)
    out = model(**inputs, use_cache=False)
    logits = out.logits if out.logits.dim() == 2 else out.logits[inputs["logits_to_keep"]]  # (K, V), row-major
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    if temperature != 1.0:
        logits = logits / temperature
    source, labels, sequence = (batch[k].to(device) for k in ("source", "labels", "sequence"))
    token_logps = TokenLogps.apply(logits, source, labels)                      # (T,)
    lengths = batch["lengths"].to(device)
    logps = torch.zeros(lengths.shape[0], dtype=token_logps.dtype, device=device).index_add(0, sequence, token_logps)
    result = SequenceLogps(logps, lengths)
    if per_token or with_entropy:
        offset = batch["offset"].to(device)
        width = (batch["response_mask"].shape[1] if "response_mask" in batch  # left-padded: its (N, R) layout
                 else int(offset.max()) + 1 if offset.numel() else 1)
        scatter = lambda values: torch.zeros((lengths.shape[0], width), dtype=values.dtype,  # noqa: E731
                                             device=device).index_put((sequence, offset), values)
        result.mask = scatter(torch.ones_like(token_logps, dtype=torch.bool))
        if per_token:
            result.tokens = scatter(token_logps)
        if with_entropy:
            with torch.no_grad():  # a diagnostic: H(π_T) = logsumexp(l) − Σ softmax(l)·l
                entropy = torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)
            result.entropy = scatter(entropy[source])
    return result


class TokenLogps(torch.autograd.Function):
    """Token log-probs log softmax(l_k)[y_t] = l_k[y_t] - logsumexp(l_k) of kept rows k = source[t], with the
    gradient written in one (K, V) pass: dL/dl_k = Σ_{t: source[t]=k} g_t (onehot(y_t) - softmax(l_k)).

    Compared with a cross-entropy per target, nothing (K, V)-wide is kept for backward but the logits themselves
    (log-softmax keeps its output), a row may predict several targets (in a shared-prompt batch the prompt's last
    position predicts both responses' first tokens) without gathering its logits twice, and the backward is one
    softmax scaled in place instead of a log-softmax backward plus a gather's zero-filled (K, V) gradient
    (forward and backward at the benchmark's K = 1600, V = 8192, timed ad hoc: 18-21 ms against 31 ms).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, source: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # logsumexp from one column of a log-softmax: its row-at-a-time kernel reads the logits from memory once,
        # where torch.logsumexp makes separate (K, V) passes (max, subtract, exp); the log-softmax is not kept
        lse = logits[:, 0] - torch.log_softmax(logits, dim=-1)[:, 0]
        ctx.save_for_backward(logits, source, labels)
        return logits[source, labels] - lse[source]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, source, labels = ctx.saved_tensors
        per_row = torch.zeros(logits.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, source, grad)
        out = torch.softmax(logits, dim=-1).mul_(-per_row.unsqueeze(1))  # −(Σ_t g_t) softmax(l_k), row by row
        return out.index_put_((source, labels), grad, accumulate=True), None, None


def _model_inputs(model: PreTrainedModel, batch: dict, device: torch.device) -> dict:
    """The model's inputs for a batch, its mask as the model's attention takes it (MASKED_ATTENTION,
    VARLEN_ATTENTION): a padding mask as it is; a layout's (N, L, L) mask as (N, 1, L, L), boolean for sdpa (True:
    attend) and additive in the model's dtype for eager; for flex attention a BlockMask of the same rule, whose
    empty blocks (other pairs, the other response) are skipped; for FlashAttention no mask at all: the packed rows'
    tokens as one row, padding dropped, which transformers runs through the variable-length kernel with sequences
    told apart by their restarting positions (a shared prompt cannot be said that way)."""
    inputs = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
              "logits_to_keep": batch["keep"].to(device)}
    mask = batch["attention_mask"].to(device)
    if mask.dim() == 2:
        return {**inputs, "attention_mask": mask}
    implementation = getattr(model.config, "_attn_implementation", None) or "eager"
    if implementation in VARLEN_ATTENTION:
        if int(batch["segment"].max()) > 1:
            raise ValueError(f"model.attn_implementation={implementation} takes no mask, so it cannot share a "
                             f"prompt between two responses; set trainer.share_prompt=false (trainer.pack still works)")
        real = batch["block"].to(device) >= 0  # row-major, so the kept logits keep their order
        return {name: value[real].unsqueeze(0) for name, value in inputs.items()} | {"attention_mask": None}
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        n, width = mask.shape[:2]
        rule = layout_mask_mod(batch["block"].to(device), batch["segment"].to(device))
        return {**inputs, "attention_mask": create_block_mask(rule, n, None, width, width, device=device)}
    mask = mask.unsqueeze(1)
    if implementation == "sdpa":
        return {**inputs, "attention_mask": mask}
    if implementation == "eager":
        dtype = next(model.parameters()).dtype
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
        return {**inputs, "attention_mask": torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min)}
    raise ValueError(f"trainer.share_prompt / trainer.pack need model.attn_implementation="
                     f"{' | '.join(MASKED_ATTENTION + VARLEN_ATTENTION)} (got {implementation!r}); set them to false "
                     f"for this attention")


@torch.no_grad()
def logps_of_samples(model: PreTrainedModel, samples: Samples, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N,) summed log-probs of sampled responses under `model` (for KL estimates); each rank of a torchrun job
    scores its share of the rows and every rank gets them all."""
    def score(rows: list[int]) -> list[float]:
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = collate_sequences([samples.prompt_ids[i] for i in chunk], [samples.response_ids[i] for i in chunk],
                                      pad_id)
            out.extend(sequence_logps(model, batch).logps.cpu().tolist())
        return out

    return torch.tensor(distributed.map_shared(range(len(samples.response_ids)), score))
