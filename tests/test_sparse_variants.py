"""Block-sparse variants `sparse` (Child et al. 2019) and `bigbird` (ITC).

Expected patterns are rebuilt here with plain loops from the papers'
definitions (as written in the docstrings of attention_variants/sparse.py
and bigbird.py) and
compared with what the variants compute; the dense reference is
attention_variants.full with the same mask.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import bigbird
from attention_variants import blocksparse
from attention_variants import full

ATOL = 1e-5
# Shapes are tiny, so compiling dominates: skipping XLA's backend (LLVM)
# optimizations halves this file's time and changes no result.
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _inputs(n_q, n_k, batch=3, seed=0):
  # Small scores keep every in-pattern probability far from underflow.
  return kit.inputs(n_q, n_k, batch=batch, heads=HEADS, kv_heads=KV_HEADS,
                    head_dim=HEAD_DIM, seed=seed, scale=0.5)


def _lengths(n_q, n_k):
  """Full rows, partly padded rows, and a row whose keys are all padding."""
  return (jnp.array([n_q, n_q - 5, n_q // 2]),
          jnp.array([n_k, 0, n_k - 7]))


def _expected_mask(pattern, q_lengths, kv_lengths, causal):
  """[b, heads, n_q, n_k] bool: pattern [heads, n_q, n_k] & padding & causal."""
  _, n_q, n_k = pattern.shape
  i = np.arange(n_q)[:, None]
  j = np.arange(n_k)[None, :]
  ql = np.asarray(q_lengths)[:, None, None, None]
  kl = np.asarray(kv_lengths)[:, None, None, None]
  ok = pattern[None] & (i < ql) & (j < kl)
  if causal:
    ok &= j <= i
  return ok


def _strided_pattern(n_q, n_k, l):
  return kit.strided_pattern(n_q, n_k, l, heads=HEADS)


def _fixed_pattern(n_q, n_k, l, c):
  return kit.fixed_pattern(n_q, n_k, l, c, heads=HEADS)


def _bigbird_pattern(n_q, n_k, b, num_global, num_random, seed):
  return kit.bigbird_pattern(n_q, n_k, b, num_global, num_random, seed,
                             heads=HEADS)


def _with_grads(fn):
  """Jitted (q, k, v) -> (fn's output, its q/k/v gradients): one compile."""
  return lambda q, k, v: kit.outputs_and_grads([fn], q, k, v, jit=_jit)[0]


@functools.partial(_jit, static_argnames='causal')
def _full_reference(q, k, v, q_lengths, kv_lengths, *, causal):
  fn = lambda q, k, v: kit.reference(q, k, v, causal=causal,
                                     q_lengths=q_lengths,
                                     kv_lengths=kv_lengths)
  return kit.outputs_and_grads([fn], q, k, v, jit=lambda f: f)[0]


def _assert_close(got, want):
  kit.assert_close(got, want, atol=ATOL, rtol=1e-7)


# Dense limits whose computation uses every part of the variant.
DENSE_LIMITS = [
    # Every position is a summary position (c = l).
    kit.spec('sparse', pattern='fixed', block_size=4, num_summary=4),
    # Stride 1: every key is on the stride (the column part sees them all).
    kit.spec('sparse', pattern='strided', block_size=1),
    # 10 blocks, 2 global: a middle block has at most 6 non-global blocks
    # outside its window, so 6 random blocks take all of them.
    kit.spec('bigbird', block_size=2, num_global=2, num_random=6),
]

# Dense limits where the blocks cover the whole sequence.
COVERING_LIMITS = [
    kit.spec('sparse', pattern='fixed', block_size=32, num_summary=4),
    kit.spec('sparse', pattern='strided', block_size=19),
    kit.spec('bigbird', block_size=8, num_random=0),  # 3 blocks of 8 for 20
    # All blocks global:
    kit.spec('bigbird', block_size=4, num_global=5, num_random=0),
    # Blocks longer than the sequence: one block, clamped to it.
    kit.spec('sparse', pattern='strided', block_size=64),
    kit.spec('bigbird', block_size=64),
]


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('spec', DENSE_LIMITS, ids=str)
def test_dense_limit_forward_and_gradients(spec, causal):
  n = 20
  q, k, v = _inputs(n, n)
  ql, kl = _lengths(n, n)
  variant = _with_grads(lambda q, k, v: av.attend(
      q, k, v, spec, causal=causal, q_lengths=ql, kv_lengths=kl))
  got = variant(q, k, v)
  _assert_close(got, _full_reference(q, k, v, ql, kl, causal=causal))
  out = np.asarray(got[0])
  assert not out[1].any()  # every key padded: exact zeros
  assert not out[1:, n - 5:].any()  # padded queries


@pytest.mark.parametrize('spec', COVERING_LIMITS, ids=str)
def test_dense_limit_when_blocks_cover_the_sequence(spec):
  n = 20
  q, k, v = _inputs(n, n)
  ql, kl = _lengths(n, n)
  for causal in (False, True):
    out = _jit(lambda q, k, v: av.attend(
        q, k, v, spec, causal=causal, q_lengths=ql, kv_lengths=kl))(q, k, v)
    want, _ = _full_reference(q, k, v, ql, kl, causal=causal)
    np.testing.assert_allclose(out, want, atol=ATOL)


# (spec, n_q, n_k, expected pattern [heads, n_q, n_k])
PATTERNS = [
    pytest.param(kit.spec('sparse', pattern='fixed', block_size=8,
                          num_summary=2),
                 37, 37, lambda nq, nk: _fixed_pattern(nq, nk, 8, 2),
                 id='fixed-l8-c2'),
    pytest.param(kit.spec('sparse', pattern='strided', block_size=4), 30, 37,
                 lambda nq, nk: _strided_pattern(nq, nk, 4),
                 id='strided-l4-q30-k37'),
    pytest.param(kit.spec('bigbird', block_size=4, num_global=2, num_random=2,
                          seed=3), 45, 45,
                 lambda nq, nk: _bigbird_pattern(nq, nk, 4, 2, 2, 3),
                 id='bigbird-b4-g2-r2'),
    pytest.param(kit.spec('bigbird', block_size=3, num_global=1, num_random=3,
                          seed=0), 37, 30,
                 lambda nq, nk: _bigbird_pattern(nq, nk, 3, 1, 3, 0),
                 id='bigbird-b3-g1-r3-q37-k30'),
    pytest.param(kit.spec('bigbird', block_size=4, num_global=0, num_random=1,
                          seed=7), 37, 37,
                 lambda nq, nk: _bigbird_pattern(nq, nk, 4, 0, 1, 7),
                 id='bigbird-b4-g0-r1'),
]


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('spec,n_q,n_k,pattern', PATTERNS)
def test_pattern_weights_and_outputs(spec, n_q, n_k, pattern, causal):
  """Weights vanish exactly outside the paper's pattern, and the output
  equals dense attention restricted to that pattern."""
  q, k, v = _inputs(n_q, n_k)
  ql, kl = _lengths(n_q, n_k)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
  expected = _expected_mask(pattern(n_q, n_k), ql, kl, causal)

  run = _jit(lambda q, k, v: (av.attention_weights(q, k, v, spec, **kw),
                                 av.attend(q, k, v, spec, **kw)))
  w, out = (np.asarray(x) for x in run(q, k, v))
  assert w.shape == expected.shape
  np.testing.assert_array_equal(w > 0, expected)
  np.testing.assert_allclose(w.sum(-1), expected.any(-1), atol=1e-6)
  want = full.probs_times_v(full.dense_probs(q, k, expected), v, q.dtype)
  np.testing.assert_allclose(out, want, atol=ATOL)


@pytest.mark.parametrize('spec,n_q,n_k,pattern', PATTERNS)
def test_loop_over_query_block_groups_changes_nothing(spec, n_q, n_k, pattern,
                                                      monkeypatch):
  """Groups of 2 query blocks (a scan of several steps and a shorter last
  group) give the same outputs and gradients as one group of all blocks."""
  del pattern
  q, k, v = _inputs(n_q, n_k)
  ql, kl = _lengths(n_q, n_k)
  # A new jitted function per setting: SEGMENT_ROWS is read when tracing.
  fn = lambda: _with_grads(lambda q, k, v: av.attend(
      q, k, v, spec, causal=True, q_lengths=ql, kv_lengths=kl))(q, k, v)
  monkeypatch.setattr(blocksparse, 'SEGMENT_ROWS', 10**6)
  one_group = fn()
  monkeypatch.setattr(blocksparse, 'SEGMENT_ROWS',
                      2 * spec[spec['kind']]['block_size'])
  _assert_close(fn(), one_group)


def test_reference_implementation_is_dense_attention_under_the_pattern():
  n_q, n_k = 30, 37
  q, k, v = _inputs(n_q, n_k)
  ql, kl = _lengths(n_q, n_k)
  spec = kit.spec('sparse', pattern='strided', block_size=4)
  spec['implementation'] = 'reference'
  expected = _expected_mask(_strided_pattern(n_q, n_k, 4), ql, kl, True)
  out = _jit(lambda q, k, v: av.attend(
      q, k, v, spec, causal=True, q_lengths=ql, kv_lengths=kl))(q, k, v)
  want = full.probs_times_v(full.dense_probs(q, k, expected), v, q.dtype)
  np.testing.assert_allclose(out, want, atol=ATOL)


def test_bigbird_random_blocks_avoid_window_and_global_blocks():
  n_blocks, num_global, num_random = 24, 3, 4
  ids, valid = bigbird.random_blocks(5, HEADS, n_blocks, num_global,
                                    num_random)
  front, back = 2, 1  # ceil(3 / 2) leading, floor(3 / 2) trailing
  assert ids.shape == (HEADS, n_blocks - front - back, num_random)
  assert valid.all()  # 21 middle blocks leave >= 18 candidates each
  for h in range(HEADS):
    for row in range(ids.shape[1]):
      a = row + front
      picks = ids[h, row]
      assert len(set(picks.tolist())) == num_random
      for m in picks:
        assert abs(int(m) - a) > 1, (h, a, m)
        assert front <= m < n_blocks - back, (h, a, m)


def test_bigbird_random_blocks_take_all_candidates_when_too_few():
  ids, valid = bigbird.random_blocks(0, 1, 7, 2, 9)  # middle blocks 1..5
  for row, a in enumerate(range(1, 6)):
    picked = set(ids[0, row][valid[0, row]].tolist())
    assert picked == {m for m in range(1, 6) if abs(m - a) > 1}


def test_bigbird_random_blocks_fixed_per_seed_and_differ_across_heads():
  first = bigbird.random_blocks(11, HEADS, 32, 2, 3)[0]
  bigbird.random_blocks.cache_clear()
  np.testing.assert_array_equal(first, bigbird.random_blocks(11, HEADS, 32, 2,
                                                            3)[0])
  assert any((first[h] != first[0]).any() for h in range(1, HEADS))
  assert (first != bigbird.random_blocks(12, HEADS, 32, 2, 3)[0]).any()


def test_bigbird_ignores_rng_and_its_heads_differ():
  q, k, v = _inputs(64, 64, batch=1)
  spec = kit.spec('bigbird', block_size=4, num_random=2, seed=1)
  weights = _jit(lambda rng: av.attention_weights(q, k, v, spec, rng=rng))
  w = np.asarray(weights(jax.random.PRNGKey(0)))
  np.testing.assert_array_equal(w, weights(jax.random.PRNGKey(1)))
  support = w[0] > 0
  assert any((support[h] != support[0]).any() for h in range(1, HEADS))


def test_bfloat16_inputs_give_bfloat16_outputs():
  q, k, v = _inputs(24, 24, batch=1)
  spec = kit.spec('sparse', pattern='strided', block_size=4)
  attend = _jit(lambda q, k, v: av.attend(q, k, v, spec, causal=True))
  out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), attend(q, k, v),
                             atol=0.05)


