"""Reformer LSH attention: dense limits, the hashed pattern, rng and params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import full
from attention_variants import lsh
from attention_variants import masks

FULL = kit.REFERENCE
B, N, H, KV, D = 3, 12, 4, 2, 8
# Batch row 1 has no valid key at all; row 2 has fewer keys than queries.
Q_LENGTHS = jnp.array([12, 7, 12])
KV_LENGTHS = jnp.array([12, 0, 5])


def _spec(implementation='auto', **params):
  # Separate queries and keys unless a test asks for shared QK (the default).
  params.setdefault('shared_qk', False)
  return {'kind': 'lsh', 'implementation': implementation, 'lsh': params}


def _inputs(n_q=N, n_k=N, dtype=jnp.float32, seed=0):
  return kit.inputs(n_q, n_k, batch=B, heads=H, kv_heads=KV, head_dim=D,
                    seed=seed, dtype=dtype)


def _outputs_and_grads(fns, q, k, v):
  """[(out, (dq, dk, dv)) for fn in fns] with a fixed random cotangent."""
  return kit.outputs_and_grads(fns, q, k, v, seed=9)


def _run(fns, q, k, v):
  """[fn(q, k, v) for fn in fns] under one jax.jit."""
  return jax.jit(lambda q, k, v: [fn(q, k, v) for fn in fns])(q, k, v)


def _attend(spec, **kw):
  return lambda q, k, v: av.attend(q, k, v, spec, **kw)


def _weights(spec, **kw):
  return lambda q, k, v: av.attention_weights(q, k, v, spec, **kw)


def _assert_close(got, want, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol,
                             rtol=1e-5)


# Parameters under which every query sees every key in every round: one
# bucket and one chunk, or real hashing into two chunks (own + previous chunk
# cover the whole sorted order).
DENSE_LIMITS = [
    dict(n_buckets=1, bucket_size=16, n_hashes=2),
    dict(n_buckets=4, bucket_size=6, n_hashes=3),
]


@pytest.mark.parametrize('params', DENSE_LIMITS)
def test_dense_limit_output_and_gradients(params):
  q, k, v = _inputs()
  fns = []
  for causal in (False, True):
    kw = dict(causal=causal, q_lengths=Q_LENGTHS, kv_lengths=KV_LENGTHS,
              rng=jax.random.PRNGKey(3))
    fns += [_attend(_spec(**params), **kw), _attend(FULL, **kw)]
  results = _outputs_and_grads(fns, q, k, v)
  for (out, grads), (want, want_grads) in zip(results[::2], results[1::2]):
    _assert_close(out, want)
    for g, wg in zip(grads, want_grads):
      assert np.isfinite(np.asarray(g)).all()
      _assert_close(g, wg)
    assert not np.asarray(out[1]).any()  # no valid key: exact zeros


def test_dense_limit_cross_attention_lengths_differ():
  q, _, _ = _inputs(n_q=10)
  _, k, v = _inputs(n_k=14, seed=1)
  kw = dict(causal=True, q_lengths=jnp.array([10, 4, 9]),
            kv_lengths=jnp.array([14, 14, 3]))
  out, want = _run([_attend(_spec(n_buckets=1, bucket_size=64), **kw),
                    _attend(FULL, **kw)], q, k, v)
  assert out.shape == q.shape
  _assert_close(out, want)


def _shared_qk_dense(*, causal, q_lengths, kv_lengths):
  """Dense shared-QK attention: keys are q rescaled to RMS 1; a token sees
  itself only when no other key is visible to it."""
  def attend(q, k, v):
    del k
    keys = q * jax.lax.rsqrt(jnp.mean(q * q, axis=-1, keepdims=True) + 1e-6)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, keys) / np.sqrt(D)
    mask = full.full_mask(q, q, causal=causal, q_lengths=q_lengths,
                          kv_lengths=kv_lengths)
    self_ = jnp.eye(q.shape[1], dtype=bool)
    has_other = jnp.any(mask & ~self_, axis=-1, keepdims=True)
    probs = masks.masked_softmax(scores, mask & (~self_ | ~has_other))
    return full.probs_times_v(probs, v, q.dtype)
  return attend


def test_shared_qk_dense_limit_excludes_self():
  q, k, v = _inputs()
  spec = _spec(n_buckets=1, bucket_size=N, shared_qk=True)
  fns = []
  for causal in (False, True):
    kw = dict(causal=causal, q_lengths=Q_LENGTHS, kv_lengths=KV_LENGTHS)
    fns += [_attend(spec, **kw), _shared_qk_dense(**kw)]
  results = _outputs_and_grads(fns, q, k, v)
  for (out, grads), (want, want_grads) in zip(results[::2], results[1::2]):
    _assert_close(out, want)
    _assert_close(grads[0], want_grads[0])
    _assert_close(grads[2], want_grads[2])
    assert not np.asarray(grads[1]).any()  # k is ignored under shared QK
  causal_out = results[2][0]  # query 0 sees only itself: its own value
  _assert_close(causal_out[0, 0], jnp.repeat(v[0, 0], H // KV, axis=0))


def _numpy_pattern(q, k, rot, params, q_lengths, kv_lengths):
  """bool [b, h, n, n]: key j in query i's chunk or the previous chunk of the
  sorted order in some round, recomputed with numpy from the rotations."""
  q, k, rot = (np.asarray(x, np.float64) for x in (q, k, rot))
  b, n, h, _ = q.shape
  group = h // k.shape[2]
  c = params['bucket_size']
  n_chunks = n // c
  n_buckets = params['n_buckets']

  def buckets(x, rot_r, length):
    ids, start, stride = np.zeros(n, np.int64), 0, 1
    for f in lsh.hash_factors(n_buckets):
      proj = x @ rot_r[:, start:start + f // 2]
      ids += stride * np.argmax(np.concatenate([proj, -proj], -1), -1)
      start, stride = start + f // 2, stride * f
    ids[length:] = n_buckets
    return ids

  def chunk_of(ids):
    rank = np.empty(n, np.int64)
    rank[np.argsort(ids, kind='stable')] = np.arange(n)
    return rank // c

  pattern = np.zeros((b, h, n, n), bool)
  for bi in range(b):
    for hi in range(h):
      for r in range(params['n_hashes']):
        rot_r = rot[r, hi // group]
        qc = chunk_of(buckets(q[bi, :, hi], rot_r, q_lengths[bi]))
        kc = chunk_of(buckets(k[bi, :, hi // group], rot_r, kv_lengths[bi]))
        pattern[bi, hi] |= ((kc[None, :] == qc[:, None])
                            | (kc[None, :] == (qc[:, None] - 1) % n_chunks))
  return pattern


@pytest.mark.parametrize('n_buckets', [8, 144])  # 144: two hash factors
def test_weights_follow_the_hashed_chunks(n_buckets):
  n = 32
  params = dict(av.defaults('lsh'), n_buckets=n_buckets, bucket_size=4,
                shared_qk=False)
  q, k, v = _inputs(n_q=n, n_k=n)
  lengths = np.array([32, 20, 27])
  rng = jax.random.PRNGKey(11)
  kw = dict(q_lengths=jnp.asarray(lengths), kv_lengths=jnp.asarray(lengths),
            rng=rng)
  weights = _run([_weights(_spec(**params), causal=causal, **kw)
                  for causal in (False, True)], q, k, v)
  rot = lsh.rotations(rng, params, KV, D, n_buckets)
  pattern = _numpy_pattern(q, k, rot, params, lengths, lengths)
  assert not pattern.all()  # the hashing really restricts attention
  pos = np.arange(n)
  valid = ((pos[None, :, None] < lengths[:, None, None])
           & (pos[None, None, :] < lengths[:, None, None]))[:, None]
  for causal, w in zip((False, True), weights):
    w = np.asarray(w)
    allowed = valid & (pos[None, :] <= pos[:, None]) if causal else valid
    np.testing.assert_array_equal(w > 0, pattern & allowed)
    sums = w.sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
    if not causal:  # every valid query has valid keys in its chunks
      rows = np.broadcast_to(valid.any(-1), sums.shape)
      np.testing.assert_allclose(sums[rows], 1.0, atol=1e-5)


# step_rows: query rows per loop step of the chunked path. 24 tokens in
# 4-token chunks are 6 chunks: one step (512), 3 steps of 2 chunks (8), or a
# step of 4 chunks and a shorter one of 2 (16).
@pytest.mark.parametrize('causal, shared_qk, step_rows', [
    pytest.param(False, False, 512, marks=pytest.mark.slow),
    (True, True, 512), (True, False, 16), (False, True, 8)])
def test_chunked_matches_dense_pattern_reference(causal, shared_qk, step_rows,
                                                 monkeypatch):
  """The chunked path equals an O(N^2) computation of the same pattern."""
  monkeypatch.setattr(lsh, 'STEP_ROWS', step_rows)
  n = 24
  q, k, v = _inputs(n_q=n, n_k=n)
  params = dict(n_buckets=6, bucket_size=4, n_hashes=3, shared_qk=shared_qk)
  kw = dict(causal=causal, q_lengths=jnp.array([24, 13, 24]),
            kv_lengths=jnp.array([24, 13, 0]), rng=jax.random.PRNGKey(4))
  chunked, spec_ref = _spec(**params), _spec('reference', **params)
  (out, grads), (want, want_grads) = _outputs_and_grads(
      [_attend(chunked, **kw), _attend(spec_ref, **kw)], q, k, v)
  _assert_close(out, want)
  for g, wg in zip(grads, want_grads):
    _assert_close(g, wg)
  w, w_ref = _run([_weights(chunked, **kw), _weights(spec_ref, **kw)], q, k, v)
  _assert_close(w, w_ref)
  # attend uses exactly the probabilities attention_weights reports.
  _assert_close(out, full.probs_times_v(w, v, q.dtype))
  if shared_qk:  # a token always has itself as a candidate: rows sum to 1
    np.testing.assert_allclose(np.asarray(w.sum(-1))[0], 1.0, atol=1e-5)
  assert not np.asarray(out[2]).any()


def test_rng_controls_the_hashing():
  q, k, v = _inputs(n_q=32, n_k=32)
  spec = _spec(n_buckets=8, bucket_size=4, seed=5)
  attend = jax.jit(lambda q, k, v, rng: av.attend(q, k, v, spec, rng=rng))
  a = attend(q, k, v, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, attend(q, k, v, jax.random.PRNGKey(1)))
  assert not np.allclose(a, attend(q, k, v, jax.random.PRNGKey(2)))
  # rng=None: rotations from PRNGKey(seed), the same at every call.
  other_seed = _spec(n_buckets=8, bucket_size=4, seed=6)
  e, e_again, e_other = _run([_attend(spec), _attend(spec),
                              _attend(other_seed)], q, k, v)
  np.testing.assert_array_equal(e, e_again)
  _assert_close(e, attend(q, k, v, jax.random.PRNGKey(5)))
  assert not np.allclose(e, e_other)


def test_bfloat16_inputs_give_bfloat16_close_to_float32():
  q, k, v = _inputs()
  kw = dict(causal=True, q_lengths=Q_LENGTHS, kv_lengths=KV_LENGTHS)
  fn = _attend(_spec(n_buckets=4, bucket_size=4), **kw)
  out, want = jax.jit(lambda q, k, v: [
      fn(*(x.astype(jnp.bfloat16) for x in (q, k, v))), fn(q, k, v)])(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=0.05)


def test_hash_factors_and_automatic_bucket_count():
  assert lsh.hash_factors(32) == (32,)
  assert lsh.hash_factors(64) == (8, 8)
  assert lsh.hash_factors(256) == (16, 16)
  assert lsh.hash_factors(512) == (16, 32)
  assert lsh.hash_factors(130) == (130,)  # no two even factors
  params = dict(av.defaults('lsh'))
  assert lsh.geometry(8192, 8192, params) == lsh.Geometry(64, 128, 8192, 256)
  assert lsh.geometry(100, 100, params) == lsh.Geometry(64, 2, 128, 4)
  assert lsh.geometry(10, 10, params).n_buckets == 2
  assert lsh.geometry(65 * 64, 10, params).n_buckets == 132  # rounded to 4k


@pytest.mark.parametrize('bad', [
    dict(n_hashes=0), dict(n_hashes=1.5), dict(bucket_size=0),
    dict(n_buckets=3), dict(n_buckets=-2), dict(shared_qk='yes'),
    dict(seed=-1),
])
def test_bad_params_raise(bad):
  kit.assert_bad_params_raise(_spec(**bad), f'lsh.{next(iter(bad))}')


def test_shared_qk_needs_equal_lengths():
  q, _, _ = _inputs(n_q=8)
  _, k, v = _inputs(n_k=12)
  with pytest.raises(ValueError, match='shared_qk'):
    av.attend(q, k, v, _spec(shared_qk=True))
