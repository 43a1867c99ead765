"""The resolvers conf/ interpolates: ${dpo_exp.run_dir:...} names a run's folder, ${dpo_exp.or:${a},b} is a
or, where a is null, b."""
from __future__ import annotations

import os
from typing import Any, Optional

from omegaconf import OmegaConf


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dpo_exp.run_dir"):
        OmegaConf.register_new_resolver("dpo_exp.run_dir", run_dir_name, use_cache=True)
    if not OmegaConf.has_resolver("dpo_exp.or"):
        OmegaConf.register_new_resolver("dpo_exp.or", or_default)


def or_default(value: Any, default: Any) -> Any:
    return default if value is None else value


def run_dir_name(run_name: Optional[str], experiment_name: str) -> str:
    """A single run's folder under outputs/runs/, the same for every rank and every restart where it can be:
    run_name when given (rerunning the same command then resumes); else the SLURM job id (stable across
    requeues) or torchrun's rendezvous id (shared by all ranks); else the start time."""
    if run_name:
        return str(run_name)
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
               else env["SLURM_JOB_ID"])
        return f"slurm-{job}_{experiment_name}"
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # torchrun without --rdzv-id or --standalone: the node's agent process names it
            import socket
            run_id = f"{socket.gethostname()}-{os.getppid()}"
        return f"torchrun-{run_id}_{experiment_name}"
    import datetime
    now = datetime.datetime.now()  # to the millisecond: two commands started in the same second get two folders
    return now.strftime("%Y-%m-%d/%H-%M-%S") + f".{now.microsecond // 1000:03d}_{experiment_name}"
