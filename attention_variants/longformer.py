"""Longformer attention (Beltagy et al. 2020): a sliding window plus global
positions, computed block by block: O(N (window + num_global)).

Key j is visible from query i (i, j absolute positions, 0-based) when

  |i - j| <= window   (causal: i - window <= j <= i; the window of `local`
                       with left = right = window),
  or j < num_global   (every query sees the global keys),
  or i < num_global   (global queries see every key),

and j <= i when causal, on top of padding (i < q_length, j < kv_length). The
global positions are the first num_global tokens, so a leading CLS token is
global. Causal global queries see every key up to themselves; the global
keys precede every other query, so causality leaves them visible. A query
row with no visible key outputs zeros.

Hyperparameters (config.attention.longformer):
  window      keys visible on each side of the query, an integer >= 1 (the
              convention of local's `window`): a non-global query sees
              2 * window + 1 window keys (window + 1 when causal), itself
              included, plus the global keys.
  num_global  g, an integer >= 0: the first g positions are global (default
              1: the CLS token). 0 is plain sliding-window attention;
              g >= the query length is full attention.
  block       queries per block, an integer >= 1 (clamped to the query
              length).
When the window covers the sequence (window >= length - 1) or every query
is global, the result equals full attention.

Components (weight_parts, the mass on each in pictures): 'global' (every
key of a global query, and the global keys of the others) and 'window'
(the rest of the band).

How it is computed: the g global query rows are one dense masked softmax
over all keys ([g, N] scores). The other rows go through a lax.scan over
blocks of `block` queries, as in local.py: query block c slices its run of
block + 2 * window keys (block + window causal, start clamped into the
sequence) straight out of k and v, and attends to it and to the g global
keys in ONE softmax (masks.key_parts_output: a joint row maximum and one
normaliser over both key sets). A global key that also lies in the window
is masked out of the window's part, so no key counts twice. The global keys
are laid out once, outside the loop; blocks made only of global rows are
skipped; the step is rematerialised in the backward pass (jax.checkpoint).
Statistics are float32; the output is in q's dtype. Time O(N (block + 2 w +
g) d), memory O(N + g N + block (block + 2 w + g)); no N x N array exists
in `attend` (`weights` builds the dense probabilities, for tests and
pictures). Any length works (the last block is padded and masked), q_len !=
kv_len (positions are absolute, top-left aligned), and GQA.

Implementations:
  xla        the computation above (any backend).
  reference  dense softmax under the pattern's mask; O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import local
from attention_variants import masks
from attention_variants.blocksparse import (as_mask, as_pos, for_allowed,
                                            key_layout)

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.longformer.window', params['window'])
  masks.check_positive_int('attention.longformer.num_global',
                           params['num_global'], minimum=0)
  masks.check_positive_int('attention.longformer.block', params['block'])


def pattern_masks(q, k, *, causal, q_lengths, kv_lengths, window,
                  num_global):
  """Dense bool [b, 1, q_len, kv_len] (window, global): the global part is
  every visible key of a global query and the global keys of the others;
  the window part the rest of the band. Disjoint; padding and causality
  applied."""
  band = local.window_mask(q, k, causal=causal, q_lengths=q_lengths,
                           kv_lengths=kv_lengths, left=window, right=window)
  visible = full.full_mask(q, k, causal=causal, q_lengths=q_lengths,
                           kv_lengths=kv_lengths)
  n_q, n_k = q.shape[1], k.shape[1]
  g = min(num_global, max(n_q, n_k))  # fits int32 whatever was asked
  i = jnp.arange(n_q)[:, None]
  j = jnp.arange(n_k)[None, :]
  is_global = visible & ((i < g) | (j < g))
  return band & ~is_global, is_global


def _global_rows(q, k, v, ql, kl, causal, n_rows):
  """The first n_rows (global) queries against every key, [b, n_rows, h, d]."""
  mask = masks.allowed(jnp.arange(n_rows)[None], jnp.arange(k.shape[1])[None],
                       ql, kl, causal=causal)[:, None]
  return full.probs_times_v(full.dense_probs(q[:, :n_rows], k, mask), v,
                            q.dtype)


def _window_rows(q, k, v, ql, kl, causal, *, window, n_global, block):
  """Query rows n_global .. n_q - 1: window keys and the first n_global
  keys in one softmax per row, block by block; [b, n_q - n_global, h, d]."""
  n_gk = min(n_global, k.shape[1])
  return window_rows(q, k, v, k[:, :n_gk], v[:, :n_gk], ql, kl,
                     causal=causal, window=window, block=block,
                     first_row=n_global)


def window_rows(q, k, v, gk, gv, ql, kl, *, causal, window, block,
                first_row=0, q_offset=0, k_offset=0):
  """Rows first_row .. n_q - 1 of q [b, n_q, h, d]: their window keys,
  sliced from k, v, and the global keys gk, gv [b, g, kv_heads, d]
  (positions 0 .. g - 1) in one softmax per row; [b, n_q - first_row, h, d].

  q holds absolute positions q_offset .., k and v k_offset .. (traced
  offsets allowed: a shard and its halos, sequence_parallel.py); ql, kl are
  valid lengths in absolute positions. Window keys at positions < g (they
  are in the global part) or < 0 (a halo before the sequence) are masked.
  """
  kv_heads, groups = masks.check_inputs(q, k, v)
  b, n_q, h, d = q.shape
  n_k = k.shape[1]
  left, right = window, 0 if causal else window
  block = min(block, max(n_q, 1))
  total = masks.ceil_div(n_q, block)
  skip = first_row // block  # blocks made of skipped (global) rows only
  steps = total - skip
  width = min(block + left + right, n_k)
  scale = masks.default_scale(d)
  qs = masks.pad_to_multiple(q, 1, block).reshape(
      b, total, block, kv_heads, groups, d)[:, skip:]
  qs = jnp.moveaxis(qs, 1, 0)  # [steps, b, block, kv_heads, groups, d]
  n_gk = gk.shape[1]
  if n_gk:
    gk, gv = key_layout(gk[:, None], gv[:, None])
    g_pos = jnp.arange(n_gk)[None]

  def step(_, xs):
    qb, c = xs
    first = q_offset + (skip + c) * block
    q_pos = for_allowed((first + jnp.arange(block))[None])
    start = jnp.clip(first - left - k_offset, 0, n_k - width)
    k_pos = (k_offset + start + jnp.arange(width))[None]
    kw, vw = (lax.dynamic_slice_in_dim(x, start, width, axis=1)[:, None]
              for x in (k, v))
    kw, vw = key_layout(kw, vw)
    mask = masks.allowed(q_pos, for_allowed(k_pos), ql, kl, causal=causal,
                         left=left, right=right)
    # Global keys come in their own part; never twice.
    mask &= as_mask(k_pos >= n_gk)
    parts = [masks.KeyPart(k=kw, v=vw, mask=mask, pos=as_pos(k_pos))]
    if n_gk:
      g_mask = masks.allowed(q_pos, for_allowed(g_pos), ql, kl, causal=causal)
      parts.append(masks.KeyPart(k=gk, v=gv, mask=g_mask, pos=as_pos(g_pos)))
    out = masks.key_parts_output(qb[:, None], parts, scale)
    return None, out.reshape(b, block, h, d).astype(q.dtype)

  step = jax.checkpoint(step, prevent_cse=False)
  _, out = lax.scan(step, None, (qs, jnp.arange(steps)))
  out = jnp.moveaxis(out, 0, 1).reshape(b, steps * block, h, d)
  return out[:, first_row - skip * block:n_q - skip * block]


def longformer_attention(q, k, v, *, causal, q_lengths, kv_lengths, window,
                         num_global, block):
  """Longformer attention [b, q_len, h, d] in O(N (window + num_global))."""
  masks.check_inputs(q, k, v)
  n_q, n_k = q.shape[1], k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  # Bounded so that i - window cannot overflow int32.
  window = min(window, n_q + n_k)
  n_global = min(num_global, n_q)
  pieces = []
  if n_global:
    pieces.append(_global_rows(q, k, v, ql, kl, causal, n_global))
  if n_global < n_q:
    pieces.append(_window_rows(q, k, v, ql, kl, causal, window=window,
                               n_global=n_global, block=block))
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def _masks(q, k, params, causal, q_lengths, kv_lengths):
  return pattern_masks(q, k, causal=causal, q_lengths=q_lengths,
                       kv_lengths=kv_lengths, window=params['window'],
                       num_global=params['num_global'])


def _mask(q, k, params, causal, q_lengths, kv_lengths):
  """Dense bool [b, 1, q_len, kv_len]: window | global."""
  window, is_global = _masks(q, k, params, causal, q_lengths, kv_lengths)
  return window | is_global


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense probabilities, exactly zero outside the pattern (short inputs)."""
  del v, implementation, rng
  check_params(params)
  return full.dense_probs(q, k, _mask(q, k, params, causal, q_lengths,
                                      kv_lengths))


