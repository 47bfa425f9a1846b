"""The exact family: blockwise and local attention against dense attention.

Both must equal the dense float32 reference (outputs and gradients w.r.t. q,
k and v), causal and not, with padding, grouped-query heads and lengths that
are not multiples of the block size. Local is compared with dense attention
under a window mask built here, independently of local.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import full

ATOL = 1e-5
REFERENCE = kit.REFERENCE

# Four batch rows: full, no valid key at all, short queries, short keys (so
# late queries of a narrow window see nothing).
Q_LENGTHS = (21, 17, 6, 21)
KV_LENGTHS = (21, 0, 9, 4)


def _inputs(n_q=21, n_k=21, heads=4, kv_heads=2, head_dim=8, seed=0,
            dtype=jnp.float32):
  """([q, k, v], output cotangent, q_lengths, kv_lengths)."""
  qkv = kit.inputs(n_q, n_k, batch=len(Q_LENGTHS), heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim, seed=seed,
                   dtype=dtype)
  ct = kit.cotangent((len(Q_LENGTHS), n_q, heads, head_dim), seed + 1)
  ql = np.minimum(Q_LENGTHS, n_q)
  kl = np.minimum(KV_LENGTHS, n_k)
  return (list(qkv), ct, jnp.asarray(ql, jnp.int32),
          jnp.asarray(kl, jnp.int32))


def _window(n_q, n_k, left, right, causal):
  """bool [n_q, n_k]: the local pattern, written out densely."""
  i = np.arange(n_q)[:, None]
  j = np.arange(n_k)[None, :]
  ok = (j >= i - left) & (j <= i + right)
  return ok & (j <= i) if causal else ok


def _dense(q, k, v, *, causal, ql, kl, window=None):
  """Dense reference output, optionally under a [n_q, n_k] window mask."""
  if window is None:
    return kit.reference(q, k, v, causal=causal, q_lengths=ql, kv_lengths=kl)
  mask = full.full_mask(q, k, causal=causal, q_lengths=ql, kv_lengths=kl)
  mask = mask & jnp.asarray(window)
  return full.probs_times_v(full.dense_probs(q, k, mask), v, q.dtype)


def _value_and_grads(attend, qkv, ct, lengths, *, jit=True):
  """Output and d<out, ct>/d(q, k, v) of attend(q, k, v, q_lengths, kv_lengths).

  Variants run in one jit per case, lengths traced as they are in a model.
  The dense reference runs op by op, whose compiled ops are cached by shape
  and shared by every case (faster tests).
  """
  def both(q, k, v, ql, kl):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, ql, kl), q, k, v)
    return out, vjp(ct)
  return jax.jit(both)(*qkv, *lengths) if jit else both(*qkv, *lengths)


def _local_spec(params):
  return {'kind': 'local', 'local': params}


# (spec, n_q, n_k, kv_heads, (left, right) of the pattern or None for full).
CASES = {
    'blockwise_4x8': ({'kind': 'blockwise',
                       'blockwise': {'q_block': 4, 'kv_block': 8}},
                      21, 21, 2, None),
    'blockwise_8x4_cross': ({'kind': 'blockwise',
                             'blockwise': {'q_block': 8, 'kv_block': 4}},
                            13, 22, 1, None),
    'blockwise_defaults': ({'kind': 'blockwise'}, 21, 21, 2, None),
    'local_symmetric': (_local_spec({'window': 5, 'block': 4}),
                        21, 21, 2, (5, 5)),
    'local_asymmetric': (_local_spec({'window': 3, 'left': 6, 'right': 2,
                                      'block': 8}), 21, 21, 2, (6, 2)),
    'local_right_only': (_local_spec({'window': 3, 'left': 0, 'block': 4}),
                         21, 21, 2, (0, 3)),
    'local_cross': (_local_spec({'window': 4, 'block': 5}), 13, 22, 1, (4, 4)),
    # A block longer than the sequence is clamped to it: still the window.
    'local_block_over_length': (_local_spec({'window': 3, 'block': 64}),
                                21, 21, 2, (3, 3)),
}


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_dense_reference(case, causal):
  spec, n_q, n_k, kv_heads, extents = CASES[case]
  qkv, ct, ql, kl = _inputs(n_q, n_k, kv_heads=kv_heads)
  window = None
  if extents is not None:
    left, right = extents
    window = _window(n_q, n_k, left, right, causal)

  got = _value_and_grads(
      lambda q, k, v, ql, kl: av.attend(q, k, v, spec, causal=causal,
                                        q_lengths=ql, kv_lengths=kl),
      qkv, ct, (ql, kl))
  want = _value_and_grads(
      lambda q, k, v, ql, kl: _dense(q, k, v, causal=causal, ql=ql, kl=kl,
                                     window=window), qkv, ct, (ql, kl),
      jit=False)
  kit.assert_close(got, want, atol=ATOL)

  # Rows with nothing to attend to (padded queries, the batch row whose keys
  # are all padding, queries past a narrow window) are exactly zero.
  mask = full.full_mask(qkv[0], qkv[1], causal=causal, q_lengths=ql,
                        kv_lengths=kl)[:, 0]
  if window is not None:
    mask = mask & window
  empty = ~np.asarray(mask).any(-1)
  assert empty[1].all()
  assert (np.asarray(got[0])[empty] == 0).all()


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', ['blockwise_4x8', 'local_asymmetric',
                                  'local_cross'])
def test_attention_weights_match_dense_pattern(case, causal):
  spec, n_q, n_k, kv_heads, extents = CASES[case]
  (q, k, v), _, ql, kl = _inputs(n_q, n_k, kv_heads=kv_heads)
  mask = full.full_mask(q, k, causal=causal, q_lengths=ql, kv_lengths=kl)
  if extents is not None:
    mask = mask & _window(n_q, n_k, *extents, causal)
  want = full.dense_probs(q, k, mask)
  got = av.attention_weights(q, k, v, spec, causal=causal, q_lengths=ql,
                             kv_lengths=kl)
  assert got.shape == (q.shape[0], q.shape[2], n_q, n_k)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Exactly zero wherever the pattern does not look.
  outside = np.broadcast_to(~np.asarray(mask), got.shape)
  assert (np.asarray(got)[outside] == 0).all()


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('params', [
    {'window': 20, 'block': 8},        # window + 1 == length, 3 blocks
    {'window': 10 ** 9, 'block': 32},  # far wider; one block (clamped)
], ids=['exact', 'huge'])
def test_local_wide_window_equals_full(params, causal):
  qkv, ct, ql, kl = _inputs()
  spec = _local_spec(params)
  got = _value_and_grads(
      lambda q, k, v, ql, kl: av.attend(q, k, v, spec, causal=causal,
                                        q_lengths=ql, kv_lengths=kl),
      qkv, ct, (ql, kl))
  want = _value_and_grads(
      lambda q, k, v, ql, kl: av.attend(q, k, v, REFERENCE, causal=causal,
                                        q_lengths=ql, kv_lengths=kl),
      qkv, ct, (ql, kl), jit=False)
  kit.assert_close(got, want, atol=ATOL)


@pytest.mark.parametrize('kind', ['blockwise', 'local'])
def test_no_lengths_and_low_precision(kind):
  """No padding given; bfloat16 in, bfloat16 out, float32 statistics."""
  (q, k, v), _, _, _ = _inputs(n_q=19, n_k=19, dtype=jnp.bfloat16)
  spec = {'kind': kind, 'local': {'window': 32, 'block': 8},
          'blockwise': {'q_block': 8, 'kv_block': 8}}
  out = av.attend(q, k, v, spec, causal=True)
  assert out.dtype == jnp.bfloat16
  want = av.attend(q.astype(jnp.float32), k.astype(jnp.float32),
                   v.astype(jnp.float32), REFERENCE, causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize('spec, name', [
    ({'kind': 'blockwise', 'blockwise': {'q_block': 0}}, 'q_block'),
    ({'kind': 'blockwise', 'blockwise': {'kv_block': -8}}, 'kv_block'),
    ({'kind': 'blockwise', 'blockwise': {'q_block': 2.5}}, 'q_block'),
    ({'kind': 'local', 'local': {'window': 0}}, 'window'),
    ({'kind': 'local', 'local': {'window': -3}}, 'window'),
    ({'kind': 'local', 'local': {'block': 0}}, 'block'),
    ({'kind': 'local', 'local': {'left': -2}}, 'left'),
    ({'kind': 'local', 'local': {'right': True}}, 'right'),
])
def test_bad_params_raise(spec, name):
  value = spec[spec['kind']][name]
  kit.assert_bad_params_raise(spec, rf'{name}={value!r}.*(>= |-1)')



@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
@pytest.mark.parametrize('spec', [
    {'kind': 'blockwise', 'blockwise': {'q_block': 64, 'kv_block': 64}},
    {'kind': 'local', 'local': {'window': 16, 'block': 16}},
], ids=['blockwise', 'local'])
def test_backward_memory_is_linear_in_length(spec):
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads = 1024, 2
  kit.assert_backward_memory_is_linear(spec, causal=True, n=n, heads=heads)
