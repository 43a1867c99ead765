"""Entry point: `python -m dpo_exp.judge runs=[RUN_DIR,...] [judge=...] [baseline=...]`.

Win rates as the DPO paper measured them. For every judged run and sampling temperature: the policy's
evaluation samples (the `eval/samples/T=<t>` tables the run wrote, at its last evaluation or `step`;
sampled now from checkpoints/final when the run wrote none at that temperature) are compared, prompt by
prompt, with a baseline's response to the same prompt:

- `baseline=initial`: the run's own policy before training (its step-0 samples at that temperature, or
  π_SFT sampled now): "against π_SFT";
- `baseline=reference`: the dataset's reference response to each held-out prompt (TL;DR's human reference summary, HH's chosen response; the held-out pair's chosen response where there is none);
- `baseline=RUN_DIR`: another run's samples at the same temperature (head to head).

Each comparison is shown in an order drawn from a seeded RNG and the verdict mapped back; ties and unusable
answers are counted apart. Results: RUN_DIR/winrates.json (one entry per judge and baseline: win rate,
counts, bootstrap 95% interval, position-bias agreement, the judge's tally), RUN_DIR/judgements_<judge>_vs_
<baseline>.jsonl (every comparison with the judge's raw answer), winrate/* keys in summary.json, and the
run's W&B page when it logged to W&B.
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
