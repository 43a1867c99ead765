"""The GPU check: DPO steps of a ~0.5B-parameter model built from a config (no download) on one GPU, in bf16,
through dpo_exp's own training path in each layout, and TRL's DPOTrainer on the same weights and pairs.

Rows (each in a fresh process, scripts/bench_dpo.py's workers, one fixture):
- dpo_exp padded / shared prompt / shared + packed: bf16 autocast over float32 master weights, the chunked LM head
  (auto chunk: 110 positions at this 151,936-token vocabulary), sdpa attention;
- dpo_exp packed with FlashAttention-2 (one padding-free row, its variable-length kernel) when flash_attn imports;
- dpo_exp shared prompt under FSDP2 on this one process (a group of one: MixedPrecisionPolicy bf16 parameters,
  float32 gradient reduction; the multi-GPU code path on one GPU);
- TRL bf16 (its defaults but gradient checkpointing, which dpo_exp does not use here) when trl imports.

Reported per row: pairs/s, tokens/s (tokens as fed unshared: prompt twice), s/step, peak GPU memory
(torch.cuda.max_memory_allocated), MFU = model FLOPs / s / the GPU's bf16 peak, where model FLOPs per pair are
6·N·(policy tokens) + 2·N·(reference tokens), N the parameters that multiply (the embedding lookup excluded, the
LM head included), attention's own FLOPs left out (as MFU is usually quoted); the peak is the datasheet's dense
bf16 figure for the GPU (H100/H200 SXM: 989 TFLOP/s) and, beside it, the rate this GPU reaches on an 8192³ bf16
matmul, measured in the same run. The losses of the fp32-comparable rows are printed side by side.

    bash scripts/gpu_check.sh                      # the whole check (< 8 minutes on an H200), JSON to $OUT or outputs/
    python scripts/gpu_check.py --size tiny --device cpu --steps 3   # the same code path at toy size, on a CPU
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dpo  # noqa: E402  (the fixture, the workers and their spawning are the benchmark's)

SIZES = {  # a Qwen2.5-0.5B-shaped Llama (494M parameters with its tied 151,936-token head), and a toy one
    "0.5b": dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, layers=24, heads=14, kv_heads=2,
                 tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, layers=2, heads=4, kv_heads=2,
                 tie_word_embeddings=True),
}
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (reference.md §9)
ROWS = [  # (implementation, bench_dpo variant, settings changed for the row, label)
    ("dpo_exp", "bf16-padded", {}, "dpo_exp bf16 padded (sdpa)"),
    ("dpo_exp", "bf16", {}, "dpo_exp bf16 shared prompt (sdpa)"),
    ("dpo_exp", "bf16-share+pack", {}, "dpo_exp bf16 shared + packed (sdpa)"),
    ("dpo_exp", "bf16-pack", {"attention": "flash_attention_2"}, "dpo_exp bf16 packed (FlashAttention-2 varlen)"),
    ("dpo_exp", "bf16", {"fsdp": True}, "dpo_exp bf16 shared prompt, FSDP2 on one process"),
    ("trl", "bf16", {}, "TRL bf16"),
]


def matmul_peak(device: str) -> float:
    """FLOP/s of an 8192³ bf16 matmul on this device (best of ten after warm-up); 0 on a CPU."""
    import torch

    if device == "cpu":
        return 0.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * 8192 ** 3 / (time.perf_counter() - start))
    return best


def multiplying_parameters(settings: dict) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup), the tied head's
    weight counted once as the head."""
    v, h = settings["vocab_size"], settings["hidden_size"]
    return settings["parameters"] - (0 if settings["tie_word_embeddings"] else v * h)


