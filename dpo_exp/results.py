"""Reading finished runs back: the evaluation points of every job of a multirun, from
outputs/ (metrics.jsonl, summary.json, .hydra/) or from a W&B group. Used by
scripts/frontier.py and scripts/compare.py; nothing here trains.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional


# A run's label, family and the cached stages it pays for are written into its summary.json by
# dpo_exp.train from the algorithm's own declarations (algorithm/label, /family, /stages);
# nothing here knows an algorithm by name. π_SFT is shared by every method and reported apart.


# An evaluation point whose policy samples hit the length cap more often than this has an eval/kl
# that under-counts the whole-response KL noticeably (it is the KL of the capped distributions):
# frontier.py draws it hollow and compare.py flags it.
TRUNCATION_FLAG = 0.05


def truncated_fraction(point: dict) -> Optional[float]:
    """Fraction of the point's policy samples cut at the length cap (None for runs from before it was logged)."""
    return point.get("eval/truncated_fraction")


def is_flagged(point: dict) -> bool:
    fraction = truncated_fraction(point)
    return fraction is not None and fraction > TRUNCATION_FLAG


@dataclass
class Run:
    label: str                 # e.g. "DPO β=0.1", "PPO target KL=6", "PPO-GT"
    family: str                # e.g. "sft" (Preferred-FT), "dpo-family", "online-dpo", "ppo", "ppo-gt"
    points: list[dict]         # evaluation rows of metrics.jsonl, in step order
    summary: dict = field(default_factory=dict)
    path: str = ""

    def stage_cost(self, unit: str = "flops") -> float:
        return sum(self.summary.get(f"cost/{stage}_{unit}", 0.0) for stage in self.summary.get("algorithm/stages", ()))

    def cost_at(self, point: dict, unit: str = "flops") -> float:
        """What reaching an evaluation point cost: the run's training so far plus its cached stages (NaN when the
        run did not count it: FLOPs are counted with trainer.count_flops=true)."""
        return point.get(f"cost/train_{unit}", math.nan) + self.stage_cost(unit)


def cheapest_to_reach(runs: Iterable[Run], family: str, level: float) -> Optional[dict]:
    """Over every arm of `family`, the evaluation point that first reaches gold reward >= level
    at the smallest total cost (the run's training so far plus its cached stages)."""
    best = None
    for run in runs:
        if run.family != family:
            continue
        for point in run.points:
            if point["eval/gold_reward"] >= level:
                cost = {"method": run.label, "step": point["step"], "gold": point["eval/gold_reward"],
                        "kl": point["eval/kl"],
                        "tflops": run.cost_at(point) / 1e12, "seconds": run.cost_at(point, "seconds")}
                if best is None or cost["tflops"] < best["tflops"]:
                    best = cost
                break
    return best


def describe(summary: dict, where: str) -> tuple[str, str]:
    """(label, family) of a finished run, as its algorithm declared them in summary.json."""
    if "algorithm/label" not in summary:
        raise SystemExit(f"{where}: summary.json has no algorithm/label (a run from before the algorithm "
                         "registry); re-run it to compare it")
    return summary["algorithm/label"], summary["algorithm/family"]


def read_run(folder: Path) -> Optional[Run]:
    metrics, summary_file = folder / "metrics.jsonl", folder / "summary.json"
    if not metrics.exists() or not summary_file.exists():
        return None  # unfinished
    summary = json.loads(summary_file.read_text())
    label, family = describe(summary, str(folder))
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    points = [r for r in rows if "eval/kl" in r and "eval/gold_reward" in r]
    return Run(label, family, sorted(points, key=lambda r: r["step"]), summary, str(folder))


def read_runs(folders: Iterable[str]) -> list[Run]:
    """Every run under the given folders (a multirun folder, a run folder, or several)."""
    runs = []
    for root in map(Path, folders):
        candidates = [root] if (root / "metrics.jsonl").exists() else sorted(p.parent for p in root.rglob("metrics.jsonl"))
        runs += [r for r in map(read_run, candidates) if r is not None and r.points]
    if not runs:
        raise SystemExit(f"no finished runs with eval/kl and eval/gold_reward under {', '.join(map(str, folders))}")
    return runs


def read_wandb_group(path: str) -> list[Run]:
    """Runs of a W&B group, 'entity/project/group' (needs a network and an API key)."""
    import wandb

    entity, project, group = path.split("/")
    runs = []
    for r in wandb.Api().runs(f"{entity}/{project}", filters={"group": group}):
        label, family = describe(dict(r.summary), r.url)
        keys = ["step", "eval/kl", "eval/gold_reward", "eval/gold_reward_ref", "eval/truncated_fraction",
                "cost/train_flops", "cost/train_seconds"]
        points = [row for row in r.scan_history(keys=keys) if row.get("eval/kl") is not None]
        runs.append(Run(label, family, sorted(points, key=lambda p: p["step"]), dict(r.summary), r.url))
    return runs