@pytest.mark.parametrize('kind,params,message', [
    ('sparse', {'pattern': 'dense'}, 'attention.sparse.pattern'),
    ('sparse', {'block_size': 0}, 'attention.sparse.block_size'),
    ('sparse', {'block_size': 2.5}, 'attention.sparse.block_size'),
    ('sparse', {'num_summary': 0}, 'attention.sparse.num_summary'),
    ('sparse', {'pattern': 'fixed', 'block_size': 4, 'num_summary': 5},
     r'attention.sparse.num_summary=5 .*\[1, block_size=4\]'),
    ('bigbird', {'block_size': 0}, 'attention.bigbird.block_size'),
    ('bigbird', {'num_random': -1}, 'attention.bigbird.num_random'),
    ('bigbird', {'num_global': -1}, 'attention.bigbird.num_global'),
    ('bigbird', {'seed': -1}, r'attention.bigbird.seed=-1 .*2\*\*32'),
    ('bigbird', {'seed': True}, 'attention.bigbird.seed'),
])
def test_bad_parameters_raise_value_error(kind, params, message):
  kit.assert_bad_params_raise(kit.spec(kind, **params), message)


def test_strided_ignores_num_summary():
  av.validate(kit.spec('sparse', pattern='strided', block_size=4,
                    num_summary=64))
