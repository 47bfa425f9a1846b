"""Performer (FAVOR+, Choromanski et al. 2021): the kernel estimate is
unbiased, the attention approaches dense softmax as the number of features
grows, attend equals a dense computation of the same normalised
random-feature kernel written out here from attention_variants/performer.py's
docstring (outputs and gradients, causal and bidirectional, padding, GQA,
chunks that do not divide the length), features are fixed by the seed and
redrawn from the rng, and each block of directions is orthogonal."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import linear
from attention_variants import performer

ATOL = 1e-5
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _spec(**params):
  return kit.spec('performer', **params)


def _phi(x, w):
  """The definition: exp(w . x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4);
  x [b, n, h, d], w [h, m, d] (one matrix per head) -> [b, n, h, m]."""
  x = x * x.shape[-1] ** -0.25
  e = jnp.einsum('bnhd,hmd->bnhm', x, w) - 0.5 * jnp.sum(x * x, -1,
                                                         keepdims=True)
  return jnp.exp(e) / np.sqrt(w.shape[1])



def _dense_kernel(q, k, w, ql, kl, causal):
  """[b, h, n_q, n_k]: phi(q_i) . phi(k_j), masked, rows normalised; the
  query heads of a group use their kv head's matrix."""
  groups = q.shape[2] // k.shape[2]
  wq = jnp.repeat(w, groups, axis=0)
  kr = jnp.repeat(k, groups, axis=2)
  a = jnp.einsum('bqhm,bshm->bhqs', _phi(q, wq), _phi(kr, wq))
  a = jnp.where(kit.visible(q.shape[1], k.shape[1], ql, kl, causal), a, 0.0)
  den = a.sum(-1, keepdims=True)
  return jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 0.0)


def _dense(q, k, v, w, ql, kl, causal):
  a = _dense_kernel(q, k, w, ql, kl, causal)
  vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  return jnp.einsum('bhqs,bshd->bqhd', a, vr)


def test_kernel_estimate_is_unbiased():
  """Mean over 2000 draws of phi(q) . phi(k) is exp(q . k / sqrt(d)) within
  4 standard errors, for a few fixed pairs (one kv head, m = 6: one full
  orthogonal block of d = 4 rows and a cut one)."""
  d, m, draws = 4, 6, 2000
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 5, 1, d)) * 0.8, jnp.float32)
  y = jnp.asarray(rng.normal(size=(1, 5, 1, d)) * 0.8, jnp.float32)

  @jax.jit
  def estimates(keys):
    def one(key):
      w = performer.projections(key, m, d, 1)
      return jnp.sum(_phi(x, w) * _phi(y, w), -1)[0, :, 0]  # [5]
    return jax.vmap(one)(keys)

  est = np.asarray(estimates(jax.random.split(jax.random.PRNGKey(0), draws)))
  want = np.exp(np.sum(np.asarray(x) * np.asarray(y), -1)[0, :, 0]
                / np.sqrt(d))
  mean = est.mean(0)
  stderr = est.std(0, ddof=1) / np.sqrt(draws)
  assert (stderr > 0).all()
  np.testing.assert_array_less(np.abs(mean - want), 4 * stderr)
  assert (est > 0).all()  # positive features: a positive estimate


