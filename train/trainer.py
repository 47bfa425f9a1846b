"""train_and_evaluate(config, workdir): the training loop of every run.

Builds the task and, through train/step.py, the model (encoder + the task's
head), optimizer and compiled steps (AOT, so FLOPs and memory are read off
the executables that run); checks they fit in memory; resumes
from the latest checkpoint; logs progress, metrics.jsonl and TensorBoard;
evaluates on validation every `eval_every` steps, keeping the best
checkpoint; evaluates that checkpoint on test; writes results.json.

Determinism: batch i, the dropout key and the attention key of step i are
functions of (seed, i) only, so an interrupted run resumed from a checkpoint
ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import attention_variants as av
import tasks
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import profile
from train import sharding
from train import step as step_lib
from train import writer as writer_lib
from utils import distributed
from utils import progress as progress_lib
from utils import provenance


def default_data_dir(config) -> str:
  """Where TFDS data lives, as the user gave it (relative to the cwd)."""
  return (config.data_dir or os.environ.get('TFDS_DATA_DIR')
          or 'tfds_data')


def check_range(name: str, value, low=None, high=None, *,
                low_open: bool = False, high_open: bool = False) -> None:
  """ValueError naming the field, its value and the valid range."""
  ok = ((low is None or (value > low if low_open else value >= low)) and
        (high is None or (value < high if high_open else value <= high)))
  if ok:
    return
  if high is None:
    valid = f'{">" if low_open else ">="} {low}'
  elif low is None:
    valid = f'{"<" if high_open else "<="} {high}'
  else:
    valid = (f'in {"(" if low_open else "["}{low}, {high}'
             f'{")" if high_open else "]"}')
  raise ValueError(f'{name}={value} must be {valid}')


def grad_accum_steps(config) -> int:
  # Absent from the config.json of runs older than the field.
  return config.train.get('grad_accum_steps', 1)


def check_config(config) -> None:
  """ValueError naming the field for values no run can use."""
  check_range('seed', config.seed, 0)
  t = config.train
  for name in ('batch_size', 'num_steps', 'eval_every', 'log_every',
               'checkpoint_every'):
    check_range(f'train.{name}', t[name], 1)
  accum = grad_accum_steps(config)
  check_range('train.grad_accum_steps', accum, 1)
  check_range('train.warmup_steps', t.warmup_steps, 0)
  check_range('train.learning_rate', t.learning_rate, 0, low_open=True)
  check_range('train.weight_decay', t.weight_decay, 0)
  check_range('train.b1', t.b1, 0, 1, high_open=True)
  check_range('train.b2', t.b2, 0, 1, high_open=True)
  check_range('train.eps', t.eps, 0)
  check_range('train.grad_clip', t.grad_clip, 0)
  check_range('train.eval_batch_size', t.eval_batch_size, 0)
  if t.batch_size % accum:
    raise ValueError(f'train.batch_size={t.batch_size} is not divisible into '
                     f'train.grad_accum_steps={accum} micro-batches; use a '
                     'divisor of the batch size')
  av.validate(config.attention)
  sharding.mesh_shape(config.get('mesh', {}), jax.device_count())


def prepare_dir(path: str, what: str) -> None:
  """Creates a directory; ValueError naming `what` when it cannot be used."""
  if not path:
    raise ValueError(f'{what} is required')
  if '://' in path:
    raise ValueError(f'{what}={path}: URLs are not supported (the run reads '
                     'and writes local files); mount the bucket, e.g. with '
                     'Cloud Storage FUSE (docs/cloud_tpu.md), and give the '
                     "mount's path")
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{what}={path} is a file; give a directory')
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'{what}={path} is not writable ({e.strerror}); '
                     'choose a directory you can write to') from e


def prepare_workdir(workdir: str) -> None:
  """Creates workdir; ValueError when it is a file or not writable."""
  prepare_dir(workdir, '--workdir')


class Preempted(Exception):
  """A SIGTERM stopped the run after it saved a checkpoint (not an error:
  rerunning the same command resumes)."""

  def __init__(self, workdir: str, step: int):
    super().__init__(f'--workdir={workdir}: stopped by SIGTERM at step {step} '
                     'after saving a checkpoint; rerun the same command to '
                     'resume')
    self.step = step


def out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


MEMORY_KNOBS = ("set model.remat='block', lower train.batch_size, split it "
                'with train.grad_accum_steps, shorten the sequences or '
                'shrink the model, or spread the batch (mesh.data, '
                'mesh.fsdp) or the sequence (mesh.sequence) over more '
                'devices')


def _gb(n: float) -> str:
  return f'{n / 1e9:.2f} GB'


class Trainer:
  """Holds what one run needs; `run()` trains, evaluates and reports."""

  def __init__(self, config, workdir: str):
    check_config(config)
    prepare_workdir(workdir)
    data_dir = default_data_dir(config)
    prepare_dir(data_dir, 'data_dir')
    self.config, self.workdir = config, workdir
    self.cfg_dict = config.to_dict()
    # Before any slow work: refuse another experiment's workdir at once. A
    # workdir without a checkpoint is not pinned by the config.json written
    # here, so a run that fails before its first checkpoint (compile error,
    # NaN, out of memory) leaves the next command free to change anything.
    ckpt_lib.claim_workdir(workdir, self.cfg_dict)
    self.task = _task(config.task, data_dir)
    self.spec = config.attention.to_dict()
    self.setup = step_lib.build(config.model, self.spec, self.task,
                                config.train, seed=config.seed)
    # Runs older than config.mesh had the batch split over every device.
    self.mesh = sharding.make_mesh(config.get('mesh', {}))
    self.eval_batch_size = (config.train.eval_batch_size
                            or config.train.batch_size)
    sharding.check_divisible(
        self.mesh, batch_size=config.train.batch_size // grad_accum_steps(
            config), eval_batch_size=self.eval_batch_size,
        seq_len=self.task.seq_len,
        batch_what=('train.batch_size / train.grad_accum_steps'
                    if grad_accum_steps(config) > 1 else 'train.batch_size'))
    self.replicated = sharding.replicated(self.mesh)
    self.data_sharding = sharding.batch_sharding(self.mesh)
    self.state_sharding = sharding.state_shardings(self.setup.state, self.mesh)
    self.state = jax.device_put(self.setup.state, self.state_sharding)
    self.train_rows = process_rows(self.data_sharding,
                                   config.train.batch_size)
    self.eval_rows = process_rows(self.data_sharding, self.eval_batch_size)
    self.train_ds = data_lib.train_batches(
        self.task.source('train'), config.train.batch_size, config.seed,
        rows=self.train_rows)
    self.base_key = jax.random.key(config.seed)
    self.redraw_every = av.redraw_every(self.spec)
    # Evaluation uses one fixed attention key (LSH rotations fixed by seed).
    self.eval_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
    if config.train.warmup_steps > config.train.num_steps:
      logging.warning('train.warmup_steps=%d exceeds train.num_steps=%d: the '
                      'learning rate never reaches train.learning_rate',
                      config.train.warmup_steps, config.train.num_steps)
    self.ckpts = ckpt_lib.Checkpoints(workdir)
    self._stop_requested = False

  # -- compilation -----------------------------------------------------------

  def _batch(self, batch, size: int):
    """The global batch of `size` rows whose rows self.train_rows /
    self.eval_rows this process read (all of them in a single process)."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            self.data_sharding, x, (size, *x.shape[1:])), batch)

  def _keys(self, step):
    return step_lib.train_keys(self.base_key, step, self.redraw_every)

  def compile(self):
    """Compiles the train and eval steps (ahead of time) and checks that
    they fit in the memory available, before any step runs."""
    setup = dataclasses.replace(self.setup, state=self.state)
    example = self._batch(self.train_ds[0], self.config.train.batch_size)
    t0 = time.time()
    shardings = step_lib.Shardings(self.state_sharding, self.data_sharding,
                                   self.replicated)
    with jax.set_mesh(self.mesh):  # the model reads the mesh while traced
      self.train_step = step_lib.compile_train(
          setup, example, self._keys(0),
          accum_steps=grad_accum_steps(self.config), shardings=shardings)
      logging.info('compiled train step in %.1fs', time.time() - t0)
      eval_example = next(data_lib.eval_batches(
          self.task.source('validation'), self.eval_batch_size,
          self.eval_rows))[0]
      self.eval_step = step_lib.compile_eval(
          setup, self._batch(eval_example, self.eval_batch_size),
          self.eval_key,
          shardings=shardings)
    train_memory = profile.compiled_memory(self.train_step)
    self._check_fits(train_memory['peak_bytes'], 'train step')
    self._check_fits(profile.compiled_memory(self.eval_step)['peak_bytes'],
                     'eval step')
    self.compute = {
        'params': self.setup.num_params,
        'seq_len': self.task.seq_len,
        'batch_size': self.config.train.batch_size,
        'device': profile.device_kind(),
        'device_count': jax.device_count(),
        'mesh': sharding.describe(self.mesh),
        'train_step_flops': profile.compiled_flops(self.train_step),
        **{f'train_step_{k}': v for k, v in train_memory.items()},
    }

  def _check_fits(self, need: int, what: str) -> None:
    """ValueError when a compiled step needs more than is available now (its
    inputs, already resident, excluded from both figures)."""
    available = profile.available_bytes()
    if available is not None and need > available:
      raise ValueError(
          f'the compiled {what} needs {_gb(need)} beyond its inputs (XLA '
          f'memory analysis) but {_gb(available)} is available on '
          f'{profile.device_kind()}; {MEMORY_KNOBS}')

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, state, split: str) -> tuple[dict, float]:
    """(metrics of `state` on a split, examples/s of the eval loop)."""
    arrays = {}
    t0, n = time.time(), 0
    source = self.task.source(split)
    logging.info('evaluating on %s (%d examples)', split, len(source))
    for batch, real in data_lib.eval_batches(source, self.eval_batch_size,
                                             self.eval_rows):
      batch = self._batch(batch, self.eval_batch_size)
      out = distributed.host_arrays(self.eval_step(state, batch,
                                          self.eval_key))
      n += real
      for name, value in out.items():
        arrays.setdefault(name, []).append(value[:real])
    seconds = time.time() - t0
    arrays = {name: np.concatenate(parts) for name, parts in arrays.items()}
    m = dict(self.setup.head.metrics(arrays))
    m['loss'] = float(arrays['loss'].sum() / max(arrays['weight'].sum(), 1.0))
    return m, n / max(seconds, 1e-9)

  # -- the loop --------------------------------------------------------------

  def restore(self):
    restored = self.ckpts.restore_latest(self.state)
    if restored is None:
      return 0, {'best_step': -1, 'best_score': 0.0, 'validation': {}}
    state, meta = restored
    self.state = jax.device_put(state, self.state_sharding)
    logging.info('resumed from step %d', meta['step'])
    return meta['step'], meta

  def best_model(self):
    """(the model at the run's best checkpoint, that step); ValueError when
    the run has not been validated yet."""
    _, meta = self.restore()
    if meta['best_step'] < 0:
      raise ValueError(f'--workdir={self.workdir} has no validated checkpoint '
                       'yet: train until its first evaluation '
                       '(train.eval_every)')
    state, _ = self.ckpts.restore_best(self.state, meta['best_step'])
    model, _ = nnx.merge(self.setup.graphdef, state)
    return model, meta['best_step']

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step and exiting')
    self._stop_requested = True

  def _check_finite(self, pending, step):
    """Raises FloatingPointError naming the first step with NaN/inf."""
    for s, m in pending:
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        kept = self.ckpts.latest.steps()
        where = (f'checkpoints up to step {kept[0]} are kept; this workdir '
                 'now belongs to this config, so retry in a new --workdir'
                 if kept else 'no checkpoint was written, so this --workdir '
                 'can be reused')
        raise FloatingPointError(
            f'loss or gradients became NaN/inf at step {s} (loss={m["loss"]}, '
            f'grad_norm={m["grad_norm"]}); {where} with a lower '
            'train.learning_rate or train.grad_clip > 0')

  def _validate(self, step, meta):
    val, examples_per_sec = self.evaluate(self.state, 'validation')
    self.writer.write(step, {**{f'validation/{k}': v for k, v in val.items()
                                if isinstance(v, float)},
                             'validation/examples_per_sec': examples_per_sec})
    metric, mode = best_metric(self.setup.head)
    logging.info('step %d validation accuracy %.4f loss %.4f%s', step,
                 val['accuracy'], val['loss'],
                 '' if metric == 'accuracy' else
                 f' {metric} {val[metric]:.4f}')
    score = val[metric] if mode == 'max' else -val[metric]
    # Checkpoints written before `best_score` kept the best accuracy.
    best = meta.get('best_score', meta.get('best_accuracy'))
    if meta['best_step'] < 0 or score > best:
      meta.update(best_step=step, best_score=score, validation=_scalars(val))
      self.ckpts.save_best(step, self.state, dict(meta, step=step))

  def finished_results(self, step: int) -> dict | None:
    """results.json's content when the run finished already, else None."""
    path = os.path.join(self.workdir, 'results.json')
    if step < self.config.train.num_steps or not os.path.exists(path):
      return None
    return writer_lib.read_json_object(path, "this run's results")

  def run(self, max_steps_this_run: int | None = None) -> dict | None:
    """Trains to num_steps (or stops early); returns results when finished.

    Raises Preempted after a SIGTERM (checkpoint saved) and ValueError with
    one line for a run that cannot go on (out of memory, corrupt state).
    """
    try:
      return self._run(max_steps_this_run)
    except jax.errors.JaxRuntimeError as e:
      if not out_of_memory(e):
        raise
      kept = self.ckpts.latest.steps()
      raise ValueError(
          f'out of memory while running ({ckpt_lib.first_line(e)}); '
          f'{MEMORY_KNOBS}. Checkpoints kept: '
          f'{", ".join(map(str, kept)) or "none"}') from None
    finally:
      self.ckpts.close()

  def _run(self, max_steps_this_run):
    t_start = time.time()
    cfg = self.config.train
    step, meta = self.restore()
    done = self.finished_results(step)
    if done is not None:
      logging.info('%s finished at step %d already: nothing to train; '
                   'results.json kept (--mode=evaluate re-evaluates)',
                   self.workdir, step)
      return done
    totals = _totals(meta)
    window = dict(meta.get('log_window', {'loss_sum': 0.0, 'steps': 0}))
    self.compile()
    self.writer = (writer_lib.MetricWriter(self.workdir, resume_step=step)
                   if distributed.is_main() else writer_lib.NoWriter())
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      stop_at = cfg.num_steps if max_steps_this_run is None else min(
          cfg.num_steps, step + max_steps_this_run)
      pending, t_log, steps_since_log = [], time.time(), 0
      train_time, train_steps = 0.0, 0
      while step < stop_at and not self._stop_requested:
        batch = self._batch(self.train_ds[step], cfg.batch_size)
        self.state, m = self.train_step(self.state, batch, self._keys(step))
        step += 1
        steps_since_log += 1
        pending.append((step, m))
        # A SIGTERM reaches each process at its own moment: they stop
        # together, at the first step after any of them got it.
        self._stop_requested = distributed.any_process(self._stop_requested)
        boundary = (step % cfg.log_every == 0 or step % cfg.eval_every == 0
                    or step % cfg.checkpoint_every == 0 or step == stop_at
                    or self._stop_requested)
        if not boundary:
          continue
        pending = jax.device_get(pending)
        self._check_finite(pending, step)
        dt = time.time() - t_log
        train_time += dt
        train_steps += steps_since_log
        for _, m in pending:  # one at a time: the same sums however the
          window['loss_sum'] += float(m['loss'])  # run was segmented
          window['steps'] += 1
        if step % cfg.log_every == 0 or step == cfg.num_steps:
          self._log_progress(step, window, pending[-1][1],
                             steps_since_log / max(dt, 1e-9))
          window = {'loss_sum': 0.0, 'steps': 0}
        if step % cfg.eval_every == 0 or step == cfg.num_steps:
          self._validate(step, meta)
        if (step % cfg.checkpoint_every == 0 or step == stop_at
            or self._stop_requested):
          segment = {
              'train_seconds': totals['train_seconds'] + train_time,
              'train_steps': totals['train_steps'] + train_steps,
              'wall_seconds': totals['wall_seconds'] + time.time() - t_start}
          self.ckpts.save_latest(step, self.state, dict(
              meta, step=step, totals=segment, log_window=window))
        pending, t_log, steps_since_log = [], time.time(), 0
      self.ckpts.wait()
      if step < cfg.num_steps:
        if self._stop_requested:
          raise Preempted(self.workdir, step)
        logging.info('stopped at step %d of %d; rerun the same command to '
                     'resume', step, cfg.num_steps)
        return None
      totals['train_seconds'] += train_time
      totals['train_steps'] += train_steps
      return self.finish(step, meta, totals, t_start)
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.writer.close()

  def _log_progress(self, step, window, last, steps_per_sec):
    # The mean over the steps since the previous log step: kept in the
    # checkpoint, so a resumed run logs what an uninterrupted one does.
    loss = window['loss_sum'] / max(window['steps'], 1)
    total = self.config.train.num_steps
    eta = (total - step) / max(steps_per_sec, 1e-9)
    lr = float(self.setup.schedule(step))
    logging.info('step %d/%d | loss %.4f | %.2f steps/s | lr %.2e | ETA %s',
                 step, total, loss, steps_per_sec, lr,
                 progress_lib.format_duration(eta))
    self.writer.write(step, {'train/loss': loss,
                             'train/grad_norm': float(last['grad_norm']),
                             'train/learning_rate': lr,
                             'train/steps_per_sec': steps_per_sec})

  def finish(self, step, meta, totals, t_start):
    """Tests the best checkpoint and writes results.json.

    totals: the run's training seconds and steps and the wall seconds of
    its earlier segments; this segment's time is added."""
    state, best_meta = self.ckpts.restore_best(self.state, meta['best_step'])
    test, examples_per_sec = self.evaluate(
        jax.device_put(state, self.state_sharding), 'test')
    compute = dict(self.compute)
    compute['train_steps_per_sec'] = (
        totals['train_steps'] / totals['train_seconds']
        if totals['train_seconds'] > 0 else None)
    compute['train_seconds'] = totals['train_seconds']
    compute['eval_examples_per_sec'] = examples_per_sec
    peak = profile.device_peak_bytes()
    if peak is not None:
      compute['device_peak_bytes'] = peak
    results = {
        'task': self.task.name,
        'preset': self.config.get('preset', ''),
        'attention': attention_summary(self.spec),
        'seed': self.config.seed,
        'steps': step,
        'best_step': best_meta['best_step'],
        'metrics': {'validation': best_meta['validation'],
                    'test': _scalars(test, keep_lists=True)},
        'compute': compute,
        'wall_time_s': totals['wall_seconds'] + time.time() - t_start,
        'code': provenance.code_version(),
    }
    path = os.path.join(self.workdir, 'results.json')
    if distributed.is_main():
      writer_lib.write_json_atomic(path, results)
    logging.info('done: best step %d, test accuracy %.4f; results in %s',
                 results['best_step'], test['accuracy'], path)
    return results


