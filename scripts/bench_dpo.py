"""Benchmark: DPO training throughput of dpo_exp against TRL's DPOTrainer, same model, data and settings.

What it measures, per row (an implementation and a variant of its options):
- pairs/s, tokens/s and s/step over the timed steps (all steps but the first --warmup-steps-excluded),
  wall time from the end of one optimizer step to the end of the next, so batch fetching,
  collation, forward/backward, clipping, the optimizer and per-step metrics all count;
- the executed FLOPs of every step (dpo_exp.loop.FlopCount: torch's FLOP formulas of the dispatched ops, entered
  around each step in both implementations alike, in a separate untimed run of the same steps, since counting
  slows a step) and the achieved FLOP rate, as a fraction of this machine's own big-matmul peak in float32
  or bfloat16, measured in the same run before and after the rows;
- peak RSS of the process that trained (VmHWM, see `peak_rss_bytes`);
- the loss of every step, so the parent can check that both compute the same objective.

Rows (--rows, DPO_EXP_OPTIONS): dpo_exp `padded` (left-padded, resident π_ref), `fp32` (the trainer's
defaults: prompts shared, π_ref resident as the benchmark holds it), `pack` (padding-free packing), `share+pack`, `precompute` (π_ref log-probs
precomputed), `bf16` (autocast) and `fastest` (all of them); each against TRL's closest configuration
(TRL_COUNTERPART: TRL 1.16 has no prompt sharing and its padding_free is disabled, so those face its
fp32 row; its fastest is bf16 autocast with precomputed reference log-probs, without gradient
checkpointing). --scaling adds a table of step times as max_length grows (128 to 1024) and for a
long-prompt and a long-response shape. --vocab-table measures instead the large vocabularies of today's model
families (Llama-3 128,256, Qwen 151,936, Gemma-3 262,144) with ~1,024- and ~2,048-token pairs: peak memory and
pairs/s of dpo_exp's defaults (chunked LM head), TRL as shipped, and dpo_exp with the whole head at once.

The allocator: dpo_exp's CPU training makes glibc reuse freed memory (trainer.reuse_freed_memory), which any
PyTorch program could do; TRL as installed does not. --trl-allocator both runs every TRL row twice, as shipped
and with the same setting (rows named "<row>+reuse"), and prints dpo_exp's ratio against each.

The fixed configuration (../shared/docs/reference.md §5): a randomly initialised 8.4M-parameter
Llama (vocab 8192, hidden 256, FFN 1024, 4 layers, 4 heads), 512 synthetic preference pairs
(prompt 64 words, responses 64–128 words from a seeded pseudo-word list, one token per word),
batch 8 pairs, max_length 256, β = 0.1, sigmoid DPO, fused AdamW lr 1e-6, constant schedule,
grad clip 10, dropout off, no gradient checkpointing, 30 steps, first 5 excluded.

How the comparison is kept fair:
- The parent builds the fixture once (tokenizer, weights via save_pretrained, pairs, step plan)
  in a temporary folder; every row then runs in a fresh subprocess of this script that loads
  it, so both start from identical weights and the peak RSS of one is not polluted by the
  other (or by the parent).
- dpo_exp is driven through its real training path: data.tokenize_dataset, algorithms,
  reference.Reference and Loop.train_iteration, with the algorithm's own step plan.
  TRL gets the same pairs, in that order, with a sequential sampler.
- Nothing is truncated at these lengths (longest sequence 1 + 64 + 129 tokens < 256), so the
  two truncation rules (dpo_exp: prompt end kept, response cut; TRL 1.16: keep_start on the
  whole sequence, no max_prompt_length) cannot make the objectives differ; the parent checks it.
- Same torch thread count in every subprocess (--threads).
- Checks that both compute the same objective: TRL's token ids must equal dpo_exp's for every
  pair; the losses of every step must agree to --loss-tolerance (fp32 rows); and the first step's
  mean summed policy log-probs are compared. Step 1's loss is log 2 for any tokenization
  (policy == reference), so it is the later steps and the log-probs that catch a difference.

Timings on a shared machine: the `cores` column is CPU seconds per wall second while timed;
below ~90% of --threads, another process took CPU and the row is flagged. --repeats N runs the
rows alternately N times and keeps each row's fastest run.

Run (from the repository root; a few minutes per row set on 2 CPU cores):

    python scripts/bench_dpo.py                                  # padded and shared-prompt fp32 vs TRL fp32
    python scripts/bench_dpo.py --rows all --repeats 2 --json bench.json
    python scripts/bench_dpo.py --rows fp32,precompute --trl-allocator both   # TRL as shipped and with dpo_exp's allocator
    python scripts/bench_dpo.py --scaling                        # plus the scaling table
    python scripts/bench_dpo.py --scaling --shapes long-prompt   # one shape of it
    python scripts/bench_dpo.py --layouts --shapes 256,long-prompt,long-response --scaling-steps 10  # layouts A/B
    python scripts/bench_dpo.py --impl dpo_exp                   # without TRL
    python scripts/bench_dpo.py --vocab-table                    # 128k-262k vocabularies: memory and pairs/s vs TRL

TRL is optional (`pip install -e .[bench]`); without it only the dpo_exp rows run.
This is a benchmark, not a test: it exits non-zero only if the fp32 losses disagree.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/bench_dpo.py` without installing
    sys.path.insert(0, str(REPO_ROOT))

# Special tokens of the synthetic tokenizer; pad is distinct from EOS (reference.md §4).
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# A row is (implementation, variant). dpo_exp's variants switch its options; TRL runs its closest configuration,
# the variant named in TRL_COUNTERPART (TRL 1.16 has no prompt sharing, and its padding_free is disabled).
DPO_EXP_OPTIONS = {
    "padded": {"share_prompt": False},                             # left-padded, resident π_ref, fp32
    "fp32": {},                                                    # the trainer's defaults: prompts shared (sdpa)
    "precompute": {"share_prompt": True, "precompute": True},
    "bf16": {"share_prompt": True, "bf16": True},
    "pack": {"share_prompt": False, "pack": True},                 # padding-free packing alone
    "share+pack": {"share_prompt": True, "pack": True},
    "fastest": {"share_prompt": True, "pack": True, "precompute": True, "bf16": True},
    "unchunked": {"logits_chunk_tokens": 0},                       # the defaults with the whole LM head at once
    # bf16 in each layout (scripts/gpu_check.py)
    "bf16-padded": {"share_prompt": False, "bf16": True},
    "bf16-pack": {"share_prompt": False, "pack": True, "bf16": True},
    "bf16-share+pack": {"share_prompt": True, "pack": True, "bf16": True},
}
TRL_OPTIONS = {"fp32": {}, "precompute": {"precompute": True}, "bf16": {"bf16": True},
               "fastest": {"precompute": True, "bf16": True}}       # TRL's fastest: bf16 autocast + precomputed π_ref
# "<row>+reuse": TRL's row with the allocator setting dpo_exp's CPU training applies (--trl-allocator reuse | both).
TRL_OPTIONS.update({f"{name}+reuse": {**options, "reuse_freed_memory": True} for name, options in list(TRL_OPTIONS.items())})
TRL_COUNTERPART = {"padded": "fp32", "fp32": "fp32", "precompute": "precompute", "bf16": "bf16", "pack": "fp32",
                   "share+pack": "fp32", "fastest": "fastest", "unchunked": "fp32", "bf16-padded": "bf16",
                   "bf16-pack": "bf16", "bf16-share+pack": "bf16"}
ROW_ORDER = [("dpo_exp", "padded"), ("dpo_exp", "fp32"), ("trl", "fp32"), ("trl", "fp32+reuse"), ("dpo_exp", "precompute"),
             ("trl", "precompute"), ("trl", "precompute+reuse"), ("dpo_exp", "bf16"), ("trl", "bf16"), ("trl", "bf16+reuse"),
             ("dpo_exp", "pack"), ("dpo_exp", "share+pack"), ("dpo_exp", "fastest"), ("trl", "fastest"),
             ("trl", "fastest+reuse")]
# The scaling table: step times as the sequences grow, and two shapes whose prompt or responses dominate.
SHAPES = {  # --shapes name: (label, prompt words, response words (min, max), max_length, max_prompt_length)
    "128": ("length 128", 32, (32, 64), 128, 64), "256": ("length 256", 64, (64, 128), 256, 128),
    "512": ("length 512", 128, (128, 256), 512, 256), "1024": ("length 1024", 256, (256, 512), 1024, 512),
    "long-prompt": ("long prompt (HH-like)", 384, (32, 96), 512, 448),
    "long-response": ("long response (TL;DR-like)", 32, (192, 448), 512, 128),
}
ATTENTION = "sdpa"  # both implementations' attention (dpo_exp then shares prompts by default)
SCALING_ROWS = [("dpo_exp", "padded"), ("dpo_exp", "fp32"), ("dpo_exp", "share+pack"), ("trl", "fp32")]
# The vocabulary table (--vocab-table): the families' vocabularies at two pair sizes, batch 4 pairs.
VOCABS = {"llama3": 128_256, "qwen2.5": 151_936, "gemma3": 262_144}
PAIR_SHAPES = {  # --pair-tokens name: (prompt words, response words (min, max), max_length, max_prompt_length)
    "1024": (96, (384, 512), 1024, 128),    # ~1,000 tokens a pair (prompt + chosen + rejected)
    "2048": (192, (768, 1024), 2048, 256),  # ~2,000
}
VOCAB_ROWS = [("dpo_exp", "fp32"), ("trl", "fp32"), ("dpo_exp", "unchunked")]


# ---- fixture: built once by the parent, loaded by every worker ----------------------------

def pseudo_words(count: int, seed: int) -> list[str]:
    """`count` distinct lowercase pseudo-words (2–4 consonant-vowel syllables), deterministic."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_tokenizer(vocab_size: int, seed: int):
    """A word-level tokenizer with exactly `vocab_size` entries, wrapped for transformers.

    One token per word keeps token counts exact (prompt 64 words = 65 tokens with BOS), and
    BOS is added by the post-processor, so `add_special_tokens=True` means "BOS only", as for
    Llama. Special tokens are registered as added tokens, so TRL's "chosen</s>" string (it
    appends the EOS *text*) still tokenizes to [..., eos_id].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, BOS, EOS]
    words = pseudo_words(vocab_size - len(specials), seed)
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS,
                                        eos_token=EOS, padding_side="left")
    assert len(tokenizer) == vocab_size
    return tokenizer, words


def build_pairs(words: list[str], n: int, prompt_words: int, response_words: tuple[int, int], seed: int):
    """Synthetic preference pairs. Responses start with a space: TRL concatenates prompt + response text."""
    from dpo_exp.data import PreferencePair

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    return [PreferencePair(prompt=text(prompt_words),
                           chosen=" " + text(rng.randint(*response_words)),
                           rejected=" " + text(rng.randint(*response_words)))
            for _ in range(n)]


def build_fixture(workdir: Path, settings: dict) -> None:
    """Tokenizer, initial weights, pairs, step plan and dpo_exp's tokenization, all in `workdir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from dpo_exp.data import save_pairs, tokenize_dataset
    from dpo_exp.algorithms.base import batch_plan

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    tokenizer, words = build_tokenizer(settings["vocab_size"], settings["seed"])
    tokenizer.save_pretrained(workdir / "tokenizer")

    config = LlamaConfig(
        vocab_size=settings["vocab_size"], hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"], num_hidden_layers=settings.get("layers", 4),
        num_attention_heads=settings.get("heads", 4), num_key_value_heads=settings.get("kv_heads", 4),
        max_position_embeddings=max(512, settings["max_length"]),
        tie_word_embeddings=settings.get("tie_word_embeddings", False),
        attention_dropout=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config)
    settings["parameters"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "model")  # both implementations load these same weights
    del model

    pairs = build_pairs(words, settings["pairs"], settings["prompt_words"], tuple(settings["response_words"]),
                        settings["seed"])
    save_pairs(pairs, workdir / "pairs.jsonl")
    tokenized, _ = tokenize_dataset(tokenizer, pairs, settings["max_length"], settings["max_prompt_length"])
    longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in tokenized)
    longest_prompt = max(len(p.prompt_ids) for p in tokenized)
    if longest > settings["max_length"] or longest_prompt > settings["max_prompt_length"]:
        print(f"warning: sequences are truncated (longest {longest} tokens, prompt {longest_prompt}); dpo_exp and "
              "TRL 1.16 truncate differently, so their losses are not expected to agree", file=sys.stderr)
    settings["longest_sequence"] = longest
    settings["tokens_per_pair"] = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                      for p in tokenized) / len(tokenized)  # as fed unshared: the rate's unit
    settings["response_tokens_per_pair"] = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized) / len(tokenized)
    settings["shared_tokens_per_pair"] = settings["response_tokens_per_pair"] + sum(
        len(p.prompt_ids) for p in tokenized) / len(tokenized)
    # dpo_exp's token ids, for the TRL worker to check that it tokenized identically
    (workdir / "tokens.json").write_text(json.dumps(
        [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in tokenized]))
    # Trainer.plan is this same call (seeded permutation); the dpo_exp worker checks it
    plan = batch_plan(len(pairs), settings["batch_size"], 1.0, settings["steps"], settings["seed"])
    (workdir / "plan.json").write_text(json.dumps(plan))
    (workdir / "settings.json").write_text(json.dumps(settings))


