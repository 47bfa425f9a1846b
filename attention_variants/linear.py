"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax's exp(q . k) is replaced by the kernel phi(q) . phi(k) with the
feature map phi(x) = elu(x) + 1 (elementwise, so phi(x) > 0 and every
visible key gets a positive weight). phi is applied to the raw queries and
keys: no 1/sqrt(head_dim) scaling, as in the paper (a scale would not
cancel, elu + 1 is not homogeneous). For query i over its visible keys j
(j < kv_length; causal also j <= i, top-left aligned):

  out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i),
  S_i = sum_j phi(k_j) v_j^T   [d, d],   z_i = sum_j phi(k_j)   [d].

Bidirectional: S and z are one sum over every valid key, the same for all
queries. Causal: prefix sums over j <= i, computed chunk by chunk: a
lax.scan over chunks of `chunk` positions carries the running [d, d] state
(S, z) of all earlier chunks; inside a chunk the kernel is used directly
(quadratic in the chunk: [chunk, chunk] weights masked at j <= i). Query
rows at or past q_length, and rows with no visible key (kv_length 0), are
zeros. Statistics are float32 whatever the input dtype (phi(q), phi(k) and
v are taken to float32 first); the output is in q's dtype. GQA: query heads
of a group share their key/value head's state.

Hyperparameters (config.attention.linear):
  chunk   positions per causal chunk, an integer >= 1 (clamped to the
          sequence; any length works, padded internally to a multiple of
          it, the padding masked). It changes only rounding, not the
          result; bidirectional attention does not use it.

Complexity (N tokens, head dim d): bidirectional O(N d^2) time and O(N d +
d^2) memory. Causal O(N C d + N d^2) time and O(N C + (N / C) d^2) memory
for chunk C (forward and backward: the backward keeps one [d, d] state per
chunk and recomputes the chunk's [C, C] weights, jax.checkpoint on the scan
step). No N x N array exists in `attend`; `weights` builds the dense
normalised kernel matrix (for tests and pictures on short inputs only).

The kernel-attention routines (`feature_attention`, `causal_sums`,
`feature_weights`) take feature-mapped queries and keys of any feature size
and are shared with `performer`, which differs only in its feature map.

Implementations:
  xla        the computation above (any backend).
  reference  the dense normalised kernel matrix times V; O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.linear.chunk', params['chunk'])


