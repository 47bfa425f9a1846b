"""What the attention-variant tests share: random inputs, the dense
reference, outputs with their gradients, and the closeness check.

    import variant_kit as kit
    q, k, v = kit.inputs(21, 21, batch=4, heads=4, kv_heads=2, head_dim=8)
    got, want = kit.outputs_and_grads([variant_fn, kit.reference_fn(...)],
                                      q, k, v)
    kit.assert_close(got, want, atol=1e-5)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_variants as av
from attention_variants import bigbird

# Dense softmax attention with a float32 softmax: what every variant equals
# in its limit.
REFERENCE = {'kind': 'full', 'implementation': 'reference'}


def spec(kind: str, implementation: str | None = None, **params) -> dict:
  out = {'kind': kind, kind: params}
  if implementation is not None:
    out['implementation'] = implementation
  return out


def inputs(n_q: int, n_k: int, *, batch: int, heads: int, kv_heads: int,
           head_dim: int, seed: int = 0, scale: float = 1.0,
           dtype=jnp.float32):
  """q [batch, n_q, heads, d], k and v [batch, n_k, kv_heads, d]: standard
  normals (q and k times `scale`), drawn with numpy, so no PRNG program is
  compiled for every shape."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, n_q, heads, head_dim)) * scale
  k = rng.normal(size=(batch, n_k, kv_heads, head_dim)) * scale
  v = rng.normal(size=(batch, n_k, kv_heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def cotangent(shape, seed: int = 1, dtype=jnp.float32):
  """A fixed random output cotangent: gradients of <out, cotangent>."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def reference(q, k, v, **kw):
  """Dense reference output; kw as av.attend's (causal, lengths)."""
  return av.attend(q, k, v, REFERENCE, **kw)


def outputs_and_grads(fns, q, k, v, *, seed: int = 1, jit=jax.jit):
  """[(fn(q, k, v), (dq, dk, dv)) for fn in fns] with one fixed random
  cotangent, all in one compiled program (far cheaper on a small CPU than
  eager mode, which compiles every primitive)."""
  shape = jax.eval_shape(fns[0], q, k, v)
  ct = cotangent(shape.shape, seed, shape.dtype)

  def run(q, k, v):
    results = []
    for fn in fns:
      out, pullback = jax.vjp(fn, q, k, v)
      results.append((out, pullback(ct)))
    return results
  return jit(run)(q, k, v)


def assert_close(got, want, *, atol: float, rtol: float = 0.0):
  """Arrays, or (output, gradients) pairs, equal within tolerance; every
  gradient finite."""
  if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], tuple):
    (out, grads), (want_out, want_grads) = got, want
    assert_close(out, want_out, atol=atol, rtol=rtol)
    for name, g, w in zip('qkv', grads, want_grads):
      assert np.isfinite(np.asarray(g)).all(), f'non-finite d{name}'
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol,
                                 rtol=rtol, err_msg=f'd{name}')
    return
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=atol,
                             rtol=rtol)


# Four batch rows: full, no valid key at all, short queries, short keys.
Q_LENGTHS = (21, 17, 6, 21)
KV_LENGTHS = (21, 0, 9, 4)


def padded_inputs(n_q: int = 21, n_k: int = 21, kv_heads: int = 2, *,
                  scale: float = 0.5, seed: int = 0, dtype=jnp.float32,
                  kv_lengths=KV_LENGTHS):
  """(q, k, v, q_lengths, kv_lengths) of `inputs` with 4 heads of 8 over
  the four batch rows of Q_LENGTHS and kv_lengths (cut to n_q and n_k)."""
  q, k, v = inputs(n_q, n_k, batch=len(Q_LENGTHS), heads=4,
                   kv_heads=kv_heads, head_dim=8, scale=scale, seed=seed,
                   dtype=dtype)
  ql = jnp.asarray(np.minimum(Q_LENGTHS, n_q), jnp.int32)
  kl = jnp.asarray(np.minimum(kv_lengths, n_k), jnp.int32)
  return q, k, v, ql, kl


def visible(n_q, n_k, ql, kl, causal) -> np.ndarray:
  """bool [b, 1, n_q, n_k]: padding and causality, written out densely."""
  i = np.arange(n_q)[:, None]
  j = np.arange(n_k)[None, :]
  ok = ((i < np.asarray(ql)[:, None, None])
        & (j < np.asarray(kl)[:, None, None]))
  if causal:
    ok &= j <= i
  return ok[:, None]


def learned(spec, q, k, *, max_len: int | None = None, seed: int = 0):
  """The kind's learned parameters (av.init_learned) for q [b, n, h, d] and
  k [b, n_k, kv_heads, d], max_len defaulting to n_k; None for a
  parameter-free kind, so `av.attend(..., learned=kit.learned(...))` fits
  every kind."""
  if not av.owns_parameters(spec):
    return None
  return av.init_learned(spec, jax.random.key(seed), num_heads=q.shape[2],
                         num_kv_heads=k.shape[2], head_dim=q.shape[3],
                         max_len=max_len or k.shape[1])


