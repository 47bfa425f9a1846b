"""Tasks by name: each turns `config.task` and a data dir into a `Task`.

    import tasks
    task = tasks.get(config.task, data_dir)   # config.task.name picks it
    train = task.source('train')              # generated on first use

All three tasks here are generated offline by TFDS builders (tasks/builders.py)
and cached in `data_dir`; see each module for its format.
"""
from __future__ import annotations

from tasks import copy
from tasks import listops
from tasks import mqar
from tasks.base import SPLITS, Task  # noqa: F401  (re-exported)

TASKS = {
    'listops': listops.make,
    'mqar': mqar.make,
    'copy': copy.make,
}
NAMES = tuple(TASKS)


def get(task_config, data_dir: str) -> Task:
  """The task named by task_config.name, built from the rest of the config."""
  name = task_config.get('name')
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; valid tasks: {", ".join(NAMES)}')
  return TASKS[name](task_config, data_dir)