def feature_map(x):
  """phi(x) = elu(x) + 1 in float32 (strictly positive)."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _normalise(num, den, keep):
  """num / den where den > 0 and the row is kept, else zeros."""
  ok = (den > 0.0) & keep
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _bidirectional(phiq, phik, v):
  """phiq [b, n_q, kvh, g, f], phik [b, n_k, kvh, f], v [b, n_k, kvh, e]
  -> (num, den)."""
  s = jnp.einsum('bskd,bske->bkde', phik, v)
  z = jnp.sum(phik, axis=1)  # [b, kvh, f]
  num = jnp.einsum('bqkgd,bkde->bqkge', phiq, s)
  den = jnp.einsum('bqkgd,bkd->bqkg', phiq, z)[..., None]
  return num, den


def causal_sums(phiq, phik, v, chunk):
  """Prefix sums over j <= i, chunk by chunk; (num, den) for the first n_q
  query rows: num_i = sum_{j<=i} (phiq_i . phik_j) v_j, den_i = sum_{j<=i}
  phiq_i . phik_j.

  phiq [b, n_q, kvh, g, f], phik [b, n_k, kvh, f], v [b, n_k, kvh, e], all
  float32, for any feature size f (linear's f = d, performer's f = m). A
  lax.scan over chunks of `chunk` positions carries the [f, e] state of all
  earlier chunks; inside a chunk the [chunk, chunk] kernel is used directly.
  The step is rematerialised (jax.checkpoint), so the backward pass keeps
  one state per chunk: memory O((N / chunk) f e + N chunk).
  """
  b, n_q, kvh, _, d = phiq.shape
  n_k, e = phik.shape[1], v.shape[-1]
  chunk = min(chunk, max(n_q, n_k, 1))
  n = masks.ceil_div(max(n_q, n_k, 1), chunk) * chunk
  steps = n // chunk
  # Common padded length; padded keys have zero features, so they add
  # nothing, and padded query rows are cut off at the end.
  chunks = lambda x: jnp.moveaxis(masks.pad_to_multiple(x, 1, n).reshape(
      (b, steps, chunk) + x.shape[2:]), 1, 0)  # [steps, b, chunk, ...]
  qs, ks, vs = chunks(phiq), chunks(phik), chunks(v)
  lower = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(state, xs):
    s, z = state  # [b, kvh, f, e], [b, kvh, f]: every earlier chunk
    qc, kc, vc = xs
    a = jnp.einsum('bqkgd,bskd->bkgqs', qc, kc)
    a = jnp.where(lower, a, 0.0)
    num = (jnp.einsum('bkgqs,bske->bqkge', a, vc)
           + jnp.einsum('bqkgd,bkde->bqkge', qc, s))
    den = (jnp.sum(a, axis=-1).transpose(0, 3, 1, 2)
           + jnp.einsum('bqkgd,bkd->bqkg', qc, z))[..., None]
    s = s + jnp.einsum('bskd,bske->bkde', kc, vc)
    z = z + jnp.sum(kc, axis=1)
    return (s, z), (num, den)

  step = jax.checkpoint(step, prevent_cse=False)
  state = (jnp.zeros((b, kvh, d, e), jnp.float32),
           jnp.zeros((b, kvh, d), jnp.float32))
  _, (num, den) = lax.scan(step, state, (qs, ks, vs))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(
      (b, n) + x.shape[3:])[:, :n_q]
  return unchunk(num), unchunk(den)


def feature_attention(phiq, phik, v, *, causal, q_lengths, kv_lengths,
                      chunk, dtype):
  """Normalised kernel attention from feature-mapped queries and keys.

  phiq [b, n_q, kvh, g, f] and phik [b, n_k, kvh, f]: non-negative float32
  features; v [b, n_k, kvh, e]; q_lengths/kv_lengths int32 [b]. Padded keys'
  features are zeroed here; padded query rows and rows with no visible key
  are zeros. Returns [b, n_q, kvh * g, e] in `dtype`. Shared by linear and
  performer (which differ only in the feature map).
  """
  b, n_q = phiq.shape[:2]
  valid = jnp.arange(phik.shape[1])[None, :] < kv_lengths[:, None]
  phik = jnp.where(valid[:, :, None, None], phik, 0.0)
  vf = v.astype(jnp.float32)
  if causal:
    num, den = causal_sums(phiq, phik, vf, chunk)
  else:
    num, den = _bidirectional(phiq, phik, vf)
  keep = (jnp.arange(n_q)[None, :] < q_lengths[:, None])[:, :, None, None,
                                                         None]
  out = _normalise(num, den, keep)
  return out.reshape(b, n_q, -1, v.shape[-1]).astype(dtype)


def feature_weights(phiq, phik, mask):
  """Dense float32 [b, kvh * g, n_q, n_k]: phiq_i . phik_j where `mask`
  ([b, 1|h, n_q, n_k]) allows it, each row divided by its sum (rows without
  keys are zeros)."""
  b, n_q, kvh, g, _ = phiq.shape
  a = jnp.einsum('bqkgd,bskd->bkgqs', phiq, phik).reshape(
      b, kvh * g, n_q, phik.shape[1])
  a = jnp.where(mask, a, 0.0)
  return _normalise(a, jnp.sum(a, axis=-1, keepdims=True), True)


def linear_attention(q, k, v, *, causal, q_lengths, kv_lengths, chunk):
  """Linear attention [b, q_len, h, d] in q's dtype, no N x N array."""
  kv_heads, _ = masks.check_inputs(q, k, v)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  return feature_attention(
      feature_map(masks.group_queries(q, kv_heads)), feature_map(k), v,
      causal=causal, q_lengths=ql, kv_lengths=kl, chunk=chunk, dtype=q.dtype)


def kernel_weights(q, k, *, causal, q_lengths, kv_lengths):
  """Dense float32 [b, h, q_len, kv_len]: phi(q_i) . phi(k_j) on the visible
  keys, each row divided by its sum (rows without keys are zeros)."""
  kv_heads, _ = masks.check_inputs(q, k, k)
  mask = full.full_mask(q, k, causal=causal, q_lengths=q_lengths,
                        kv_lengths=kv_lengths)
  return feature_weights(feature_map(masks.group_queries(q, kv_heads)),
                         feature_map(k), mask)


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """The dense normalised kernel matrix (short inputs only; rng unused)."""
  del v, implementation, rng
  check_params(params)
  return kernel_weights(q, k, causal=causal, q_lengths=q_lengths,
                        kv_lengths=kv_lengths)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  if implementation == 'reference':
    w = kernel_weights(q, k, causal=causal, q_lengths=q_lengths,
                       kv_lengths=kv_lengths)
    return full.probs_times_v(w, v, q.dtype)
  return linear_attention(q, k, v, causal=causal, q_lengths=q_lengths,
                          kv_lengths=kv_lengths, chunk=params['chunk'])