def test_error_against_softmax_falls_with_more_features():
  q, k, v = kit.inputs(12, 12, batch=2, heads=4, kv_heads=2, head_dim=8,
                       scale=0.5)
  want = kit.reference(q, k, v)

  def error(m):
    run = _jit(lambda q, k, v: jnp.stack([
        jnp.sqrt(jnp.mean((av.attend(q, k, v, _spec(num_features=m,
                                                     seed=s)) - want) ** 2))
        for s in range(4)]))
    return float(np.mean(run(q, k, v)))

  errors = [error(m) for m in (16, 256, 4096)]
  # Measured: about 0.098, 0.025, 0.0088 (the estimate's error ~ 1/sqrt(m)).
  assert errors[1] < 0.7 * errors[0], errors
  assert errors[2] < 0.7 * errors[1], errors
  assert errors[2] < 0.02, errors


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('chunk,n_q,n_k,kv_heads,m', [
    # chunk divides the length: 3 chunks
    pytest.param(7, 21, 21, 2, 16, marks=pytest.mark.slow),
    (4, 21, 21, 2, 20),   # does not: padded to 24; m not a multiple of d
    # chunk clamped to one; m < d; no GQA
    pytest.param(64, 21, 21, 4, 5, marks=pytest.mark.slow),
    # more keys than queries
    pytest.param(5, 13, 22, 1, 12, marks=pytest.mark.slow),
    (3, 22, 13, 2, 8),    # more queries than keys
])
def test_matches_dense_kernel_attention(chunk, n_q, n_k, kv_heads, m,
                                        causal, monkeypatch):
  # Bidirectional attention works in blocks of linear.ROW_BLOCK rows (256);
  # set to the chunk, so both paths see dividing, padded and clamped blocks.
  monkeypatch.setattr(linear, 'ROW_BLOCK', chunk)
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads)
  spec = _spec(chunk=chunk, num_features=m)
  key = jax.random.PRNGKey(3)
  w = performer.projections(key, m, 8, kv_heads)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, causal=causal, q_lengths=ql,
                                kv_lengths=kl, rng=key),
      lambda q, k, v: _dense(q, k, v, w, ql, kl, causal)], q, k, v, jit=_jit)
  # rtol: float32 rounding of gradients up to ~7 (1e-5 absolute at 1e-6
  # relative was seen).
  kit.assert_close(got, want, atol=ATOL, rtol=1e-5)
  out = np.asarray(got[0])
  assert not out[1].any()  # the batch row without keys
  assert not out[2, int(ql[2]):].any()  # padded query rows


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_weights_are_the_kernel_attend_uses(causal):
  q, k, v, ql, kl = kit.padded_inputs(13, 22, kv_heads=2)
  spec = _spec(chunk=4, num_features=16)
  key = jax.random.PRNGKey(7)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl, rng=key)
  run = _jit(lambda q, k, v: (
      av.attention_weights(q, k, v, spec, **kw), av.attend(q, k, v, spec, **kw),
      av.attend(q, k, v, kit.spec('performer', 'reference', chunk=4,
                                  num_features=16), **kw)))
  a, out, reference = run(q, k, v)
  assert a.shape == (4, 4, 13, 22) and a.dtype == jnp.float32
  w = performer.projections(key, 16, 8, 2)
  np.testing.assert_allclose(a, _dense_kernel(q, k, w, ql, kl, causal),
                             atol=1e-6)
  has_key = kit.visible(13, 22, ql, kl, causal).any(-1)
  np.testing.assert_allclose(a.sum(-1), np.broadcast_to(has_key, (4, 4, 13)),
                             atol=1e-6)
  vr = jnp.repeat(v, 2, axis=2)
  np.testing.assert_allclose(out, jnp.einsum('bhqs,bshd->bqhd', a, vr),
                             atol=ATOL)
  np.testing.assert_allclose(out, reference, atol=ATOL)


