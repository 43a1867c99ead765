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
  other trained models in sub-folders (PPO's `value/`).

Everything is written into `.tmp_<name>/` and renamed into place when complete, so a crash
mid-write leaves the previous checkpoint as it was; only the newest `keep` step checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from dpo_exp.distributed import barrier, rank

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"
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
    return int(torch.load(path / STATE_FILE, weights_only=True)["loop"]["step"])


def latest(checkpoints: Path) -> Optional[Path]:
    """The newest complete checkpoint under `checkpoints` (step_<N> or final), or None. Folders still being
    written (.tmp_*) and folders of another layout are ignored."""
    if not checkpoints.is_dir():
        return None
    done = [p for p in checkpoints.iterdir() if p.is_dir() and (p / STATE_FILE).is_file() and not p.name.startswith(".")
            and (p.name == "final" or _STEP_DIR.match(p.name))]
    return max(done, key=lambda p: (checkpoint_step(p), p.name == "final"), default=None)


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


def save(path: Path, trained: list, loop_state: dict, run_config: Optional[dict], export=None) -> None:
    """Write a checkpoint at `path` atomically (every rank calls it). `export(folder)`, called on every rank,
    adds the Hugging Face files (written by rank 0)."""
    tmp = path.parent / f".tmp_{path.name}"
    main = rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(_dcp_state(trained), checkpoint_id=str(tmp / "state"))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank()}.pt")
    if export is not None:
        export(tmp)  # every rank: gathering a sharded model's full weights is collective; rank 0 writes
    barrier()
    if main:
        schedules = {model.name: model.scheduler.state_dict() for model in trained}
        torch.save({"loop": loop_state, "schedulers": schedules}, tmp / STATE_FILE)
        if run_config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1, sort_keys=True, default=str))
        if path.exists():  # re-saving final: the old one stays usable until the new one is in place
            old = path.parent / f".old_{path.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    barrier()


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
    loop state (with the algorithm's) for the caller."""
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
