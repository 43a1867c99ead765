"""A content-addressed cache for expensive artefacts (π_SFT, tokenizers, sampled pairs).

An entry's folder name is a hash of everything that determines it, so a β sweep
finds the π_SFT that its first job trained. Concurrent jobs are serialised with an
advisory file lock per entry, and an entry is built in its build folder (`<digest>.building/`) and renamed
into place only when complete, so a crash or a second job never sees half an entry. An interrupted build (a signal,
a preemption, a bug) leaves its build folder, and the next build of the entry continues from what it holds: the
training stages from their newest checkpoint (its `checkpoints/`, removed before the rename so entries stay small).
That is safe because the folder, like the entry, is keyed by everything that determines it. The ranks of a
torchrun job share one entry: rank 0 locks and writes it (`get_or_build`). A write the machine refuses while an
entry is built (no space, no permission: anywhere in the build, inside torch.distributed.checkpoint or
save_pretrained too) removes the build folder and stops every rank with a WriteFailed naming the entry.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from dpo_exp import distributed
from dpo_exp.errors import WriteFailed, writing
from dpo_exp.loggers import console

COMPLETE = "COMPLETE"
BUILDING = ".building"  # suffix of an entry's build folder
CHECKPOINTS = "checkpoints"  # a training stage's resumable checkpoints in its build folder (not kept in the entry)
INTACT = "every finished cache entry (this one is built again from its start)"  # what a refused write leaves


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
    """Return the folder of entry (kind, key), calling build(build_folder) once if it is missing. The build folder
    holds what an interrupted build of the same entry left (empty at first): a build may continue from it.

    Under torchrun only rank 0 decides, locks and writes the entry. collective=False: rank 0 builds it as a
    single process while the other ranks wait at a barrier (e.g. pairs read from files). collective=True:
    every rank runs build(the same tmp folder) (training π_SFT or the reward model, sharded), writing only
    from rank 0 (dpo_exp.distributed.is_main), and rank 0 completes the entry."""
    digest = cache_key(key)
    final = Path(cache_dir).resolve() / kind / digest
    if distributed.world_size() > 1:
        if collective:
            return _build_together(final, key, build)

        def alone() -> None:
            if distributed.is_main():
                with distributed.alone():
                    get_or_build(cache_dir, kind, key, build)

        distributed.together(alone, final, INTACT)  # the others wait; a refused write stops them too
        return final
    if (final / COMPLETE).exists():
        return final
    with writing(final, INTACT), _locked(final.parent / f"{digest}.lock"):
        if not (final / COMPLETE).exists():  # else another job built it while we waited
            tmp = _build_folder(final)
            try:
                with writing(final, INTACT):
                    build(tmp)
                    _complete(tmp, final, key)
            except WriteFailed:  # a refused write: start this entry over (any other failure leaves it to resume)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final


def _build_folder(final: Path) -> Path:
    """The build folder of `final`, as an interrupted build left it (the caller holds the lock)."""
    if final.exists():  # an entry folder without COMPLETE: left by a dpo_exp that could crash before the rename
        shutil.rmtree(final)
    for stale in final.parent.glob(f"{final.name}.tmp*"):  # the temporary folders of dpo_exp before builds resumed
        shutil.rmtree(stale, ignore_errors=True)
    folder = final.with_name(final.name + BUILDING)
    if folder.is_dir() and any(folder.iterdir()):
        console(f"continuing the interrupted build of {final} from what it left in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _complete(tmp: Path, final: Path, key: Any) -> None:
    shutil.rmtree(tmp / CHECKPOINTS, ignore_errors=True)  # only a resumed build needs them
    (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    (tmp / COMPLETE).touch()
    os.rename(tmp, final)


def _build_together(final: Path, key: Any, build: Callable[[Path], None]) -> Path:
    """get_or_build(collective=True) with several ranks: rank 0 holds the lock while all ranks build in its build
    folder. A write refused on any rank stops every rank (distributed.together) and rank 0 removes the build folder;
    any other failure leaves it for the next build to continue from."""
    with contextlib.ExitStack() as stack:
        def lock() -> Optional[str]:
            if distributed.is_main() and not (final / COMPLETE).exists():
                stack.enter_context(_locked(final.parent / f"{final.name}.lock"))
                if not (final / COMPLETE).exists():
                    return str(_build_folder(final))
            return None

        tmp = distributed.together(lock, final, INTACT)[0]  # rank 0's build folder, or None: the entry is there
        if tmp is None:
            return final
        def complete() -> None:
            if distributed.is_main():
                _complete(Path(tmp), final, key)

        def remove() -> None:
            shutil.rmtree(tmp, ignore_errors=True)

        distributed.together(lambda: build(Path(tmp)), final, INTACT, cleanup=remove)
        distributed.together(complete, final, INTACT, cleanup=remove)
    return final
