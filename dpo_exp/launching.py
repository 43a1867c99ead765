"""Checks before Hydra launches the jobs of a sweep (a Hydra callback, registered in conf/config.yaml).

hydra/launcher=slurm submits every job through submitit, which on a machine without SLURM stops with a traceback
("Could not detect srun"); this says the same in one line, with what to run instead, before anything is written.
"""
from __future__ import annotations

import shutil
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dpo_exp.errors import ConfigError, readable_errors

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"  # hydra/launcher=slurm's


class LaunchCheck(Callback):
    """Before a sweep's jobs are launched: the launcher can run here (a readable error, exit 2, if not)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with readable_errors():
            check_launcher(config.hydra.launcher)


def check_launcher(launcher: DictConfig) -> None:
    """The SLURM launcher needs SLURM's srun where the command runs (what submitit looks for)."""
    if launcher.get("_target_") == SLURM_LAUNCHER and shutil.which("srun") is None:
        raise ConfigError("hydra/launcher=slurm submits SLURM jobs, but this machine has no SLURM (no srun on PATH): "
                          "run the command on the cluster's login node, or pick a launcher for this machine: "
                          "hydra/launcher=basic (the jobs one after another) or hydra/launcher=slurm_local (the SLURM "
                          "launcher's code path through submitit's local executor)")