def _task(name_config, data_dir: str):
  """The task; with several processes, process 0 generates or prepares its
  data first and the others then read what it wrote."""
  if distributed.is_main():
    task = tasks.get(name_config, data_dir)
  distributed.barrier('task data prepared')
  if not distributed.is_main():
    task = tasks.get(name_config, data_dir)
  return task


def process_rows(batch_sharding, batch_size: int) -> tuple[int, int]:
  """(start, stop): the rows of a global batch that this process's devices
  hold under `batch_sharding` (all of them in a single process)."""
  slices = batch_sharding.addressable_devices_indices_map((batch_size,))
  starts = sorted({sl[0].indices(batch_size)[:2] for sl in slices.values()})
  start, stop = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != stop - start:
    raise ValueError(f'this process\'s devices hold rows {starts} of the '
                     'batch, not one range; order the mesh so each '
                     "process's devices are adjacent along mesh.data x "
                     'mesh.fsdp')
  return start, stop


def best_metric(head) -> tuple[str, str]:
  """(validation metric, 'max' or 'min') that picks the best checkpoint:
  the head's BEST, else accuracy (tasks/heads/__init__.py)."""
  return getattr(head, 'BEST', ('accuracy', 'max'))


def _totals(meta: dict) -> dict:
  """Training seconds and steps and wall seconds of a run's earlier
  segments, as its latest checkpoint recorded them (zeros when none)."""
  return {'train_seconds': 0.0, 'train_steps': 0, 'wall_seconds': 0.0,
          **meta.get('totals', {})}


