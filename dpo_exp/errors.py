"""Expected failures end a command with one message a person can read, not a stack trace.

This module is a leaf: every other module may import it.

A bad data file, a config that composes but cannot run, a model folder or hub model that cannot be loaded,
an objective the run did not produce: each is raised as a `ConfigError` or `DataFileError` whose message
says what is wrong, where, and what to change. `readable_errors` around a command's body prints that message
and exits with status 2; `HYDRA_FULL_ERROR=1` (Hydra's own switch) re-raises it with its traceback.
Anything else is a bug and keeps its traceback. A run directory that the failed command left with nothing
but Hydra's config dump and its job log is removed, so a failure leaves nothing half written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional


class ConfigError(ValueError):
    """A config that composes but cannot run; the message says what to change."""


class DataFileError(ValueError):
    """A file that does not parse, or an invalid row under on_invalid="error"."""


EXPECTED = (ConfigError, DataFileError)
EXIT_CODE = 2
HYDRA_LEFTOVERS = {".hydra"}


def full_traceback_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextlib.contextmanager
def readable_errors(output_dir: Optional[str | Path] = None) -> Iterator[None]:
    """Run the block; an expected error prints `dpo_exp: error: <message>` on stderr and exits 2."""
    try:
        yield
    except EXPECTED as err:
        if full_traceback_wanted():
            raise
        if output_dir is not None:
            remove_if_untouched(Path(output_dir))
        print(f"dpo_exp: error: {err}\n(HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)


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
