"""Block-sparse approximate attention: Sparse Transformer and BigBird.

Two registered kinds share one machinery: queries are cut into blocks, each
query block gathers a compact set of keys (masks.KeyPart: its own and
neighbouring blocks as shifted views, shared summary or global keys, gathered
random blocks), and one float32 softmax runs over the union. No N x N score
matrix or mask exists; time and memory are O(N x keys per query).

Notation: i is a query position and j a key position (0-based, absolute),
l or b the block size, a = i // l and m = j // l the query and key blocks.
Every pattern is finally intersected with padding (i < q_length,
j < kv_length) and, when causal, with j <= i: the causal pattern is the
bidirectional one cut at the diagonal, and a query row left with no key
outputs zeros.

kind 'sparse' (Child et al. 2019), config.attention.sparse:
  pattern      'fixed' or 'strided'.
  block_size   l, the block length and the stride: an integer >= 1.
  num_summary  c, summary positions per block: an integer >= 1, and
               c <= l for 'fixed' ('strided' ignores it).
Key positions each query sees (position-exact, not coarsened to blocks):
  strided:  |i - j| <= l  or  (i - j) % l == 0.
            Causal: the previous l positions and i itself, plus every l-th
            position before them; exactly the paper's A1 + A2.
  fixed:    j // l == i // l  or  j % l >= l - c.
            Causal: the own block up to i plus the last c positions of every
            earlier block; exactly the paper's A1 + A2.
How: strided takes blocks a-1, a, a+1 (a+1 dropped when causal) masked to
the window, plus a "column" part: the key at the query's own offset
r = i % l in every block m with |m - a| > 1, read from the transposed
[l, blocks] view of the keys; 3l + N/l keys per query. Fixed takes its own
block plus the last c positions of every other block (one key set shared by
all queries); l + Nc/l keys per query. Both grow as N/l per query, so a
fixed l is quadratic with a small constant: the default (strided, l = 128)
measured a time exponent of about 1.05 over N = 2K..16K on a 2-core CPU;
fixed with l = 256, c = 2 about 1.26, and the paper's c = 8 much more.

kind 'bigbird' (Zaheer et al. 2020, ITC), config.attention.bigbird:
  block_size   b: an integer >= 1.
  num_global   g >= 0 global blocks: the first ceil(g/2) and the last
               floor(g/2) blocks (default 2: the first and the last).
  num_random   r >= 0 random key blocks per non-global query block.
  seed         integer in [0, 2**32): seeds the random blocks.
Key blocks each query block a sees (all positions of each):
  a global:    every block (full attention over all keys).
  otherwise:   the global blocks, the window |m - a| <= 1, and r blocks drawn
               without replacement from the non-global blocks with
               |m - a| > 1 (all of them when fewer than r remain).
So middle blocks see (3 + g + r) b keys. With 3 or fewer blocks, or enough
global/random blocks, every block is seen and the result is full attention.
The random blocks are drawn with numpy from `seed` at trace time, separately
for every query head and query block, and depend only on (seed, heads,
number of blocks, g, r): they are fixed across training steps, and a model
that wants different patterns per layer passes a different seed per layer
(the BigBird code seeds with the layer index). The `rng` argument is unused.
The blocks count is ceil(max(q_len, kv_len) / b), so the pattern changes
with the padded length.
Causal BigBird is the bidirectional pattern cut at j <= i, which degrades:
the block after the query's is dropped from its window, trailing global
blocks are seen only by themselves (as queries they still see every
earlier key), and random blocks after the query are wasted (about half on
average). num_global=1 (a leading global block only) suits causal models.
Global query blocks cost O(N b g); the rest O(N (3 + g + r) b).

Both: any length (padded internally to a multiple of the block; a block
larger than the sequence is clamped to it, which leaves the pattern
unchanged), q_len != kv_len (positions are absolute, top-left aligned), GQA
(grouped query heads share their key/value head; BigBird's random blocks are
still per query head).

Implementations:
  xla        the gathered block computation above (any backend).
  reference  dense softmax under the same pattern, O(N^2); for tests.
  auto       xla.
"""
from __future__ import annotations

import functools
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attention_variants import full
from attention_variants import masks

DEFAULTS = {'pattern': 'strided', 'block_size': 128, 'num_summary': 8}
IMPLEMENTATIONS = ('auto', 'xla', 'reference')
PATTERNS = ('fixed', 'strided')

BIGBIRD_DEFAULTS = {'block_size': 64, 'num_global': 2, 'num_random': 3,
                    'seed': 0}