def weight_parts(q, k, v, params, *, implementation='auto', causal=False,
                 q_lengths=None, kv_lengths=None, rng=None):
  """{'window', 'global'}: `weights` split by pattern_masks (summing to it)."""
  del v, implementation, rng
  check_params(params)
  window, is_global = _masks(q, k, params, causal, q_lengths, kv_lengths)
  probs = full.dense_probs(q, k, window | is_global)
  return {'window': jnp.where(window, probs, 0.0),
          'global': jnp.where(is_global, probs, 0.0)}


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  if implementation == 'reference':
    mask = _mask(q, k, params, causal, q_lengths, kv_lengths)
    return full.probs_times_v(full.dense_probs(q, k, mask), v, q.dtype)
  return longformer_attention(
      q, k, v, causal=causal, q_lengths=q_lengths, kv_lengths=kv_lengths,
      window=params['window'], num_global=params['num_global'],
      block=params['block'])


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: the global keys and values (the first num_global
  positions) and a ring buffer of the causal window (local.decode_init):
  memory O(window + num_global), not O(max_len)."""
  del num_heads, rng, learned
  check_params(params)
  g = min(params['num_global'], max_len)
  shape = (batch, max(g, 1), num_kv_heads, head_dim)
  ring = local.ring_init(batch, min(params['window'], max_len) + 1,
                         num_kv_heads, head_dim, dtype)
  return {'global': {'k': jnp.zeros(shape, dtype),
                     'v': jnp.zeros(shape, dtype)}, 'ring': ring}


def decode_step(q, k, v, state, pos, params):
  """(output [b, h, d] float32, state) of the token at `pos`, in one
  softmax over its visible global keys (j < num_global, j <= pos) and its
  window keys in the ring (max(pos - window, num_global) <= j <= pos; a
  global query's keys are all global). O(window + num_global) per token."""
  g = params['num_global']
  n_g = state['global']['k'].shape[1]
  is_global = pos < g
  keep = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(is_global, a, b), new, old)
  # A global position goes to the global keys, every other to the ring.
  glob = keep(masks.kv_write(state['global'], k, v,
                             jnp.minimum(pos, n_g - 1)), state['global'])
  ring = keep(state['ring'], local.ring_write(state['ring'], k, v, pos))
  window = local.ring_visible(ring, pos, params['window']) & (ring['pos'] >= g)
  in_global = (jnp.arange(n_g) < g) & (jnp.arange(n_g) <= pos)
  keys = jnp.concatenate([glob['k'], ring['k']], axis=1)
  values = jnp.concatenate([glob['v'], ring['v']], axis=1)
  visible = jnp.concatenate([in_global, window])[None, None]
  out = masks.token_attention(q, keys, values, visible)
  return out, {'global': glob, 'ring': ring}
