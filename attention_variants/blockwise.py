"""Exact softmax attention computed block by block (memory-efficient attention).

Queries are split into blocks of `q_block` rows and keys/values into blocks of
`kv_block`. For each query block a loop over key blocks keeps a running max,
a running sum and a running output (online softmax: Rabe & Staats 2021;
FlashAttention, Dao et al. 2022), so no score matrix larger than
q_block x kv_block exists at any time.

The gradient is a jax.custom_vjp: the forward pass saves only the output and
the per-query log-sum-exp, and the backward pass loops over key blocks again
(and over query blocks inside each), recomputing every block's scores from
q, k and the saved log-sum-exp. Forward and backward memory are therefore
O(N x block), never N x N; plain autodiff through the loops would store every
block's scores instead.

Blocks that cannot contribute are skipped by dynamic loop bounds: key blocks
past the longest key length or (causal) past the diagonal, query blocks past
the longest query length. Grouped-query attention is computed by grouping the
query heads that share a key/value head, never by repeating k and v.

Hyperparameters (config.attention.blockwise):
  q_block   queries per block, an integer >= 1 (clamped to the query length).
  kv_block  keys per block, an integer >= 1 (clamped to the key length).
Lengths that are not multiples of a block are padded internally and the
padding is masked, so any length works. The defaults are the fastest measured
on a 2-core CPU at N=8192, head_dim 64.

Implementations:
  xla        the blocked loops above (any backend).
  reference  dense softmax with the same mask (full.py); O(N^2), for tests.
  auto       xla.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')


def check_params(params):
  masks.check_positive_int('attention.blockwise.q_block', params['q_block'])
  masks.check_positive_int('attention.blockwise.kv_block', params['kv_block'])


class _Plan(NamedTuple):
  """Static facts the loops need (hashable: a nondiff custom_vjp argument)."""
  causal: bool
  q_block: int
  kv_block: int
  scale: float


def _blocked_queries(q, kv_heads, block):
  """[b, n, h, d] -> [n_blocks, b, kv_heads, groups, block, d], zero padded."""
  b, _, h, d = q.shape
  q = masks.pad_to_multiple(q, 1, block)
  q = q.reshape(b, -1, block, kv_heads, h // kv_heads, d)
  return q.transpose(1, 0, 3, 4, 2, 5)


def _unblocked_queries(x, n):
  """Inverse of _blocked_queries: [nb, b, kvh, g, block, d] -> [b, n, h, d]."""
  nb, b, kvh, g, block, d = x.shape
  x = x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, kvh * g, d)
  return x[:, :n]


def _blocked_keys(k, block):
  """[b, n, kv_heads, d] -> [n_blocks, b, kv_heads, block, d], zero padded."""
  b, _, kvh, d = k.shape
  k = masks.pad_to_multiple(k, 1, block)
  return k.reshape(b, -1, block, kvh, d).transpose(1, 0, 3, 2, 4)


def _block_scores(qi, kj, i, j, ql, kl, plan):
  """Scaled float32 scores [b, kvh, g, q_block, kv_block] of block pair (i, j).

  Masked entries (padding, future keys when causal) are NEG_INF.
  """
  return masked_scores(qi, kj, i * plan.q_block + jnp.arange(plan.q_block),
                       j * plan.kv_block + jnp.arange(plan.kv_block), ql, kl,
                       causal=plan.causal, scale=plan.scale)


def masked_scores(qi, kj, q_pos, k_pos, ql, kl, *, causal, scale):
  """Scaled float32 scores [b, kvh, g, tq, tk] of queries qi [b, kvh, g, tq,
  d] at absolute positions q_pos [tq] against keys kj [b, kvh, tk, d] at
  k_pos [tk]; NEG_INF where masked (padding, future keys when causal)."""
  s = jnp.einsum('bkgqd,bksd->bkgqs', qi, kj,
                 preferred_element_type=jnp.float32) * scale
  ok = masks.allowed(q_pos[None], k_pos[None], ql, kl, causal=causal)
  return jnp.where(ok[:, None, None], s, masks.NEG_INF)


def online_step(carry, s, vj):
  """One online-softmax update of (running max m, running sum l, output
  accumulator acc) by the masked scores s [..., tq, tk] of values vj."""
  m, l, acc = carry
  m_new = jnp.maximum(m, jnp.max(s, axis=-1))
  # A row with no visible key yet has max NEG_INF; shifting it by 0 instead
  # makes its masked scores exp to 0 rather than 1.
  shift = jnp.where(m_new == masks.NEG_INF, 0.0, m_new)
  p = jnp.exp(s - shift[..., None])
  correction = jnp.exp(m - shift)
  l = l * correction + jnp.sum(p, axis=-1)
  pv = jnp.einsum('bkgqs,bksd->bkgqd', p.astype(vj.dtype), vj,
                  preferred_element_type=jnp.float32)
  return m_new, l, acc * correction[..., None] + pv


def initial_stats(qi):
  """online_step's starting (m, l, acc) for queries qi [..., tq, d]."""
  stat_shape = qi.shape[:-1]
  return (jnp.full(stat_shape, masks.NEG_INF, jnp.float32),
          jnp.zeros(stat_shape, jnp.float32),
          jnp.zeros(qi.shape, jnp.float32))


