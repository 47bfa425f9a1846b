"""model.remat: the same model, losses and gradients, less compiled memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import listops
from tasks.base import Task
from train import profile, step

REMATS = ('block', 'attention')


def _task(seq_len=24, causal=False, head='classify'):
  return Task('t', vocab_size=20, seq_len=seq_len, num_classes=5, head=head,
              causal=causal, sources=None, cls_token=True)


def _config(kind='full', remat='none', **model):
  config = listops.get_config('smoke')
  config.model.update({'num_layers': 3, 'dropout': 0.1, **model})
  # Adam turns float noise in a gradient that is 0 in exact arithmetic (the
  # key bias: softmax ignores a shift shared by all keys) into a full +-lr
  # step; a larger epsilon keeps such updates at noise size.
  config.train.eps = 1e-4
  config.model.remat = remat
  config.attention.kind = kind
  return config


def _batch(b=4, n=24, seed=0):
  rng = np.random.default_rng(seed)
  return {'inputs': jnp.asarray(rng.integers(1, 20, (b, n)), jnp.int32),
          'length': jnp.asarray(rng.integers(n // 2, n + 1, (b,)), jnp.int32),
          'label': jnp.asarray(rng.integers(0, 5, (b,)), jnp.int32)}


def _loss_and_grads(config, batch):
  model = step.build_model(config.model, config.attention.to_dict(), _task(),
                           seed=0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state):
    return nnx.value_and_grad(step._mean_loss)(
        nnx.merge(graphdef, state), batch, jax.random.key(1),
        jax.random.key(2))
  return run(state)


def _close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


# bigbird: layers with different seeds, so different graph defs (the scan
# switches between them); local: the kind the lra numbers are about.
# One case per remat mode by default (each kind's attention is the same call
# under either); the other kinds are opt-in.
@pytest.mark.parametrize('kind,remat', [
    ('local', 'block'), ('full', 'attention'),
    pytest.param('full', 'block', marks=pytest.mark.slow),
    pytest.param('bigbird', 'block', marks=pytest.mark.slow),
    pytest.param('local', 'attention', marks=pytest.mark.slow),
    pytest.param('bigbird', 'attention', marks=pytest.mark.slow)])
def test_loss_and_gradients_equal_no_remat(kind, remat):
  batch = _batch()
  loss, grads = _loss_and_grads(_config(kind), batch)
  other_loss, other_grads = _loss_and_grads(_config(kind, remat), batch)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  assert (jax.tree.structure(nnx.state(other_grads))
          == jax.tree.structure(nnx.state(grads)))
  _close(nnx.state(other_grads), nnx.state(grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('remat', REMATS)
def test_parameters_and_initialisation_are_unchanged(remat):
  task = _task()
  plain = step.build_model(_config().model, {'kind': 'full'}, task, seed=3)
  other = step.build_model(_config(remat=remat).model, {'kind': 'full'},
                           task, seed=3)
  a, b = nnx.state(plain, nnx.Param), nnx.state(other, nnx.Param)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _train(kind, remat, accum_steps=1):
  """(losses, parameters) of 3 train steps of _config(kind, remat)."""
  config = _config(kind, remat)
  setup = step.build(config.model, config.attention.to_dict(), _task(),
                     config.train, seed=0)
  train_step = jax.jit(step.make_train_step(setup.graphdef, accum_steps))
  state, losses = setup.state, []
  for i in range(3):
    state, metrics = train_step(state, _batch(seed=i),
                                step.train_keys(jax.random.key(0), i))
    losses.append(float(metrics['loss']))
  return losses, nnx.state(nnx.merge(setup.graphdef, state)[0], nnx.Param)


@pytest.mark.slow  # test_remat_trains_the_same_model runs the trainer's steps
def test_training_steps_are_the_same():
  losses, params = _train('local', 'none')
  for remat in REMATS:
    other_losses, other_params = _train('local', remat)
    np.testing.assert_allclose(other_losses, losses, rtol=1e-5)
    _close(other_params, params, rtol=1e-4, atol=1e-5)
  # With micro-batches too (the lax.scan of _accumulated_grads around the
  # scan of the blocks; micro-batches draw their own dropout, so compared
  # with micro-batches without remat).
  losses, params = _train('local', 'none', accum_steps=2)
  other_losses, other_params = _train('local', 'block', accum_steps=2)
  np.testing.assert_allclose(other_losses, losses, rtol=1e-5)
  _close(other_params, params, rtol=1e-4, atol=1e-5)


def test_attention_maps_and_outputs_unchanged_under_remat():
  task, batch = _task(), _batch()
  plain = step.build_model(_config().model, {'kind': 'full'}, task, seed=0)
  other = step.build_model(_config(remat='block').model, {'kind': 'full'},
                           task, seed=0)
  key = jax.random.key(4)
  _close(other(batch, attention_rng=key), plain(batch, attention_rng=key),
         rtol=1e-5, atol=1e-6)
  maps = other.encoder.attention_maps(batch['inputs'], batch['length'],
                                      attention_rng=key)
  _close(maps, plain.encoder.attention_maps(
      batch['inputs'], batch['length'], attention_rng=key), rtol=1e-6)


def test_decoding_unchanged_under_remat():
  """A causal remat='block' encoder decodes token by token to the rows of its
  (scanned) forward pass."""
  config = _config(remat='block', dropout=0.0)
  task = _task(seq_len=8, causal=True, head='per_position')
  model = step.build_model(config.model, {'kind': 'full'}, task, seed=0)
  encoder, key = model.encoder, jax.random.key(5)
  tokens = _batch(b=2, n=8)['inputs']
  full = encoder(tokens, jnp.full((2,), 8), attention_rng=key)
  states = encoder.decode_init(2, 8, attention_rng=key)
  for pos in range(8):
    row, states = encoder.decode_step(tokens[:, pos], pos, states)
    np.testing.assert_allclose(row, full[:, pos], rtol=1e-4, atol=1e-5)


def test_block_remat_lowers_compiled_memory():
  """XLA's memory analysis of a small train step (compiled only)."""
  task = _task(seq_len=128)
  batch = {'inputs': jax.ShapeDtypeStruct((4, 128), jnp.int32),
           'length': jax.ShapeDtypeStruct((4,), jnp.int32),
           'label': jax.ShapeDtypeStruct((4,), jnp.int32)}
  keys = step.train_keys(jax.random.key(0), 0)
  peak = {}
  for remat in ('none', 'block'):
    config = _config(remat=remat, num_layers=4, dim=32, num_heads=2,
                     mlp_dim=64)
    setup = step.build(config.model, {'kind': 'full'}, task, config.train,
                       seed=0)
    compiled = step.compile_train(setup, batch, keys)
    peak[remat] = profile.compiled_memory(compiled)['peak_bytes']
  # Measured 9.4 MB -> 3.2 MB on XLA:CPU; asserted with a wide margin.
  assert peak['block'] < 0.6 * peak['none'], peak


