"""Win rate against sampling temperature, one line per run, with bootstrap 95% intervals as error bars: the
analogue of the DPO paper's Figure 2 (right) and Figure 3, from runs judged by `python -m dpo_exp.judge`.

    python scripts/winrate_plot.py outputs/multirun/<date>/<time>_x -o winrates.png [--judge gold/vs_initial]
    python scripts/winrate_plot.py RUN_DIR RUN_DIR ... -o winrates.png --markdown
    python scripts/winrate_plot.py --wandb ENTITY/PROJECT/GROUP -o winrates.png --judge api/vs_reference

Each argument is a judged run directory (with winrates.json) or a folder of them (a multirun). --judge picks
which judging (`<judge>/vs_<baseline>`, the keys of winrates.json); by default the one every run has, if
there is exactly one. --markdown also prints the numbers as a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINRATES = "winrates.json"


def judged_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for path in paths:
        if (path / WINRATES).is_file():
            runs.append(path)
        elif path.is_dir():
            runs += sorted(p for p in path.iterdir() if (p / WINRATES).is_file())
    if not runs:
        raise SystemExit(f"no {WINRATES} under {', '.join(map(str, paths))}: judge the runs first "
                         "(python -m dpo_exp.judge runs=[...])")
    return runs


def label_of(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return summary.get("algorithm/label") or run.name


def tables_of_summary(summary: dict) -> dict[str, dict]:
    """{judging: {"temperatures": {t: stats}}} from a run's summary keys winrate/<judge>/vs_<baseline>/T=<t>[/...]
    (what a W&B run holds: the judge writes them into summary.json and the run's W&B summary)."""
    tables: dict[str, dict] = {}
    for key, value in summary.items():
        if not key.startswith("winrate/") or "/T=" not in key:
            continue
        judging, rest = key[len("winrate/"):].split("/T=")
        t, _, name = rest.partition("/")
        stats = tables.setdefault(judging, {"temperatures": {}})["temperatures"].setdefault(t, {})
        stats[name or "win_rate"] = value
    return tables


def series(tables: dict[str, dict], judge: str | None) -> tuple[str, list[tuple[str, list[tuple[float, dict]]]]]:
    """The judging key and, per run label, (label, [(temperature, stats)]) sorted by temperature; `tables` maps
    each run's label to its winrates.json contents."""
    common = set.intersection(*(set(t) for t in tables.values()))
    if judge is None:
        if len(common) != 1:
            raise SystemExit(f"pick one judging with --judge; the runs share: {', '.join(sorted(common)) or 'none'}")
        judge = common.pop()
    missing = [label for label, t in tables.items() if judge not in t]
    if missing:
        raise SystemExit(f"--judge {judge} is not among the win rates of: {', '.join(missing)}")
    out = []
    for label, table in tables.items():
        points = sorted((float(t), stats) for t, stats in table[judge]["temperatures"].items())
        out.append((label, points))
    return judge, out


def draw(judge: str, lines, out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in sorted(lines):
        points = [(t, s) for t, s in points if s["win_rate"] is not None]
        ts = [t for t, _ in points]
        rates = [s["win_rate"] for _, s in points]
        err = [[r - s["ci_low"] for r, (_, s) in zip(rates, points)], [s["ci_high"] - r for r, (_, s) in zip(rates, points)]]
        ax.errorbar(ts, rates, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate ({judge})")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)


def markdown(judge: str, lines) -> str:
    temps = sorted({t for _, points in lines for t, _ in points})
    rows = [f"| run ({judge}) | " + " | ".join(f"T={t:g}" for t in temps) + " |",
            "| --- |" + " --- |" * len(temps)]
    for label, points in sorted(lines):
        by_t = dict(points)
        cells = []
        for t in temps:
            s = by_t.get(t)
            cells.append("" if s is None or s["win_rate"] is None else
                         f"{s['win_rate']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}] n={s['judged']}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="judged run directories or folders of them")
    parser.add_argument("--wandb", help="read the judged runs of a W&B group instead: ENTITY/PROJECT/GROUP")
    parser.add_argument("-o", "--out", type=Path, default=Path("winrates.png"))
    parser.add_argument("--judge", default=None, help="<judge>/vs_<baseline> (a key of winrates.json)")
    parser.add_argument("--title", default="Win rate against sampling temperature")
    parser.add_argument("--markdown", action="store_true", help="also print the numbers as a Markdown table")
    args = parser.parse_args(argv)
    if args.wandb:
        from dpo_exp.results import read_wandb_group

        tables = {run.label: tables_of_summary(run.summary) for run in read_wandb_group(args.wandb)}
        tables = {label: t for label, t in tables.items() if t}
    elif args.paths:
        tables = {label_of(run): json.loads((run / WINRATES).read_text()) for run in judged_runs(args.paths)}
    else:
        parser.error("give judged run folders or --wandb")
    if not tables:
        raise SystemExit("no judged run found")
    judge, lines = series(tables, args.judge)
    draw(judge, lines, args.out, args.title)
    if args.markdown:
        print(markdown(judge, lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
