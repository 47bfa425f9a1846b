"""Shared fixtures: one offline data dir per test session, small configs."""
import os

import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """TFDS data dir shared by the session so each task generates once."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def smoke_config(data_dir):
  """listops:smoke with the session's data dir; tests tweak it further."""
  def make(task='listops', **overrides):
    import tasks
    config = tasks.get_config(task, 'smoke')
    config.data_dir = data_dir
    for dotted, value in overrides.items():
      node = config
      *parents, leaf = dotted.split('__')
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config
  return make
