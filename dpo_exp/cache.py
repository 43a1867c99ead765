"""A content-addressed cache for expensive artefacts (π_SFT, tokenizers, sampled pairs).

An entry's folder name is a hash of everything that determines it, so a β sweep
finds the π_SFT that its first job trained. Concurrent jobs are serialised with an
advisory file lock per entry, and an entry is built in a temporary folder and renamed
into place only when complete, so a crash or a second job never sees half an entry. The ranks of a
torchrun job share one entry: rank 0 locks and writes it (`get_or_build`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

from dpo_exp import distributed

COMPLETE = "COMPLETE"


def cache_key(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable description."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other job is done
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_or_build(cache_dir: str | Path, kind: str, key: Any, build: Callable[[Path], None],
                 collective: bool = False) -> Path:
    """Return the folder of entry (kind, key), calling build(tmp_folder) once if it is missing.

    Under torchrun only rank 0 decides, locks and writes the entry. collective=False: rank 0 builds it as a
    single process while the other ranks wait at a barrier (e.g. pairs read from files). collective=True:
    every rank runs build(the same tmp folder) (training π_SFT or the reward model, sharded), writing only
    from rank 0 (dpo_exp.distributed.is_main), and rank 0 completes the entry."""
    digest = cache_key(key)
    final = Path(cache_dir).resolve() / kind / digest
    if distributed.world_size() > 1:
        if collective:
            return _build_together(final, key, build)
        if distributed.is_main():
            with distributed.alone():
                get_or_build(cache_dir, kind, key, build)
        distributed.barrier()
        return final
    if (final / COMPLETE).exists():
        return final
    with _locked(final.parent / f"{digest}.lock"):
        if not (final / COMPLETE).exists():  # else another job built it while we waited
            tmp = _fresh_tmp(final)
            try:
                build(tmp)
                _complete(tmp, final, key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def _fresh_tmp(final: Path) -> Path:
    """An empty build folder for `final`, after removing what a crashed build left (the caller holds the lock)."""
    if final.exists():  # left by a crash before the rename finished; never reuse it
        shutil.rmtree(final)
    for stale in final.parent.glob(f"{final.name}.tmp*"):  # a build killed by a signal
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp", dir=final.parent))


def _complete(tmp: Path, final: Path, key: Any) -> None:
    (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    (tmp / COMPLETE).touch()
    os.rename(tmp, final)


def _build_together(final: Path, key: Any, build: Callable[[Path], None]) -> Path:
    """get_or_build(collective=True) with several ranks: rank 0 holds the lock while all ranks build."""
    with contextlib.ExitStack() as stack:
        tmp = None
        if distributed.is_main() and not (final / COMPLETE).exists():
            stack.enter_context(_locked(final.parent / f"{final.name}.lock"))
            if not (final / COMPLETE).exists():
                tmp = _fresh_tmp(final)
                stack.callback(shutil.rmtree, tmp, ignore_errors=True)  # gone after the rename; removed on a failure
        tmp = distributed.broadcast_object(None if tmp is None else str(tmp))
        if tmp is None:
            return final
        build(Path(tmp))
        distributed.barrier()
        if distributed.is_main():
            _complete(Path(tmp), final, key)
    distributed.barrier()
    return final
