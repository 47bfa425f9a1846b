"""train_and_evaluate(config, workdir): the training loop of every run.

Builds the task, model and optimizer; compiles the train step once (AOT, so
its FLOPs and memory are read off the same executable that trains); resumes
from the latest checkpoint; logs progress, metrics.jsonl and TensorBoard;
evaluates on validation every `eval_every` steps, keeping the best
checkpoint; evaluates that checkpoint on test; writes results.json.

Determinism: batch i, the dropout key and the attention key of step i are
functions of (seed, i) only, so an interrupted run resumed from a checkpoint
ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import attention_variants as av
import tasks
from evaluate import metrics as metrics_lib
from evaluate import profile
from models import transformer
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import writer as writer_lib


def default_data_dir(config) -> str:
  return (config.data_dir or os.environ.get('TFDS_DATA_DIR')
          or os.path.join(os.getcwd(), 'tfds_data'))


def check_config(config) -> None:
  """ValueError naming the field for values no run can use."""
  t = config.train
  positive = ('batch_size', 'num_steps', 'eval_every', 'log_every',
              'checkpoint_every')
  for name in positive:
    if t[name] < 1:
      raise ValueError(f'train.{name}={t[name]} must be >= 1')
  if not 0 <= t.warmup_steps <= t.num_steps:
    raise ValueError(f'train.warmup_steps={t.warmup_steps} must be in '
                     f'[0, train.num_steps={t.num_steps}]')
  if t.learning_rate <= 0:
    raise ValueError(f'train.learning_rate={t.learning_rate} must be > 0')
  if t.eval_batch_size < 0:
    raise ValueError(f'train.eval_batch_size={t.eval_batch_size} must be >= 0')
  av.validate(config.attention)
  n_dev = jax.device_count()
  for name in ('batch_size', 'eval_batch_size'):
    if t[name] % n_dev:
      raise ValueError(f'train.{name}={t[name]} is not divisible across the '
                       f'{n_dev} devices; use a multiple of {n_dev}')


def prepare_workdir(workdir: str) -> None:
  """Creates workdir; ValueError when it is a file or not writable."""
  if not workdir:
    raise ValueError('--workdir is required')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file; give a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, '.write_test')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'--workdir={workdir} is not writable ({e.strerror}); '
                     'choose a directory you can write to') from e


def make_optimizer(t):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(t.num_steps, t.warmup_steps + 1))
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay))
  return optax.chain(*chain), schedule


def losses(logits, batch, head):
  """(per-example loss, per-example weight) for either head."""
  if head == 'classify':
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return ce, jnp.ones_like(ce)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  w = batch['weights']
  return (ce * w).sum(-1), w.sum(-1)


def make_train_step(graphdef, head):
  def step(state, batch, step_key):
    model, opt = nnx.merge(graphdef, state)
    attention_key, dropout_key = jax.random.split(step_key)

    def loss_fn(model):
      logits = model(batch['inputs'], batch['length'],
                     attention_rng=attention_key, dropout_rng=dropout_key)
      loss, weight = losses(logits, batch, head)
      return loss.sum() / jnp.maximum(weight.sum(), 1.0)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    grad_norm = optax.tree.norm(grads)
    opt.update(model, grads)
    return nnx.state((model, opt)), {'loss': loss, 'grad_norm': grad_norm}
  return step


def make_eval_step(graphdef, head):
  def step(state, batch, attention_key):
    model, _ = nnx.merge(graphdef, state)
    logits = model(batch['inputs'], batch['length'],
                   attention_rng=attention_key)
    loss, weight = losses(logits, batch, head)
    return {'predictions': jnp.argmax(logits, -1), 'loss': loss,
            'weight': weight}
  return step


class Trainer:
  """Holds what one run needs; `run()` trains, evaluates and reports."""

  def __init__(self, config, workdir: str):
    check_config(config)
    prepare_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.cfg_dict = config.to_dict()
    ckpt_lib.check_resumable(workdir, self.cfg_dict)
    self.task = tasks.get(config.task, default_data_dir(config))
    self.spec = config.attention.to_dict()
    model = transformer.build(config.model, self.spec, self.task,
                              seed=config.seed)
    tx, self.schedule = make_optimizer(config.train)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.graphdef, self.state = nnx.split((model, opt))
    self.num_params = sum(int(np.prod(x.shape)) for x in
                          jax.tree.leaves(nnx.state(model, nnx.Param)))
    mesh = jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P('data'))
    self.state = jax.device_put(self.state, self.replicated)
    self.train_ds = data_lib.train_batches(
        self.task.source('train'), config.train.batch_size, config.seed)
    self.eval_batch_size = (config.train.eval_batch_size
                            or config.train.batch_size)
    self.base_key = jax.random.key(config.seed)
    # Evaluation uses one fixed attention key (LSH rotations fixed by seed).
    self.eval_key = jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
    # Written once everything above accepted the config, so a run that never
    # started does not pin the workdir to a config that cannot run.
    writer_lib.write_json_atomic(os.path.join(workdir, 'config.json'),
                                 self.cfg_dict)
    self.ckpts = ckpt_lib.Checkpoints(workdir)
    self._stop_requested = False

  # -- compilation -----------------------------------------------------------

  def _batch(self, batch):
    return jax.device_put(batch, self.data_sharding)

  def compile(self):
    example = self._batch(self.train_ds[0])
    key = jax.random.fold_in(self.base_key, 0)
    t0 = time.time()
    lowered = jax.jit(make_train_step(self.graphdef, self.task.head),
                      donate_argnums=0).lower(self.state, example, key)
    self.train_step = lowered.compile()
    logging.info('compiled train step in %.1fs', time.time() - t0)
    eval_example = next(data_lib.eval_batches(self.task.source('validation'),
                                              self.eval_batch_size))[0]
    self.eval_step = jax.jit(make_eval_step(
        self.graphdef, self.task.head)).lower(
            self.state, self._batch(eval_example), self.eval_key).compile()
    self.compute = {
        'params': self.num_params,
        'seq_len': self.task.seq_len,
        'batch_size': self.config.train.batch_size,
        'device': profile.device_kind(),
        'device_count': jax.device_count(),
        'train_step_flops': profile.compiled_flops(self.train_step),
        **{f'train_step_{k}': v for k, v in
           profile.compiled_memory(self.train_step).items()},
    }

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, state, split: str) -> tuple[dict, float]:
    """(metrics of `state` on a split, examples/s of the eval loop)."""
    preds, losses_, weights, labels, targets = [], [], [], [], []
    t0, n = time.time(), 0
    source = self.task.source(split)
    for batch, real in data_lib.eval_batches(source, self.eval_batch_size):
      out = jax.device_get(self.eval_step(state, self._batch(batch),
                                          self.eval_key))
      n += real
      preds.append(out['predictions'][:real])
      losses_.append(out['loss'][:real])
      weights.append(out['weight'][:real])
      if self.task.head == 'classify':
        labels.append(batch['label'][:real])
      else:
        labels.append(batch['targets'][:real])
        targets.append(batch['weights'][:real])
    seconds = time.time() - t0
    preds = np.concatenate(preds)
    loss = float(np.concatenate(losses_).sum()
                 / max(np.concatenate(weights).sum(), 1.0))
    if self.task.head == 'classify':
      m = metrics_lib.classification_metrics(np.concatenate(labels), preds,
                                             self.task.num_classes)
    else:
      m = metrics_lib.position_accuracy(np.concatenate(labels), preds,
                                        np.concatenate(targets))
    m['loss'] = loss
    return m, n / max(seconds, 1e-9)

  # -- the loop --------------------------------------------------------------

  def _restore(self):
    restored = self.ckpts.restore_latest(self.state)
    if restored is None:
      return 0, {'best_step': -1, 'best_accuracy': -1.0, 'validation': {}}
    state, meta = restored
    self.state = jax.device_put(state, self.replicated)
    logging.info('resumed from step %d', meta['step'])
    return meta['step'], meta

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint at the next step and exiting')
    self._stop_requested = True

  def _check_finite(self, pending, step):
    """Raises FloatingPointError naming the first step with NaN/inf."""
    for s, m in pending:
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        raise FloatingPointError(
            f'loss or gradients became NaN/inf at step {s} (loss={m["loss"]}, '
            f'grad_norm={m["grad_norm"]}); the last good checkpoint (before '
            f'step {step}) is kept; lower train.learning_rate or enable '
            'train.grad_clip')

  def _validate(self, step, meta):
    val, examples_per_sec = self.evaluate(self.state, 'validation')
    self.writer.write(step, {**{f'validation/{k}': v for k, v in val.items()
                                if isinstance(v, float)},
                             'validation/examples_per_sec': examples_per_sec})
    logging.info('step %d validation accuracy %.4f loss %.4f', step,
                 val['accuracy'], val['loss'])
    if val['accuracy'] > meta['best_accuracy']:
      meta.update(best_step=step, best_accuracy=val['accuracy'],
                  validation=_scalars(val))
      self.ckpts.save_best(step, self.state, dict(meta, step=step))

  def run(self, max_steps_this_run: int | None = None) -> dict | None:
    """Trains to num_steps (or stops early); returns results when finished."""
    t_start = time.time()
    cfg = self.config.train
    try:
      step, meta = self._restore()
    except ValueError:
      self.ckpts.close()
      raise
    self.compile()
    self.writer = writer_lib.MetricWriter(self.workdir)
    previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      stop_at = cfg.num_steps if max_steps_this_run is None else min(
          cfg.num_steps, step + max_steps_this_run)
      pending, t_log, steps_since_log = [], time.time(), 0
      train_time, train_steps = 0.0, 0
      while step < stop_at and not self._stop_requested:
        batch = self._batch(self.train_ds[step])
        key = jax.random.fold_in(self.base_key, step)
        self.state, m = self.train_step(self.state, batch, key)
        step += 1
        steps_since_log += 1
        pending.append((step, m))
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
        if step % cfg.log_every == 0 or step == stop_at:
          self._log_progress(step, pending, steps_since_log / max(dt, 1e-9))
        if step % cfg.eval_every == 0 or step == cfg.num_steps:
          self._validate(step, meta)
        if (step % cfg.checkpoint_every == 0 or step == stop_at
            or self._stop_requested):
          self.ckpts.save_latest(step, self.state, dict(meta, step=step))
        pending, t_log, steps_since_log = [], time.time(), 0
      self.ckpts.wait()
      if step < cfg.num_steps:
        logging.info('stopped at step %d of %d; rerun the same command to '
                     'resume', step, cfg.num_steps)
        return None
      return self._finish(step, train_steps / max(train_time, 1e-9),
                          time.time() - t_start)
    finally:
      signal.signal(signal.SIGTERM, previous)
      self.ckpts.close()
      self.writer.close()

  def _log_progress(self, step, pending, steps_per_sec):
    loss = float(np.mean([m['loss'] for _, m in pending]))
    total = self.config.train.num_steps
    eta = (total - step) / max(steps_per_sec, 1e-9)
    lr = float(self.schedule(step))
    logging.info('step %d/%d | loss %.4f | %.2f steps/s | lr %.2e | ETA %s',
                 step, total, loss, steps_per_sec, lr, format_duration(eta))
    self.writer.write(step, {'train/loss': loss,
                             'train/grad_norm': float(pending[-1][1]['grad_norm']),
                             'train/learning_rate': lr,
                             'train/steps_per_sec': steps_per_sec})

  def _finish(self, step, steps_per_sec, wall_time):
    best = self.ckpts.restore_best(self.state)
    if best is None:
      raise ValueError(f'--workdir={self.workdir} has no best checkpoint yet; '
                       'train it first')
    state, best_meta = best
    test, examples_per_sec = self.evaluate(
        jax.device_put(state, self.replicated), 'test')
    compute = dict(self.compute)
    compute['train_steps_per_sec'] = steps_per_sec
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
        'wall_time_s': wall_time,
    }
    writer_lib.write_json_atomic(os.path.join(self.workdir, 'results.json'),
                                 results)
    logging.info('done: best step %d, test accuracy %.4f; results in %s',
                 results['best_step'], test['accuracy'],
                 os.path.join(self.workdir, 'results.json'))
    return results



def _scalars(m: dict, keep_lists: bool = False) -> dict:
  return {k: v for k, v in m.items()
          if isinstance(v, (int, float)) or (keep_lists and isinstance(v, list))}


def attention_summary(spec: dict) -> dict:
  """The attention kind, its parameters and implementation, nothing else."""
  kind = spec['kind']
  return {'kind': kind, 'implementation': spec['implementation'],
          **spec.get(kind, {})}


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def train_and_evaluate(config, workdir: str, *,
                       max_steps_this_run: int | None = None) -> dict | None:
  """Trains and evaluates one run; returns results.json's content when done.

  max_steps_this_run stops after that many steps (checkpointed), as a
  preemption would; rerunning resumes.
  """
  return Trainer(config, workdir).run(max_steps_this_run)


def evaluate_run(workdir: str) -> dict:
  """Re-evaluates a finished run's best checkpoint on test; rewrites results.json.

  The config comes from the run's config.json; training figures (steps/s,
  wall time, steps) are carried over from the previous results.json.
  """
  config_path = os.path.join(workdir or '', 'config.json')
  if not os.path.exists(config_path):
    raise ValueError(f'--workdir={workdir} has no config.json: give the '
                     'directory of a training run')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  results_path = os.path.join(workdir, 'results.json')
  previous = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      previous = json.load(f)
  trainer = Trainer(config, workdir)
  try:
    trainer.compile()
    old = previous.get('compute', {})
    return trainer._finish(previous.get('steps', config.train.num_steps),
                           old.get('train_steps_per_sec', 0.0),
                           previous.get('wall_time_s', 0.0))
  finally:
    trainer.ckpts.close()
