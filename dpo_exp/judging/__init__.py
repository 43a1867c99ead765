"""Win rates as the DPO paper measured them: pairwise judges (`judges`, `api`), their statistics (`stats`)
and the comparisons of runs' samples against a baseline (`dpo_exp.judge`, the entry point)."""
