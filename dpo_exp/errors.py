"""Expected failures end a command with one message a person can read, not a stack trace.

This module is a leaf: every other module may import it.

A bad data file, a config that composes but cannot run, a model folder or hub model that cannot be loaded,
an objective the run did not produce: each is raised as a `ConfigError` or `DataFileError` whose message
says what is wrong, where, and what to change. `readable_errors` around a command's body prints that message
and exits with status 2; `HYDRA_FULL_ERROR=1` (Hydra's own switch) re-raises it with its traceback.
A write the machine refuses (no space left, no permission, a read-only folder) is a `WriteFailed`, raised by
`writing` around the write after it removed what was half written: one line naming the path, what is intact and
that rerunning the same command resumes, and exit status 74. Anything else is a bug and keeps its traceback.
A run directory that the failed command left with nothing but Hydra's config dump and its job log is removed, so
a failure leaves nothing half written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional


class ConfigError(ValueError):
    """A config that composes but cannot run; the message says what to change."""


class DataFileError(ValueError):
    """A file that does not parse, or an invalid row under on_invalid="error"."""


class WriteFailed(Exception):
    """Writing a file failed for a reason outside the program (no space left, permission denied, a read-only
    folder). What was being written is removed; `intact` says what a rerun of the same command continues
    from."""

    def __init__(self, path: str | Path, cause: OSError, intact: str = ""):
        self.path, self.cause, self.intact = str(path), cause, intact
        reason = cause.strerror or type(cause).__name__
        super().__init__(f"could not write {self.path}: {reason}"
                         + (f". Intact: {intact}" if intact else "")
                         + ". Free the space or fix the permission, then rerun the same command: it resumes.")


# OSErrors that say the machine refused a write, not that the program is wrong
WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors and tokenizers (Rust) word an OSError


def refused_write(err: BaseException) -> Optional[OSError]:
    """The OSError behind `err` when the machine refused a write (WRITE_REFUSED), else None.

    Libraries hand it on wrapped: torch.save raises a RuntimeError whose __context__ is the file's OSError;
    torch.distributed.checkpoint raises a CheckpointException (a BaseException) holding every failed rank's
    (exception, traceback) in `failures`; safetensors and tokenizers keep only the message, "... (os error 28)".
    KeyboardInterrupt and SystemExit are never a refused write.
    """
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not (isinstance(e, Exception) or hasattr(e, "failures")):
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_REFUSED:
            return e
        match = _RUST_OS_ERROR.search(str(e)) if not isinstance(e, OSError) else None
        if match and int(match.group(1)) in WRITE_REFUSED:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


@contextlib.contextmanager
def writing(path: str | Path, intact: str = "", remove: Optional[Path] = None) -> Iterator[None]:
    """Run a block that writes `path`; a refused write (WRITE_REFUSED, however a library wrapped it: see
    refused_write) removes `remove` (the half-written temporary folder or file) and raises WriteFailed naming the
    path and what is intact. Any other error passes unchanged, and so does a WriteFailed of an inner block."""
    try:
        yield
    except WriteFailed:
        raise
    except BaseException as err:
        cause = refused_write(err)
        if cause is None:
            raise
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True) if Path(remove).is_dir() else Path(remove).unlink(missing_ok=True)
        raise WriteFailed(path, cause, intact) from err


EXPECTED = (ConfigError, DataFileError)
EXIT_CODE = 2
WRITE_EXIT_CODE = 74  # EX_IOERR: the machine refused a write; nothing is half written, rerunning resumes
HYDRA_LEFTOVERS = {".hydra"}


def full_traceback_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def readable_errors(output_dir: Optional[str | Path] = None) -> Iterator[None]:
    """Run the block; an expected error prints `dpo_exp: error: <message>` on stderr and exits 2 (74 for a write
    the machine refused)."""
    try:
        yield
    except EXPECTED as err:
        if full_traceback_wanted():
            raise
        if output_dir is not None:
            remove_if_untouched(Path(output_dir))
        print(f"dpo_exp: error: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)
    except WriteFailed as err:
        if full_traceback_wanted():
            raise
        print(f"dpo_exp: error: {err}", file=sys.stderr, flush=True)
        sys.exit(WRITE_EXIT_CODE)


def remove_if_untouched(folder: Path) -> None:
    """Remove a run directory holding only what Hydra wrote before the command failed (.hydra/ and its job
    log); a folder with anything of a run (metrics, samples, checkpoints, a W&B folder) is left alone."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in HYDRA_LEFTOVERS:
            continue
        if entry.is_file() and entry.suffix == ".log":  # Hydra's job log: warnings at most, the error is printed
            continue
        return
    shutil.rmtree(folder, ignore_errors=True)
