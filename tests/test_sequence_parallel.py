"""Sequence-parallel attention (attention_variants/sequence_parallel.py)
equals single-device av.attend: outputs and gradients w.r.t. q, k, v (and
the learned parameters of kinds that own some) through a fixed random
cotangent, float32, within 1e-5 absolute + 1e-5 relative
(|got - want| <= 1e-5 + 1e-5 |want|), on a mesh data x fsdp x sequence =
1 x 1 x 4 (one case 2 x 1 x 2), batch 2, n = 32 (shards of 8), 2 query
heads sharing 1 kv head (GQA; one case 2/2), head_dim 8, padding [n, n - 5]
unless the case says otherwise.

XLA_FLAGS must force 4 host devices before jax is imported, and pytest's
workers imported it already, so every case of a group is computed in ONE
subprocess (tests/sequence_parallel_check.py, JAX_PLATFORMS=cpu) that prints
JSON; the tests read it. The default group has the ring and halo kinds
and two of the gather kinds (performer, linformer) bidirectional, full,
local and longformer causal too, the batch-sharded mesh and a row with no
key (kv length 0); the slow group (pytest -m slow) the other gather kinds,
the other kinds' causal forms, the halo kinds on the
batch-sharded mesh, heads without GQA and no padding, and n = 64.

The errors are raised before any device work, so they are checked here
against an abstract mesh.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import attention_variants as av
from attention_variants import sequence_parallel as sp

HERE = os.path.dirname(os.path.abspath(__file__))
EXACT = ('full', 'blockwise', 'local', 'longformer')  # ring and halo kinds

# Every gather kind runs the same all-gather code around its own attend:
# two of them (one drawing from the rng, one owning parameters) by default.
GATHER_DEFAULT = ('performer', 'linformer')
FAST = ([kind for kind in av.KINDS
         if kind in EXACT or kind in GATHER_DEFAULT]
        + [f'{kind}:causal' for kind in ('full', 'local', 'longformer')]
        + ['full:causal:mesh=2x1x2', 'full:causal:lengths=32,27/23,0'])
SLOW = ([kind for kind in av.KINDS
         if kind not in EXACT and kind not in GATHER_DEFAULT]
        + [f'{kind}:causal' for kind in av.KINDS
           if kind not in ('full', 'local', 'longformer')
           and av.supports_causal({'kind': kind})]
        + ['local:mesh=2x1x2', 'longformer:causal:mesh=2x1x2',
           'blockwise:causal:heads=2/2:nopad', 'full:n=64'])


def _run(cases):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # the script sets its own
  done = subprocess.run(
      [sys.executable, os.path.join(HERE, 'sequence_parallel_check.py'),
       *cases], capture_output=True, text=True, env=env, timeout=900)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def fast_results():
  return _run(FAST)


@pytest.fixture(scope='module')
def slow_results():
  return _run(SLOW)


def _check(result, case):
  assert result['out']['scale'] > 0.1, f'{case}: reference output is ~0'
  for name, r in result.items():
    assert r['finite'], f'{case}: non-finite {name}'
    assert r['excess'] <= 0.0, f'{case}: {name} differs by {r["max_abs"]:.3g}'


@pytest.mark.parametrize('case', FAST)
def test_equals_single_device(fast_results, case):
  _check(fast_results[case], case)


@pytest.mark.slow
@pytest.mark.parametrize('case', SLOW)
def test_the_rest_equals_single_device(slow_results, case):
  _check(slow_results[case], case)


def test_every_kind_is_covered_causal_and_bidirectional():
  causal = {c.split(':')[0] for c in FAST + SLOW if ':causal' in c}
  assert set(av.KINDS) <= {c.split(':')[0] for c in FAST + SLOW
                           if ':causal' not in c}
  assert causal == {k for k in av.KINDS
                    if av.supports_causal({'kind': k})}


def test_strategies():
  assert {k: sp.strategy(k) for k in EXACT} == {
      'full': 'ring', 'blockwise': 'ring', 'local': 'halo',
      'longformer': 'halo'}
  assert {sp.strategy(k) for k in av.KINDS if k not in EXACT} == {'gather'}
  with pytest.raises(ValueError, match='unknown attention kind'):
    sp.strategy('nope')


MESH = jax.sharding.AbstractMesh((1, 1, 4), ('data', 'fsdp', 'sequence'))


def _inputs(n, heads=2, kv_heads=1, batch=2):
  return (jnp.zeros((batch, n, heads, 8)),
          jnp.zeros((batch, n, kv_heads, 8)),
          jnp.zeros((batch, n, kv_heads, 8)))


@pytest.mark.parametrize('spec, n, match', [
    ({'kind': 'full'}, 30, 'length 30 must be divisible by the sequence axis '
     'size 4'),
    ({'kind': 'performer'}, 30, 'divisible by the sequence axis size 4'),
    ({'kind': 'local', 'local': {'window': 9}}, 32,
     r'attention\.local\.window reaches 9 .* shard length 8'),
    ({'kind': 'local', 'local': {'window': 2, 'left': 12}}, 32,
     r'attention\.local\.left reaches 12'),
    ({'kind': 'local', 'local': {'window': 2, 'right': 9}}, 32,
     r'attention\.local\.right reaches 9'),
    ({'kind': 'longformer', 'longformer': {'window': 9}}, 32,
     r'attention\.longformer\.window reaches 9 .* shard length 8'),
    ({'kind': 'longformer', 'longformer': {'window': 2, 'num_global': 10}},
     32, r'attention\.longformer\.num_global reaches 10'),
    ({'kind': 'full', 'full': {'x': 1}}, 32,
     'unknown attention.full parameter'),
])
def test_errors(spec, n, match):
  with pytest.raises(ValueError, match=match):
    sp.attend(*_inputs(n), spec, mesh=MESH)


def test_other_errors():
  q, k, v = _inputs(32)
  with pytest.raises(ValueError, match="axis 'seq' is not a mesh axis"):
    sp.attend(q, k, v, {'kind': 'full'}, mesh=MESH, axis='seq')
  with pytest.raises(ValueError, match='batch 3 must be divisible'):
    mesh = jax.sharding.AbstractMesh((2, 1, 2), ('data', 'fsdp', 'sequence'))
    sp.attend(*_inputs(32, batch=3), {'kind': 'full'}, mesh=mesh)
  # A kind without a causal form raises its own error, as av.attend does.
  with pytest.raises(ValueError, match='bidirectional only'):
    sp.attend(q, k, v, {'kind': 'linformer'}, mesh=MESH, causal=True,
              learned={})
  # The causal window ignores `right`, so only `left` is bounded then.
  spec = {'kind': 'local', 'local': {'window': 2, 'right': 9}}
  out = jax.eval_shape(lambda q, k, v: sp.attend(q, k, v, spec, mesh=MESH,
                                                 causal=True), q, k, v)
  assert out.shape == q.shape
