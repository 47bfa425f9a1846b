"""Sliding-window (local) attention computed block by block: O(N x window).

Key j is visible from query i when  i - left <= j <= i + right  (and j <= i
when causal), on top of padding. This is the convention of
jax.nn.dot_product_attention(local_window_size=(left, right)).

Hyperparameters (config.attention.local):
  window  default extent on each side, an integer >= 1.
  left    keys visible before the query; -1 means "= window"; else >= 0.
  right   keys visible after the query; -1 means "= window"; else >= 0.
          Causal attention ignores it (it only looks left).
  block   queries per block, an integer >= 1 (clamped to the query length).
So the default is symmetric: a query sees 2 * window + 1 keys (window + 1
when causal), itself included.

How it is computed: a lax.scan walks over blocks of `block` queries. Query
block c (rows c*block .. c*block + block - 1) can only see keys in
[c*block - left, c*block + block - 1 + right], a run of block + left + right
keys; the step takes that run as one contiguous dynamic slice of k and v
(its start clamped into the sequence, which keeps every key the block needs
inside it) and runs one masked softmax over the [block, block + left + right]
scores, masking by absolute positions. k and v are never padded or copied:
the steps slice the caller's buffers (for batch 1, q is not copied either),
so the N-sized buffers are the output and, for batch > 1, a transposed copy
of q and of the output. Time is O(N x window) and memory O(N + block x
window). The step is rematerialised in the backward pass
(jax.checkpoint), so training memory is O(N) plus one step too; no N x N
mask or score matrix is ever built. A query length that is not a multiple
of `block` is padded for the last block and masked. When the window covers
the sequence the result equals full attention.

Implementations:
  xla        the block-by-block computation above (any backend).
  reference  dense softmax under the window mask; O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def _check_extent(name, value):
  if (not isinstance(value, int) or isinstance(value, bool) or value < -1):
    raise ValueError(
        f'attention.local.{name}={value!r} is invalid: must be -1 (= window) '
        'or an integer >= 0')


def check_params(params):
  masks.check_positive_int('attention.local.window', params['window'])
  masks.check_positive_int('attention.local.block', params['block'])
  _check_extent('left', params['left'])
  _check_extent('right', params['right'])


def extents(params, causal: bool):
  """(left, right) window extents after resolving -1; right is 0 if causal."""
  window = params['window']
  left = window if params['left'] == -1 else params['left']
  right = window if params['right'] == -1 else params['right']
  return left, 0 if causal else right


def window_mask(q, k, *, causal, q_lengths, kv_lengths, left, right):
  """Dense bool [b, 1, q_len, kv_len] window-and-padding mask (tests only)."""
  n_q, n_k = q.shape[1], k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  # Bounded so that i - left cannot overflow int32.
  left, right = min(left, n_q + n_k), min(right, n_q + n_k)
  ok = masks.allowed(jnp.arange(q.shape[1])[None], jnp.arange(k.shape[1])[None],
                     ql, kl, causal=causal, left=left, right=right)
  return ok[:, None]


def local_attention(q, k, v, *, causal, q_lengths, kv_lengths, left, right,
                    block):
  """Windowed attention [b, q_len, h, d] in O(N x window) time and memory."""
  masks.check_inputs(q, k, v)
  n_q, n_k = q.shape[1], k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  # Bounded so that i - left cannot overflow int32.
  left, right = min(left, n_q + n_k), min(right, n_q + n_k)
  return banded_attention(q, k, v, ql, kl, causal=causal, left=left,
                          right=right, block=block)


def banded_attention(q, k, v, ql, kl, *, causal, left, right, block,
                     q_offset=0, k_offset=0):
  """The block-by-block window computation of the module docstring.

  q [b, n_q, h, d] holds the queries at absolute positions q_offset ..
  q_offset + n_q - 1 and k, v [b, n_k, kv_heads, d] the keys at k_offset ..
  k_offset + n_k - 1 (offsets may be traced: a shard of a longer sequence,
  its keys extended by the neighbours' halos, sequence_parallel.py). ql, kl
  are int32 [batch] valid lengths in absolute positions; keys at negative
  positions (a halo before the sequence start) are masked. The caller
  bounds left and right.
  """
  kv_heads, groups = masks.check_inputs(q, k, v)
  b, n_q, h, d = q.shape
  n_k = k.shape[1]
  block = min(block, max(n_q, 1))
  steps = masks.ceil_div(n_q, block)
  # Keys a query block can reach; a window wider than the sequence costs no
  # more than full attention.
  width = min(block + left + right, n_k)
  scale = masks.default_scale(d)
  # [steps, b, block, h, d]: for batch 1 (and any query length that is a
  # multiple of block) a reshape of the caller's buffer, not a copy.
  qs = masks.pad_to_multiple(q, 1, block)
  qs = jnp.moveaxis(qs.reshape(b, steps, block, h, d), 1, 0)

  def step(_, xs):
    qb, i = xs
    first = q_offset + i * block
    # Clamping keeps the slice inside k; it still holds every key the block
    # can see (those lie in k and in the unclamped run).
    start = jnp.clip(first - left - k_offset, 0, n_k - width)
    kw = lax.dynamic_slice_in_dim(k, start, width, axis=1)
    vw = lax.dynamic_slice_in_dim(v, start, width, axis=1)
    qb = qb.reshape(b, block, kv_heads, groups, d)
    s = jnp.einsum('bqkgd,bskd->bkgqs', qb, kw,
                   preferred_element_type=jnp.float32) * scale
    k_pos = k_offset + start + jnp.arange(width)
    ok = masks.allowed((first + jnp.arange(block))[None], k_pos[None], ql, kl,
                       causal=causal, left=left, right=right)
    ok &= (k_pos >= 0)[None, None]
    p = masks.masked_softmax(s, ok[:, None, None])
    out = jnp.einsum('bkgqs,bskd->bqkgd', p.astype(vw.dtype), vw,
                     preferred_element_type=jnp.float32)
    return None, out.reshape(b, block, h, d).astype(q.dtype)

  step = jax.checkpoint(step, prevent_cse=False)
  _, out = lax.scan(step, None, (qs, jnp.arange(steps)))
  return jnp.moveaxis(out, 0, 1).reshape(b, steps * block, h, d)[:, :n_q]


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense probabilities, exactly zero outside the window (short inputs)."""
  del v, implementation, rng
  check_params(params)
  left, right = extents(params, causal)
  mask = window_mask(q, k, causal=causal, q_lengths=q_lengths,
                     kv_lengths=kv_lengths, left=left, right=right)
  return full.dense_probs(q, k, mask)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  left, right = extents(params, causal)
  if implementation == 'reference':
    mask = window_mask(q, k, causal=causal, q_lengths=q_lengths,
                       kv_lengths=kv_lengths, left=left, right=right)
    return full.probs_times_v(full.dense_probs(q, k, mask), v, q.dtype)
  return local_attention(q, k, v, causal=causal, q_lengths=q_lengths,
                         kv_lengths=kv_lengths, left=left, right=right,
                         block=params['block'])


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads, head_dim,
                dtype, rng=None, learned=None):
  """Decoding state: a ring buffer of the causal window, the last left + 1
  keys and values (memory O(window), not O(max_len)) and the position each
  slot holds (-1: empty)."""
  del num_heads, rng, learned
  check_params(params)
  left, _ = extents(params, causal=True)
  return ring_init(batch, min(left, max_len) + 1, num_kv_heads, head_dim,
                   dtype)


def ring_init(batch, slots, num_kv_heads, head_dim, dtype):
  """An empty ring buffer of `slots` keys and values per row."""
  shape = (batch, slots, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'pos': jnp.full((slots,), -1, jnp.int32)}


def ring_write(state, k, v, pos):
  """A ring-buffer state with the token at `pos` in slot pos % slots."""
  slot = pos % state['pos'].shape[0]
  state = masks.kv_write(state, k, v, slot)
  return {**state, 'pos': state['pos'].at[slot].set(pos)}


def ring_visible(state, pos, left):
  """bool [slots]: the ring's slots holding positions pos - left .. pos."""
  held = state['pos']
  return (held >= 0) & (held >= pos - left) & (held <= pos)


def decode_step(q, k, v, state, pos, params):
  """(output [b, h, d] float32, state) of the token at `pos`: it attends to
  positions pos - left .. pos, all of them in the ring. O(window) per
  token."""
  left, _ = extents(params, causal=True)
  state = ring_write(state, k, v, pos)
  visible = ring_visible(state, pos, left)[None, None]
  return masks.token_attention(q, state['k'], state['v'], visible), state
