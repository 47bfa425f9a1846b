"""Longformer attention (Beltagy et al. 2020) against dense softmax under its
pattern, the mask rebuilt here with plain loops from the definition in
attention_variants/longformer.py's docstring: outputs and gradients, causal
and bidirectional, padding, GQA, edge cases (no global, all global, a
window covering the sequence, lengths that are not multiples of the block),
and the two limits that are full attention."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
import variant_kit as kit
from attention_variants import full

ATOL = 1e-5
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _expected_mask(n_q, n_k, ql, kl, *, window, num_global, causal):
  """bool [b, 1, n_q, n_k] from the definition, one (i, j) at a time."""
  ql, kl = np.asarray(ql), np.asarray(kl)
  ok = np.zeros((len(ql), 1, n_q, n_k), bool)
  for b in range(len(ql)):
    for i in range(min(ql[b], n_q)):
      for j in range(min(kl[b], n_k)):
        if causal and j > i:
          continue
        in_window = i - window <= j <= i + window
        ok[b, 0, i, j] = in_window or i < num_global or j < num_global
  return ok


def _dense(q, k, v, mask):
  return full.probs_times_v(full.dense_probs(q, k, jnp.asarray(mask)), v,
                            q.dtype)


def _spec(**params):
  return kit.spec('longformer', **params)


# (window, num_global, block, n_q, n_k, kv_heads)
CASES = {
    'w3_g2_b4': (3, 2, 4, 21, 21, 2),     # 21 is not a multiple of 4
    'w1_g5_b4': (1, 5, 4, 21, 21, 2),     # global rows cross a block edge
    'w2_g4_b4': (2, 4, 4, 21, 21, 4),     # one block of global rows only
    'w2_g0_b8': (2, 0, 8, 21, 21, 2),     # no global position: a window
    'w3_g30_b4': (3, 30, 4, 21, 21, 2),   # g >= N: every query is global
    'w25_g1_b4': (25, 1, 4, 21, 21, 1),   # window >= N
    'w4_g2_b64': (4, 2, 64, 21, 21, 2),   # block longer than the sequence
    'w3_g2_b5_cross': (3, 2, 5, 13, 22, 1),
    'w2_g3_b4_cross': (2, 3, 4, 22, 13, 2),
}


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_dense_masked_softmax(case, causal):
  window, num_global, block, n_q, n_k, kv_heads = CASES[case]
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads)
  mask = _expected_mask(n_q, n_k, ql, kl, window=window,
                        num_global=num_global, causal=causal)
  spec = _spec(window=window, num_global=num_global, block=block)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, causal=causal, q_lengths=ql,
                                kv_lengths=kl),
      lambda q, k, v: _dense(q, k, v, mask)], q, k, v, jit=_jit)
  kit.assert_close(got, want, atol=ATOL)
  empty = ~mask[:, 0].any(-1)  # [b, n_q]
  assert empty[1].all()
  assert (np.asarray(got[0])[empty] == 0).all()


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('case', ['w3_g2_b4', 'w3_g2_b5_cross'])
def test_weights_match_the_pattern(case, causal):
  window, num_global, block, n_q, n_k, kv_heads = CASES[case]
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads)
  mask = _expected_mask(n_q, n_k, ql, kl, window=window,
                        num_global=num_global, causal=causal)
  spec = _spec(window=window, num_global=num_global, block=block)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
  run = _jit(lambda q, k, v: (av.attention_weights(q, k, v, spec, **kw),
                              av.attend(q, k, v, spec, **kw)))
  w, out = (np.asarray(x) for x in run(q, k, v))
  assert w.shape == (4, 4, n_q, n_k) and w.dtype == np.float32
  np.testing.assert_array_equal(w > 0, np.broadcast_to(mask, w.shape))
  np.testing.assert_allclose(w, full.dense_probs(q, k, mask), atol=1e-6)
  np.testing.assert_allclose(out, full.probs_times_v(jnp.asarray(w), v,
                                                     q.dtype), atol=ATOL)
  reference = av.attend(q, k, v, kit.spec(
      'longformer', 'reference', window=window, num_global=num_global,
      block=block), **kw)
  np.testing.assert_allclose(out, reference, atol=ATOL)


@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
@pytest.mark.parametrize('params', [
    {'window': 20, 'num_global': 0, 'block': 8},      # window = N - 1
    {'window': 10 ** 9, 'num_global': 2, 'block': 4},  # far wider
    {'window': 1, 'num_global': 21, 'block': 8},      # num_global = N
], ids=['window_exact', 'window_huge', 'all_global'])
def test_equals_full_attention(params, causal):
  q, k, v, ql, kl = kit.padded_inputs()
  spec = _spec(**params)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, causal=causal, q_lengths=ql,
                                kv_lengths=kl),
      lambda q, k, v: kit.reference(q, k, v, causal=causal, q_lengths=ql,
                                    kv_lengths=kl)], q, k, v, jit=_jit)
  kit.assert_close(got, want, atol=ATOL)


def test_no_global_equals_local():
  q, k, v, ql, kl = kit.padded_inputs()
  kw = dict(causal=False, q_lengths=ql, kv_lengths=kl)
  run = _jit(lambda q, k, v: (
      av.attend(q, k, v, _spec(window=3, num_global=0, block=4), **kw),
      av.attend(q, k, v, kit.spec('local', window=3, block=8), **kw)))
  got, want = run(q, k, v)
  np.testing.assert_allclose(got, want, atol=ATOL)


def test_no_lengths_and_low_precision():
  """bfloat16 in, bfloat16 out, float32 statistics."""
  q, k, v, _, _ = kit.padded_inputs(19, 19, dtype=jnp.bfloat16)
  spec = _spec(window=3, num_global=2, block=8)
  out = _jit(lambda q, k, v: av.attend(q, k, v, spec, causal=True))(q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  full_len = np.full(4, 19)
  mask = _expected_mask(19, 19, full_len, full_len, window=3, num_global=2,
                        causal=True)
  np.testing.assert_allclose(out.astype(jnp.float32), _dense(*f32, mask),
                             atol=3e-2)


@pytest.mark.parametrize('name,value', [
    ('window', 0), ('window', -3), ('window', 2.5),
    ('num_global', -1), ('num_global', True),
    ('block', 0),
])
def test_bad_params_raise(name, value):
  kit.assert_bad_params_raise(
      _spec(**{name: value}), rf'attention.longformer.{name}={value!r}.*>= ')



@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
@pytest.mark.parametrize('causal', [False, True], ids=['bidir', 'causal'])
def test_backward_memory_is_linear_in_length(causal):
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads = 1024, 2
  spec = _spec(window=16, num_global=2, block=16)
  kit.assert_backward_memory_is_linear(spec, causal=causal, n=n, heads=heads)
