"""Orbax checkpoints of a run: the latest state (for resume) and the state
that was best on validation (for the final test evaluation).

Also guards a workdir: a run may only resume from a workdir whose config.json
describes the same experiment, and a checkpoint that cannot be read is
reported with its path instead of being overwritten or deleted.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

# Config fields that may differ between a run and its resumption: they steer
# the run (how long, how often it logs) without changing what is trained.
RUN_CONTROL_FIELDS = ('data_dir', 'train.num_steps', 'train.log_every',
                      'train.checkpoint_every', 'train.eval_batch_size')


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Fields (other than run-control ones) whose values differ."""
  a, b = _flatten(old), _flatten(new)
  keys = sorted(set(a) | set(b))
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in keys if k not in RUN_CONTROL_FIELDS and a.get(k) != b.get(k)]


def check_resumable(workdir: str, config: dict) -> None:
  """ValueError if workdir holds a run of a different experiment."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is unreadable ({e}); use a new --workdir') from e
  diff = config_differences(old, config)
  if diff:
    shown = '; '.join(diff[:3]) + (' ...' if len(diff) > 3 else '')
    raise ValueError(
        f'--workdir={workdir} holds a run with a different config ({shown}); '
        'use a new --workdir or the config that run used')


class Checkpoints:
  """Latest (max 2 kept) and best (1 kept) checkpoints under a workdir."""

  def __init__(self, workdir: str):
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True)
    self.latest_dir = os.path.join(workdir, 'checkpoints')
    self.best_dir = os.path.join(workdir, 'best')
    self._latest = ocp.CheckpointManager(self.latest_dir, options=opts(2))
    self._best = ocp.CheckpointManager(self.best_dir, options=opts(1))

  @staticmethod
  def _save(manager, step, state, meta):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        meta=ocp.args.JsonSave(meta)), force=True)

  @staticmethod
  def _restore(manager, directory, state):
    """(state, meta) from the newest step, or None when there is none."""
    step = manager.latest_step()
    if step is None:
      return None
    pure = nnx.to_pure_dict(state)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, pure)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          meta=ocp.args.JsonRestore()))
      new_state = jax.tree.map(lambda x: x, state)
      nnx.replace_by_pure_dict(new_state, restored['state'])
    except Exception as e:  # orbax raises many types for bad files
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      raise ValueError(
          f'checkpoint {directory}/{step} cannot be restored '
          f'({type(e).__name__}: {first[:200]}); it was left untouched: move '
          'it away to restart from an earlier checkpoint, or use a new '
          '--workdir') from e
    return new_state, dict(restored['meta'])

  def save_latest(self, step, state, meta):
    self._save(self._latest, step, state, meta)

  def save_best(self, step, state, meta):
    self._save(self._best, step, state, meta)

  def restore_latest(self, state):
    return self._restore(self._latest, self.latest_dir, state)

  def restore_best(self, state):
    return self._restore(self._best, self.best_dir, state)

  def wait(self):
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self):
    self._latest.close()
    self._best.close()
