"""Orbax checkpoints of a run: the latest state (for resume) and the state
that was best on validation (for the final test evaluation).

Every checkpoint carries, in its JSON metadata, a digest of each array it
saved (BLAKE2b of dtype, shape and bytes, keyed by the array's path). A
restore is only accepted when it reads without error *and* every restored
array matches its digest, so a flipped bit on disk is caught here instead of
surfacing as NaN a hundred steps later.

A checkpoint that fails either test is moved aside to `workdir/corrupt/`
(renamed, never deleted), with one warning line, and the next older one is
tried; only when none restores does the run stop, with one error line.

Also guards a workdir: once a run has written a checkpoint or results.json,
its workdir belongs to that experiment (config.json, compared field by
field except the run-control fields). A run that failed before its first
checkpoint pins nothing: the next command may use other settings.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging as std_logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from train import writer as writer_lib
from utils import distributed
from utils import paths

# Config fields that may differ between a run and its resumption: they steer
# the run (where the data lives, how often it logs and checkpoints) or how it
# is computed (evaluation batch, attention implementation, micro-batches),
# not what is trained. Everything else (task, model,
# attention kind and parameters, seed, optimizer, train.num_steps, which
# shapes the learning-rate schedule, train.eval_every, which decides the best
# checkpoint) is the experiment. "How" fields can change results in the last
# bits of floating point, never in what they mean.
RUN_CONTROL_FIELDS = ('data_dir', 'train.log_every', 'train.checkpoint_every',
                      'train.eval_batch_size', 'train.grad_accum_steps',
                      'model.remat', 'attention.implementation')
# Blocks that never change what is trained: what to generate and score at the
# end; the device mesh (the same global batch and model on any layout, to
# float32 rounding: tests/test_mesh.py), so a run resumes on other hardware.
RUN_CONTROL_BLOCKS = ('generation.', 'mesh.')

CORRUPT_DIR = 'corrupt'


class CheckpointError(ValueError):
  """No checkpoint of a kind restores (a user-facing error)."""


def config_differences(old: dict, new: dict) -> list[str]:
  """Fields (other than run-control ones) whose values differ."""
  a, b = paths.flatten(old), paths.flatten(new)
  keys = sorted(set(a) | set(b))
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in keys if k not in RUN_CONTROL_FIELDS
          and not k.startswith(RUN_CONTROL_BLOCKS) and a.get(k) != b.get(k)]


def _step_dirs(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return [n for n in os.listdir(directory) if n.isdigit()]


def has_run(workdir: str) -> bool:
  """Whether a run has written a checkpoint or results in workdir."""
  return bool(_step_dirs(os.path.join(workdir, 'checkpoints'))
              or _step_dirs(os.path.join(workdir, 'best'))
              or os.path.exists(os.path.join(workdir, 'results.json')))


def claim_workdir(workdir: str, config: dict) -> None:
  """Records config.json, or checks it when the workdir already holds a run.

  ValueError when the workdir's run is another experiment or its
  config.json cannot be read; a leftover config.json of an attempt that
  never checkpointed is replaced.
  """
  path = os.path.join(workdir, 'config.json')
  if not has_run(workdir):
    if distributed.is_main():  # the others check, but only one writes
      if os.path.exists(path):
        logging.info('%s: the earlier attempt here never checkpointed; '
                     'recording this config instead', path)
      writer_lib.write_json_atomic(path, config)
    return
  if not os.path.exists(path):
    raise ValueError(f'--workdir={workdir} holds checkpoints but no '
                     'config.json; put it back or use a new --workdir')
  old = writer_lib.read_json_object(path, 'the config of the run in this '
                                    'workdir')
  diff = config_differences(old, config)
  if diff:
    shown = '; '.join(diff[:3]) + (' ...' if len(diff) > 3 else '')
    raise ValueError(
        f'--workdir={workdir} holds a run with a different config ({shown}); '
        'use a new --workdir or the config that run used')


# -- digests -------------------------------------------------------------------


def _host_leaves(tree) -> list[tuple[str, np.ndarray]]:
  """(path, host array) of every leaf (gathered from every process when a
  leaf is split over several: each process then digests the whole array)."""
  def plain(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x
  leaves = jax.tree_util.tree_flatten_with_path(
      distributed.host_arrays(jax.tree.map(plain, tree)))[0]
  return [(jax.tree_util.keystr(path), np.asarray(x)) for path, x in leaves]


def digest(tree) -> dict[str, str]:
  """{array path: BLAKE2b hex of dtype, shape and bytes} of a pytree."""
  out = {}
  for path, x in _host_leaves(tree):
    h = hashlib.blake2b(digest_size=16)
    h.update(f'{x.dtype.str}{x.shape}'.encode())
    h.update(np.ascontiguousarray(x).tobytes())
    out[path] = h.hexdigest()
  return out


def digest_mismatch(tree, expected: dict[str, str]) -> str | None:
  """None when tree matches `expected`, else which array differs."""
  got = digest(tree)
  if set(got) != set(expected):
    missing = sorted(set(expected) ^ set(got))
    return f'its arrays differ from the saved list ({missing[0]} ...)'
  for path in sorted(got):
    if got[path] != expected[path]:
      return f'array {path} differs from its saved digest'
  return None


# -- orbax, quietly ------------------------------------------------------------


class _DropOrbaxRecords(std_logging.Filter):

  def filter(self, record):
    return 'orbax' not in record.pathname


@contextlib.contextmanager
def _quiet_orbax():
  """Keeps orbax's own error logs (with tracebacks) of a failed restore off
  the console: the failure is reported once, by us."""
  loggers = [std_logging.getLogger('absl'), std_logging.getLogger()]
  f = _DropOrbaxRecords()
  targets = loggers + [h for lg in loggers for h in lg.handlers]
  for t in targets:
    t.addFilter(f)
  try:
    yield
  finally:
    for t in targets:
      t.removeFilter(f)


class _DropAbandonedReads(std_logging.Filter):
  """asyncio's 'Task/Future exception was never retrieved' for reads of the
  checkpoints being restored: the task names orbax's code, the future the
  checkpoint's files."""

  def __init__(self):
    super().__init__()
    self.roots = {f'{os.sep}orbax{os.sep}'}

  def filter(self, record):
    text = record.getMessage()
    return not ('exception was never retrieved' in text and
                any(root in text for root in self.roots))


