"""Shape checks, lengths and masks shared by every attention variant.

Anything two variants need lives here, once: input validation, valid-length
vectors, the block-level "may query i see key j" predicate, grouped-query
reshapes and the float32 masked softmax that returns zeros for empty rows.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: exp(NEG_INF - m) underflows to 0 without NaNs.
NEG_INF = -1e30


def check_inputs(q, k, v):
  """Validates the BTNH layout and returns (kv_heads, groups)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        'attention inputs must be [batch, len, heads, head_dim]; got ranks '
        f'q={q.ndim}, k={k.ndim}, v={v.ndim}')
  if k.shape != v.shape:
    raise ValueError(f'k and v shapes differ: {k.shape} vs {v.shape}')
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
    raise ValueError(
        f'q {q.shape} and k {k.shape} must share batch and head_dim')
  heads, kv_heads = q.shape[2], k.shape[2]
  if heads % kv_heads:
    raise ValueError(
        f'heads ({heads}) must be a multiple of kv_heads ({kv_heads})')
  return kv_heads, heads // kv_heads


def default_scale(head_dim: int) -> float:
  return 1.0 / math.sqrt(head_dim)


def lengths_or_full(lengths, batch: int, n: int):
  """Valid lengths as int32 [batch]; None means every position is valid."""
  if lengths is None:
    return jnp.full((batch,), n, jnp.int32)
  lengths = jnp.asarray(lengths, jnp.int32)
  if lengths.shape != (batch,):
    raise ValueError(f'lengths must have shape ({batch},), got {lengths.shape}')
  return jnp.minimum(lengths, n)


def valid_lengths(q, k, q_lengths, kv_lengths):
  """(q_lengths, kv_lengths) as int32 [batch], full length where None."""
  b = q.shape[0]
  return (lengths_or_full(q_lengths, b, q.shape[1]),
          lengths_or_full(kv_lengths, b, k.shape[1]))


def allowed(q_pos, k_pos, q_lengths, kv_lengths, *, causal: bool,
            left=None, right=None):
  """Whether query q_pos may look at key k_pos, broadcast over the batch.

  q_pos: int [B, ..., tq] and k_pos: int [B, ..., tk], absolute positions
  whose leading axis is the batch or 1 (broadcast). Returns bool
  [batch, ..., tq, tk]. Positions at or past a length are
  padding. `left`/`right` bound the window: key j is visible from query i
  when i - left <= j <= i + right. Causal means j <= i (top-left aligned,
  as jax.nn.dot_product_attention).
  """
  qp = q_pos[..., :, None]
  kp = k_pos[..., None, :]
  extra = (1,) * (qp.ndim - 1)  # lengths broadcast over all but the batch
  ql = q_lengths.reshape(q_lengths.shape + extra)
  kl = kv_lengths.reshape(kv_lengths.shape + extra)
  ok = (qp < ql) & (kp < kl)
  if causal:
    ok &= kp <= qp
  if left is not None:
    ok &= kp >= qp - left
  if right is not None and not causal:
    ok &= kp <= qp + right
  return ok


def group_queries(q, kv_heads: int):
  """[b, n, h, d] -> [b, n, kv_heads, groups, d] (GQA without repeating k/v)."""
  b, n, h, d = q.shape
  return q.reshape(b, n, kv_heads, h // kv_heads, d)


def masked_softmax(scores, mask):
  """Float32 softmax over the last axis; rows with no allowed key are zeros."""
  scores = jnp.where(mask, scores.astype(jnp.float32), NEG_INF)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(scores - m), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0.0, 1.0, denom)


def row_has_key(q_lengths, kv_lengths, n_q: int):
  """bool [batch, n_q]: query row is valid and at least one key is valid.

  Holds for full and causal attention alike (key 0 precedes every query).
  """
  pos = jnp.arange(n_q)
  return (pos[None, :] < q_lengths[:, None]) & (kv_lengths[:, None] > 0)


