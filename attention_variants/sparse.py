"""Sparse Transformer attention (Child et al. 2019): strided and fixed
patterns, position-exact, on the block-sparse engine (blocksparse.py, which
also defines the notation, padding, causal cut and implementations).

Hyperparameters (config.attention.sparse):
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

Components (weight_parts, the mass on each in pictures): strided 'window'
(|i - j| <= l) and 'stride' (the column keys further out); fixed 'block'
(the own block) and 'summary' (the other blocks' last c positions).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention_variants import blocksparse
from attention_variants import full
from attention_variants import masks
from attention_variants.blocksparse import (Looped, all_parts, as_mask, as_pos,
                                            for_allowed, key_layout, positions,
                                            query_blocks, window_part)

IMPLEMENTATIONS = blocksparse.IMPLEMENTATIONS

PATTERNS = ('fixed', 'strided')


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


def _fixed_segment(f, causal, num_summary):
  """Own block + the last c positions of every other block (shared set)."""
  nb, l = f.n_blocks, f.block
  c = min(num_summary, l)
  own = window_part(f, (0,), lambda ids: np.ones(ids.shape, bool),
                    causal=causal, name='block')
  if nb == 1:
    return Looped(0, nb, all_parts([own]))
  b, _, _, kvh, d = f.k.shape
  summary = lambda x: x[:, :, l - c:].reshape(b, 1, nb * c, kvh, d)
  ks, vs = key_layout(summary(f.k), summary(f.v))
  key_block = np.repeat(np.arange(nb), c)
  pos = (key_block * l + np.tile(np.arange(l - c, l), nb))[None]

  def summaries(first, count):
    blocks = query_blocks(first, count)
    q_pos = for_allowed(positions(blocks, l))
    mask = masks.allowed(q_pos, for_allowed(pos), f.ql, f.kl, causal=causal)
    # The own block's summary keys are already in `own`.
    mask &= as_mask(blocks[:, None] != key_block[None, :])
    return masks.KeyPart(k=ks, v=vs, mask=mask, pos=as_pos(pos),
                         name='summary')
  return Looped(0, nb, all_parts([own, summaries]))


def _strided_segment(f, causal):
  """Window |i - j| <= l from blocks a-1..a+1 + every l-th key further out."""
  nb, l = f.n_blocks, f.block
  offsets = (-1, 0) if causal else (-1, 0, 1)
  window = window_part(f, offsets, lambda ids: (ids >= 0) & (ids < nb),
                       causal=causal, name='window', left=l, right=l)
  if nb <= 2:
    return Looped(0, nb, all_parts([window]))
  # Column part: query (a, r) meets keys m * l + r, i.e. row r of the
  # transposed [b, l, blocks] keys. Positions share the (r, block) layout.
  col = np.arange(nb)[None, :] * l + np.arange(l)[:, None]  # [l, blocks]
  # KeyPart layouts, made once: k [b, 1, kvh, 1, l, blocks, d], v [b, 1,
  # kvh, 1, l, d, blocks].
  kc = f.k.transpose(0, 3, 2, 1, 4)[:, None, :, None]
  vc = f.v.transpose(0, 3, 2, 4, 1)[:, None, :, None]

  def columns(first, count):
    blocks = query_blocks(first, count)
    q_col = positions(blocks, l).T  # [l, count]
    ok = masks.allowed(jnp.asarray(q_col)[None], jnp.asarray(col)[None], f.ql,
                       f.kl, causal=causal)  # [b, r, a, m]
    far = jnp.abs(blocks[:, None] - np.arange(nb)[None, :]) > 1
    mask = ok.transpose(0, 2, 1, 3) & far[None, :, None, :]  # [b, a, r, m]
    mask = mask[:, :, None, None]  # [b, a, kvh, g, r, m]
    return masks.KeyPart(k=kc, v=vc, mask=mask, pos=col[None, None, None],
                         name='stride')
  return Looped(0, nb, all_parts([window, columns]))


def _sparse_segments(f, params, causal):
  if params['pattern'] == 'fixed':
    return [_fixed_segment(f, causal, params['num_summary'])]
  return [_strided_segment(f, causal)]


attend, weights, weight_parts = blocksparse.variant(_sparse_segments,
                                                   check_params)


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: the key/value cache (full's); a step reads only the
  positions of the query's pattern from it."""
  check_params(params)
  return full.decode_init(params, batch=batch, max_len=max_len,
                          num_heads=num_heads, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, dtype=dtype)


def pattern_positions(pos, params, max_len: int):
  """int [t]: the key positions the causal pattern shows the query at
  `pos` (entries < 0 are unused slots), t = O(l + N / l) (strided) or
  O(l + N c / l) (fixed), for the block l = min(block_size, max_len) the
  forward pass uses at length max_len."""
  l = min(params['block_size'], max_len)
  blocks = masks.ceil_div(max_len, l)
  if params['pattern'] == 'strided':
    window = pos - jnp.arange(l + 1)                 # |i - j| <= l
    columns = pos - l * jnp.arange(2, blocks + 1)    # every l-th further out
    return jnp.concatenate([window, columns])
  c = min(params['num_summary'], l)
  first = (pos // l) * l
  own = first + jnp.arange(l)                        # the own block, <= pos
  own = jnp.where(own <= pos, own, -1)
  summary = (jnp.arange(blocks)[:, None] * l + jnp.arange(l - c, l)).reshape(-1)
  summary = jnp.where(summary < first, summary, -1)  # earlier blocks only
  return jnp.concatenate([own, summary])


def decode_step(q, k, v, state, pos, params):
  """(output [b, h, d] float32, state) of the token at `pos`: cached, then
  attending to the keys of its pattern only, gathered from the cache."""
  state = masks.kv_write(state, k, v, pos)
  seen = pattern_positions(pos, params, state['k'].shape[1])
  out = masks.token_attention(q, masks.gather_positions(state['k'], seen),
                              masks.gather_positions(state['v'], seen),
                              (seen >= 0)[None, None])
  return out, state
