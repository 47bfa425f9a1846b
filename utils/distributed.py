"""Several processes, one run: start-up and the few agreements they need.

    distributed.initialize(coordinator, num_processes, process_id)  # main.py
    distributed.is_main()            # process 0: logs and writes run files
    distributed.barrier('name')      # every process reaches this point
    distributed.any_process(flag)    # True on every process if on one
    distributed.host_arrays(tree)    # numpy copies of (global) jax arrays

`initialize` calls `jax.distributed.initialize` when the command line or
the environment describes a cluster:
- explicit: `--coordinator=HOST:PORT --num_processes=N --process_id=I`
  (all three; the same coordinator on every process);
- SLURM: a job step of several tasks (SLURM_JOB_ID, SLURM_PROCID and
  SLURM_NTASKS > 1, as `srun` sets them); jax reads the rest itself;
- Cloud TPU: a multi-host slice (TPU_WORKER_HOSTNAMES lists more than one
  worker, or MEGASCALE_COORDINATOR_ADDRESS is set); jax asks the TPU
  environment for the rest. `--distributed` forces this auto-detection
  where the environment says nothing (jax then uses its own detection).
Otherwise the run is one process, as before, and every helper here is a
no-op. Everything else (the global mesh over all processes' devices,
per-process data, orbax's multi-host checkpoints) is JAX's, orbax's and
grain's own machinery; this module only decides when to start it and
gives the trainer names for the agreements.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """'slurm' or 'cloud_tpu' when the environment describes a cluster of
  several processes; else None."""
  if ('SLURM_JOB_ID' in environ and 'SLURM_PROCID' in environ
      and int(environ.get('SLURM_NTASKS', '1') or 1) > 1):
    return 'slurm'
  hosts = [h for h in environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'cloud_tpu'
  return None


def check_flags(coordinator: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
  """True when the explicit flags are given; ValueError naming the flag
  when they are given in part or out of range."""
  given = {'--coordinator': coordinator, '--num_processes': num_processes,
           '--process_id': process_id}
  missing = [name for name, value in given.items() if value is None]
  if len(missing) == 3:
    return False
  if missing:
    raise ValueError(f'{", ".join(missing)} missing: a run over several '
                     'processes needs --coordinator=HOST:PORT, '
                     '--num_processes=N and --process_id=I together')
  if not re.fullmatch(r'[^:\s]+:\d+', coordinator):
    raise ValueError(f'--coordinator={coordinator} must be HOST:PORT (process '
                     "0's address, the same on every process)")
  if num_processes < 1:
    raise ValueError(f'--num_processes={num_processes} must be >= 1')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id} must be in [0, '
                     f'{num_processes - 1}] for --num_processes='
                     f'{num_processes}')
  return True


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *, force: bool = False,
               environ: Mapping[str, str] = os.environ) -> str | None:
  """Starts jax.distributed when asked to or when the environment is a
  cluster (see the module docstring); returns how ('explicit', 'slurm',
  'cloud_tpu', 'auto'), or None for a single process."""
  if check_flags(coordinator, num_processes, process_id):
    how = 'explicit'
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    how = cluster(environ) or ('auto' if force else None)
    if how is None:
      return None
    jax.distributed.initialize()
  logging.info('process %d of %d (%s): %d local of %d devices',
               jax.process_index(), jax.process_count(), how,
               jax.local_device_count(), jax.device_count())
  return how


def multi_process() -> bool:
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0, the one that logs progress and writes the run's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Returns once every process has called it with this name."""
  if multi_process():
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """`flag` or'ed over the processes (the same answer on all of them)."""
  if not multi_process():
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(bool(flag)))
  return bool(np.any(flags))


def host_arrays(tree):
  """numpy copies of the arrays of a pytree; an array split over other
  processes' devices is gathered first (every process gets all of it)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)