def check_positive_int(name: str, value, *, minimum: int = 1):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(
        f'{name}={value!r} is invalid: must be an integer >= {minimum}')
  return value


def on_gpu() -> bool:
  return jax.default_backend() == 'gpu'


def ceil_div(a, b):
  """ceil(a / b) for positive b; works on Python ints and int arrays."""
  return -(-a // b)


def pad_to_multiple(x, axis: int, multiple: int):
  """Zero-pads `axis` at the end so its size is a multiple of `multiple`.

  Blocked variants pad internally so any length works; the padding must be
  masked by position (it lies at or past every valid length).
  """
  extra = ceil_div(x.shape[axis], multiple) * multiple - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def row_blocks(x, block: int, n: int):
  """x [b, rows, ...] zero-padded to n rows (a multiple of block) and split
  into [n / block, b, block, ...], for a lax.scan over blocks of rows."""
  x = pad_to_multiple(x, 1, n)
  return jnp.moveaxis(x.reshape((x.shape[0], n // block, block)
                                + x.shape[2:]), 1, 0)


def unblock_rows(x, n_rows: int):
  """row_blocks' inverse: [steps, b, block, ...] -> [b, n_rows, ...] (the
  padding rows cut off)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :n_rows]


def block_valid(start, block: int, lengths):
  """bool [b, block]: positions start .. start + block - 1 < lengths."""
  return (start + jnp.arange(block))[None, :] < lengths[:, None]


class KeyPart(NamedTuple):
  """One set of keys that blocked queries attend to (gathered variants).

  Queries come as blocks [batch, blocks, block_len, kv_heads, groups, d].
  k: [batch, blocks|1, kv_heads, groups|1, block_len|1, t, d] and
  v: [batch, blocks|1, kv_heads, groups|1, block_len|1, d, t]; an axis
    written `|1` may have size 1 and is then shared by every query block,
    every query head of a GQA group, or every row of a block. These are the
    layouts in which XLA:CPU's score and output matmuls read their operands
    (batch axes first, the contracted axis last), so keys shared by all
    query blocks can be laid out once and read in place, not copied per use.
  mask: bool, broadcastable to [batch, blocks, kv_heads, groups, block_len, t]:
    which of the t keys each query may see (padding, causality, pattern and
    duplicates across parts already applied).
  pos: int absolute key positions, broadcastable to
    [blocks, kv_heads, groups, block_len, t]; only attention_weights needs
    them, and entries whose mask is False may hold anything.
  name: which structural component of the pattern these keys are ('window',
    'global', ...; attention_parts reports the mass on each by name); ''
    where nothing reads it.
  """
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  pos: jax.Array
  name: str = ''


def _part_operand(x, axes):
  """(einsum subscript, x without its shared size-1 axes) for a KeyPart's k
  (axes 'bnkgqtd') or v ('bnkgqdt')."""
  keep = [not (axis in 'nqg' and size == 1)
          for axis, size in zip(axes, x.shape)]
  sub = ''.join(a for a, kept in zip(axes, keep) if kept)
  return sub, x.reshape(tuple(s for s, kept in zip(x.shape, keep) if kept))


def _key_part_exps(q_blocks, parts, scale):
  """Unnormalized float32 softmax terms per part and their row sums.

  One softmax runs over the keys of all parts together (a joint row max, no
  concatenation), so each key must appear unmasked in at most one part.
  Terms are [b, blocks, kv_heads, groups, block_len, t_i]; sums end in 1.
  """
  scores = []
  for part in parts:
    sub, k = _part_operand(part.k, 'bnkgqtd')
    s = jnp.einsum(f'bnqkgd,{sub}->bnkgqt', q_blocks, k,
                   preferred_element_type=jnp.float32) * scale
    scores.append(jnp.where(part.mask, s, NEG_INF))
  m = functools.reduce(jnp.maximum,
                       [jnp.max(s, axis=-1, keepdims=True) for s in scores])
  exps = [jnp.where(part.mask, jnp.exp(s - m), 0.0)
          for s, part in zip(scores, parts)]
  total = sum(jnp.sum(e, axis=-1, keepdims=True) for e in exps)
  return exps, total


def key_part_probs(q_blocks, parts, scale):
  """Float32 probabilities [b, blocks, kv_heads, groups, block_len, t_i].

  Rows with no allowed key in any part are zeros.
  """
  exps, total = _key_part_exps(q_blocks, parts, scale)
  total = jnp.where(total == 0.0, 1.0, total)
  return [e / total for e in exps]


def key_parts_output(q_blocks, parts, scale):
  """Float32 attention output [b, blocks, block_len, kv_heads, groups, d].

  Same softmax as key_part_probs, normalized after the product with V (d
  divisions per row instead of t). Rows with no allowed key are zeros.
  """
  exps, total = _key_part_exps(q_blocks, parts, scale)
  out = 0.0
  for e, part in zip(exps, parts):
    sub, v = _part_operand(part.v, 'bnkgqdt')
    # Batch axes in the scores' order (k, g, q): no operand is transposed.
    out = out + jnp.einsum(f'bnkgqt,{sub}->bnkgqd', e.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
  total = jnp.where(total == 0.0, 1.0, total)  # [b, n, k, g, q, 1]
  return (out / total).transpose(0, 1, 4, 2, 3, 5)


def key_parts_dense(probs, parts, n: int):
  """Dense float32 [b, blocks, kv_heads, groups, block_len, n] from key parts.

  Scatters each part's probabilities to its key positions; for
  attention_weights on short sequences only.
  """
  dense = 0.0
  for p, part in zip(probs, parts):
    pos = jnp.broadcast_to(part.pos, p.shape[1:])
    pos = jnp.where((pos >= 0) & (pos < n), pos, n)  # dropped by the scatter
    rows = p.reshape(-1, p.shape[-1])
    cols = jnp.broadcast_to(pos, p.shape).reshape(rows.shape)
    scattered = jnp.zeros((rows.shape[0], n), jnp.float32).at[
        jnp.arange(rows.shape[0])[:, None], cols].add(rows, mode='drop')
    dense = dense + scattered.reshape(p.shape[:-1] + (n,))
  return dense


# --- Decoding (one new token per row over cached keys) ---------------------


def token_attention(q, k, v, visible, *, scale=None):
  """Float32 [b, h, d]: one query token per row against t cached keys.

  q [b, h, d]; k, v [b, t, kv_heads, d]; visible bool broadcastable to
  [b, h, t]. One float32 softmax over the visible keys (scale 1/sqrt(d) by
  default), as masked_softmax; a row with no visible key is zeros.
  """
  b, h, d = q.shape
  kv_heads = k.shape[2]
  scale = default_scale(d) if scale is None else scale
  qg = q.reshape(b, kv_heads, h // kv_heads, d)
  s = jnp.einsum('bkgd,btkd->bkgt', qg, k,
                 preferred_element_type=jnp.float32) * scale
  p = masked_softmax(s.reshape(b, h, -1), visible)
  out = jnp.einsum('bkgt,btkd->bkgd',
                   p.reshape(b, kv_heads, h // kv_heads, -1),
                   v.astype(jnp.float32))
  return out.reshape(b, h, d)


def kv_write(state, k, v, slot):
  """A decoding state {'k', 'v' [b, t, kv_heads, d], ...} with the token's
  k, v [b, kv_heads, d] written at index `slot` (a traced scalar) of t."""
  write = lambda cache, x: jax.lax.dynamic_update_slice_in_dim(
      cache, x[:, None].astype(cache.dtype), slot, axis=1)
  return {**state, 'k': write(state['k'], k), 'v': write(state['v'], v)}


def gather_positions(cache, positions):
  """cache [b, t, kv_heads, d] at positions int [n] (clipped into range;
  the caller masks the ones it clipped) -> [b, n, kv_heads, d]."""
  return jnp.take(cache, jnp.clip(positions, 0, cache.shape[1] - 1), axis=1)
