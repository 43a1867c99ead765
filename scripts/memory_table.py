"""GPU memory of a DPO step per GPU, on 1 and on N GPUs: the paper's three runs and current chat models, from the
model configs and the presets.

    python scripts/memory_table.py                       # the paper's runs, and paper_hh's settings on chat models
    python scripts/memory_table.py --presets paper_hh paper_tldr:gemma2_9b_it --gpus 1 4 8 --markdown
    python scripts/memory_table.py --unchunked           # also the LM head's logits without chunking
    python scripts/memory_table.py --overrides trainer.logits_chunk_tokens=1024 data.max_length=1024

A row is an experiment preset (its model, dtypes, optimizer, batch size, gradient accumulation and sequence length,
as composed by Hydra), or EXPERIMENT:MODEL for that experiment's settings on another conf/model option. For each
and each variant (full fine-tuning; with gradient checkpointing; LoRA r=16; FSDP2 CPU offload), per GPU:

- policy: the trained weights, sharded over the GPUs (FSDP2 keeps sharded parameters in
  model.policy_dtype; with LoRA the frozen base in that dtype plus the adapter);
- grads and optimizer state: of the trainable parameters, sharded, in their dtype (AdamW two moments,
  RMSprop one, plus a momentum buffer when momentum > 0; LoRA adapters are float32);
- reference: π_ref in model.reference_dtype, sharded (none with LoRA: π_ref is the base with the adapter
  off; none with reference.precompute=true while training);
- gathered blocks: with N > 1, FSDP2 all-gathers one block ahead of the one running (two blocks of
  bfloat16 weights);
- activations: what autograd keeps for backward at the per-GPU micro-batch (chosen and rejected, so
  2 x batch_size / (N x grad_accumulation_steps) sequences of data.max_length tokens), measured by running
  the real architecture (embeddings and blocks, in bfloat16, with the preset's attention: eager keeps each
  layer's (L x L) probabilities) on the meta device (no memory, no compute) and summing the tensors autograd
  saves (parameters excluded), plus the final hidden states of the kept (response) positions, which the LM
  head's backward needs. With gradient checkpointing: each block's input plus one block's activations during
  its recompute;
- logits: the LM head's float32 logits at their peak, 2 x rows x vocab x 4 bytes (the logits and, in backward,
  their softmax). Log-probs go through the head trainer.logits_chunk_tokens kept positions at a time
  (dpo_exp.models.logps.chunk_size; null: auto, at most 64 MiB of float32 logits per chunk), and a chunk's
  logits are recomputed in backward, so rows = one chunk when the micro-batch keeps more positions than that;
  unchunked (trainer.logits_chunk_tokens=0, the --unchunked columns) rows = every kept position.

Parameters are counted exactly from the architecture (the published Hugging Face configs, below). Not
counted: the CUDA context and allocator fragmentation (budget ~1-3 GB), temporary buffers of the
optimizer step and of generation (the KV cache of evaluation sampling), π_ref's own forward (no_grad, done
before the policy's, its logits one chunk at a time too), the caching allocator's reserve, and Gemma-2's
final soft-capping temporaries (a few more (rows x vocab) float32 tensors). Activations assume bfloat16 compute
(trainer.precision=bf16, or bfloat16 weights); in float32 they double. With CPU offload, weights, grads and
optimizer state live in CPU memory (the "CPU" column).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The published architectures (config.json of each hub id, as transformers config kwargs: AutoConfig.for_model(**a)),
# so the table and tests/test_presets.py need no download. Keys are conf/model option names.
ARCHITECTURES = {
    "gpt2_large": dict(model_type="gpt2", n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
    "pythia_2_8b": dict(model_type="gpt_neox", num_hidden_layers=32, hidden_size=2560, num_attention_heads=32,
                        intermediate_size=10240, vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048,
                        tie_word_embeddings=False),
    "gpt_j_6b": dict(model_type="gptj", n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400,
                     n_positions=2048, tie_word_embeddings=False),
    "smollm2_135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "llama3_1_8b_instruct": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                 rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=8192),
                                 tie_word_embeddings=False),
    "qwen2_5_7b_instruct": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                use_sliding_window=False, tie_word_embeddings=False),
    "qwen3_8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     use_sliding_window=False, tie_word_embeddings=False),
    "mistral_7b_instruct": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-5,
                                sliding_window=None, tie_word_embeddings=False),
    "gemma2_9b_it": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                         num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                         max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
                         query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                         tie_word_embeddings=True),
}
CHAT_MODELS = ("llama3_1_8b_instruct", "qwen2_5_7b_instruct", "qwen3_8b", "mistral_7b_instruct", "gemma2_9b_it")
PRESETS = ("paper_imdb", "paper_hh", "paper_tldr", *(f"paper_hh:{model}" for model in CHAT_MODELS))
VARIANTS = ("full", "full + grad. ckpt", "LoRA r=16", "CPU offload")
UNCHUNKED = ("logits unchunked", "total unchunked")  # columns shown with --unchunked
GB = 1e9
BF16 = 2
FP32 = 4


def dtype_bytes(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, str(name))).element_size()


def compose(preset: str, overrides=()):
    """The config of a row: EXPERIMENT, or EXPERIMENT:MODEL (that experiment's settings on conf/model/MODEL.yaml)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from dpo_exp.components import register_configs

    experiment, _, model = preset.partition(":")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"experiment={experiment}", *([f"model={model}"] if model else []),
                                                  "paths.output_dir=/tmp/unused", *overrides])