def test_bad_remat_is_one_error():
  config = _config(remat='layers')
  with pytest.raises(ValueError) as error:
    step.build_model(config.model, {'kind': 'full'}, _task(), seed=0)
  assert str(error.value) == ("model.remat='layers'; valid: none, block, "
                              'attention')


def test_config_without_the_field_builds():
  """An older run's config.json has no model.remat: it means 'none'."""
  config = _config()
  del config.model['remat']
  model = step.build_model(config.model, {'kind': 'full'}, _task(), seed=0)
  assert model.encoder.remat == 'none'


def test_memory_fit_compiles_from_abstract_inputs():
  """evaluate/memory_fit: the train step compiled with no data behind it."""
  from evaluate import memory_fit
  config = listops.get_config('smoke')
  config.data_dir = '/nonexistent'   # nothing may be generated or read
  measured = memory_fit.measure(config, 'block', 2)
  assert measured['peak_bytes'] > 0 and measured['params'] > 0


def test_remat_trains_the_same_model(smoke_config, tmp_path):
  """The trainer end to end (2 layers, dropout): the same evaluation."""
  from train import trainer
  overrides = dict(model__num_layers=2, model__dropout=0.1,
                   train__eps=1e-4)  # eps: see _config
  plain = trainer.train_and_evaluate(smoke_config(**overrides),
                                     str(tmp_path / 'a'))
  other = trainer.train_and_evaluate(
      smoke_config(model__remat='block', **overrides), str(tmp_path / 'b'))
  for split in ('validation', 'test'):
    assert other['metrics'][split]['loss'] == pytest.approx(
        plain['metrics'][split]['loss'], rel=1e-4)
