"""Resumable checkpoints: written whole or not at all, loaded without executing code.

A checkpoint is a folder `checkpoints/step_<N>` (or `checkpoints/final`):

- `state/`: every trained model's parameters and optimizer state, saved with
  `torch.distributed.checkpoint` (DCP) under fully qualified parameter names, so each rank of a
  sharded run writes its own shards in parallel and any number of ranks can load them back
  (a run saved by 2 processes resumes in 1);
- `trainer_state.pt`: the loop's position and counters, the schedules, the algorithm's own state
  (PPO's KL controller, prompt order and generator); plain tensors and numbers only, loaded with
  `weights_only=True`;
- `rng/rank_<r>.pt`: each rank's Python, NumPy, torch and CUDA generator states;
- `run_config.json`: the resolved config of the run that wrote it, compared on resume;
- in `final/` also the run's model in Hugging Face format (`save_pretrained`, `from_pretrained`),
  other trained models in sub-folders (PPO's `value/`);
- `manifest.json`, written last: every file above with its size and CRC-32 (`checksum`), each rank's shards and
  generators listed by the rank that wrote them (see `save`).

Everything is written into `.tmp_<name>/` and renamed into place when complete, so a crash
mid-write leaves the previous checkpoint as it was; only the newest `keep` step checkpoints are kept.
A write the machine refuses (no space, no permission) on any rank removes `.tmp_<name>/` and stops every rank
with a WriteFailed naming what is intact. On resume `latest` checks each checkpoint against its manifest, newest
first, and skips a damaged one (a file cut short, changed or missing) with one warning line.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dpo_exp import distributed
from dpo_exp.distributed import rank
from dpo_exp.errors import ConfigError

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d+)$")
# Keys that may differ between the run that wrote a checkpoint and the run resuming it: where files and
# logs go, and how the run is watched or checkpointed, never what it computes.
RESUMABLE_CHANGES = ("paths.", "logger.", "objective", "run_name", "trainer.resume", "trainer.show_progress",
                     "trainer.save_every", "trainer.keep_checkpoints", "trainer.max_skipped_steps",
                     "trainer.fsdp.",  # how a run is sharded: a run saved by 2 processes resumes in 1
                     "trainer.logits_chunk_tokens")  # memory, not results: a run that ran out resumes with less
_DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)  # frozen weights (LoRA's base) come from π_SFT


# ---- random generators -------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's generator states as plain tensors and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                                                    "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- finding checkpoints -----------------------------------------------------------------------

def checkpoint_step(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    manifest = _read_manifest(path)
    if manifest is not None:
        return int(manifest["step"])
    return int(torch.load(path / STATE_FILE, weights_only=True)["loop"]["step"])


def describe(path: Optional[Path]) -> str:
    """What a rerun resumes from, for messages: "<path> (step N)", or that there is no checkpoint yet."""
    if path is None:
        return "no checkpoint yet (a rerun starts this run from its beginning)"
    return f"{path} (step {checkpoint_step(path)})"


def candidates(checkpoints: Path) -> list[Path]:
    """Every checkpoint folder under `checkpoints` (step_<N> or final, with a manifest or a trainer state), newest
    first, intact or not. Folders still being written (.tmp_*) and folders of another layout are not."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and not p.name.startswith(".")
             and (p.name == "final" or _STEP_DIR.match(p.name))
             and ((p / MANIFEST).is_file() or (p / STATE_FILE).is_file())]
    return sorted(found, key=lambda p: (_step_for_order(p), p.name == "final"), reverse=True)


def _step_for_order(path: Path) -> int:
    try:
        return checkpoint_step(path)
    except Exception:  # a final whose step cannot be read: tried last, where verify says what is wrong with it
        return -1


def latest(checkpoints: Path) -> Optional[Path]:
    """The newest intact checkpoint under `checkpoints` (step_<N> or final), or None when there is none at all.

    Every rank calls it: rank 0 checks the candidates against their manifests (`verify`), newest first, and the
    others take its answer. A damaged one is skipped with one warning line naming the file and what is wrong; one
    without a manifest (written by a dpo_exp that wrote none) is used unchecked, with a note. When every checkpoint
    is damaged, a ConfigError says so and how to start over.
    """
    if distributed.world_size() > 1:
        found, failure = distributed.broadcast_object(_newest_intact(checkpoints) if distributed.is_main() else None)
    else:
        found, failure = _newest_intact(checkpoints)
    if failure is not None:
        raise ConfigError(failure)
    return None if found is None else Path(found)


