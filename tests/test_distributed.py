"""utils/distributed.py: when a run is several processes, and the one-line
errors of its flags (the two-process run itself: tests/test_multiprocess.py)."""
import os
import subprocess
import sys

import pytest

from utils import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '4'}, 'slurm'),
    ({'SLURM_JOB_ID': '7', 'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}, None),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, None),  # sbatch, not srun
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'cloud_tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'w0'}, None),
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2:8080'}, 'cloud_tpu'),
])
def test_cluster_from_the_environment(environ, expected):
  assert distributed.cluster(environ) == expected


def test_a_single_process_initializes_nothing():
  assert distributed.initialize(environ={}) is None
  assert not distributed.multi_process() and distributed.is_main()
  assert distributed.any_process(True) and not distributed.any_process(False)
  distributed.barrier('a no-op in one process')


@pytest.mark.parametrize('args, message', [
    (['--coordinator=localhost:1234'],
     '--num_processes, --process_id missing'),
    (['--coordinator=localhost', '--num_processes=2', '--process_id=0'],
     '--coordinator=localhost must be HOST:PORT'),
    (['--coordinator=h:1', '--num_processes=2', '--process_id=2'],
     '--process_id=2 must be in [0, 1]'),
    (['--coordinator=h:1', '--num_processes=0', '--process_id=0'],
     '--num_processes=0 must be >= 1'),
    (['--mode=visualize', '--coordinator=h:1', '--num_processes=2',
      '--process_id=1'], '--mode=visualize runs in one process'),
    (['--workdir=gs://bucket/run'], 'URLs are not supported'),
])
def test_bad_process_flags_are_one_error_line(tmp_path, args, message):
  argv = ['--config=configs/listops.py:smoke', f'--workdir={tmp_path / "w"}',
          f'--config.data_dir={tmp_path / "d"}', *args]
  proc = subprocess.run([sys.executable, 'main.py', *argv], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'w')
