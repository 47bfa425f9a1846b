"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with
Linear Complexity"): keys and values projected along the sequence to k
rows by learned matrices, O(N k d). Bidirectional only.

With E and F the learned projections of shape [k, max_len] (per kv head or
shared, below), a batch of n_k keys uses their leading n_k columns, with
the columns of padded keys (positions j >= kv_length) set to zero:

  E'[r, j] = E[r, j] if j < kv_length else 0      (r < k, j < n_k)
  F'[r, j] = F[r, j] if j < kv_length else 0
  K~ = E' K   [k, d]        V~ = F' V   [k, d]
  P = softmax(Q K~^T / sqrt(d))   [n_q, k]   over the live rows r
  out = P V~.

A projected row r is live when E' or F' has a non-zero weight in it (on a
valid key); a row with none (it carries nothing of the sequence: an
all-zero key and value) is masked out of the softmax. Learned E and F are
dense, so every row is live unless the row has no valid key at all; the
rule matters for structured projections: with k = n_k and E = F = I, K~
and V~ are K and V with the padded rows masked, and the result is full
attention exactly, padding included (tested). Query rows at or past
q_length and rows with no live projected row (in particular rows with no
valid key) are zeros. Statistics are float32
(q, k, v, E and F taken to float32); the output is in q's dtype.

