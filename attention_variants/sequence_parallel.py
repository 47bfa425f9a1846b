"""Sequence-parallel attention: the sequence sharded over one mesh axis.

    from attention_variants import sequence_parallel as sp
    out = sp.attend(q, k, v, spec, mesh=mesh, axis='sequence',
                    batch_axes=('data', 'fsdp'), causal=False,
                    q_lengths=None, kv_lengths=None, rng=None, learned=None)

The same result as av.attend on the whole sequence (forward and gradients,
tests/test_sequence_parallel.py), computed inside jax.shard_map with the
sequence of q, k, v split into P equal contiguous chunks over mesh axis
`axis` (device r holds positions r N/P .. (r + 1) N/P - 1), the batch split
over those of `batch_axes` that the mesh has with size > 1, heads and
head_dim unsharded, and the output sharded like q. Called inside jit on
global arrays; N (q's and k's length) must be a multiple of P. Padding is
given as valid lengths, as av.attend's. Communication uses JAX's own
collectives only (ppermute, all_gather, psum, pmax, axis_index).

Strategy per kind (`strategy(kind)`; docs/ARCHITECTURE.md has the table):

  ring    full, blockwise. Exact ring attention (Liu et al. 2023): each
          device keeps its query chunk; the key/value chunks travel round
          the ring by ppermute, P - 1 hops, and an online softmax (float32
          running max, running sum and output: blockwise.online_step)
          combines the P visits. Key positions travel implicitly: the
          chunk a device holds at step s came from device r - s, so its
          positions and padding follow from that index and the lengths.
          The gradient is a jax.custom_vjp whose backward is a second ring
          pass: k, v and their gradient accumulators dk, dv circulate (P
          hops, the last returning dk, dv to their owner) while each device
          recomputes its rows' probabilities from the saved per-row
          log-sum-exp (blockwise.tile_grads). So the backward keeps only
          the device's own q, k, v, output and log-sum-exp chunks (O(N/P)
          each), never the P visited k/v chunks. Query rows are tiled
          (`full`: one tile of N/P rows; `blockwise`: the largest divisor
          of N/P <= q_block), and every visit scores a tile against the
          whole visiting chunk of N/P keys, so a visit holds tile x N/P
          float32 scores (kv_block is not used across devices). A visit
          that can see nothing (causal: a chunk entirely in the future;
          chunks of padding) is skipped by lax.cond, but in SPMD lockstep
          every device still takes the P steps and waits for the slowest:
          causal ring attention is load-imbalanced (device P - 1 does P
          visits of work, device 0 one), no zigzag or striped reordering
          is done here.
          Per layer: 2 (P - 1) chunk hops forward, (P - 1) k/v hops and P
          dk/dv hops backward, each N/P x kv_heads x head_dim per row.
  halo    local, longformer. Each device receives only the keys/values its
          window reaches outside its chunk: the last `left` positions of
          the device before it and the first `right` of the device after it
          (ppermute of the edge slices, none across the sequence's ends),
          and runs the kind's own banded computation on its queries with
          absolute offsets (local.banded_attention,
          longformer.window_rows). The window extents must be <= N/P.
          Longformer's g global tokens (the first g positions, g <= N/P,
          all on device 0): their keys/values are broadcast (a psum of
          device 0's first g rows, O(g head_dim)), and the global query
          rows, which see every key, combine per-shard partial softmax
          statistics: a pmax of the row maxima, psums of the sums and of
          the un-normalised outputs (O(g heads head_dim)).
          Per layer: (left + right) x kv_heads x head_dim per row, plus
          O(g heads head_dim) for longformer, forward and backward alike.
  gather  every other kind. q, k, v are all-gathered along the axis, every
          device computes av.attend of the kind on the whole sequence (the
          same rng and learned parameters, so random features, hashes and
          random blocks are identical to the single-device run) and keeps
          its own query rows. This shards the memory of everything around
          attention (projections, MLPs, activations) but not attention
          itself: its time and memory are those of the whole sequence on
          every device. Per layer: all-gathers of q, k, v (N x heads x
          head_dim per row), and their reduce-scatters backward.

No kind silently takes a pattern other than its own strategy. Rows with
nothing to attend to are zeros, as in every variant. spec['implementation']
reaches the kind only under gather (ring and halo are their own
computation, equal to every implementation of their kinds).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

import attention_variants as av
from attention_variants import blockwise
from attention_variants import local
from attention_variants import longformer
from attention_variants import masks

_STRATEGIES = {'full': 'ring', 'blockwise': 'ring', 'local': 'halo',
               'longformer': 'halo'}


def strategy(kind: str) -> str:
  """'ring' (full, blockwise: exact ring attention), 'halo' (local,
  longformer: neighbours' window edges, plus longformer's globals) or
  'gather' (every other kind: the whole sequence on every device); the
  module docstring describes each."""
  av.defaults(kind)  # ValueError for an unknown kind
  return _STRATEGIES.get(kind, 'gather')


# --- Mesh and shapes ---------------------------------------------------------


def _mesh_axes(mesh, axis, batch_axes):
  """(P, the batch axes used): those of batch_axes the mesh has with size
  > 1 (a missing or size-1 axis splits nothing)."""
  sizes = dict(mesh.shape)
  if axis not in sizes:
    raise ValueError(f'sequence-parallel axis {axis!r} is not a mesh axis; '
                     f'the mesh has {", ".join(sizes)}')
  if axis in batch_axes:
    raise ValueError(f'axis {axis!r} cannot also be a batch axis')
  used = tuple(a for a in batch_axes if sizes.get(a, 1) > 1)
  return sizes[axis], used


def _check_shapes(q, k, mesh, n_dev, batch_used, strat):
  b, n_q = q.shape[:2]
  n_k = k.shape[1]
  for name, n in (('query', n_q), ('key/value', n_k)):
    if n % n_dev:
      raise ValueError(f'sequence-parallel attention: the {name} length {n} '
                       f'must be divisible by the sequence axis size {n_dev}')
  if strat != 'gather' and n_q != n_k:
    raise ValueError(f'sequence-parallel {strat} attention needs equal query '
                     f'and key lengths, got {n_q} and {n_k}')
  split = math.prod(dict(mesh.shape)[a] for a in batch_used)
  if b % split:
    raise ValueError(f'batch {b} must be divisible by the batch axes '
                     f'{batch_used} (size {split})')


def _placed(tree, mesh, spec):
  """tree's arrays resharded to spec on a mesh whose axes are Explicit
  (shard_map takes them only as placed); on an Auto mesh shard_map moves
  them itself."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if not all(t == jax.sharding.AxisType.Explicit for t in types.values()):
    return tree
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.reshard(x, sharding), tree)


