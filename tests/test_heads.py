"""Heads own their output layer, loss, evaluation arrays and metrics; the
`match` head (two documents, one shared encoder) on a toy batch."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from tasks import heads
from tasks.base import Task
from tasks.heads import classify
from train import step

N, VOCAB = 8, 12


def _model_cfg(**fields):
  cfg = default.base().model
  cfg.update(dict(num_layers=1, dim=16, num_heads=2, mlp_dim=32, **fields))
  return cfg


def _task(head, num_classes=2):
  return Task('toy', vocab_size=VOCAB, seq_len=N, num_classes=num_classes,
              head=head, causal=False, sources=None, cls_token=True)


@pytest.mark.parametrize('name', heads.NAMES)
def test_every_registered_head_has_the_contract(name):
  head = heads.get(name)
  assert head.__module__.endswith(name) and 'inputs' in head.FIELDS
  for method in ('__call__', 'loss', 'evaluation', 'metrics'):
    assert callable(getattr(head, method))


def test_unknown_head_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown head 'nope'; valid heads: "):
    heads.get('nope')


def _pairs(rng, n):
  """Two documents per example; label 1 when the second repeats the first.
  Lengths vary, padding is 0."""
  a = rng.integers(1, VOCAB, (n, N), dtype=np.int32)
  other = rng.integers(1, VOCAB, (n, N), dtype=np.int32)
  label = rng.integers(0, 2, n).astype(np.int32)
  b = np.where(label[:, None] == 1, a, other)
  length = rng.integers(N // 2, N + 1, n).astype(np.int32)
  keep = np.arange(N)[None] < length[:, None]
  inputs = np.stack([a * keep, b * keep], axis=1)           # [n, 2, N]
  return {'inputs': inputs, 'length': np.stack([length, length], 1),
          'label': label}


@pytest.mark.parametrize('pair_norm', ['none', 'batch'])
def test_match_head_computes_its_definition(pair_norm):
  """logits = MLP([a, b, a*b, a-b]) with a, b the documents' pooled
  encodings from the one shared encoder, each run on its own; with
  pair_norm='batch', evaluation normalises them with the running
  statistics."""
  model = step.build_model(_model_cfg(pooling='mean', pair_norm=pair_norm),
                           {'kind': 'full'}, _task('match', num_classes=3),
                           seed=0)
  h = model.head
  if pair_norm == 'batch':   # statistics as after some training
    h.norm.mean[...] = jnp.linspace(-1.0, 1.0, 16)
    h.norm.var[...] = jnp.linspace(0.5, 2.0, 16)
  else:
    assert h.norm is None
  batch = jax.tree.map(jnp.asarray, _pairs(np.random.default_rng(0), 4))
  key = jax.random.key(0)
  run = nnx.jit(lambda model, batch: model(batch, attention_rng=key))
  encode = nnx.jit(lambda model, inputs, lengths: model.encoder(
      inputs, lengths, attention_rng=key))
  logits = run(model, batch)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32

  def pooled(doc):
    x = encode(model, batch['inputs'][:, doc], batch['length'][:, doc])
    x = classify.pool(x, batch['length'][:, doc], 'mean')
    if pair_norm == 'batch':
      x = ((x - h.norm.mean[...]) / jnp.sqrt(h.norm.var[...] + 1e-5)
           * h.norm.scale[...] + h.norm.bias[...])
    return x
  a, b = pooled(0), pooled(1)
  x = jnp.concatenate([a, b, a * b, a - b], -1)
  want = h.logits(jax.nn.relu(h.hidden2(jax.nn.relu(h.hidden1(x)))))
  np.testing.assert_allclose(logits, want, atol=1e-5)
  # Swapping the documents changes the features (a - b), so the logits.
  swapped = dict(batch, inputs=batch['inputs'][:, ::-1])
  assert not np.allclose(run(model, swapped), logits)
  # Evaluation never looks at the rest of the batch.
  first = jax.tree.map(lambda x: x[:1], batch)
  np.testing.assert_allclose(run(model, first), logits[:1], atol=1e-5)


def _pooled_mean(model, batch, key):
  """The mean over the batch of the 2b pooled encodings, before the norm."""
  inputs, lengths = batch['inputs'], batch['length']
  b, _, n = inputs.shape
  x = model.encoder(inputs.reshape(2 * b, n), lengths.reshape(2 * b),
                    attention_rng=key)
  return classify.pool(x, lengths.reshape(2 * b), 'mean').mean(0)


# Micro-batches' own statistics (2) are opt-in: accumulation is checked
# against the full batch in test_reliability.
@pytest.mark.parametrize('accum_steps', [
    1, pytest.param(2, marks=pytest.mark.slow)])
def test_match_pair_norm_trains_on_batch_statistics(accum_steps):
  """Training normalises over the batch (each micro-batch in turn when
  accumulating) and moves the running mean by momentum 0.9 per
  (micro-)batch, in order."""
  task = _task('match')
  cfg = default.base().train
  setup = step.build(_model_cfg(pooling='mean'), {'kind': 'full'}, task, cfg,
                     seed=0)
  batch = jax.tree.map(jnp.asarray, _pairs(np.random.default_rng(3), 8))
  keys = step.train_keys(jax.random.key(0), 0)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  want = jnp.zeros(16)
  for mb in range(accum_steps):
    part = jax.tree.map(lambda x: jnp.split(x, accum_steps)[mb], batch)
    want = 0.9 * want + 0.1 * _pooled_mean(model, part, keys[0])
  train_step = step.compile_train(setup, batch, keys, accum_steps=accum_steps)
  state, _ = train_step(setup.state, batch, keys)
  trained, _ = nnx.merge(setup.graphdef, state)
  np.testing.assert_allclose(trained.head.norm.mean[...], want, atol=1e-5)
  # Training mode: the 2b normalised encodings have mean 0 and variance 1
  # (scale 1 and bias 0 after one step from their initial 1 and 0: Adam's
  # first step moves each by at most the learning rate).
  a, b = trained.head.encode_pair(trained.encoder, batch,
                                  attention_rng=keys[0], dropout_rng=keys[1])
  both = jnp.concatenate([a, b])
  norm = trained.head.norm
  both = (both - norm.bias[...]) / norm.scale[...]
  np.testing.assert_allclose(both.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(both.var(0), 1, atol=2e-3)


def test_unknown_pair_norm_is_refused():
  with pytest.raises(ValueError, match="model.pair_norm='layer'; valid: "
                     'batch, none'):
    step.build_model(_model_cfg(pair_norm='layer'), {'kind': 'full'},
                     _task('match'), seed=0)


def test_match_head_learns_whether_two_documents_match():
  task = _task('match')
  cfg = default.base().train
  cfg.update(learning_rate=3e-3, warmup_steps=10, num_steps=300,
             grad_clip=1.0)
  setup = step.build(_model_cfg(), {'kind': 'full'}, task, cfg, seed=0)
  rng = np.random.default_rng(1)
  example = _pairs(rng, 32)
  key = jax.random.key(0)
  train_step = step.compile_train(setup, example, step.train_keys(key, 0))
  state = setup.state
  for i in range(cfg.num_steps):
    state, out = train_step(state, _pairs(rng, 32), step.train_keys(key, i))
  assert np.isfinite(float(out['loss']))
  test = _pairs(np.random.default_rng(2), 256)
  eval_step = step.compile_eval(dataclasses.replace(setup, state=state),
                                test, jax.random.key(0))
  arrays = jax.device_get(eval_step(state, test, jax.random.key(0)))
  m = setup.head.metrics(arrays)
  assert m['accuracy'] > 0.9, m['accuracy']
  assert m['num_examples'] == 256 and len(m['confusion_matrix']) == 2
  assert arrays['loss'].shape == (256,) and (arrays['weight'] == 1).all()


def test_heads_own_their_losses():
  """per_position sums cross-entropy over weighted positions; classify
  weights every example 1."""
  logits = jnp.log(jnp.asarray([[[0.5, 0.5], [0.9, 0.1]]]))     # [1, 2, 2]
  batch = {'targets': jnp.asarray([[0, 0]]),
           'weights': jnp.asarray([[0.0, 1.0]])}
  head = heads.get('per_position')(_task('per_position'), _model_cfg(),
                                   dtype=jnp.float32, rngs=nnx.Rngs(0))
  loss, weight = head.loss(logits, batch)
  np.testing.assert_allclose(loss, [-np.log(0.9)], rtol=1e-6)
  np.testing.assert_allclose(weight, [1.0])
  cls = heads.get('classify')(_task('classify'), _model_cfg(),
                              dtype=jnp.float32, rngs=nnx.Rngs(0))
  loss, weight = cls.loss(logits[:, 1], {'label': jnp.asarray([1])})
  want = optax.softmax_cross_entropy_with_integer_labels(logits[:, 1],
                                                        jnp.asarray([1]))
  np.testing.assert_allclose(loss, want)
  np.testing.assert_allclose(weight, [1.0])
