"""Gold reward against KL(π‖π_ref) for every method and every evaluation point: the
analogue of the DPO paper's Figure 2 (left), drawn from the runs of a multirun.

    python scripts/frontier.py outputs/multirun/<date>/<time>_compare_sentiment [-o frontier.png]
    python scripts/frontier.py --wandb ENTITY/PROJECT/GROUP -o frontier.png

Each point is one evaluation: x = eval/kl (sequence-level KL from policy samples), y =
eval/gold_reward, both computed by the same evaluator for every method. The reference
policy π_SFT sits at KL 0 (eval/gold_reward_ref).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpo_exp.results import TRUNCATION_FLAG, is_flagged, read_runs, read_wandb_group  # noqa: E402

# family (summary.json algorithm/family) -> colour map, marker; other families get the fallback
STYLE = {"dpo-family": ("Reds", "o"), "online-dpo": ("Purples", "v"), "ppo": ("Blues", "s"),
         "ppo-gt": ("Greens", "^"), "sft": ("Greys", "D")}
FALLBACK = ("Oranges", "x")


def auto_max_kl(runs) -> float:
    """The x-axis limit: 15% beyond the largest KL of any point whose samples are whole (not flagged), so one
    collapsed point (KL in the hundreds, mostly cut samples) does not squeeze every other point into a corner."""
    kls = [p["eval/kl"] for r in runs for p in r.points if not is_flagged(p)] or \
        [p["eval/kl"] for r in runs for p in r.points]
    return 1.15 * max(kls + [1e-3])


def draw(runs, out: Path, title: str, max_kl: float | None = None) -> None:
    """One line per run through its evaluation points in training order, its last point enlarged; runs are
    named in a legend beside the axes (one shade per run within its family's colour), so no label sits on
    the data and none overlaps another however close the points are. Points beyond max_kl are drawn on the
    right edge as an arrow head with their KL written beside it."""
    fig, ax = plt.subplots(figsize=(10, 5.5))
    limit = auto_max_kl(runs) if max_kl is None else (max_kl or float("inf"))
    beyond = []
    by_family: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: (r.family, r.label)):
        by_family.setdefault(run.family, []).append(run)
    for family, members in by_family.items():
        cmap_name, marker = STYLE.get(family, FALLBACK)
        cmap = matplotlib.colormaps[cmap_name]
        for i, run in enumerate(members):
            color = cmap(0.5 + 0.45 * (i / max(1, len(members) - 1)) if len(members) > 1 else 0.8)
            xs = [min(p["eval/kl"], limit) for p in run.points]
            ys = [p["eval/gold_reward"] for p in run.points]
            beyond += [(limit, p["eval/gold_reward"], p["eval/kl"], color) for p in run.points if p["eval/kl"] > limit]
            ax.plot(xs, ys, color=color, linewidth=0.8, alpha=0.8)
            solid = [not is_flagged(p) for p in run.points]
            for keep, face in ((True, color), (False, "none")):  # hollow: too many samples cut at the cap
                chosen = [(x, y) for x, y, s in zip(xs, ys, solid) if s == keep]
                if chosen:
                    ax.scatter(*zip(*chosen), facecolors=face, edgecolors=color, marker=marker, s=18, linewidths=1.0,
                               label=run.label if keep == solid[0] else None)
            ax.scatter(xs[-1:], ys[-1:], facecolors=color if solid[-1] else "none", edgecolors="black", marker=marker,
                       s=60, linewidths=0.8, zorder=4)
    for x, y, kl, color in beyond:
        ax.scatter([x], [y], color=color, marker=">", s=70, zorder=6, edgecolors="black", linewidths=0.6)
        ax.annotate(f"KL {kl:.0f} →", (x, y), textcoords="offset points", xytext=(-8, 6), ha="right", fontsize=7)
    if beyond:
        ax.set_xlim(right=limit * 1.02)
    refs = [p["eval/gold_reward_ref"] for r in runs for p in r.points if "eval/gold_reward_ref" in p]
    if refs:
        ax.scatter([0], [refs[0]], color="black", marker="*", s=140, zorder=5, label="π_SFT (= π_ref)")
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (from policy samples)")
    ax.set_ylabel("gold reward (mean over held-out prompts)")
    flagged = sum(is_flagged(p) for r in runs for p in r.points)
    ax.set_title(f"{title}\n(lines: evaluation points in training order; large marker: the run's last point; hollow: "
                 f"> {TRUNCATION_FLAG:.0%} of samples cut at the length cap, {flagged} points)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    print(f"wrote {out} ({sum(len(r.points) for r in runs)} points from {len(runs)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="multirun or run folders under outputs/")
    parser.add_argument("--wandb", help="read the runs of a W&B group instead: ENTITY/PROJECT/GROUP")
    parser.add_argument("-o", "--out", default="frontier.png", help="PNG to write")
    parser.add_argument("--title", default="Reward vs KL frontier", help="plot title")
    parser.add_argument("--max-kl", type=float, default=None,
                        help="x-axis limit; points beyond are drawn on the edge with their KL written (default: 15%% "
                             "beyond the largest KL of a point with whole samples; 0: no limit)")
    args = parser.parse_args()
    if not args.runs and not args.wandb:
        parser.error("give run folders or --wandb")
    runs = read_wandb_group(args.wandb) if args.wandb else read_runs(args.runs)
    draw(runs, Path(args.out), args.title, args.max_kl)


if __name__ == "__main__":
    main()
