"""A content-addressed cache for expensive artefacts (π_SFT, tokenizers, sampled pairs).

An entry's folder name is a hash of everything that determines it, so a β sweep
finds the π_SFT that its first job trained. Concurrent jobs are serialised with an
advisory file lock per entry, and an entry is built in a temporary folder and renamed
into place only when complete, so a crash or a second job never sees half an entry.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

COMPLETE = "COMPLETE"


def cache_key(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable description."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other job is done
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def get_or_build(cache_dir: str | Path, kind: str, key: Any, build: Callable[[Path], None]) -> Path:
    """Return the folder of entry (kind, key), calling build(tmp_folder) once if it is missing."""
    digest = cache_key(key)
    final = Path(cache_dir).resolve() / kind / digest
    if (final / COMPLETE).exists():
        return final
    with _locked(final.parent / f"{digest}.lock"):
        if (final / COMPLETE).exists():  # another job built it while we waited
            return final
        if final.exists():  # left by a crash before the rename finished; never reuse it
            shutil.rmtree(final)
        for stale in final.parent.glob(f"{digest}.tmp*"):  # a build killed by a signal; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{digest}.tmp", dir=final.parent))
        try:
            build(tmp)
            (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
            (tmp / COMPLETE).touch()
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
