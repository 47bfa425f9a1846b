"""Compiled peak memory of a config's train step under the memory knobs.

    python -m evaluate.memory_fit --config=configs/listops.py:lra \\
        --config.attention.kind=local

For each (model.remat, train.grad_accum_steps) of --remat x --accum it
builds the model and optimizer (step.build), compiles only the train step
ahead of time for abstract inputs (jax.ShapeDtypeStruct batch: no data is
generated or allocated) and prints XLA's memory analysis of it: peak_bytes
(temporaries + outputs - donated inputs, what the trainer compares with the
memory available) and argument_bytes (the state and batch, resident
anyway). One compile at a time; on 2 CPU cores each lra compile takes a
minute or two.
"""
from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import attention_variants as av
import tasks
from train import profile
from train import step as step_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'a task config')
_REMAT = flags.DEFINE_list('remat', ['none', 'block'], 'model.remat values')
_ACCUM = flags.DEFINE_list('accum', ['1', '4'],
                           'train.grad_accum_steps values')


def abstract_batch(task, batch_size: int) -> dict:
  """ShapeDtypeStructs of a batch of `task`'s head's fields, as its data
  source stacks them (shapes from one example is what the trainer does;
  this knows them from the task: inputs [b, n], length [b], label [b];
  match: two documents; per_position: targets, weights [b, n])."""
  b, n = batch_size, task.seq_len
  s = jax.ShapeDtypeStruct
  if task.head == 'classify':
    return {'inputs': s((b, n), jnp.int32), 'length': s((b,), jnp.int32),
            'label': s((b,), jnp.int32)}
  if task.head == 'match':
    return {'inputs': s((b, 2, n), jnp.int32),
            'length': s((b, 2), jnp.int32), 'label': s((b,), jnp.int32)}
  if task.head in ('per_position', 'lm'):
    return {'inputs': s((b, n), jnp.int32), 'length': s((b,), jnp.int32),
            'targets': s((b, n), jnp.int32), 'weights': s((b, n), jnp.float32)}
  raise ValueError(f'no abstract batch for head {task.head!r}')


def measure(config, remat: str, accum_steps: int) -> dict:
  """XLA's memory analysis of config's train step with these knobs."""
  config = config.copy_and_resolve_references()
  config.model.remat = remat
  task = tasks.get(config.task, config.data_dir or '/nonexistent')
  setup = step_lib.build(config.model, config.attention.to_dict(), task,
                         config.train, seed=config.seed)
  batch = abstract_batch(task, config.train.batch_size)
  keys = step_lib.train_keys(jax.random.key(config.seed), 0,
                             av.redraw_every(config.attention.to_dict()))
  t0 = time.time()
  compiled = step_lib.compile_train(setup, batch, keys,
                                    accum_steps=accum_steps)
  return {**profile.compiled_memory(compiled),
          'compile_s': time.time() - t0, 'params': setup.num_params}


def main(argv):
  del argv
  config = _CONFIG.value
  print(f'# {config.task.name}:{config.get("preset")} '
        f'kind={config.attention.kind} batch={config.train.batch_size} '
        f'seq_len={config.task.get("max_length")} on {profile.device_kind()}')
  print('| remat | accum | peak GB | arguments GB | compile s |')
  print('|---|---:|---:|---:|---:|')
  for remat in _REMAT.value:
    for accum in _ACCUM.value:
      m = measure(config, remat, int(accum))
      print(f'| {remat} | {accum} | {m["peak_bytes"] / 1e9:.2f} | '
            f'{m["argument_bytes"] / 1e9:.2f} | {m["compile_s"]:.0f} |',
            flush=True)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
