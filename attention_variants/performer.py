"""Performer attention, FAVOR+ (Choromanski et al. 2021, "Rethinking
Attention with Performers"): softmax attention through positive orthogonal
random features, O(N m d).

Softmax's exp(q . k / sqrt(d)) is replaced by the estimate phi(q) . phi(k)
with the positive random features

  phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   x' = x / d^(1/4),

W = [w_1 .. w_m] of shape [m, d]. Each w_r is marginally a standard
Gaussian vector, so E[exp(w . x' - |x'|^2/2) exp(w . y' - |y'|^2/2)] =
exp(x' . y') = exp(q . k / sqrt(d)): an unbiased estimate of the softmax
kernel, and positive, so every weight is > 0 (tested). For query i over its
visible keys j (j < kv_length; causal also j <= i, top-left aligned):

  out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j).

Orthogonal features: W is built in blocks of d rows; each block is Q^T of
the QR decomposition of a d x d standard Gaussian matrix (Q's columns
multiplied by the signs of R's diagonal, so Q is Haar distributed), the last
block cut to m mod d rows; then every row is rescaled by the norm of an
independent standard Gaussian d-vector (chi distributed with d degrees of
freedom), so each row is again marginally N(0, I) and the estimate stays
unbiased while rows within a block are exactly orthogonal. One W per kv
head; the query heads of a GQA group share it (q and k must use the same
features). The QR decomposition is Householder's, written in jnp ops
(`haar_orthogonal`), not jnp.linalg.qr: on CPU, jaxlib 0.10.2's LAPACK QR
kernels hand their batch to XLA's thread pool and block a pool thread
until it is done, so two of them running at once (two layers drawing their
features in one train step) can wait on each other forever; this hung MQAR
training on 2 cores (every thread in a futex wait, in sgeqrf and sorgqr).

Numerical stability (as the paper's code): exponents are shifted before exp
by constants that cancel in the normalisation. For a query row the shift is
c_i = max_r (w_r . q_i' - |q_i'|^2 / 2), its own largest exponent (so its
largest feature is exactly 1/sqrt(m) and a row never underflows to all
zeros); it multiplies row i's numerator and denominator alike by exp(-c_i).
For keys the shift is one constant c_K for all the keys a row sees, never
per key (that would reweight the keys): it multiplies every term of the row
by exp(-c_K), which cancels too. Bidirectional: c_K is the largest exponent
over all valid keys and all features, per (batch row, kv head). Causal: the
keys are taken chunk by chunk, and chunk c's keys are shifted by the
largest exponent of the valid keys up to the end of chunk c (a running
maximum; the state of the earlier chunks is rescaled by exp(old - new) when
it grows, as an online softmax rescales), so a row is never scaled down by
keys more than a chunk ahead of it: one global c_K scaled the first rows by
every later key, and where the early keys' exponents lie ~100 below a later
key's, their features underflowed to 0 and the rows came out as zeros
(tested). A shift is 0 where there is no valid key. Shifts are
stop_gradient (the output does not depend on them). Padded keys' exponents
are masked before exp (their features are exactly 0, with no inf in the
backward pass).

Bidirectional: one sum over keys (S = sum_j phi(k_j) v_j^T [m, d], z =
sum_j phi(k_j) [m]). Causal: prefix sums chunk by chunk, linear.py's
`causal_sums` (lax.scan carrying the [m, d] state, quadratic inside a
chunk, jax.checkpoint on the scan step). Features are computed one block of
rows at a time and never exist for the whole sequence (linear.py's
`feature_attention`: `chunk` rows when causal, linear.ROW_BLOCK = 256 rows
when bidirectional), c_K as a running maximum along the way. Query rows at
or past q_length and rows with no visible key are zeros. Statistics are
float32 (q, k, v and W taken to float32); the output is in q's dtype.

Hyperparameters (config.attention.performer):
  num_features  m, random features per kv head, an integer >= 1 (default
                256). The estimate's variance falls as 1/m.
  redraw_every  R, an integer >= 0. R >= 1: draw W from the `rng` the
                model passes. The trainer passes a key that changes every R
                training steps (train/step.py: train_keys, folded with the
                layer index), so the features are redrawn every R steps
                (default 1: every step); at evaluation it passes one fixed
                key, so evaluation features are fixed by config.seed, and a
                call with rng=None (no key at all) draws from `seed`. 0:
                never redraw: W always comes from `seed`, in training and
                evaluation alike (rng ignored).
  seed          integer >= 0: W = draw(PRNGKey(seed)) when no rng is used
                (the model offsets it by the layer index, so layers differ).
  chunk         positions per causal chunk, an integer >= 1 (default 64,
                clamped to the sequence); it changes only rounding;
                bidirectional attention uses linear.ROW_BLOCK instead.

Complexity (N tokens, head dim d, m features, chunk C, B = 256 rows):
bidirectional O(N m d) time and O(N d + B m + m d) memory; causal O(N C m
+ N m d) time and O(N d + C m + N C) memory forward, plus one [m, d] state
per chunk, (N / C) m d, kept for the backward pass. Drawing W: ceil(m / d)
QR decompositions of d x d per kv head, O(m d^2). No N x N array and no
[N, m] feature array exists in `attend`; `weights` builds the dense
normalised kernel matrix for the same features attend draws with the same
rng (tests and pictures only).

Implementations:
  xla        the computation above (any backend).
  reference  the dense normalised kernel matrix (same features) times V;
             O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention_variants import full
from attention_variants import linear
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.performer.num_features',
                           params['num_features'])
  masks.check_positive_int('attention.performer.redraw_every',
                           params['redraw_every'], minimum=0)
  masks.check_positive_int('attention.performer.seed', params['seed'],
                           minimum=0)
  masks.check_positive_int('attention.performer.chunk', params['chunk'])


def feature_key(rng, params):
  """The key W is drawn from: rng, or PRNGKey(seed) when rng is None or
  redraw_every is 0."""
  if rng is None or params['redraw_every'] == 0:
    return jax.random.PRNGKey(params['seed'])
  return rng


def haar_orthogonal(g):
  """Q diag(sign(diag R)) for the QR decomposition G = Q R of each g [...,
  d, d] (float32): Householder reflections H_k = I - 2 v_k v_k^T, one per
  column (a lax.fori_loop), applied to R and accumulated into Q, then the
  sign fix. For a Gaussian g the result is Haar distributed; it equals the
  same correction of jnp.linalg.qr's Q (tested)."""
  d = g.shape[-1]
  rows = jnp.arange(d)

  def reflect(k, qr):
    q, r = qr
    x = jnp.where(rows >= k, r[..., :, k], 0.0)  # column k, rows >= k
    x0 = r[..., k, k]
    alpha = -jnp.where(x0 >= 0, 1.0, -1.0) * jnp.linalg.norm(x, axis=-1)
    v = x - alpha[..., None] * (rows == k)
    v = v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)
    vr = jnp.einsum('...i,...ij->...j', v, r)  # v^T R
    qv = jnp.einsum('...ij,...j->...i', q, v)  # Q v
    r = r - 2.0 * v[..., :, None] * vr[..., None, :]
    q = q - 2.0 * qv[..., :, None] * v[..., None, :]
    return q, r

  eye = jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), g.shape)
  q, r = jax.lax.fori_loop(0, d, reflect, (eye, g.astype(jnp.float32)))
  return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def projections(key, num_features: int, head_dim: int, kv_heads: int):
  """W: float32 [kv_heads, num_features, head_dim], orthogonal blocks of
  head_dim rows with chi-distributed row norms (see the module docstring)."""
  d, m = head_dim, num_features
  blocks = masks.ceil_div(m, d)
  k_dirs, k_norms = jax.random.split(key)
  g = jax.random.normal(k_dirs, (kv_heads, blocks, d, d), jnp.float32)
  qmat = haar_orthogonal(g)
  rows = jnp.swapaxes(qmat, -1, -2).reshape(kv_heads, blocks * d, d)[:, :m]
  norms = jnp.linalg.norm(
      jax.random.normal(k_norms, (kv_heads, m, d), jnp.float32), axis=-1)
  return rows * norms[..., None]