def _newest_intact(checkpoints: Path) -> tuple[Optional[str], Optional[str]]:
    """(the newest intact checkpoint, None), (None, None) when there is none, (None, why none is intact)."""
    skipped = []
    for path in candidates(checkpoints):
        if not (path / MANIFEST).is_file():
            _tell("note", f"{path} has no {MANIFEST} (written before dpo_exp checked checkpoints): resuming from it "
                          "unchecked")
        else:
            problem = verify(path)
            if problem is not None:
                skipped.append(problem)
                continue
        for problem in skipped:
            _tell("warning", f"skipping a damaged checkpoint: {problem}; using {path.name}")
        return str(path), None
    if not skipped:
        return None, None
    return None, (f"no intact checkpoint in {checkpoints} to resume from: {'; '.join(skipped)}. To start over, run in "
                  "a new run directory (run_name=NAME; trainer.resume=false there refuses ever to resume one)")


def _tell(kind: str, message: str) -> None:
    print(f"dpo_exp: {kind}: {message}", file=sys.stderr, flush=True)


def verify(path: Path) -> Optional[str]:
    """None when every file that `path`'s manifest lists is there with its size and checksum, else what is wrong,
    naming the file. Sizes are compared first (a file cut short or missing is found without reading any)."""
    manifest = _read_manifest(path)
    if manifest is None:
        return f"{path / MANIFEST} is unreadable"
    files = manifest["files"]
    for name, entry in files.items():
        file, owner = path / name, _owner(entry, manifest)
        if not file.is_file():
            return f"{file} is missing{owner}"
        size = file.stat().st_size
        if size != entry["size"]:
            cut = "truncated" if size < entry["size"] else "too long"
            return f"{file} is {cut} ({size} bytes, {entry['size']} written){owner}"
    for name, entry in files.items():
        found = checksum(path / name)
        if found != entry["crc32"]:
            return (f"{path / name} does not match its checksum (CRC-32 {found}, {entry['crc32']} written: changed "
                    f"or damaged since){_owner(entry, manifest)}")
    return None


def _owner(entry: dict, manifest: dict) -> str:
    world = manifest.get("world_size", 1)
    return f" (written by rank {entry['rank']} of {world})" if world > 1 else ""


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return manifest if isinstance(manifest.get("files"), dict) and "step" in manifest else None
    except (OSError, ValueError, AttributeError):
        return None


