"""Metric sinks. Every run writes metrics.jsonl, samples.jsonl and summary.json into its
run directory; W&B is an optional second sink behind the same interface (never a patch
of the wandb module), so `logger=none` simply means "files only".

A write the machine refuses (no space left, permission denied, a read-only folder) stops the run with one
`WriteFailed` naming the file (dpo_exp.errors: exit 74), never a half-written line; a resumed run logs every step
once, in the files and in W&B.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from dpo_exp.distributed import is_main
from dpo_exp.errors import writing


def is_main_process() -> bool:
    """Whether this process writes files, prints, logs and builds cache entries (rank 0 of a torchrun job;
    always true for a single process); dpo_exp.distributed.is_main decides it."""
    return is_main()


def console(message: str) -> None:
    """A line for the researcher watching the run (main process only)."""
    if is_main_process():
        print(f"[dpo_exp] {message}", flush=True)


@contextlib.contextmanager
def progress(total: int, desc: str, enabled: bool = True):
    """The progress bar with rate and ETA (stderr), shown by the main process only."""
    bar = tqdm(total=total, desc=desc, disable=not (enabled and is_main_process()), dynamic_ncols=True,
               mininterval=2.0)
    try:
        yield bar
    finally:
        bar.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than dropping it
    return value


class FileSink:
    """metrics.jsonl (one object per logging step), samples.jsonl (tables), summary.json.

    Every row is one write of whole lines; a write the machine refuses is cut back off the file (so the file
    holds only whole rows) and raised as WriteFailed naming the file and what is intact.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        with writing(self.run_dir, intact=self.intact()):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.run_dir / "metrics.jsonl", "ab", buffering=0)
            self._samples = open(self.run_dir / "samples.jsonl", "ab", buffering=0)

    def intact(self) -> str:
        """What a refused write leaves intact, as WriteFailed says it."""
        folder = self.run_dir / "checkpoints"
        saved = folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())
        where = (f"the checkpoints in {folder} (a rerun continues from the newest and cuts metrics.jsonl and "
                 "samples.jsonl back to its step)" if saved else "no checkpoint yet (a rerun starts the run over)")
        return f"{where}; every whole row of metrics.jsonl and samples.jsonl in {self.run_dir}"

    def log(self, metrics: dict, step: int) -> None:
        self._append(self._metrics, json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._append(self._samples, "".join(json.dumps({"table": name, "step": step,
                                                        **dict(zip(columns, map(_plain, row)))}) + "\n"
                                            for row in rows))

    def _append(self, handle, text: str) -> None:
        """Append whole lines; a refused write is truncated off again before WriteFailed is raised."""
        size = os.fstat(handle.fileno()).st_size
        with writing(handle.name, intact=self.intact()):
            try:
                write_all(handle, text.encode())
            except OSError:
                with contextlib.suppress(OSError):  # a read-only file system refuses this too: nothing was written
                    os.ftruncate(handle.fileno(), size)
                raise

    def rewind(self, step: int) -> None:
        """Keep only the rows of steps <= step (what a checkpoint at `step` had seen), so a resumed run's files
        continue without duplicated or missing steps. A last line cut short by a kill is dropped."""
        for name in ("metrics", "samples"):
            handle = getattr(self, f"_{name}")
            handle.close()
            path = self.run_dir / f"{name}.jsonl"
            lines = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
            if lines and not _whole_row(lines[-1]):
                lines.pop()
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
            self._replace(path, "".join(kept))
            setattr(self, f"_{name}", open(path, "ab", buffering=0))

    def start_over(self) -> None:
        """The run starts from step 0: rows an earlier attempt in this directory logged before it was killed
        (before its first checkpoint) are dropped."""
        self.rewind(-1)

    def summary(self, summary: dict) -> None:
        self._replace(self.run_dir / "summary.json",
                      json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2, sort_keys=True))

    def _replace(self, path: Path, text: str) -> None:
        """Write `path` whole through a temporary file beside it (removed when the write is refused)."""
        tmp = path.with_name(path.name + ".tmp")
        with writing(path, intact=self.intact(), remove=tmp):
            with open(tmp, "wb", buffering=0) as handle:
                write_all(handle, text.encode())
            os.replace(tmp, path)

    def finish(self) -> None:
        self._metrics.close()
        self._samples.close()