def available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="0.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per row (the first 4 untimed)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--json", default="outputs/gpu_check.json")
    args = parser.parse_args()

    import torch

    on_gpu = args.device != "cpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --device cpu --size tiny for the code path alone")
    gpu = torch.cuda.get_device_name() if on_gpu else "cpu"
    settings = {"steps": args.steps, "warmup_steps_excluded": min(4, args.steps - 1), "batch_size": args.batch_size,
                "pairs": args.steps * args.batch_size, "lr": 1e-6, "beta": 0.1, "max_grad_norm": 10.0,
                "prompt_words": 96, "response_words": [384, 512], "max_length": 1024, "max_prompt_length": 128,
                "seed": 0, "threads": torch.get_num_threads(), "device": args.device, "attention": "sdpa",
                **SIZES[args.size]}
    if args.size == "tiny":
        settings.update(prompt_words=8, response_words=[8, 24], max_length=64, max_prompt_length=16)
    peak_measured = matmul_peak(args.device)
    datasheet = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
    print(f"{gpu}: bf16 matmul {peak_measured / 1e12:.0f} TFLOP/s measured"
          + (f", datasheet {datasheet / 1e12:.0f}" if datasheet else ""), flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = []
    try:
        started = time.perf_counter()
        bench_dpo.build_fixture(workdir, settings)
        n = multiplying_parameters(settings)
        print(f"fixture: {settings['parameters'] / 1e6:.0f}M parameters, {settings['tokens_per_pair']:.0f} tokens a "
              f"pair, built in {time.perf_counter() - started:.0f} s", flush=True)
        base = json.loads((workdir / "settings.json").read_text())
        for impl, variant, changed, label in ROWS:
            if impl == "trl" and not available("trl"):
                print(f"{label}: skipped (trl is not installed)")
                continue
            if changed.get("attention") == "flash_attention_2" and not (on_gpu and available("flash_attn")):
                print(f"{label}: skipped (flash_attn is not installed)")
                continue
            (workdir / "settings.json").write_text(json.dumps({**base, **changed}))
            try:
                r = bench_dpo.spawn(impl, variant, workdir)
            except SystemExit as failure:  # the row's worker failed: report it, go on with the others
                print(f"{label}: FAILED\n{str(failure)[-2000:]}", flush=True)
                results.append({"row": label, "failed": str(failure)[-2000:]})
                continue
            tokens = settings["tokens_per_pair"] * r["pairs_per_second"]
            flops = 8 * n * tokens  # policy forward + backward (6N) and the reference's forward (2N) per token
            row = {"row": label, "pairs_per_second": r["pairs_per_second"], "tokens_per_second": tokens,
                   "seconds_per_step": r["median_seconds_per_step"], "peak_gpu_bytes": r.get("peak_gpu_bytes"),
                   "model_flops_per_second": flops, "losses": r["losses"], "sharded": r.get("sharded", False),
                   "mfu_datasheet": flops / datasheet if datasheet else None,
                   "mfu_measured_peak": flops / peak_measured if peak_measured else None}
            results.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'row':<52} {'pairs/s':>8} {'tokens/s':>10} {'s/step':>7} {'GPU GiB':>8} {'MFU':>6} {'MFU*':>6}")
    for row in results:
        if "failed" in row:
            print(f"{row['row']:<52} failed")
            continue
        mem = f"{row['peak_gpu_bytes'] / 2**30:.1f}" if row["peak_gpu_bytes"] else "-"
        mfu = f"{row['mfu_datasheet']:.1%}" if row["mfu_datasheet"] else "-"
        mfu_m = f"{row['mfu_measured_peak']:.1%}" if row["mfu_measured_peak"] else "-"
        print(f"{row['row']:<52} {row['pairs_per_second']:>8.2f} {row['tokens_per_second']:>10.0f} "
              f"{row['seconds_per_step']:>7.3f} {mem:>8} {mfu:>6} {mfu_m:>6}")
    print("MFU: against the datasheet's dense bf16 peak; MFU*: against the matmul rate measured above")
    for row in results:
        if "losses" in row:
            print(f"  losses {row['row']}: " + ", ".join(f"{x:.5f}" for x in row["losses"][:6]))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"gpu": gpu, "settings": settings, "bf16_matmul_flops": peak_measured,
                                           "datasheet_bf16_flops": datasheet, "rows": results}, indent=1))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
