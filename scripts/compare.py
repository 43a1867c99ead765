"""A table per method of a multirun: best gold reward, the KL at that point, and the
wall-clock and FLOPs spent to reach it (counted during the runs with trainer.count_flops=true, as the
compare experiments set it; not estimated here: a run that did not count shows nan).

    python scripts/compare.py outputs/multirun/<date>/<time>_compare_sentiment [--markdown]

Cost to reach a point = the run's own training up to that evaluation (cost/train_*), plus
the cached stages the method needs: those its algorithm declared (summary.json algorithm/stages):
the sampled pairs for Preferred-FT and DPO, the pairs and the reward model for PPO and online DPO
with a reward model, nothing for PPO-GT (it queries the gold reward).
π_SFT is shared by every method and reported once below the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpo_exp.results import (TRUNCATION_FLAG, cheapest_to_reach, is_flagged, read_runs,  # noqa: E402
                             read_wandb_group, truncated_fraction)


def best_point(run) -> dict:
    return max(run.points, key=lambda p: p["eval/gold_reward"])


def rows(runs) -> list[dict]:
    out = []
    for run in sorted(runs, key=lambda r: (r.family, r.label)):
        best = best_point(run)
        out.append({
            "method": run.label, "family": run.family,
            "best gold reward": best["eval/gold_reward"], "KL at best": best["eval/kl"],
            "cut at best": truncated_fraction(best), "flagged": is_flagged(best), "step": best["step"],
            "seconds to best": run.cost_at(best, "seconds"),
            "TFLOPs to best": run.cost_at(best) / 1e12,
            "TFLOPs whole run": run.cost_at(run.points[-1]) / 1e12,
        })
    return out


def family_costs(table: list[dict]) -> dict:
    """Per family: the arm with the best gold reward, and what reaching it cost."""
    best = {}
    for row in table:
        if row["family"] not in best or row["best gold reward"] > best[row["family"]]["best gold reward"]:
            best[row["family"]] = row
    return best


def render(table: list[dict], markdown: bool) -> str:
    columns = [c for c in table[0] if c not in ("family", "flagged")]
    fmt = {"best gold reward": "{:.3f}", "KL at best": "{:.2f}", "step": "{}", "seconds to best": "{:.0f}",
           "TFLOPs to best": "{:.3f}", "TFLOPs whole run": "{:.3f}", "method": "{}"}

    def cell(row: dict, column: str) -> str:
        if column == "cut at best":  # the fraction of policy samples cut at the length cap, flagged above the limit
            value = row[column]
            return "n/a" if value is None else f"{value:.0%}" + (" (!)" if row["flagged"] else "")
        return fmt[column].format(row[column])

    cells = [[cell(row, c) for c in columns] for row in table]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="multirun or run folders under outputs/")
    parser.add_argument("--wandb", help="read the runs of a W&B group instead: ENTITY/PROJECT/GROUP")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    if not args.runs and not args.wandb:
        parser.error("give run folders or --wandb")
    runs = read_wandb_group(args.wandb) if args.wandb else read_runs(args.runs)
    table = rows(runs)
    print(render(table, args.markdown))
    flagged = [row["method"] for row in table if row["flagged"]]
    print(f"\ncut at best: fraction of the best point's policy samples that hit the length cap without EOS; (!) above "
          f"{TRUNCATION_FLAG:.0%}, where eval/kl under-counts the whole-response KL"
          + (f" ({len(flagged)} flagged: {', '.join(flagged)})" if flagged else " (none flagged)"))
    best = family_costs(table)
    sft_flops = next((r.summary.get("cost/sft_flops") for r in runs if r.summary.get("cost/sft_flops")), None)
    if sft_flops:
        print(f"\nπ_SFT (shared by every method): {sft_flops / 1e12:.3f} TFLOPs")
    for family, row in sorted(best.items()):
        print(f"best {family} arm ({row['method']}): gold reward {row['best gold reward']:.3f} at KL "
              f"{row['KL at best']:.2f}, {row['TFLOPs to best']:.3f} TFLOPs, {row['seconds to best']:.0f} s")
    if "dpo-family" not in best:
        return
    d = best["dpo-family"]
    sampling = {r.family for r in runs if r.summary.get("algorithm/needs", {}).get("rollouts")}
    for family in sorted(set(best) & sampling):  # the methods that sample while training, each against DPO
        p = best[family]
        print(f"\n{family} / DPO compute to reach their best points: "
              f"{p['TFLOPs to best'] / d['TFLOPs to best']:.2f}x FLOPs, "
              f"{p['seconds to best'] / max(d['seconds to best'], 1e-9):.2f}x wall-clock")
        level = min(d["best gold reward"], p["best gold reward"])
        reach = {f: cheapest_to_reach(runs, f, level) for f in ("dpo-family", family)}
        print(f"cheapest point reaching gold reward {level:.3f} (the level both families reach):")
        for f, c in reach.items():
            print(f"  {f}: {c['method']} step {c['step']}, gold {c['gold']:.3f} at KL {c['kl']:.2f}, "
                  f"{c['tflops']:.3f} TFLOPs, {c['seconds']:.0f} s")
        ratio_flops = reach[family]["tflops"] / reach["dpo-family"]["tflops"]
        ratio_seconds = reach[family]["seconds"] / max(reach["dpo-family"]["seconds"], 1e-9)
        print(f"  {family} / DPO compute to reach it: {ratio_flops:.2f}x FLOPs, {ratio_seconds:.2f}x wall-clock")


if __name__ == "__main__":
    main()
