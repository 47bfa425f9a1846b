"""Nystromformer (Xiong et al. 2021): the iterative pseudo-inverse against
numpy's, the landmarks as segment means of the valid positions, attend and
weights against F pinv(A) B written out here from
attention_variants/nystromformer.py's docstring (in float64), the full
softmax limit m >= N, padding invariance, finite gradients, causal
rejected."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import nystromformer

_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


# Nystromformer's inputs: unit scale, the last row with 3 keys.
_inputs = functools.partial(kit.padded_inputs, scale=1.0,
                            kv_lengths=(21, 0, 9, 3))


def _spec(**params):
  return kit.spec('nystromformer', **params)


def _softmax_masked(s, rows, cols):
  s = np.where(rows[:, None] & cols[None, :], s, -np.inf)
  top = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
  den = e.sum(-1, keepdims=True)
  return np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)


def _landmarks(x, length, m):
  """Segment means of x[:length] ([n, d]) by a Python loop over segments;
  (means [m, d], nonempty [m])."""
  means, ok = np.zeros((m, x.shape[-1])), np.zeros(m, bool)
  for j in range(m):
    lo, hi = (j * length) // m, ((j + 1) * length) // m
    if hi > lo:
      means[j], ok[j] = x[lo:hi].mean(0), True
  return means, ok


def _pinv_np(a, iterations):
  z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max() or 1.0)
  eye = np.eye(a.shape[0])
  for _ in range(iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def _dense(q, k, ql, kl, m, iterations):
  """F pinv(A) B per batch row and query head, float64: [b, h, n_q, n_k]."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, n_q, h, d = q.shape
  n_k, groups = k.shape[1], h // k.shape[2]
  out = np.zeros((b, h, n_q, n_k))
  for i in range(b):
    q_valid, k_valid = np.arange(n_q) < ql[i], np.arange(n_k) < kl[i]
    for head in range(h):
      qh, kh = q[i, :, head], k[i, :, head // groups]
      mq, mk = min(m, n_q), min(m, n_k)
      q_land, q_ok = _landmarks(qh, int(ql[i]), mq)
      k_land, k_ok = _landmarks(kh, int(kl[i]), mk)
      s = 1 / np.sqrt(d)
      f = _softmax_masked(qh @ k_land.T * s, q_valid, k_ok)
      a = _softmax_masked(q_land @ k_land.T * s, q_ok, k_ok)
      bb = _softmax_masked(q_land @ kh.T * s, q_ok, k_valid)
      out[i, head] = f @ _pinv_np(a, iterations) @ bb
  return out


def _times_v(w, v):
  vr = np.repeat(np.asarray(v, np.float64), w.shape[1] // v.shape[2], axis=2)
  return np.einsum('bhqs,bshd->bqhd', w, vr)


def _well_conditioned_softmax(shape, seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape)
  diag = np.arange(min(shape[-2:]))
  s[..., diag, diag] += 5.0
  a = np.asarray(jax.nn.softmax(jnp.asarray(s, jnp.float32), -1))
  sv = np.linalg.svd(a.astype(np.float64), compute_uv=False)
  assert (sv[..., 0] / sv[..., -1]).max() < 10  # the premise
  return a


@pytest.mark.parametrize('shape', [(3, 16, 16), (3, 8, 5), (3, 5, 8)])
def test_pinv_matches_numpy_on_a_well_conditioned_softmax(shape):
  """6 iterations (the default) reach float32 rounding at condition < 10;
  at condition ~170 (16 x 16, diagonal + 3) 12 were needed (measured)."""
  a = _well_conditioned_softmax(shape)
  z = np.asarray(_jit(lambda a: nystromformer.pinv(a, 6))(a))
  want = np.linalg.pinv(a.astype(np.float64))
  np.testing.assert_allclose(z, want, atol=1e-5)


def test_pinv_keeps_empty_landmarks_out():
  """Zero rows and columns of A (empty landmarks) stay zero: pinv of the
  non-empty block, padded with zeros."""
  a = _well_conditioned_softmax((6, 6))
  padded = np.zeros((8, 9), np.float32)
  padded[:6, :6] = a
  z = np.asarray(nystromformer.pinv(jnp.asarray(padded), 6))
  want = np.zeros((9, 8))
  want[:6, :6] = np.linalg.pinv(a.astype(np.float64))
  np.testing.assert_allclose(z, want, atol=1e-5)


@pytest.mark.parametrize('n,length,m', [
    (12, 12, 4), (12, 12, 5), (13, 10, 4), (9, 3, 5), (7, 0, 3), (6, 6, 6)])
def test_landmarks_are_segment_means_of_valid_positions(n, length, m):
  x = np.random.default_rng(0).normal(size=(1, n, 3)).astype(np.float32)
  means, ok = nystromformer.segment_means(jnp.asarray(x),
                                          jnp.asarray([length]), m)
  want, want_ok = _landmarks(x[0].astype(np.float64), length, m)
  np.testing.assert_array_equal(ok[0], want_ok)
  assert int(ok.sum()) == min(m, length)
  np.testing.assert_allclose(np.asarray(means[0])[want_ok], want[want_ok],
                             atol=1e-6)


@pytest.mark.parametrize('m,n_q,n_k,kv_heads', [
    (4, 21, 21, 2),    # m does not divide 21
    (7, 21, 21, 4),    # divides it; no GQA
    (5, 13, 22, 1),    # more keys than queries
    (8, 22, 13, 2),    # more queries than keys; row 3 has 3 < m keys
])
def test_matches_dense_f_pinv_a_b(m, n_q, n_k, kv_heads):
  q, k, v, ql, kl = _inputs(n_q, n_k, kv_heads)
  spec = _spec(num_landmarks=m)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  loss = lambda q, k, v: jnp.sum(av.attend(q, k, v, spec, **kw) ** 2)
  w, out, grads = _jit(lambda q, k, v: (
      av.attention_weights(q, k, v, spec, **kw), av.attend(q, k, v, spec, **kw),
      jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)
  want = _dense(q, k, np.asarray(ql), np.asarray(kl), m, 6)
  assert w.shape == (4, 4, n_q, n_k) and w.dtype == jnp.float32
  scale = np.abs(want).max()
  np.testing.assert_allclose(w, want, atol=1e-4 * scale)
  np.testing.assert_allclose(out, _times_v(want, v), atol=1e-4 * scale)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  out = np.asarray(out)
  assert not out[1].any()  # no valid key
  assert not out[2, int(ql[2]):].any()  # padded query rows
  reference = av.attend(q, k, v, kit.spec('nystromformer', 'reference',
                                          num_landmarks=m), **kw)
  np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize('iterations,atol', [(6, 0.05), (20, 1e-3)])
def test_weights_rows_sum_to_about_one(iterations, atol):
  """Exactly 1 only once pinv(A) has converged to A's inverse (then A^-1 1
  = 1); 6 iterations left rows off by up to 0.037 here (measured)."""
  q, k, v, ql, kl = _inputs(21, 21)
  w = np.asarray(av.attention_weights(
      q, k, v, _spec(num_landmarks=4, pinv_iterations=iterations),
      q_lengths=ql, kv_lengths=kl))
  sums = w.sum(-1)  # [b, h, n_q]
  has_key = ((np.arange(21)[None, :] < np.asarray(ql)[:, None])
             & (np.asarray(kl)[:, None] > 0))[:, None]
  np.testing.assert_allclose(sums, np.broadcast_to(has_key, sums.shape),
                             atol=atol)


@pytest.mark.parametrize('m', [12, 64], ids=['m=N', 'm>N_clamped'])
def test_full_attention_limit(m):
  """m >= N: every token is a landmark, F = A = B = softmax, out = P
  pinv(P) P V = P V. The softmax matrices here have condition ~1.5e3-2.7e3;
  6 iterations leave output errors ~0.03 (measured), 20 reach ~1e-5 in the
  output and ~7e-4 in the gradients (float32 rounding amplified by the
  conditioning; more iterations do not help)."""
  q, k, v = kit.inputs(12, 12, batch=3, heads=4, kv_heads=2, head_dim=8)
  ql = jnp.asarray([12, 9, 1], jnp.int32)
  kw = dict(q_lengths=ql, kv_lengths=ql)
  spec = _spec(num_landmarks=m, pinv_iterations=20)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, **kw),
      lambda q, k, v: kit.reference(q, k, v, **kw)], q, k, v, jit=_jit)
  kit.assert_close(got[0], want[0], atol=5e-5)
  for g, w in zip(got[1], want[1]):
    kit.assert_close(g, w, atol=2e-3)
  few = av.attend(q, k, v, _spec(num_landmarks=m), **kw)
  assert np.abs(np.asarray(few) - np.asarray(want[0])).max() < 0.1


