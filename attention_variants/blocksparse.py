"""The block-sparse engine shared by `sparse` and `bigbird`.

Queries are cut into blocks, each query block gathers a compact set of keys
(masks.KeyPart: its own and neighbouring blocks as shifted views, shared
summary or global keys, gathered random blocks), and one float32 softmax
runs over the union. No N x N score matrix or mask exists; time is O(N x
keys per query). A scan walks over groups of query blocks (SEGMENT_ROWS rows
each, rematerialised in the backward pass), so scores exist for one group at
a time; what the groups share (k and v padded by a block, or transposed for
the strided columns) is made once. Memory is O(N) plus one group's scores.

A variant supplies `segments(frame, params, causal)`: a list of segments,
each either a `Looped` (query blocks [lo, hi) whose key parts are built per
group of blocks inside the loop) or a static (ranges, query blocks, parts)
triple computed in one step. `variant(segments, check_params)` turns that
into the registry's `attend` and `weights`.

Notation: i is a query position and j a key position (0-based, absolute),
a = i // block and m = j // block the query and key blocks. Every pattern is
finally intersected with padding (i < q_length, j < kv_length) and, when
causal, with j <= i: the causal pattern is the bidirectional one cut at the
diagonal, and a query row left with no key outputs zeros.

Any length works (padded internally to a multiple of the block; a block
larger than the sequence is clamped to it, which leaves the pattern
unchanged), q_len != kv_len (positions are absolute, top-left aligned), and
GQA (grouped query heads share their key/value head).

Implementations of every block-sparse kind:
  xla        the gathered block computation above (any backend).
  reference  dense softmax under the same pattern, O(N^2); for tests.
  auto       xla.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


class Frame(NamedTuple):
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


def frame(q, k, v, block, q_lengths, kv_lengths):
  kv_heads, groups = masks.check_inputs(q, k, v)
  b, n_q, _, d = q.shape
  longest = max(n_q, k.shape[1], 1)
  # A block longer than the sequence would only add padding.
  block = min(block, longest)
  n = masks.ceil_div(longest, block) * block
  blocked = lambda x: masks.pad_to_multiple(x, 1, n).reshape(  # pads to n
      (b, n // block, block) + x.shape[2:])
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  return Frame(
      q=blocked(q).reshape(b, n // block, block, kv_heads, groups, d),
      k=blocked(k), v=blocked(v), ql=ql, kl=kl,
      block=block, scale=masks.default_scale(d))


def as_pos(pos):
  """Key positions [blocks|1, t] -> KeyPart.pos [blocks|1, 1, 1, 1, t]."""
  return pos[:, None, None, None, :]


def for_allowed(pos):
  """Positions [blocks|1, t] -> masks.allowed layout [1, blocks|1, 1, 1, t]."""
  return jnp.asarray(pos)[None, :, None, None, :]


def as_mask(x):
  """bool [blocks|1, t] -> KeyPart.mask layout [1, blocks|1, 1, 1, 1, t]."""
  return x[None, :, None, None, None, :]


def key_layout(k, v):
  """Keys [b, blocks|1, t, kv_heads, d] shared by a block's rows, in KeyPart
  layout: k [b, n, kvh, 1, 1, t, d], v [b, n, kvh, 1, 1, d, t]."""
  return (k.transpose(0, 1, 3, 2, 4)[:, :, :, None, None],
          v.transpose(0, 1, 3, 4, 2)[:, :, :, None, None])


def positions(blocks, block):
  """Absolute positions [len(blocks), block] of the given block ids."""
  return blocks[:, None] * block + np.arange(block)


def query_blocks(first, count):
  """Block ids first .. first + count - 1; numpy when first is an int, else
  traced (first is a loop index)."""
  return first + np.arange(count)


class Looped(NamedTuple):
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


# Query rows per loop step of a Looped segment: each step's scores are
# [b, SEGMENT_ROWS / block blocks, heads, block, keys per query] floats.
# Not smaller: every step of the strided pattern reads all of its column
# keys (O(N d)), so the steps' memory traffic grows as N^2 / SEGMENT_ROWS;
# 256 rows measured a time exponent of 1.4 over 2K..16K on the 2-core CPU,
# 1024 rows about 1.0.
SEGMENT_ROWS = 1024


def window_part(f, offsets, valid_block, *, causal, name, left=None,
                right=None):
  """parts(first, count) -> neighbouring key blocks a + o (o in offsets) of
  query blocks a, masked by position, as the component `name`.
  valid_block(ids) says which key block ids this part may use. k and v are padded with zero blocks once; each
  call takes shifted (dynamic) slices of them, nothing is gathered."""
  pad = max(abs(o) for o in offsets)
  widths = [(0, 0)] * f.k.ndim
  widths[1] = (pad, pad)
  kp, vp = jnp.pad(f.k, widths), jnp.pad(f.v, widths)
  relative = np.asarray(offsets)[:, None] + np.zeros(f.block, np.int64)

  def part(first, count):
    blocks = query_blocks(first, count)
    ids = (blocks[:, None] + relative.reshape(1, -1))  # [count, slots]
    pos = ids * f.block + np.tile(np.arange(f.block), len(offsets))
    q_pos = for_allowed(positions(blocks, f.block))
    mask = masks.allowed(q_pos, for_allowed(pos), f.ql, f.kl, causal=causal,
                         left=left, right=right)
    mask &= as_mask(valid_block(ids))
    views = lambda x: jnp.concatenate(
        [jax.lax.dynamic_slice_in_dim(x, first + pad + o, count, axis=1)
         for o in offsets], axis=2)
    k, v = key_layout(views(kp), views(vp))
    return masks.KeyPart(k=k, v=v, mask=mask, pos=as_pos(pos), name=name)
  return part


def block_ids(ranges):
  """Block ids [sum(hi - lo)] of static ranges ((lo, hi), ...)."""
  return np.concatenate([np.arange(lo, hi) for lo, hi in ranges])


def take_blocks(x, ranges):
  """x [b, blocks, ...] restricted to the blocks of `ranges` (static slices)."""
  return jnp.concatenate([x[:, lo:hi] for lo, hi in ranges], axis=1)


def shared_part(f, key_ranges, *, causal, name):
  """parts(first, count) -> all keys of the blocks in key_ranges, one set
  for every query block, as the component `name`."""
  pos = positions(block_ids(key_ranges), f.block).reshape(1, -1)
  b, _, _, kvh, d = f.k.shape
  take = lambda x: take_blocks(x, key_ranges).reshape(b, 1, -1, kvh, d)
  k, v = key_layout(take(f.k), take(f.v))

  def part(first, count):
    q_pos = for_allowed(positions(query_blocks(first, count), f.block))
    mask = masks.allowed(q_pos, for_allowed(pos), f.ql, f.kl, causal=causal)
    return masks.KeyPart(k=k, v=v, mask=mask, pos=as_pos(pos), name=name)
  return part


def all_parts(builders):
  """parts(first, count) of a Looped segment from one builder per KeyPart."""
  return lambda first, count: [part(first, count) for part in builders]


# --- Evaluation ------------------------------------------------------------


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
  if isinstance(segment, Looped):
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
    if isinstance(segment, Looped):
      ranges, out = ((segment.lo, segment.hi),), _looped_output(f, segment)
    else:
      ranges, q, parts = segment
      out = masks.key_parts_output(q, parts, f.scale)  # [b, m, q, kvh, g, d]
    pieces.append((ranges, out.reshape(b, -1, kvh * g, d)))
  return _in_block_order(pieces, bs)[:, :n_q]


def _dense_parts(f, segments, n_q, n_k, *, mask_only=False):
  """{component name: dense float32 [b, heads, n_q, n_k]}: each named
  KeyPart's probabilities (or its 0/1 pattern) scattered to its keys, zero
  in the rows of segments without that component; the parts are disjoint
  and sum to the whole distribution."""
  b, nb, bs, kvh, g, _ = f.q.shape
  n = nb * bs
  pieces = {}  # name -> [(ranges, dense rows)], in the order names appear
  steps = [_as_one_step(f, segment) for segment in segments]
  names = list(dict.fromkeys(p.name for _, _, parts in steps for p in parts))
  for ranges, q, parts in steps:
    if mask_only:
      shape = q.shape[:2] + (kvh, g, q.shape[2])
      probs = [jnp.broadcast_to(p.mask, shape + p.mask.shape[-1:]).astype(
          jnp.float32) for p in parts]
    else:
      probs = masks.key_part_probs(q, parts, f.scale)
    for name in names:
      mine = [(p, part) for p, part in zip(probs, parts) if part.name == name]
      if mine:
        dense = masks.key_parts_dense(*zip(*mine), n)  # [b, m, kvh, g, q, n]
      else:
        dense = jnp.zeros(q.shape[:2] + (kvh, g, q.shape[2], n), jnp.float32)
      dense = dense.transpose(0, 1, 4, 2, 3, 5).reshape(b, -1, kvh * g, n)
      pieces.setdefault(name, []).append((ranges, dense))
  return {name: _in_block_order(rows, bs).transpose(0, 2, 1, 3)[
      :, :, :n_q, :n_k] for name, rows in pieces.items()}


def _dense(f, segments, n_q, n_k, *, mask_only=False):
  """Dense float32 [b, heads, n_q, n_k]: probabilities (or the 0/1 pattern)."""
  return sum(_dense_parts(f, segments, n_q, n_k,
                          mask_only=mask_only).values())


def _compute(segments_fn, block_size, q, k, v, params, implementation,
             causal, q_lengths, kv_lengths, *, want):
  """Output [b, q_len, heads, d], dense weights (want='weights') or their
  components (want='parts') of a variant's segments."""
  f = frame(q, k, v, block_size, q_lengths, kv_lengths)
  segments = segments_fn(f, params, bool(causal))
  n_q, n_k = q.shape[1], k.shape[1]
  if want == 'parts':
    # The gathered computation's own parts (equal to 'reference' within
    # float32 rounding, tested), whatever the implementation.
    return _dense_parts(f, segments, n_q, n_k)
  if implementation == 'reference':
    pattern = _dense(f, segments, n_q, n_k, mask_only=True) > 0
    probs = full.dense_probs(q, k, pattern)
    if want == 'weights':
      return probs
    return full.probs_times_v(probs, v, q.dtype)
  if want == 'weights':
    return _dense(f, segments, n_q, n_k)
  return _output(f, segments, n_q).astype(q.dtype)


