"""Synthesizer attention (Tay et al. 2021): learned ("synthetic") attention
logits, here added to the dot-product logits as in LRA's runs. Quadratic.

Per query head h (own parameters per head; GQA shares k and v only), with
query i, key j, s = 1/sqrt(d) and L = max_len (the model's longest
sequence):

  logits[h, i, j] = s q_i . k_j  (dot_product=True, the default)
                  + S[h, i, j]  (the synthetic logits of `mode` below)
  out_i = sum_j softmax_j(logits[h, i, :] under the mask) v_j

  mode               S[h, i, j]                       learned (float32)
  factorized_random  (R1_h R2_h^T)[i, j], rank k      r1, r2   [h, L, k]
  random             R_h[i, j]                        r        [h, L, L]
  dense              (relu(q_i W1_h + b1_h) W2_h      w1 [h, d, d], b1 [h, d],
                      + b2_h)[j]                      w2 [h, d, L], b2 [h, L]

(q_i a row vector; the paper writes W2 relu(W1 x_i + b1) + b2). Modes
'dense+random' and 'dense+factorized_random' add the two S's (LRA's
`synthesizer_mode` strings). A sequence shorter than L uses the leading
rows and columns: R1[:n_q], R2[:n_k], R[:n_q, :n_k], W2's and b2's first
n_k columns; a longer one is a ValueError. The dense synthesiser's input
is the query q_i (the paper's and LRA's input is the token x_i; the
attention contract sees q, k, v only, and q_i is a linear function of x_i,
so q_i W1_h is a linear map of x_i: the same function class); its hidden
width is the head dim d. dot_product=False is the pure Synthesizer
(softmax(S) V: q and k then enter only through the dense MLP's q_i).

Masking: causal (j <= i) and padding (i < q_length, j < kv_length) masks
apply to the summed logits exactly as to dot-product ones; padded query
rows and rows with no visible key are zeros. Logits, softmax and
statistics are float32; the output is in q's dtype.

Initialisation (`init`, the contract's learned parameters, held by the
model as nnx.Params): uniform in +-sqrt(6 / (fan_in + fan_out)), for r1,
r2 and r with LRA's fans (jax.nn.initializers.xavier_uniform() on [h, L,
k] and [h, L, L] counts the head axis in both: (L + k) h, 2 L h), for w1
and w2 per head ((d + d), (d + L)); b1, b2 zeros. Zero synthetic
parameters make this exactly full attention (tested). The softmax's row
maximum is under stop_gradient (`masked_softmax` below).

What LRA runs (google-research/long-range-arena, lra_benchmarks/models/
synthesizer/synthesizer.py and synthesizer_attention.py, at cd31e5c):
SynthesizerEncoder and SynthesizerBlock default to synthesizer_mode=
'random' and ignore_dot_product=False, and no task changes that (image and
Pathfinder set config.model.synthesizer_mode='random'; the text task's
config sets ignore_dot_product=True, synthesizer_mode='factorized_random'
and k=32 at the top level of its config, which its train.py never passes
to the model): every LRA Synthesizer result is mode='random' with the dot
product, i.e. a learned [max_len, max_len] logit matrix per head (xavier
init) added to q.k/sqrt(d), with causal and padding masks. The factorised
form (random1 [h, L, k], random2 [h, k, L], k = 32 by default, also per
head) is the attention module's own default, there combined with
ignore_dot_product=True, in which case LRA also drops the padding mask;
here masks always apply. LRA's dense synthesiser has no biases, shares its
second layer across heads and reshapes [b, n, h, L] to [b, h, n, L]
without a transpose (mixing tokens and heads for h > 1); here it is the
paper's per-head W2 relu(W1 x + b1) + b2. Attention dropout (LRA's 0.1)
is not part of the contract.

The default here is mode='factorized_random', rank 32, with the dot
product: the factorised form of LRA's synthesiser, O(L k) parameters per
head instead of O(L^2) (4 GiB a layer at Path-X's 16K with 4 heads); set
mode='random' for LRA's runs exactly.

Hyperparameters (config.attention.synthesizer):
  mode         'factorized_random' (default), 'random', 'dense',
               'dense+random' or 'dense+factorized_random'.
  rank         k of the factorised synthesiser, an integer >= 1 (32).
  dot_product  add q.k/sqrt(d) to the synthetic logits, a bool (true).
  block        query rows per step of `xla`, an integer >= 1 (512; clamped
               to the query length). Changes only rounding.

Complexity (N tokens, head dim d): quadratic by nature, every query has an
N-wide logit row. Time O(N^2 d) per head (plus O(N^2 k) for the factorised
logits); parameters O(L k), O(L^2) or O(d L) per head. `xla` walks over
blocks of `block` queries (a lax.scan, the step rematerialised in the
backward pass by jax.checkpoint), so its temporaries are O(block x N) per
head, forward and backward (at N = 8192, 4 heads, block 512: one [4, 512,
8192] float32 logit block is 64 MiB); no N x N array exists except mode
'random''s parameter and its gradient.

Implementations:
  xla        the block-by-block computation above (any backend).
  reference  the dense [b, h, N, N] logits, masked softmax, times V; for
             tests and `weights`.
  auto       xla.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from attention_variants import full
from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'xla', 'reference')
MODES = ('factorized_random', 'random', 'dense', 'dense+random',
         'dense+factorized_random')


def check_params(params):
  mode = params['mode']
  if mode not in MODES:
    raise ValueError(f'attention.synthesizer.mode={mode!r} is invalid: must '
                     f'be one of {", ".join(MODES)}')
  masks.check_positive_int('attention.synthesizer.rank', params['rank'])
  if not isinstance(params['dot_product'], bool):
    raise ValueError(
        f'attention.synthesizer.dot_product={params["dot_product"]!r} is '
        'invalid: must be true or false')
  masks.check_positive_int('attention.synthesizer.block', params['block'])


def _parts(mode: str) -> tuple:
  return tuple(mode.split('+'))


def learned_shapes(params, *, num_heads, head_dim, max_len) -> dict:
  """name -> shape of the learned arrays of `params['mode']`."""
  h, d, n = num_heads, head_dim, max_len
  shapes = {}
  for part in _parts(params['mode']):
    if part == 'factorized_random':
      shapes.update(r1=(h, n, params['rank']), r2=(h, n, params['rank']))
    elif part == 'random':
      shapes.update(r=(h, n, n))
    else:
      shapes.update(w1=(h, d, d), b1=(h, d), w2=(h, d, n), b2=(h, n))
  return shapes


def _glorot_bound(name, shape) -> float:
  """Glorot-uniform bound sqrt(6 / (fan_in + fan_out)): for r1, r2 and r
  LRA's (jax.nn.initializers.xavier_uniform() on [h, rows, cols], whose
  fans are rows x h and cols x h); for w1 and w2 per head (rows, cols)."""
  h, rows, cols = shape
  heads = h if name in ('r1', 'r2', 'r') else 1
  return (6.0 / ((rows + cols) * heads)) ** 0.5


def _draw(key, shapes):
  """{name: float32 array} for the {name: shape} of learned_shapes: the
  weights uniform in +-_glorot_bound (one draw, cut into the arrays), the
  biases zeros."""
  weights = sorted(n for n in shapes if n in ('r1', 'r2', 'r', 'w1', 'w2'))
  sizes = [math.prod(shapes[n]) for n in weights]
  flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out = {n: jnp.zeros(shape, jnp.float32) for n, shape in shapes.items()
         if n not in weights}
  start = 0
  for name, size in zip(weights, sizes):
    out[name] = (flat[start:start + size].reshape(shapes[name])
                 * _glorot_bound(name, shapes[name]))
    start += size
  return out


def init(key, params, *, num_heads, num_kv_heads, head_dim, max_len):
  """The learned arrays of `params['mode']` (see the module docstring)."""
  del num_kv_heads
  check_params(params)
  masks.check_positive_int('synthesizer max_len', max_len)
  shapes = learned_shapes(params, num_heads=num_heads, head_dim=head_dim,
                          max_len=max_len)
  return _draw(key, shapes)


def _max_len(learned) -> int:
  """The L the learned arrays were made for (0 when none says)."""
  for name in ('r1', 'r', 'b2'):
    if name in learned and jnp.ndim(learned[name]) >= 2:
      return int(jnp.shape(learned[name])[1])
  return 0


def _check_learned(params, learned, q, k):
  """The learned arrays as float32, checked against the mode and the
  inputs."""
  have = {name: tuple(jnp.shape(x)) for name, x in learned.items()}
  h, d = q.shape[2], q.shape[3]
  max_len = _max_len(learned)
  want = learned_shapes(params, num_heads=h, head_dim=d, max_len=max_len)
  if have != want:
    raise ValueError(
        f'attention.synthesizer.mode={params["mode"]!r} with {h} heads of '
        f'{d} needs learned arrays {want} (made by init_learned); got {have}')
  longest = max(q.shape[1], k.shape[1])
  if longest > max_len:
    raise ValueError(
        f'attention.synthesizer: a sequence of {longest} tokens is longer '
        f'than the max_len={max_len} its learned parameters were made for')
  return {name: jnp.asarray(x, jnp.float32) for name, x in learned.items()}


def _row_arrays(learned, n_q, n_k):
  """The learned arrays indexed by query row, rows on axis 1, cut to n_q."""
  rows = {}
  if 'r1' in learned:
    rows['r1'] = learned['r1'][:, :n_q]
  if 'r' in learned:
    rows['r'] = learned['r'][:, :n_q, :n_k]
  return rows


def _shared_arrays(learned, n_k):
  """The learned arrays every query row uses, cut to n_k keys."""
  shared = {}
  if 'r2' in learned:
    shared['r2'] = learned['r2'][:, :n_k]
  if 'w1' in learned:
    shared.update(w1=learned['w1'], b1=learned['b1'],
                  w2=learned['w2'][:, :, :n_k], b2=learned['b2'][:, :n_k])
  return shared


def _logits(q, k, rows, shared, *, dot_product, kv_heads):
  """Float32 logits [b|1, kv_heads, groups, n_q, n_k] of the query rows q
  [b, n_q, h, d] (`rows`: their row arrays) against all keys k."""
  h, d = q.shape[2], q.shape[3]
  synthetic = 0.0
  if 'r1' in rows:
    synthetic = synthetic + jnp.einsum('hqr,hsr->hqs', rows['r1'],
                                       shared['r2'])[None]
  if 'r' in rows:
    synthetic = synthetic + rows['r'][None]
  if 'w1' in shared:
    hidden = jax.nn.relu(
        jnp.einsum('bqhd,hde->bhqe', q.astype(jnp.float32), shared['w1'])
        + shared['b1'][None, :, None])
    synthetic = synthetic + (
        jnp.einsum('bhqe,hes->bhqs', hidden, shared['w2'])
        + shared['b2'][None, :, None])
  # [b|1, h, n_q, n_k] -> [b|1, kv_heads, groups, n_q, n_k]
  synthetic = synthetic.reshape(synthetic.shape[0], kv_heads,
                                h // kv_heads, *synthetic.shape[2:])
  if not dot_product:
    return synthetic
  qg = masks.group_queries(q, kv_heads)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', qg, k,
                      preferred_element_type=jnp.float32)
  return scores * masks.default_scale(d) + synthetic


def masked_softmax(logits, mask):
  """masks.masked_softmax with the row maximum under stop_gradient (the
  softmax does not depend on it). The shared one differentiates the max,
  whose gradient picks the entries equal to it; XLA may compute a sum of
  logits with and without a fused multiply-add in different places (seen
  at xla_backend_optimization_level 0 on CPU), so that no entry equals the
  max and the gradient is 0 / 0."""
  logits = jnp.where(mask, logits.astype(jnp.float32), masks.NEG_INF)
  top = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = jnp.where(mask, jnp.exp(logits - top), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0.0, 1.0, denom)


def _dense_probs(q, k, params, learned, *, causal, q_lengths, kv_lengths):
  """Float32 [b, h, n_q, n_k] probabilities, dense."""
  kv_heads, _ = masks.check_inputs(q, k, k)
  b, n_q, h, _ = q.shape
  n_k = k.shape[1]
  logits = _logits(q, k, _row_arrays(learned, n_q, n_k),
                   _shared_arrays(learned, n_k),
                   dot_product=params['dot_product'], kv_heads=kv_heads)
  logits = jnp.broadcast_to(logits.reshape(-1, h, n_q, n_k), (b, h, n_q, n_k))
  mask = full.full_mask(q, k, causal=causal, q_lengths=q_lengths,
                        kv_lengths=kv_lengths)
  return masked_softmax(logits, mask)


def _blocked(q, k, v, params, learned, *, causal, q_lengths, kv_lengths):
  """The `xla` path: a scan over blocks of query rows (module docstring)."""
  kv_heads, _ = masks.check_inputs(q, k, v)
  b, n_q, h, d = q.shape
  n_k = k.shape[1]
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  block = min(params['block'], max(n_q, 1))
  steps = masks.ceil_div(n_q, block)
  # [steps, b, block, h, d]: for batch 1 a reshape, not a copy.
  qs = masks.pad_to_multiple(q, 1, block)
  qs = jnp.moveaxis(qs.reshape(b, steps, block, h, d), 1, 0)
  # Row arrays stay [h, rows, ...] (padded only when block does not divide
  # n_q) and each step slices its block: no transposed copy of R.
  rows = {name: masks.pad_to_multiple(x, 1, block)
          for name, x in _row_arrays(learned, n_q, n_k).items()}
  shared = _shared_arrays(learned, n_k)

  def step(_, xs):
    qb, i = xs
    first = i * block
    rb = {name: lax.dynamic_slice_in_dim(x, first, block, axis=1)
          for name, x in rows.items()}
    s = _logits(qb, k, rb, shared, dot_product=params['dot_product'],
                kv_heads=kv_heads)
    ok = masks.allowed((first + jnp.arange(block))[None],
                       jnp.arange(n_k)[None], ql, kl, causal=causal)
    p = masked_softmax(s, ok[:, None, None])
    out = jnp.einsum('bkgqs,bskd->bqkgd', p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return None, out.reshape(b, block, h, d).astype(q.dtype)

  step = jax.checkpoint(step, prevent_cse=False)
  _, out = lax.scan(step, None, (qs, jnp.arange(steps)))
  return jnp.moveaxis(out, 0, 1).reshape(b, steps * block, h, d)[:, :n_q]


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None, learned):
  """Dense float32 probabilities [b, h, n_q, n_k] (rng unused)."""
  del v, implementation, rng
  check_params(params)
  learned = _check_learned(params, learned, q, k)
  return _dense_probs(q, k, params, learned, causal=causal,
                      q_lengths=q_lengths, kv_lengths=kv_lengths)


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None, learned):
  del rng
  check_params(params)
  masks.check_inputs(q, k, v)
  learned = _check_learned(params, learned, q, k)
  kw = {'causal': causal, 'q_lengths': q_lengths, 'kv_lengths': kv_lengths}
  if implementation == 'reference':
    probs = _dense_probs(q, k, params, learned, **kw)
    return full.probs_times_v(probs, v, q.dtype)
  return _blocked(q, k, v, params, learned, **kw)