def exponents(x, w):
  """w_r . x' - |x'|^2 / 2 with x' = x / d^(1/4), float32.

  x [b, n, kvh, d] (keys) or [b, n, kvh, g, d] (grouped queries), w [kvh,
  m, d]; returns [..., kvh, (g,) m]."""
  x = x.astype(jnp.float32) * x.shape[-1] ** -0.25
  sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  if x.ndim == 5:
    return jnp.einsum('bnkgd,kmd->bnkgm', x, w) - sq
  return jnp.einsum('bnkd,kmd->bnkm', x, w) - sq


def query_map(w):
  """phi(q) of a chunk of grouped query rows [b, c, kvh, g, d] -> [b, c,
  kvh, g, m], float32, each row shifted by its own largest exponent."""
  norm = 1.0 / math.sqrt(w.shape[1])

  def phi(qc):
    eq = exponents(qc, w)
    c_q = jax.lax.stop_gradient(jnp.max(eq, axis=-1, keepdims=True))
    return jnp.exp(eq - c_q) * norm
  return phi


def key_map(w):
  """phi(k) of a chunk of key rows [b, c, kvh, d] with validity [b, c, 1,
  1], given the running top [b, kvh] -> (features [b, c, kvh, m] float32,
  new top): the top grows to the chunk's largest exponent over its valid
  keys and all features (stop_gradient), and the features are shifted by
  it (0 while no key is valid); padded keys' exponents are masked before
  exp, so their features are exactly 0 (linear.feature_attention's
  k_map)."""
  norm = 1.0 / math.sqrt(w.shape[1])

  def phi(kc, valid, top):
    ek = jnp.where(valid, exponents(kc, w), masks.NEG_INF)
    top = jnp.maximum(top, jax.lax.stop_gradient(jnp.max(ek, axis=(1, 3))))
    shift = jnp.where(top > 0.5 * masks.NEG_INF, top, 0.0)[:, None, :, None]
    return jnp.where(valid, jnp.exp(ek - shift), 0.0) * norm, top
  return phi


