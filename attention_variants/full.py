"""Dense softmax attention: the reference every other variant is checked against.

Implementations:
  reference  einsum scores in float32, masked softmax, einsum with V. Also
             provides `dense_probs`, which other variants use for their
             `attention_weights` and their dense-limit tests.
  xla        jax.nn.dot_product_attention(implementation='xla').
  cudnn      jax.nn.dot_product_attention(implementation='cudnn'); GPU only,
             float16/bfloat16, head_dim a multiple of 8 and at most 128
             (256 on Hopper and later).
  auto       cudnn when the inputs allow it, else xla; the choice and the
             reason are logged once per traced shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from attention_variants import masks

IMPLEMENTATIONS = ('auto', 'reference', 'xla', 'cudnn')


def dense_probs(q, k, mask, *, scale=None):
  """Float32 probabilities [b, h, q_len, kv_len] under a boolean mask.

  mask broadcasts to [b, h, q_len, kv_len]; rows with nothing allowed are 0.
  """
  kv_heads, groups = masks.check_inputs(q, k, k)
  scale = masks.default_scale(q.shape[-1]) if scale is None else scale
  qg = masks.group_queries(q, kv_heads)
  scores = jnp.einsum('bqkgd,bskd->bkgqs', qg, k,
                      preferred_element_type=jnp.float32) * scale
  b, n_q, h, _ = q.shape
  scores = scores.reshape(b, h, n_q, k.shape[1])
  return masks.masked_softmax(scores, mask)


def probs_times_v(probs, v, out_dtype):
  """[b, h, q, s] x [b, s, kv_heads, d] -> [b, q, h, d]."""
  b, h, n_q, n_k = probs.shape
  kv_heads = v.shape[2]
  pg = probs.reshape(b, kv_heads, h // kv_heads, n_q, n_k)
  out = jnp.einsum('bkgqs,bskd->bqkgd', pg, v.astype(jnp.float32))
  return out.reshape(b, n_q, h, v.shape[-1]).astype(out_dtype)


def decode_init(params, *, batch, max_len, num_heads, num_kv_heads,
                head_dim, dtype, rng=None, learned=None):
  """Decoding state: a key/value cache of max_len positions per row."""
  del params, num_heads, rng, learned
  # Two buffers, not one shared: a state can be donated.
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def decode_step(q, k, v, state, pos, params):
  """(output [b, h, d] float32, state) of the token at position `pos`
  (every row's): its k, v are cached, and it attends to positions <= pos.
  O(max_len) per token: what causal full attention sees."""
  del params
  state = masks.kv_write(state, k, v, pos)
  visible = (jnp.arange(state['k'].shape[1]) <= pos)[None, None]
  return masks.token_attention(q, state['k'], state['v'], visible), state


def full_mask(q, k, *, causal, q_lengths, kv_lengths):
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  ok = masks.allowed(jnp.arange(q.shape[1])[None], jnp.arange(k.shape[1])[None],
                     ql, kl, causal=causal)
  return ok[:, None]  # [b, 1, q, s]


def weights(q, k, v, params, *, implementation='auto', causal=False,
            q_lengths=None, kv_lengths=None, rng=None):
  del v, params, implementation, rng
  mask = full_mask(q, k, causal=causal, q_lengths=q_lengths,
                   kv_lengths=kv_lengths)
  return dense_probs(q, k, mask)


def _cudnn_unsupported_reason(q, k):
  """Why the cuDNN path cannot run these inputs, or '' when it can."""
  if not masks.on_gpu():
    return f'backend is {jax.default_backend()}, cudnn needs a GPU'
  if q.dtype not in (jnp.float16, jnp.bfloat16):
    return f'dtype {q.dtype} (cudnn needs float16 or bfloat16)'
  d = q.shape[-1]
  cc = getattr(jax.devices()[0], 'compute_capability', '0')
  major = int(str(cc).split('.')[0]) if cc else 0
  if major < 8:
    return f'compute capability {cc} < 8.0'
  limit = 256 if major >= 9 else 128
  if d % 8 or d > limit:
    return f'head_dim {d} (cudnn needs a multiple of 8, at most {limit})'
  return ''


_LOGGED = set()


def _log_once(message):
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.info(message)


def choose_implementation(q, k, implementation):
  """Resolves 'auto' to a concrete path and validates explicit requests."""
  reason = _cudnn_unsupported_reason(q, k)
  if implementation == 'cudnn' and reason:
    raise ValueError(f'attention.implementation=cudnn cannot run here: {reason};'
                     ' use auto, xla or reference')
  if implementation != 'auto':
    return implementation
  chosen = 'xla' if reason else 'cudnn'
  _log_once(f'full attention, implementation auto -> {chosen}'
            + (f' ({reason})' if reason else ' (GPU with supported dtype/shape)'))
  return chosen


def attend(q, k, v, params, *, implementation='auto', causal=False,
           q_lengths=None, kv_lengths=None, rng=None):
  del params, rng
  masks.check_inputs(q, k, v)
  impl = choose_implementation(q, k, implementation)
  if impl == 'reference':
    mask = full_mask(q, k, causal=causal, q_lengths=q_lengths,
                     kv_lengths=kv_lengths)
    return probs_times_v(dense_probs(q, k, mask), v, q.dtype)
  ql, kl = masks.valid_lengths(q, k, q_lengths, kv_lengths)
  out = jax.nn.dot_product_attention(
      q, k, v, is_causal=causal,
      query_seq_lengths=None if q_lengths is None else ql,
      key_value_seq_lengths=None if kv_lengths is None else kl,
      implementation=impl)
  # The peer averages V over rows whose keys are all masked; the contract
  # says such rows are zeros.
  keep = masks.row_has_key(ql, kl, q.shape[1])
  return jnp.where(keep[:, :, None, None], out, 0).astype(q.dtype)
