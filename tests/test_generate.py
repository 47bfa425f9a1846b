"""generate(): batched continuation with per-row prompt lengths, from the
decoding state where the kind has one and by recomputing the prefix where
it has not; the logits it reads are the model's, and sampling keeps what
it says it keeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_variants as av
from configs import default
from evaluate import generate as gen
from tasks.base import Task
from train import step

N, VOCAB = 12, 11


def _model(kind, causal=True, **spec):
  cfg = default.base().model
  cfg.update(num_layers=2, dim=16, num_heads=2, mlp_dim=32)
  task = Task('toy', vocab_size=VOCAB, seq_len=N, num_classes=VOCAB,
              head='per_position', causal=causal, sources=None)
  attention = {'kind': kind, 'implementation': 'auto',
               kind: {**av.defaults(kind), **spec}}
  return step.build_model(cfg, attention, task, seed=0)


def _prompts(width=N - 1, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(1, VOCAB, (2, width)), jnp.int32)


def _prefix_logits(model, tokens, key):
  """[b, n, vocab]: position p's logits from the forward over tokens[:p+1]
  (every row's length p + 1), the definition of the recompute path."""
  b, n = tokens.shape
  forward = nnx.jit(lambda model, length: model(
      {'inputs': tokens, 'length': length}, attention_rng=key))
  return jnp.stack([forward(model, jnp.full((b,), p + 1))[:, p]
                    for p in range(n)], axis=1)


@pytest.mark.parametrize('kind,spec', [
    ('full', {}),
    ('local', {'window': 3}),
    ('lsh', {'bucket_size': 4, 'n_hashes': 2}),
    # Two more recomputing kinds, opt-in (lsh above is the one whose
    # recomputation differs from a whole-prompt forward).
    pytest.param('sinkhorn', {'block_size': 4}, marks=pytest.mark.slow),
    pytest.param('synthesizer', {'block': 4}, marks=pytest.mark.slow),
])
def test_logits_are_the_models_on_each_prefix(kind, spec):
  """Prompt positions are read teacher-forced: each one's logits equal the
  forward pass over its prefix, whether decoded or recomputed."""
  model = _model(kind, **spec)
  key = jax.random.key(4)
  prompts = _prompts()
  out = gen.generate(model, prompts, jnp.asarray([N - 1, N - 1]), 1,
                     attention_rng=key)
  want = _prefix_logits(model, jnp.pad(prompts, ((0, 0), (0, 1))), key)
  np.testing.assert_allclose(out['logits'], want[:, :N - 1], atol=1e-4)
  # Every kind but lsh is prefix-consistent: the same logits come from one
  # causal forward over the whole prompt. lsh's do not (later tokens take
  # sorted chunk slots), which is why it recomputes.
  whole = model({'inputs': prompts, 'length': jnp.asarray([N - 1, N - 1])},
                attention_rng=key)
  if kind != 'lsh':
    np.testing.assert_allclose(out['logits'], whole, atol=1e-4)
  assert gen.decoding(model.encoder.blocks[0].attn.spec) == (
      'decoded' if av.can_decode({'kind': kind}) else 'recompute')


def test_decoded_and_recomputed_generation_agree():
  model = _model('local', window=3)
  key = jax.random.key(1)
  prompts, lengths = _prompts(6), jnp.asarray([6, 3])
  decoded = gen.generate(model, prompts, lengths, 5, attention_rng=key)
  again = gen.generate(model, prompts, lengths, 5, attention_rng=key,
                       recompute=True)
  np.testing.assert_allclose(decoded['logits'], again['logits'], atol=1e-4)
  np.testing.assert_array_equal(decoded['tokens'], again['tokens'])


def test_each_row_continues_its_own_prompt():
  """A short prompt in a batch with a longer one continues as it does
  alone; its padding is overwritten by its own continuation."""
  model = _model('full')
  key = jax.random.key(2)
  prompts = _prompts(7)
  both = gen.generate(model, prompts, jnp.asarray([7, 3]), 4,
                      attention_rng=key)
  alone = gen.generate(model, prompts[1:, :3], jnp.asarray([3]), 4,
                       attention_rng=key)
  assert both['tokens'].shape == (2, 4)
  np.testing.assert_array_equal(both['tokens'][1], alone['tokens'][0])
  # Greedy: each new token is the argmax of the logits read before it, and
  # it is what the next position reads.
  logits = both['logits'][1]
  for i in range(4):
    assert int(both['tokens'][1, i]) == int(jnp.argmax(logits[2 + i]))


def test_filter_keeps_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.asarray(gen.filter_logits(logits, **kw)[0] >
                                 jnp.finfo(jnp.float32).min)
  np.testing.assert_array_equal(kept(top_k=2), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.5), [1, 0, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.8), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.81), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_p=1.0), [1, 1, 1, 1])
  # Shuffled order: the same tokens by value.
  perm = jnp.asarray([2, 0, 3, 1])
  got = gen.filter_logits(logits[:, perm], top_p=0.8)[0]
  np.testing.assert_array_equal(np.asarray(got > -1e30), [0, 1, 0, 1])


def test_sampling_follows_the_distribution():
  logits = jnp.log(jnp.asarray([0.6, 0.3, 0.1, 0.0]))
  draws = gen.sample(jnp.broadcast_to(logits, (20_000, 4)),
                     jax.random.key(0), temperature=1.0)
  freq = np.bincount(np.asarray(draws), minlength=4) / 20_000
  np.testing.assert_allclose(freq, [0.6, 0.3, 0.1, 0.0], atol=0.015)
  top1 = gen.sample(jnp.broadcast_to(logits, (50, 4)), jax.random.key(1),
                    temperature=2.0, top_k=1)
  assert (np.asarray(top1) == 0).all()
  assert int(gen.sample(logits, jax.random.key(0))) == 0  # greedy


@pytest.mark.parametrize('kwargs,message', [
    ({'max_new_tokens': 20}, r'make 25 positions; the model has 12'),
    ({'max_new_tokens': 0}, 'max_new_tokens=0 must be >= 1'),
    ({'top_p': 0.0}, r'top_p=0.0 in \(0, 1\]'),
])
def test_bad_requests_say_what_to_change(kwargs, message):
  model = _model('full')
  kwargs = {'max_new_tokens': 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    gen.generate(model, _prompts(5), jnp.asarray([5, 5]),
                 kwargs.pop('max_new_tokens'), attention_rng=jax.random.key(0),
                 **kwargs)


def test_a_bidirectional_model_cannot_generate():
  model = _model('full', causal=False)
  with pytest.raises(ValueError, match='needs a causal model'):
    gen.generate(model, _prompts(5), jnp.asarray([5, 5]), 2,
                 attention_rng=jax.random.key(0))
