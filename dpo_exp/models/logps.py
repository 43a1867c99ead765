"""The one log-prob path: log π(response tokens | prompt) of a left-padded batch.

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
from dpo_exp.data import collate_sequences
from dpo_exp.models.sampling import Samples


@dataclass
class SequenceLogps:
    logps: torch.Tensor                    # (N,) summed log-probs of response tokens
    lengths: torch.Tensor                  # (N,) response token counts
    tokens: Optional[torch.Tensor] = None  # (N, R) per-token log-probs, 0 off the response (per_token=True)
    entropy: Optional[torch.Tensor] = None  # (N, R) entropy of π_T at each response token (with_entropy=True)


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
    """log π_T(response | prompt) for each row of a left-padded batch (data.collate_sequences).

    batch: input_ids, attention_mask, position_ids (N, L); response_mask (N, R) over the last R
    columns. temperature: log-probs of softmax(logits / T) (T = 1: π itself).
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a temperature > 0 (got {temperature})")
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
    if temperature != 1.0:
        logits = logits / temperature
    labels = input_ids[:, -width:][mask]                                    # (K,)
    token_logps = -F.cross_entropy(logits, labels, reduction="none")        # (K,)
    rows = torch.arange(n, device=device).unsqueeze(1).expand(n, width)[mask]
    logps = torch.zeros(n, dtype=token_logps.dtype, device=device).index_add(0, rows, token_logps)
    result = SequenceLogps(logps, mask.sum(-1))
    if per_token:
        result.tokens = _scatter(token_logps, mask)
    if with_entropy:
        with torch.no_grad():  # a diagnostic: H(π_T) = logsumexp(l) − Σ softmax(l)·l
            entropy = torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)
        result.entropy = _scatter(entropy, mask)
    return result


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(K,) values of the True positions of mask (row-major) → (N, R), 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


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