# ---- measurement helpers -------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    VmHWM (the high-water mark of this process's own address space) rather than
    getrusage().ru_maxrss: on Linux ru_maxrss survives exec, so a worker started by a parent
    that already held the fixture would report at least the parent's peak.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def now() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time of all this process's threads, to expose contention."""
    return time.perf_counter(), time.process_time()


def timing(step_ends: list[tuple[float, float]], start: tuple[float, float], warmup: int, batch_size: int) -> dict:
    """pairs/s and s/step from the (wall, CPU) end times of each step, the first `warmup` steps excluded.

    cores_busy is CPU seconds per wall second over the timed steps: about --threads when the
    process had the machine to itself, lower when something else competed for the cores.
    """
    marks = [start] + step_ends
    timed = marks[warmup:]
    if len(timed) < 2:
        raise SystemExit(f"--warmup-steps-excluded={warmup} leaves no step to time; raise --steps")
    durations = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    wall, cpu = timed[-1][0] - timed[0][0], timed[-1][1] - timed[0][1]
    return {"timed_steps": len(durations), "timed_seconds": wall, "seconds_per_step": wall / len(durations),
            "median_seconds_per_step": statistics.median(durations), "step_seconds": durations,
            "pairs_per_second": len(durations) * batch_size / wall, "cores_busy": cpu / wall}


# ---- workers: one (implementation, variant) per process ------------------------------------

def run_dpo_exp(workdir: Path, settings: dict, variant: str) -> dict:
    """dpo_exp's own training path: tokenize_dataset → Reference → the DPO algorithm in Loop.train_iteration, timed per step."""
    import torch

    from omegaconf import OmegaConf

    from dpo_exp.algorithms import ALGORITHMS, Resources
    from dpo_exp.algorithms.preference import PreferenceLossConfig
    from dpo_exp.config import OptimizerConfig, OptimizerName, TrainerConfig
    from dpo_exp.data import PairLayout, load_pairs, tokenize_dataset
    from dpo_exp.loggers import RunLogger
    from dpo_exp.loop import Loop, LoopSettings, seed_everything
    from dpo_exp.models import freeze, load_model
    from dpo_exp.models.logps import set_logits_chunk_tokens
    from dpo_exp.reference import Reference
    from transformers import AutoTokenizer

    seed_everything(settings["seed"])
    set_logits_chunk_tokens(DPO_EXP_OPTIONS[variant].get("logits_chunk_tokens"))  # None: auto, as train.run sets it
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    pairs, _ = tokenize_dataset(tokenizer, load_pairs(workdir / "pairs.jsonl"), settings["max_length"],
                                settings["max_prompt_length"], keep_prompt_end=True)
    model_dir = str(workdir / "model")
    options = DPO_EXP_OPTIONS[variant]
    precision = "bf16" if options.get("bf16") else "fp32"
    device, attention = torch.device(settings.get("device", "cpu")), settings.get("attention", ATTENTION)
    # fp32 master weights; bf16 is autocast, as in dpo_exp
    policy = load_model(model_dir, torch.float32, attention).to(device)
    policy.train()
    if settings.get("fsdp"):  # FSDP2 on this one process (scripts/gpu_check.py): the sharded path, a mesh of one
        from dpo_exp import distributed
        from dpo_exp.config import FSDPConfig

        distributed.init_single_process(device.type == "cuda")
        policy = distributed.shard(policy, None, FSDPConfig(), precision, single_process=True)
    trainer = TrainerConfig(batch_size=settings["batch_size"], max_steps=settings["steps"], device=device.type,
                            precision=precision, share_prompt=options.get("share_prompt"),
                            pack=options.get("pack", False))

    setup_start = time.perf_counter()
    precompute = options.get("precompute", False)
    reference = Reference(lambda: freeze(load_model(model_dir, torch.float32, attention).to(device)),
                          resident=not precompute, precision=precision, layout=PairLayout.of(trainer, attention))
    if precompute:  # one pass over all pairs; the reference model is freed afterwards
        reference.precompute("train", pairs, tokenizer.pad_token_id, settings["batch_size"])
    setup_seconds = time.perf_counter() - setup_start

    out_dir = Path(tempfile.mkdtemp(prefix="dpo_exp_run_", dir=workdir))  # removed with the fixture
    cfg = OmegaConf.create({
        "loss": OmegaConf.structured(PreferenceLossConfig(name="dpo", beta=settings["beta"])),
        "trainer": OmegaConf.structured(trainer),
        "optimizer": OmegaConf.structured(OptimizerConfig(name=OptimizerName.adamw, lr=settings["lr"], warmup_steps=0,
                                                          max_grad_norm=settings["max_grad_norm"])),
        "model": {"attn_implementation": attention}, "seed": settings["seed"]})
    res = Resources(cfg, tokenizer, device, policy=policy, reference=reference, train_pairs=pairs)
    algorithm = ALGORITHMS["dpo"]("dpo", cfg, res)
    loop = Loop(algorithm, LoopSettings(show_progress=False, save_final=False, eval_at_start=False, log_every=10**9,
                                        count_flops=settings["count_flops"],
                                        reuse_freed_memory=options.get("reuse_freed_memory", True)),
                RunLogger([]), out_dir)
    plan = json.loads((workdir / "plan.json").read_text())
    if algorithm.plan != plan:
        raise RuntimeError("the algorithm's batch plan differs from the plan given to TRL; the loss comparison would be void")

    losses, logps, step_ends, flops = [], [], [], []
    profiler = None
    if settings.get("profile"):  # --profile: where a step's time goes (the timing is then not comparable)
        from torch.profiler import ProfilerActivity, profile
        profiler = profile(activities=[ProfilerActivity.CPU])
    start = now()
    for step in range(loop.iterations):  # the body of Loop.fit without its logging and eval
        if profiler is not None and step == settings["warmup_steps_excluded"]:
            profiler.__enter__()
        metrics, _, _ = loop.train_iteration()  # in the FLOP-count run: counts the step's FLOPs (dpo_exp.loop.FlopCount)
        step_ends.append(now())
        flops.append(loop.flops - sum(flops))
        losses.append(metrics["loss"])
        logps.append([metrics["logps/chosen"], metrics["logps/rejected"]])
    shutil.rmtree(out_dir, ignore_errors=True)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    return {"losses": losses, "policy_logps": logps, "setup_seconds": setup_seconds, "step_flops": flops,
            "sharded": type(policy).__name__.startswith("FSDP"),
            **timing(step_ends, start, settings["warmup_steps_excluded"], settings["batch_size"])}


