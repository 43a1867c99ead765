"""GPU memory of the paper's three runs, per GPU, on 1 and on N GPUs: from the model configs and the presets.

    python scripts/memory_table.py                       # paper_imdb, paper_hh, paper_tldr on 1 and 8 GPUs
    python scripts/memory_table.py --gpus 1 4 8 --markdown

For each preset (its model, dtypes, optimizer, batch size, gradient accumulation and sequence length, as
composed by Hydra) and each variant (full fine-tuning; with gradient checkpointing; LoRA r=16; FSDP2 CPU
offload), per GPU:

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
  the real architecture on the meta device (no memory, no compute) and summing the tensors autograd
  saves (parameters excluded), with the LM head and a float32 log-softmax over the response positions.
  With gradient checkpointing: each block's input plus one block's activations during its recompute.

Parameters are counted exactly from the architecture (the published Hugging Face configs, below). Not
counted: the CUDA context and allocator fragmentation (budget ~1-3 GB), temporary buffers of the
optimizer step and of generation (the KV cache of evaluation sampling), and the caching allocator's
reserve. With CPU offload, weights, grads and optimizer state live in CPU memory (the "CPU" column).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The published architectures of the paper's models (Hugging Face config.json of each hub id), so the table
# needs no download. Keys are conf/model option names.
ARCHITECTURES = {
    "gpt2_large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024)),
    "pythia_2_8b": ("gpt_neox", dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=32,
                                     intermediate_size=10240, vocab_size=50304, rotary_pct=0.25,
                                     max_position_embeddings=2048, tie_word_embeddings=False)),
    "gpt_j_6b": ("gptj", dict(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, vocab_size=50400,
                              n_positions=2048, tie_word_embeddings=False)),
}
PRESETS = ("paper_imdb", "paper_hh", "paper_tldr")
VARIANTS = ("full", "full + grad. ckpt", "LoRA r=16", "CPU offload")
GB = 1e9
BF16 = 2


def dtype_bytes(name: str) -> int:
    return torch.empty(0, dtype=getattr(torch, str(name))).element_size()


def compose(preset: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from dpo_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"experiment={preset}", "paths.output_dir=/tmp/unused"])


def meta_model(model_name: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, values = ARCHITECTURES[model_name]
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval(), config  # dropout off, as the presets train (autograd still records)


@dataclass
class Shape:
    params: int          # all parameters
    block_params: int    # one transformer block
    layers: int
    hidden: int
    lora_params: int     # a rank-16 adapter on every linear layer of the blocks


def shape_of(model, config) -> Shape:
    from dpo_exp.models import find_blocks

    blocks = find_blocks(model, None)
    block = blocks[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(16 * (m.in_features + m.out_features) for m in linears) * len(blocks)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return Shape(sum(p.numel() for p in model.parameters()), sum(p.numel() for p in block.parameters()),
                 len(blocks), hidden, lora)


def activation_bytes(model, sequences: int, length: int, response: int) -> tuple[int, int]:
    """(all layers, one block) bytes that autograd saves for backward, measured on the meta device."""
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
        logits = model(input_ids=ids, logits_to_keep=response).logits
        logits.float().log_softmax(-1)
    total = sum(t.numel() * t.element_size() for t in seen.values())
    # one block's share: what the blocks save is the total minus embeddings and head; spread evenly
    head = sequences * response * model.config.vocab_size * (BF16 + 4)
    return total, max(total - head, 0)


def rows_for(preset: str, gpus: list[int]) -> list[dict]:
    cfg = compose(preset)
    model, config = meta_model(cfg.model.name)
    shape = shape_of(model, config)
    policy_b, ref_b = dtype_bytes(cfg.model.policy_dtype), dtype_bytes(cfg.model.reference_dtype)
    opt = cfg.optimizer
    moments = 2 if opt.name.value == "adamw" else 1 + (1 if opt.momentum > 0 else 0)
    batch, accum, length = cfg.trainer.batch_size, cfg.trainer.grad_accumulation_steps, cfg.data.max_length
    response = length - min(cfg.data.max_prompt_length, length - 1)
    out = []
    for n in gpus:
        sequences = max(1, 2 * batch // (n * accum))
        acts, blocks_acts = activation_bytes(model, sequences, length, response)
        per_block = blocks_acts / shape.layers
        checkpointed = acts - blocks_acts + shape.layers * sequences * length * shape.hidden * BF16 + per_block
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
            total = weights + grads + optim + reference + gathered + activ
            out.append({"preset": preset, "model": cfg.model.name, "params (B)": shape.params / 1e9, "GPUs": n,
                        "variant": variant, "micro-batch (seq.)": sequences, "policy": weights / GB,
                        "grads": grads / GB, "optimizer": optim / GB, "reference": reference / GB,
                        "gathered blocks": gathered / GB, "activations": activ / GB, "total per GPU": total / GB,
                        "CPU": cpu / GB})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="experiment presets to tabulate")
    parser.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="GPU counts")
    parser.add_argument("--markdown", action="store_true", help="a markdown table (default: aligned text)")
    args = parser.parse_args(argv)
    rows = [row for preset in args.presets for row in rows_for(preset, args.gpus)]
    columns = list(rows[0])
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