def _varying_like(x, ref):
  """x marked as varying over every mesh axis ref varies over (a loop
  carry that starts as a constant must have its final type; shard_map's
  varying-manual-axes check)."""
  varying = lambda y: jax.typeof(y).mat.varying
  missing = tuple(a for a in varying(ref) if a not in varying(x))
  return lax.pcast(x, missing, to='varying') if missing else x


def _shift(x, axis, n_dev, offset, *, cyclic):
  """x from device r - offset (ppermute). Not cyclic: devices with no
  such neighbour (past the sequence's ends) receive zeros."""
  if n_dev == 1 and not cyclic:
    return jnp.zeros_like(x)
  pairs = [(i, (i + offset) % n_dev) for i in range(n_dev)
           if cyclic or 0 <= i + offset < n_dev]
  return lax.ppermute(x, axis, pairs)


# --- Ring attention (full, blockwise) ----------------------------------------


class _Ring(NamedTuple):
  """Static facts of the ring (hashable: a nondiff custom_vjp argument)."""
  axis: str
  n_dev: int
  causal: bool
  tile: int
  scale: float


def _visit_sees(src, plan, n_q, n_k, ql, kl):
  """Whether this device's query chunk can see any key of chunk `src`:
  not all in the future (causal), not all padding, queries not all padding."""
  r = lax.axis_index(plan.axis)
  ok = (src * n_k < jnp.max(kl)) & (r * n_q < jnp.max(ql))
  if plan.causal:
    ok &= src * n_k <= r * n_q + n_q - 1
  return ok


def _tile_positions(plan, n_q, i):
  return lax.axis_index(plan.axis) * n_q + i * plan.tile + jnp.arange(
      plan.tile)


