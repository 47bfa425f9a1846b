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
queries, made ROW_BLOCK = 256 keys at a time, then the queries are answered
ROW_BLOCK rows at a time (a lax.scan each). Causal: prefix sums over j <=
i, computed chunk by chunk: a lax.scan over chunks of `chunk` positions
carries the running [d, d] state (S, z) of all earlier chunks; inside a
chunk the kernel is used directly (quadratic in the chunk: [chunk, chunk]
weights masked at j <= i). Query rows at or past q_length, and rows with no
visible key (kv_length 0), are zeros. Statistics are float32 whatever the
input dtype (phi(q), phi(k) and v are taken to float32 first); the output
is in q's dtype. GQA: query heads of a group share their key/value head's
state.

Hyperparameters (config.attention.linear):
  chunk   positions per causal chunk, an integer >= 1 (clamped to the
          sequence; any length works, padded internally to a multiple of
          it, the padding masked). It changes only rounding, not the
          result; bidirectional attention uses ROW_BLOCK instead.

Complexity (N tokens, head dim d): bidirectional O(N d^2) time and O(N d +
d^2) memory. Causal O(N C d + N d^2) time and O(N C + (N / C) d^2) memory
for chunk C (forward and backward: the backward keeps one [d, d] state per
chunk and recomputes the chunk's [C, C] weights, jax.checkpoint on the scan
step). No N x N array exists in `attend`; `weights` builds the dense
normalised kernel matrix (for tests and pictures on short inputs only).

The kernel-attention routines (`feature_attention`, `key_sums`,
`causal_sums`, `feature_weights`) take feature maps of any feature size,
applied a block of rows at a time, and are shared with `performer`, which
differs only in its feature map (256 features per head: an [N, 256] array
would be 4x the queries, so features exist one block at a time).

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

# Rows per step of bidirectional attention (keys summed, then queries
# answered, ROW_BLOCK at a time); not a hyperparameter: it bounds the
# feature arrays that exist at once and changes only rounding. 256 was the
# fastest of 64, 256 and 1,024 at 8K tokens on the project's CPU (linear
# and performer alike).
ROW_BLOCK = 256


def check_params(params):
  masks.check_positive_int('attention.linear.chunk', params['chunk'])


def feature_map(x):
  """phi(x) = elu(x) + 1 in float32 (strictly positive)."""
  return jax.nn.elu(x.astype(jnp.float32)) + 1.0


@jax.custom_jvp
def _divide(num, den):
  """num / den, differentiated as (dnum - out * dden) / den.

  The default rule for x / y differentiates through y ** -2: with the
  exponent shifts (performer) a row's denominator can be ~1e-20 while the
  quotient is O(1), and 1e-20 ** 2 is below float32's normal range, so it
  flushes to zero and the gradient becomes inf * 0 = NaN. Written with the
  quotient, nothing smaller than den itself is formed.
  """
  return num / den


@_divide.defjvp
def _divide_jvp(primals, tangents):
  num, den = primals
  dnum, dden = tangents
  out = num / den
  return out, (dnum - out * dden) / den


def _normalise(num, den, keep):
  """num / den where den > 0 and the row is kept, else zeros."""
  ok = (den > 0.0) & keep
  return jnp.where(ok, _divide(num, jnp.where(ok, den, 1.0)), 0.0)


def _no_top(k):
  """[b, kvh] of NEG_INF: the running top before any key."""
  return jnp.full((k.shape[0], k.shape[2]), masks.NEG_INF, jnp.float32)


def _feature_size(k_map, k):
  b = k.shape[0]
  phik, _ = jax.eval_shape(k_map, k[:, :1], jnp.ones((b, 1, 1, 1), bool),
                           _no_top(k))
  return phik.shape[-1]


