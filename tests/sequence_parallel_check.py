"""Sequence-parallel attention against single-device attention, in a process
of its own (tests/test_sequence_parallel.py runs it).

    JAX_PLATFORMS=cpu python tests/sequence_parallel_check.py CASE ...

forces 4 host devices before jax is imported (pytest's workers imported it
already, with one), computes each named case (CASES in
test_sequence_parallel.py's vocabulary: kind, causal, mesh, ...) and prints
one JSON line {case: {'out': ..., 'dq': ..., 'dk': ..., 'dv': ...}}, each
entry {'max_abs': float, 'excess': float, 'finite': bool, 'scale': float},
excess being max(|got - want| - (ATOL + RTOL |want|)) (<= 0 passes) and
scale max |want| (a case whose reference is all zeros would test nothing).
"""
import json
import os
import sys
import time

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attention_variants as av  # noqa: E402
from attention_variants import sequence_parallel as sp  # noqa: E402

ATOL = RTOL = 1e-5

# Hyperparameters valid at n = 32 with 4 shards of 8 (windows <= n / 4).
PARAMS = {
    'full': {},
    'blockwise': {'q_block': 4, 'kv_block': 4},
    'local': {'window': 3, 'left': 5, 'block': 4},
    'longformer': {'window': 4, 'num_global': 2, 'block': 4},
    'lsh': {'n_hashes': 2, 'bucket_size': 8},
    'sparse': {'pattern': 'strided', 'block_size': 8},
    'bigbird': {'block_size': 4, 'num_global': 2, 'num_random': 1},
    'linear': {'chunk': 8},
    'performer': {'num_features': 16, 'chunk': 8},
    'nystromformer': {'num_landmarks': 8},
    'linformer': {'k': 8},
    'synthesizer': {'rank': 4, 'block': 8},
    'sinkhorn': {'block_size': 8},
}


def parse(case):
  """'kind[:causal][:mesh=2x1x2][:heads=H/KV][:n=N][:nopad]
  [:lengths=a,b/c,d]' (q lengths / kv lengths; default [n, n - 5] both;
  nopad: lengths None)."""
  kind, *opts = case.split(':')
  out = {'kind': kind, 'causal': False, 'mesh': (1, 1, 4), 'heads': (2, 1),
         'n': 32, 'lengths': None}
  for opt in opts:
    name, _, value = opt.partition('=')
    if name == 'causal':
      out['causal'] = True
    elif name == 'mesh':
      out['mesh'] = tuple(int(x) for x in value.split('x'))
    elif name == 'heads':
      out['heads'] = tuple(int(x) for x in value.split('/'))
    elif name == 'n':
      out['n'] = int(value)
    elif name == 'nopad':
      out['lengths'] = 'none'
    elif name == 'lengths':
      out['lengths'] = tuple(tuple(int(x) for x in part.split(','))
                             for part in value.split('/'))
  return out


def compare(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff = np.abs(got - want)
  return {'max_abs': float(diff.max()),
          'excess': float((diff - (ATOL + RTOL * np.abs(want))).max()),
          'finite': bool(np.isfinite(got).all()),
          'scale': float(np.abs(want).max())}


def run(case):
  c = parse(case)
  n, (heads, kv_heads), b, d = c['n'], c['heads'], 2, 8
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(b, n, heads, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, n, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, n, kv_heads, d)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  if c['lengths'] is None:  # the default padding: [n, n - 5]
    ql = kl = jnp.asarray([n, n - 5], jnp.int32)
  elif c['lengths'] == 'none':
    ql = kl = None
  else:
    ql, kl = (jnp.asarray(x, jnp.int32) for x in c['lengths'])
  spec = {'kind': c['kind'], c['kind']: PARAMS[c['kind']]}
  learned = None
  if av.owns_parameters(spec):
    learned = av.init_learned(spec, jax.random.key(1), num_heads=heads,
                              num_kv_heads=kv_heads, head_dim=d, max_len=n)
  key = jax.random.key(3)
  mesh = jax.make_mesh(c['mesh'], ('data', 'fsdp', 'sequence'))
  kw = dict(causal=c['causal'], q_lengths=ql, kv_lengths=kl, rng=key)

  def both(q, k, v, learned):
    results = []
    for attend in (lambda *a, **kw: av.attend(*a, **kw),
                   lambda *a, **kw: sp.attend(*a, mesh=mesh, **kw)):
      fn = lambda q, k, v, learned: attend(q, k, v, spec, learned=learned,
                                           **kw)
      out, pullback = jax.vjp(fn, q, k, v, learned)
      results.append((out, *pullback(ct)))
    return results

  compiled = jax.jit(both, compiler_options={
      'xla_backend_optimization_level': 0})
  want, got = compiled(q, k, v, learned)
  result = {name: compare(g, w)
            for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want)}
  # The kind's learned parameters get their gradient too.
  for name in sorted(learned or {}):
    result[f'd{name}'] = compare(got[4][name], want[4][name])
  return result


def main(cases):
  results = {}
  for case in cases:
    start = time.perf_counter()
    results[case] = run(case)
    print(f'{case}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
  print(json.dumps(results))


if __name__ == '__main__':
  main(sys.argv[1:])