def meta_model(model_name: str, attention: str = "sdpa"):
    """The published architecture of a conf/model option on the meta device (no memory), and its config. Kernels
    the meta device cannot run (flash, flex) are measured as sdpa, which keeps about what they keep."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**ARCHITECTURES[model_name])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="eager" if attention == "eager" else "sdpa")
    return model.eval(), config  # dropout off, as the presets train (autograd still records)


@dataclass
class Shape:
    params: int          # all parameters
    block_params: int    # one transformer block
    layers: int
    hidden: int
    vocab: int
    lora_params: int     # a rank-16 adapter on every linear layer of the blocks


def shape_of(model, config) -> Shape:
    from dpo_exp.models import find_blocks

    blocks = find_blocks(model, None)
    block = blocks[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(16 * (m.in_features + m.out_features) for m in linears) * len(blocks)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return Shape(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in block.parameters()),
                 len(blocks), hidden, config.vocab_size, lora)


def body_activation_bytes(model, sequences: int, length: int) -> int:
    """Bytes that autograd saves for backward in the embeddings and blocks (not the LM head) at
    (sequences, length) tokens, measured on the meta device."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params and id(t) not in seen:
            seen[id(t)] = t
        return t

    ids = torch.zeros(sequences, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for p in model.parameters():
            p.requires_grad_(True)
        model.base_model(input_ids=ids)  # (sequences, length, hidden): what the head reads (its default cache
        # also keeps transformers from inspecting position ids for packing, which meta tensors cannot)
    return sum(t.numel() * t.element_size() for t in seen.values())


def logits_bytes(kept_tokens: int, vocab_size: int, chunk_tokens: int) -> int:
    """Peak bytes of the LM head's float32 logits in the policy's step: the logits and their softmax (backward),
    2 x rows x vocab x 4, for one chunk of chunk_tokens rows when the kept positions exceed it (the chunk's logits
    are recomputed in backward, dpo_exp.models.logps.ChunkedHeadLogps), else for all kept_tokens (chunk 0: off)."""
    rows = chunk_tokens if 0 < chunk_tokens < kept_tokens else kept_tokens
    return 2 * rows * vocab_size * FP32


def rows_for(preset: str, gpus: list[int], overrides=()) -> list[dict]:
    from dpo_exp.models.logps import chunk_size

    cfg = compose(preset, overrides)
    model, config = meta_model(cfg.model.name, cfg.model.attn_implementation)
    shape = shape_of(model, config)
    policy_b, ref_b = dtype_bytes(cfg.model.policy_dtype), dtype_bytes(cfg.model.reference_dtype)
    opt = cfg.optimizer
    moments = 2 if opt.name.value == "adamw" else 1 + (1 if opt.momentum > 0 else 0)
    batch, accum, length = cfg.trainer.batch_size, cfg.trainer.grad_accumulation_steps, cfg.data.max_length
    response = length - min(cfg.data.max_prompt_length, length - 1)
    chunk = chunk_size(shape.vocab, cfg.trainer.logits_chunk_tokens)
    out = []
    for n in gpus:
        sequences = max(1, 2 * batch // (n * accum))
        kept = sequences * response  # positions whose log-probs count: the responses
        body = body_activation_bytes(model, sequences, length)
        head_input = kept * shape.hidden * BF16  # the kept positions' final hidden states, for the head's backward
        acts = body + head_input
        checkpointed = shape.layers * sequences * length * shape.hidden * BF16 + body / shape.layers + head_input
        logits, logits_unchunked = logits_bytes(kept, shape.vocab, chunk), logits_bytes(kept, shape.vocab, 0)
        gathered = 2 * shape.block_params * BF16 if n > 1 else 0
        for variant in VARIANTS:
            lora = variant.startswith("LoRA")
            trainable = shape.lora_params if lora else shape.params
            train_b = 4 if lora else policy_b  # peft keeps adapters in float32; FSDP2 grads and moments in param dtype
            weights = (shape.params * policy_b + (shape.lora_params * 4 if lora else 0)) / n
            grads = trainable * train_b / n
            optim = trainable * train_b * moments / n
            reference = 0 if lora else shape.params * ref_b / n
            activ = checkpointed if variant == "full + grad. ckpt" else acts
            cpu = 0.0
            if variant == "CPU offload":  # sharded weights, grads and optimizer state live in CPU memory
                cpu = weights + grads + optim + reference
                weights = grads = optim = reference = 0
                gathered = 2 * shape.block_params * BF16
            total = weights + grads + optim + reference + gathered + activ + logits
            out.append({"preset": preset.partition(":")[0], "model": cfg.model.name, "params (B)": shape.params / 1e9,
                        "GPUs": n, "variant": variant, "micro-batch (seq.)": sequences, "policy": weights / GB,
                        "grads": grads / GB, "optimizer": optim / GB, "reference": reference / GB,
                        "gathered blocks": gathered / GB, "activations": activ / GB, "logits": logits / GB,
                        "total per GPU": total / GB, "CPU": cpu / GB, "logits unchunked": logits_unchunked / GB,
                        "total unchunked": (total - logits + logits_unchunked) / GB})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS),
                        help="experiment presets to tabulate: EXPERIMENT, or EXPERIMENT:MODEL (a conf/model option)")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="GPU counts")
    parser.add_argument("--overrides", nargs="+", default=[], help="Hydra overrides for every row (key=value)")
    parser.add_argument("--unchunked", action="store_true",
                        help="also the logits and total without LM-head chunking (trainer.logits_chunk_tokens=0)")
    parser.add_argument("--markdown", action="store_true", help="a markdown table (default: aligned text)")
    args = parser.parse_args(argv)
    rows = [row for preset in args.presets for row in rows_for(preset, args.gpus, args.overrides)]
    columns = [c for c in rows[0] if args.unchunked or c not in UNCHUNKED]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    if args.markdown:
        print("| " + " | ".join(columns) + " |")
        print("| " + " | ".join("---" for _ in columns) + " |")
        for row in rows:
            print("| " + " | ".join(fmt(row[c]) for c in columns) + " |")
    else:
        widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in columns]
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in rows:
            print("  ".join(fmt(row[c]).rjust(w) for c, w in zip(columns, widths)))
    print("GB = 1e9 bytes, per GPU; see the script's docstring for what is and is not counted.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