def key_sums(k, v, kv_lengths, k_map, chunk: int):
  """(S [b, kvh, f, e], z [b, kvh, f]): sum over the valid keys j of
  phi(k_j) v_j^T and of phi(k_j), computed `chunk` keys at a time so the
  features of one chunk exist at once (k [b, n_k, kvh, d], v float32).
  The sums so far are rescaled by exp(old top - new top) when k_map's
  running top grows (feature_attention), so all keys end up shifted by the
  largest log-feature of all valid keys."""
  b, n_k, kvh, _ = k.shape
  chunk = min(chunk, max(n_k, 1))
  n = masks.ceil_div(max(n_k, 1), chunk) * chunk
  starts = jnp.arange(n // chunk) * chunk

  def step(state, xs):
    s, z, top = state
    kc, vc, start = xs
    valid = masks.block_valid(start, chunk, kv_lengths)[:, :, None, None]
    phik, new = k_map(kc, valid, top)
    factor = jnp.exp(top - new)
    top = new
    return (s * factor[:, :, None, None]
            + jnp.einsum('bskf,bske->bkfe', phik, vc),
            z * factor[:, :, None] + jnp.sum(phik, axis=1), top), None

  f = _feature_size(k_map, k)
  state = (jnp.zeros((b, kvh, f, v.shape[-1]), jnp.float32),
           jnp.zeros((b, kvh, f), jnp.float32), _no_top(k))
  step = jax.checkpoint(step, prevent_cse=False)
  (s, z, _), _ = lax.scan(step, state, (masks.row_blocks(k, chunk, n),
                                        masks.row_blocks(v, chunk, n),
                                        starts))
  return s, z


def causal_sums(q, k, v, kv_lengths, q_map, k_map, chunk: int):
  """Prefix sums over j <= i, chunk by chunk; (num, den) for the n_q query
  rows: num_i = sum_{j<=i} (phi(q_i) . phi(k_j)) v_j, den_i = sum_{j<=i}
  phi(q_i) . phi(k_j).

  q [b, n_q, kvh, g, d] (grouped queries), k [b, n_k, kvh, d], v [b, n_k,
  kvh, e] float32; q_map / k_map as in feature_attention, applied
  one chunk at a time, so the features of one chunk exist at once, for any
  feature size f (linear's f = d, performer's f = m). A lax.scan over
  chunks of `chunk` positions carries the [f, e] state of all earlier
  chunks; inside a chunk the [chunk, chunk] kernel is used directly. With
  an exponential k_map, chunk c's keys (and the state, rescaled) are
  shifted by the largest log-feature of the valid keys up to the end of
  chunk c, so a row is never scaled by keys more than a chunk ahead of it.
  The step is
  rematerialised (jax.checkpoint), so the backward pass keeps one state
  per chunk: memory O((N / chunk) f e + N chunk).
  """
  b, n_q, kvh = q.shape[:3]
  n_k, e = k.shape[1], v.shape[-1]
  chunk = min(chunk, max(n_q, n_k, 1))
  n = masks.ceil_div(max(n_q, n_k, 1), chunk) * chunk
  # Common padded length; padded keys are not valid (features 0), so they
  # add nothing, and padded query rows are cut off at the end.
  starts = jnp.arange(n // chunk) * chunk
  lower = jnp.tril(jnp.ones((chunk, chunk), bool))

  def step(state, xs):
    s, z, top = state  # [b, kvh, f, e], [b, kvh, f]: every earlier chunk
    qc, kc, vc, start = xs
    phiq = q_map(qc)
    valid = masks.block_valid(start, chunk, kv_lengths)[:, :, None, None]
    phik, new = k_map(kc, valid, top)
    factor = jnp.exp(top - new)
    top = new
    s = s * factor[:, :, None, None]
    z = z * factor[:, :, None]
    a = jnp.einsum('bqkgf,bskf->bkgqs', phiq, phik)
    a = jnp.where(lower, a, 0.0)
    num = (jnp.einsum('bkgqs,bske->bqkge', a, vc)
           + jnp.einsum('bqkgf,bkfe->bqkge', phiq, s))
    den = (jnp.sum(a, axis=-1).transpose(0, 3, 1, 2)
           + jnp.einsum('bqkgf,bkf->bqkg', phiq, z))[..., None]
    s = s + jnp.einsum('bskf,bske->bkfe', phik, vc)
    z = z + jnp.sum(phik, axis=1)
    return (s, z, top), (num, den)

  f = _feature_size(k_map, k)
  step = jax.checkpoint(step, prevent_cse=False)
  state = (jnp.zeros((b, kvh, f, e), jnp.float32),
           jnp.zeros((b, kvh, f), jnp.float32), _no_top(k))
  _, (num, den) = lax.scan(step, state, (
      masks.row_blocks(q, chunk, n), masks.row_blocks(k, chunk, n),
      masks.row_blocks(v, chunk, n), starts))
  return masks.unblock_rows(num, n_q), masks.unblock_rows(den, n_q)


def feature_attention(q, k, v, *, q_map, k_map, causal, q_lengths,
                      kv_lengths, chunk, dtype):
  """Normalised kernel attention phi(q_i) . phi(k_j) over the visible keys.

  q [b, n_q, kvh, g, d] (queries grouped by kv head), k [b, n_k, kvh, d],
  v [b, n_k, kvh, e]; q_lengths/kv_lengths int32 [b]. The feature maps
  work on a chunk of rows: q_map(q rows [b, c, kvh, g, d]) -> [b, c, kvh,
  g, f], and k_map(k rows [b, c, kvh, d], valid bool [b, c, 1, 1], top
  [b, kvh]) -> (features [b, c, kvh, f], new top [b, kvh]): non-negative
  float32 features, zero where not valid (a map must mask before any exp,
  so padded keys give no inf in the backward pass). `top` is a running key
  shift threaded through the chunks (NEG_INF before the first). A map that
  is an exponential (performer's) returns exp(log-feature - shift) with
  shift its new top, the largest log-feature of the valid keys so far
  (stop_gradient), and the sums made under the old top are rescaled by
  exp(old top - new top) <= 1 (key_sums, causal_sums): the shift cancels
  in the normalisation. A map that is not (linear's) returns top as given
  (the factor is then exp(0) = 1).
  Features are made `chunk` rows at a time, causal and bidirectional
  alike, so no [N, f] feature array exists (performer's f = 256 features
  per head would be 4x the queries). Padded query rows and rows with no
  visible key are zeros. Returns [b, n_q, kvh * g, e] in `dtype`. Shared
  by linear and performer (which differ only in the feature map).
  """
  b, n_q = q.shape[:2]
  e = v.shape[-1]
  vf = v.astype(jnp.float32)
  if causal:
    num, den = causal_sums(q, k, vf, kv_lengths, q_map, k_map, chunk)
    keep = (jnp.arange(n_q)[None, :] < q_lengths[:, None])[
        :, :, None, None, None]
    out = _normalise(num, den, keep)
  else:
    s, z = key_sums(k, vf, kv_lengths, k_map, ROW_BLOCK)
    chunk = min(ROW_BLOCK, max(n_q, 1))
    n = masks.ceil_div(max(n_q, 1), chunk) * chunk

    def rows(_, xs):
      qc, start = xs
      phiq = q_map(qc)
      num = jnp.einsum('bqkgf,bkfe->bqkge', phiq, s)
      den = jnp.einsum('bqkgf,bkf->bqkg', phiq, z)[..., None]
      keep = masks.block_valid(start, chunk, q_lengths)[:, :, None, None,
                                                        None]
      return None, _normalise(num, den, keep)

    rows = jax.checkpoint(rows, prevent_cse=False)
    _, out = lax.scan(rows, None, (masks.row_blocks(q, chunk, n),
                                   jnp.arange(n // chunk) * chunk))
    out = masks.unblock_rows(out, n_q)
  return out.reshape(b, n_q, -1, e).astype(dtype)


def feature_weights(phiq, phik, mask):
  """Dense float32 [b, kvh * g, n_q, n_k]: phiq_i . phik_j where `mask`
  ([b, 1|h, n_q, n_k]) allows it, each row divided by its sum (rows without
  keys are zeros)."""
  b, n_q, kvh, g, _ = phiq.shape
  a = jnp.einsum('bqkgd,bskd->bkgqs', phiq, phik).reshape(
      b, kvh * g, n_q, phik.shape[1])
  a = jnp.where(mask, a, 0.0)
  return _normalise(a, jnp.sum(a, axis=-1, keepdims=True), True)


def _key_map(kc, valid, top):
  # elu + 1 is not an exponential: nothing to shift, top passes through.
  return jnp.where(valid, feature_map(kc), 0.0), top


def linear_attention(q, k, v, *, causal, q_lengths, kv_lengths, chunk):
  """Linear attention [b, q_len, h, d] in q's dtype, no N x N array."""
  kv_heads, _ = masks.check_inputs(q, k, v)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  return feature_attention(
      masks.group_queries(q, kv_heads), k, v, q_map=feature_map,
      k_map=_key_map, causal=causal, q_lengths=ql, kv_lengths=kl,
      chunk=chunk, dtype=q.dtype)


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


# --- Decoding: the recurrent state ----------------------------------------


def feature_decode_init(batch, num_kv_heads, features, head_dim):
  """The running sums of causal kernel attention before any key: S [b, kvh,
  f, e], z [b, kvh, f] and the key shift `top` (NEG_INF: none yet)."""
  return {'s': jnp.zeros((batch, num_kv_heads, features, head_dim),
                         jnp.float32),
          'z': jnp.zeros((batch, num_kv_heads, features), jnp.float32),
          'top': jnp.full((batch, num_kv_heads), masks.NEG_INF, jnp.float32)}


def feature_decode_step(q, k, v, state, *, q_map, k_map):
  """(output [b, h, e] float32, state): the new key joins the sums (rescaled
  when k_map's shift grows, as causal_sums does chunk by chunk), then the
  query reads them: the causal forward's row for this position, in O(f e)
  per head whatever the position. q [b, h, d]; k, v [b, kvh, d]."""
  b, h, _ = q.shape
  kvh = k.shape[1]
  valid = jnp.ones((b, 1, 1, 1), bool)
  phik, top = k_map(k[:, None], valid, state['top'])
  factor = jnp.exp(state['top'] - top)
  s = (state['s'] * factor[:, :, None, None]
       + jnp.einsum('bskf,bske->bkfe', phik, v[:, None].astype(jnp.float32)))
  z = state['z'] * factor[:, :, None] + phik[:, 0]
  phiq = q_map(q.reshape(b, 1, kvh, h // kvh, -1))
  num = jnp.einsum('bqkgf,bkfe->bqkge', phiq, s)
  den = jnp.einsum('bqkgf,bkf->bqkg', phiq, z)[..., None]
  out = _normalise(num, den, True)
  return out.reshape(b, h, -1), {'s': s, 'z': z, 'top': top}


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: S = sum phi(k) v^T [d, d] and z = sum phi(k) [d] per
  kv head, constant in the position."""
  del params, max_len, num_heads, dtype, rng, learned
  return feature_decode_init(batch, num_kv_heads, head_dim, head_dim)


def decode_step(q, k, v, state, pos, params):
  del pos, params
  return feature_decode_step(q, k, v, state, q_map=feature_map,
                             k_map=_key_map)
