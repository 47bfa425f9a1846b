"""av.attention_parts: the weights of a structured kind split by component.

Each component is rebuilt here from the kind's docstring (plain numpy over
positions and blocks) and the variant's part must be its weights on exactly
those keys: parts are disjoint, cover the pattern and sum to
av.attention_weights, causal and bidirectional, with padding.
"""
import jax
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import lsh

N = 21
HEADS = 4


def _positions():
  return np.arange(N)[:, None], np.arange(N)[None, :]


def _sparse_strided(l):
  i, j = _positions()
  window = np.abs(i - j) <= l
  return {'window': window,
          'stride': ~window & ((i - j) % l == 0)}


def _sparse_fixed(l, c):
  i, j = _positions()
  block = i // l == j // l
  return {'block': block, 'summary': ~block & (j % l >= l - c)}


def _longformer(window, g):
  i, j = _positions()
  is_global = (i < g) | (j < g)
  return {'global': is_global, 'window': ~is_global & (np.abs(i - j) <= window)}


def _bigbird(b, num_global, num_random, seed):
  n_blocks = -(-N // b)
  front = -(-num_global // 2)
  back = num_global // 2
  a, m = (np.arange(N) // b)[:, None], (np.arange(N) // b)[None, :]
  glob = lambda x: (x < front) | (x >= n_blocks - back)
  is_global = glob(a) | glob(m)
  window = ~is_global & (np.abs(a - m) <= 1)
  every = kit.bigbird_pattern(N, N, b, num_global, num_random, seed,
                              heads=HEADS)
  return {'global': is_global, 'window': window,
          'random': every & ~is_global & ~window}


CASES = [
    ('sparse', {'pattern': 'strided', 'block_size': 4},
     lambda: _sparse_strided(4)),
    ('sparse', {'pattern': 'fixed', 'block_size': 4, 'num_summary': 2},
     lambda: _sparse_fixed(4, 2)),
    ('bigbird', {'block_size': 3, 'num_global': 2, 'num_random': 1,
                 'seed': 4}, lambda: _bigbird(3, 2, 1, 4)),
    ('longformer', {'window': 3, 'num_global': 2, 'block': 4},
     lambda: _longformer(3, 2)),
]


def _weights_and_parts(spec, causal, rng=None):
  q, k, v, ql, kl = kit.padded_inputs(N, N, 2)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl, rng=rng,
            learned=kit.learned(spec, q, k))
  # Tiny shapes: compiling dominates, and XLA's backend optimizations
  # change no result here.
  fn = jax.jit(lambda q, k, v: (av.attention_weights(q, k, v, spec, **kw),
                                av.attention_parts(q, k, v, spec, **kw)),
               compiler_options={'xla_backend_optimization_level': 0})
  w, parts = fn(q, k, v)
  return (q, k, v, ql, kl), np.asarray(w), {
      name: np.asarray(p) for name, p in parts.items()}


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('kind,params,components', CASES)
def test_parts_are_the_weights_on_each_component(kind, params, components,
                                                 causal):
  _, w, parts = _weights_and_parts(kit.spec(kind, **params), causal)
  want = components()
  assert set(parts) == set(want)
  covered = np.zeros(w.shape, bool)
  for name, mask in want.items():
    mask = np.broadcast_to(mask, w.shape)
    assert not (covered & mask).any(), f'{name} overlaps another component'
    covered |= mask
    np.testing.assert_allclose(parts[name], np.where(mask, w, 0.0),
                               atol=1e-6, err_msg=name)
    assert parts[name].sum() > 0.5, f'{name} holds no mass on these inputs'
  # The components cover everything the kind sees.
  assert not (w[~covered] > 0).any()


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('shared_qk', [True, False])
def test_lsh_own_bucket_is_the_mass_in_the_querys_bucket(shared_qk, causal):
  """One round: own_bucket is the weight on keys hashed to the query's
  bucket, other_buckets the weight on the rest of its two chunks."""
  spec = kit.spec('lsh', bucket_size=4, n_hashes=1, shared_qk=shared_qk)
  rng = jax.random.key(2)
  (q, k, v, ql, kl), w, parts = _weights_and_parts(spec, causal, rng)
  s = lsh.prepare(q, k, v, av.resolve(spec)[1], q_lengths=ql,
                  kv_lengths=kl, rng=rng)
  b, kv, g = s.q_buckets.shape[:3]
  q_ids = np.asarray(s.q_buckets)[:, :, :, 0, :N].reshape(b, kv * g, N)
  k_ids = np.repeat(np.asarray(s.k_buckets)[:, :, 0, :N], g, axis=1)
  same = q_ids[..., :, None] == k_ids[..., None, :]
  assert set(parts) == {'own_bucket', 'other_buckets'}
  np.testing.assert_allclose(parts['own_bucket'], np.where(same, w, 0.0),
                             atol=1e-6)
  np.testing.assert_allclose(parts['other_buckets'],
                             np.where(same, 0.0, w), atol=1e-6)
  # Both are seen on these inputs, so the test can tell them apart.
  assert parts['own_bucket'].sum() > 1 and parts['other_buckets'].sum() > 1


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('kind,params', [
    ('lsh', {'bucket_size': 4, 'n_hashes': 2}),
    ('sinkhorn', {'block_size': 4}),
])
def test_input_dependent_parts_sum_to_the_weights(kind, params, causal):
  _, w, parts = _weights_and_parts(kit.spec(kind, **params), causal,
                                   jax.random.key(1))
  assert len(parts) == 2
  np.testing.assert_allclose(sum(parts.values()), w, atol=1e-6)
  assert all((p >= 0).all() for p in parts.values())
  if kind == 'sinkhorn':   # the own block's keys only
    i, j = _positions()
    outside = np.broadcast_to((i // 4) != (j // 4), w.shape)
    assert not parts['own_block'][outside].any()


def test_sinkhorn_one_block_splits_in_half():
  """One block: the sorted block is the block itself, so each copy of a key
  holds half its weight (sinkhorn's docstring)."""
  _, w, parts = _weights_and_parts(kit.spec('sinkhorn', block_size=N),
                                   False)
  rows = w.sum(-1) > 0.5
  np.testing.assert_allclose(parts['own_block'].sum(-1)[rows], 0.5,
                             atol=1e-6)
  np.testing.assert_allclose(parts['own_block'], parts['sorted_block'],
                             atol=1e-6)


@pytest.mark.parametrize('kind', ['full', 'blockwise', 'local', 'linear',
                                  'performer', 'linformer', 'nystromformer',
                                  'synthesizer'])
def test_kinds_without_components_have_no_parts(kind):
  q, k, v, ql, kl = kit.padded_inputs(N, N, 2)
  spec = kit.spec(kind)
  assert av.attention_parts(q, k, v, spec, q_lengths=ql, kv_lengths=kl,
                            rng=jax.random.key(0),
                            learned=kit.learned(spec, q, k)) == {}

