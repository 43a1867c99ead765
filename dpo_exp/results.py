"""Reading finished runs back: the evaluation points of every job of a multirun, from
outputs/ (metrics.jsonl, summary.json, .hydra/) or from a W&B group. Used by
scripts/frontier.py and scripts/compare.py; nothing here trains.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import yaml

# the cached stages each method pays for (besides its own training): Preferred-FT and DPO
# need the sampled pairs, PPO with a reward model needs the pairs and the reward model,
# PPO-GT queries the gold reward directly. π_SFT is shared by all and reported apart.
STAGES = {"sft": ("pair_sampling",), "dpo-family": ("pair_sampling",), "ppo": ("pair_sampling", "reward_model"),
          "ppo-gt": ()}


@dataclass
class Run:
    label: str                 # e.g. "dpo β=0.1", "ppo target KL=6", "ppo-gt"
    family: str                # "sft" (Preferred-FT), "dpo-family", "ppo", "ppo-gt"
    points: list[dict]         # evaluation rows of metrics.jsonl, in step order
    summary: dict = field(default_factory=dict)
    path: str = ""

    def stage_cost(self, unit: str = "flops") -> float:
        return sum(self.summary.get(f"cost/{stage}_{unit}", 0.0) for stage in STAGES[self.family])

    def cost_at(self, point: dict, unit: str = "flops") -> float:
        """What reaching an evaluation point cost: the run's training so far plus its cached stages."""
        return point.get(f"cost/train_{unit}", 0.0) + self.stage_cost(unit)


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


def describe(config: dict) -> tuple[str, str]:
    """(label, family) of a run from its composed config."""
    loss = config["loss"]
    name = loss["name"]
    if name == "ppo":
        ppo = config["ppo"]
        if ppo["reward"] == "gold":
            return "PPO-GT", "ppo-gt"
        target = ppo.get("target_kl")
        return (f"PPO target KL={target:g}" if target else f"PPO β={ppo['kl_coef']:g}"), "ppo"
    if name == "sft":
        return "Preferred-FT", "sft"
    return f"{name.upper()} β={loss['beta']:g}", "dpo-family"


def read_run(folder: Path) -> Optional[Run]:
    metrics, config_file = folder / "metrics.jsonl", folder / ".hydra" / "config.yaml"
    if not metrics.exists() or not config_file.exists():
        return None
    config = yaml.safe_load(config_file.read_text())
    label, family = describe(config)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    points = [r for r in rows if "eval/kl" in r and "eval/gold_reward" in r]
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
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
        label, family = describe(r.config)
        keys = ["step", "eval/kl", "eval/gold_reward", "eval/gold_reward_ref", "cost/train_flops", "cost/train_seconds"]
        points = [row for row in r.scan_history(keys=keys) if row.get("eval/kl") is not None]
        runs.append(Run(label, family, sorted(points, key=lambda p: p["step"]), dict(r.summary), r.url))
    return runs