def run_trl(workdir: Path, settings: dict, variant: str) -> dict:
    """TRL's DPOTrainer on the same weights and pairs, in the same order, timed with a callback."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's precompute loop reads this, not disable_tqdm
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_exp.data import load_pairs

    from dpo_exp.loop import FlopCount, reuse_freed_memory

    if TRL_OPTIONS[variant].get("reuse_freed_memory"):
        reuse_freed_memory()

    class StepTimer(TrainerCallback):
        """End time of every optimizer step, or (the FLOP-count run) its executed FLOPs (FlopCount, as dpo_exp's
        loop counts them), and the loss and mean policy log-probs TRL logs for it."""

        def __init__(self, count: bool):
            self.start, self.step_ends, self.losses, self.logps, self.flops = None, [], [], [], []
            self.count, self.counter = count, None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = now()
            if self.count:
                self.counter = FlopCount()
                self.counter.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.count:
                self.counter.__exit__(None, None, None)
                self.flops.append(self.counter.get_total_flops())
            self.step_ends.append(now())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # logging_steps=1: one training log per step
                self.losses.append(logs["loss"])
                self.logps.append([logs["logps/chosen"], logs["logps/rejected"]])

    pairs = load_pairs(workdir / "pairs.jsonl")
    plan = json.loads((workdir / "plan.json").read_text())
    # Dataset rows in the order dpo_exp visits them, then the unvisited pairs (so that a
    # precompute covers all pairs, as dpo_exp's does); a sequential sampler keeps the order.
    order = [i for step in plan for i in step]
    visited = set(order)
    order += [i for i in range(len(pairs)) if i not in visited]
    dataset = Dataset.from_dict({"prompt": [pairs[i].prompt for i in order],
                                 "chosen": [pairs[i].chosen for i in order],
                                 "rejected": [pairs[i].rejected for i in order]})

    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    options = TRL_OPTIONS[variant]
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32,
                                                 attn_implementation=settings.get("attention", ATTENTION))
    out_dir = Path(tempfile.mkdtemp(prefix="trl_run_", dir=workdir))
    args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=settings["batch_size"], gradient_accumulation_steps=1,
        max_steps=settings["steps"], learning_rate=settings["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=settings["max_grad_norm"], optim="adamw_torch_fused",
        beta=settings["beta"], loss_type=["sigmoid"], max_length=settings["max_length"],
        bf16=options.get("bf16", False), gradient_checkpointing=False,  # DPOConfig defaults both to True
        precompute_ref_log_probs=options.get("precompute", False), precompute_ref_batch_size=settings["batch_size"],
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, use_cpu=settings.get("device", "cpu") == "cpu",
        seed=settings["seed"])
    timer = StepTimer(settings["count_flops"])
    setup_start = time.perf_counter()  # tokenization (+ reference precompute) happen in the constructor
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    setup_seconds = time.perf_counter() - setup_start

    # TRL tokenizes on its own; check it produced dpo_exp's token ids, row by row
    expected = json.loads((workdir / "tokens.json").read_text())
    prepared = trainer.train_dataset
    mismatched = sum(
        [p, c, r] != expected[i]
        for i, p, c, r in zip(order, prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]))

    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"losses": timer.losses, "policy_logps": timer.logps, "setup_seconds": setup_seconds,
            "tokenization_mismatches": mismatched, "step_flops": timer.flops,
            **timing(timer.step_ends, timer.start, settings["warmup_steps_excluded"], settings["batch_size"])}


def model_matmul_rate(settings: dict, seconds: float = 1.5) -> float:
    """GFLOP/s of the benchmark model's own matmuls at a step's shapes, float32: every linear of a layer and the
    LM head, forward (x Wᵀ) and both backward products (dY W, dYᵀ x), at the token counts of one micro-batch in
    the default (shared-prompt) layout, each weighted by its FLOPs. The ceiling a step's matmuls can reach on
    this machine, however little else the step did; the big-matmul peak is reached only by large square ones."""
    import torch
    hidden, ffn, vocab = settings["hidden_size"], settings["intermediate_size"], settings["vocab_size"]
    tokens = round(settings["batch_size"] * settings["shared_tokens_per_pair"])
    kept = round(settings["batch_size"] * settings["response_tokens_per_pair"])
    linears = [(tokens, hidden, hidden)] * 4 + [(tokens, hidden, ffn)] * 2 + [(tokens, ffn, hidden)]  # q k v o, gate up, down
    shapes = []
    for rows, d_in, d_out in linears + [(kept, hidden, vocab)]:
        shapes += [(rows, d_in, d_out), (rows, d_out, d_in), (d_out, rows, d_in)]  # forward, grad input, grad weight
    operands = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in operands:
        a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for a, b in operands:
            a @ b
        best = max(best, flops / (time.perf_counter() - t0))
    return best / 1e9


def matmul_peaks(threads: int, size: int = 2048, seconds: float = 1.5) -> dict:
    """The machine's big-matmul rate in float32 and bfloat16 (GFLOP/s, best of repeated timed bursts), the
    denominators of the rows' FLOP-rate fractions: measured in the same run because CPUs of one kind differ
    (AMX units make bfloat16 several times faster than float32 on some, slower on others)."""
    import torch
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)  # warm-up (allocations, kernel choice)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size ** 3 / (time.perf_counter() - t0))
        out[name] = best / 1e9
    return out


def worker(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    settings = json.loads((workdir / "settings.json").read_text())
    import torch
    torch.set_num_threads(settings["threads"])  # identical for every row
    if args.worker == "peak":
        Path(args.json).write_text(json.dumps({**matmul_peaks(settings["threads"]),
                                               "fp32_model_shapes": model_matmul_rate(settings)}))
        return
    run = run_dpo_exp if args.worker == "dpo_exp" else run_trl
    settings["count_flops"] = args.count_flops
    result = run(workdir, settings, args.variant)
    result["tokens_per_second"] = result["pairs_per_second"] * settings["tokens_per_pair"]
    result.update(impl=args.worker, variant=args.variant, peak_rss_bytes=peak_rss_bytes(),
                  threads=torch.get_num_threads())
    if torch.cuda.is_available() and settings.get("device", "cpu") != "cpu":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    Path(args.json).write_text(json.dumps(result))


# ---- parent: build, spawn, report ------------------------------------------------------------

def spawn(impl: str, variant: str, workdir: Path, count_flops: bool = False) -> dict:
    """One row in a fresh process: timed, or (count_flops) the same steps again with every step's FLOPs counted.
    The counter dispatches every op through Python (~15% of a step here), so timed runs never count."""
    out = workdir / f"result_{impl}_{variant.replace('+', '_')}{'_count' if count_flops else ''}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--variant", variant,
           "--workdir", str(workdir), "--json", str(out)] + (["--count-flops"] if count_flops else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"  {'counting the FLOPs of' if count_flops else 'running'} {impl} {variant} (load average {load:.2f}) ...",
          end=" ", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        print("failed")
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise SystemExit(f"worker {impl} {variant} exited with {proc.returncode}:\n{tail}")
    result = json.loads(out.read_text())
    print(f"{result['fp32']:.0f} / {result['bf16']:.0f} GFLOP/s" if impl == "peak"
          else f"{sum(result['step_flops']) / 1e9:.0f} GFLOP" if count_flops else f"{result['pairs_per_second']:.2f} pairs/s")
    return result


def add_flop_rate(row: dict, counted: dict, warmup: int) -> None:
    """The row's achieved FLOP rate: the FLOPs its count run executed in the timed steps, over the timed run's time.
    Both ran the same batches from the same weights, so their losses must be the same (the counter only observes)."""
    row["step_flops"] = counted["step_flops"]
    row["gflops_per_second"] = sum(counted["step_flops"][warmup:]) / row["timed_seconds"] / 1e9
    row["count_run_max_loss_diff"] = max(abs(a - b) for a, b in zip(row["losses"], counted["losses"]))


def installed_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def compare_losses(left: dict, right: dict) -> dict:
    """Per-step loss differences, and the first step's mean summed log-probs of the policy.

    The loss of step 1 is log 2 for any tokenization (policy == reference), so the later steps
    (which depend on step 1's gradient) and the log-probs (≈ −900 per response here, a sum
    over exactly the response tokens) are what catch a difference in tokens or masks.
    """
    a, b = left["losses"], right["losses"]
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a, b)]
    if not diffs:
        return {"steps_compared": 0, "max_abs_diff": math.nan}
    check = sorted({0, min(9, n - 1), n - 1})  # step 1 (log 2), step 10, last step
    (lc, lr), (rc, rr) = left["policy_logps"][0], right["policy_logps"][0]
    return {"steps_compared": n, "max_abs_diff": max(diffs), "max_abs_diff_step": diffs.index(max(diffs)) + 1,
            "at_steps": {str(i + 1): [a[i], b[i]] for i in check},
            "step1_policy_logps": {"chosen": [lc, rc], "rejected": [lr, rr]},
            "step1_logps_max_rel_diff": max(abs(lc - rc) / abs(rc), abs(lr - rr) / abs(rr))}


def report(rows: dict, settings: dict, peaks: dict, tolerance: float) -> tuple[dict, bool]:
    """Print the table, the speed ratios and the loss agreement; return them and whether fp32 losses agree."""
    gib = 1024 ** 3
    print()
    repeats = len(next(iter(rows.values()))["all_repeats_pairs_per_second"])
    print(f"{settings['parameters'] / 1e6:.1f}M-parameter Llama, {settings['pairs']} pairs, batch "
          f"{settings['batch_size']}, {settings['steps']} steps ({settings['warmup_steps_excluded']} excluded), "
          f"{settings['threads']} torch threads, lr {settings['lr']:g}, beta {settings['beta']}"
          + (f", fastest of {repeats} runs per row" if repeats > 1 else ""))
    print("allocator: dpo_exp's CPU training reuses freed memory (dpo_exp.loop.reuse_freed_memory); TRL's rows run "
          "with glibc's default, its '+reuse' rows with dpo_exp's setting (--trl-allocator default | reuse | both)")
    print(f"machine peak (one {2048}x{2048} matmul, best burst): fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s; the model's own fp32 matmuls at a step's shapes (forward and "
          f"backward, best burst): {peaks['fp32_model_shapes']:.0f} GFLOP/s "
          f"({peaks['fp32_model_shapes'] / peaks['fp32']:.0%} of the fp32 peak)")
    header = f"{'implementation':<22} {'pairs/s':>8} {'tokens/s':>9} {'median s':>8} {'GFLOP/s':>8} {'of peak':>7} " \
             f"{'peak RSS':>10} {'setup s':>8} {'cores':>6} {'loss@last':>10}"
    print(header)
    print("-" * len(header))
    for (impl, variant), r in rows.items():
        bf16 = (DPO_EXP_OPTIONS if impl == "dpo_exp" else TRL_OPTIONS)[variant].get("bf16", False)
        r["fraction_of_peak"] = r["gflops_per_second"] / peaks["bf16" if bf16 else "fp32"]
        print(f"{impl + ' ' + variant:<22} {r['pairs_per_second']:>8.2f} {r['tokens_per_second']:>9.0f} "
              f"{r['median_seconds_per_step']:>8.3f} {r['gflops_per_second']:>8.1f} {r['fraction_of_peak']:>7.0%} "
              f"{r['peak_rss_bytes'] / gib:>6.2f} GiB {r['setup_seconds']:>8.1f} {r['cores_busy']:>6.2f} "
              f"{r['losses'][-1]:>10.6f}")
    print("(tokens/s: pair tokens as fed unshared, prompt twice; GFLOP/s: executed FLOPs of the timed steps, counted "
          "in a second run of the same steps (dpo_exp.loop.FlopCount), per second of the timed run; of peak: against "
          "the matching fp32 or bf16 matmul peak; setup: reference "
          "precompute and TRL's tokenization; cores: CPU s per wall s, below the thread count if others competed)")

    for (impl, variant), r in rows.items():
        if r["count_run_max_loss_diff"] > tolerance:
            print(f"WARNING: {impl} {variant}: the FLOP-count run's losses differ from the timed run's by "
                  f"{r['count_run_max_loss_diff']:.1e}; its FLOPs may not be those of the timed steps")
    disturbed = [f"{impl} {variant}" for (impl, variant), r in rows.items()
                 if r["cores_busy"] < 0.9 * settings["threads"]]
    if disturbed:
        print(f"WARNING: other processes took CPU during {', '.join(disturbed)} (cores < 90% of "
              f"{settings['threads']} threads); those timings are not comparable, rerun on a quiet machine "
              "or with --repeats")

    ratios, agreement, ok = {}, {}, True
    print()
    for (impl, variant), ours in rows.items():
        if impl != "dpo_exp" or variant not in TRL_COUNTERPART:
            continue
        for counterpart in (TRL_COUNTERPART[variant], TRL_COUNTERPART[variant] + "+reuse"):
            theirs = rows.get(("trl", counterpart))
            if theirs is None:
                continue
            ratio = ours["pairs_per_second"] / theirs["pairs_per_second"]
            # both saw the same batches, so the ratio of median step times is comparable too,
            # and less sensitive to a burst of outside load than the ratio of totals
            median_ratio = theirs["median_seconds_per_step"] / ours["median_seconds_per_step"]
            memory = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
            ratios[variant if counterpart == TRL_COUNTERPART[variant] else f"{variant} vs +reuse"] = {
                "against": f"trl {counterpart}", "pairs_per_second": ratio, "median_step": median_ratio,
                "peak_rss": memory}
            print(f"dpo_exp {variant} / TRL {counterpart}: {ratio:.2f}x pairs/s, {median_ratio:.2f}x by "
                  f"median step, {memory:.2f}x peak RSS")
    for allocator, suffix in (("default", ""), ("reuse", "+reuse")):  # what the machine's fastest of each actually is
        best = {impl: max(((v, r) for (i, v), r in rows.items() if i == impl and (impl == "dpo_exp" or
                           v.endswith("+reuse") == bool(suffix))), key=lambda vr: vr[1]["pairs_per_second"], default=None)
                for impl in ("dpo_exp", "trl")}
        if best["dpo_exp"] and best["trl"] and len(rows) > 2:
            (ours_name, ours), (theirs_name, theirs) = best["dpo_exp"], best["trl"]
            ratios["fastest_measured" + suffix] = {"against": f"trl {theirs_name}", "dpo_exp": ours_name,
                                                   "pairs_per_second": ours["pairs_per_second"] / theirs["pairs_per_second"]}
            print(f"fastest measured (TRL's allocator {allocator}): dpo_exp {ours_name} {ours['pairs_per_second']:.2f} "
                  f"pairs/s / TRL {theirs_name} {theirs['pairs_per_second']:.2f}: "
                  f"{ratios['fastest_measured' + suffix]['pairs_per_second']:.2f}x")
    pairs_to_check = [(("dpo_exp", v), ("trl", TRL_COUNTERPART[v] + suffix)) for v in DPO_EXP_OPTIONS
                      for suffix in ("", "+reuse")]
    pairs_to_check += [(("dpo_exp", "padded"), ("dpo_exp", v)) for v in ("fp32", "pack", "share+pack", "precompute")]
    for left, right in pairs_to_check:
        if left in rows and right in rows:
            cmp = compare_losses(rows[left], rows[right])
            options = [DPO_EXP_OPTIONS.get(v, {}) if impl == "dpo_exp" else TRL_OPTIONS[v] for impl, v in (left, right)]
            strict = not any(o.get("bf16") for o in options)  # bf16 autocast paths differ by design
            passed = cmp["max_abs_diff"] <= tolerance
            ok &= passed or not strict
            name = f"{' '.join(left)} vs {' '.join(right)}"
            agreement[name] = {**cmp, "tolerance": tolerance if strict else None, "passed": passed}
            verdict = ("OK" if passed else "DISAGREE") if strict else "info only (bf16)"
            at = ", ".join(f"step {k}: {x:.7f} / {y:.7f}" for k, (x, y) in cmp["at_steps"].items())
            print(f"losses {name}: max |diff| {cmp['max_abs_diff']:.2e} over {cmp['steps_compared']} steps "
                  f"-> {verdict}\n    {at}\n    step-1 mean policy log-probs chosen "
                  f"{cmp['step1_policy_logps']['chosen'][0]:.4f} / {cmp['step1_policy_logps']['chosen'][1]:.4f}, "
                  f"rejected {cmp['step1_policy_logps']['rejected'][0]:.4f} / "
                  f"{cmp['step1_policy_logps']['rejected'][1]:.4f} (max rel diff "
                  f"{cmp['step1_logps_max_rel_diff']:.1e})")
    for (impl, variant), r in rows.items():
        if r.get("tokenization_mismatches"):
            ok = False
            print(f"WARNING: TRL {variant} tokenized {r['tokenization_mismatches']} pairs differently from dpo_exp")
    return {"speed_ratio_dpo_exp_over_trl": ratios, "loss_agreement": agreement}, ok


def shape_settings(base: dict, key: str, steps: int, pairs: int) -> tuple[str, dict]:
    """The label and fixture settings of one SHAPES entry: `pairs` pairs, a plan of `steps` steps."""
    shape, prompt_words, response_words, max_length, max_prompt_length = SHAPES[key]
    return shape, {**base, "steps": steps, "pairs": pairs, "prompt_words": prompt_words,
                   "response_words": response_words, "max_length": max_length, "max_prompt_length": max_prompt_length}


def scaling_table(base: dict, impls: list[str], steps: int, shapes: list[str], trl_suffixes: list[str]) -> list[dict]:
    """s/step of the SCALING_ROWS for the given SHAPES, each shape in its own fixture, rows alternating; TRL's row
    as shipped and/or with dpo_exp's allocator setting (trl_suffixes "" and "+reuse", from --trl-allocator)."""
    rows = [(i, v) for i, v in SCALING_ROWS if i == "dpo_exp"] + [(i, v + s) for i, v in SCALING_ROWS if i == "trl"
                                                                  for s in trl_suffixes]
    out = []
    for key in shapes:
        shape, settings = shape_settings(base, key, steps, steps * base["batch_size"])
        settings["warmup_steps_excluded"] = 2
        workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_scaling_"))
        try:
            low, high = settings["response_words"]
            print(f"{shape}: prompt {settings['prompt_words']} words, responses {low}-{high}")
            build_fixture(workdir, settings)
            row = {"shape": shape, "tokens_per_pair": settings["tokens_per_pair"]}
            for impl, variant in rows:
                if impl in impls:
                    r = spawn(impl, variant, workdir)
                    row[f"{impl} {variant}"] = {"median_seconds_per_step": r["median_seconds_per_step"],
                                                "seconds_per_step": r["seconds_per_step"], "losses": r["losses"],
                                                "peak_rss_bytes": r["peak_rss_bytes"], "cores_busy": r["cores_busy"]}
            out.append(row)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    names = [f"{i} {v}" for i, v in rows if i in impls]
    theirs = [n for n in names if n.startswith("trl ")]
    print(f"\n{'shape':<28} {'tokens/pair':>11} " + " ".join(f"{n + ' s/step':>24}" for n in names)
          + "".join(f"  {n} / dpo_exp" for n in theirs))
    for row in out:
        cells = " ".join(f"{row[n]['median_seconds_per_step']:>24.3f}" for n in names)
        ratios = "".join("  " + ", ".join(f"{row[t]['median_seconds_per_step'] / row[n]['median_seconds_per_step']:.2f}x"
                                          for n in names if not n.startswith("trl ")) for t in theirs)
        print(f"{row['shape']:<28} {row['tokens_per_pair']:>11.0f} {cells}{ratios}")
    return out


