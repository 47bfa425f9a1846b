"""Tasks by name: each turns `config.task` and a data dir into a `Task`.

    import tasks
    task = tasks.get(config.task, data_dir)   # config.task.name picks it
    train = task.source('train')              # generated on first use

The registry is plain data: importing this package imports neither jax nor
TFDS (configs read the task names from it); a task's module is imported when
the task is built. Each entry names the task's module (its TFDS builder and
`make`) and its config module (presets; configs/<task>.py). Adding a task:
its module, its config, one line here.
"""
from __future__ import annotations

import importlib

from tasks.base import SPLITS, Task  # noqa: F401  (re-exported)

# name -> (task module, config module)
_REGISTRY = {
    'listops': ('tasks.listops', 'configs.listops'),
    'mqar': ('tasks.mqar', 'configs.mqar'),
    'copy': ('tasks.copy', 'configs.copy'),
    'image': ('tasks.image', 'configs.image'),
    'pathfinder': ('tasks.pathfinder', 'configs.pathfinder'),
    'pathx': ('tasks.pathfinder', 'configs.pathx'),
    'text': ('tasks.text', 'configs.text'),
    'retrieval': ('tasks.retrieval', 'configs.retrieval'),
    'lm': ('tasks.lm', 'configs.lm'),
}
NAMES = tuple(_REGISTRY)


def _check_name(name) -> None:
  if name not in _REGISTRY:
    raise ValueError(f'unknown task {name!r}; valid tasks: {", ".join(NAMES)}')


def config_module(name: str) -> str:
  """The config module of a task, e.g. 'configs.listops'."""
  _check_name(name)
  return _REGISTRY[name][1]


def get_config(name: str, preset: str | None = None):
  """configs/<task>.py's get_config(preset)."""
  return importlib.import_module(config_module(name)).get_config(preset)


def get(task_config, data_dir: str) -> Task:
  """The task named by task_config.name, built from the rest of the config."""
  name = task_config.get('name')
  _check_name(name)
  return importlib.import_module(_REGISTRY[name][0]).make(task_config,
                                                          data_dir)