def _setup(q, k, v, params, rng, q_lengths, kv_lengths):
  """(grouped q, phi(q) map, phi(k) map, q lengths, kv lengths)."""
  check_params(params)
  kv_heads, _ = masks.check_inputs(q, k, v)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  w = projections(feature_key(rng, params), params['num_features'],
                  q.shape[-1], kv_heads)
  return masks.group_queries(q, kv_heads), query_map(w), key_map(w), ql, kl


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense float32 [b, h, q_len, kv_len]: the normalised random-feature
  kernel for the features attend draws with the same rng and params."""
  del implementation
  gq, q_map, k_map, _, kl = _setup(q, k, v, params, rng, q_lengths,
                                   kv_lengths)
  valid = (jnp.arange(k.shape[1])[None, :] < kl[:, None])[:, :, None, None]
  # All keys as one chunk: one shift, the largest exponent of all valid
  # keys (the normalised matrix is the same for any shift common to a
  # row's keys).
  phik, _ = k_map(k, valid, jnp.full((k.shape[0], k.shape[2]),
                                     masks.NEG_INF, jnp.float32))
  mask = full.full_mask(q, k, causal=causal, q_lengths=q_lengths,
                        kv_lengths=kv_lengths)
  return linear.feature_weights(q_map(gq), phik, mask)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  if implementation == 'reference':
    w = weights(q, k, v, params, causal=causal, q_lengths=q_lengths,
                kv_lengths=kv_lengths, rng=rng)
    return full.probs_times_v(w, v, q.dtype)
  gq, q_map, k_map, ql, kl = _setup(q, k, v, params, rng, q_lengths,
                                    kv_lengths)
  return linear.feature_attention(
      gq, k, v, q_map=q_map, k_map=k_map, causal=causal, q_lengths=ql,
      kv_lengths=kl, chunk=params['chunk'], dtype=q.dtype)


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: the features W drawn once from the key the forward
  pass would use (feature_key), and linear's running sums over m features
  per kv head: O(m d) per head, constant in the position."""
  del max_len, num_heads, dtype, learned
  check_params(params)
  w = projections(feature_key(rng, params), params['num_features'],
                  head_dim, num_kv_heads)
  return {'w': w, **linear.feature_decode_init(
      batch, num_kv_heads, params['num_features'], head_dim)}


def decode_step(q, k, v, state, pos, params):
  del pos, params
  w = state['w']
  sums = {n: state[n] for n in ('s', 'z', 'top')}
  out, sums = linear.feature_decode_step(q, k, v, sums, q_map=query_map(w),
                                         k_map=key_map(w))
  return out, {'w': w, **sums}