def _ring_forward(qb, k, v, ql, kl, plan):
  """Blocked output (q dtype) and log-sum-exp of this device's queries.

  qb [tiles, b, kvh, g, tile, d]; k, v [b, kvh, n_k, d] (this device's
  chunk), visited by every chunk of the ring in turn.
  """
  n_q, n_k = qb.shape[0] * plan.tile, k.shape[2]
  r = lax.axis_index(plan.axis)
  k_pos = jnp.arange(n_k)

  def visit(stats, kc, vc, src):
    def tile(args):
      qi, i, st = args
      s = blockwise.masked_scores(qi, kc, _tile_positions(plan, n_q, i),
                                  src * n_k + k_pos, ql, kl,
                                  causal=plan.causal, scale=plan.scale)
      return blockwise.online_step(st, s, vc)
    return lax.map(tile, (qb, jnp.arange(qb.shape[0]), stats))

  def step(s, carry):
    stats, kc, vc = carry
    src = (r - s) % plan.n_dev  # whose chunk this device holds at step s
    stats = lax.cond(_visit_sees(src, plan, n_q, n_k, ql, kl), visit,
                     lambda st, *_: st, stats, kc, vc, src)
    return stats, kc, vc

  def step_and_pass(s, carry):
    stats, kc, vc = step(s, carry)
    hop = functools.partial(_shift, axis=plan.axis, n_dev=plan.n_dev,
                            offset=1, cyclic=True)
    return stats, hop(kc), hop(vc)

  stats = jax.tree.map(lambda x: _varying_like(x, qb),
                       blockwise.initial_stats(qb))
  carry = lax.fori_loop(0, plan.n_dev - 1, step_and_pass, (stats, k, v))
  stats, _, _ = step(plan.n_dev - 1, carry)  # the last visit passes nothing
  out, lse = blockwise.finish(*stats)
  return out.astype(qb.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_attention(qb, k, v, ql, kl, plan):
  return _ring_forward(qb, k, v, ql, kl, plan)[0]


def _ring_attention_fwd(qb, k, v, ql, kl, plan):
  out, lse = _ring_forward(qb, k, v, ql, kl, plan)
  # Only this device's chunks: no visited k/v chunk is kept.
  return out, (qb, k, v, ql, kl, out, lse)


def _ring_attention_bwd(plan, residuals, dout):
  """Second ring pass: k, v and their gradient accumulators circulate;
  each device adds its rows' contributions, recomputed from the saved
  log-sum-exp, to the visiting dk, dv and to its own dq."""
  qb, k, v, ql, kl, out, lse = residuals
  n_q, n_k = qb.shape[0] * plan.tile, k.shape[2]
  r = lax.axis_index(plan.axis)
  k_pos = jnp.arange(n_k)
  delta = blockwise.row_deltas(dout, out)

  def visit(dq, dk, dv, kc, vc, src):
    def tile(acc, xs):
      qi, doi, lse_i, delta_i, i = xs
      s = blockwise.masked_scores(qi, kc, _tile_positions(plan, n_q, i),
                                  src * n_k + k_pos, ql, kl,
                                  causal=plan.causal, scale=plan.scale)
      dq_i, dk_i, dv_i = blockwise.tile_grads(qi, kc, vc, doi, s, lse_i,
                                              delta_i, plan.scale)
      return (acc[0] + dk_i, acc[1] + dv_i), dq_i
    (dk, dv), dq_add = lax.scan(
        tile, (dk, dv), (qb, dout, lse, delta, jnp.arange(qb.shape[0])))
    return dq + dq_add, dk, dv

  hop = functools.partial(_shift, axis=plan.axis, n_dev=plan.n_dev, offset=1,
                          cyclic=True)

  def step(s, carry):
    dq, kc, vc, dk, dv = carry
    src = (r - s) % plan.n_dev
    dq, dk, dv = lax.cond(_visit_sees(src, plan, n_q, n_k, ql, kl), visit,
                          lambda dq, dk, dv, *_: (dq, dk, dv),
                          dq, dk, dv, kc, vc, src)
    return dq, kc, vc, hop(dk), hop(dv)

  def step_and_pass(s, carry):
    dq, kc, vc, dk, dv = step(s, carry)
    return dq, hop(kc), hop(vc), dk, dv

  zeros = lambda x: _varying_like(jnp.zeros(x.shape, jnp.float32), x)
  carry = (zeros(qb), k, v, zeros(k), zeros(v))
  carry = lax.fori_loop(0, plan.n_dev - 1, step_and_pass, carry)
  # The P-th hop of dk, dv brings every chunk's gradient home.
  dq, _, _, dk, dv = step(plan.n_dev - 1, carry)
  return (dq.astype(qb.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None,
          None)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _largest_divisor(n, at_most):
  return max(t for t in range(1, min(n, at_most) + 1) if n % t == 0)


def _ring_body(q, k, v, ql, kl, *, params, kind, axis, n_dev, causal):
  kv_heads, _ = masks.check_inputs(q, k, v)
  n_q = q.shape[1]
  tile = n_q if kind == 'full' else _largest_divisor(n_q, params['q_block'])
  plan = _Ring(axis=axis, n_dev=n_dev, causal=bool(causal), tile=tile,
               scale=masks.default_scale(q.shape[-1]))
  # blockwise's layouts: [tiles, b, kvh, g, tile, d] and [b, kvh, n, d].
  keys = lambda x: blockwise._blocked_keys(x, x.shape[1])[0]
  out = _ring_attention(blockwise._blocked_queries(q, kv_heads, tile),
                        keys(k), keys(v), ql, kl, plan)
  return blockwise._unblocked_queries(out, n_q)


# --- Halo exchange (local, longformer) ---------------------------------------


def _check_extent(kind, field, value, n_local):
  if value > n_local:
    raise ValueError(
        f'sequence-parallel {kind}: attention.{kind}.{field} reaches {value} '
        f'positions, more than the shard length {n_local} (sequence length / '
        'sequence axis size); the halo exchange needs at most the shard '
        'length')


def _with_halos(x, left, right, axis, n_dev):
  """x [b, c, ...] extended by the last `left` rows of the device before
  and the first `right` of the device after (zeros past the sequence's
  ends, masked by position): [b, left + c + right, ...]."""
  pieces = []
  if left:
    pieces.append(_shift(x[:, x.shape[1] - left:], axis, n_dev, 1,
                         cyclic=False))
  pieces.append(x)
  if right:
    pieces.append(_shift(x[:, :right], axis, n_dev, -1, cyclic=False))
  return jnp.concatenate(pieces, axis=1) if len(pieces) > 1 else x


def _local_body(q, k, v, ql, kl, *, left, right, block, axis, n_dev, causal):
  c = q.shape[1]
  start = lax.axis_index(axis) * c
  kx, vx = (_with_halos(x, left, right, axis, n_dev) for x in (k, v))
  return local.banded_attention(q, kx, vx, ql, kl, causal=causal, left=left,
                                right=right, block=block, q_offset=start,
                                k_offset=start - left)


def _from_first_device(x, axis):
  """Device 0's x on every device (a psum of it and zeros; O(x))."""
  return lax.psum(jnp.where(lax.axis_index(axis) == 0, x, 0), axis)


def _global_rows(gq, k, v, ql, kl, *, axis, causal):
  """Longformer's global query rows gq [b, g, h, d] (positions 0 .. g - 1)
  against every key, from each device's chunk k, v: one softmax per row
  whose maximum, sum and un-normalised output are reduced over the axis.

  The maximum is only a stabiliser (the softmax does not depend on it), so
  it carries no gradient.
  """
  kv_heads, _ = masks.check_inputs(gq, k, v)
  b, g, h, d = gq.shape
  c = k.shape[1]
  k_pos = lax.axis_index(axis) * c + jnp.arange(c)
  s = jnp.einsum('bqkgd,bskd->bkgqs', masks.group_queries(gq, kv_heads), k,
                 preferred_element_type=jnp.float32) * masks.default_scale(d)
  ok = masks.allowed(jnp.arange(g)[None], k_pos[None], ql, kl,
                     causal=causal)[:, None, None]
  s = jnp.where(ok, s, masks.NEG_INF)
  m = lax.pmax(lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)), axis)
  p = jnp.where(ok, jnp.exp(s - jnp.where(m == masks.NEG_INF, 0.0, m)), 0.0)
  total = lax.psum(jnp.sum(p, axis=-1, keepdims=True), axis)
  acc = lax.psum(jnp.einsum('bkgqs,bskd->bqkgd', p.astype(v.dtype), v,
                            preferred_element_type=jnp.float32), axis)
  total = jnp.where(total == 0.0, 1.0, total)  # rows with no key: zeros
  out = acc / total.transpose(0, 3, 1, 2, 4)
  return out.reshape(b, g, h, d).astype(gq.dtype)