def _scalars(m: dict, keep_lists: bool = False) -> dict:
  return {k: v for k, v in m.items()
          if isinstance(v, (int, float)) or (keep_lists and isinstance(v, list))}


def attention_summary(spec: dict) -> dict:
  """The attention kind, its parameters and implementation, nothing else."""
  kind = spec['kind']
  return {'kind': kind, 'implementation': spec['implementation'],
          **spec.get(kind, {})}


def train_and_evaluate(config, workdir: str, *,
                       max_steps_this_run: int | None = None) -> dict | None:
  """Trains and evaluates one run; returns results.json's content when done.

  max_steps_this_run stops after that many steps (checkpointed), as a
  preemption would; rerunning resumes. A rerun of a finished run returns
  its results without training or rewriting anything.
  """
  if max_steps_this_run is not None and max_steps_this_run < 1:
    raise ValueError(f'--max_steps_this_run={max_steps_this_run} must be '
                     '>= 1 (omit it to train to train.num_steps)')
  return Trainer(config, workdir).run(max_steps_this_run)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of the training run in `workdir`; ValueError (one
  line) when there is none."""
  if not workdir:
    raise ValueError('--workdir is required: the directory of a training run')
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise ValueError(f'--workdir={workdir} has no config.json: give the '
                     'directory of a training run')
  return ml_collections.ConfigDict(writer_lib.read_json_object(
      config_path, 'the config of the run in this workdir'))


def evaluate_run(workdir: str) -> dict:
  """Re-evaluates a finished run's best checkpoint on test; rewrites results.json.

  The config comes from the run's config.json; training figures (steps,
  steps/s, wall time) from the run's latest checkpoint.
  """
  config = run_config(workdir)
  results_path = os.path.join(workdir, 'results.json')
  if os.path.exists(results_path):
    writer_lib.read_json_object(results_path, "this run's results")
  trainer = Trainer(config, workdir)
  try:
    step, meta = trainer.restore()
    if step < config.train.num_steps:
      raise ValueError(f'--workdir={workdir} is at step {step} of '
                       f'{config.train.num_steps}; finish training it first '
                       '(rerun its training command)')
    trainer.compile()
    return trainer.finish(step, meta, _totals(meta), time.time())
  finally:
    trainer.ckpts.close()