def checksum(file: Path) -> str:
    """CRC-32 (zlib) of a file, read in 16 MiB pieces, as 8 hex digits. A checksum for damage, not tampering: a copy
    cut short, a block of zeros, a flipped bit. CRC-32 rather than a cryptographic hash because it runs at disk
    speed (2.1 GB/s on one core of the development machine, against 0.9 for blake2b and 1.1 for sha256), and every
    save and every resume reads a checkpoint, of a large model too, once more."""
    crc = 0
    with open(file, "rb") as handle:
        while chunk := handle.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every flattened config key that differs and matters for resuming. A key one side
    lacks and the other holds as null is no difference: a newer dpo_exp added it, and null is what ran before."""
    a, b = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p) for p in RESUMABLE_CHANGES if p.endswith(".")) or key in RESUMABLE_CHANGES:
            continue
        if a.get(key) is None and b.get(key) is None:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


# ---- saving ------------------------------------------------------------------------------------

def _dcp_state(trained: Iterable) -> dict:
    state = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group: intended for 1 process
        for model in trained:
            module_state, optim_state = get_state_dict(model.module, model.optimizer, options=_DCP_OPTIONS)
            state[f"model.{model.name}"], state[f"optim.{model.name}"] = module_state, optim_state
    return state


def save(path: Path, trained: list, loop_state: dict, run_config: Optional[dict], export=None,
         intact: Optional[Path] = None) -> None:
    """Write a checkpoint at `path` atomically (every rank calls it). `export(folder)`, called on every rank,
    adds the Hugging Face files (written by rank 0).

    Each rank writes its shards and generators and lists them with their sizes and checksums; rank 0 adds the files
    it wrote, writes the manifest last and renames the folder into place. A write the machine refuses on any rank
    removes the temporary folder and raises WriteFailed on every rank, naming `path` and `intact` (the newest
    checkpoint: what rerunning the same command resumes from).
    """
    tmp = path.parent / f".tmp_{path.name}"
    main = rank() == 0
    intact_text = describe(intact)

    def on_every_rank(work) -> list:  # a refused write on any rank fails all of them, once the folder is removed
        return distributed.together(work, path, intact_text, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))

    def start() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def shards() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(_dcp_state(trained), checkpoint_id=str(tmp / "state"))
        (tmp / "rng").mkdir(exist_ok=True)
        _save_tensors(rng_state(), tmp / "rng" / f"rank_{rank()}.pt")

    def own_files() -> dict:  # DCP names each rank's files __<rank>_<n>.distcp
        mine = [f"state/{f.name}" for f in (tmp / "state").glob(f"__{rank()}_*")] + [f"rng/rank_{rank()}.pt"]
        return {name: _entry(tmp / name, rank()) for name in mine}

    def finish(listings: list[dict]) -> None:
        if not main:
            return
        schedules = {model.name: model.scheduler.state_dict() for model in trained}
        _save_tensors({"loop": loop_state, "schedulers": schedules}, tmp / STATE_FILE)
        if run_config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1, sort_keys=True, default=str))
        files = {name: entry for listed in listings for name, entry in listed.items()}
        for file in sorted(f for f in tmp.rglob("*") if f.is_file()):  # what rank 0 wrote: DCP's index, the export
            files.setdefault(file.relative_to(tmp).as_posix(), _entry(file, 0))
        manifest = {"format": MANIFEST_FORMAT, "checksum": "crc32", "step": int(loop_state["step"]),
                    "world_size": distributed.world_size(), "files": dict(sorted(files.items()))}
        with open(tmp / MANIFEST, "w") as handle:  # last: a folder with a manifest holds everything it lists
            handle.write(json.dumps(manifest, indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():  # re-saving final: the old one stays usable until the new one is in place
            old = path.parent / f".old_{path.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)

    on_every_rank(start)
    on_every_rank(shards)
    if export is not None:
        on_every_rank(lambda: export(tmp))  # every rank: gathering a sharded model's full weights is collective
    listings = on_every_rank(own_files)
    on_every_rank(lambda: finish(listings))


def _save_tensors(obj: Any, file: Path) -> None:
    """torch.save into an open file: given a path, torch writes it in C++ and a full disk loses its errno."""
    with open(file, "wb") as handle:
        torch.save(obj, handle)


def _entry(file: Path, writer: int) -> dict:
    return {"size": file.stat().st_size, "crc32": checksum(file), "rank": writer}


def prune(checkpoints: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (final is never deleted)."""
    if rank() != 0 or keep <= 0 or not checkpoints.is_dir():
        return
    steps = sorted((p for p in checkpoints.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=checkpoint_step)
    for old in steps[:-keep]:
        shutil.rmtree(old)


# ---- loading -----------------------------------------------------------------------------------

def load(path: Path, trained: list) -> dict:
    """Restore every trained model, optimizer, schedule and this rank's generators from `path`; returns the
    loop state (with the algorithm's) for the caller. A checkpoint without a manifest (written before dpo_exp wrote
    them: `latest` could not check it) that cannot be read is a ConfigError naming it, not the unpickler's traceback."""
    if (path / MANIFEST).is_file():
        return _load(path, trained)
    try:
        return _load(path, trained)
    except (Exception, CheckpointException) as err:
        failures = getattr(err, "failures", None)  # DCP: every rank's (exception, traceback)
        cause = next(iter(failures.values()))[0] if failures else err
        why = type(cause).__name__ + (f": {cause}" if str(cause) else "")
        raise ConfigError(f"{path} cannot be read ({why}); it has no {MANIFEST} to check "
                          f"it against (written before dpo_exp checked checkpoints) and may be damaged. Move it out "
                          f"of {path.parent} to resume from the checkpoint before it, or start over in a new run "
                          "directory (run_name=NAME)") from err


def _load(path: Path, trained: list) -> dict:
    state = _dcp_state(trained)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(path / "state"))
        for model in trained:
            set_state_dict(model.module, model.optimizer, model_state_dict=state[f"model.{model.name}"],
                           optim_state_dict=state[f"optim.{model.name}"], options=_DCP_OPTIONS)
    saved = torch.load(path / STATE_FILE, weights_only=True)
    for model in trained:
        model.scheduler.load_state_dict(saved["schedulers"][model.name])
    rng_file = path / "rng" / f"rank_{rank()}.pt"
    if not rng_file.exists():  # more ranks now than when saved: the new ones start from rank 0's generators
        rng_file = path / "rng" / "rank_0.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    return saved["loop"]


def saved_config(path: Path) -> Optional[dict]:
    file = path / CONFIG_FILE
    return json.loads(file.read_text()) if file.exists() else None
