"""Reformer LSH attention (Kitaev et al. 2020): hash, sort, chunk, unsort.

Each of `n_hashes` rounds does:

  1. Angular LSH. A random Gaussian matrix R of shape [head_dim, n_buckets/2]
     (one per round and kv head) maps x to bucket argmax(concat([xR, -xR])).
     Above 128 buckets two such hashes with f1 * f2 = n_buckets buckets are
     combined (see hash_factors), as trax does, so hashing costs
     O(d sqrt(n_buckets)) per token rather than O(d n_buckets), which with
     n_buckets ~ 2N/c would be quadratic in N. n_buckets=1 means no hashing:
     every token is in bucket 0, all rounds are identical and one is computed.
  2. Sort positions by (bucket, position) (equivalent to a stable argsort of
     the bucket ids). Padded positions get an extra bucket, n_buckets, so they
     sort to the end and do not take chunk slots from real tokens.
  3. Split the sorted order into chunks of c = bucket_size. Sorted query chunk
     i attends to sorted key chunks i and i - 1; chunk 0 looks back at the
     last chunk (wrap-around, as in the paper and trax). With a single chunk
     there is no look-back: it would be the same chunk, and every key would be
     counted twice.
  4. Masks use ORIGINAL positions: causal means key j <= query i; padded keys
     are never attended; padded queries, and queries whose chunks hold no
     visible key in any round, output exactly zeros.
  5. Outputs and log-sum-exps are unsorted by gathering with the inverse
     permutation. The permutation gathers have a custom gradient that is
     itself a gather with the inverse permutation (no scatter-add).

Rounds are combined by their log-sum-exps, out = sum_r softmax_r(lse_r) *
out_r. This equals one softmax over the multiset union of the rounds'
candidates: a key found by m rounds gets m times its exp-score (the standard
Reformer/trax behaviour; the paper's optional -ln N_ij correction for
duplicates across rounds is not applied). Within one round a key appears at
most once in a query's candidate set (see 3.), so there is no double counting
there. `weights` returns exactly this combined distribution.

Queries and keys:
  shared_qk=False (default): queries and keys are hashed with the same rotation
    and sorted separately; sorted query chunk i is matched with sorted key
    chunks i and i - 1. When a bucket holds more queries than keys (or the
    reverse) the two sorted orders drift apart; this is the paper's reason for
    sharing QK. No self-exclusion (a query's own key is an ordinary key).
  shared_qk=True (the paper's setting): the `k` argument is ignored (it is
    still shape-checked); keys are the queries RMS-normalised to norm
    sqrt(head_dim), so scores are q_i . q_j / |q_j| (as trax). Queries and keys
    then share buckets and one sort. A token attends to itself only when no
    other key is visible to it: its own score is replaced by a large finite
    negative (SELF_SCORE) that gets exactly zero weight next to any real
    score but beats masked keys. Needs q and v of the same length.

GQA: one rotation per (round, kv head). The query heads of a kv-head group are
hashed with their group's rotation and sorted separately (one sort per query
head); keys are hashed and sorted once per kv head and shared by the group.
Under shared_qk the keys come from each query head, so every query head is its
own group (v is repeated per query head).

Randomness: rotations are drawn from `rng` (the trainer passes a fresh key each
step); when rng is None they come from PRNGKey(params['seed']), so evaluation
is deterministic.

Lengths: q and k/v may differ in length; both are padded internally to a
multiple of the chunk length (the extra positions are padding). A chunk longer
than the sequence is clamped to the sequence length.

Cost per round and head: the sort (N log N), the hashing (O(N d n_buckets),
O(N d sqrt(n_buckets)) above 128 buckets) and chunked attention O(N 2c d). No
N x N array is built except by `weights` and by implementation='reference',
which are for tests and pictures.

Implementations:
  xla        the chunked algorithm above (jnp; runs on any backend).
  auto       xla.
  reference  the same hashes and sort, but dense: an N x N mask of "same or
             previous chunk in round r" and a dense softmax per round. O(N^2);
             an independent check of the chunked path.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attention_variants import full
from attention_variants import masks

DEFAULTS = {
    # Hashing rounds. More rounds miss fewer neighbours; cost grows linearly.
    'n_hashes': 2,
    # Chunk length c of the sorted order. Each query sees its own chunk and
    # the previous one, i.e. up to 2c keys per round.
    'bucket_size': 64,
    # Buckets per round. 0: automatic, 2 * ceil(N / bucket_size) (~2N/c, as in
    # the paper); 1: no hashing (one bucket, the sort is the identity);
    # otherwise an even number >= 2.
    'n_buckets': 0,
    # Keys are the normalised queries (the `k` argument is ignored) and a token
    # attends to itself only when nothing else is visible.
    'shared_qk': False,
    # Rotations when no rng is given (evaluation): PRNGKey(seed).
    'seed': 0,
}
IMPLEMENTATIONS = ('auto', 'xla', 'reference')

# A token's score for itself under shared QK. exp(SELF_SCORE - m) underflows
# to exactly 0 next to any real score m, so self gets weight only when it is
# the only candidate; it stays far above masked keys (NEG_INF) and far above
# _EMPTY, so a self-only round still counts as non-empty.
SELF_SCORE = 1e-3 * masks.NEG_INF
# Log-sum-exps below this mark a round with no visible key.
_EMPTY = 0.5 * masks.NEG_INF
# Bucket counts above this are hashed as two factors (see hash_factors).
_FACTOR_ABOVE = 128


def check_params(params):
  """Raises ValueError for an out-of-range LSH hyperparameter."""
  masks.check_positive_int('attention.lsh.n_hashes', params['n_hashes'])
  masks.check_positive_int('attention.lsh.bucket_size', params['bucket_size'])
  n_buckets = params['n_buckets']
  masks.check_positive_int('attention.lsh.n_buckets', n_buckets, minimum=0)
  if n_buckets > 1 and n_buckets % 2:
    raise ValueError(
        f'attention.lsh.n_buckets={n_buckets} is invalid: must be 0 (auto, '
        '2 * ceil(length / bucket_size)), 1 (no hashing) or an even integer '
        '>= 2')
  if not isinstance(params['shared_qk'], bool):
    raise ValueError(f'attention.lsh.shared_qk={params["shared_qk"]!r} is '
                     'invalid: must be True or False')
  masks.check_positive_int('attention.lsh.seed', params['seed'], minimum=0)


class Geometry(NamedTuple):
  chunk: int       # chunk length c (bucket_size clamped to the sequence)
  n_chunks: int
  length: int      # padded length, n_chunks * chunk
  n_buckets: int


def geometry(n_q: int, n_k: int, params) -> Geometry:
  """Chunking and bucket count for sequences of n_q queries and n_k keys."""
  n = max(n_q, n_k)
  if n < 1:
    raise ValueError(f'lsh attention needs a sequence length >= 1, got {n}')
  chunk = min(params['bucket_size'], n)
  n_chunks = masks.ceil_div(n, chunk)
  n_buckets = params['n_buckets']
  if not n_buckets:
    n_buckets = 2 * n_chunks
    if n_buckets > _FACTOR_ABOVE and n_buckets % 4:
      n_buckets += 2  # a multiple of 4 splits into two even factors
  return Geometry(chunk, n_chunks, n_chunks * chunk, n_buckets)


def hash_factors(n_buckets: int):
  """Bucket counts of the angular hashes whose ids combine into one id.

  Above _FACTOR_ABOVE buckets (and when n_buckets % 4 == 0), two independent
  angular hashes with f1 * f2 = n_buckets buckets (f1 the even divisor closest
  to sqrt(n_buckets) from below) give id = id1 + f1 * id2, as in trax. The
  projection and argmax then cost O(sqrt(n_buckets)) per token instead of
  O(n_buckets); with the automatic n_buckets ~ 2N/c the latter would make
  hashing quadratic in N.
  """
  if n_buckets <= _FACTOR_ABOVE or n_buckets % 4:
    return (n_buckets,)
  f1 = max(f for f in range(2, math.isqrt(n_buckets) + 1, 2)
           if n_buckets % f == 0 and n_buckets // f % 2 == 0)
  return (f1, n_buckets // f1)


def rotations(rng, params, kv_heads: int, head_dim: int, n_buckets: int):
  """Random rotations, float32 [n_hashes, kv_heads, head_dim, width].

  width = sum(f // 2 for f in hash_factors(n_buckets)): the columns of each
  factor's rotation, side by side (1 unused column when n_buckets == 1).
  """
  key = jax.random.PRNGKey(params['seed']) if rng is None else rng
  width = max(sum(f // 2 for f in hash_factors(n_buckets)), 1)
  shape = (params['n_hashes'], kv_heads, head_dim, width)
  # Drawn flat and reshaped: XLA:CPU compiles the PRNG for a rank-4 shape
  # up to 20x slower than for a vector.
  flat = jax.random.normal(key, (math.prod(shape),), jnp.float32)
  return flat.reshape(shape)


def _angular_bucket(proj):
  """argmax(concat([proj, -proj]), -1), first index on ties, without concat.

  The maximum of concat([p, -p]) is max |p|; entry i reaches it at index i
  when p_i >= 0 and at i + h when p_i < 0. XLA:CPU runs this several times
  faster than argmax over a concatenation for wide rows.
  """
  h = proj.shape[-1]
  size = jnp.abs(proj)
  top = jnp.max(size, axis=-1, keepdims=True)
  index = jnp.arange(h, dtype=jnp.int32)
  index = jnp.where(proj >= 0, index, index + h)
  return jnp.min(jnp.where(size == top, index, 2 * h), axis=-1)


def bucket_ids(x, rot, lengths, n_buckets: int):
  """int32 [b, kv_heads, groups, rounds, n]: bucket of each position.

  x: [b, n, kv_heads, groups, d]; rot: from `rotations`, or None when
  n_buckets == 1: then every round would be the same, so there is one round
  (the combined result is identical). Each factor f of n_buckets hashes to
  argmax(concat([xR_f, -xR_f])). Positions at or past `lengths` get the
  extra bucket n_buckets.
  """
  b, n, kv_heads, groups, _ = x.shape
  ids = jnp.zeros((b, kv_heads, groups, 1, n), jnp.int32)
  if n_buckets > 1:
    proj = jnp.einsum('bnkgd,rkdh->bkgrnh',
                      jax.lax.stop_gradient(x).astype(jnp.float32), rot)
    start, stride = 0, 1
    for f in hash_factors(n_buckets):
      part = proj[..., start:start + f // 2]
      ids += stride * _angular_bucket(part)
      start, stride = start + f // 2, stride * f
  valid = jnp.arange(n)[None, :] < lengths[:, None]
  return jnp.where(valid[:, None, None, None, :], ids, n_buckets)


def sort_order(ids, n_buckets: int):
  """(order, inverse): positions sorted by (bucket, position), and their ranks.

  Sorting the single int32 key bucket * n + position is equivalent to a
  stable argsort of the buckets (ids <= n_buckets) and several times faster
  on CPU; the inverse permutation is an integer scatter. No gradient flows
  through either.
  """
  n = ids.shape[-1]
  position = jax.lax.broadcasted_iota(jnp.int32, ids.shape, ids.ndim - 1)
  if (n_buckets + 1) * n > jnp.iinfo(jnp.int32).max:  # key would overflow
    order = jnp.argsort(ids, axis=-1, stable=True).astype(jnp.int32)
  else:
    order = jax.lax.sort(ids * n + position, dimension=ids.ndim - 1) % n
  inverse = jnp.put_along_axis(jnp.zeros_like(order), order, position,
                               axis=-1, inplace=False)
  return order, inverse


def shared_keys(q):
  """Keys for shared QK: queries rescaled to norm sqrt(head_dim) (RMS 1)."""
  qf = q.astype(jnp.float32)
  k = qf * jax.lax.rsqrt(jnp.mean(qf * qf, axis=-1, keepdims=True) + 1e-6)
  return k.astype(q.dtype)


def _sum_to_shape(x, shape):
  axes = tuple(i for i, (a, s) in enumerate(zip(x.shape, shape)) if s != a)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@jax.custom_vjp
def _gather_rows(x, index, sources):
  """x[..., index, :] along axis -2; x may broadcast over index's leading axes.

  sources: int [t, *index.shape[:-1], x_rows]: every row j of x is read by
  exactly the t output rows sources[:, ..., j] (t = 1 for a permutation, whose
  sources are its inverse). The gradient gathers from those rows instead of
  the scatter-add JAX would emit, which is slow on CPU and TPU.
  """
  del sources
  return jnp.take_along_axis(x, index[..., None], axis=-2)


def _gather_rows_fwd(x, index, sources):
  return _gather_rows(x, index, sources), (x.shape, sources)


def _gather_rows_bwd(res, g):
  shape, sources = res
  gx = sum(jnp.take_along_axis(g, src[..., None], axis=-2) for src in sources)
  return _sum_to_shape(gx, shape), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def _permute(x, order, inverse):
  """x[..., order, :] along axis -2, with a gather as its gradient."""
  return _gather_rows(x, order, inverse[None])


def _look_back_rows(order, inverse, geo):
  """(index, sources) to gather sorted keys as [chunk i | chunk i - 1] rows.

  Gathering these rows directly avoids concatenating key chunks, which XLA
  emits as a slow element-wise copy on CPU. Chunk 0's previous chunk is the
  last one (wrap-around). Output rows: [..., n_chunks * 2 * chunk].
  """
  c, n_chunks = geo.chunk, geo.n_chunks
  chunks = order.reshape(order.shape[:-1] + (n_chunks, c))
  index = jnp.concatenate([chunks, jnp.roll(chunks, 1, axis=-2)], axis=-1)
  chunk, offset = inverse // c, inverse % c
  current = chunk * 2 * c + offset
  previous = (chunk + 1) % n_chunks * 2 * c + c + offset
  return index.reshape(order.shape[:-1] + (-1,)), jnp.stack([current, previous])


class Setup(NamedTuple):
  """Padded, grouped inputs and the per-round sort orders.

  rounds = n_hashes, or 1 when n_buckets == 1 (identical rounds).
  """
  q: jax.Array            # [b, n, kv_heads, groups, d]
  k: jax.Array            # [b, n, kv_heads, d]
  v: jax.Array            # [b, n, kv_heads, d]
  q_order: jax.Array      # int32 [b, kv_heads, groups, rounds, n]
  q_inverse: jax.Array
  k_order: jax.Array      # int32 [b, kv_heads, rounds, n]
  k_inverse: jax.Array
  q_lengths: jax.Array    # int32 [b]
  kv_lengths: jax.Array
  exclude_self: bool
  geo: Geometry


def _pad_to(x, n):
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def prepare(q, k, v, params, *, q_lengths, kv_lengths, rng) -> Setup:
  """Validates, pads, hashes and sorts; shared by every path."""
  check_params(params)
  kv_heads, groups = masks.check_inputs(q, k, v)
  _, n_q, _, d = q.shape
  n_k = k.shape[1]
  shared = params['shared_qk']
  if shared and n_q != n_k:
    raise ValueError(
        f'attention.lsh.shared_qk=True needs q and v of the same length, got '
        f'{n_q} and {n_k}; use shared_qk=False for cross-attention')
  geo = geometry(n_q, n_k, params)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  q, k, v = (_pad_to(x, geo.length) for x in (q, k, v))
  # One bucket needs no rotations (and no PRNG in the compiled program).
  rot = (rotations(rng, params, kv_heads, d, geo.n_buckets)
         if geo.n_buckets > 1 else None)
  if shared:
    # Every query head is its own group: keys come from its own queries.
    k = shared_keys(q)
    v = jnp.repeat(v, groups, axis=2)
    qg = q[:, :, :, None]
    rot = None if rot is None else jnp.repeat(rot, groups, axis=1)
    ids = bucket_ids(qg, rot, jnp.maximum(ql, kl), geo.n_buckets)
    q_order, q_inverse = sort_order(ids, geo.n_buckets)
    k_order, k_inverse = q_order[:, :, 0], q_inverse[:, :, 0]
  else:
    qg = masks.group_queries(q, kv_heads)
    q_order, q_inverse = sort_order(bucket_ids(qg, rot, ql, geo.n_buckets),
                                    geo.n_buckets)
    k_ids = bucket_ids(k[:, :, :, None], rot, kl, geo.n_buckets)[:, :, 0]
    k_order, k_inverse = sort_order(k_ids, geo.n_buckets)
  return Setup(qg, k, v, q_order, q_inverse, k_order, k_inverse, ql, kl,
               shared, geo)


class RoundSoftmax(NamedTuple):
  p: jax.Array      # unnormalised probabilities, zero where masked
  denom: jax.Array  # row sums (1 where a row is empty), keepdims
  lse: jax.Array    # row log-sum-exp, NEG_INF where a row is empty


def round_softmax(scores, mask, is_self):
  """Float32 softmax of one round's candidates, with the shared-QK self rule.

  is_self is None, or bool broadcastable to scores: the query's own key.
  """
  s = jnp.where(mask, scores, masks.NEG_INF)
  if is_self is not None:
    s = jnp.where(mask & is_self, SELF_SCORE, s)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(s - m), 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  has_key = total > 0.0
  denom = jnp.where(has_key, total, 1.0)
  lse = jnp.where(has_key, m + jnp.log(denom), masks.NEG_INF)
  return RoundSoftmax(p, denom, lse[..., 0])


def round_weights(lse, axis: int):
  """(weights over rounds, row has a key in some round) from per-round lse."""
  return jax.nn.softmax(lse, axis=axis), jnp.any(lse > _EMPTY, axis=axis)


class Chunked(NamedTuple):
  """Per-round results in sorted chunk layout [b, kv, r, C, g, c, ...]."""
  soft: RoundSoftmax     # p/denom [b, kv, r, C, g, c, w]; lse [.., c]
  out: jax.Array         # [b, kv, g, r, n, d] float32, unsorted
  lse: jax.Array         # [b, kv, g, r, n], unsorted
  q_pos: jax.Array       # [b, kv, r, C, g, c]
  k_pos: jax.Array       # [b, kv, r, C, 1, w]


def _to_chunks(x, geo):
  """[b, kv, g, r, n, ...] -> [b, kv, r, C, g, c, ...]."""
  b, kv, g, r = x.shape[:4]
  x = x.reshape((b, kv, g, r, geo.n_chunks, geo.chunk) + x.shape[5:])
  return jnp.moveaxis(x, 2, 4)


def _from_chunks(x, geo):
  """[b, kv, r, C, g, c, ...] -> [b, kv, g, r, n, ...]."""
  x = jnp.moveaxis(x, 4, 2)
  b, kv, g, r = x.shape[:4]
  return x.reshape((b, kv, g, r, geo.length) + x.shape[6:])


def chunked_rounds(s: Setup, *, causal: bool) -> Chunked:
  """Attention of every round inside sorted chunks (and the previous chunk)."""
  geo = s.geo
  b, n, kv, g, d = s.q.shape
  r = s.q_order.shape[3]
  scale = masks.default_scale(d)
  # Queries: [b, kv, g, 1, n, d] permuted per round -> chunk layout.
  q = jnp.moveaxis(s.q, 1, 3)[:, :, :, None]
  sq = _to_chunks(_permute(q, s.q_order, s.q_inverse), geo)
  q_pos = _to_chunks(s.q_order, geo)
  # Keys and values: [b, kv, 1, n, d] gathered per round straight into
  # [b, kv, r, C, w, d], w = 2c keys (own chunk, then the previous one).
  if geo.n_chunks > 1:
    index, sources = _look_back_rows(s.k_order, s.k_inverse, geo)
  else:
    index, sources = s.k_order, s.k_inverse[None]
  def sorted_chunks(x):
    x = _gather_rows(jnp.moveaxis(x, 1, 2)[:, :, None], index, sources)
    return x.reshape(b, kv, r, geo.n_chunks, -1, d)
  sk, sv = sorted_chunks(s.k), sorted_chunks(s.v)
  k_pos = index.reshape(b, kv, r, geo.n_chunks, 1, -1)
  scores = jnp.einsum('bkrcgid,bkrcjd->bkrcgij', sq, sk,
                      preferred_element_type=jnp.float32) * scale
  mask = masks.allowed(q_pos, k_pos, s.q_lengths, s.kv_lengths, causal=causal)
  is_self = (q_pos[..., :, None] == k_pos[..., None, :]
             if s.exclude_self else None)
  soft = round_softmax(scores, mask, is_self)
  out = jnp.einsum('bkrcgij,bkrcjd->bkrcgid', soft.p, sv.astype(jnp.float32))
  out = _from_chunks(out / soft.denom, geo)
  lse = _from_chunks(soft.lse, geo)
  out = _permute(out, s.q_inverse, s.q_order)
  lse = _permute(lse[..., None], s.q_inverse, s.q_order)[..., 0]
  return Chunked(soft, out, lse, q_pos, k_pos)


def _heads_last(x, n_q):
  """[b, kv, g, n, d] -> [b, n_q, kv * g, d]."""
  b, kv, g, n, d = x.shape
  return jnp.moveaxis(x, 3, 1).reshape(b, n, kv * g, d)[:, :n_q]


def _dense_to_heads(w, n_q, n_k):
  """[b, kv, g, n, n] -> [b, kv * g, n_q, n_k]."""
  b, kv, g, n, _ = w.shape
  return w.reshape(b, kv * g, n, n)[:, :, :n_q, :n_k]


def _combined_output(c: Chunked):
  w, has_key = round_weights(c.lse, axis=3)
  out = jnp.sum(w[..., None] * c.out, axis=3)
  return jnp.where(has_key[..., None], out, 0.0)


def _chunked_weights(s: Setup, c: Chunked):
  """Dense [b, kv, g, n, n]: every round's chunk probabilities, scattered."""
  geo = s.geo
  b, n, kv, g, _ = s.q.shape
  w, _ = round_weights(c.lse, axis=3)
  w_sorted = _to_chunks(jnp.take_along_axis(w, s.q_order, axis=-1), geo)
  probs = c.soft.p / c.soft.denom * w_sorted[..., None]
  shape = probs.shape
  bi = jnp.arange(b).reshape((b,) + (1,) * (len(shape) - 1))
  ki = jnp.arange(kv).reshape((1, kv) + (1,) * (len(shape) - 2))
  gi = jnp.arange(g).reshape((1,) * 4 + (g,) + (1,) * (len(shape) - 5))
  qi = c.q_pos[..., :, None]
  kj = c.k_pos[..., None, :]
  dense = jnp.zeros((b, kv, g, n, n), jnp.float32)
  return dense.at[bi, ki, gi, qi, kj].add(probs)


def reference_weights(s: Setup, *, causal: bool):
  """Dense [b, kv, g, n, n] combined probabilities computed densely, O(N^2)."""
  geo = s.geo
  b, n, kv, g, d = s.q.shape
  scores = jnp.einsum('bnkgd,bmkd->bkgnm', s.q, s.k,
                      preferred_element_type=jnp.float32)
  scores = scores[:, :, :, None] * masks.default_scale(d)  # [b,kv,g,1,n,n]
  q_chunk = s.q_inverse // geo.chunk                      # [b,kv,g,r,n]
  k_chunk = (s.k_inverse // geo.chunk)[:, :, None]        # [b,kv,1,r,n]
  same = q_chunk[..., :, None] == k_chunk[..., None, :]
  if geo.n_chunks > 1:
    prev = (q_chunk - 1) % geo.n_chunks
    same |= prev[..., :, None] == k_chunk[..., None, :]
  pos = jnp.arange(n)[None]
  ok = masks.allowed(pos, pos, s.q_lengths, s.kv_lengths, causal=causal)
  mask = same & ok[:, None, None, None]
  is_self = jnp.eye(n, dtype=bool) if s.exclude_self else None
  soft = round_softmax(scores, mask, is_self)
  w, has_key = round_weights(soft.lse, axis=3)
  probs = jnp.sum(soft.p / soft.denom * w[..., None], axis=3)
  return jnp.where(has_key[..., None], probs, 0.0)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  """LSH attention output [batch, q_len, heads, head_dim] in q's dtype."""
  s = prepare(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
              rng=rng)
  n_q = q.shape[1]
  if implementation == 'reference':
    probs = reference_weights(s, causal=causal)
    b, n, kv, g, d = s.q.shape
    probs = probs.reshape(b, kv * g, n, n)
    return full.probs_times_v(probs, s.v, q.dtype)[:, :n_q]
  out = _combined_output(chunked_rounds(s, causal=causal))
  return _heads_last(out, n_q).astype(q.dtype)


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense float32 [batch, heads, q_len, kv_len] probabilities used for rng."""
  s = prepare(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
              rng=rng)
  if implementation == 'reference':
    dense = reference_weights(s, causal=causal)
  else:
    dense = _chunked_weights(s, chunked_rounds(s, causal=causal))
  return _dense_to_heads(dense, q.shape[1], k.shape[1])