def check_params(params):
  """ValueError naming the bad attention.sparse parameter and its range."""
  if params['pattern'] not in PATTERNS:
    raise ValueError(f'attention.sparse.pattern={params["pattern"]!r} is '
                     f'invalid: must be one of {", ".join(PATTERNS)}')
  block = masks.check_positive_int('attention.sparse.block_size',
                                   params['block_size'])
  c = masks.check_positive_int('attention.sparse.num_summary',
                               params['num_summary'])
  # Only the fixed pattern has summary positions; strided ignores c.
  if params['pattern'] == 'fixed' and c > block:
    raise ValueError(
        f'attention.sparse.num_summary={c!r} is invalid: must be an integer '
        f'in [1, block_size={block}] for the fixed pattern')


def check_bigbird_params(params):
  """ValueError naming the bad attention.bigbird parameter and its range."""
  masks.check_positive_int('attention.bigbird.block_size',
                           params['block_size'])
  masks.check_positive_int('attention.bigbird.num_global',
                           params['num_global'], minimum=0)
  masks.check_positive_int('attention.bigbird.num_random',
                           params['num_random'], minimum=0)
  seed = params['seed']
  if (not isinstance(seed, int) or isinstance(seed, bool)
      or not 0 <= seed < 2**32):
    raise ValueError(f'attention.bigbird.seed={seed!r} is invalid: must be '
                     'an integer in [0, 2**32)')


class _Frame(NamedTuple):
  """Inputs cut into blocks of `block` over the common padded length."""
  q: jax.Array   # [b, blocks, block, kv_heads, groups, d]
  k: jax.Array   # [b, blocks, block, kv_heads, d]
  v: jax.Array
  ql: jax.Array  # int32 [b]
  kl: jax.Array
  block: int
  scale: float

  @property
  def n_blocks(self):
    return self.q.shape[1]


