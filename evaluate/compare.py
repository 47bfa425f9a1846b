"""The comparison sweep behind `main.py --mode=compare`: variants x tasks x
seeds trained by train.trainer, a training speed/memory measurement per
variant and sequence length, then the tables and plots.

  python main.py --mode=compare --config=configs/compare.py:cpu \
      --workdir=runs/compare

The sweep directory (workdir):
  runs/<task>/<kind>/seed<k>/   one train_and_evaluate run each
  efficiency/<kind>_<len>.json  steps/s and memory of one (variant, length)
  failures.json                 runs that raised, with their error
  tables/                       accuracy.* and efficiency.* (evaluate/tables.py)
  plots/                        PNGs (evaluate/plots.py)

Rerunning the command resumes: runs with a results.json and measured cells
are skipped, interrupted runs resume from their checkpoints, failed runs and
cells are tried again (a success clears the failure). A run that raises is
logged and recorded and the sweep goes on; a SIGTERM (preemption) stops the
sweep after the current run has checkpointed. `only_tables=True` only
rebuilds tables and plots.

The efficiency cells time the trainer's own train step (built and compiled
by train/step.py, ahead of time with the state donated) on a synthetic
classification task of each length, one device, in this process,
so every variant is measured on the same machine in the same sweep. Memory
is XLA's memory analysis of that executable: arguments (parameters, optimizer
state, batch) + temporaries + outputs - donated outputs, i.e. what the step
holds at once; comparable on every backend. The allocator peak
(device_peak_bytes) is recorded too where the device reports it and it rose
during the cell (the allocator keeps one process-wide peak, which an earlier,
larger cell would otherwise own).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

import jax
import ml_collections
import numpy as np
from absl import logging

import attention_variants as av
import tasks
from configs import default
from evaluate import plots
from evaluate import tables
from train import profile
from train import step as step_lib
from train import trainer
from train import writer as writer_lib
from utils import paths
from utils import progress as progress_lib

FAILURES = 'failures.json'


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep."""
  task: str
  kind: str
  seed: int
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def name(self) -> str:
    return f'{self.task}/{self.kind}/seed{self.seed}'


# -- the plan ----------------------------------------------------------------


def names(value) -> list[str]:
  """Items of a comma-separated string or a list, stripped, empties dropped."""
  items = value.split(',') if isinstance(value, str) else list(value)
  return [str(x).strip() for x in items if str(x).strip()]


def kinds_of(config) -> list[str]:
  kinds = names(config.kinds)
  unknown = [k for k in kinds if k not in av.KINDS]
  valid = ', '.join(av.KINDS)
  if unknown:
    raise ValueError(f'kinds: unknown attention kind(s) {", ".join(unknown)}; '
                     f'valid kinds: {valid}')
  if not kinds:
    raise ValueError(f'kinds is empty; give some of: {valid}')
  return kinds


def seeds_of(config) -> list[int]:
  try:
    seeds = [int(s) for s in names(config.seeds)]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0:
    raise ValueError(f'seeds={config.seeds!r} must be comma-separated '
                     'integers >= 0, e.g. seeds=0,1,2')
  return seeds


def tasks_of(config) -> list[tuple[str, str]]:
  """(task name, preset) pairs of config.tasks ('listops:cpu,mqar:cpu')."""
  pairs = []
  for item in names(config.tasks):
    name, _, preset = item.partition(':')
    if name not in tasks.NAMES:
      raise ValueError(f'tasks: unknown task {name!r}; valid tasks: '
                       f'{", ".join(tasks.NAMES)} (as task:preset)')
    pairs.append((name, preset))
  if not pairs:
    raise ValueError('tasks is empty; give e.g. tasks=listops:cpu')
  return pairs


def lengths_of(config) -> list[int]:
  try:
    lengths = sorted({int(x) for x in names(config.efficiency.lengths)})
  except ValueError:
    lengths = [0]
  if lengths and lengths[0] < 1:
    raise ValueError(f'efficiency.lengths={config.efficiency.lengths!r} must '
                     'be comma-separated integers >= 1 (or empty to skip)')
  return lengths


def overrides_for(config, task: str, kind: str) -> list[tuple[str, dict]]:
  """(where, dotted overrides) in the order they apply to one run."""
  return [
      ('overrides', paths.flatten(config.overrides)),
      (f'task_overrides.{task}',
       paths.flatten(config.task_overrides.get(task))),
      (f'kind_overrides.{kind}',
       paths.flatten(config.kind_overrides.get(kind))),
  ]


def run_config(config, task: str, preset: str, kind: str, seed: int):
  """configs/<task>.py:<preset> with the kind, seed and overrides set;
  ValueError (before any run starts) for values no run can use."""
  try:
    c = tasks.get_config(task, preset or None)
  except ValueError as e:
    raise ValueError(f'tasks: {task}:{preset}: {e}') from e
  c.data_dir = config.data_dir
  c.attention.kind = kind
  c.seed = seed
  for where, values in overrides_for(config, task, kind):
    for path, value in values.items():
      paths.set_value(c, path, value, where)
  trainer.check_config(c)
  return c


