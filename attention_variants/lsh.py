"""Reformer LSH attention (Kitaev et al. 2020): hash, sort, chunk, unsort.

Each of `n_hashes` rounds does:

  1. Angular LSH. A random Gaussian matrix R of shape [head_dim, n_buckets/2]
     (one per round and kv head) maps x to bucket argmax(concat([xR, -xR])).
     Above 32 buckets two such hashes with f1 * f2 = n_buckets buckets are
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
     permutation. The gradient (a custom VJP) moves between the orders by
     gathers too: no scatter-add anywhere.

Rounds are combined by their log-sum-exps, out = sum_r softmax_r(lse_r) *
out_r. This equals one softmax over the multiset union of the rounds'
candidates: a key found by m rounds gets m times its exp-score (the standard
Reformer/trax behaviour; the paper's optional -ln N_ij correction for
duplicates across rounds is not applied). Within one round a key appears at
most once in a query's candidate set (see 3.), so there is no double counting
there. `weights` returns exactly this combined distribution.

Queries and keys:
  shared_qk=False: queries and keys are hashed with the same rotation
    and sorted separately; sorted query chunk i is matched with sorted key
    chunks i and i - 1. When a bucket holds more queries than keys (or the
    reverse) the two sorted orders drift apart; this is the paper's reason for
    sharing QK. No self-exclusion (a query's own key is an ordinary key).
    Needed for cross-attention (q and k of different lengths). On MQAR this
    setting did not learn recall where shared QK did (docs/quality.md).
  shared_qk=True (default; the paper's setting): the `k` argument is ignored
    (it is still shape-checked); keys are the queries RMS-normalised to norm
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

Hyperparameters (config.attention.lsh):
  n_hashes     hashing rounds, an integer >= 1. More rounds miss fewer
               neighbours; cost grows linearly.
  bucket_size  chunk length c of the sorted order, an integer >= 1. Each
               query sees its own chunk and the previous one, i.e. up to 2c
               keys per round.
  n_buckets    buckets per round. 0: automatic, 2 * ceil(N / bucket_size)
               (~2N/c, as in the paper); 1: no hashing (one bucket, the sort
               is the identity); otherwise an even number >= 2.
  shared_qk    True: keys are the normalised queries (the `k` argument is
               ignored) and a token attends to itself only when nothing else
               is visible (Reformer's setting); False hashes separate keys
               (needed for cross-attention).
  seed         rotations when no rng is given (evaluation): PRNGKey(seed).

Randomness: rotations are drawn from `rng` (the trainer passes a fresh key each
step); when rng is None they come from PRNGKey(params['seed']), so evaluation
is deterministic.

Lengths: q and k/v may differ in length; both are padded internally to a
multiple of the chunk length (the extra positions are padding). A chunk longer
than the sequence is clamped to the sequence length.

Cost per round and head: the sort (N log N), the hashing (O(N d n_buckets),
O(N d sqrt(n_buckets)) above 32 buckets) and chunked attention O(N 2c d). No
N x N array is built except by `weights` and by implementation='reference',
which are for tests and pictures. Memory: the chunked path loops over groups
of sorted chunks and gathers their rows from q, k and v (see "The chunked
path" below), so beyond the per-round outputs [b, kv, g, r, N, d] its
temporaries are a few MiB per step.

Components (weight_parts, the mass on each in pictures): 'own_bucket' (keys
that hashed to the query's bucket in the round that found them) and
'other_buckets' (keys seen only because they share its chunk or the
previous one).

Implementations:
  xla        the chunked algorithm above (jnp; runs on any backend).
  auto       xla.
  reference  the same hashes and sort, but dense: an N x N mask of "same or
             previous chunk in round r" and a dense softmax per round. O(N^2);
             an independent check of the chunked path.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')

# A token's score for itself under shared QK. exp(SELF_SCORE - m) underflows
# to exactly 0 next to any real score m, so self gets weight only when it is
# the only candidate; it stays far above masked keys (NEG_INF) and far above
# _EMPTY, so a self-only round still counts as non-empty.
SELF_SCORE = 1e-3 * masks.NEG_INF
# Log-sum-exps below this mark a round with no visible key.
_EMPTY = 0.5 * masks.NEG_INF
# Bucket counts above this are hashed as two factors (see hash_factors): the
# projection is then at most ~2 sqrt(n_buckets) wide, which keeps hashing a
# small part of the time and of the temporaries at every length.
_FACTOR_ABOVE = 32


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
  """argmax(concat([proj, -proj]), -2), first index on ties, without concat.

  proj: [..., h, n], the hash directions on axis -2 and positions last, as
  the projection's matmul lays them out: reducing over a major axis needs no
  transposed copy and vectorises over positions. The maximum of
  concat([p, -p]) is max |p|; entry i reaches it at index i when p_i >= 0
  and at i + h when p_i < 0; the answer is the smallest such index. One
  reduction over (|p|, index) pairs computes it without materialising
  either (XLA:CPU runs argmax over a concatenation several times slower).
  """
  h = proj.shape[-2]
  index = jax.lax.broadcasted_iota(jnp.int32, proj.shape, proj.ndim - 2)
  index = jnp.where(proj >= 0, index, index + h)

  def larger(a, b):  # (size, index) pairs: larger size, then smaller index
    take_a = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return (jnp.where(take_a, a[0], b[0]), jnp.where(take_a, a[1], b[1]))

  _, best = jax.lax.reduce((jnp.abs(proj), index),
                           (jnp.float32(-1.0), jnp.int32(2 * h)), larger,
                           (proj.ndim - 2,))
  return best


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
    proj = jnp.einsum('bnkgd,rkdh->bkgrhn',
                      jax.lax.stop_gradient(x).astype(jnp.float32), rot)
    start, stride = 0, 1
    for f in hash_factors(n_buckets):
      part = proj[..., start:start + f // 2, :]
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



class Orders(NamedTuple):
  """Sort orders (positions by rank) and their inverses (rank by position).

  rounds = n_hashes, or 1 when n_buckets == 1 (identical rounds).
  """
  q_order: jax.Array      # int32 [b, kv_heads, groups, rounds, n]
  q_inverse: jax.Array
  k_order: jax.Array      # int32 [b, kv_heads, rounds, n]
  k_inverse: jax.Array
  q_lengths: jax.Array    # int32 [b]
  kv_lengths: jax.Array


class Setup(NamedTuple):
  """Padded, grouped inputs and the per-round sort orders."""
  q: jax.Array            # [b, n, kv_heads, groups, d]
  k: jax.Array            # [b, n, kv_heads, d]
  v: jax.Array            # [b, n, kv_heads, d]
  orders: Orders
  exclude_self: bool
  geo: Geometry
  q_buckets: jax.Array    # int32 [b, kv_heads, groups, rounds, n]
  k_buckets: jax.Array    # int32 [b, kv_heads, rounds, n]


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
    q_ids = bucket_ids(qg, rot, jnp.maximum(ql, kl), geo.n_buckets)
    q_order, q_inverse = sort_order(q_ids, geo.n_buckets)
    k_order, k_inverse = q_order[:, :, 0], q_inverse[:, :, 0]
    k_ids = q_ids[:, :, 0]
  else:
    qg = masks.group_queries(q, kv_heads)
    q_ids = bucket_ids(qg, rot, ql, geo.n_buckets)
    q_order, q_inverse = sort_order(q_ids, geo.n_buckets)
    k_ids = bucket_ids(k[:, :, :, None], rot, kl, geo.n_buckets)[:, :, 0]
    k_order, k_inverse = sort_order(k_ids, geo.n_buckets)
  orders = Orders(q_order, q_inverse, k_order, k_inverse, ql, kl)
  return Setup(qg, k, v, orders, shared, geo, q_ids, k_ids)


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


# ---------------------------------------------------------------------------
# The chunked path. Everything per round lives in SORTED order, [b, kv, g, r,
# n, ...] (rank n along axis 4); the inputs and the result live in original
# order, [b, n, kv, g, ...]. A loop over groups of sorted chunks gathers each
# group's query rows and its candidate key rows straight from q, k and v, so
# no sorted copy of q, k or v exists; only the per-round outputs ([b, kv, g,
# r, n, d]) are kept whole, to be unsorted by a gather. The gradient is
# written out (custom VJP) as the same loop, and every move between the two
# orders in it is a gather too.

# Query rows per loop step (whole chunks, at least one): each step's scores
# are [b, kv, g, r, STEP_ROWS, 2 * chunk] floats, ~2 MiB at the defaults.
STEP_ROWS = 512


def _take_positions(x, pos, head_axes: int):
  """Rows of x at original positions: x[b, pos, heads...].

  x: [b, n, *heads, *row] with `head_axes` head axes; pos: int [b, *heads,
  *idx] (each head's own positions). Returns [b, *heads, *idx, *row]. One
  gather from x viewed as a table of b * n * prod(heads) rows; no copy of x.
  """
  b, n = x.shape[:2]
  heads = x.shape[2:2 + head_axes]
  h = math.prod(heads)
  lead = (jnp.arange(b, dtype=jnp.int32)[:, None] * (n * h)
          + jnp.arange(h, dtype=jnp.int32)[None]).reshape((b,) + heads)
  lead = lead.reshape(lead.shape + (1,) * (pos.ndim - lead.ndim))
  table = x.reshape((b * n * h,) + x.shape[2 + head_axes:])
  return table.at[lead + pos * h].get(mode='promise_in_bounds')


def _unsort_ids(inverse):
  """Row ids that read [b, *heads, n, ...] sorted rows back in original order.

  inverse: int [b, *heads, n], the rank of each position. Returns int
  [b, n, *heads] indexing the sorted array viewed as b * prod(heads) * n rows.
  """
  n = inverse.shape[-1]
  base = jnp.arange(inverse.size // n, dtype=jnp.int32) * n
  return jnp.moveaxis(base.reshape(inverse.shape[:-1] + (1,)) + inverse, -1, 1)


def _unsort(sorted_rows, ids):
  """[b, *heads, n, *row] in sorted order -> [b, n, *heads, *row] (a gather)."""
  table = sorted_rows.reshape((-1,) + sorted_rows.shape[ids.ndim:])
  return table.at[ids].get(mode='promise_in_bounds')


def _unsort_rounds(sorted_rows, ids, weights=None):
  """sum_r weights_r * (round r of sorted_rows in original order).

  sorted_rows: [b, *heads, r, n, d]; ids: [b, n, *heads, r] from
  _unsort_ids; weights: None (all 1) or [b, n, *heads, r]. Returns
  [b, n, *heads, d]. One gather per round, added up as it goes: XLA fuses
  the gathers into the sum instead of materialising each round's copy.
  """
  total = 0.0
  for r in range(ids.shape[-1]):
    rows = _unsort(sorted_rows, ids[..., r:r + 1])[..., 0, :]
    total += rows if weights is None else weights[..., r, None] * rows
  return total


class _Static(NamedTuple):
  geo: Geometry
  causal: bool
  exclude_self: bool


class _Chunks(NamedTuple):
  """Original positions of one step's sorted chunks and their candidates."""
  q_pos: jax.Array   # int32 [b, kv, g, r, G, c]
  k_pos: jax.Array   # int32 [b, kv, r, G, w]: own chunk, then the previous


def _key_table(st: _Static, o: Orders):
  """Sorted key positions with the last chunk copied in front, [.., (C+1)c],
  so that chunk i and its previous chunk (chunk 0's is the last one: wrap-
  around) are one contiguous slice. With a single chunk there is no look-back:
  it would be the same chunk, and every key would be counted twice."""
  if st.geo.n_chunks == 1:
    return o.k_order
  return jnp.concatenate([o.k_order[..., -st.geo.chunk:], o.k_order], axis=-1)


def _step_chunks(st: _Static, o: Orders, key_table, start, count: int):
  """Positions for sorted chunks start .. start + count - 1 (start traced)."""
  c = st.geo.chunk
  b, kv, g, r, _ = o.q_order.shape
  q_pos = jax.lax.dynamic_slice_in_dim(o.q_order, start * c, count * c, 4)
  q_pos = q_pos.reshape(b, kv, g, r, count, c)
  if st.geo.n_chunks == 1:
    return _Chunks(q_pos, key_table.reshape(b, kv, r, 1, c))
  rows = jax.lax.dynamic_slice_in_dim(key_table, start * c, (count + 1) * c, 3)
  rows = rows.reshape(b, kv, r, count + 1, c)
  return _Chunks(q_pos, jnp.concatenate([rows[:, :, :, 1:], rows[:, :, :, :-1]],
                                        axis=-1))


class _StepProbs(NamedTuple):
  probs: jax.Array    # [b, kv, g, r, G, c, w] normalised per round
  lse: jax.Array      # [b, kv, g, r, G, c]
  q: jax.Array        # [b, kv, g, r, G, c, d] the query rows
  k: jax.Array        # [b, kv, r, G, w, d] the candidate key rows
  is_self: jax.Array | None


def _step_probs(st: _Static, o: Orders, q, k, ch: _Chunks) -> _StepProbs:
  """Each round's softmax over the candidates of one step's query rows."""
  qr = _take_positions(q, ch.q_pos, 2)
  kr = _take_positions(k, ch.k_pos, 1)
  scores = jnp.einsum('bkgrxid,bkrxjd->bkgrxij', qr, kr,
                      preferred_element_type=jnp.float32)
  scores = scores * masks.default_scale(q.shape[-1])
  k_pos = ch.k_pos[:, :, None]
  mask = masks.allowed(ch.q_pos, k_pos, o.q_lengths, o.kv_lengths,
                       causal=st.causal)
  is_self = (ch.q_pos[..., :, None] == k_pos[..., None, :]
             if st.exclude_self else None)
  soft = round_softmax(scores, mask, is_self)
  return _StepProbs(soft.p / soft.denom, soft.lse, qr, kr, is_self)


def _for_each_step(geo: Geometry, body, carry):
  """carry = body(start_chunk, n_chunks, carry) over all sorted chunks: a
  loop of steps of STEP_ROWS query rows, then one shorter step if needed."""
  per = min(max(STEP_ROWS // geo.chunk, 1), geo.n_chunks)
  steps, rest = divmod(geo.n_chunks, per)
  carry = jax.lax.fori_loop(0, steps, lambda i, c: body(i * per, per, c),
                            carry)
  return body(steps * per, rest, carry) if rest else carry


def _put(buffer, rows, start_row, axis: int):
  """Writes rows (reshaped to the buffer's other axes) at start_row."""
  shape = buffer.shape[:axis] + (-1,) + buffer.shape[axis + 1:]
  return jax.lax.dynamic_update_slice_in_dim(buffer, rows.reshape(shape),
                                             start_row, axis)


def _sorted_rounds(st: _Static, o: Orders, q, k, v):
  """Per-round outputs and log-sum-exps in sorted order: [b, kv, g, r, n, d]
  float32 and [b, kv, g, r, n]."""
  b, n, kv, g, d = q.shape
  r = o.q_order.shape[3]
  key_table = _key_table(st, o)

  def body(start, count, carry):
    out, lse = carry
    ch = _step_chunks(st, o, key_table, start, count)
    sp = _step_probs(st, o, q, k, ch)
    vr = _take_positions(v, ch.k_pos, 1).astype(jnp.float32)
    rows = jnp.einsum('bkgrxij,bkrxjd->bkgrxid', sp.probs, vr)
    first = start * st.geo.chunk
    return _put(out, rows, first, 4), _put(lse, sp.lse, first, 4)

  init = (jnp.zeros((b, kv, g, r, n, d), jnp.float32),
          jnp.zeros((b, kv, g, r, n), jnp.float32))
  return _for_each_step(st.geo, body, init)


def _round_weights_sorted(lse_sorted, o: Orders):
  """(weights [b, n, kv, g, r], has_key [b, n, kv, g], the same weights in
  each round's sorted order [b, kv, g, r, n]) from sorted log-sum-exps."""
  lse = _unsort(lse_sorted, _unsort_ids(o.q_inverse))
  w, has_key = round_weights(lse, axis=-1)
  w_sorted = jnp.take_along_axis(jnp.moveaxis(w, 1, -1), o.q_order, axis=-1)
  return w, has_key, w_sorted


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_attention(st: _Static, q, k, v, o: Orders):
  """Combined output [b, n, kv, g, d] float32; zeros for rows with no key."""
  return _chunked_attention_fwd(st, q, k, v, o)[0]


def _chunked_attention_fwd(st, q, k, v, o):
  out_sorted, lse_sorted = _sorted_rounds(st, o, q, k, v)
  w, has_key, _ = _round_weights_sorted(lse_sorted, o)
  out = _unsort_rounds(out_sorted, _unsort_ids(o.q_inverse), w)
  out = jnp.where(has_key[..., None], out, 0.0)
  return out, (q, k, v, o, out, lse_sorted)


def _chunked_attention_bwd(st, res, g_out):
  """Gradient of the combined softmax over every round's candidates.

  Combining rounds by their log-sum-exps makes the output one softmax over
  the union of the rounds' candidates: P_rj = w_r p_rj. Hence, with g the
  output cotangent, dscore_rj = P_rj (g . v_j - g . out), dv_j = sum P_rj g,
  dq = sum dscore k * scale, dk = sum dscore q * scale. A shared-QK self
  score is a constant (no gradient). Query-row gradients are built in sorted
  order; key-row gradients are added per window into sorted key rows laid
  out like _key_table (the last chunk copied in front, folded back at the
  end). Both are unsorted by gathers.
  """
  q, k, v, o, out, lse_sorted = res
  b, n, kv, g, d = q.shape
  r = o.q_order.shape[3]
  c = st.geo.chunk
  _, has_key, w_sorted = _round_weights_sorted(lse_sorted, o)
  g_out = jnp.where(has_key[..., None], g_out.astype(jnp.float32), 0.0)
  g_dot_out = jnp.moveaxis(jnp.sum(g_out * out, axis=-1), 1, -1)  # [b,kv,g,n]
  g_dot_out = jnp.take_along_axis(g_dot_out[:, :, :, None], o.q_order, -1)
  scale = masks.default_scale(d)
  key_table = _key_table(st, o)

  def body(start, count, carry):
    dq, dk, dv = carry
    ch = _step_chunks(st, o, key_table, start, count)
    sp = _step_probs(st, o, q, k, ch)
    first = start * c

    def rows(x):  # sorted per-round rows of this step: [b, kv, g, r, G, c]
      x = jax.lax.dynamic_slice_in_dim(x, first, count * c, 4)
      return x.reshape(b, kv, g, r, count, c)

    def add_window(buffer, win):  # win [b, kv, r, G, w, d] into G + 1 chunks
      own = win[..., :c, :].reshape(b, kv, r, count * c, d)
      block = jnp.pad(own, [(0, 0)] * 3 + [(c, 0), (0, 0)])
      if st.geo.n_chunks > 1:  # chunk x's look-back went to chunk x - 1
        given = win[..., c:, :].reshape(b, kv, r, count * c, d)
        block += jnp.pad(given, [(0, 0)] * 3 + [(0, c), (0, 0)])
      old = jax.lax.dynamic_slice_in_dim(buffer, first, (count + 1) * c, 3)
      return jax.lax.dynamic_update_slice_in_dim(buffer, old + block, first, 3)

    pw = sp.probs * rows(w_sorted)[..., None]
    gr = _take_positions(g_out, ch.q_pos, 2)
    vr = _take_positions(v, ch.k_pos, 1).astype(jnp.float32)
    ds = pw * (jnp.einsum('bkgrxid,bkrxjd->bkgrxij', gr, vr)
               - rows(g_dot_out)[..., None])
    if sp.is_self is not None:
      ds = jnp.where(sp.is_self, 0.0, ds)
    dq_rows = jnp.einsum('bkgrxij,bkrxjd->bkgrxid', ds,
                         sp.k.astype(jnp.float32)) * scale
    dk_win = jnp.einsum('bkgrxij,bkgrxid->bkrxjd', ds,
                        sp.q.astype(jnp.float32)) * scale
    dv_win = jnp.einsum('bkgrxij,bkgrxid->bkrxjd', pw, gr)
    return (_put(dq, dq_rows, first, 4), add_window(dk, dk_win),
            add_window(dv, dv_win))

  key_rows = jnp.zeros((b, kv, r, n + c, d), jnp.float32)
  dq, dk, dv = _for_each_step(
      st.geo, body,
      (jnp.zeros((b, kv, g, r, n, d), jnp.float32), key_rows, key_rows))
  dq = _unsort_rounds(dq, _unsort_ids(o.q_inverse))
  k_ids = _unsort_ids(o.k_inverse)

  def unsort_keys(rows):  # fold the copied chunk back onto the last chunk
    rows = rows[..., c:, :].at[..., n - c:, :].add(rows[..., :c, :])
    return _unsort_rounds(rows, k_ids)

  dk, dv = unsort_keys(dk), unsort_keys(dv)
  no_grad = jax.tree_util.tree_map(lambda _: None, o)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def _static(s: Setup, causal: bool) -> _Static:
  return _Static(s.geo, causal, s.exclude_self)


def _chunked_weights(s: Setup, *, causal: bool):
  """Dense [b, kv, g, n, n]: every round's chunk probabilities, scattered."""
  st, o = _static(s, causal), s.orders
  b, n, kv, g, _ = s.q.shape
  r = o.q_order.shape[3]
  ch = _step_chunks(st, o, _key_table(st, o), 0, s.geo.n_chunks)
  sp = _step_probs(st, o, s.q, s.k, ch)
  _, _, w_sorted = _round_weights_sorted(sp.lse.reshape(b, kv, g, r, n), o)
  probs = sp.probs * w_sorted.reshape(sp.lse.shape)[..., None]
  shape = probs.shape
  bi = jnp.arange(b).reshape((b,) + (1,) * (len(shape) - 1))
  ki = jnp.arange(kv).reshape((1, kv) + (1,) * (len(shape) - 2))
  gi = jnp.arange(g).reshape((1, 1, g) + (1,) * (len(shape) - 3))
  qi = ch.q_pos[..., :, None]
  kj = ch.k_pos[:, :, None, :, :, None, :]
  dense = jnp.zeros((b, kv, g, n, n), jnp.float32)
  return dense.at[bi, ki, gi, qi, kj].add(probs)


def _round_probs(s: Setup, *, causal: bool):
  """(probs [b, kv, g, rounds, n, n], each round's probabilities times its
  weight in the combination; has_key [b, kv, g, n]), computed densely."""
  geo = s.geo
  b, n, kv, g, d = s.q.shape
  scores = jnp.einsum('bnkgd,bmkd->bkgnm', s.q, s.k,
                      preferred_element_type=jnp.float32)
  scores = scores[:, :, :, None] * masks.default_scale(d)  # [b,kv,g,1,n,n]
  o = s.orders
  q_chunk = o.q_inverse // geo.chunk                      # [b,kv,g,r,n]
  k_chunk = (o.k_inverse // geo.chunk)[:, :, None]        # [b,kv,1,r,n]
  same = q_chunk[..., :, None] == k_chunk[..., None, :]
  if geo.n_chunks > 1:
    prev = (q_chunk - 1) % geo.n_chunks
    same |= prev[..., :, None] == k_chunk[..., None, :]
  pos = jnp.arange(n)[None]
  ok = masks.allowed(pos, pos, o.q_lengths, o.kv_lengths, causal=causal)
  mask = same & ok[:, None, None, None]
  is_self = jnp.eye(n, dtype=bool) if s.exclude_self else None
  soft = round_softmax(scores, mask, is_self)
  w, has_key = round_weights(soft.lse, axis=3)
  return soft.p / soft.denom * w[..., None], has_key


def reference_weights(s: Setup, *, causal: bool):
  """Dense [b, kv, g, n, n] combined probabilities computed densely, O(N^2)."""
  probs, has_key = _round_probs(s, causal=causal)
  return jnp.where(has_key[..., None], probs.sum(3), 0.0)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  """LSH attention output [batch, q_len, heads, head_dim] in q's dtype."""
  s = prepare(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
              rng=rng)
  b, n, kv, g, d = s.q.shape
  n_q = q.shape[1]
  if implementation == 'reference':
    probs = reference_weights(s, causal=causal).reshape(b, kv * g, n, n)
    return full.probs_times_v(probs, s.v, q.dtype)[:, :n_q]
  out = _chunked_attention(_static(s, causal), s.q, s.k, s.v, s.orders)
  return out.reshape(b, n, kv * g, d)[:, :n_q].astype(q.dtype)


def weight_parts(q, k, v, params, *, implementation='auto', causal=False,
                 q_lengths=None, kv_lengths=None, rng=None):
  """{'own_bucket', 'other_buckets'}: the combined probabilities (summing to
  `weights`) split, round by round, by whether the key hashed to the
  query's bucket in that round or only shares its chunk or the previous
  one. Dense, O(N^2)."""
  del implementation
  s = prepare(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
              rng=rng)
  probs, has_key = _round_probs(s, causal=causal)
  same = (s.q_buckets[..., :, None]
          == s.k_buckets[:, :, None, :, None, :])  # [b, kv, g, r, n, n]
  b, kv, g, _, n, _ = probs.shape
  cut = lambda x: jnp.where(has_key[..., None], x, 0.0).reshape(
      b, kv * g, n, n)[:, :, :q.shape[1], :k.shape[1]]
  return {'own_bucket': cut(jnp.where(same, probs, 0.0).sum(3)),
          'other_buckets': cut(jnp.where(same, 0.0, probs).sum(3))}


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense float32 [batch, heads, q_len, kv_len] probabilities used for rng."""
  s = prepare(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
              rng=rng)
  if implementation == 'reference':
    dense = reference_weights(s, causal=causal)
  else:
    dense = _chunked_weights(s, causal=causal)
  b, kv, g, n, _ = dense.shape
  return dense.reshape(b, kv * g, n, n)[:, :, :q.shape[1], :k.shape[1]]