def write_all(handle, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (a short write goes on where it stopped): nothing is left in a
    buffer that a later close would try, and fail, to write again."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]


def _whole_row(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return line.endswith("\n")


class WandbSink:
    """Weights & Biases: the same metrics, the resolved config, sample tables; one group per multirun.

    One W&B run per run directory, with one history row per training step: every row is logged at W&B step =
    the training step (W&B itself then refuses a step lower than one it has). A rerun in the same directory
    continues the W&B run whose id is in `wandb_run_id`. When the loop resumes from its newest checkpoint (at step
    c) it recomputes the steps between c and the kill, which the W&B run may already hold; none is logged twice:

    - online: the run is resumed (resume="allow") and W&B's server says where its history ends
      (`run.starting_step`); the recomputed steps below it are skipped (a resume is exact, so the values are
      the ones it holds), those after it, which the kill lost before they reached the server, are logged.
    - offline: there is no server to ask, and the killed process's last rows may never have reached its
      `.wandb` file; the new segment is started as a rewind of the run to step c
      (wandb.init(resume_from="<id>?_step=<c>"), which the installed wandb supports): it records that branch
      point, `wandb sync` cuts the run's history after step c (W&B's rewind) and appends the rows from c + 1.

    Not a file of "steps logged" kept beside wandb_run_id: a kill loses the rows W&B had not yet written or sent
    (up to its 15 s flush interval), so such a file would claim rows W&B never got. Not fork_from: a new W&B run
    per resume. Rewinding online too would add nothing (the values are the same) but needs W&B's rewind preview
    enabled on the server.

    wandb.init waits for the first call, so that a resume (`rewind`) can still choose how the run starts.
    """

    def __init__(self, cfg, run_dir: Path, config: dict, name: str, group: Optional[str]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.mode = cfg.mode
        if self.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            # no key: never block on a login prompt; keep a syncable offline run instead
            print("[dpo_exp] no W&B API key found; logging offline (sync later with `wandb sync`)")
            self.mode = "offline"
        # One W&B run per run directory: a resumed run (same directory) continues the same W&B run id.
        id_file = self._id_file = Path(run_dir) / "wandb_run_id"
        self._existed = id_file.exists()
        self.run_id = id_file.read_text().strip() if self._existed else uuid.uuid4().hex[:12]
        id_file.write_text(self.run_id)
        self._init = dict(project=cfg.project, entity=cfg.entity, mode=self.mode, group=cfg.group or group,
                          tags=list(cfg.tags), name=name, dir=str(cfg.dir or run_dir), config=config,
                          reinit="finish_previous", id=self.run_id, settings=wandb.Settings(console="off", silent=True))
        self.run, self._held = None, 0
        self._resumed = False  # the loop resumed from a checkpoint: rows W&B already holds are not logged again

    def _start(self, rewind_to: Optional[int] = None) -> None:
        if self.run is not None:
            return
        how = {"resume_from": f"{self.run_id}?_step={rewind_to}"} if rewind_to is not None else {"resume": "allow"}
        self.run = self._init_run(how)
        self._held = self.run.starting_step  # the steps below are in the W&B run's history already (resumed, rewound)
        for split in ("train", "eval"):
            self.run.define_metric(f"{split}/*", step_metric="step")

    def rewind(self, step: int) -> None:
        """The loop resumed from a checkpoint at `step`; offline, an earlier W&B run of this directory is rewound to
        it (W&B keeps its rows up to `step` and continues at the next)."""
        self._resumed = True
        self._start(step if self.mode == "offline" and self._existed else None)

    def _init_run(self, how: dict, waits: tuple[float, ...] = (1, 2, 4, 8, 16, 30)):
        """wandb.init, waiting while the W&B service of a killed attempt on this machine still holds the run id
        ("run ID ... is in use": it exits once it sees its process gone, within seconds)."""
        for wait in (*waits, None):
            try:
                return self._wandb.init(**self._init, **how)
            except Exception as err:  # wandb's ServerResponseError, whose module path moves between versions
                if wait is None or "is in use" not in str(err):
                    raise
                print(f"[dpo_exp] W&B run {self.run_id} is still held by an earlier attempt's W&B service; "
                      f"retrying in {wait:g} s", flush=True)
                time.sleep(wait)

    def start_over(self) -> None:
        """The run starts from step 0 (no checkpoint to resume from): an earlier attempt's W&B run in this directory,
        killed before its first checkpoint, is left as it is and this attempt logs to a new one."""
        if self._existed and self.run is None:
            self.run_id = uuid.uuid4().hex[:12]
            self._id_file.write_text(self.run_id)
            self._init["id"] = self.run_id
            self._existed = False

    def _log(self, row: dict, step: int) -> None:
        self._start()
        if step < self._held and self._resumed:
            return
        self.run.log({"step": step, **row}, step=max(step, self._held))  # a late addition (the judge's) goes after

    def log(self, metrics: dict, step: int) -> None:
        self._log({k: _plain(v) for k, v in metrics.items()}, step)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])}, step)

    def summary(self, summary: dict) -> None:
        self._start()
        for key, value in summary.items():
            self.run.summary[key] = _plain(value)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()  # before the next multirun job starts, or sweeps hang


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text()


class RunLogger:
    """Fans every call out to the sinks of this run; holds no sinks outside the main process."""

    def __init__(self, sinks: list):
        self.is_main = is_main_process()
        self.sinks = sinks if self.is_main else []

    def log(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        for sink in self.sinks:
            sink.table(name, columns, rows, step)

    def summary(self, summary: dict) -> None:
        for sink in self.sinks:
            sink.summary(summary)

    def rewind(self, step: int) -> None:
        """A resumed run continues from `step`: sinks that can drop what was logged after it do so."""
        for sink in self.sinks:
            if hasattr(sink, "rewind"):
                sink.rewind(step)

    def start_over(self) -> None:
        """The run starts from step 0: sinks drop (or leave behind) what an earlier attempt logged."""
        for sink in self.sinks:
            if hasattr(sink, "start_over"):
                sink.start_over()

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()