Learned parameters (`init`, held by the model as trainable parameters and
passed back as `learned`): {'E': [p, k, max_len], 'F': [p, k, max_len]}
float32, where p = 1 (share_heads: one E and one F per layer, for every
head) or p = num_kv_heads (one pair per kv head; the query heads of a GQA
group use their kv head's pair, since K~ and V~ are made once per kv head).
With share_kv there is only 'E' and F = E (the paper's key-value sharing).
k here is min(k, max_len). Initialisation as the authors' code (fairseq
examples/linformer, `compress_k`/`compress_v`): Xavier uniform with gain
1/sqrt(2), i.e. U(-a, a) with a = sqrt(3 / (max_len + k)) (fan in max_len,
fan out k), each array drawn independently. Its variance 1 / (max_len + k)
keeps the rows of E K and F V about as large as one key or value when the
sequence fills max_len.

Causal attention is rejected with a ValueError: every projected row mixes
keys from the whole sequence, future ones included (the paper: not
causal).

Hyperparameters (config.attention.linformer):
  k            projected length, an integer >= 1 (default 256, the paper's
               and LRA's). Clamped to the encoder's max_len in `init` (k >=
               max_len compresses nothing: a learned map of the same size),
               not an error, as other kinds clamp blocks to the sequence.
  share_heads  True (default; the paper's headwise sharing and the
               authors' code): one E (and F) per layer for all heads.
               False: one per kv head.
  share_kv     True: E = F, one projection for keys and values (the
               paper's key-value sharing). Default False.
The paper's layerwise sharing (one projection for all layers) is not
offered: the model owns parameters per layer.

Complexity (N keys, head dim d, k rows): time O(N k d) per head for the
projections, scores and output; memory O(N d + B k) per head and the [p,
k, N] slice of E and F: `attend` answers the queries B = ROW_BLOCK = 1,024
rows at a time (a lax.scan), so only one block's scores exist at once. No
N x N array exists in `attend`;
`weights` builds the dense [b, h, n_q, n_k] matrix P F' that multiplies V
(out = (P F') V; P E' when share_kv), for tests and pictures only.

Implementations:
  xla        the computation above (any backend).
  reference  the dense matrix P F' times V; for tests.
  auto       xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')

# Query rows answered per step of `attend` (a lax.scan over blocks of rows):
# not a hyperparameter, it changes only rounding; it keeps a block's [rows,
# k] scores in cache. 1,024 was the fastest of 128..1,024 rows at 16K
# tokens on the project's CPU (twice as fast as all rows at once).
ROW_BLOCK = 1024


def check_params(params):
  masks.check_positive_int('attention.linformer.k', params['k'])
  for name in ('share_heads', 'share_kv'):
    if not isinstance(params[name], bool):
      raise ValueError(f'attention.linformer.{name}={params[name]!r} is '
                       'invalid: must be True or False')

# No causal form (av.supports_causal).
CAUSAL = False


def _check_causal(causal):
  if causal:
    raise ValueError(
        'attention.kind=linformer is bidirectional only: its projections '
        '(Wang et al. 2020) mix every key of the sequence, future ones '
        'included, into each projected row; use a causal-capable kind for '
        'causal tasks')


def names(params) -> tuple[str, ...]:
  """The learned arrays' names: ('E',) under share_kv, else ('E', 'F')."""
  return ('E',) if params['share_kv'] else ('E', 'F')


def init(key, params, *, num_heads, num_kv_heads, head_dim, max_len):
  """{'E', 'F'} (or {'E'} under share_kv): float32 [p, min(k, max_len),
  max_len], p = 1 under share_heads else num_kv_heads; Xavier uniform with
  gain 1/sqrt(2) (see the module docstring)."""
  del num_heads, head_dim
  check_params(params)
  masks.check_positive_int('linformer max_len', max_len)
  rows = min(params['k'], max_len)
  p = 1 if params['share_heads'] else num_kv_heads
  bound = math.sqrt(3.0 / (max_len + rows))
  keys = jax.random.split(key, len(names(params)))
  return {name: jax.random.uniform(kk, (p, rows, max_len), jnp.float32,
                                   -bound, bound)
          for name, kk in zip(names(params), keys)}


def _projections(learned, params, kv_heads: int, n_k: int):
  """(E, F) float32 [p, k, n_k] from `learned`, checked against params."""
  if learned is None or set(learned) != set(names(params)):
    raise ValueError(
        f'attention.linformer needs learned={{{", ".join(names(params))}}} '
        '(made by init_learned with the same share_kv), got '
        f'{None if learned is None else sorted(learned)}')
  e = learned['E']
  f = learned.get('F', e)
  p = 1 if params['share_heads'] else kv_heads
  if (e.ndim != 3 or e.shape[0] != p
      or e.shape[1] != min(params['k'], e.shape[2]) or f.shape != e.shape):
    raise ValueError(
        f'attention.linformer learned shapes {[tuple(x.shape) for x in (e, f)]}'
        f' do not fit k={params["k"]}, share_heads={params["share_heads"]} '
        f'and {kv_heads} kv heads: expected [{p}, min(k, max_len), max_len]')
  if n_k > e.shape[2]:
    raise ValueError(
        f'attention.linformer projections cover max_len={e.shape[2]} keys; '
        f'got {n_k} (init_learned with a larger max_len)')
  return (e[:, :, :n_k].astype(jnp.float32),
          f[:, :, :n_k].astype(jnp.float32))


def _first_nonzero(nonzero):
  """int [..., k]: the first column of bool [..., k, n] that is True, n
  where none is."""
  first = jnp.argmax(nonzero, axis=-1)
  return jnp.where(jnp.any(nonzero, axis=-1), first, nonzero.shape[-1])


def _project(w, x):
  """w [p, k, n] (p = 1 or kv heads) times x [b, n, kvh, d] along the
  sequence -> [b, k, kvh, d] (a plain matmul when shared: no copy of w
  per head)."""
  if w.shape[0] == 1:
    return jnp.einsum('rn,bnhd->brhd', w[0], x)
  return jnp.einsum('hrn,bnhd->brhd', w, x)


def _projected(q, k, v, params, q_lengths, kv_lengths, learned):
  """Everything but the queries' rows: (grouped q float32 [b, n_q, kvh, g,
  d], K~ and V~ [b, k, kvh, d], F' [p, k, n_k], valid keys bool [b, n_k],
  dead-row bias [b, p, 1, 1, k], any live row bool [b, p], q lengths)."""
  check_params(params)
  kv_heads, _ = masks.check_inputs(q, k, v)
  n_k = k.shape[1]
  e, f = _projections(learned, params, kv_heads, n_k)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  k_valid = jnp.arange(n_k)[None, :] < kl[:, None]
  zero_pad = lambda x: jnp.where(k_valid[:, :, None, None],
                                 x.astype(jnp.float32), 0.0)
  kp = _project(e, zero_pad(k))
  vp = _project(f, zero_pad(v))
  # Row r is live iff E or F is non-zero at some valid key j < kv_length,
  # i.e. iff its first non-zero column lies before kv_length.
  first = _first_nonzero((e != 0) | (f != 0))  # [p, k]
  live = first[None] < kl[:, None, None]  # [b, p, k]
  # Dead rows by an additive bias (exp underflows to exactly 0 in a row
  # with a live entry); rows without one are zeroed on the output: fewer
  # [n_q, k] temporaries than a masked softmax.
  bias = jnp.where(live, 0.0, masks.NEG_INF)[:, :, None, None, :]
  qg = masks.group_queries(q, kv_heads).astype(jnp.float32)
  return qg, kp, vp, f, k_valid, bias, jnp.any(live, axis=-1), ql


def _probs(qg, kp, bias):
  """P float32 [b, kvh, g, rows, k] for the query rows qg [b, rows, kvh, g,
  d] (before zeroing rows without a live projected row)."""
  scores = jnp.einsum('bnhgd,brhd->bhgnr', qg, kp) * masks.default_scale(
      qg.shape[-1])
  return jax.nn.softmax(scores + bias, axis=-1)


def _kept_rows(start, rows: int, q_lengths, any_live):
  """bool [b, rows, p]: query rows start .. start + rows - 1 that are valid
  and see a live projected row."""
  return (masks.block_valid(start, rows, q_lengths)[:, :, None]
          & any_live[:, None, :])


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None, learned=None):
  """Dense float32 [b, h, q_len, kv_len]: P F', the matrix that multiplies
  V (rng unused)."""
  del implementation, rng
  _check_causal(causal)
  qg, kp, _, f, k_valid, bias, any_live, ql = _projected(
      q, k, v, params, q_lengths, kv_lengths, learned)
  p = _probs(qg, kp, bias)
  if f.shape[0] == 1:
    dense = jnp.einsum('bhgnr,rj->bhgnj', p, f[0])
  else:
    dense = jnp.einsum('bhgnr,hrj->bhgnj', p, f)
  rows = _kept_rows(0, q.shape[1], ql, any_live)
  dense = jnp.where(jnp.swapaxes(rows, 1, 2)[:, :, None, :, None]
                    & k_valid[:, None, None, None, :], dense, 0.0)
  return dense.reshape(q.shape[0], q.shape[2], q.shape[1], k.shape[1])


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None, learned=None):
  del rng
  _check_causal(causal)
  if implementation == 'reference':
    w = weights(q, k, v, params, q_lengths=q_lengths, kv_lengths=kv_lengths,
                learned=learned)
    return full.probs_times_v(w, v, q.dtype)
  qg, kp, vp, _, _, bias, any_live, ql = _projected(
      q, k, v, params, q_lengths, kv_lengths, learned)
  n_q = q.shape[1]
  block = min(ROW_BLOCK, max(n_q, 1))
  n = masks.ceil_div(max(n_q, 1), block) * block

  def step(_, xs):
    qc, start = xs
    out = jnp.einsum('bhgnr,brhe->bnhge', _probs(qc, kp, bias), vp)
    keep = _kept_rows(start, block, ql, any_live)[:, :, :, None, None]
    return None, jnp.where(keep, out, 0.0)

  step = jax.checkpoint(step, prevent_cse=False)
  _, out = jax.lax.scan(step, None, (masks.row_blocks(qg, block, n),
                                     jnp.arange(n // block) * block))
  out = masks.unblock_rows(out, n_q)
  return out.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype)
