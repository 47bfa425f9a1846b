"""Block-sparse approximate attention: Sparse Transformer and BigBird.

Two registered kinds share one machinery: queries are cut into blocks, each
query block gathers a compact set of keys (masks.KeyPart: its own and
neighbouring blocks as shifted views, shared summary or global keys, gathered
random blocks), and one float32 softmax runs over the union. No N x N score
matrix or mask exists; time is O(N x keys per query). A scan walks over
groups of query blocks (SEGMENT_ROWS rows each, rematerialised in the
backward pass), so scores exist for one group at a time; what the groups
share (k and v padded by a block, or transposed for the strided columns) is
made once. Memory is O(N) plus one group's scores.

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
measured time exponents of 1.0 to 1.2 over N = 2K..16K on a 2-core CPU
(docs/benchmarks.md); fixed with l = 256, c = 2 about 1.26 (before the
group loop), and the paper's c = 8 much more.

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
from typing import Callable, NamedTuple

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


def _key_layout(k, v):
  """Keys [b, blocks|1, t, kv_heads, d] shared by a block's rows, in KeyPart
  layout: k [b, n, kvh, 1, 1, t, d], v [b, n, kvh, 1, 1, d, t]."""
  return (k.transpose(0, 1, 3, 2, 4)[:, :, :, None, None],
          v.transpose(0, 1, 3, 4, 2)[:, :, :, None, None])


def _positions(blocks, block):
  """Absolute positions [len(blocks), block] of the given block ids."""
  return blocks[:, None] * block + np.arange(block)


def _query_blocks(first, count):
  """Block ids first .. first + count - 1; numpy when first is an int, else
  traced (first is a loop index)."""
  return first + np.arange(count)


class _Looped(NamedTuple):
  """Query blocks [lo, hi) whose key parts are built per group of blocks.

  parts(first, count) returns the KeyParts of query blocks first .. first +
  count - 1, where first may be traced: _output runs it in a loop over
  groups of SEGMENT_ROWS query rows, so only one group's keys and scores
  exist at a time. Anything the groups share (padded or transposed keys) is
  made once by the segment builder, outside the loop.
  """
  lo: int
  hi: int
  parts: Callable[..., list]


# Query rows per loop step of a _Looped segment: each step's scores are
# [b, SEGMENT_ROWS / block blocks, heads, block, keys per query] floats.
# Not smaller: every step of the strided pattern reads all of its column
# keys (O(N d)), so the steps' memory traffic grows as N^2 / SEGMENT_ROWS;
# 256 rows measured a time exponent of 1.4 over 2K..16K on the 2-core CPU,
# 1024 rows about 1.0.
SEGMENT_ROWS = 1024


def _window(f, offsets, valid_block, *, causal, left=None, right=None):
  """parts(first, count) -> neighbouring key blocks a + o (o in offsets) of
  query blocks a, masked by position. valid_block(ids) says which key block
  ids this part may use. k and v are padded with zero blocks once; each
  call takes shifted (dynamic) slices of them, nothing is gathered."""
  pad = max(abs(o) for o in offsets)
  widths = [(0, 0)] * f.k.ndim
  widths[1] = (pad, pad)
  kp, vp = jnp.pad(f.k, widths), jnp.pad(f.v, widths)
  relative = np.asarray(offsets)[:, None] + np.zeros(f.block, np.int64)

  def part(first, count):
    blocks = _query_blocks(first, count)
    ids = (blocks[:, None] + relative.reshape(1, -1))  # [count, slots]
    pos = ids * f.block + np.tile(np.arange(f.block), len(offsets))
    q_pos = _for_allowed(_positions(blocks, f.block))
    mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal,
                         left=left, right=right)
    mask &= _as_mask(valid_block(ids))
    views = lambda x: jnp.concatenate(
        [jax.lax.dynamic_slice_in_dim(x, first + pad + o, count, axis=1)
         for o in offsets], axis=2)
    k, v = _key_layout(views(kp), views(vp))
    return masks.KeyPart(k=k, v=v, mask=mask, pos=_as_pos(pos))
  return part


def _block_ids(ranges):
  """Block ids [sum(hi - lo)] of static ranges ((lo, hi), ...)."""
  return np.concatenate([np.arange(lo, hi) for lo, hi in ranges])


def _take_blocks(x, ranges):
  """x [b, blocks, ...] restricted to the blocks of `ranges` (static slices)."""
  return jnp.concatenate([x[:, lo:hi] for lo, hi in ranges], axis=1)


def _shared(f, key_ranges, *, causal):
  """parts(first, count) -> all keys of the blocks in key_ranges, one set
  for every query block."""
  pos = _positions(_block_ids(key_ranges), f.block).reshape(1, -1)
  b, _, _, kvh, d = f.k.shape
  take = lambda x: _take_blocks(x, key_ranges).reshape(b, 1, -1, kvh, d)
  k, v = _key_layout(take(f.k), take(f.v))

  def part(first, count):
    q_pos = _for_allowed(_positions(_query_blocks(first, count), f.block))
    mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
    return masks.KeyPart(k=k, v=v, mask=mask, pos=_as_pos(pos))
  return part


def _all_parts(builders):
  """parts(first, count) of a _Looped segment from one builder per KeyPart."""
  return lambda first, count: [part(first, count) for part in builders]


# --- Sparse Transformer ----------------------------------------------------


def _fixed_segment(f, causal, num_summary):
  """Own block + the last c positions of every other block (shared set)."""
  nb, l = f.n_blocks, f.block
  c = min(num_summary, l)
  own = _window(f, (0,), lambda ids: np.ones(ids.shape, bool), causal=causal)
  if nb == 1:
    return _Looped(0, nb, _all_parts([own]))
  b, _, _, kvh, d = f.k.shape
  summary = lambda x: x[:, :, l - c:].reshape(b, 1, nb * c, kvh, d)
  ks, vs = _key_layout(summary(f.k), summary(f.v))
  key_block = np.repeat(np.arange(nb), c)
  pos = (key_block * l + np.tile(np.arange(l - c, l), nb))[None]

  def summaries(first, count):
    blocks = _query_blocks(first, count)
    q_pos = _for_allowed(_positions(blocks, l))
    mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
    # The own block's summary keys are already in `own`.
    mask &= _as_mask(blocks[:, None] != key_block[None, :])
    return masks.KeyPart(k=ks, v=vs, mask=mask, pos=_as_pos(pos))
  return _Looped(0, nb, _all_parts([own, summaries]))


def _strided_segment(f, causal):
  """Window |i - j| <= l from blocks a-1..a+1 + every l-th key further out."""
  nb, l = f.n_blocks, f.block
  offsets = (-1, 0) if causal else (-1, 0, 1)
  window = _window(f, offsets, lambda ids: (ids >= 0) & (ids < nb),
                   causal=causal, left=l, right=l)
  if nb <= 2:
    return _Looped(0, nb, _all_parts([window]))
  # Column part: query (a, r) meets keys m * l + r, i.e. row r of the
  # transposed [b, l, blocks] keys. Positions share the (r, block) layout.
  col = np.arange(nb)[None, :] * l + np.arange(l)[:, None]  # [l, blocks]
  # KeyPart layouts, made once: k [b, 1, kvh, 1, l, blocks, d], v [b, 1,
  # kvh, 1, l, d, blocks].
  kc = f.k.transpose(0, 3, 2, 1, 4)[:, None, :, None]
  vc = f.v.transpose(0, 3, 2, 4, 1)[:, None, :, None]

  def columns(first, count):
    blocks = _query_blocks(first, count)
    q_col = _positions(blocks, l).T  # [l, count]
    ok = masks.allowed(jnp.asarray(q_col)[None], jnp.asarray(col)[None], f.ql,
                       f.kl, causal=causal)  # [b, r, a, m]
    far = jnp.abs(blocks[:, None] - np.arange(nb)[None, :]) > 1
    mask = ok.transpose(0, 2, 1, 3) & far[None, :, None, :]  # [b, a, r, m]
    mask = mask[:, :, None, None]  # [b, a, kvh, g, r, m]
    return masks.KeyPart(k=kc, v=vc, mask=mask, pos=col[None, None, None])
  return _Looped(0, nb, _all_parts([window, columns]))


def _sparse_segments(f, params, causal):
  if params['pattern'] == 'fixed':
    return [_fixed_segment(f, causal, params['num_summary'])]
  return [_strided_segment(f, causal)]


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


def _random(f, lo, ids, valid, causal):
  """parts(first, count) -> the random key blocks of query blocks first ..
  (rows first - lo of ids/valid), gathered per query head:
  k [b, count, kvh, g, 1, r * bs, d], v with the last two axes swapped."""
  b, nb, bs, kvh, d = f.k.shape
  groups = f.q.shape[4]
  r = ids.shape[-1]
  ids = jnp.asarray(ids.reshape(kvh, groups, -1, r))
  valid = jnp.asarray(valid.reshape(kvh, groups, -1, r))
  heads = np.arange(kvh)[:, None, None, None]
  kt, vt = (x.transpose(0, 3, 1, 2, 4) for x in (f.k, f.v))  # [b,kvh,nb,bs,d]

  def part(first, count):
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, first - lo, count, 2)
    picked, ok = rows(ids), rows(valid)  # [kvh, g, count, r]

    def gather(x):
      x = x[:, heads, picked]  # [b, kvh, g, count, r, bs, d]
      x = x.transpose(0, 3, 1, 2, 4, 5, 6)
      return x.reshape(b, count, kvh, groups, 1, r * bs, d)

    pos = (picked[..., None] * bs + np.arange(bs)).reshape(
        kvh, groups, count, r * bs)
    pos = pos.transpose(2, 0, 1, 3)[:, :, :, None, :]  # [count, kvh, g, 1, t]
    q_pos = _for_allowed(_positions(_query_blocks(first, count), bs))
    mask = masks.allowed(q_pos, pos[None, :, :, :, 0], f.ql, f.kl,
                         causal=causal)
    ok = jnp.repeat(ok, bs, axis=-1)
    mask &= ok.transpose(2, 0, 1, 3)[None, :, :, :, None, :]
    return masks.KeyPart(k=gather(kt), v=jnp.swapaxes(gather(vt), -1, -2),
                         mask=mask, pos=pos)
  return part


def _global_query_segment(f, ranges, causal):
  """The global query blocks as one block that attends to every key."""
  b, nb, bs, kvh, g, d = f.q.shape
  q = _take_blocks(f.q, ranges).reshape(b, 1, -1, kvh, g, d)
  pos = np.arange(nb * bs)[None]
  q_pos = _for_allowed(_positions(_block_ids(ranges), bs).reshape(1, -1))
  mask = masks.allowed(q_pos, _for_allowed(pos), f.ql, f.kl, causal=causal)
  keys = lambda x: x.reshape(b, 1, nb * bs, kvh, d)
  k, v = _key_layout(keys(f.k), keys(f.v))
  return ranges, q, [masks.KeyPart(k=k, v=v, mask=mask, pos=_as_pos(pos))]


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
    builders = [_window(f, offsets, middle, causal=causal)]
    if global_ranges:
      builders.append(_shared(f, global_ranges, causal=causal))
    if params['num_random']:
      heads = f.q.shape[3] * f.q.shape[4]
      ids, valid = random_blocks(params['seed'], heads, nb,
                                 params['num_global'], params['num_random'])
      if valid.any():
        builders.append(_random(f, lo, ids, valid, causal))
    segments.append(_Looped(lo, hi, _all_parts(builders)))
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


def _as_one_step(f, segment):
  """(ranges, query blocks, parts) of a segment, all its blocks at once."""
  if isinstance(segment, _Looped):
    lo, hi = segment.lo, segment.hi
    return ((lo, hi),), f.q[:, lo:hi], segment.parts(lo, hi - lo)
  return segment


def _looped_output(f, segment):
  """[b, hi - lo, block, kv_heads, groups, d] float32: a scan over groups of
  SEGMENT_ROWS query rows (each step rematerialised in the backward pass),
  then one shorter group for the rest."""
  lo, hi = segment.lo, segment.hi
  per = min(max(SEGMENT_ROWS // f.block, 1), hi - lo)
  steps, rest = divmod(hi - lo, per)

  def group(first, count):
    q = jax.lax.dynamic_slice_in_dim(f.q, first, count, axis=1)
    return masks.key_parts_output(q, segment.parts(first, count), f.scale)

  step = jax.checkpoint(lambda _, i: (None, group(lo + i * per, per)),
                        prevent_cse=False)
  _, out = jax.lax.scan(step, None, jnp.arange(steps))
  out = jnp.moveaxis(out, 0, 1)
  out = out.reshape((out.shape[0], steps * per) + out.shape[3:])
  if rest:
    out = jnp.concatenate([out, group(lo + steps * per, rest)], axis=1)
  return out


def _output(f, segments, n_q):
  """[b, n_q, heads, d] float32 from the segments' query blocks."""
  b, _, bs, kvh, g, d = f.q.shape
  pieces = []
  for segment in segments:
    if isinstance(segment, _Looped):
      ranges, out = ((segment.lo, segment.hi),), _looped_output(f, segment)
    else:
      ranges, q, parts = segment
      out = masks.key_parts_output(q, parts, f.scale)  # [b, m, q, kvh, g, d]
    pieces.append((ranges, out.reshape(b, -1, kvh * g, d)))
  return _in_block_order(pieces, bs)[:, :n_q]


def _dense(f, segments, n_q, n_k, *, mask_only=False):
  """Dense float32 [b, heads, n_q, n_k]: probabilities (or the 0/1 pattern)."""
  b, nb, bs, kvh, g, _ = f.q.shape
  n = nb * bs
  pieces = []
  for segment in segments:
    ranges, q, parts = _as_one_step(f, segment)
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
