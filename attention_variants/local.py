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

How it is computed: queries are cut into blocks of `block`; keys and values
into blocks of the same size, padded with ceil(left / block) empty blocks in
front and ceil(right / block) behind. Query block i then needs only the
`span` = ceil(left / block) + 1 + ceil(right / block) key blocks around it,
which are `span` shifted views of the blocked keys (a static number, never a
gather over the sequence). A lax.scan walks over groups of query blocks
(about 512 query rows per step) and runs one masked softmax per group over
its [block, span * block] scores, so the largest temporary is one step's
scores: time is O(N x window) and memory O(N + rows x window). The step is
rematerialised in the backward pass (jax.checkpoint), so training memory is
O(N) plus one step too; no N x N mask or score matrix is ever built. Lengths
that are not multiples of `block` are padded internally and masked. When the
window covers the sequence the result equals full attention.

Implementations:
  xla        the banded computation above (any backend).
  reference  dense softmax under the window mask; O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

DEFAULTS = {'window': 128, 'left': -1, 'right': -1, 'block': 128}
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


# Query rows per scan step: temporaries stay ~rows x window per head whatever
# N is, and each step is large enough that the loop overhead is negligible.
_ROWS_PER_STEP = 512


def _step_shape(n_blocks, block):
  """(steps, blocks_per_step): query blocks split evenly into scan steps."""
  most = max(1, _ROWS_PER_STEP // block)
  steps = masks.ceil_div(n_blocks, most)
  return steps, masks.ceil_div(n_blocks, steps)


def _stepped_queries(q, kv_heads, block, steps, per_step):
  """[b, n, h, d] -> [steps, b, kvh, per_step, groups, block, d], padded."""
  b, n, h, d = q.shape
  q = jnp.pad(q, ((0, 0), (0, steps * per_step * block - n), (0, 0), (0, 0)))
  q = q.reshape(b, steps, per_step, block, kv_heads, h // kv_heads, d)
  return q.transpose(1, 0, 4, 2, 5, 3, 6)


def _unstepped_queries(x, n):
  """Undoes _stepped_queries: [steps, b, kvh, c, g, blk, d] -> [b, n, h, d]."""
  steps, b, kvh, c, g, block, d = x.shape
  x = x.transpose(1, 0, 3, 5, 2, 4, 6).reshape(b, steps * c * block, kvh * g, d)
  return x[:, :n]


def _banded_keys(k, block, n_blocks, n_left, n_right):
  """[b, n, kvh, d] -> [b, kvh, n_left + n_blocks + n_right, block, d].

  Key block j sits at index n_left + j, so query block i finds the key blocks
  its window reaches, i - n_left .. i + n_right, at indices i .. i + span - 1.
  Keys past the last reachable block are dropped; the rest is zero padding.
  """
  b, n, kvh, d = k.shape
  total = (n_left + n_blocks + n_right) * block
  k = k[:, :min(n, (n_blocks + n_right) * block)]
  k = jnp.pad(k, ((0, 0), (n_left * block, total - n_left * block - k.shape[1]),
                  (0, 0), (0, 0)))
  return k.reshape(b, -1, block, kvh, d).transpose(0, 3, 1, 2, 4)


def _neighbour_keys(slab, per_step, span):
  """[b, kvh, per_step + span - 1, blk, d] -> [b, kvh, per_step, span * blk, d].

  Query block i of the step gets slab blocks i .. i + span - 1: `span`
  shifted views of the blocked keys, never a gather over the sequence.
  """
  b, kvh, _, block, d = slab.shape
  views = [slab[:, :, o:o + per_step] for o in range(span)]
  return jnp.stack(views, axis=3).reshape(b, kvh, per_step, span * block, d)


def _neighbour_mask(first_block, per_step, block, span, n_left, ql, kl, *,
                    causal, left, right):
  """bool [b, 1, per_step, 1, block, span * block] for one scan step."""
  blocks = first_block + jnp.arange(per_step)
  q_pos = blocks[:, None] * block + jnp.arange(block)
  k_pos = (blocks[:, None] - n_left) * block + jnp.arange(span * block)
  ok = masks.allowed(q_pos[None], k_pos[None], ql, kl, causal=causal,
                     left=left, right=right)
  ok &= (k_pos >= 0)[None, :, None, :]  # front padding has negative positions
  return ok[:, None, :, None]


def local_attention(q, k, v, *, causal, q_lengths, kv_lengths, left, right,
                    block):
  """Windowed attention [b, q_len, h, d] in O(N x window) time and memory."""
  kv_heads, _ = masks.check_inputs(q, k, v)
  _, n_q, _, d = q.shape
  n_k = k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  block = min(block, max(n_q, 1))
  steps, per_step = _step_shape(masks.ceil_div(n_q, block), block)
  n_blocks = steps * per_step
  # Neighbour blocks that hold no real key are dropped, so a window wider
  # than the sequence costs no more than full attention.
  n_left = min(masks.ceil_div(left, block), n_blocks - 1)
  n_right = max(min(masks.ceil_div(right, block),
                    masks.ceil_div(n_k, block) - 1), 0)
  span = n_left + 1 + n_right
  # Bounded so that i - left cannot overflow int32.
  left, right = min(left, n_q + n_k), min(right, n_q + n_k)
  scale = masks.default_scale(d)
  kb = _banded_keys(k, block, n_blocks, n_left, n_right)
  vb = _banded_keys(v, block, n_blocks, n_left, n_right)

  def step(_, xs):
    qs, i = xs
    first = i * per_step
    width = per_step + span - 1
    ks = _neighbour_keys(lax.dynamic_slice_in_dim(kb, first, width, axis=2),
                         per_step, span)
    vs = _neighbour_keys(lax.dynamic_slice_in_dim(vb, first, width, axis=2),
                         per_step, span)
    s = jnp.einsum('bkcgqd,bkcsd->bkcgqs', qs, ks,
                   preferred_element_type=jnp.float32) * scale
    ok = _neighbour_mask(first, per_step, block, span, n_left, ql, kl,
                         causal=causal, left=left, right=right)
    p = masks.masked_softmax(s, ok)
    out = jnp.einsum('bkcgqs,bkcsd->bkcgqd', p.astype(vs.dtype), vs,
                     preferred_element_type=jnp.float32)
    return None, out.astype(q.dtype)

  qs = _stepped_queries(q, kv_heads, block, steps, per_step)
  step = jax.checkpoint(step, prevent_cse=False)
  _, out = lax.scan(step, None, (qs, jnp.arange(steps)))
  return _unstepped_queries(out, n_q)


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