def _dense_float64(q, k, v, w, ql, kl, causal):
  """_dense in float64 and in log space (log of phi(q_i) . phi(k_j) by a
  log-sum-exp over the features), so nothing underflows."""
  q, k, v, w = [np.asarray(x, np.float64) for x in (q, k, v, w)]
  groups = q.shape[2] // k.shape[2]
  wq = np.repeat(w, groups, 0)

  def exponent(x):
    x = x * x.shape[-1] ** -0.25
    return (np.einsum('bnhd,hmd->bnhm', x, wq)
            - 0.5 * np.sum(x * x, -1, keepdims=True))
  s = (exponent(q)[:, :, None] + exponent(np.repeat(k, groups, 2))[:, None])
  top = s.max(-1, keepdims=True)
  log_a = (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]
  log_a = np.where(kit.visible(q.shape[1], k.shape[1], ql, kl, causal),
                   log_a.transpose(0, 3, 1, 2), -np.inf)
  top = log_a.max(-1, keepdims=True)
  a = np.exp(log_a - np.where(np.isfinite(top), top, 0.0))
  den = a.sum(-1, keepdims=True)
  a = np.where(den > 0, a / np.where(den > 0, den, 1.0), 0.0)
  return np.einsum('bhqs,bshd->bqhd', a, np.repeat(v, groups, 2))


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_the_shifts_keep_a_large_query_exact(causal):
  """One query of norm ~30x the others: exp(-|q'|^2 / 2) underflows in
  float32, so the unshifted features give that row zeros; the shifted ones
  still give the kernel's output (checked in float64), gradients finite."""
  q, k, v, ql, kl = kit.padded_inputs(9, 9, kv_heads=2)
  q = q.at[0, 3].multiply(30.0)
  key = jax.random.PRNGKey(0)
  w = performer.projections(key, 16, 8, 2)
  spec = _spec(num_features=16, chunk=4)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl, rng=key)
  loss = lambda q, k, v: jnp.sum(av.attend(q, k, v, spec, **kw) ** 2)
  out, grads = _jit(lambda q, k, v: (av.attend(q, k, v, spec, **kw),
                                     jax.grad(loss, argnums=(0, 1, 2))(
                                         q, k, v)))(q, k, v)
  want = _dense_float64(q, k, v, w, ql, kl, causal)
  assert np.abs(want[0, 3]).max() > 0.1
  assert not np.asarray(_dense(q, k, v, w, ql, kl, causal))[0, 3].any()
  np.testing.assert_allclose(out, want, atol=ATOL)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_features_fixed_by_seed_and_redrawn_from_rng():
  q, k, v, ql, kl = kit.padded_inputs(10, 10)

  @_jit
  def outs(q, k, v):
    kw = dict(q_lengths=ql, kv_lengths=kl)
    a = jax.random.PRNGKey(1)
    b = jax.random.key(2)  # a typed key, as the trainer passes
    return [
        av.attend(q, k, v, _spec(seed=5), **kw),
        av.attend(q, k, v, _spec(seed=5), **kw),
        av.attend(q, k, v, _spec(seed=6), **kw),
        av.attend(q, k, v, _spec(seed=5), rng=a, **kw),
        av.attend(q, k, v, _spec(seed=5), rng=b, **kw),
        av.attend(q, k, v, _spec(seed=5, redraw_every=0), rng=a, **kw),
        av.attend(q, k, v, _spec(seed=5), rng=jax.random.PRNGKey(5), **kw),
    ]
  seed5, again, seed6, rng_a, rng_b, fixed, key5 = [np.asarray(x)
                                                    for x in outs(q, k, v)]
  np.testing.assert_array_equal(seed5, again)
  np.testing.assert_array_equal(seed5, fixed)  # redraw_every=0 ignores rng
  np.testing.assert_array_equal(seed5, key5)   # no rng: PRNGKey(seed)
  for other in (seed6, rng_a, rng_b):
    assert np.abs(other - seed5).max() > 1e-3
  assert np.abs(rng_a - rng_b).max() > 1e-3


def test_blocks_are_orthogonal_with_chi_norms():
  d, m, kvh = 8, 4100, 2
  w = np.asarray(performer.projections(jax.random.PRNGKey(0), m, d, kvh),
                 np.float64)
  assert w.shape == (kvh, m, d)
  norms = np.linalg.norm(w, axis=-1)
  u = w / norms[..., None]
  for start in range(0, m, d):
    block = u[:, start:start + d]
    gram = np.einsum('hid,hjd->hij', block, block)
    np.testing.assert_allclose(gram, np.broadcast_to(
        np.eye(block.shape[1]), gram.shape), atol=1e-5)
  # Rows of different blocks are not orthogonal (independent draws).
  assert np.abs(np.einsum('hd,hd->h', u[:, 0], u[:, d])).max() > 1e-3
  # Norms are chi with d degrees of freedom: E|w|^2 = d, Var|w|^2 = 2d.
  sq = norms.ravel() ** 2
  assert abs(sq.mean() - d) < 4 * np.sqrt(2 * d / sq.size)
  assert abs(sq.var() - 2 * d) < 0.15 * 2 * d
  # Directions are not all the same across kv heads.
  assert np.abs(u[0] - u[1]).max() > 1e-2


@pytest.mark.parametrize('shape', [(2, 3, 8, 8), (1, 64, 64), (5, 5)])
def test_householder_qr_is_lapacks_with_the_sign_fix(shape):
  """haar_orthogonal equals jnp.linalg.qr's Q with columns multiplied by
  the signs of R's diagonal (the unique QR with R's diagonal > 0)."""
  g = jax.random.normal(jax.random.PRNGKey(1), shape)
  q, r = np.linalg.qr(np.asarray(g, np.float64))
  want = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
  got = np.asarray(jax.jit(performer.haar_orthogonal)(g))
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_drawing_features_calls_no_kernel_library():
  """Drawing W uses no LAPACK kernel: jaxlib's CPU QR kernels wait on
  XLA's thread pool from inside it, and two at once (two layers in one
  train step) deadlocked 2-core training."""
  q = jnp.zeros((1, 16, 2, 8))
  hlo = jax.jit(lambda q: av.attend(q, q, q, _spec(num_features=20),
                                    rng=jax.random.PRNGKey(0))).lower(
                                        q).compile().as_text()
  calls = [line for line in hlo.splitlines()
           if 'custom-call' in line or 'geqrf' in line or 'orgqr' in line]
  assert not calls, calls[:3]


