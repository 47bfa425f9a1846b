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


def _attend(q, k, v, spec, **kw):
  """av.attend with the kind's learned parameters ({} without the
  convolution)."""
  return av.attend(q, k, v, spec, learned=kit.learned(spec, q, k), **kw)


def _weights(q, k, v, spec, **kw):
  return av.attention_weights(q, k, v, spec, learned=kit.learned(spec, q, k),
                              **kw)


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
      f = kit.softmax_masked(qh @ k_land.T * s, q_valid, k_ok)
      a = kit.softmax_masked(q_land @ k_land.T * s, q_ok, k_ok)
      bb = kit.softmax_masked(q_land @ kh.T * s, q_ok, k_valid)
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
    pytest.param(7, 21, 21, 4, marks=pytest.mark.slow),  # divides; no GQA
    pytest.param(5, 13, 22, 1, marks=pytest.mark.slow),  # more keys
    (8, 22, 13, 2),    # more queries than keys; row 3 has 3 < m keys
])
def test_matches_dense_f_pinv_a_b(m, n_q, n_k, kv_heads):
  q, k, v, ql, kl = _inputs(n_q, n_k, kv_heads)
  spec = _spec(num_landmarks=m)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  loss = lambda q, k, v: jnp.sum(_attend(q, k, v, spec, **kw) ** 2)
  w, out, grads = _jit(lambda q, k, v: (
      _weights(q, k, v, spec, **kw), _attend(q, k, v, spec, **kw),
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
  reference = _attend(q, k, v, kit.spec('nystromformer', 'reference',
                                        num_landmarks=m), **kw)
  np.testing.assert_allclose(out, reference, atol=1e-5)


@pytest.mark.parametrize('iterations,atol', [(6, 0.05), (20, 1e-3)])
def test_weights_rows_sum_to_about_one(iterations, atol):
  """Exactly 1 only once pinv(A) has converged to A's inverse (then A^-1 1
  = 1); 6 iterations left rows off by up to 0.037 here (measured)."""
  q, k, v, ql, kl = _inputs(21, 21)
  w = np.asarray(_weights(
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
      lambda q, k, v: _attend(q, k, v, spec, **kw),
      lambda q, k, v: kit.reference(q, k, v, **kw)], q, k, v, jit=_jit)
  kit.assert_close(got[0], want[0], atol=5e-5)
  for g, w in zip(got[1], want[1]):
    kit.assert_close(g, w, atol=2e-3)
  few = _attend(q, k, v, _spec(num_landmarks=m), **kw)
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
  run = _jit(lambda q, k, v: _attend(q, k, v, spec, q_lengths=lengths,
                                     kv_lengths=lengths))
  a = run(q, k, v)
  b = run(padded(q, noise), padded(k, noise), padded(v, noise))
  c = _jit(lambda q, k, v: _attend(q, k, v, spec))(
      q[:, :length], k[:, :length], v[:, :length])
  np.testing.assert_allclose(a[:, :length], b[:, :length], atol=1e-6)
  np.testing.assert_allclose(a[:, :length], c, atol=1e-5)
  assert not np.asarray(a[:, length:]).any()


def test_causal_is_rejected():
  q, k, v, _, _ = _inputs(5, 5)
  for fn in (_attend, _weights):
    with pytest.raises(ValueError, match='nystromformer is bidirectional '
                                         'only.*no causal form'):
      fn(q, k, v, _spec(), causal=True)


def test_no_lengths_and_low_precision():
  q, k, v, _, _ = _inputs(19, 19, dtype=jnp.bfloat16)
  out = _jit(lambda q, k, v: _attend(q, k, v, _spec(num_landmarks=4)))(
      q, k, v)
  assert out.dtype == jnp.bfloat16
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = _attend(*f32, _spec(num_landmarks=4))
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=5e-2)


@pytest.mark.parametrize('name,value,minimum', [
    ('num_landmarks', 0, 1), ('num_landmarks', 2.5, 1),
    ('pinv_iterations', 0, 1), ('pinv_iterations', True, 1),
    ('conv_kernel', -1, 0), ('conv_kernel', 1.5, 0)])
def test_bad_params_raise(name, value, minimum):
  kit.assert_bad_params_raise(
      _spec(**{name: value}),
      rf'attention.nystromformer.{name}={value!r}.*>= {minimum}')



@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
def test_backward_memory_is_linear_in_length():
  """Doubling N at most doubles forward + backward memory (N x N would 4x)."""
  n, heads, spec = 1024, 2, _spec(num_landmarks=16)
  kit.assert_backward_memory_is_linear(spec, causal=False, n=n, heads=heads)


def _conv_np(v, w, ql, kl):
  """The depthwise convolution by its definition, float64 [b, n, h, d]:
  sum_t w[h, t] V'[i + t - (K - 1) // 2] on valid query rows, V' = V with
  padded positions (and positions outside the sequence) zero."""
  v, w = np.asarray(v, np.float64), np.asarray(w, np.float64)
  b, n, kv_heads, d = v.shape
  heads, taps = w.shape
  out = np.zeros((b, n, heads, d))
  for i in range(b):
    for h in range(heads):
      for pos in range(int(ql[i])):
        for t in range(taps):
          j = pos + t - (taps - 1) // 2
          if 0 <= j < kl[i]:
            out[i, pos, h] += w[h, t] * v[i, j, h // (heads // kv_heads)]
  return out


@pytest.mark.parametrize('taps,kv_heads', [(5, 2), (4, 4), (33, 1)])
def test_conv_adds_a_depthwise_convolution_of_v(taps, kv_heads):
  """attend(conv) - attend(no conv) is the convolution written out here,
  padded values leaking nowhere (kit's padded V holds random values); the
  gradient in the kernels too; the reference implementation agrees; 33
  taps (the paper's) is longer than the 13 tokens."""
  q, k, v, ql, kl = _inputs(13, 13, kv_heads)
  spec, off = _spec(num_landmarks=4, conv_kernel=taps), _spec(num_landmarks=4)
  learned = kit.learned(spec, q, k)
  assert learned['conv'].shape == (4, taps)
  ct = kit.cotangent(q.shape)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  loss = lambda learned: jnp.sum(
      av.attend(q, k, v, spec, learned=learned, **kw) * ct)
  on, plain, ref, grad = _jit(lambda learned: (
      av.attend(q, k, v, spec, learned=learned, **kw),
      av.attend(q, k, v, off, learned={}, **kw),
      av.attend(q, k, v, kit.spec('nystromformer', 'reference', num_landmarks=4,
                                  conv_kernel=taps), learned=learned, **kw),
      jax.grad(loss)(learned)))(learned)
  want = _conv_np(v, learned['conv'], np.asarray(ql), np.asarray(kl))
  np.testing.assert_allclose(np.asarray(on) - np.asarray(plain), want,
                             atol=1e-5)
  np.testing.assert_allclose(ref, on, atol=1e-5)
  # d<out, ct>/dw[h, t] = sum over valid rows i of ct_i . V'_{i + t - c}.
  ctn, vn = np.asarray(ct, np.float64), np.asarray(v, np.float64)
  want_grad = np.zeros((4, taps))
  for i in range(4):
    for h in range(4):
      for pos in range(int(ql[i])):
        for t in range(taps):
          j = pos + t - (taps - 1) // 2
          if 0 <= j < kl[i]:
            want_grad[h, t] += ctn[i, pos, h] @ vn[i, j, h // (4 // kv_heads)]
  np.testing.assert_allclose(grad['conv'], want_grad, atol=1e-4)
  on = np.asarray(on)
  assert not on[1].any() and not on[2, int(ql[2]):].any()


def test_conv_off_is_unchanged():
  """conv_kernel=0 (the default) owns no parameters and gives the output
  of F pinv(A) B V; zero kernels give exactly the same output."""
  q, k, v, ql, kl = _inputs(13, 13)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  assert av.defaults('nystromformer')['conv_kernel'] == 0
  assert kit.learned(_spec(), q, k) == {}
  off, dense, zero = _jit(lambda q, k, v: (
      av.attend(q, k, v, _spec(num_landmarks=4), learned={}, **kw),
      av.attention_weights(q, k, v, _spec(num_landmarks=4), learned={}, **kw),
      av.attend(q, k, v, _spec(num_landmarks=4, conv_kernel=3),
                learned={'conv': jnp.zeros((4, 3))}, **kw)))(q, k, v)
  np.testing.assert_allclose(off, _times_v(np.asarray(dense), v), atol=1e-5)
  np.testing.assert_array_equal(zero, off)


def test_conv_rejects_what_does_not_fit():
  q, k, v, _, _ = _inputs(9, 9)
  spec = _spec(conv_kernel=3)
  with pytest.raises(ValueError, match=r'needs learned=\{conv: \[4, 3\]\}'):
    av.attend(q, k, v, spec)
  with pytest.raises(ValueError, match=r'needs learned=\{conv: \[4, 3\]\}'):
    av.attend(q, k, v, spec, learned={'conv': jnp.zeros((4, 5))})
  with pytest.raises(ValueError, match='conv_kernel=0 owns no learned'):
    av.attend(q, k, v, _spec(), learned={'conv': jnp.zeros((4, 3))})
  q2, k2, v2, _, _ = _inputs(9, 7)
  with pytest.raises(ValueError, match='as many queries as keys'):
    av.attend(q2, k2, v2, spec, learned=kit.learned(spec, q2, k2))


def test_conv_init_and_the_model_holds_it():
  """U(-1/sqrt(K), 1/sqrt(K)) per query head; the model keeps it as an
  nnx.Param of each layer (and, without the conv, no parameter at all)."""
  from flax import nnx

  from configs import default
  from tasks.base import Task
  from train import step
  w = np.asarray(av.init_learned(_spec(conv_kernel=33), jax.random.key(0),
                                 num_heads=64, num_kv_heads=8, head_dim=8,
                                 max_len=100)['conv'])
  assert w.shape == (64, 33)
  assert np.abs(w).max() <= 33 ** -0.5 and np.abs(w).max() > 0.99 * 33 ** -0.5
  config = default.base()
  config.model.update(num_layers=2, dim=16, num_heads=2, mlp_dim=16)
  task = Task('t', vocab_size=20, seq_len=24, num_classes=5,
              head='classify', causal=False, sources=None, cls_token=True)

  def conv_params(conv_kernel):
    model = step.build_model(config.model, _spec(conv_kernel=conv_kernel),
                             task, seed=0)
    return [x for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if 'learned' in path]
  found = conv_params(7)
  assert len(found) == config.model.num_layers
  assert all(x.shape == (config.model.num_heads, 7) for x in found)
  assert conv_params(0) == []



def test_attend_without_learned_when_the_convolution_is_off():
  """learned may be omitted when the configuration has no parameters; with
  the convolution on, omitting it names the array needed."""
  q, k, v, ql, kl = _inputs()
  spec = _spec(num_landmarks=4)
  np.testing.assert_array_equal(
      av.attend(q, k, v, spec, q_lengths=ql, kv_lengths=kl),
      av.attend(q, k, v, spec, q_lengths=ql, kv_lengths=kl, learned={}))
  with pytest.raises(ValueError, match='conv_kernel=3 needs learned='):
    av.attend(q, k, v, _spec(conv_kernel=3), q_lengths=ql, kv_lengths=kl)
