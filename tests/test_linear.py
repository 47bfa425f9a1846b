"""Linear attention (Katharopoulos et al. 2020) against a direct dense
computation of the same normalised kernel attention, written out here from
the definition in attention_variants/linear.py's docstring: outputs and
gradients, causal and bidirectional, padding, GQA, chunks that do and do
not divide the length."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import linear

ATOL = 1e-5
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})



def _dense_kernel(q, k, ql, kl, causal):
  """[b, h, n_q, n_k]: (elu + 1) features, masked, rows normalised."""
  phi = lambda x: jnp.where(x > 0, x + 1.0, jnp.exp(x))
  groups = q.shape[2] // k.shape[2]
  kr = jnp.repeat(k, groups, axis=2)
  a = jnp.einsum('bqhd,bshd->bhqs', phi(q), phi(kr))
  a = jnp.where(kit.visible(q.shape[1], k.shape[1], ql, kl, causal), a, 0.0)
  den = a.sum(-1, keepdims=True)
  return jnp.where(den > 0, a / jnp.where(den > 0, den, 1.0), 0.0)


def _dense(q, k, v, ql, kl, causal):
  w = _dense_kernel(q, k, ql, kl, causal)
  vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  return jnp.einsum('bhqs,bshd->bqhd', w, vr)


def _spec(**params):
  return kit.spec('linear', **params)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('chunk,n_q,n_k,kv_heads', [
    (7, 21, 21, 2),    # divides the length: 3 chunks
    (4, 21, 21, 2),    # does not: padded to 24
    (1, 21, 21, 4),    # one position per chunk, no GQA
    (64, 21, 21, 1),   # longer than the sequence: clamped, one chunk
    (5, 13, 22, 1),    # more keys than queries
    (3, 22, 13, 2),    # more queries than keys
])
def test_matches_dense_kernel_attention(chunk, n_q, n_k, kv_heads, causal,
                                        monkeypatch):
  # Bidirectional attention works in blocks of linear.ROW_BLOCK rows (256);
  # set to the chunk, so both paths see dividing, padded and clamped blocks.
  monkeypatch.setattr(linear, 'ROW_BLOCK', chunk)
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads)
  spec = _spec(chunk=chunk)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, causal=causal, q_lengths=ql,
                                kv_lengths=kl),
      lambda q, k, v: _dense(q, k, v, ql, kl, causal)], q, k, v, jit=_jit)
  kit.assert_close(got, want, atol=ATOL)
  # Padded query rows and the batch row without keys are exact zeros.
  out = np.asarray(got[0])
  assert not out[1].any()
  assert not out[2, int(ql[2]):].any()


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_weights_are_the_normalised_kernel(causal):
  q, k, v, ql, kl = kit.padded_inputs(13, 22, kv_heads=2)
  spec = _spec(chunk=4)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
  run = _jit(lambda q, k, v: (av.attention_weights(q, k, v, spec, **kw),
                              av.attend(q, k, v, spec, **kw)))
  w, out = run(q, k, v)
  assert w.shape == (4, 4, 13, 22) and w.dtype == jnp.float32
  np.testing.assert_allclose(w, _dense_kernel(q, k, ql, kl, causal),
                             atol=1e-6)
  has_key = kit.visible(13, 22, ql, kl, causal).any(-1)  # [b, 1, n_q]
  np.testing.assert_allclose(w.sum(-1), np.broadcast_to(has_key, (4, 4, 13)),
                             atol=1e-6)
  vr = jnp.repeat(v, 2, axis=2)
  np.testing.assert_allclose(out, jnp.einsum('bhqs,bshd->bqhd', w, vr),
                             atol=ATOL)
  reference = av.attend(q, k, v, kit.spec('linear', 'reference', chunk=4),
                        **kw)
  np.testing.assert_allclose(out, reference, atol=ATOL)


def test_chunk_changes_only_rounding():
  q, k, v, ql, kl = kit.padded_inputs()
  outs = [_jit(lambda q, k, v, c=c: av.attend(
      q, k, v, _spec(chunk=c), causal=True, q_lengths=ql, kv_lengths=kl))(
          q, k, v) for c in (2, 6, 21)]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], atol=ATOL)


def test_no_lengths_and_low_precision():
  """bfloat16 in, bfloat16 out, float32 statistics."""
  q, k, v, _, _ = kit.padded_inputs(19, 19, dtype=jnp.bfloat16)
  out = _jit(lambda q, k, v: av.attend(q, k, v, _spec(chunk=8),
                                       causal=True))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  full_len = jnp.full((4,), 19)
  want = _dense(*f32, full_len, full_len, True)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize('value', [0, -4, 2.5, True])
def test_bad_chunk_raises(value):
  kit.assert_bad_params_raise(_spec(chunk=value),
                              rf'attention.linear.chunk={value!r}.*>= 1')



@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_backward_memory_is_linear_in_length(causal):
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads, spec = 1024, 2, _spec(chunk=16)
  kit.assert_backward_memory_is_linear(spec, causal=causal, n=n, heads=heads)


def test_tiny_denominator_has_a_finite_gradient():
  """A row whose numerator and denominator are both ~1e-20 (performer's
  exponent shifts make them) has an O(1) quotient; its gradient must be
  the quotient rule's, not NaN from den ** 2 flushing to zero."""
  num = jnp.array([[3e-20, 0.0], [1.0, 2.0]])
  den = jnp.array([[6e-20], [4.0]])
  pick = jnp.array([1.0, 0.0])
  loss = lambda n, d: jnp.sum(linear._normalise(n, d, True) * pick)
  g_num, g_den = jax.grad(loss, (0, 1))(num, den)
  np.testing.assert_allclose(g_num, [[1 / 6e-20, 0.0], [0.25, 0.0]],
                             rtol=1e-6)
  np.testing.assert_allclose(g_den, [[-3e-20 / 6e-20**2], [-1 / 16]],
                             rtol=1e-5)
  # Rows that are not kept, or see no key (den 0), get zero output and
  # gradient.
  for keep, d in ((False, den), (True, jnp.zeros_like(den))):
    out = linear._normalise(num, d, keep)
    g_num, g_den = jax.grad(
        lambda n, d: jnp.sum(linear._normalise(n, d, keep)), (0, 1))(num, d)
    assert not np.any(out) and not np.any(g_num) and not np.any(g_den)
