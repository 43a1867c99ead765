"""Kill a torchrun DPO run at random moments, several times, until it finishes; compare it with an uninterrupted run.

    python scripts/chaos.py --kills 4 --seed 0 --workdir outputs/chaos

Each attempt launches the same command (2 processes, or 1 for one attempt: a checkpoint written by 2 processes
is resumed by 1 and the reverse) and SIGKILLs the whole process tree: a random time after a randomly drawn step,
or, for one attempt, while a checkpoint is being written (as soon as its `.tmp_step_N/` folder appears). A last attempt runs to the
end. The report says how many kills the run survived, how many landed inside a checkpoint write, and the time
the kills cost: the attempts' wall time against the uninterrupted run's. tests/test_chaos.py runs this at
smoke size and checks that the metrics and final weights equal the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# 12 training pairs, 2 per step in 2 micro-batches: 20 steps of about 0.1 s here; a checkpoint after every step
DPO = ["debug=smoke", "trainer.batch_size=2", "trainer.grad_accumulation_steps=2", "trainer.max_steps=null",
       "trainer.epochs=3.25", "trainer.eval_every=5", "trainer.eval_batch_size=2", "trainer.save_every=1",
       "trainer.keep_checkpoints=2"]
STEPS = 20


def command(processes: int, run_dir: Path, cache: Path, overrides: list[str]) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return [*launcher, "-m", "dpo_exp.train", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides]


def launch(processes: int, run_dir: Path, cache: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command(processes, run_dir, cache, overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as when a node is lost."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def writing_checkpoint(run_dir: Path, since: float) -> bool:
    """A checkpoint's `.tmp_*` folder made after `since` (time.time()) exists: one is being written now (a folder
    a kill left behind earlier does not count)."""
    folder = run_dir / "checkpoints"
    try:
        return any(entry.name.startswith(".tmp_") and entry.stat().st_mtime >= since for entry in os.scandir(folder))
    except FileNotFoundError:
        return False


def checkpointed_step(run_dir: Path) -> int:
    """The newest step checkpoint's step (0 if none): where a rerun resumes."""
    steps = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def uninterrupted(run_dir: Path, cache: Path, overrides: list[str], processes: int = 2) -> float:
    started = time.perf_counter()
    done = subprocess.run(command(processes, run_dir, cache, overrides), cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise RuntimeError((done.stdout + done.stderr)[-4000:])
    return time.perf_counter() - started


def trained_steps(run_dir: Path) -> int:
    """The newest step with a train row in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if '"train/loss"' in line and line.endswith("}")]
    return max(steps, default=0)


def chaos(run_dir: Path, cache: Path, overrides: list[str], kills: int, seed: int, reference_seconds: float,
          processes: tuple[int, ...] = (2, 2, 1, 2), total_steps: int = STEPS) -> dict:
    """Kill the run `kills` times, then let it finish. Each kill comes a random time after the run has logged a
    step drawn at random beyond the newest it had logged; the second attempt is killed inside a checkpoint
    write instead."""
    rng = random.Random(seed)
    attempts, wall = [], 0.0
    for attempt in range(kills + 1):
        n = processes[attempt % len(processes)]
        last = attempt == kills
        in_write = attempt == 1
        target = rng.randint(min(checkpointed_step(run_dir) + 1, total_steps - 1), total_steps - 1)
        jitter = rng.uniform(0.0, 0.15)  # about a step
        started, since = time.perf_counter(), time.time()
        metrics = run_dir / "metrics.jsonl"
        proc = launch(n, run_dir, cache, overrides)
        killed, during_write, reached = False, False, None
        while proc.poll() is None and not last:
            if in_write:
                if writing_checkpoint(run_dir, since):
                    kill_tree(proc.pid)
                    killed, during_write = True, True
                    break
                time.sleep(0.0005)
                continue
            fresh = metrics.exists() and metrics.stat().st_mtime >= since  # rows of this attempt (a resume rewinds)
            if reached is None and fresh and trained_steps(run_dir) >= target:
                reached = time.perf_counter()
            if reached is not None and time.perf_counter() - reached >= jitter:
                during_write = writing_checkpoint(run_dir, since)
                kill_tree(proc.pid)
                killed = True
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=1200)
        seconds = time.perf_counter() - started
        wall += seconds
        attempts.append({"processes": n, "killed": killed, "inside_checkpoint_write": during_write,
                         "logged_steps_at_kill": trained_steps(run_dir) if killed else None,
                         "seconds": round(seconds, 1), "returncode": proc.returncode})
        if not killed:
            if proc.returncode != 0:
                raise RuntimeError(f"attempt {attempt} failed ({proc.returncode}):\n{err[-4000:]}")
            break
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"kills": sum(a["killed"] for a in attempts),
            "kills_inside_checkpoint_write": sum(a["inside_checkpoint_write"] for a in attempts),
            "attempts": attempts, "wall_seconds": round(wall, 1), "uninterrupted_seconds": round(reference_seconds, 1),
            "lost_seconds": round(wall - reference_seconds, 1), "steps": summary["steps"],
            "status": summary["status"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "chaos")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    cache = args.workdir / "cache"
    reference = args.workdir / f"uninterrupted_{time.strftime('%H%M%S')}"
    uninterrupted(reference, cache, DPO)  # builds π_SFT and the pairs, which the timed runs reuse
    seconds = uninterrupted(reference.with_name(reference.name + "_timed"), cache, DPO)
    report = chaos(args.workdir / f"chaos_{time.strftime('%H%M%S')}", cache, DPO, args.kills, args.seed, seconds)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
