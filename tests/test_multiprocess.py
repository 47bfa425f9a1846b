"""A run over two processes on localhost (2 CPU devices each), killed and
resumed, trains what one process does with the same global batch.

Opt-in (`pytest -m slow tests/test_multiprocess.py`, about a minute on 2
cores): both processes are started with --coordinator / --num_processes /
--process_id, SIGKILLed once their first checkpoint is on disk, started
again with the same command, and must then finish with the records and
test metrics of an uninterrupted single-process run: losses to 1e-4
(relative; four devices only reorder float32 sums), the rest exactly.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('train/steps_per_sec', 'validation/examples_per_sec')
TOL = 1e-4
SETTINGS = ['--config=configs/listops.py:smoke', '--config.train.num_steps=60',
            '--config.train.eval_every=20', '--config.train.checkpoint_every=10',
            '--config.train.log_every=5']

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen(
      [sys.executable, 'main.py', *SETTINGS, f'--workdir={workdir}',
       f'--config.data_dir={data_dir}', *extra], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(workdir, data_dir):
  port = _free_port()
  return [_start(workdir, data_dir, 2, [
      f'--coordinator=localhost:{port}', '--num_processes=2',
      f'--process_id={i}']) for i in range(2)]


def _finish(procs, timeout=600):
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return [err for _, err in outs]


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f]


def _close(got, want):
  assert [r.keys() for r in got] == [r.keys() for r in want]
  for g, w in zip(got, want):
    for name, value in w.items():
      if 'loss' in name or 'grad_norm' in name:
        assert g[name] == pytest.approx(value, rel=TOL), (g['step'], name)
      else:
        assert g[name] == value, (g['step'], name)


def test_two_processes_killed_and_resumed_match_one(tmp_path):
  data_dir = str(tmp_path / 'data')
  single = str(tmp_path / 'single')
  one = _start(single, data_dir, 1)
  _finish([one])

  workdir = str(tmp_path / 'two')
  procs = _pair(workdir, data_dir)
  first = os.path.join(workdir, 'checkpoints', '10')
  deadline = time.time() + 300
  while not os.path.isdir(first) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  assert not os.path.exists(os.path.join(workdir, 'results.json'))

  errs = _finish(_pair(workdir, data_dir))
  assert 'resumed from step' in errs[0]
  # Process 0 logs progress and writes the files; process 1 only warns.
  assert 'step 60/60' in errs[0] and 'step 60/60' not in errs[1]

  _close(_records(workdir), _records(single))
  with open(os.path.join(single, 'results.json')) as f:
    want = json.load(f)
  with open(os.path.join(workdir, 'results.json')) as f:
    got = json.load(f)
  assert got['compute']['mesh'] == {'data': 4, 'fsdp': 1, 'sequence': 1,
                                    'devices': 4}
  assert got['best_step'] == want['best_step']
  for name, value in want['metrics']['test'].items():
    if 'loss' in name:
      assert got['metrics']['test'][name] == pytest.approx(value, rel=TOL)
    else:
      assert got['metrics']['test'][name] == value, name