_ABANDONED_READS = _DropAbandonedReads()


def _ignore_reads_left_behind(root: str) -> None:
  """When orbax abandons a failed restore it closes its event loop while
  TensorStore still finishes the other arrays' reads. Their errors then
  surface three ways, each printing a traceback per array: callbacks raise
  'Event loop is closed' and abandoned read coroutines are collected with
  their error (both into sys.unraisablehook), and asyncio logs 'exception
  was never retrieved' for their tasks and futures. Those reads are
  unwanted: drop exactly these, for the rest of the process (they can arrive
  late, after the run's own error line), and pass anything else on. `root`
  is the checkpoint directory about to be read."""
  _ABANDONED_READS.roots.add(root)
  previous = sys.unraisablehook
  if getattr(previous, 'drops_abandoned_reads', False):
    return

  def hook(unraisable):
    e, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, 'cr_code', None)
    if ((isinstance(e, RuntimeError) and str(e) == 'Event loop is closed') or
        (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename)):
      return
    previous(unraisable)
  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook
  std_logging.getLogger('asyncio').addFilter(_ABANDONED_READS)


def first_line(e: BaseException) -> str:
  """'Type: first line of the message' (at most 200 characters of it): how
  an error from a library is named inside one of our one-line errors."""
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200] if text else ""}'


