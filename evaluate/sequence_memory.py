"""Per-device memory of sequence-parallel attention against the axis size.

    python -m evaluate.sequence_memory [--kind local] [--n 16384]
        [--heads 4] [--head_dim 64] [--window 128] [--devices 1,2,4]

For each sequence axis size P it starts a process with P forced host
devices (XLA_FLAGS must be set before jax is imported), compiles forward +
backward (the gradient w.r.t. q, k, v of sum(output)) of
attention_variants.sequence_parallel.attend on a data x fsdp x sequence =
1 x 1 x P mesh, batch 1, inputs sharded over the sequence, and reads XLA's
memory analysis of the compiled per-device program (train/profile.py:
compiled_memory). It prints, per P, the per-device peak (temporaries +
outputs), the per-device argument bytes (the q, k, v shards) and the peak's
ratio to P = 1, which should fall roughly as 1 / P for the halo kinds
(local, longformer) and the ring kinds (full, blockwise), and not for the
gather kinds (which hold the whole sequence's attention on every device).
CPU only: nothing is run, only compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _one(args) -> dict:
  """Compile in this process (its XLA_FLAGS already force args.one
  devices) and return the memory analysis of the per-device program."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from attention_variants import sequence_parallel as sp
  from train import profile

  n_dev = args.one
  mesh = jax.make_mesh((1, 1, n_dev), ('data', 'fsdp', 'sequence'))
  spec = {'kind': args.kind}
  if args.kind in ('local', 'longformer'):
    spec[args.kind] = {'window': args.window}
  shape = jax.ShapeDtypeStruct(
      (1, args.n, args.heads, args.head_dim), jnp.float32,
      sharding=NamedSharding(mesh, P(None, 'sequence')))

  def loss(q, k, v):
    out = sp.attend(q, k, v, spec, mesh=mesh, causal=args.causal)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  compiled = grad.lower(shape, shape, shape).compile()
  return {'devices': n_dev, **profile.compiled_memory(compiled)}


def measure(args) -> list[dict]:
  """One child process per axis size; their JSON lines, in order."""
  rows = []
  for n_dev in args.devices:
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n_dev}')
    cmd = [sys.executable, '-m', 'evaluate.sequence_memory', '--one',
           str(n_dev), '--kind', args.kind, '--n', str(args.n), '--heads',
           str(args.heads), '--head_dim', str(args.head_dim), '--window',
           str(args.window)] + (['--causal'] if args.causal else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          check=False)
    if done.returncode:
      raise RuntimeError(f'P={n_dev} failed:\n{done.stderr[-3000:]}')
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
  return rows


def table(rows, args) -> str:
  """Markdown table: P, per-device peak and arguments (MiB), ratio to P=1."""
  mib = lambda x: f'{x / 2**20:.1f}'
  base = rows[0]['peak_bytes']
  lines = [f'{args.kind}, N={args.n}, batch 1, heads {args.heads}, head_dim '
           f'{args.head_dim}' + (f', window {args.window}'
                                 if args.kind in ('local', 'longformer')
                                 else '')
           + (', causal' if args.causal else '') + ', forward + backward',
           '',
           '| P (sequence) | peak per device (MiB) | arguments per device '
           '(MiB) | peak / peak(P=1) | 1/P |',
           '|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["devices"]} | {mib(r["peak_bytes"])} | '
                 f'{mib(r["argument_bytes"])} | '
                 f'{r["peak_bytes"] / base:.3f} | {1 / r["devices"]:.3f} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kind', default='local')
  parser.add_argument('--n', type=int, default=16384)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=64)
  parser.add_argument('--window', type=int, default=128)
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--devices', default='1,2,4',
                      type=lambda s: [int(x) for x in s.split(',')])
  parser.add_argument('--one', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(_one(args)))
    return
  print(table(measure(args), args))


if __name__ == '__main__':
  main()