def test_no_lengths_and_low_precision():
  """bfloat16 in, bfloat16 out, float32 statistics."""
  q, k, v, _, _ = kit.padded_inputs(19, 19, dtype=jnp.bfloat16)
  key = jax.random.PRNGKey(0)
  spec = _spec(chunk=8, num_features=16)
  out = _jit(lambda q, k, v: av.attend(q, k, v, spec, causal=True,
                                       rng=key))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  full_len = jnp.full((4,), 19)
  w = performer.projections(key, 16, 8, 2)
  want = _dense(*f32, w, full_len, full_len, True)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize('name,value,match', [
    ('num_features', 0, r'num_features=0 .*>= 1'),
    ('num_features', 2.5, r'num_features=2.5 .*>= 1'),
    ('redraw_every', 2.0, r'redraw_every=2.0 .*>= 0'),
    ('redraw_every', -1, r'redraw_every=-1 '),
    ('redraw_every', True, r'redraw_every=True '),
    ('seed', -1, r'seed=-1 .*>= 0'),
    ('chunk', 0, r'chunk=0 .*>= 1'),
])
def test_bad_params_raise(name, value, match):
  kit.assert_bad_params_raise(_spec(**{name: value}),
                              rf'attention.performer.{match}')



@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_backward_memory_is_linear_in_length(causal):
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads, spec = 1024, 2, _spec(chunk=16, num_features=16)
  kit.assert_backward_memory_is_linear(spec, causal=causal, n=n, heads=heads)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_no_feature_array_for_the_whole_sequence(causal):
  """Features exist a block of rows at a time: the forward pass's memory at
  N = 8192 with m = 256 stays below ONE head's [N, m] float32 features
  (holding phi(q) and phi(k) for both heads would be 4x that)."""
  n, m = 8192, 256
  spec = _spec(num_features=m)
  used = kit.compiled_bytes(spec, n, causal=causal, heads=2, backward=False)
  assert used < n * m * 4, (used, n * m * 4)


def test_causal_rows_are_shifted_by_the_keys_they_see():
  """The first 8 keys have huge norms (exponents near -160, below float32's
  smallest denormal, exp(-103)) and key 20 is aligned with a feature
  (exponent > 0). One shift for all keys (their largest exponent) would
  underflow rows 0..7 to zero denominators (zero rows, inf gradients); the
  running shift keeps every row equal to the float64 definition and every
  gradient finite."""
  n, d, m, key = 32, 8, 16, jax.random.PRNGKey(7)
  spec = _spec(num_features=m, chunk=4)
  w = np.asarray(performer.projections(key, m, d, 1), np.float64)[0]
  gen = np.random.default_rng(0)
  q = gen.normal(size=(1, n, 1, d)) * 0.5
  k = gen.normal(size=(1, n, 1, d)) * 0.5
  v = gen.normal(size=(1, n, 1, d))
  first = gen.normal(size=(8, d))
  k[0, :8, 0] = 20 * d ** 0.25 * first / np.linalg.norm(first, axis=-1,
                                                        keepdims=True)
  k[0, 20, 0] = w[np.argmax(np.linalg.norm(w, axis=-1))] * d ** 0.25
  expo = lambda x: (x * d ** -0.25) @ w.T - 0.5 * np.sum(
      (x * d ** -0.25) ** 2, -1, keepdims=True)
  eq, ek = expo(q[0, :, 0]), expo(k[0, :, 0])  # [n, m]
  assert ek[:8].max() < -110 and ek[20].max() > 0  # the premise
  # log of phi(q_i) . phi(k_j) up to a constant, then a causal softmax.
  logits = np.log(np.exp(eq[:, None, :] + ek[None, :, :]
                         - (eq.max() + ek.max(1)[None, :, None])).sum(-1))
  logits += ek.max(1)[None, :]
  logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(1, keepdims=True))
  want = (p / p.sum(1, keepdims=True)) @ v[0, :, 0]
  q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  attend = lambda q, k, v: av.attend(q, k, v, spec, causal=True, rng=key)
  out = _jit(attend)(q32, k32, v32)
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], want, atol=1e-4)
  grads = _jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) ** 2),
                        argnums=(0, 1, 2)))(q32, k32, v32)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
