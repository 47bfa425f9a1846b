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

