"""The one log-prob path: log π(response tokens | prompt) of a batch in any layout (left-padded, shared
prompt, packed; dpo_exp.data.examples).

Every algorithm takes its log-probs here: summed per sequence (DPO family, SFT, evaluation,
KL), or per token with an optional entropy (PPO, online DPO), at temperature 1 or at the
sampling temperature (PPO's π_T = softmax(logits / T)).

Only the positions that predict a real response token go through the LM head (a boolean
`logits_to_keep`), so padding and prompt positions never cost a (V,)-wide row, and the
kept logits are upcast to float32 before the log-softmax: a bf16 log-softmax measurably
changes DPO training (reference.md §5).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from dpo_exp import distributed
from dpo_exp.errors import ConfigError
from dpo_exp.data import Batch, collate_sequences
from dpo_exp.data.examples import MASKED_ATTENTION, VARLEN_ATTENTION, layout_mask_mod
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


def sequence_logps(model: PreTrainedModel, batch: Batch, temperature: float = 1.0, per_token: bool = False,
                   with_entropy: bool = False, chunk_tokens: Optional[int] = None) -> SequenceLogps:
    """log π_T(response | prompt) of every sequence of a batch in any layout (data.collate_sequences,
    data.collate_pairs with a PairLayout).

    batch: any layout's Batch (a padded one's targets are derived here). temperature:
    log-probs of softmax(logits / T) (T = 1: π itself). Per-token outputs are (S, R), each token at its offset.
    chunk_tokens: kept positions per LM-head chunk (None: the run's setting, set_logits_chunk_tokens); when the
    batch keeps more, the head's logits exist one chunk at a time (ChunkedHeadLogps).
    """
    if temperature <= 0:
        raise ValueError(f"log-probs need a temperature > 0 (got {temperature})")
    device = next(model.parameters()).device
    batch = batch.with_targets()
    inputs = _model_inputs(model, batch, device)
    source, labels, sequence = batch.source.to(device), batch.labels.to(device), batch.sequence.to(device)
    head = chunkable_head(model)
    kept = int(batch.keep.sum())
    chunk = chunk_size(head.out_features if head is not None else 0, chunk_tokens)
    if head is not None and 0 < chunk < kept:
        with _head_input_captured(head) as captured:
            model(**inputs, use_cache=False)
        token_logps, row_entropy = ChunkedHeadLogps.apply(
            captured.hidden, head.weight, head.bias, source, labels,
            HeadMath.of(model, device, temperature), chunk, with_entropy)
    else:
        out = model(**inputs, use_cache=False)
        logits = out.logits if out.logits.dim() == 2 else out.logits[inputs["logits_to_keep"]]  # (K, V), row-major
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
        if temperature != 1.0:
            logits = logits / temperature
        token_logps = TokenLogps.apply(logits, source, labels)                      # (T,)
        row_entropy = None
        if with_entropy:
            with torch.no_grad():  # a diagnostic: H(π_T) = logsumexp(l) − Σ softmax(l)·l
                row_entropy = torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)
    if not token_logps.requires_grad:  # no backward will free the gathered root's weights (distributed.shard)
        distributed.reshard(unwrapped(model))
    lengths = batch.lengths.to(device)
    logps = torch.zeros(lengths.shape[0], dtype=token_logps.dtype, device=device).index_add(0, sequence, token_logps)
    result = SequenceLogps(logps, lengths)
    if per_token or with_entropy:
        offset = batch.offset.to(device)
        width = (batch.response_mask.shape[1] if batch.padded  # left-padded: its (N, R) layout
                 else int(offset.max()) + 1 if offset.numel() else 1)
        scatter = lambda values: torch.zeros((lengths.shape[0], width), dtype=values.dtype,  # noqa: E731
                                             device=device).index_put((sequence, offset), values)
        result.mask = scatter(torch.ones_like(token_logps, dtype=torch.bool))
        if per_token:
            result.tokens = scatter(token_logps)
        if with_entropy:
            result.entropy = scatter(row_entropy[source])
    return result


class TokenLogps(torch.autograd.Function):
    """Token log-probs log softmax(l_k)[y_t] = l_k[y_t] - logsumexp(l_k) of kept rows k = source[t], with the
    gradient written in one (K, V) pass: dL/dl_k = Σ_{t: source[t]=k} g_t (onehot(y_t) - softmax(l_k)).

    Compared with a cross-entropy per target, nothing (K, V)-wide is kept for backward but the logits themselves
    (log-softmax keeps its output), a row may predict several targets (in a shared-prompt batch the prompt's last
    position predicts both responses' first tokens) without gathering its logits twice, and the backward is one
    softmax scaled in place instead of a log-softmax backward plus a gather's zero-filled (K, V) gradient.
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


# ---- Chunked LM head: the kept positions' logits one chunk at a time --------------------------------------------

# float32 logits of one chunk when trainer.logits_chunk_tokens is null (auto). At a 128k vocabulary and 2,048-token
# pairs a 256 MiB chunk peaked 1.1 GiB higher on the CPU (bench_dpo --vocab-table); 64 MiB chunks still multiply
# 130 x hidden x 128k per call, large enough for a GPU's matmul.
CHUNK_BYTES = 64 * 2 ** 20
_run_chunk_tokens: Optional[int] = None  # trainer.logits_chunk_tokens of the run in this process


def set_logits_chunk_tokens(tokens: Optional[int]) -> None:
    """The run's trainer.logits_chunk_tokens for every sequence_logps call in this process: None is auto (chunks
    of at most CHUNK_BYTES of float32 logits), 0 never chunks, N chunks by N kept positions."""
    global _run_chunk_tokens
    if tokens is not None and tokens < 0:
        raise ConfigError(f"trainer.logits_chunk_tokens must be >= 0 or null (got {tokens})")
    _run_chunk_tokens = tokens


def chunk_size(vocab_size: int, tokens: Optional[int] = None) -> int:
    """Kept positions per LM-head chunk (0: never chunk): `tokens`, else the run's setting, else auto, where
    auto keeps one chunk's float32 logits within CHUNK_BYTES (2,048 positions at a 8,192-token vocabulary,
    130 at Llama-3's 128,256, 64 at Gemma-3's 262,144), at least 64."""
    tokens = _run_chunk_tokens if tokens is None else tokens
    if tokens is not None:
        return tokens
    return max(64, CHUNK_BYTES // (4 * vocab_size)) if vocab_size else 0


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself; for π_ref as AdapterDisabled, the LoRA policy whose base weights it runs."""
    return getattr(model, "peft_model", model)


def model_config(model: torch.nn.Module):
    """The transformers config of a model, also of π_ref as AdapterDisabled."""
    return getattr(unwrapped(model), "config", None)


def chunkable_head(model: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The model's LM head when the chunked path can compute it from its weight: a plain nn.Linear (tied or not).
    None for a head it cannot (a LoRA-adapted or quantized head, a model without get_output_embeddings); those
    take the model's own logits."""
    inner = unwrapped(model)
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if getter is not None else None
    return head if type(head) is torch.nn.Linear else None


class _Captured:
    hidden: torch.Tensor  # (K, H) the head's input: the kept positions' final hidden states


@contextlib.contextmanager
def _head_input_captured(head: torch.nn.Module):
    """While the model runs, take the LM head's input (the kept positions' final hidden states, after every
    model-specific step before the head) and hand the head none of its rows, so the model's own (K, V) logits
    are never computed. The whole model still runs its forward, so FSDP2 gathers the root's weights (head
    included) as it always does; the root keeps them gathered until its backward."""
    captured = _Captured()

    def take(module, args):
        captured.hidden = args[0]
        return (args[0][..., :0, :],)

    handle = head.register_forward_pre_hook(take)
    try:
        yield captured
    finally:
        handle.remove()
    if not hasattr(captured, "hidden"):
        raise RuntimeError(f"{type(head).__name__} was not called by the model's forward; set "
                           f"trainer.logits_chunk_tokens=0 for this model")


@dataclass(frozen=True)
class HeadMath:
    """What a model does to its head's output before the log-softmax: the matmul's dtype (autocast's, else the
    weight's), a scale (Cohere's logit_scale, Granite's 1/logits_scaling), Gemma-2/3's final soft-capping
    c·tanh(x/c), and the sampling temperature; the log-softmax always in float32."""
    dtype: Optional[torch.dtype]  # None: the weight's
    scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    @classmethod
    def of(cls, model: torch.nn.Module, device: torch.device, temperature: float) -> "HeadMath":
        config = model_config(model)
        config = getattr(config, "get_text_config", lambda: config)()
        scale = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            scale /= float(config.logits_scaling)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        return cls(dtype, scale, getattr(config, "final_logit_softcapping", None), temperature)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        """(c, H) -> the float32 logits divided by T, (c, V), and the capped logits before T (for backward)."""
        dtype = self.dtype or weight.dtype
        z = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        z = z.to(self.accumulate(weight))
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return (z / self.temperature if self.temperature != 1.0 else z), z

    def accumulate(self, weight: torch.Tensor) -> torch.dtype:
        """The log-softmax's dtype: at least float32."""
        return torch.promote_types(self.dtype or weight.dtype, torch.float32)

    def backward(self, grad: torch.Tensor, capped: torch.Tensor) -> torch.Tensor:
        """d/d(head output) from d/d(logits / T), (c, V), in place where it can."""
        if self.temperature != 1.0:
            grad = grad.div_(self.temperature)
        if self.softcap:  # d/dx c·tanh(x/c) = 1 − tanh² = 1 − (z/c)²
            grad = grad.mul_(1 - (capped / self.softcap) ** 2)
        if self.scale != 1.0:
            grad = grad.mul_(self.scale)
        return grad


class ChunkedHeadLogps(torch.autograd.Function):
    """Token log-probs through the LM head, `chunk` kept positions at a time: log softmax(W h_k)[y_t] for
    targets t with source[t] = k, and (optionally, no gradient) each row's entropy. Forward keeps only the
    hidden states and one logsumexp per row; backward recomputes each chunk's logits and writes
    dL/dh_k = Σ_V g_kv W_v and dL/dW += g^T h over the chunk, g = Σ_t g_t (onehot(y_t) − softmax(l_k)), so no
    (K, V) tensor exists in either direction. Numerically the unchunked path's (TokenLogps on the model's logits).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, source, labels, math: HeadMath, chunk: int, with_entropy: bool):
        # hidden (K, H), weight (V, H), bias (V,) or None, source/labels (T,) -> token log-probs (T,), entropy (K,)
        k = hidden.shape[0]
        order = torch.argsort(source, stable=True)  # targets grouped by chunk
        starts = torch.arange(0, k + chunk, chunk, device=source.device).clamp_(max=k)
        bounds = torch.searchsorted(source[order], starts).tolist()
        acc = math.accumulate(weight)
        lse = torch.empty(k, dtype=acc, device=hidden.device)
        token_logps = torch.empty(source.shape[0], dtype=acc, device=hidden.device)
        entropy = torch.empty(k if with_entropy else 0, dtype=acc, device=hidden.device)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for i, a in enumerate(starts[:-1].tolist()):
                b = min(a + chunk, k)
                logits, _ = math.logits(hidden[a:b], weight, bias)                         # (c, V) float32
                lse[a:b] = torch.logsumexp(logits, -1)
                targets = order[bounds[i]:bounds[i + 1]]
                rows = source[targets] - a
                token_logps[targets] = logits[rows, labels[targets]] - lse[a:b][rows]
                if with_entropy:  # H = lse − Σ softmax(l)·l
                    entropy[a:b] = lse[a:b] - (torch.softmax(logits, -1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), source, labels, lse,
                              order)
        ctx.bounds, ctx.starts, ctx.chunk, ctx.math, ctx.has_bias = bounds, starts, chunk, math, bias is not None
        ctx.mark_non_differentiable(entropy)
        return token_logps, entropy

    @staticmethod
    def backward(ctx, grad, _entropy_grad):
        hidden, weight, bias, source, labels, lse, order = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        math, k = ctx.math, hidden.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = math.accumulate(weight)
        per_row = torch.zeros(k, dtype=acc, device=grad.device).index_add_(0, source, grad.to(acc))
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        dtype = math.dtype or weight.dtype
        w = weight.to(dtype)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            for i, a in enumerate(ctx.starts[:-1].tolist()):
                b = min(a + ctx.chunk, k)
                logits, capped = math.logits(hidden[a:b], weight, bias)
                # −(Σ_t g_t) softmax(l_k), then + g_t at each target's label
                g = logits.sub_(lse[a:b, None]).exp_().mul_(-per_row[a:b, None])
                targets = order[ctx.bounds[i]:ctx.bounds[i + 1]]
                g.index_put_((source[targets] - a, labels[targets]), grad[targets].to(acc), accumulate=True)
                g = math.backward(g, capped).to(dtype)
                if need_hidden:
                    grad_hidden[a:b] = g @ w
                if need_weight:
                    if dtype == acc:
                        grad_weight.addmm_(g.t(), hidden[a:b].to(acc))
                    else:  # the chunk's product in the compute dtype, as the unchunked head's; summed in float32
                        grad_weight.add_(g.t() @ hidden[a:b].to(dtype))
                if need_bias:
                    grad_bias += g.to(acc).sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None)


def _model_inputs(model: PreTrainedModel, batch: Batch, device: torch.device) -> dict:
    """The model's inputs for a batch, its mask as the model's attention takes it (MASKED_ATTENTION,
    VARLEN_ATTENTION): a padding mask as it is; a layout's (N, L, L) mask as (N, 1, L, L), boolean for sdpa (True:
    attend) and additive in the model's dtype for eager; for flex attention a BlockMask of the same rule, whose
    empty blocks (other pairs, the other response) are skipped; for FlashAttention no mask at all: the packed rows'
    tokens as one row, padding dropped, which transformers runs through the variable-length kernel with sequences
    told apart by their restarting positions (a shared prompt cannot be said that way)."""
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "logits_to_keep": batch.keep.to(device)}
    mask = batch.attention_mask.to(device)
    if mask.dim() == 2:
        return {**inputs, "attention_mask": mask}
    implementation = getattr(model_config(model), "_attn_implementation", None) or "eager"
    if implementation in VARLEN_ATTENTION:
        if int(batch.segment.max()) > 1:
            raise ValueError(f"model.attn_implementation={implementation} takes no mask, so it cannot share a "
                             f"prompt between two responses; set trainer.share_prompt=false (trainer.pack still works)")
        real = batch.block.to(device) >= 0  # row-major, so the kept logits keep their order
        return {name: value[real].unsqueeze(0) for name, value in inputs.items()} | {"attention_mask": None}
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        n, width = mask.shape[:2]
        rule = layout_mask_mod(batch.block.to(device), batch.segment.to(device))
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
