"""`full`: the jax.nn.dot_product_attention path equals the dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit

REF = kit.REFERENCE
XLA = kit.spec('full', 'xla')


def _qkv(n=9, heads=4, kv_heads=2, d=8):
  return kit.inputs(n, n, batch=2, heads=heads, kv_heads=kv_heads,
                    head_dim=d)


@pytest.mark.parametrize('causal', [False, True])
def test_xla_matches_reference_with_padding_and_gqa(causal):
  q, k, v = _qkv()
  lengths = dict(q_lengths=jnp.array([9, 4]), kv_lengths=jnp.array([6, 0]))

  def loss(spec):
    return lambda q, k, v: jnp.sum(jnp.sin(
        av.attend(q, k, v, spec, causal=causal, **lengths)))

  ref = av.attend(q, k, v, REF, causal=causal, **lengths)
  out = av.attend(q, k, v, XLA, causal=causal, **lengths)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # Row 1 has no valid key: zeros, not an average of V.
  assert not np.any(np.asarray(out[1]))
  # Padded queries of row 0 output zeros too.
  np.testing.assert_array_equal(
      np.asarray(av.attend(q, k, v, REF, causal=causal,
                           q_lengths=jnp.array([5, 9]))[0, 5:]), 0)
  g_ref = jax.grad(loss(REF), argnums=(0, 1, 2))(q, k, v)
  g_out = jax.grad(loss(XLA), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_out, g_ref):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_weights_are_causal_masked_probabilities():
  q, k, v = _qkv()
  w = av.attention_weights(q, k, v, REF, causal=True,
                           kv_lengths=jnp.array([9, 5]))
  assert w.shape == (2, 4, 9, 9)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert not np.any(np.triu(np.asarray(w), 1))
  assert not np.any(np.asarray(w[1, :, :, 5:]))


def test_auto_and_cudnn_on_cpu():
  q, k, v = _qkv()
  auto = av.attend(q, k, v, {'kind': 'full', 'implementation': 'auto'})
  np.testing.assert_allclose(auto, av.attend(q, k, v, REF), atol=1e-5)
  if jax.default_backend() == 'cpu':
    with pytest.raises(ValueError, match='cudnn cannot run here'):
      av.attend(q, k, v, {'kind': 'full', 'implementation': 'cudnn'})


def test_bad_spec():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="unknown attention kind 'nope'"):
    av.attend(q, k, v, {'kind': 'nope'})
  with pytest.raises(ValueError, match='implementation'):
    av.attend(q, k, v, {'kind': 'full', 'implementation': 'triton'})
  with pytest.raises(ValueError, match='multiple of kv_heads'):
    av.attend(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), REF)