def vocab_table(base: dict, impls: list[str], vocabs: list[str], pair_tokens: list[str], steps: int,
                unchunked: bool) -> list[dict]:
    """Peak memory and pairs/s of a DPO step at the families' vocabularies (VOCABS) and pair sizes (PAIR_SHAPES):
    dpo_exp's defaults (chunked LM head), TRL as shipped and (`unchunked`) dpo_exp with the whole head at once
    (what chunking saves; ~20 GiB at 262k and 2,048 tokens), each in its own process on one fixture per cell,
    batch 4 pairs, the first step untimed."""
    rows = [r for r in VOCAB_ROWS if unchunked or r[1] != "unchunked"]
    out = []
    for size in pair_tokens:
        prompt_words, response_words, max_length, max_prompt_length = PAIR_SHAPES[size]
        for name in vocabs:
            settings = {**base, "steps": steps, "pairs": steps * 4, "batch_size": 4, "warmup_steps_excluded": 1,
                        "vocab_size": VOCABS[name], "prompt_words": prompt_words, "response_words": response_words,
                        "max_length": max_length, "max_prompt_length": max_prompt_length}
            workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_vocab_"))
            try:
                print(f"vocabulary {VOCABS[name]:,} ({name}), ~{size}-token pairs: building the fixture", flush=True)
                build_fixture(workdir, settings)
                row = {"vocab": name, "vocab_size": VOCABS[name], "pair_tokens": size,
                       "tokens_per_pair": settings["tokens_per_pair"]}
                for impl, variant in rows:
                    if impl in impls:
                        r = spawn(impl, variant, workdir)
                        row[f"{impl} {variant}"] = {k: r[k] for k in ("pairs_per_second", "peak_rss_bytes", "losses",
                                                                      "policy_logps", "median_seconds_per_step",
                                                                      "cores_busy", "tokenization_mismatches")
                                                    if k in r}
                        print(f"  {impl} {variant}: {r['pairs_per_second']:.3f} pairs/s, peak RSS "
                              f"{r['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
                out.append(row)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    names = [f"{i} {v}" for i, v in rows if i in impls]
    print(f"\n{'vocabulary':>10} {'tokens/pair':>11} " + " ".join(f"{n + ' pairs/s':>24} {'GiB':>6}" for n in names)
          + ("  dpo_exp/TRL: speed, memory" if "trl" in impls and "dpo_exp" in impls else ""))
    for row in out:
        cells = " ".join(f"{row[n]['pairs_per_second']:>24.3f} {row[n]['peak_rss_bytes'] / 2**30:>6.2f}" for n in names)
        ratio = ""
        if "trl fp32" in row and "dpo_exp fp32" in row:
            ours, theirs = row["dpo_exp fp32"], row["trl fp32"]
            ratio = (f"  {ours['pairs_per_second'] / theirs['pairs_per_second']:.2f}x, "
                     f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x")
            row["dpo_exp_over_trl"] = {"speed": ours["pairs_per_second"] / theirs["pairs_per_second"],
                                       "peak_rss": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"],
                                       **compare_losses(ours, theirs)}
            cmp = row["dpo_exp_over_trl"]
            ratio += (f", losses within {cmp['max_abs_diff']:.1e}, step-1 log-probs within "
                      f"{cmp['step1_logps_max_rel_diff']:.1e} (rel.)"
                      + (f", {theirs['tokenization_mismatches']} pairs tokenized differently"
                         if theirs.get("tokenization_mismatches") else ""))
        print(f"{row['vocab_size']:>10,} {row['tokens_per_pair']:>11.0f} {cells}{ratio}")
    return out


LAYOUT_AB = {"padded": {"share_prompt": False}, "shared": {"share_prompt": True},
             "shared+packed": {"share_prompt": True, "pack": True}}


def layout_ab(base: dict, shapes: list[str], batches: int) -> list[dict]:
    """dpo_exp's batch layouts against each other in one process: for each batch of each shape, a policy forward
    and backward and a no-grad reference forward in every layout, the layouts' order alternating batch by batch,
    so that this machine's drifting speed hits all alike (separate processes differ by up to 2x here). The first
    two batches are not timed. Returns s/batch per layout and shape."""
    import torch
    from transformers import AutoTokenizer

    from dpo_exp.data import PairLayout, collate_pairs, load_pairs, tokenize_dataset
    from dpo_exp.loop import reuse_freed_memory
    from dpo_exp.models import load_model, sequence_logps

    torch.set_num_threads(base["threads"])
    reuse_freed_memory()  # as the trainer's loop does on the CPU: without it every large tensor is page-faulted anew
    out = []
    for key in shapes:
        shape, settings = shape_settings(base, key, batches, (batches + 2) * base["batch_size"])
        max_length, max_prompt_length = settings["max_length"], settings["max_prompt_length"]
        workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_layouts_"))
        try:
            build_fixture(workdir, settings)
            tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
            pairs, _ = tokenize_dataset(tokenizer, load_pairs(workdir / "pairs.jsonl"), max_length, max_prompt_length)
            policy = load_model(str(workdir / "model"), torch.float32)
            reference = load_model(str(workdir / "model"), torch.float32).eval()
            layouts = {name: PairLayout(**options) for name, options in LAYOUT_AB.items()}
            seconds = {name: 0.0 for name in layouts}
            size = base["batch_size"]
            for i, start in enumerate(range(0, len(pairs) - size + 1, size)):
                for name in (list(layouts) if i % 2 == 0 else list(reversed(layouts))):
                    t0 = time.perf_counter()
                    batch = collate_pairs(pairs[start:start + size], tokenizer.pad_token_id, True, layouts[name])
                    with torch.no_grad():
                        sequence_logps(reference, batch)
                    sequence_logps(policy, batch).logps.sum().backward()
                    policy.zero_grad(set_to_none=True)
                    if i >= 2:
                        seconds[name] += time.perf_counter() - t0
            timed = max(len(pairs) // size - 2, 1)
            row = {"shape": shape, "tokens_per_pair": settings["tokens_per_pair"], "batches": timed,
                   **{name: total / timed for name, total in seconds.items()}}
            print(f"{shape}: " + ", ".join(f"{name} {row[name]:.3f} s/batch ({row['padded'] / row[name]:.2f}x padded)"
                                           for name in layouts), flush=True)
            out.append(row)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return out


def write_results(path: str, results: dict) -> None:
    """--json: the results, into a folder made if missing (outputs/ of a fresh clone holds only .gitkeep)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["both", "dpo_exp", "trl"], default="both",
                        help="which implementations to benchmark")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per implementation")
    parser.add_argument("--warmup-steps-excluded", type=int, default=5, help="leading steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--pairs", type=int, default=512, help="synthetic preference pairs in the dataset")
    parser.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--rows", default="padded,fp32",
                        help="comma-separated dpo_exp variants to run, each with its TRL counterpart, or 'all': "
                             + ", ".join(DPO_EXP_OPTIONS))
    parser.add_argument("--bf16", action="store_true", help="also run the bf16 rows (bf16, fastest)")
    parser.add_argument("--trl-allocator", choices=["default", "reuse", "both"], default="default",
                        help="TRL's rows with glibc's default allocator, with the setting dpo_exp's CPU training applies "
                             "(dpo_exp.loop.reuse_freed_memory; rows named '+reuse'), or both side by side")
    parser.add_argument("--trl-reuse-freed-memory", action="store_true",
                        help="the same as --trl-allocator reuse")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="also run the rows with reference log-probs precomputed (precompute, fastest)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run the scaling table (max_length 128-1024, a long-prompt and a long-response shape)")
    parser.add_argument("--scaling-steps", type=int, default=8, help="steps per scaling row (first 2 excluded)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated shapes of the scaling table: " + ", ".join(
                            f"{k} ({v[0]})" for k, v in SHAPES.items()))
    parser.add_argument("--layouts", action="store_true",
                        help="instead of the table: dpo_exp's batch layouts (padded, shared, shared+packed) against each "
                             "other in one process, alternating batch by batch, for the --shapes (--scaling-steps timed "
                             "batches each)")
    parser.add_argument("--vocab-table", action="store_true",
                        help="instead of the table: peak memory and pairs/s at Llama-3's, Qwen's and Gemma-3's "
                             "vocabularies (--vocabs) with ~1,024- and ~2,048-token pairs (--pair-tokens), batch 4, "
                             "dpo_exp (chunked LM head, and whole) against TRL as shipped")
    parser.add_argument("--vocabs", default=",".join(VOCABS), help="vocabularies of --vocab-table: " + ", ".join(
        f"{k} ({v:,})" for k, v in VOCABS.items()))
    parser.add_argument("--pair-tokens", default=",".join(PAIR_SHAPES), help="pair sizes of --vocab-table: "
                        + ", ".join(PAIR_SHAPES))
    parser.add_argument("--vocab-steps", type=int, default=3, help="steps per --vocab-table row (first excluded)")
    parser.add_argument("--with-unchunked", action="store_true",
                        help="--vocab-table also runs dpo_exp with the whole LM head at once (needs ~20 GiB at the "
                             "largest cell)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every row this many times, alternating rows, and keep each row's fastest run "
                             "(use 2-3 on a shared machine)")
    parser.add_argument("--profile", metavar="VARIANT",
                        help="instead of the table: profile the timed steps of this dpo_exp row (torch.profiler, "
                             "ops by self CPU time) and print where the time goes")
    parser.add_argument("--loss-tolerance", type=float, default=1e-5, help="max |loss diff| per step, fp32")
    parser.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the fixture folder (weights, pairs)")
    # internal: a worker runs one row in its own process and writes its result to --json
    parser.add_argument("--worker", choices=["dpo_exp", "trl", "peak"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=sorted(set(DPO_EXP_OPTIONS) | set(TRL_OPTIONS)), help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    impls = ["dpo_exp", "trl"] if args.impl == "both" else [args.impl]
    if "trl" in impls:
        try:
            import trl  # noqa: F401  (imported here only to fail early and clearly)
        except Exception as error:  # ImportError, or a trl whose own imports fail
            print(f"TRL is not usable ({error.__class__.__name__}: {error}), so only dpo_exp is measured; "
                  "for the comparison install the bench extra: pip install -e .[bench]")
            impls.remove("trl")
            if not impls:
                raise SystemExit(1)
    shapes = args.shapes.split(",")
    if set(shapes) - set(SHAPES):
        raise SystemExit(f"--shapes: unknown {', '.join(sorted(set(shapes) - set(SHAPES)))}; known: {', '.join(SHAPES)}")
    variants = list(DPO_EXP_OPTIONS) if args.rows == "all" else args.rows.split(",")
    unknown = sorted(set(variants) - set(DPO_EXP_OPTIONS))
    if unknown:
        raise SystemExit(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(DPO_EXP_OPTIONS)}")
    variants += (["precompute"] if args.precompute_ref else []) + (["bf16"] if args.bf16 else [])
    variants += ["fastest"] if args.bf16 and args.precompute_ref else []
    allocator = "reuse" if args.trl_reuse_freed_memory else args.trl_allocator
    suffixes = {"default": [""], "reuse": ["+reuse"], "both": ["", "+reuse"]}[allocator]
    wanted = {("dpo_exp", v) for v in variants} | {("trl", TRL_COUNTERPART[v] + s) for v in variants for s in suffixes}

    settings = {"steps": args.steps, "warmup_steps_excluded": args.warmup_steps_excluded,
                "batch_size": args.batch_size, "pairs": args.pairs, "lr": args.lr, "beta": 0.1,
                "max_grad_norm": 10.0, "prompt_words": 64, "response_words": [64, 128], "max_length": 256,
                "max_prompt_length": 128, "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 1024, "seed": 0,
                "threads": args.threads or torch.get_num_threads(),
                "trl_allocator": allocator,
                "versions": {name: installed_version(name) for name in ("torch", "transformers", "trl")}}
    # On SIGTERM, exit normally instead: the running worker is killed by subprocess.run and the
    # fixture folder is removed by the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.vocab_table:  # its own fixture per cell
        unknown = sorted(set(args.vocabs.split(",")) - set(VOCABS)) + sorted(
            set(args.pair_tokens.split(",")) - set(PAIR_SHAPES))
        if unknown:
            raise SystemExit(f"--vocabs / --pair-tokens: unknown {', '.join(unknown)}")
        result = vocab_table(settings, impls, args.vocabs.split(","), args.pair_tokens.split(","), args.vocab_steps,
                             args.with_unchunked)
        if args.json:
            write_results(args.json, {"settings": settings, "vocab_table": result})
        return
    if args.layouts:  # its own fixture per shape
        result = layout_ab(settings, shapes, args.scaling_steps)
        if args.json:
            write_results(args.json, {"settings": settings, "layouts": result})
        return
    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    try:
        print(f"building the fixture in {workdir}")
        settings["profile"] = bool(args.profile)
        build_fixture(workdir, settings)
        if args.profile:
            result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "dpo_exp", "--variant",
                                     args.profile, "--workdir", str(workdir), "--json", str(workdir / "profile.json")],
                                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, text=True, capture_output=True)
            print(result.stderr[-12000:])
            return
        peaks = [spawn("peak", "fp32", workdir)]
        # Rows alternate within each repeat, so a burst of outside load hits both implementations
        # alike; of the repeats of a row, the fastest is kept (the least disturbed), all are saved.
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeats):
            for impl, variant in ROW_ORDER:
                if impl in impls and (impl, variant) in wanted:
                    runs.setdefault((impl, variant), []).append(spawn(impl, variant, workdir))
        peaks.append(spawn("peak", "fp32", workdir))  # before and after the rows: the best of both
        peak = {k: max(p[k] for p in peaks) for k in ("fp32", "bf16", "fp32_model_shapes")}
        rows = {key: max(results, key=lambda r: r["pairs_per_second"]) for key, results in runs.items()}
        for key, results in runs.items():
            rows[key]["all_repeats_pairs_per_second"] = [r["pairs_per_second"] for r in results]
            add_flop_rate(rows[key], spawn(*key, workdir, count_flops=True), settings["warmup_steps_excluded"])
        summary, ok = report(rows, settings, peak, args.loss_tolerance)
        scaling = scaling_table(settings, impls, args.scaling_steps, shapes, suffixes) if args.scaling else None
        if args.json:
            write_results(args.json, {"settings": settings, "peak_gflops_per_second": peak,
                                      "rows": [r for r in rows.values()], "scaling": scaling, **summary})
            print(f"\nresults written to {args.json}")
    finally:
        if args.keep_workdir:
            print(f"fixture kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
