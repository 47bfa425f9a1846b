"""Reliability drill: SIGKILL a real run at random points, restart it each
time, and check that it ends exactly where an uninterrupted run ends.

Opt-in (`pytest -m slow tests/test_drill.py`), or longer from the command
line:

  python tests/test_drill.py --kills=30 [--seed=0] [--keep=DIR]

Each attempt is `main.py` in its own process, as a scheduler would restart
it. Kill points: while the data is generated (first attempt, fresh data
dir), at a random time a few steps after the attempt resumed (wherever that
lands: a train step, a validation, a checkpoint being written), during
validation, right after a checkpoint step's progress line (while orbax
writes it), and during the final test evaluation. The run is long enough
(25 steps per kill) that no kill comes after it has finished. Afterwards the run's results.json metrics and
metrics.jsonl (timing fields aside) must equal the uninterrupted run's, no
checkpoint may have been found corrupt, and no stale `incomplete.*` data
folder may be left.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('train/steps_per_sec', 'validation/examples_per_sec')

# listops smoke, longer, with validation and test sets large enough that a
# kill can land inside them.
CHECKPOINT_EVERY, LOG_EVERY = 10, 5
OVERRIDES = ['--config.train.eval_every=20',
             f'--config.train.checkpoint_every={CHECKPOINT_EVERY}',
             f'--config.train.log_every={LOG_EVERY}',
             '--config.train.eval_batch_size=8', '--config.model.dropout=0.1',
             '--config.task.num_train=2000', '--config.task.num_validation=400',
             '--config.task.num_test=400']

# Phase -> the log line that starts it.
PHASES = {
    'generation': 'Downloading and preparing dataset',
    'validation': 'evaluating on validation',
    'checkpoint': '| loss ',           # a progress line (of a checkpoint step)
    'test': 'evaluating on test',
}


def command(workdir: str, data_dir: str, num_steps: int) -> list[str]:
  return [sys.executable, 'main.py', '--config=configs/listops.py:smoke',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          f'--config.train.num_steps={num_steps}', *OVERRIDES]


class Attempt:
  """One process of the run; `wait_for(phase)` blocks until its line."""

  def __init__(self, workdir, data_dir, num_steps):
    self.proc = subprocess.Popen(
        command(workdir, data_dir, num_steps), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, bufsize=1)
    self.lines: list[str] = []
    self._cond = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line)
        self._cond.notify_all()
    with self._cond:
      self._cond.notify_all()

  def wait_for(self, text: str, timeout: float = 300.0,
               step_ok=lambda step: True) -> bool:
    """True once a line containing text (whose progress step passes
    step_ok, for progress lines) appeared; False if the process ended
    first."""
    deadline = time.time() + timeout
    seen = 0
    with self._cond:
      while time.time() < deadline:
        for line in self.lines[seen:]:
          if text in line and step_ok(_progress_step(line)):
            return True
        seen = len(self.lines)
        if self.proc.poll() is not None and not self._reader.is_alive():
          return False
        self._cond.wait(0.05)
    return False

  def resumed_step(self) -> int:
    for line in self.lines:
      if 'resumed from step ' in line:
        return int(line.split('resumed from step ')[1].split()[0])
    return 0

  def kill(self) -> bool:
    """SIGKILL; True when the process was still running."""
    if self.proc.poll() is not None:
      return False
    self.proc.kill()
    self.proc.wait()
    return True

  def finish(self, timeout=600) -> int:
    self.proc.wait(timeout)
    self._reader.join(10)
    return self.proc.returncode

  def text(self) -> str:
    return ''.join(self.lines)


def _progress_step(line: str) -> int:
  try:
    return int(line.split('step ')[1].split('/')[0])
  except (IndexError, ValueError):
    return -1


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f]


def results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  return {k: r[k] for k in ('metrics', 'best_step', 'steps')}


def plan(kills: int, rng: random.Random) -> list[str]:
  """Kill phases in order: generation first, test last, the rest mixed
  with at least one validation and one checkpoint kill."""
  middle = ['validation', 'checkpoint'] + [
      rng.choice(['random', 'random', 'validation', 'checkpoint'])
      for _ in range(max(0, kills - 4))]
  rng.shuffle(middle)
  return ['generation', *middle, 'test'][:max(kills, 1)]


def drill(kills: int = 6, seed: int = 0, root: str | None = None,
          log=print) -> dict:
  """Runs the drill in `root` (a temporary dir by default); returns figures.

  Raises AssertionError when the drilled run differs from the reference.
  """
  rng = random.Random(seed)
  root = root or tempfile.mkdtemp(prefix='drill_')
  ref_dir, run_dir = os.path.join(root, 'reference'), os.path.join(root, 'run')
  ref_data, run_data = os.path.join(root, 'data_ref'), os.path.join(
      root, 'data_run')
  t0 = time.time()
  num_steps = 25 * max(kills, 4)
  ref = Attempt(ref_dir, ref_data, num_steps)
  assert ref.finish() == 0, ref.text()[-3000:]
  log(f'reference run: {num_steps} steps, {time.time() - t0:.1f} s')

  done = {'killed': [], 'missed': [], 'attempts': 0}
  for phase in plan(kills, rng):
    attempt = Attempt(run_dir, run_data, num_steps)
    done['attempts'] += 1
    if phase == 'random':  # a random time a few log steps after resuming
      hit = attempt.wait_for('compiled train step')
      target = attempt.resumed_step() + LOG_EVERY * rng.randint(1, 3)
      hit = hit and attempt.wait_for(PHASES['checkpoint'],
                                     step_ok=lambda s: s >= target)
      time.sleep(rng.uniform(0.0, 0.3))
    else:
      hit = attempt.wait_for(
          PHASES[phase], step_ok=lambda s: s % CHECKPOINT_EVERY == 0
          if phase == 'checkpoint' else True)
      if hit and phase != 'checkpoint':
        time.sleep(rng.uniform(0.0, 0.15))
    killed = hit and attempt.kill()
    if not killed:
      attempt.finish()
    (done['killed'] if killed else done['missed']).append(phase)
    log(f'attempt {done["attempts"]}: {phase}: '
        f'{"killed" if killed else "process ended first"}')
  final = Attempt(run_dir, run_data, num_steps)
  done['attempts'] += 1
  assert final.finish() == 0, final.text()[-3000:]
  assert 'Traceback' not in final.text(), final.text()[-3000:]

  assert results(run_dir) == results(ref_dir), 'results differ'
  assert records(run_dir) == records(ref_dir), 'metrics.jsonl differs'
  corrupt = os.path.join(run_dir, 'corrupt')
  assert not os.path.exists(corrupt), os.listdir(corrupt)
  stale = glob.glob(os.path.join(run_data, '**', 'incomplete.*'),
                    recursive=True)
  assert not stale, stale
  done['records'] = len(records(run_dir))
  done['test_accuracy'] = results(run_dir)['metrics']['test']['accuracy']
  done['seconds'] = time.time() - t0
  return done


@pytest.mark.slow
def test_sigkill_drill(tmp_path):
  figures = drill(kills=7, seed=0, root=str(tmp_path))
  assert len(figures['killed']) >= 5
  assert {'validation', 'test'} <= set(figures['killed'])


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=12)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--keep', default=None,
                      help='directory to run in (kept); default: temporary')
  args = parser.parse_args()
  where = args.keep or tempfile.mkdtemp(prefix='drill_')
  out = drill(args.kills, args.seed, where)
  print(json.dumps(out, indent=2))
  if not args.keep:
    shutil.rmtree(where, ignore_errors=True)
