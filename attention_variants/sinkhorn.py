"""Sparse Sinkhorn attention (Tay et al. 2020): each block of queries attends
to its own block and to a learned soft permutation ("sorting") of the key
blocks. Owns learned parameters (the sorting network).

Blocks. Queries and keys are cut at the same absolute positions into blocks
of b = min(block_size, max(n_q, n_k)) positions: query block i holds rows
[i b, (i + 1) b), key block j keys [j b, (j + 1) b); the last block of
each is padded. n_qb = ceil(n_q / b) query blocks, n_kb = ceil(n_k / b) key
blocks. Valid positions are i < q_length, j < kv_length.

Sorting matrix R [n_qb, n_kb], per batch row and kv head:
  1. A summary s_i of query block i (the attention contract sees q, k and v,
     not the layer input x, so the paper's block pooling of x becomes a
     pooling of the queries): the mean of the valid queries of block i over
     its positions and over the query heads of the kv head's GQA group.
     Causal: the mean of the valid queries at positions 0 .. i b (the
     prefix up to and including block i's first token, which every query of
     block i may see).
  2. A two-layer sorting network per kv head (the paper's meta sorting
     network is a small feed-forward net on the pooled block; LRA's code
     uses one linear layer):
       logits_i = W2 relu(W1 s_i + b1) + b2,  W1 [d, d], W2 [d, M],
     M = ceil(max_len / block_size) outputs, of which the first n_kb are
     used: logits_ij scores key block j for query block i.
  3. Entries allowed: valid query block i (i b < q_length) and valid key
     block j (j b < kv_length); causal also j < i (block i is sorted only
     from earlier blocks, which every query of block i may see whole).
  4. Sinkhorn balancing in the log domain: X = logits / temperature on the
     allowed entries, then `sinkhorn_iterations` times a row normalisation
     X_ij -= logsumexp_j' X_ij' followed by a column normalisation
       bidirectional  X_ij -= logsumexp_i' X_i'j,
       causal         X_ij -= logsumexp_{i' <= i} X_i'j   (Causal Sinkhorn
                      balancing: a row is normalised only with itself and
                      earlier rows, so nothing in row i depends on a later
                      block; every sum runs over allowed entries only),
     and R = exp(X) on the allowed entries, 0 elsewhere. For a square
     bidirectional R the iteration converges to a doubly-stochastic matrix
     (rows and columns summing to 1; tested); the causal matrix is
     strictly lower-triangular and not doubly stochastic.
No Gumbel noise is added (the output is deterministic; rng is unused).

Sorted block i: slot t (0 <= t < b) of it is the mixture of the keys (and
values) at slot t of the key blocks,
  k~_it = sum_j w_ijt k_{j b + t},  w_ijt = R_ij m_jt / sum_j' R_ij' m_j't,
where m_jt = 1 if key j b + t is valid (else 0): padded keys never
contribute, and the mixture is convex even where the truncated iteration
leaves rows of R not summing to 1. A slot with no valid key in any allowed
block (sum 0) is masked out; so is the whole sorted block of a row without
allowed entries (causal block 0, padded rows).

Attention: query i (in block c) attends to the keys of its own block c
(padding masked, and j <= i when causal) and to the b slots of sorted block
c, in ONE softmax over those 2 b keys with the 1/sqrt(d) scale. Query rows
at or past q_length, and rows with no visible key, are zeros.

One block (block_size >= the sequence) is exactly full attention: R = [1],
the sorted block is the block itself, and a softmax over two copies of the
same keys gives each copy half the weight, so both the output and the dense
weights over the original keys are full attention's (tested). Causal
block 0 has no sorted block. Likewise an identity R is block-local
attention: a block attending to itself twice counts once.

Components (weight_parts, the mass on each in pictures): 'own_block' and
'sorted_block' (the mass on the sorted slots, spread over the keys they
mix).

Hyperparameters (config.attention.sinkhorn):
  block_size           b, an integer >= 1 (default 64: LRA's cifar10 and
                       pathfinder32 configs; its ListOps, text and
                       retrieval runs keep the model's default 50, a
                       divisor of their 2K/4K lengths; here any length
                       works, the last block is padded). Clamped to the
                       sequence.
  sinkhorn_iterations  row + column normalisation rounds, an integer >= 1
                       (default 7, with temperature 0.75 the setting
                       reported best in the paper, as lucidrains'
                       sinkhorn-transformer and xformers default to).
  temperature          tau > 0 dividing the sorting logits (default 0.75).

Learned parameters (init; per layer, float32): sort_w1 [kv_heads, d, d],
sort_b1 [kv_heads, d], sort_w2 [kv_heads, d, M], sort_b2 [kv_heads, M] with
M = ceil(max_len / block_size). Keys past max_len (more than M key blocks)
are an error.

Not implemented: SortCut, Gumbel noise, and the rule of LRA's released
code, which cuts blocks with a strided reshape and whose einsum sums the
key-block axis and the permutation's axis separately (so its "sorted" block
is the sum of all blocks) and by default sorts with a plain softmax.

How it is computed (xla): R, then the sorted blocks of every query block
(O(N d)), then a lax.scan over steps of STEP_ROWS = 512 query rows, each
step one softmax per row over its own block's keys and its sorted block
(masks.key_parts_output with two KeyParts), rematerialised in the backward
pass (jax.checkpoint): only one step's [512, 2 b] scores exist at a time.

Complexity per head (N tokens, n_b = N / b blocks, head dim d, T
iterations): the attention is O(N b d) (scores [N, 2 b]); the sorting
network O(n_b d^2 + n_b^2 d) and the balancing O(T n_b^2); mixing the
blocks with the dense soft permutation is O(n_b^2 b d) = O(N^2 d / b)
time but only O(N d) memory. Memory (forward and backward) O(N d + 512 b
+ T n_b^2); no N x N array exists in `attend` (`weights` and `reference`
build the dense [n_q, n_k] probabilities over the original keys, for tests
and pictures). Statistics are float32; the output is in q's dtype; GQA
shares R and the sorted blocks between the query heads of a kv head.

Implementations:
  xla        the blocked computation above (any backend).
  reference  the dense weight matrix over the original keys times V;
             O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')

LEARNED = ('sort_w1', 'sort_b1', 'sort_w2', 'sort_b2')


def check_params(params):
  masks.check_positive_int('attention.sinkhorn.block_size',
                           params['block_size'])
  masks.check_positive_int('attention.sinkhorn.sinkhorn_iterations',
                           params['sinkhorn_iterations'])
  tau = params['temperature']
  if (isinstance(tau, bool) or not isinstance(tau, (int, float))
      or not math.isfinite(tau) or tau <= 0):
    raise ValueError(f'attention.sinkhorn.temperature={tau!r} is invalid: '
                     'must be a finite number > 0')


def num_outputs(params, max_len: int) -> int:
  """M: key blocks the sorting network scores, ceil(max_len / block_size)."""
  return masks.ceil_div(max(int(max_len), 1), params['block_size'])


def init(key, params, *, num_heads, num_kv_heads, head_dim, max_len):
  """The sorting network of one layer: {name: float32 array} (LEARNED)."""
  del num_heads
  check_params(params)
  m = num_outputs(params, max_len)
  k1, k2 = jax.random.split(key)
  scale = 1.0 / math.sqrt(head_dim)
  normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32) * scale
  return {
      'sort_w1': normal(k1, (num_kv_heads, head_dim, head_dim)),
      'sort_b1': jnp.zeros((num_kv_heads, head_dim), jnp.float32),
      'sort_w2': normal(k2, (num_kv_heads, head_dim, m)),
      'sort_b2': jnp.zeros((num_kv_heads, m), jnp.float32),
  }


def blocks(n_q: int, n_k: int, block_size: int):
  """(b, query blocks, key blocks): the block clamped to the sequence."""
  b = min(block_size, max(n_q, n_k, 1))
  return b, masks.ceil_div(n_q, b), masks.ceil_div(n_k, b)


def _check_learned(learned, kv_heads, d, n_kb):
  missing = [name for name in LEARNED if name not in learned]
  if missing:
    raise ValueError(f'attention kind sinkhorn: learned is missing '
                     f'{", ".join(missing)} (made by init_learned)')
  w1, w2 = learned['sort_w1'], learned['sort_w2']
  if w1.shape != (kv_heads, d, d) or w2.shape[:2] != (kv_heads, d):
    raise ValueError(
        f'attention kind sinkhorn: sorting network of shape {w1.shape} / '
        f'{w2.shape} does not fit {kv_heads} kv heads of dim {d}')
  if w2.shape[2] < n_kb:
    raise ValueError(
        f'attention kind sinkhorn: {n_kb} key blocks, but the sorting '
        f'network scores {w2.shape[2]} (init with a larger max_len)')


def _masked_lse(x, mask, axis):
  """logsumexp of x over `axis` on the masked entries (NEG_INF if none)."""
  x = jnp.where(mask, x, masks.NEG_INF)
  top = lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  total = jnp.sum(jnp.where(mask, jnp.exp(x - top), 0.0), axis=axis,
                  keepdims=True)
  return top + jnp.log(jnp.where(total > 0, total, 1.0))


def _prefix_lse(x):
  """logsumexp of x [..., rows, cols] over rows 0 .. i, for every row i: a
  scan down the rows carrying a running maximum and sum, so row i's value
  never reads a later row (lax.cumlogsumexp's gradient compiles several
  times slower)."""
  rows = jnp.moveaxis(x, -2, 0)

  def step(carry, row):
    top, total = carry
    new_top = lax.stop_gradient(jnp.maximum(top, row))
    total = total * jnp.exp(top - new_top) + jnp.exp(row - new_top)
    return (new_top, total), new_top + jnp.log(total)

  start = (jnp.full(rows.shape[1:], masks.NEG_INF, jnp.float32),
           jnp.zeros(rows.shape[1:], jnp.float32))
  _, out = lax.scan(step, start, rows)
  return jnp.moveaxis(out, 0, -2)


def balance(logits, allowed, iterations: int, *, causal: bool):
  """Sinkhorn balancing of logits [..., rows, cols] over the `allowed`
  entries (module docstring, step 4): exp of `iterations` rounds of row
  then column log-normalisation (causal: column sums over rows <= i);
  float32, 0 where not allowed."""
  def round_(_, x):
    x = jnp.where(allowed, x - _masked_lse(x, allowed, -1), masks.NEG_INF)
    col = _prefix_lse(x) if causal else _masked_lse(x, allowed, -2)
    return jnp.where(allowed, x - col, masks.NEG_INF)

  x = jnp.where(allowed, logits.astype(jnp.float32), masks.NEG_INF)
  # A loop, not unrolled: one round is compiled once (and a scan
  # differentiates it), whatever the number of iterations.
  x = lax.fori_loop(0, iterations, round_, x)
  return jnp.where(allowed, jnp.exp(x), 0.0)


def _summaries(q, ql, kv_heads, b, n_qb, causal):
  """Query-block summaries float32 [batch, n_qb, kv_heads, d] (step 1)."""
  groups = q.shape[2] // kv_heads
  n_q = q.shape[1]
  valid = jnp.arange(n_q)[None, :] < ql[:, None]
  qs = masks.group_queries(q, kv_heads).astype(jnp.float32).sum(3)
  qs = jnp.where(valid[:, :, None, None], qs, 0.0)
  qs = masks.pad_to_multiple(qs, 1, b).reshape(
      (q.shape[0], n_qb, b) + qs.shape[2:])
  sums = qs.sum(2)
  first = jnp.arange(n_qb)[None, :] * b
  if causal:  # positions 0 .. i b: earlier blocks and block i's first row
    sums = jnp.cumsum(sums, axis=1) - sums + qs[:, :, 0]
    counts = jnp.minimum(first + 1, ql[:, None])
  else:
    counts = jnp.clip(ql[:, None] - first, 0, b)
  counts = jnp.maximum(counts, 1).astype(jnp.float32) * groups
  return sums / counts[:, :, None, None]


def sorting_matrix(q, k, learned, params, *, causal, q_lengths=None,
                   kv_lengths=None):
  """R float32 [batch, kv_heads, n_qb, n_kb] (module docstring, steps
  1-4), 0 outside the allowed entries."""
  check_params(params)
  kv_heads, _ = masks.check_inputs(q, k, k)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  b, n_qb, n_kb = blocks(q.shape[1], k.shape[1], params['block_size'])
  _check_learned(learned, kv_heads, q.shape[-1], n_kb)
  s = _summaries(q, ql, kv_heads, b, n_qb, causal)
  f32 = lambda name: jnp.asarray(learned[name], jnp.float32)
  hidden = jax.nn.relu(jnp.einsum('bikd,kde->bkie', s, f32('sort_w1'))
                       + f32('sort_b1')[None, :, None, :])
  logits = (jnp.einsum('bkie,kej->bkij', hidden, f32('sort_w2')[..., :n_kb])
            + f32('sort_b2')[None, :, None, :n_kb])
  rows = jnp.arange(n_qb)[None, :] * b < ql[:, None]
  cols = jnp.arange(n_kb)[None, :] * b < kl[:, None]
  allowed = rows[:, None, :, None] & cols[:, None, None, :]
  if causal:
    allowed &= jnp.arange(n_kb)[None, :] < jnp.arange(n_qb)[:, None]
  return balance(logits / params['temperature'], allowed,
                 params['sinkhorn_iterations'], causal=causal)


def _fit(x, n):
  """x [b, len, ...] cut or zero-padded to length n along axis 1."""
  if x.shape[1] >= n:
    return x[:, :n]
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


# Query rows per loop step: each step's scores are [batch, rows / b blocks,
# heads, b, 2 b] floats, so memory stays O(N) plus one step.
STEP_ROWS = 512


def sinkhorn_attention(q, k, v, learned, params, *, causal, q_lengths,
                       kv_lengths):
  """Blocked Sinkhorn attention [b, n_q, h, d] in q's dtype."""
  kv_heads, groups = masks.check_inputs(q, k, v)
  bsz, n_q, h, d = q.shape
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  b, n_qb, n_kb = blocks(n_q, k.shape[1], params['block_size'])
  r = sorting_matrix(q, k, learned, params, causal=causal, q_lengths=ql,
                     kv_lengths=kl)
  scale = masks.default_scale(d)
  group = min(max(STEP_ROWS // b, 1), n_qb)  # query blocks per loop step
  steps = masks.ceil_div(n_qb, group)
  n_blocks = steps * group

  # Sorted blocks [b, n_qb, kvh, b, d] (v: [.., d, b]): slot t mixes slot t
  # of the valid keys of every key block, weights R m (module docstring).
  key_ok = (jnp.arange(n_kb * b)[None, :] < kl[:, None]).reshape(
      bsz, n_kb, b)
  kb, vb = (jnp.where(key_ok[..., None, None],
                      masks.pad_to_multiple(x, 1, b).reshape(
                          bsz, n_kb, b, kv_heads, d).astype(jnp.float32), 0.0)
            for x in (k, v))
  den = jnp.einsum('bkij,bjt->bikt', r, key_ok.astype(jnp.float32))
  inv = jnp.where(den > 0, 1.0 / jnp.where(den > 0, den, 1.0), 0.0)
  sorted_k = jnp.einsum('bkij,bjtkd->biktd', r, kb) * inv[..., None]
  sorted_v = jnp.einsum('bkij,bjtkd->bikdt', r, vb) * inv[:, :, :, None, :]
  sorted_k, sorted_v, slot_ok = (
      _fit(x, n_blocks) for x in (sorted_k.astype(k.dtype),
                                  sorted_v.astype(v.dtype), den > 0))

  # Every array the loop reads, cut into n_blocks query blocks and laid out
  # once, outside the loop, in the order the matmuls read them.
  qb = _fit(q, n_blocks * b).reshape(bsz, n_blocks, b, kv_heads, groups, d)
  own_k, own_v = (_fit(x, n_blocks * b).reshape(bsz, n_blocks, b, kv_heads, d)
                  for x in (k, v))
  own_k = own_k.transpose(0, 1, 3, 2, 4)  # [b, n, kvh, b, d]
  own_v = own_v.transpose(0, 1, 3, 4, 2)  # [b, n, kvh, d, b]

  def step(_, i):
    first = i * group
    cut = lambda x: lax.dynamic_slice_in_dim(x, first, group, axis=1)
    pos = (first + jnp.arange(group))[:, None] * b + jnp.arange(b)
    q_pos = pos[None, :, None, None, :]  # masks.allowed layout
    key_pos = pos[:, None, None, None, :]  # KeyPart.pos layout
    own = masks.KeyPart(
        k=cut(own_k)[:, :, :, None, None], v=cut(own_v)[:, :, :, None, None],
        mask=masks.allowed(q_pos, q_pos, ql, kl, causal=causal),
        pos=key_pos)
    q_ok = (pos[None] < ql[:, None, None])[:, :, None, None, :, None]
    mixed = masks.KeyPart(
        k=cut(sorted_k)[:, :, :, None, None],
        v=cut(sorted_v)[:, :, :, None, None],
        mask=cut(slot_ok)[:, :, :, None, None, :] & q_ok,
        pos=key_pos)  # unused (attention_weights is dense_weights)
    out = masks.key_parts_output(cut(qb), [own, mixed], scale)
    return None, out.reshape(bsz, group * b, h, d).astype(q.dtype)

  step = jax.checkpoint(step, prevent_cse=False)
  _, out = lax.scan(step, None, jnp.arange(steps))
  out = jnp.moveaxis(out, 0, 1).reshape(bsz, n_blocks * b, h, d)
  return out[:, :n_q]


def dense_parts(q, k, learned, params, *, causal, q_lengths, kv_lengths):
  """{'own_block', 'sorted_block'}: float32 [b, h, n_q, n_k] each, the
  probability each query puts on each original key through its own block's
  keys, and through its sorted block's slots (their weights times the
  mixture weights w, module docstring); computed densely. Their sum is the
  attention distribution."""
  kv_heads, _ = masks.check_inputs(q, k, k)
  bsz, n_q, h, d = q.shape
  n_k = k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  b, _, _ = blocks(n_q, n_k, params['block_size'])
  r = sorting_matrix(q, k, learned, params, causal=causal, q_lengths=ql,
                     kv_lengths=kl)
  q_block = jnp.arange(n_q) // b
  key = jnp.arange(n_k)
  k_valid = (key[None, :] < kl[:, None]).astype(jnp.float32)
  # Mixture weights of slot t of sorted block i over the keys: [b, kvh,
  # n_qb, b, n_k], nonzero only at keys j b + t.
  slot = (key[None, :] % b == jnp.arange(b)[:, None]).astype(jnp.float32)
  num = (r[..., key // b] * k_valid[:, None, None, :])[:, :, :, None, :] * slot
  den = num.sum(-1, keepdims=True)
  mix = num / jnp.where(den > 0, den, 1.0)
  mix_q = mix[:, :, q_block]  # per query row: [b, kvh, n_q, b, n_k]
  kf = k.astype(jnp.float32)
  qg = masks.group_queries(q, kv_heads).astype(jnp.float32)
  sorted_k = jnp.einsum('bkqtp,bpkd->bkqtd', mix_q, kf)
  scale = masks.default_scale(d)
  s_own = jnp.einsum('bqkgd,bpkd->bkgqp', qg, kf) * scale
  s_mix = jnp.einsum('bqkgd,bkqtd->bkgqt', qg, sorted_k) * scale
  own_ok = masks.allowed(jnp.arange(n_q)[None], key[None], ql, kl,
                         causal=causal)
  own_ok &= q_block[:, None] == (key // b)[None, :]
  q_ok = jnp.arange(n_q)[None, :] < ql[:, None]
  mix_ok = (den[..., 0] > 0)[:, :, q_block] & q_ok[:, None, :, None]
  probs = masks.masked_softmax(
      jnp.concatenate([s_own, s_mix], axis=-1),
      jnp.concatenate([jnp.broadcast_to(own_ok[:, None, None], s_own.shape),
                       jnp.broadcast_to(mix_ok[:, :, None], s_mix.shape)],
                      axis=-1))
  p_own, p_mix = probs[..., :n_k], probs[..., n_k:]
  through_sorted = jnp.einsum('bkgqt,bkqtp->bkgqp', p_mix, mix_q)
  return {'own_block': p_own.reshape(bsz, h, n_q, n_k),
          'sorted_block': through_sorted.reshape(bsz, h, n_q, n_k)}


def dense_weights(q, k, learned, params, *, causal, q_lengths, kv_lengths):
  """Float32 [b, h, n_q, n_k]: the probability each query puts on each
  original key (the sum of dense_parts)."""
  return sum(dense_parts(q, k, learned, params, causal=causal,
                         q_lengths=q_lengths, kv_lengths=kv_lengths).values())


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None, learned=None):
  """Dense probabilities over the original keys (short inputs); rows sum
  to 1 (0 for padded rows and rows with no visible key)."""
  del v, implementation, rng
  check_params(params)
  return dense_weights(q, k, learned, params, causal=causal,
                       q_lengths=q_lengths, kv_lengths=kv_lengths)


def weight_parts(q, k, v, params, *, implementation='auto', causal=False,
                 q_lengths=None, kv_lengths=None, rng=None, learned=None):
  """{'own_block', 'sorted_block'} (dense_parts), summing to `weights`."""
  del v, implementation, rng
  check_params(params)
  return dense_parts(q, k, learned, params, causal=causal,
                     q_lengths=q_lengths, kv_lengths=kv_lengths)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None, learned=None):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  if learned is None:
    raise ValueError('attention kind sinkhorn owns learned parameters: pass '
                     'learned= (made by init_learned)')
  if implementation == 'reference':
    w = dense_weights(q, k, learned, params, causal=causal,
                      q_lengths=q_lengths, kv_lengths=kv_lengths)
    return full.probs_times_v(w, v, q.dtype)
  return sinkhorn_attention(q, k, v, learned, params, causal=causal,
                            q_lengths=q_lengths, kv_lengths=kv_lengths)