def test_padding_changes_nothing():
  """A row of L valid tokens padded to N (with any values) gives the output
  of the same L tokens unpadded."""
  q, k, v, _, _ = _inputs(20, 20, scale=0.7)
  length = 13
  lengths = jnp.full((4,), length, jnp.int32)
  spec = _spec(num_landmarks=5)
  noise = jnp.asarray(np.random.default_rng(3).normal(size=q.shape) * 9,
                      jnp.float32)
  padded = lambda x, n: x.at[:, length:].set(n[:, length:, :x.shape[2]])
  run = _jit(lambda q, k, v: av.attend(q, k, v, spec, q_lengths=lengths,
                                       kv_lengths=lengths))
  a = run(q, k, v)
  b = run(padded(q, noise), padded(k, noise), padded(v, noise))
  c = _jit(lambda q, k, v: av.attend(q, k, v, spec))(
      q[:, :length], k[:, :length], v[:, :length])
  np.testing.assert_allclose(a[:, :length], b[:, :length], atol=1e-6)
  np.testing.assert_allclose(a[:, :length], c, atol=1e-5)
  assert not np.asarray(a[:, length:]).any()


def test_causal_is_rejected():
  q, k, v, _, _ = _inputs(5, 5)
  for fn in (av.attend, av.attention_weights):
    with pytest.raises(ValueError, match='nystromformer is bidirectional '
                                         'only.*no causal form'):
      fn(q, k, v, _spec(), causal=True)


def test_no_lengths_and_low_precision():
  q, k, v, _, _ = _inputs(19, 19, dtype=jnp.bfloat16)
  out = _jit(lambda q, k, v: av.attend(q, k, v, _spec(num_landmarks=4)))(
      q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = av.attend(*f32, _spec(num_landmarks=4))
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=5e-2)


@pytest.mark.parametrize('name,value', [
    ('num_landmarks', 0), ('num_landmarks', 2.5), ('pinv_iterations', 0),
    ('pinv_iterations', True)])
def test_bad_params_raise(name, value):
  spec = _spec(**{name: value})
  with pytest.raises(ValueError, match=rf'attention.nystromformer.{name}='
                                       rf'{value!r}.*>= 1'):
    av.validate(spec)
  q, k, v, _, _ = _inputs(5, 5)
  with pytest.raises(ValueError, match=name):
    av.attend(q, k, v, spec)



def test_backward_memory_is_linear_in_length():
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads, spec = 1024, 2, _spec(num_landmarks=16)
  kit.assert_backward_memory_is_linear(spec, causal=False, n=n, heads=heads)