def plan(config, workdir: str) -> list[Run]:
  """Every run of the sweep, task-major; configs built (and checked) now."""
  kinds, seeds = kinds_of(config), seeds_of(config)
  return [Run(task, kind, seed, run_config(config, task, preset, kind, seed),
              os.path.join(workdir, 'runs', task, kind, f'seed{seed}'))
          for task, preset in tasks_of(config)
          for kind in kinds for seed in seeds]


# -- training ----------------------------------------------------------------


def prepare_data(runs: list[Run]) -> None:
  """Generates each distinct task dataset once, before any run reads it."""
  seen = set()
  for r in runs:
    key = json.dumps(r.config.task.to_dict(), sort_keys=True)
    if key not in seen:
      seen.add(key)
      tasks.get(r.config.task, trainer.default_data_dir(r.config)).source(
          'train')


class Failures:
  """failures.json: {name: {'error', 'traceback', 'time'}} of a sweep."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, FAILURES)
    self.entries = writer_lib.read_json(self.path)[0] or {}

  def record(self, name: str, error: BaseException) -> None:
    self.entries[name] = {
        'error': f'{type(error).__name__}: {error}',
        'traceback': traceback.format_exc(limit=-8),
        'time': time.strftime('%Y-%m-%d %H:%M:%S')}
    self._write()

  def clear(self, name: str) -> None:
    if self.entries.pop(name, None) is not None:
      self._write()

  def _write(self) -> None:
    writer_lib.write_json_atomic(self.path, self.entries)


def train_all(runs: list[Run], failures: Failures) -> None:
  """Trains what is unfinished. A SIGTERM stops the sweep once the current
  run has checkpointed (trainer.Preempted propagates)."""
  todo = [r for r in runs
          if not os.path.exists(os.path.join(r.workdir, 'results.json'))]
  logging.info('%d runs: %d finished (skipped), %d to run', len(runs),
               len(runs) - len(todo), len(todo))
  progress = progress_lib.Progress('run', len(todo), unit='runs')
  for i, r in enumerate(todo, 1):
    progress.start_item(i, r.name)
    try:
      trainer.train_and_evaluate(r.config, r.workdir)
    except trainer.Preempted:
      logging.warning('run %s stopped early (SIGTERM); rerun the same '
                      'command to resume the sweep', r.name)
      raise
    except Exception as e:  # noqa: BLE001  (recorded; the sweep goes on)
      logging.error('run %s failed: %s: %s', r.name, type(e).__name__, e)
      failures.record(f'runs/{r.name}', e)
    else:
      failures.clear(f'runs/{r.name}')


# -- efficiency ----------------------------------------------------------------


def _no_data(split):
  raise ValueError(f'the synthetic efficiency task has no {split} data')


def synthetic_task(seq_len: int, vocab_size: int, num_classes: int):
  """A classification Task of the given length with no data behind it."""
  return tasks.Task(name='synthetic', vocab_size=vocab_size, seq_len=seq_len,
                    num_classes=num_classes, head='classify', causal=False,
                    sources=_no_data, cls_token=True)


def synthetic_batch(task, batch_size: int, seed: int = 0) -> dict:
  """Random full-length sequences and labels (speed does not see values)."""
  rng = np.random.default_rng(seed)
  return {
      'inputs': rng.integers(1, task.vocab_size, (batch_size, task.seq_len),
                             dtype=np.int32),
      'length': np.full((batch_size,), task.seq_len, np.int32),
      'label': rng.integers(0, task.num_classes, (batch_size,),
                            dtype=np.int32)}


def attention_spec(config, kind: str) -> dict:
  """A run's attention block for `kind`: defaults + the `attention.*`
  entries of `overrides` and `kind_overrides.<kind>`, so the cells measure
  the variants the runs train. Task overrides do not apply (the cells have
  no task) and neither do model/train ones (efficiency.model is the model)."""
  c = default.base()
  c.attention.kind = kind
  for where, values in overrides_for(config, '', kind):
    for path, value in values.items():
      if path.startswith('attention.'):
        paths.set_value(c, path, value, where)
  return c.attention.to_dict()


# A cell runs only when its compiled step needs at most this share of the
# memory available (as the benchmark's memory_fraction). Lower on CPU, where
# XLA's memory analysis undercounts: full attention's step at 16,384 tokens
# (configs/compare.py:pathx) was analysed at 15.2 GB and its process was
# killed for memory with 24.4 GB available.
MEMORY_FRACTION = 0.8
CPU_MEMORY_FRACTION = 0.5


def measure(model_cfg, spec: dict, seq_len: int, *, batch_size: int,
            steps: int, warmup_steps: int, vocab_size: int,
            num_classes: int) -> dict:
  """Steps/s and memory of the trainer's train step at one length; status
  'does not fit' (not run) when its compiled memory exceeds MEMORY_FRACTION
  (CPU_MEMORY_FRACTION on CPU) of what the device has available."""
  task = synthetic_task(seq_len, vocab_size, num_classes)
  train_cfg = default.base().train
  train_cfg.batch_size = batch_size
  setup = step_lib.build(model_cfg, spec, task, train_cfg, seed=0)
  state = setup.state
  batch = jax.device_put(synthetic_batch(task, batch_size))
  key = jax.random.key(0)
  keys = lambda i: step_lib.train_keys(key, i, av.redraw_every(spec))
  peak_before = profile.device_peak_bytes()
  t0 = time.time()
  step = step_lib.compile_train(setup, batch, keys(0))
  compile_s = time.time() - t0
  memory = profile.compiled_memory(step)
  needed = memory['argument_bytes'] + memory['peak_bytes']
  available = profile.available_bytes() or profile.host_available_bytes()
  fraction = (CPU_MEMORY_FRACTION if jax.default_backend() == 'cpu'
              else MEMORY_FRACTION)
  if needed > fraction * available:
    # Running it would exhaust the device (on CPU: the kernel's OOM killer
    # ends the whole sweep, no exception to catch), so it is reported.
    return {'status': 'does not fit', 'memory_bytes': needed,
            'available_bytes': available, 'compiled_memory': memory,
            'params': setup.num_params, 'compile_s': compile_s}
  for i in range(warmup_steps):
    state, _ = step(state, batch, keys(i))
  jax.block_until_ready(state)
  t0 = time.time()
  for i in range(steps):
    state, _ = step(state, batch, keys(warmup_steps + i))
  jax.block_until_ready(state)
  seconds = time.time() - t0
  peak_after = profile.device_peak_bytes()
  rose = peak_after is not None and (peak_before is None
                                     or peak_after > peak_before)
  return {
      'status': 'ok',
      'steps_per_sec': steps / max(seconds, 1e-9),
      'memory_bytes': needed,
      'compiled_memory': memory,
      'device_peak_bytes': peak_after if rose else None,
      'flops': profile.compiled_flops(step),
      'params': setup.num_params,
      'compile_s': compile_s,
      'timed_steps': steps,
  }


def efficiency_path(workdir: str, kind: str, seq_len: int) -> str:
  return os.path.join(workdir, 'efficiency', f'{kind}_{seq_len}.json')


def measure_all(config, workdir: str, kinds: list[str]) -> None:
  """One efficiency file per (kind, length) not yet measured; lengths
  ascending, so the short ones are there first if a long one runs out."""
  e = config.efficiency
  cells = [(kind, n) for n in lengths_of(config) for kind in kinds]
  todo = [(k, n) for k, n in cells if not _measured(efficiency_path(
      workdir, k, n))]
  logging.info('%d efficiency cells: %d measured (skipped), %d to measure',
               len(cells), len(cells) - len(todo), len(todo))
  os.makedirs(os.path.join(workdir, 'efficiency'), exist_ok=True)
  progress = progress_lib.Progress('efficiency cell', len(todo),
                                   unit='cells')
  for i, (kind, n) in enumerate(todo, 1):
    progress.start_item(i, f'{kind} at length {n}')
    spec = attention_spec(config, kind)
    cell = {'kind': kind, 'seq_len': n, 'batch_size': e.batch_size,
            'device': profile.device_kind(),
            'attention': trainer.attention_summary(spec),
            'model': e.model.to_dict()}
    try:
      cell.update(measure(e.model, spec, n, batch_size=e.batch_size,
                          steps=e.steps, warmup_steps=e.warmup_steps,
                          vocab_size=e.vocab_size,
                          num_classes=e.num_classes))
    except Exception as err:  # noqa: BLE001  (e.g. out of memory: recorded)
      logging.error('efficiency %s at %d failed: %s: %s', kind, n,
                    type(err).__name__, err)
      cell.update(status='failed', error=f'{type(err).__name__}: {err}')
    writer_lib.write_json_atomic(efficiency_path(workdir, kind, n), cell)


def _measured(path: str) -> bool:
  data, _ = writer_lib.read_json(path)
  return isinstance(data, dict) and data.get('status') == 'ok'


# -- the command -------------------------------------------------------------


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the sweep, then writes tables and plots.

  Returns {'accuracy': ..., 'efficiency': ...}, the tables' JSON payloads.
  """
  trainer.prepare_workdir(workdir)
  runs = plan(config, workdir)        # every config error surfaces here
  kinds = kinds_of(config)
  lengths_of(config)
  if not config.only_tables:
    prepare_data(runs)
    train_all(runs, Failures(workdir))
    measure_all(config, workdir, kinds)
  order_tasks = [t for t, _ in tasks_of(config)]
  summaries = tables.write_all(workdir, kinds=kinds, tasks=order_tasks)
  plots.write_all(summaries['accuracy'], summaries['efficiency'],
                  os.path.join(workdir, 'plots'),
                  speed_length=config.speed_length)
  logging.info('tables in %s, plots in %s', os.path.join(workdir, 'tables'),
               os.path.join(workdir, 'plots'))
  return summaries
