"""Nystromformer attention (Xiong et al. 2021): a Nystrom approximation of
the softmax matrix through m landmarks, O(N m d). Bidirectional only.

With landmarks Q~ [m, d] and K~ [m, d] (segment means of the queries and
of the keys, below) and s = 1/sqrt(d):

  F = softmax(s Q K~^T)    [N, m]
  A = softmax(s Q~ K~^T)   [m, m]
  B = softmax(s Q~ K^T)    [m, N]   (padded keys masked)
  out = F (pinv(A) (B V)),

multiplied right to left, so no N x N array exists. pinv(A) is the
iterative Moore-Penrose approximation of the paper (Razavi et al. 2014):
Z_0 = A^T / (max_j sum_i |A_ij| * max_i sum_j |A_ij|) (largest column sum
times largest row sum, per matrix), then `pinv_iterations` times

  Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4.

Landmarks: the valid positions [0, L) of a row (L its q_length for Q~, its
kv_length for K~) are cut into m contiguous segments [floor(j L / m),
floor((j + 1) L / m)), j = 0..m-1, and each landmark is the mean of its
segment. Padded positions never enter a landmark, so the valid outputs do
not depend on the padding (neither its values nor its amount: a row of
length L padded to N gives the output of the same L tokens unpadded;
tested). When m divides L this is the paper's segment means; otherwise
segments differ in length by at most one. When L < m, L segments hold one
token each and the others are empty: an empty landmark is masked out of F's
and A's columns (keys) and A's and B's rows (queries), so it contributes
nothing (the iteration keeps A's zero rows and columns zero, i.e. it
computes the pseudo-inverse of the non-empty block). m is clamped to the
sequence length (which does not change the result). In particular when m >=
L every token is its own landmark, F = A = B = the full softmax matrix P,
and out = P pinv(P) P V = P V: full attention, up to the convergence of the
iteration (tests: 6 iterations are not enough for random softmax matrices
at m = N; see tests/test_nystromformer.py for the tolerances measured).

Query rows at or past q_length and rows with no valid key are zeros.
Statistics are float32 (inputs taken to float32); the output is in q's
dtype. GQA: keys' landmarks per kv head, queries' per query head.

Not implemented yet: the paper's depthwise convolution of V added to the
output (a learned parameter; parameters of kinds are a separate design
step). Causal attention is rejected with a ValueError: the paper defines no
causal form (segment means and the landmark softmaxes mix future tokens
into every row).

Hyperparameters (config.attention.nystromformer):
  num_landmarks    m, an integer >= 1 (default 64; clamped to the sequence).
  pinv_iterations  iterations of the pseudo-inverse, an integer >= 1
                   (default 6, the paper's).

Complexity (N tokens, head dim d, m landmarks): time O(N m d + m^3 *
pinv_iterations), memory O(N m + m^2) per head (F and B, and the segment
matrix that averages the landmarks). `weights` builds the dense matrix F
pinv(A) B (tests and pictures only); its rows sum to about 1 (exactly 1
when A is invertible and the iteration has converged).

Implementations:
  xla        the computation above (any backend).
  reference  the dense matrix F pinv(A) B times V; O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import jax.numpy as jnp

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.nystromformer.num_landmarks',
                           params['num_landmarks'])
  masks.check_positive_int('attention.nystromformer.pinv_iterations',
                           params['pinv_iterations'])


def _check_causal(causal):
  if causal:
    raise ValueError(
        'attention.kind=nystromformer is bidirectional only: the Nystrom '
        'approximation (Xiong et al. 2021) has no causal form (its landmarks '
        'average future tokens into every row); use a causal-capable kind '
        'for causal tasks')


def segment_means(x, lengths, m: int):
  """Landmarks of x [b, n, ...]: the means of m segments of the valid
  positions [0, length) (see the module docstring).

  Returns (means float32 [b, m, ...], nonempty bool [b, m]).
  """
  n = x.shape[1]
  pos = jnp.arange(n)[None, :]
  lengths = lengths[:, None]
  # Position i < L lies in segment j iff floor(j L / m) <= i <
  # floor((j + 1) L / m), i.e. j = floor(((i + 1) m - 1) / L).
  seg = ((pos + 1) * m - 1) // jnp.maximum(lengths, 1)
  member = ((seg[:, None, :] == jnp.arange(m)[None, :, None])
            & (pos < lengths)[:, None, :])  # [b, m, n]
  counts = jnp.sum(member, axis=-1)
  sums = jnp.einsum('bjn,bn...->bj...', member.astype(jnp.float32),
                    x.astype(jnp.float32))
  extra = (1,) * (x.ndim - 2)
  denom = jnp.maximum(counts, 1).astype(jnp.float32).reshape(
      counts.shape + extra)
  return sums / denom, counts > 0


def pinv(a, iterations: int):
  """Iterative Moore-Penrose pseudo-inverse of a [..., p, q] (float32):
  Z_0 = A^T / (max column sum * max row sum of |A|), then
  Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4. Zero rows and columns
  of A stay zero columns and rows of Z."""
  a = a.astype(jnp.float32)
  absa = jnp.abs(a)
  col = jnp.max(jnp.sum(absa, axis=-2), axis=-1)[..., None, None]
  row = jnp.max(jnp.sum(absa, axis=-1), axis=-1)[..., None, None]
  scale = col * row
  z = jnp.swapaxes(a, -1, -2) / jnp.where(scale > 0, scale, 1.0)
  eye = jnp.eye(a.shape[-2], dtype=jnp.float32)
  for _ in range(iterations):
    az = a @ z
    z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
  return z


def _kernels(q, k, params, q_lengths, kv_lengths):
  """(F [b, kvh, g, n_q, m], pinv(A) [b, kvh, g, m, m], B [b, kvh, g, m,
  n_k]) in float32."""
  check_params(params)
  kv_heads, _ = masks.check_inputs(q, k, k)
  n_q, n_k, d = q.shape[1], k.shape[1], q.shape[-1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  mq = min(params['num_landmarks'], max(n_q, 1))
  mk = min(params['num_landmarks'], max(n_k, 1))
  qg = masks.group_queries(q, kv_heads).astype(jnp.float32)
  kf = k.astype(jnp.float32)
  q_land, q_ok = segment_means(qg, ql, mq)  # [b, mq, kvh, g, d], [b, mq]
  k_land, k_ok = segment_means(kf, kl, mk)  # [b, mk, kvh, d], [b, mk]
  s = masks.default_scale(d)
  q_valid = jnp.arange(n_q)[None, :] < ql[:, None]
  k_valid = jnp.arange(n_k)[None, :] < kl[:, None]
  rows = lambda ok: ok[:, None, None, :, None]  # [b, 1, 1, rows, 1]
  cols = lambda ok: ok[:, None, None, None, :]  # [b, 1, 1, 1, cols]
  f = masks.masked_softmax(
      jnp.einsum('bnkgd,bjkd->bkgnj', qg, k_land) * s,
      rows(q_valid) & cols(k_ok))
  a = masks.masked_softmax(
      jnp.einsum('bikgd,bjkd->bkgij', q_land, k_land) * s,
      rows(q_ok) & cols(k_ok))
  b = masks.masked_softmax(
      jnp.einsum('bikgd,bnkd->bkgin', q_land, kf) * s,
      rows(q_ok) & cols(k_valid))
  return f, pinv(a, params['pinv_iterations']), b


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense float32 [b, h, q_len, kv_len]: F pinv(A) B (rng unused)."""
  del v, implementation, rng
  _check_causal(causal)
  f, z, b = _kernels(q, k, params, q_lengths, kv_lengths)
  dense = f @ (z @ b)
  return dense.reshape(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del rng
  _check_causal(causal)
  masks.check_inputs(q, k, v)
  if implementation == 'reference':
    w = weights(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths)
    return full.probs_times_v(w, v, q.dtype)
  f, z, b = _kernels(q, k, params, q_lengths, kv_lengths)
  bv = jnp.einsum('bkgin,bnke->bkgie', b, v.astype(jnp.float32))
  out = jnp.einsum('bkgnj,bkgje->bnkge', f, z @ bv)
  return out.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype)
