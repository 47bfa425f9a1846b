"""Bad input ends in one clear line and loses nothing already written."""
import os
import subprocess
import sys

import jax
import pytest

from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args, expected', [
    (['--config=configs/listops.py:nope'],
     'unknown preset \'nope\'; valid presets: smoke, cpu, lra'),
    (['--config=configs/listops.py:smoke', '--config.model.widht=3'],
     "model has no field 'widht'; valid: dim,"),
    (['--config=configs/listops.py:smoke', '--config.attention.kind=nope'],
     "unknown attention kind 'nope'; valid kinds: full"),
    (['--config=configs/listops.py:smoke', '--config.task.name=nope'],
     "unknown task 'nope'; valid tasks: "),
    (['--config=configs/listops.py:smoke', '--config.train.num_steps=-5'],
     'train.num_steps=-5 must be >= 1'),
])
def test_cli_errors_are_one_line(tmp_path, args, expected):
  proc = _main(*args, f'--workdir={tmp_path / "w"}',
               f'--config.data_dir={tmp_path / "data"}')
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


def test_workdir_that_is_a_file(smoke_config, tmp_path):
  path = tmp_path / 'file'
  path.write_text('keep me')
  with pytest.raises(ValueError, match='is a file'):
    trainer.train_and_evaluate(smoke_config(), str(path))
  with pytest.raises(ValueError, match='not writable'):
    trainer.train_and_evaluate(smoke_config(), str(path / 'sub'))
  assert path.read_text() == 'keep me'


def test_unwritable_workdir(smoke_config, tmp_path):
  if os.geteuid() == 0:
    pytest.skip('root can write to read-only directories')
  tmp_path.chmod(0o500)
  try:
    with pytest.raises(ValueError, match='not writable'):
      trainer.train_and_evaluate(smoke_config(), str(tmp_path / 'w'))
  finally:
    tmp_path.chmod(0o700)