def _longformer_body(q, k, v, ql, kl, *, window, n_global, block, axis,
                     n_dev, causal):
  c = q.shape[1]
  start = lax.axis_index(axis) * c
  left, right = window, 0 if causal else window
  kx, vx = (_with_halos(x, left, right, axis, n_dev) for x in (k, v))
  gk, gv = (_from_first_device(x[:, :n_global], axis) for x in (k, v))
  out = longformer.window_rows(q, kx, vx, gk, gv, ql, kl, causal=causal,
                               window=window, block=block, q_offset=start,
                               k_offset=start - left)
  if not n_global:
    return out
  rows = _global_rows(_from_first_device(q[:, :n_global], axis), k, v, ql, kl,
                      axis=axis, causal=causal)
  rows = jnp.pad(rows, ((0, 0), (0, c - n_global), (0, 0), (0, 0)))
  is_global = (start + jnp.arange(c)) < n_global
  return jnp.where(is_global[None, :, None, None], rows, out)


# --- Gather (every other kind) ---------------------------------------------


def _gather_body(q, k, v, ql, kl, extras, *, spec, axis, causal):
  whole = lambda x: lax.all_gather(x, axis, axis=1, tiled=True)
  out = av.attend(whole(q), whole(k), whole(v), spec, causal=causal,
                  q_lengths=ql, kv_lengths=kl, rng=extras.get('rng'),
                  learned=extras.get('learned'))
  c = q.shape[1]
  return lax.dynamic_slice_in_dim(out, lax.axis_index(axis) * c, c, axis=1)


