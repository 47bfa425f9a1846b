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

Optional depthwise convolution (the paper's skip connection on V; off by
default): with conv_kernel = K > 0 each query head h owns a kernel w_h of
K taps (learned, `init`), applied along the sequence to the values V' of
its kv head, V' being V with the padded positions (j >= kv_length) set to
zero and positions outside [0, N) zero:

  conv_h(V')_i = sum_{t=0}^{K-1} w_h[t] V'_{i + t - c},   c = (K - 1) // 2

(centred for odd K, the paper's 33; one more tap to the right for even
K), and out_i += conv_h(V')_i on the valid query rows (i < q_length;
padded query rows stay zero). It needs n_q = n_k (self-attention).
Learned parameters: {} when conv_kernel = 0 (so the model's state is as
before), else {'conv': float32 [num_heads, K]}, initialised as the
paper's code (a PyTorch Conv2d with groups = heads and its default init):
U(-1/sqrt(K), 1/sqrt(K)). `weights` is the attention matrix F pinv(A) B
only (the convolution is not attention); `reference` adds the same
convolution as a dense banded [n_q, n_k] matrix per head.

Causal attention is rejected with a ValueError: the paper defines no
causal form (segment means and the landmark softmaxes mix future tokens
into every row).

Hyperparameters (config.attention.nystromformer):
  num_landmarks    m, an integer >= 1 (default 64; clamped to the sequence).
  pinv_iterations  iterations of the pseudo-inverse, an integer >= 1
                   (default 6, the paper's).
  conv_kernel      K, taps of the depthwise convolution of V, an integer
                   >= 0 (default 0: off; the paper uses 33).

Complexity (N tokens, head dim d, m landmarks): time O(N m d + m^3 *
pinv_iterations), memory O(N m + m^2) per head (F and B, and the segment
matrix that averages the landmarks); the convolution adds O(N K d) time
and O(N d) memory per head. `weights` builds the dense matrix F
pinv(A) B (tests and pictures only); its rows sum to about 1 (exactly 1
when A is invertible and the iteration has converged).

Implementations:
  xla        the computation above (any backend); the convolution by
             lax.conv_general_dilated (depthwise).
  reference  the dense matrix F pinv(A) B times V (plus the banded
             convolution matrix times V); O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.nystromformer.num_landmarks',
                           params['num_landmarks'])
  masks.check_positive_int('attention.nystromformer.pinv_iterations',
                           params['pinv_iterations'])
  masks.check_positive_int('attention.nystromformer.conv_kernel',
                           params['conv_kernel'], minimum=0)


def init(key, params, *, num_heads, num_kv_heads, head_dim, max_len):
  """{} without the convolution; else {'conv': float32 [num_heads, K]}
  drawn from U(-1/sqrt(K), 1/sqrt(K))."""
  del num_kv_heads, head_dim, max_len
  check_params(params)
  taps = params['conv_kernel']
  if not taps:
    return {}
  bound = 1.0 / math.sqrt(taps)
  return {'conv': jax.random.uniform(key, (num_heads, taps), jnp.float32,
                                     -bound, bound)}


def _conv_weights(q, k, params, learned):
  """The kernels float32 [heads, K], or None when conv_kernel is 0;
  ValueError when `learned` does not fit."""
  taps = params['conv_kernel']
  if not taps:
    if learned:
      raise ValueError('attention.nystromformer.conv_kernel=0 owns no '
                       f'learned parameters, got {", ".join(sorted(learned))}')
    return None
  w = None if learned is None else learned.get('conv')
  want = (q.shape[2], taps)
  if w is None or tuple(w.shape) != want or len(learned) != 1:
    got = None if learned is None else {
        name: tuple(x.shape) for name, x in learned.items()}
    raise ValueError(
        f'attention.nystromformer.conv_kernel={taps} needs learned='
        f'{{conv: {list(want)}}} (made by init_learned), got {got}')
  if q.shape[1] != k.shape[1]:
    raise ValueError(
        f'attention.nystromformer.conv_kernel={taps} is self-attention only: '
        f'it needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}')
  return w.astype(jnp.float32)


def _zero_padded_values(v, kv_lengths):
  """V' float32 [b, n, kv_heads, d]: v with positions >= kv_length zero."""
  valid = jnp.arange(v.shape[1])[None, :] < kv_lengths[:, None]
  return jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)


def depthwise_conv(v, w, kv_lengths):
  """conv_h(V')_i = sum_t w[h, t] V'_{i + t - (K - 1) // 2}: float32 [b, n,
  heads, d] from v [b, n, kv_heads, d] and w [heads, K] (module docstring)."""
  b, n, kv_heads, d = v.shape
  heads, taps = w.shape
  vh = jnp.repeat(_zero_padded_values(v, kv_lengths), heads // kv_heads,
                  axis=2).reshape(b, n, heads * d)
  rhs = jnp.repeat(w.T, d, axis=1)[:, None, :]  # [K, 1, heads * d]
  lo = (taps - 1) // 2
  out = jax.lax.conv_general_dilated(
      vh, rhs, window_strides=(1,), padding=[(lo, taps - 1 - lo)],
      dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=heads * d,
      precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, n, heads, d)


def conv_matrix(w, n: int):
  """The convolution as dense banded matrices float32 [heads, n, n]:
  C[h, i, j] = w[h, j - i + (K - 1) // 2] where that tap exists (tests and
  the reference implementation)."""
  taps = w.shape[1]
  tap = (jnp.arange(n)[None, :] - jnp.arange(n)[:, None]
         + (taps - 1) // 2)  # [n, n]
  inside = (tap >= 0) & (tap < taps)
  return jnp.where(inside, w[:, jnp.clip(tap, 0, taps - 1)], 0.0)

# No causal form (av.supports_causal).
CAUSAL = False


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
            q_lengths=None, kv_lengths=None, rng=None, learned=None):
  """Dense float32 [b, h, q_len, kv_len]: F pinv(A) B, the attention
  without the convolution (rng unused)."""
  del v, implementation, rng
  _check_causal(causal)
  _conv_weights(q, k, params, learned)
  f, z, b = _kernels(q, k, params, q_lengths, kv_lengths)
  dense = f @ (z @ b)
  return dense.reshape(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None, learned=None):
  del rng
  _check_causal(causal)
  masks.check_inputs(q, k, v)
  check_params(params)
  w = _conv_weights(q, k, params, learned)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  if implementation == 'reference':
    dense = weights(q, k, v, params, q_lengths=q_lengths,
                    kv_lengths=kv_lengths, learned=learned)
    out = full.probs_times_v(dense, v, jnp.float32)
    if w is not None:
      conv = jnp.einsum('hij,bjhd->bihd', conv_matrix(w, k.shape[1]),
                        jnp.repeat(_zero_padded_values(v, kl),
                                   q.shape[2] // k.shape[2], axis=2))
      out = out + _valid_rows(conv, ql)
    return out.astype(q.dtype)
  f, z, b = _kernels(q, k, params, q_lengths, kv_lengths)
  bv = jnp.einsum('bkgin,bnke->bkgie', b, v.astype(jnp.float32))
  out = jnp.einsum('bkgnj,bkgje->bnkge', f, z @ bv)
  out = out.reshape(q.shape[:3] + (v.shape[-1],))
  if w is not None:
    out = out + _valid_rows(depthwise_conv(v, w, kl), ql)
  return out.astype(q.dtype)


def _valid_rows(x, q_lengths):
  """x [b, n, ...] with rows at or past q_length set to zero."""
  valid = jnp.arange(x.shape[1])[None, :] < q_lengths[:, None]
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, 0.0)
