"""Metric sinks. Every run writes metrics.jsonl, samples.jsonl and summary.json into its
run directory; W&B is an optional second sink behind the same interface (never a patch
of the wandb module), so `logger=none` simply means "files only".
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from dpo_exp.distributed import is_main


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
    """metrics.jsonl (one object per logging step), samples.jsonl (tables), summary.json."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._samples = open(self.run_dir / "samples.jsonl", "a")

    def log(self, metrics: dict, step: int) -> None:
        self._metrics.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._metrics.flush()

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        for row in rows:
            self._samples.write(json.dumps({"table": name, "step": step, **dict(zip(columns, map(_plain, row)))}) + "\n")
        self._samples.flush()

    def rewind(self, step: int) -> None:
        """Keep only the rows of steps <= step (what a checkpoint at `step` had seen), so a resumed run's files
        continue without duplicated or missing steps."""
        for name in ("metrics", "samples"):
            handle = getattr(self, f"_{name}")
            handle.close()
            path = self.run_dir / f"{name}.jsonl"
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            setattr(self, f"_{name}", open(path, "a"))

    def summary(self, summary: dict) -> None:
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps({k: _plain(v) for k, v in summary.items()}, indent=2, sort_keys=True))
        os.replace(tmp, self.run_dir / "summary.json")

    def finish(self) -> None:
        self._metrics.close()
        self._samples.close()


class WandbSink:
    """Weights & Biases: the same metrics, the resolved config, sample tables; one group per multirun."""

    def __init__(self, cfg, run_dir: Path, config: dict, name: str, group: Optional[str]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        mode = cfg.mode
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            # no key: never block on a login prompt; keep a syncable offline run instead
            print("[dpo_exp] no W&B API key found; logging offline (sync later with `wandb sync`)")
            mode = "offline"
        # One W&B run per run directory: a resumed run (same directory) continues the same W&B run id.
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=mode, group=cfg.group or group, tags=list(cfg.tags),
            name=name, dir=str(cfg.dir or run_dir), config=config, reinit="finish_previous", id=run_id,
            resume="allow", settings=wandb.Settings(console="off", silent=True))
        for split in ("train", "eval"):
            self.run.define_metric(f"{split}/*", step_metric="step")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({"step": step, **{k: _plain(v) for k, v in metrics.items()}})

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.run.log({"step": step, name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def summary(self, summary: dict) -> None:
        for key, value in summary.items():
            self.run.summary[key] = _plain(value)

    def finish(self) -> None:
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

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()
