"""Tasks: what an experiment is — its SFT texts, how preference pairs are obtained, its evaluation prompts and
(optionally) a gold reward. `build_task` builds the one task.name selects from TASKS.
"""
from dpo_exp.tasks import preference, sentiment  # noqa: F401  (registers them)
from dpo_exp.tasks.base import TASKS, Task, build_task

__all__ = ["TASKS", "Task", "build_task"]