class _Kind:
  """One CheckpointManager directory (latest or best) under a workdir."""

  def __init__(self, workdir: str, name: str, max_to_keep: int):
    self.name = name
    self.shown = os.path.join(workdir, name)           # as the user gave it
    self.path = os.path.abspath(self.shown)            # orbax needs absolute
    self.corrupt_root = os.path.join(workdir, CORRUPT_DIR)
    with _quiet_orbax():
      self.manager = ocp.CheckpointManager(
          self.path, options=ocp.CheckpointManagerOptions(
              max_to_keep=max_to_keep, create=True,
              cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps(), reverse=True)

  def save(self, step: int, state, meta: dict) -> None:
    pure = nnx.to_pure_dict(state)
    # orbax writes the JSON in the background while the caller goes on
    # changing its dicts (the loss window): save a copy of them as they are.
    meta = copy.deepcopy(dict(meta, digest=digest(pure)))
    stale = [s for s in self.manager.all_steps() if s >= step]
    if stale:
      # Saved by an attempt that died before its next latest checkpoint;
      # the resumed run retraces the same steps and saves them again, in
      # order (as max_to_keep expects). Deleted only now, once it has.
      self.manager.wait_until_finished()
      for s in stale:
        logging.info('replacing %s/%d, saved by an interrupted attempt',
                     self.shown, s)
        self.manager.delete(s)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(pure),
        meta=ocp.args.JsonSave(meta)), force=True)

  def _read(self, step: int, state):
    """(state, meta) of one step; raises on any failure, digest included."""
    pure = nnx.to_pure_dict(state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore()))
    meta = restored['meta']
    if not isinstance(meta, dict) or 'step' not in meta:
      raise ValueError('its metadata is not a run checkpoint\'s')
    expected = meta.get('digest')
    if expected is not None:
      bad = digest_mismatch(restored['state'], expected)
      if bad:
        raise ValueError(bad)
    new_state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(new_state, restored['state'])
    return new_state, dict(meta)

  def move_aside(self, step: int) -> str:
    """Renames a step's directory into workdir/corrupt/; returns the path.
    With several processes, process 0 renames and the others wait."""
    os.makedirs(self.corrupt_root, exist_ok=True)
    target = os.path.join(self.corrupt_root, f'{self.name}.{step}')
    n = 1
    while os.path.exists(target):
      target = os.path.join(self.corrupt_root, f'{self.name}.{step}.{n}')
      n += 1
    if distributed.is_main():
      os.replace(os.path.join(self.path, str(step)), target)
    distributed.barrier(f'moved aside {self.path}/{step}')
    self.manager.reload()
    return target

  def restore(self, state, step: int | None = None):
    """(state, meta) of the newest step (or of `step`) that restores and
    verifies, moving bad ones aside; None when there are no steps.

    CheckpointError when steps exist but none restores."""
    steps = self.steps() if step is None else [step]
    if not steps:
      return None
    _ignore_reads_left_behind(self.path)  # before: they race the exception
    moved = []
    for s in steps:
      try:
        with _quiet_orbax():
          found, error = self._read(s, state), None
      except Exception as e:  # noqa: BLE001  orbax raises many types
        found, error = None, e
      # Each process reads its own shards: a step is good only if it
      # restored on all of them, so they all go on with the same one.
      if not distributed.any_process(error is not None):
        return found
      if error is None:
        error = ValueError('it failed to restore on another process')
      target = self.move_aside(s)
      moved.append(target)
      logging.warning('checkpoint %s/%d is corrupt (%s); moved it to %s',
                      self.shown, s, first_line(error), target)
    raise CheckpointError(
        f'no checkpoint in {self.shown} restores (moved aside: '
        f'{", ".join(moved)})')

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


class Checkpoints:
  """Latest (max 2 kept) and best (1 kept) checkpoints under a workdir."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.latest = _Kind(workdir, 'checkpoints', 2)
    self.best = _Kind(workdir, 'best', 1)

  def save_latest(self, step, state, meta):
    self.latest.save(step, state, meta)

  def save_best(self, step, state, meta):
    self.best.save(step, state, meta)

  def restore_latest(self, state):
    """(state, meta) of the newest good latest checkpoint, or None.

    When none restores the run stops: rerunning then starts afresh (the bad
    ones are out of the way), which the error says."""
    try:
      return self.latest.restore(state)
    except CheckpointError as e:
      raise CheckpointError(
          f'{e}; rerun the same command to train from step 0, or use a new '
          '--workdir') from None

  def restore_best(self, state, best_step: int):
    """(state, meta) of the best checkpoint (validation step best_step).

    When best/ is corrupt, the latest checkpoint of the same step (if one is
    kept) is the same state and is used instead."""
    try:
      found = self.best.restore(state)
    except CheckpointError as e:
      found, why = None, str(e)
    else:
      why = f'{self.best.shown} is empty'
    if found is not None and found[1].get('best_step') == best_step:
      return found
    if found is not None:
      why = (f'{self.best.shown} holds step {found[1].get("best_step")}, '
             f'not the best step {best_step}')
    if best_step in self.latest.steps():
      logging.warning('%s; using %s/%d, the same state, and saving it to %s '
                      'again', why, self.latest.shown, best_step,
                      self.best.shown)
      try:
        found = self.latest.restore(state, best_step)
      except CheckpointError:
        pass
      else:
        self.best.save(best_step, *found)
        return found
    raise CheckpointError(
        f'the best checkpoint (step {best_step}) cannot be restored: {why}, '
        f'and no other copy is kept; retrain in a new --workdir')

  def wait(self):
    self.latest.wait()
    self.best.wait()

  def close(self):
    for kind in (self.latest, self.best):
      with _quiet_orbax():
        kind.close()