def finish(m, l, acc):
  """(float32 output, log-sum-exp) from the final online-softmax stats."""
  has_key = l > 0.0
  out = acc / jnp.where(has_key, l, 1.0)[..., None]
  # +huge for empty rows: exp(score - lse) is then 0 for every key in the
  # backward pass, so those rows get zero gradients without another mask.
  lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)),
                  -masks.NEG_INF)
  return out, lse


def tile_grads(qi, kj, vj, doi, s, lse_i, delta_i, scale):
  """(dq_i, dk_j, dv_j) float32 of one (query tile, key tile) pair from its
  masked scores s, recomputing p = exp(s - lse); delta_i = dout_i . out_i
  (FlashAttention-2's rowsum(dP * P))."""
  p = jnp.exp(s - lse_i[..., None])
  dv = jnp.einsum('bkgqs,bkgqd->bksd', p.astype(doi.dtype), doi,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum('bkgqd,bksd->bkgqs', doi, vj,
                  preferred_element_type=jnp.float32)
  ds = p * (dp - delta_i[..., None]) * scale
  dq = jnp.einsum('bkgqs,bksd->bkgqd', ds.astype(kj.dtype), kj,
                  preferred_element_type=jnp.float32)
  dk = jnp.einsum('bkgqs,bkgqd->bksd', ds.astype(qi.dtype), qi,
                  preferred_element_type=jnp.float32)
  return dq, dk, dv


def _kv_block_range(i, n_kv_blocks, ql, kl, plan):
  """[lo, hi) of the key blocks that query block i can see."""
  hi = jnp.minimum(n_kv_blocks, masks.ceil_div(jnp.max(kl), plan.kv_block))
  if plan.causal:
    hi = jnp.minimum(hi, masks.ceil_div((i + 1) * plan.q_block, plan.kv_block))
  # Query blocks made only of padding need no keys: their output is zero.
  hi = jnp.where(i * plan.q_block < jnp.max(ql), hi, 0)
  return 0, hi


def _q_block_range(j, n_q_blocks, ql, kl, plan):
  """[lo, hi) of the query blocks that can see key block j."""
  lo = (j * plan.kv_block) // plan.q_block if plan.causal else 0
  hi = jnp.minimum(n_q_blocks, masks.ceil_div(jnp.max(ql), plan.q_block))
  # Key blocks made only of padding are seen by nobody.
  hi = jnp.where(j * plan.kv_block < jnp.max(kl), hi, lo)
  return lo, hi


def _query_block_forward(qi, i, kb, vb, ql, kl, plan):
  """Output [b, kvh, g, qb, d] (float32) and log-sum-exp [b, kvh, g, qb]."""
  def step(j, carry):
    return online_step(carry, _block_scores(qi, kb[j], i, j, ql, kl, plan),
                       vb[j])

  lo, hi = _kv_block_range(i, kb.shape[0], ql, kl, plan)
  return finish(*lax.fori_loop(lo, hi, step, initial_stats(qi)))


def _forward(qb, kb, vb, ql, kl, plan):
  """Blocked output (q dtype) and log-sum-exp [nqb, b, kvh, g, qb]."""
  def one_block(args):
    qi, i = args
    out, lse = _query_block_forward(qi, i, kb, vb, ql, kl, plan)
    return out.astype(qb.dtype), lse
  return lax.map(one_block, (qb, jnp.arange(qb.shape[0])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked_attention(qb, kb, vb, ql, kl, plan):
  return _forward(qb, kb, vb, ql, kl, plan)[0]


def _blocked_attention_fwd(qb, kb, vb, ql, kl, plan):
  out, lse = _forward(qb, kb, vb, ql, kl, plan)
  return out, (qb, kb, vb, ql, kl, out, lse)


def row_deltas(dout, out):
  """delta_i = sum_j p_ij dp_ij = dout_i . out_i (FlashAttention-2, eq. for
  dS), float32 over the last axis."""
  return jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)


def _blocked_attention_bwd(plan, residuals, dout):
  """Gradients w.r.t. blocked q, k, v; scores recomputed block by block."""
  qb, kb, vb, ql, kl, out, lse = residuals
  delta = row_deltas(dout, out)

  def kv_step(dq, xs):
    kj, vj, j = xs

    def q_step(i, carry):
      dq, dk, dv = carry
      s = _block_scores(qb[i], kj, i, j, ql, kl, plan)
      dq_i, dk_j, dv_j = tile_grads(qb[i], kj, vj, dout[i], s, lse[i],
                                    delta[i], plan.scale)
      dk, dv = dk + dk_j, dv + dv_j
      return dq.at[i].add(dq_i), dk, dv

    zeros = jnp.zeros(kj.shape, jnp.float32)
    lo, hi = _q_block_range(j, qb.shape[0], ql, kl, plan)
    dq, dk, dv = lax.fori_loop(lo, hi, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq0 = jnp.zeros(qb.shape, jnp.float32)
  dq, (dk, dv) = lax.scan(kv_step, dq0, (kb, vb, jnp.arange(kb.shape[0])))
  return (dq.astype(qb.dtype), dk.astype(kb.dtype), dv.astype(vb.dtype),
          None, None)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def blockwise_attention(q, k, v, *, causal, q_lengths, kv_lengths, q_block,
                        kv_block):
  """Exact attention [b, q_len, h, d] with O(N x block) memory both ways."""
  kv_heads, _ = masks.check_inputs(q, k, v)
  _, n_q, _, d = q.shape
  n_k = k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  # A block longer than the sequence would only add padding.
  plan = _Plan(causal=bool(causal), q_block=min(q_block, max(n_q, 1)),
               kv_block=min(kv_block, max(n_k, 1)),
               scale=masks.default_scale(d))
  out = _blocked_attention(_blocked_queries(q, kv_heads, plan.q_block),
                           _blocked_keys(k, plan.kv_block),
                           _blocked_keys(v, plan.kv_block), ql, kl, plan)
  return _unblocked_queries(out, n_q)


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  """Dense probabilities: blockwise is exact, so these are full attention's."""
  check_params(params)
  return full.weights(q, k, v, {}, causal=causal, q_lengths=q_lengths,
                      kv_lengths=kv_lengths, rng=rng,
                      implementation=implementation)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  if implementation == 'reference':
    return full.attend(q, k, v, {}, implementation='reference', causal=causal,
                       q_lengths=q_lengths, kv_lengths=kv_lengths)
  return blockwise_attention(q, k, v, causal=causal, q_lengths=q_lengths,
                             kv_lengths=kv_lengths,
                             q_block=params['q_block'],
                             kv_block=params['kv_block'])


# Decoding: blockwise is exact attention, so one new token attends to the
# key/value cache as full's does (a single query row needs no blocking).
decode_init, decode_step = full.decode_init, full.decode_step