def softmax_masked(s, rows, cols):
  """numpy softmax of s [n_q, n_k] over the keys where cols, on the rows
  where rows; rows with no key (or masked) are zeros."""
  s = np.where(rows[:, None] & cols[None, :], s, -np.inf)
  top = s.max(-1, keepdims=True)
  e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
  den = e.sum(-1, keepdims=True)
  return np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)


def compiled_bytes(spec, n: int, *, causal: bool, heads: int = 2,
                   head_dim: int = 8, backward: bool = True) -> int:
  """Temp + output bytes of the compiled attention at length n: its
  gradient (backward=True) or its forward pass alone (skips the test where
  the backend reports no memory analysis)."""
  q = jnp.zeros((1, n, heads, head_dim))
  params = learned(spec, q, q)
  def forward(q, k, v):
    return av.attend(q, k, v, spec, causal=causal, learned=params)
  if backward:
    fn = jax.grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=(0, 1, 2))
  else:
    fn = forward
  mem = jax.jit(fn).lower(q, q, q).compile().memory_analysis()
  if mem is None:
    pytest.skip('no memory analysis on this backend')
  return mem.temp_size_in_bytes + mem.output_size_in_bytes


def grad_bytes(spec, n: int, *, causal: bool, heads: int = 2,
               head_dim: int = 8) -> int:
  """Temp + output bytes of the compiled gradient of attention at length
  n."""
  return compiled_bytes(spec, n, causal=causal, heads=heads,
                        head_dim=head_dim)


def assert_backward_memory_is_linear(spec, *, causal: bool, n: int = 1024,
                                     heads: int = 2) -> None:
  """Doubling N at most doubles (x 2.2) forward + backward memory, and it
  stays well below one float32 N x N score matrix (N x N would 4x)."""
  small = grad_bytes(spec, n, causal=causal, heads=heads)
  large = grad_bytes(spec, 2 * n, causal=causal, heads=heads)
  assert large <= 2.2 * small, (small, large)
  assert large < (2 * n) ** 2 * heads, (large, n)


def assert_bad_params_raise(spec, match: str) -> None:
  """A bad hyperparameter in spec is one clear ValueError (its message
  searched for the regex `match`) wherever it can enter: av.validate,
  av.init_learned for kinds that own parameters, and av.attend (given
  learned={} for those kinds, so the hyperparameters are checked before
  the arrays)."""
  with pytest.raises(ValueError, match=match):
    av.validate(spec)
  owns = av.owns_parameters(spec)
  if owns:
    with pytest.raises(ValueError, match=match):
      av.init_learned(spec, jax.random.key(0), num_heads=4, num_kv_heads=2,
                      head_dim=8, max_len=5)
  q, k, v, _, _ = padded_inputs(5, 5)
  with pytest.raises(ValueError, match=match):
    av.attend(q, k, v, spec, learned={} if owns else None)


# Patterns rebuilt with plain loops from the definitions in the docstrings of
# attention_variants/sparse.py and bigbird.py ([heads, n_q, n_k] bool).

def strided_pattern(n_q, n_k, l, *, heads):
  """sparse strided (docstring): |i - j| <= l or (i - j) % l == 0."""
  p = np.zeros((n_q, n_k), bool)
  for i in range(n_q):
    for j in range(n_k):
      p[i, j] = abs(i - j) <= l or (i - j) % l == 0
  return np.broadcast_to(p, (heads, n_q, n_k))


def fixed_pattern(n_q, n_k, l, c, *, heads):
  """sparse fixed (docstring): same block of l, or j % l >= l - c."""
  p = np.zeros((n_q, n_k), bool)
  for i in range(n_q):
    for j in range(n_k):
      p[i, j] = j // l == i // l or j % l >= l - c
  return np.broadcast_to(p, (heads, n_q, n_k))


def bigbird_pattern(n_q, n_k, b, num_global, num_random, seed, *, heads):
  """Blocks: global rows/columns, window |m - a| <= 1, the drawn randoms."""
  n_blocks = -(-max(n_q, n_k) // b)
  front = min(-(-num_global // 2), n_blocks)
  back = min(num_global // 2, n_blocks - front)
  is_global = [a < front or a >= n_blocks - back for a in range(n_blocks)]
  ids, valid = bigbird.random_blocks(seed, heads, n_blocks, num_global,
                                    num_random)
  seen = np.zeros((heads, n_blocks, n_blocks), bool)
  for h in range(heads):
    for a in range(n_blocks):
      for m in range(n_blocks):
        seen[h, a, m] = is_global[a] or is_global[m] or abs(a - m) <= 1
      if not is_global[a]:
        for slot in range(num_random):
          if valid[h, a - front, slot]:
            seen[h, a, ids[h, a - front, slot]] = True
  p = np.zeros((heads, n_q, n_k), bool)
  for i in range(n_q):
    for j in range(n_k):
      p[:, i, j] = seen[:, i // b, j // b]
  return p
