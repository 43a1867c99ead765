"""Entry point: `python -m dpo_exp.judge runs=[RUN_DIR,...] [judge=NAME] [baseline=initial|reference|RUN_DIR]`.

Judges each run's evaluation samples against a baseline, as the DPO paper measured win rates, and writes
RUN_DIR/winrates.json, the judgements and winrate/* keys into summary.json (dpo_exp.judging.winrates says how);
`calibrate=FILE` measures the judge against recorded verdicts instead. Judges: dpo_exp.judging.judges.JUDGES.
"""
from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dpo_exp import components
from dpo_exp.conf_path import CONF_DIR
from dpo_exp.errors import readable_errors
from dpo_exp.judging.winrates import calibrate, judge_runs

components.register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="judging")
def main(cfg: DictConfig) -> None:
    with readable_errors(HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None):
        calibrate(cfg) if cfg.calibrate else judge_runs(cfg)


if __name__ == "__main__":
    main()