def _frame(q, k, v, block, q_lengths, kv_lengths):
  kv_heads, groups = masks.check_inputs(q, k, v)
  b, n_q, _, d = q.shape
  longest = max(n_q, k.shape[1], 1)
  # A block longer than the sequence would only add padding.
  block = min(block, longest)
  n = masks.ceil_div(longest, block) * block
  blocked = lambda x: masks.pad_to_multiple(x, 1, n).reshape(  # pads to n
      (b, n // block, block) + x.shape[2:])
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  return _Frame(
      q=blocked(q).reshape(b, n // block, block, kv_heads, groups, d),
      k=blocked(k), v=blocked(v), ql=ql, kl=kl,
      block=block, scale=masks.default_scale(d))


def _as_pos(pos):
  """Key positions [blocks|1, t] -> KeyPart.pos [blocks|1, 1, 1, 1, t]."""
  return pos[:, None, None, None, :]


def _for_allowed(pos):
  """Positions [blocks|1, t] -> masks.allowed layout [1, blocks|1, 1, 1, t]."""
  return jnp.asarray(pos)[None, :, None, None, :]


def _as_mask(x):
  """bool [blocks|1, t] -> KeyPart.mask layout [1, blocks|1, 1, 1, 1, t]."""
  return x[None, :, None, None, None, :]


def _part(k, v, mask, pos):
  """KeyPart of keys [b, blocks|1, t, kv_heads, d] shared by a block's rows."""
  return masks.KeyPart(k=k[:, :, None, :, :, None], v=v[:, :, None, :, :, None],
                       mask=mask, pos=pos)


def _positions(blocks, block):
  """Absolute positions [len(blocks), block] of the given block ids."""
  return np.asarray(blocks)[:, None] * block + np.arange(block)


def _neighbour_ids(lo, hi, offsets, block):
  """Key block id of each key slot [hi - lo, len(offsets) * block].

  Query block a in [lo, hi) meets key blocks a + o; ids may fall outside
  [0, blocks) and must then be masked.
  """
  a = np.arange(lo, hi)[:, None, None]
  ids = a + np.asarray(offsets)[None, :, None] + np.zeros(block, np.int64)
  return ids.reshape(hi - lo, -1)


def _neighbours(x, offsets, lo, hi):
  """Blocks a + o of x [b, blocks, block, ...] for a in [lo, hi), o in offsets.

  Concatenated along the key axis: [b, hi - lo, len(offsets) * block, ...].
  Shifted static slices of x padded with zero blocks; nothing is gathered.
  """
  pad = max(abs(o) for o in offsets)
  widths = [(0, 0)] * x.ndim
  widths[1] = (pad, pad)
  xp = jnp.pad(x, widths)
  views = [xp[:, lo + pad + o:hi + pad + o] for o in offsets]
  return jnp.concatenate(views, axis=2)


def _window_part(f, lo, hi, offsets, valid_block, *, causal, left=None,
                 right=None):
  """Neighbouring key blocks of query blocks [lo, hi), masked by position.

  valid_block(ids) -> bool says which key block ids this part may use.
  """
  ids = _neighbour_ids(lo, hi, offsets, f.block)
  pos = ids * f.block + np.tile(np.arange(f.block), len(offsets))
  q_pos = _for_allowed(_positions(np.arange(lo, hi), f.block))
  mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal,
                       left=left, right=right)
  mask &= _as_mask(valid_block(ids))
  return _part(_neighbours(f.k, offsets, lo, hi),
               _neighbours(f.v, offsets, lo, hi), mask, _as_pos(pos))


def _block_ids(ranges):
  """Block ids [sum(hi - lo)] of static ranges ((lo, hi), ...)."""
  return np.concatenate([np.arange(lo, hi) for lo, hi in ranges])


def _take_blocks(x, ranges):
  """x [b, blocks, ...] restricted to the blocks of `ranges` (static slices)."""
  return jnp.concatenate([x[:, lo:hi] for lo, hi in ranges], axis=1)


def _shared_part(f, lo, hi, key_ranges, *, causal):
  """All keys of the blocks in key_ranges, one set for query blocks [lo, hi)."""
  pos = _positions(_block_ids(key_ranges), f.block).reshape(1, -1)
  q_pos = _for_allowed(_positions(np.arange(lo, hi), f.block))
  mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
  b, _, _, kvh, d = f.k.shape
  take = lambda x: _take_blocks(x, key_ranges).reshape(b, 1, -1, kvh, d)
  return _part(take(f.k), take(f.v), mask, _as_pos(pos))


# --- Sparse Transformer ----------------------------------------------------


def _fixed_parts(f, causal, num_summary):
  """Own block + the last c positions of every other block (shared set)."""
  nb, l = f.n_blocks, f.block
  c = min(num_summary, l)
  own = _window_part(f, 0, nb, (0,), lambda ids: np.ones(ids.shape, bool),
                     causal=causal)
  if nb == 1:
    return [own]
  b, _, _, kvh, d = f.k.shape
  summary = lambda x: x[:, :, l - c:].reshape(b, 1, nb * c, kvh, d)
  key_block = np.repeat(np.arange(nb), c)
  pos = (key_block * l + np.tile(np.arange(l - c, l), nb))[None]
  q_pos = _for_allowed(_positions(np.arange(nb), l))
  mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
  # The own block's summary keys are already in `own`.
  mask &= _as_mask(np.arange(nb)[:, None] != key_block[None, :])
  return [own, _part(summary(f.k), summary(f.v), mask, _as_pos(pos))]


def _strided_parts(f, causal):
  """Window |i - j| <= l from blocks a-1..a+1 + every l-th key further out."""
  nb, l = f.n_blocks, f.block
  offsets = (-1, 0) if causal else (-1, 0, 1)
  in_range = lambda ids: (ids >= 0) & (ids < nb)
  window = _window_part(f, 0, nb, offsets, in_range, causal=causal, left=l,
                        right=l)
  if nb <= 2:
    return [window]
  # Column part: query (a, r) meets keys m * l + r, i.e. row r of the
  # transposed [b, l, blocks] keys. Positions share the (r, block) layout.
  col = np.arange(nb)[None, :] * l + np.arange(l)[:, None]  # [l, blocks]
  ok = masks.allowed(jnp.asarray(col)[None], jnp.asarray(col)[None], f.ql,
                     f.kl, causal=causal)  # [b, r, a, m]
  far = np.abs(np.arange(nb)[:, None] - np.arange(nb)[None, :]) > 1
  mask = ok.transpose(0, 2, 1, 3) & far[None, :, None, :]  # [b, a, r, m]
  mask = mask[:, :, None, None]  # [b, a, kvh, g, r, m]
  columns = lambda x: x.transpose(0, 2, 1, 3, 4)[:, None, :, :, :, None]
  column = masks.KeyPart(k=columns(f.k), v=columns(f.v), mask=mask,
                         pos=col[None, None, None])
  return [window, column]


def _sparse_segments(f, params, causal):
  if params['pattern'] == 'fixed':
    parts = _fixed_parts(f, causal, params['num_summary'])
  else:
    parts = _strided_parts(f, causal)
  return [(((0, f.n_blocks),), f.q, parts)]


# --- BigBird ---------------------------------------------------------------


def global_blocks(num_global, n_blocks):
  """(leading, trailing) global block counts for a sequence of n_blocks."""
  front = min(masks.ceil_div(num_global, 2), n_blocks)
  return front, min(num_global // 2, n_blocks - front)


@functools.lru_cache(maxsize=64)
def random_blocks(seed, heads, n_blocks, num_global, num_random):
  """Random key blocks (ids, valid), each [heads, middle blocks, num_random].

  Row a - front lists the blocks of middle query block a, drawn without
  replacement from the non-global blocks outside its window; `valid` is
  False in the slots left over when fewer than num_random such blocks exist.
  """
  front, back = global_blocks(num_global, n_blocks)
  middle = np.arange(front, n_blocks - back)
  rs = np.random.RandomState(seed)
  ids = np.zeros((heads, len(middle), num_random), np.int32)
  valid = np.zeros(ids.shape, bool)
  for h in range(heads):
    for row, a in enumerate(middle):
      candidates = middle[np.abs(middle - a) > 1]
      pick = candidates[rs.permutation(len(candidates))[:num_random]]
      ids[h, row, :len(pick)] = pick
      valid[h, row, :len(pick)] = True
  ids.setflags(write=False)
  valid.setflags(write=False)
  return ids, valid


def _random_part(f, lo, hi, ids, valid, causal):
  """Random key blocks gathered per query head: [b, m, 1, r*bs, kvh, g, d]."""
  b, nb, bs, kvh, d = f.k.shape
  groups = f.q.shape[4]
  m, r = hi - lo, ids.shape[-1]
  ids = ids.reshape(kvh, groups, m, r)
  heads = np.arange(kvh)[:, None, None, None]

  def gather(x):
    x = x.transpose(0, 3, 1, 2, 4)[:, heads, ids]  # [b, kvh, g, m, r, bs, d]
    x = x.transpose(0, 3, 4, 5, 1, 2, 6)
    return x.reshape(b, m, 1, r * bs, kvh, groups, d)

  pos = (ids[..., None] * bs + np.arange(bs)).reshape(kvh, groups, m, r * bs)
  pos = pos.transpose(2, 0, 1, 3)[:, :, :, None, :]  # [m, kvh, g, 1, t]
  q_pos = _for_allowed(_positions(np.arange(lo, hi), bs))
  mask = masks.allowed(q_pos, jnp.asarray(pos[None, :, :, :, 0]), f.ql, f.kl,
                       causal=causal)
  ok = np.repeat(valid.reshape(kvh, groups, m, r), bs, axis=-1)
  mask &= ok.transpose(2, 0, 1, 3)[None, :, :, :, None, :]
  return masks.KeyPart(k=gather(f.k), v=gather(f.v), mask=mask, pos=pos)


def _global_query_segment(f, ranges, causal):
  """The global query blocks as one block that attends to every key."""
  b, nb, bs, kvh, g, d = f.q.shape
  q = _take_blocks(f.q, ranges).reshape(b, 1, -1, kvh, g, d)
  pos = np.arange(nb * bs)[None]
  q_pos = _for_allowed(_positions(_block_ids(ranges), bs).reshape(1, -1))
  mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
  keys = lambda x: x.reshape(b, 1, nb * bs, kvh, d)
  return ranges, q, [_part(keys(f.k), keys(f.v), mask, _as_pos(pos))]


def _bigbird_segments(f, params, causal):
  nb = f.n_blocks
  front, back = global_blocks(params['num_global'], nb)
  lo, hi = front, nb - back
  global_ranges = tuple((a, z) for a, z in ((0, lo), (hi, nb)) if z > a)
  segments = []
  if global_ranges:
    segments.append(_global_query_segment(f, global_ranges, causal))
  if hi > lo:
    offsets = (-1, 0) if causal else (-1, 0, 1)
    # Global key blocks come in their own part; never twice.
    middle = lambda ids: (ids >= lo) & (ids < hi)
    parts = [_window_part(f, lo, hi, offsets, middle, causal=causal)]
    if global_ranges:
      parts.append(_shared_part(f, lo, hi, global_ranges, causal=causal))
    if params['num_random']:
      heads = f.q.shape[3] * f.q.shape[4]
      ids, valid = random_blocks(params['seed'], heads, nb,
                                 params['num_global'], params['num_random'])
      if valid.any():
        parts.append(_random_part(f, lo, hi, ids, valid, causal))
    segments.append((((lo, hi),), f.q[:, lo:hi], parts))
  return segments


# --- Shared evaluation -----------------------------------------------------


def _in_block_order(pieces, block):
  """Concatenates per-segment query rows back into position order.

  pieces: (ranges, rows) pairs; rows [b, r, ...] holds the query rows of the
  blocks in `ranges`, in that order, `block` rows per block.
  """
  ordered = []
  for ranges, rows in pieces:
    start = 0
    for lo, hi in ranges:
      ordered.append((lo, rows[:, start:start + (hi - lo) * block]))
      start += (hi - lo) * block
  return jnp.concatenate([x for _, x in sorted(ordered, key=lambda p: p[0])],
                         axis=1)


def _output(f, segments, n_q):
  """[b, n_q, heads, d] float32 from the segments' query blocks."""
  b, _, bs, kvh, g, d = f.q.shape
  pieces = []
  for ranges, q, parts in segments:
    out = masks.key_parts_output(q, parts, f.scale)  # [b, m, q, kvh, g, d]
    pieces.append((ranges, out.reshape(b, -1, kvh * g, d)))
  return _in_block_order(pieces, bs)[:, :n_q]


def _dense(f, segments, n_q, n_k, *, mask_only=False):
  """Dense float32 [b, heads, n_q, n_k]: probabilities (or the 0/1 pattern)."""
  b, nb, bs, kvh, g, _ = f.q.shape
  n = nb * bs
  pieces = []
  for ranges, q, parts in segments:
    if mask_only:
      shape = q.shape[:2] + (kvh, g, q.shape[2])
      probs = [jnp.broadcast_to(p.mask, shape + p.mask.shape[-1:]).astype(
          jnp.float32) for p in parts]
    else:
      probs = masks.key_part_probs(q, parts, f.scale)
    dense = masks.key_parts_dense(probs, parts, n)  # [b, m, kvh, g, q, n]
    dense = dense.transpose(0, 1, 4, 2, 3, 5).reshape(b, -1, kvh * g, n)
    pieces.append((ranges, dense))
  dense = _in_block_order(pieces, bs).transpose(0, 2, 1, 3)
  return dense[:, :, :n_q, :n_k]


def _compute(segments_fn, block_size, q, k, v, params, implementation,
             causal, q_lengths, kv_lengths, *, want_weights):
  """Output [b, q_len, heads, d] or dense weights of a variant's segments."""
  f = _frame(q, k, v, block_size, q_lengths, kv_lengths)
  segments = segments_fn(f, params, bool(causal))
  n_q, n_k = q.shape[1], k.shape[1]
  if implementation == 'reference':
    pattern = _dense(f, segments, n_q, n_k, mask_only=True) > 0
    probs = full.dense_probs(q, k, pattern)
    if want_weights:
      return probs
    return full.probs_times_v(probs, v, q.dtype)
  if want_weights:
    return _dense(f, segments, n_q, n_k)
  return _output(f, segments, n_q).astype(q.dtype)


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense [b, heads, q_len, kv_len] probabilities; zero outside the pattern."""
  del rng
  check_params(params)
  return _compute(_sparse_segments, params['block_size'], q, k, v, params,
                  implementation, causal, q_lengths, kv_lengths,
                  want_weights=True)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  """Sparse Transformer attention [b, q_len, heads, d] in q's dtype."""
  del rng
  check_params(params)
  return _compute(_sparse_segments, params['block_size'], q, k, v, params,
                  implementation, causal, q_lengths, kv_lengths,
                  want_weights=False)


def bigbird_weights(q, k, v, params, *, implementation='auto', causal=False,
                    q_lengths=None, kv_lengths=None, rng=None):
  """Dense [b, heads, q_len, kv_len] probabilities; zero outside the pattern."""
  del rng
  check_bigbird_params(params)
  return _compute(_bigbird_segments, params['block_size'], q, k, v, params,
                  implementation, causal, q_lengths, kv_lengths,
                  want_weights=True)


def bigbird_attend(q, k, v, params, *, implementation='auto', causal=False,
                   q_lengths=None, kv_lengths=None, rng=None):
  """BigBird ITC attention [b, q_len, heads, d] in q's dtype."""
  del rng
  check_bigbird_params(params)
  return _compute(_bigbird_segments, params['block_size'], q, k, v, params,
                  implementation, causal, q_lengths, kv_lengths,
                  want_weights=False)


# The `bigbird` kind: registered in attention_variants._VARIANTS like a module.
bigbird = types.SimpleNamespace(
    DEFAULTS=BIGBIRD_DEFAULTS, IMPLEMENTATIONS=IMPLEMENTATIONS,
    attend=bigbird_attend, weights=bigbird_weights,
    check_params=check_bigbird_params)
