"""BigBird attention (Zaheer et al. 2020, ITC: internal transformer
construction) on the block-sparse engine (blocksparse.py, which also
defines the notation, padding, causal cut and implementations).

Hyperparameters (config.attention.bigbird):
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
Components (weight_parts, the mass on each in pictures): 'global' (every
key of a global query block, and the global key blocks of the others),
'window' (the non-global blocks |m - a| <= 1) and 'random'.

Both: any length (padded internally to a multiple of the block; a block
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention_variants import blocksparse
from attention_variants import full
from attention_variants import masks
from attention_variants.blocksparse import (Looped, all_parts, as_pos,
                                            block_ids, for_allowed, key_layout,
                                            positions, query_blocks,
                                            shared_part, take_blocks,
                                            window_part)

IMPLEMENTATIONS = blocksparse.IMPLEMENTATIONS


def check_params(params):
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
    q_pos = for_allowed(positions(query_blocks(first, count), bs))
    mask = masks.allowed(q_pos, pos[None, :, :, :, 0], f.ql, f.kl,
                         causal=causal)
    ok = jnp.repeat(ok, bs, axis=-1)
    mask &= ok.transpose(2, 0, 1, 3)[None, :, :, :, None, :]
    return masks.KeyPart(k=gather(kt), v=jnp.swapaxes(gather(vt), -1, -2),
                         mask=mask, pos=pos, name='random')
  return part


def _global_query_segment(f, ranges, causal):
  """The global query blocks as one block that attends to every key."""
  b, nb, bs, kvh, g, d = f.q.shape
  q = take_blocks(f.q, ranges).reshape(b, 1, -1, kvh, g, d)
  pos = np.arange(nb * bs)[None]
  q_pos = for_allowed(positions(block_ids(ranges), bs).reshape(1, -1))
  mask = masks.allowed(q_pos, for_allowed(pos), f.ql, f.kl, causal=causal)
  keys = lambda x: x.reshape(b, 1, nb * bs, kvh, d)
  k, v = key_layout(keys(f.k), keys(f.v))
  return ranges, q, [masks.KeyPart(k=k, v=v, mask=mask, pos=as_pos(pos),
                                   name='global')]


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
    builders = [window_part(f, offsets, middle, causal=causal,
                            name='window')]
    if global_ranges:
      builders.append(shared_part(f, global_ranges, causal=causal,
                                  name='global'))
    if params['num_random']:
      heads = f.q.shape[3] * f.q.shape[4]
      ids, valid = random_blocks(params['seed'], heads, nb,
                                 params['num_global'], params['num_random'])
      if valid.any():
        builders.append(_random(f, lo, ids, valid, causal))
    segments.append(Looped(lo, hi, all_parts(builders)))
  return segments


attend, weights, weight_parts = blocksparse.variant(_bigbird_segments,
                                                   check_params)


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: the key/value cache (full's); a step reads only the
  blocks of the query's causal pattern, for the block count of length
  max_len (the forward pass's pattern at that length)."""
  check_params(params)
  return full.decode_init(params, batch=batch, max_len=max_len,
                          num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, dtype=dtype)


def pattern_positions(pos, params, *, heads: int, max_len: int):
  """int [heads, t]: the key positions a middle block's query at `pos`
  sees under the causal pattern (< 0: unused slot): its window blocks a - 1
  (when not global) and a up to pos, the leading global blocks, and its
  random blocks before a; t = (2 + leading globals + r) b."""
  b = min(params['block_size'], max_len)
  nb = masks.ceil_div(max_len, b)
  front, back = global_blocks(params['num_global'], nb)
  a = pos // b
  slot = jnp.arange(b)
  window = jnp.concatenate([jnp.where(a - 1 >= front, (a - 1) * b + slot, -1),
                            jnp.where(a * b + slot <= pos, a * b + slot, -1)])
  parts = [jnp.broadcast_to(window, (heads, 2 * b))]
  if front:
    parts.append(jnp.broadcast_to(jnp.arange(front * b), (heads, front * b)))
  if params['num_random'] and nb - back > front:
    ids, valid = random_blocks(params['seed'], heads, nb,
                               params['num_global'], params['num_random'])
    row = jnp.clip(a - front, 0, ids.shape[1] - 1)
    picked = jnp.asarray(ids)[:, row]                      # [heads, r]
    ok = jnp.asarray(valid)[:, row] & (picked < a)         # causal: before a
    blocks = jnp.where(ok, picked, -1)
    parts.append(jnp.where(blocks[..., None] >= 0,
                           blocks[..., None] * b + slot, -1).reshape(
                               heads, -1))
  return jnp.concatenate(parts, axis=1)


def decode_step(q, k, v, state, pos, params):
  """(output [b, h, d] float32, state) of the token at `pos`: cached, then
  a global block's query attends to every earlier key (as in the forward
  pass) and a middle block's to the positions of its pattern, gathered per
  head from the cache (its random blocks differ by head)."""
  state = masks.kv_write(state, k, v, pos)
  ks, vs = state['k'], state['v']
  heads, d = q.shape[1:]
  n = ks.shape[1]
  kv_heads = ks.shape[2]
  b = min(params['block_size'], n)
  nb = masks.ceil_div(n, b)
  front, back = global_blocks(params['num_global'], nb)
  a = pos // b

  def every_earlier_key():
    visible = (jnp.arange(n) <= pos)[None, None]
    return masks.token_attention(q, ks, vs, visible)

  def its_pattern():
    seen = pattern_positions(pos, params, heads=heads, max_len=n)  # [h, t]
    kv_of = (jnp.arange(heads) // (heads // kv_heads))[:, None]
    rows = jnp.clip(seen, 0, n - 1)
    kh, vh = ks[:, rows, kv_of], vs[:, rows, kv_of]           # [b, h, t, d]
    s = jnp.einsum('bhd,bhtd->bht', q, kh,
                   preferred_element_type=jnp.float32)
    p = masks.masked_softmax(s * masks.default_scale(d), (seen >= 0)[None])
    return jnp.einsum('bht,bhtd->bhd', p, vh.astype(jnp.float32))

  is_global = (a < front) | (a >= nb - back)
  out = jax.lax.cond(is_global, every_earlier_key, its_pattern)
  return out, state
