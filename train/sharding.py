"""The device mesh of a run and how each array is laid out on it.

    mesh = sharding.make_mesh(config.mesh)          # axes data, fsdp, sequence
    state_shardings = sharding.state_shardings(setup.state, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

Three axes (`config.mesh`, sizes, -1 meaning "the devices left over"):

- `data`: data parallelism. The batch is split over it; everything else is
  replicated along it.
- `fsdp`: fully sharded data parallelism. The batch is split over it too
  (`BATCH_AXES`), and so is every parameter and its optimizer state:
  `param_spec` shards one dimension of each array, the largest that the
  axis size divides, and replicates arrays too small to split. XLA gathers
  a parameter where a step uses it and reduce-scatters its gradient.
- `sequence`: sequence parallelism. The activations [batch, length, width]
  are split along the length (the model constrains them when the mesh it
  is traced under has this axis: models/transformer.py); attention runs
  inside shard_map over it (attention_variants/sequence_parallel.py).

The mesh's axes are `Auto` (GSPMD): the step is jitted with these shardings
as its in/out shardings and XLA places the collectives between them. The
rules here are the only place a layout is decided; the trainer, the
checkpoints (orbax restores each array with its target's sharding) and the
model (through the mesh set with `jax.set_mesh` while a step is traced)
read them from here.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from models import transformer

AXES = ('data', 'fsdp', 'sequence')
BATCH_AXES = transformer.BATCH_AXES          # the model's names, one source
# An axis a config leaves out (runs older than config.mesh have none): the
# batch split over every device, as configs/default.py's mesh block says.
DEFAULT = {'data': -1, 'fsdp': 1, 'sequence': 1}
assert transformer.SEQUENCE_AXIS == AXES[2]


def mesh_shape(mesh_cfg, device_count: int) -> dict[str, int]:
  """{axis: size} with -1 resolved; ValueError naming the field when the
  sizes cannot make a mesh of `device_count` devices."""
  sizes = {axis: int(mesh_cfg.get(axis, DEFAULT[axis])) for axis in AXES}
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ValueError(f'mesh.{sorted(unknown)[0]} is not a mesh axis; the '
                     f'axes are {", ".join("mesh." + a for a in AXES)}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{axis}={size} must be a positive size or -1 '
                       '(the devices left over)')
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'mesh.{free[0]} and mesh.{free[1]} are both -1; at most '
                     'one axis takes the devices left over')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
          f'mesh.{free[0]}=-1 takes the devices left over, but the other '
          f'axes ({_shown(sizes)}) use {fixed}, which does not divide the '
          f'{device_count} devices')
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    wrong = next((a for a in AXES if sizes[a] > 1), 'data')
    raise ValueError(
        f'mesh {_shown(sizes)} has {fixed} devices but there are '
        f'{device_count}; change mesh.{wrong} (or set one axis to -1)')
  return sizes


def _shown(sizes: dict) -> str:
  return ', '.join(f'{axis}={size}' for axis, size in sizes.items())


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The run's mesh over `devices` (all of them by default)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in AXES), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def sizes(mesh) -> dict[str, int]:
  """{axis: size} of a mesh (or abstract mesh); 1 for an axis it lacks."""
  shape = dict(mesh.shape)
  return {axis: int(shape.get(axis, 1)) for axis in AXES}


def batch_parallelism(mesh) -> int:
  """How many ways the batch is split: data x fsdp."""
  s = sizes(mesh)
  return s['data'] * s['fsdp']


def check_divisible(mesh, *, batch_size: int, eval_batch_size: int,
                    seq_len: int, batch_what: str = 'train.batch_size'):
  """ValueError naming the field that the mesh cannot split evenly."""
  s = sizes(mesh)
  ways = s['data'] * s['fsdp']
  for what, size in ((batch_what, batch_size),
                     ('train.eval_batch_size', eval_batch_size)):
    if size % ways:
      raise ValueError(
          f'{what}={size} is not divisible across the mesh\'s batch axes '
          f'(mesh.data={s["data"]} x mesh.fsdp={s["fsdp"]} = {ways}); use a '
          f'multiple of {ways} or change the mesh')
  if seq_len % s['sequence']:
    raise ValueError(
        f'the task\'s sequence length {seq_len} is not divisible by '
        f'mesh.sequence={s["sequence"]}; use a mesh.sequence that divides it')


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The PartitionSpec of one parameter (or optimizer-state) array: its
  largest dimension that `fsdp` divides is split over 'fsdp' (the first
  such when two tie); replicated when fsdp is 1 or no dimension divides."""
  if fsdp == 1 or not shape:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], -i))
  return P(*[('fsdp' if i == axis else None) for i in range(len(shape))])


def state_shardings(state, mesh):
  """NamedShardings of a (model, optimizer) state pytree, by `param_spec`."""
  fsdp = sizes(mesh)['fsdp']

  def one(x):
    return NamedSharding(mesh, param_spec(tuple(np.shape(x)), fsdp))
  return jax.tree.map(one, state)


def batch_sharding(mesh) -> NamedSharding:
  """Input batches: split along the first (batch) dimension over
  BATCH_AXES; the rest of each array whole (the sequence is split after
  the embedding: models/transformer.py, constrain_activations)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh) -> dict:
  """What results.json records: the axis sizes and the device count."""
  return {**sizes(mesh), 'devices': int(mesh.devices.size)}
