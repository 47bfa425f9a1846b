"""Causal decoding one token at a time (av.decode_step through the encoder)
gives the evaluation forward pass's logits at every position, for every
kind that decodes from a state; padding in the batch changes nothing
before a row's end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_variants as av
from configs import default
from tasks.base import Task
from train import step

N, VOCAB = 12, 11

# (kind, hyperparameters small enough that N = 12 exercises the pattern).
CASES = [
    ('full', {}),
    ('blockwise', {'q_block': 4, 'kv_block': 4}),
    ('local', {'window': 3}),
    ('longformer', {'window': 2, 'num_global': 2, 'block': 4}),
    ('linear', {'chunk': 4}),
    ('performer', {'num_features': 16, 'chunk': 4}),
    ('sparse', {'pattern': 'strided', 'block_size': 3}),
    ('sparse', {'pattern': 'fixed', 'block_size': 4, 'num_summary': 2}),
    ('bigbird', {'block_size': 2, 'num_global': 2, 'num_random': 2,
                 'seed': 3}),
]
DECODABLE = dict(CASES)  # one setting per kind where states are sized


def _model(kind, num_kv_heads=0, **spec):
  cfg = default.base().model
  cfg.update(num_layers=2, dim=16, num_heads=4, num_kv_heads=num_kv_heads,
             mlp_dim=32)
  task = Task('toy', vocab_size=VOCAB, seq_len=N, num_classes=VOCAB,
              head='per_position', causal=True, sources=None)
  attention = {'kind': kind, 'implementation': 'auto',
               kind: {**av.defaults(kind), **spec}}
  return step.build_model(cfg, attention, task, seed=0)


@nnx.jit
def _forward_and_decode(model, inputs, lengths, key):
  enc = model.encoder
  want = model({'inputs': inputs, 'length': lengths}, attention_rng=key)
  states = enc.decode_init(inputs.shape[0], inputs.shape[1],
                           attention_rng=key)

  def one(states, xs):
    tokens, pos = xs
    x, states = enc.decode_step(tokens, pos, states)
    return states, model.head.token_logits(x)
  _, got = jax.lax.scan(one, states, (inputs.T, jnp.arange(inputs.shape[1])))
  return want, jnp.moveaxis(got, 0, 1)


# Every kind with 4 heads; GQA (2 kv heads) for a cache and a per-head
# pattern (a ring and a recurrent state opt-in).
@pytest.mark.parametrize('kind,spec,kv_heads', [
    (kind, spec, 0) for kind, spec in CASES] + [
        ('full', {}, 2), ('bigbird', DECODABLE['bigbird'], 2),
        # A ring and a recurrent state under GQA, opt-in.
        pytest.param('longformer', DECODABLE['longformer'], 2,
                     marks=pytest.mark.slow),
        pytest.param('performer', DECODABLE['performer'], 2,
                     marks=pytest.mark.slow)])
def test_decoding_equals_the_causal_forward(kind, spec, kv_heads):
  assert av.can_decode({'kind': kind})
  model = _model(kind, kv_heads, **spec)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(1, VOCAB, (2, N)), jnp.int32)
  lengths = jnp.asarray([N, 7])    # the second row is padded after 7
  want, got = _forward_and_decode(model, inputs, lengths, jax.random.key(5))
  np.testing.assert_allclose(got[0], want[0], atol=1e-4)
  np.testing.assert_allclose(got[1, :7], want[1, :7], atol=1e-4)


def test_decoding_states_do_not_grow_with_the_position_where_they_need_not():
  """local's ring and longformer's ring + globals hold the window, linear's
  and performer's sums hold O(features x head_dim): none grows with
  max_len; full's cache does."""
  def state_bytes(kind, max_len):
    spec = {'kind': kind, kind: {**av.defaults(kind), **DECODABLE[kind]}}
    state = jax.eval_shape(lambda: av.decode_init(
        spec, batch=1, max_len=max_len, num_heads=2, num_kv_heads=2,
        head_dim=8, dtype=jnp.float32, rng=jax.random.key(0)))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  for kind in ('local', 'longformer', 'linear', 'performer'):
    assert state_bytes(kind, 64) == state_bytes(kind, 4096), kind
  assert state_bytes('full', 4096) == 64 * state_bytes('full', 64)


def test_kinds_without_a_decoding_state_say_so():
  for kind in ('lsh', 'sinkhorn', 'synthesizer', 'linformer',
               'nystromformer'):
    assert not av.can_decode({'kind': kind}), kind


def test_sparse_steps_read_their_pattern_not_the_cache():
  """A step gathers O(l + N / l) (strided), O(l + N c / l) (fixed) or
  O((2 + g + r) b) (bigbird) cached keys at N = 4096, not N."""
  from attention_variants import bigbird, sparse
  n, pos = 4096, jnp.int32(3000)
  strided = sparse.pattern_positions(
      pos, {'pattern': 'strided', 'block_size': 64, 'num_summary': 8}, n)
  fixed = sparse.pattern_positions(
      pos, {'pattern': 'fixed', 'block_size': 64, 'num_summary': 2}, n)
  big = bigbird.pattern_positions(
      pos, {'block_size': 64, 'num_global': 2, 'num_random': 3, 'seed': 0},
      heads=2, max_len=n)
  assert strided.shape == (65 + 63,) and fixed.shape == (64 + 128,)
  assert big.shape == (2, (2 + 1 + 3) * 64)
  # Every slot in use is a distinct earlier position.
  for seen in (strided, fixed, big[0], big[1]):
    used = np.asarray(seen)[np.asarray(seen) >= 0]
    assert len(set(used.tolist())) == len(used) and used.max() <= 3000