# --- Entry point -------------------------------------------------------------


def _body(spec, *, axis, n_dev, causal, n):
  """The per-device function of spec's strategy (ValueError for a window or
  num_global longer than the shard)."""
  _, params, _ = av.resolve(spec)
  kind = spec['kind']
  strat = strategy(kind)
  common = dict(axis=axis, n_dev=n_dev, causal=causal)
  c = n // n_dev
  if strat == 'ring':
    return functools.partial(_ring_body, params=params, kind=kind, **common)
  if kind == 'local':
    left, right = local.extents(params, causal)
    _check_extent(kind, 'window' if params['left'] == -1 else 'left', left, c)
    _check_extent(kind, 'window' if params['right'] == -1 else 'right',
                  right, c)
    return functools.partial(_local_body, left=left, right=right,
                             block=params['block'], **common)
  if kind == 'longformer':
    _check_extent(kind, 'window', params['window'], c)
    n_global = min(params['num_global'], n)
    _check_extent(kind, 'num_global', n_global, c)
    return functools.partial(_longformer_body, window=params['window'],
                             n_global=n_global, block=params['block'],
                             **common)
  return functools.partial(_gather_body, spec=spec, axis=axis, causal=causal)


def attend(q, k, v, spec, *, mesh, axis='sequence', batch_axes=('data', 'fsdp'),
           causal=False, q_lengths=None, kv_lengths=None, rng=None,
           learned=None):
  """Same result as av.attend on the whole sequence, computed with the sequence
  sharded over mesh axis `axis` inside jax.shard_map (batch over batch_axes,
  heads and head_dim unsharded). Called inside jit on global arrays.

  Output [batch, n, heads, head_dim] in q's dtype, sharded like q. The
  strategy is strategy(spec['kind']) (module docstring). ValueError when
  the lengths are not multiples of the axis size, when a local/longformer
  window (or longformer's num_global) exceeds the shard length, or for
  what av.attend rejects.
  """
  av.validate(spec)
  masks.check_inputs(q, k, v)
  if causal and not av.supports_causal(spec):
    # Let the kind raise its own error, on the whole sequence as av.attend.
    av.attend(q, k, v, spec, causal=True, learned=learned)
  n_dev, batch_used = _mesh_axes(mesh, axis, batch_axes)
  strat = strategy(spec['kind'])
  _check_shapes(q, k, mesh, n_dev, batch_used, strat)
  body = _body(spec, axis=axis, n_dev=n_dev, causal=causal, n=q.shape[1])
  batch = batch_used or None
  seq, rows = P(batch, axis), P(batch)
  if strat == 'gather':
    # Lengths as given (None stays None: the kind sees exactly av.attend's
    # arguments); rng and learned replicated.
    lengths = {'q': q_lengths, 'kv': kv_lengths}
    lengths = {name: masks.lengths_or_full(x, q.shape[0], n)
               for (name, x), n in zip(lengths.items(),
                                       (q.shape[1], k.shape[1]))
               if x is not None}
    extras = {name: x for name, x in (('rng', rng), ('learned', learned))
              if x is not None}

    def gathered(q, k, v, lengths, extras):
      return body(q, k, v, lengths.get('q'), lengths.get('kv'), extras)
    # check_vma=False: the kinds' own loops start their carries from
    # constants, which the varying-axes check would reject inside shard_map
    # (the gathered arrays vary over the batch axes). Without the check,
    # the transpose sums the replicated inputs' (learned) cotangents over
    # the devices, which is their gradient: each device differentiates the
    # loss of its own rows only.
    fn = jax.shard_map(gathered, mesh=mesh,
                       in_specs=(seq, seq, seq, rows, P()), out_specs=seq,
                       check_vma=False)
    return fn(*_placed((q, k, v), mesh, seq), _placed(lengths, mesh, rows),
              _placed(extras, mesh, P()))
  if learned:
    raise ValueError(f'attention kind {spec["kind"]!r} has no learned '
                     f'parameters, got {", ".join(sorted(learned))}')
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(seq, seq, seq, rows, rows),
                     out_specs=seq)
  return fn(*_placed((q, k, v), mesh, seq), *_placed((ql, kl), mesh, rows))