def variant(segments_fn, check_params):
  """(attend, weights, weight_parts) of the registry contract for a
  block-sparse kind whose pattern is `segments_fn(frame, params, causal)`."""

  def run(q, k, v, params, implementation, causal, q_lengths, kv_lengths,
          want):
    check_params(params)
    return _compute(segments_fn, params['block_size'], q, k, v, params,
                    implementation, causal, q_lengths, kv_lengths, want=want)

  def attend(q, k, v, params, *, implementation='auto', causal=False,
             q_lengths=None, kv_lengths=None, rng=None):
    """Attention output [b, q_len, heads, d] in q's dtype (rng unused)."""
    del rng
    return run(q, k, v, params, implementation, causal, q_lengths,
               kv_lengths, want='output')

  def weights(q, k, v, params, *, implementation='auto', causal=False,
              q_lengths=None, kv_lengths=None, rng=None):
    """Dense [b, heads, q_len, kv_len] probabilities, zero outside the
    pattern (rng unused)."""
    del rng
    return run(q, k, v, params, implementation, causal, q_lengths,
               kv_lengths, want='weights')

  def weight_parts(q, k, v, params, *, implementation='auto', causal=False,
                   q_lengths=None, kv_lengths=None, rng=None):
    """{component: dense [b, heads, q_len, kv_len]}, summing to `weights`
    (the KeyParts' names: the kind's docstring lists them)."""
    del rng
    return run(q, k, v, params, implementation, causal, q_lengths,
               kv_lengths, want='parts')

  return attend, weights, weight_parts
