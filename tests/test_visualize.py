"""--mode=visualize: the maps drawn are the weights each layer used, pooling
keeps their mass, the summaries mean what they say, and the command writes
readable PNGs for a trained smoke run of every kind."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from matplotlib import image as mimage

import attention_variants as av
import variant_kit as kit
from configs import default
from configs import visualize as visualize_config
from evaluate import visualize
from models import transformer
from tasks.base import Task
from train import step, trainer

N, VOCAB = 12, 10
# The kinds whose attention_parts split the weights into components.
STRUCTURED = ('sparse', 'bigbird', 'longformer', 'lsh', 'sinkhorn')


def _model(kind, causal, **spec):
  cfg = default.base().model
  cfg.update(num_layers=2, dim=16, num_heads=2, mlp_dim=32)
  task = Task('toy', vocab_size=VOCAB, seq_len=N, num_classes=2,
              head='classify', causal=causal, sources=None, cls_token=True)
  attention = {'kind': kind, 'implementation': 'auto',
               kind: {**av.defaults(kind), **spec}}
  return step.build_model(cfg, attention, task, seed=0), attention


@pytest.mark.parametrize('kind,spec', [
    ('full', {}), ('local', {'window': 3}),
    ('bigbird', {'block_size': 2, 'num_global': 1, 'num_random': 1}),
    ('lsh', {'bucket_size': 4, 'n_hashes': 2}),
])
@pytest.mark.parametrize('causal', [False, True])
def test_maps_are_the_weights_each_layer_used(kind, spec, causal):
  """Layer i's map is av.attention_weights of the q, k, v block i computes
  from the output of block i - 1, with the key fold_in(key, i); and that
  map times v is the attention output of the forward pass."""
  model, attention = _model(kind, causal, **spec)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(1, VOCAB, (2, N)), jnp.int32)
  lengths = jnp.asarray([N, 7])

  @nnx.jit
  def compute(model, inputs, lengths, key):
    enc = model.encoder
    with_parts = enc.attention_maps(inputs, lengths, attention_rng=key,
                                    parts=True)
    maps = [w for w, _ in with_parts]
    x, wants, mixed, outs = enc._embed(inputs), [], [], []
    for i, block in enumerate(enc.blocks):
      spec_i = transformer.layer_spec(attention, i)
      layer_key = jax.random.fold_in(key, i)
      q, k, v = block.attn._qkv(block.ln1(x))
      wants.append(av.attention_weights(
          q, k, v, spec_i, causal=causal, q_lengths=lengths,
          kv_lengths=lengths, rng=layer_key))
      outs.append(av.attend(q, k, v, spec_i, causal=causal,
                            q_lengths=lengths, kv_lengths=lengths,
                            rng=layer_key))
      mixed.append(jnp.einsum('bhqk,bkhd->bqhd', maps[i], v))
      x = block(x, lengths, causal=causal, attention_rng=layer_key,
                dropout_rng=None)
    return maps, [p for _, p in with_parts], wants, mixed, outs

  maps, parts, wants, mixed, outs = compute(model, inputs, lengths,
                                            jax.random.key(3))
  assert len(maps) == 2 and maps[0].shape == (2, 2, N, N)
  for i in range(2):
    np.testing.assert_allclose(maps[i], wants[i], atol=1e-6)
    np.testing.assert_allclose(mixed[i], outs[i], atol=2e-5)
    # The parts of the same layer split exactly these maps.
    assert bool(parts[i]) == (kind in ('bigbird', 'lsh'))
    if parts[i]:
      np.testing.assert_allclose(sum(parts[i].values()), maps[i], atol=1e-6)
  # The padded rows and columns of the second example hold no probability.
  assert float(jnp.abs(maps[0][1, :, :, 7:]).max()) == 0.0


@pytest.mark.parametrize('n,b', [(12, 4), (10, 3), (5, 1)])
def test_pooled_maps_keep_the_mass(n, b):
  rng = np.random.default_rng(1)
  maps = rng.random((2, 3, n, n))
  pooled = visualize.pool(maps, b)
  m = -(-n // b)
  assert pooled.shape == (2, 3, m, m)
  np.testing.assert_allclose(pooled.sum((-1, -2)) * b * b,
                             maps.sum((-1, -2)))
  np.testing.assert_allclose(pooled[..., 0, 0],
                             maps[..., :b, :b].mean((-1, -2)))


def test_tile_size():
  assert visualize.tile(128, 100) == 1
  assert visualize.tile(128, 128) == 1
  assert visualize.tile(128, 129) == 2
  assert visualize.tile(100, 1000) == 10


def test_summaries_of_known_maps():
  n = 6
  eye = np.eye(n)[None, None]
  s = visualize.summaries(eye)
  assert s['mean_distance'] == [[0.0]] and s['entropy'] == [[0.0]]
  uniform = np.full((1, 1, n, n), 1.0 / n)
  s = visualize.summaries(uniform)
  want = np.abs(np.arange(n)[:, None] - np.arange(n)[None]).mean()
  np.testing.assert_allclose(s['mean_distance'], [[want]])
  np.testing.assert_allclose(s['entropy'], [[np.log(n)]])
  # "previous token" with an empty first row (causal, no key): distance 1
  # over the rows that hold probability.
  prev = np.zeros((1, 1, n, n))
  prev[0, 0, np.arange(1, n), np.arange(n - 1)] = 1.0
  np.testing.assert_allclose(visualize.summaries(prev)['mean_distance'],
                             [[1.0]])
  # Shares: over the rows that hold probability (row 0 is empty), a third
  # of each row's mass on 'a' is a share of 1/3.
  rows = prev.sum(-1)
  s = visualize.summaries(prev, {'a': rows / 3, 'b': 2 * rows / 3})
  np.testing.assert_allclose(s['share']['a'], [[1 / 3]])
  np.testing.assert_allclose(s['share']['b'], [[2 / 3]])
  assert 'share' not in visualize.summaries(prev, {})


def test_rollout_and_importance():
  n = 4
  # Every layer attends only to token 2: the rollout moves mass there.
  a = np.zeros((n, n))
  a[:, 2] = 1.0
  r = visualize.rollout(np.stack([a, a]))
  np.testing.assert_allclose(r.sum(-1), 1.0)
  step1 = 0.5 * a + 0.5 * np.eye(n)
  np.testing.assert_allclose(r, step1 @ step1)
  cls, note = visualize.importance(np.stack([a]), 'cls')
  np.testing.assert_allclose(cls, step1[0])
  assert 'CLS' in note
  mean, note = visualize.importance(np.stack([a]), 'mean')
  np.testing.assert_allclose(mean, step1.mean(0))
  assert 'mean pooling' in note


def _spec(kind, **params):
  return {'kind': kind, 'implementation': 'auto',
          kind: {**av.defaults(kind), **params}}


def _local_pattern(n, left, right, heads):
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  return np.broadcast_to((i - left <= j) & (j <= i + right), (heads, n, n))


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('kind,params,pattern', [
    ('local', {'window': 2, 'block': 4},
     lambda n, h: _local_pattern(n, 2, 2, h)),
    ('local', {'window': 2, 'left': 3, 'right': 1, 'block': 5},
     lambda n, h: _local_pattern(n, 3, 1, h)),
    ('sparse', {'block_size': 4, 'pattern': 'strided'},
     lambda n, h: kit.strided_pattern(n, n, 4, heads=h)),
    ('sparse', {'block_size': 4, 'pattern': 'fixed', 'num_summary': 2},
     lambda n, h: kit.fixed_pattern(n, n, 4, 2, heads=h)),
    ('bigbird', {'block_size': 3, 'num_global': 2, 'num_random': 1,
                 'seed': 4},
     lambda n, h: kit.bigbird_pattern(n, n, 3, 2, 1, 4, heads=h)),
])
def test_visibility_is_the_docstring_pattern(kind, params, pattern, causal):
  """Keys visible at length 21 (padding from 17): the pattern of the
  variant's docstring, cut by padding and, when causal, at the diagonal."""
  n, length, heads = 21, 17, 3
  seen = visualize.visibility(_spec(kind, **params), n, causal,
                              heads=heads, length=length)
  want = pattern(n, heads).copy()
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  want &= (i < length) & (j < length)
  if causal:
    want &= j <= i
  np.testing.assert_array_equal(seen, want)


def test_dense_kinds_see_every_key():
  n, length = 10, 8
  valid = np.zeros((n, n), bool)
  valid[:length, :length] = True
  for kind in ('full', 'linear', 'performer', 'synthesizer'):
    seen = visualize.visibility(_spec(kind), n, False, heads=2,
                                length=length)
    np.testing.assert_array_equal(seen, np.broadcast_to(valid, (2, n, n)),
                                  err_msg=kind)


def _png_shape(path):
  pixels = mimage.imread(path)
  assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
  return pixels.shape[:2]


def _visualize(workdir, **fields):
  cfg = visualize_config.get_config()
  cfg.update(fields)
  return visualize.run(cfg, workdir)


def _check_run(config, workdir):
  """Visualizes examples 0 and 2 and checks files, numbers and results."""
  record = _visualize(workdir, examples='0,2')
  out = os.path.join(workdir, 'maps')
  record2, arrays = visualize.load(out)
  assert record2 == json.loads(json.dumps(record))
  names = [e['name'] for e in record['examples']]
  for name in names:
    for figure in ('heads', 'layers'):
      h, w = _png_shape(os.path.join(out, f'{name}_{figure}.png'))
      assert h > 100 and w > 100
  # The numbers drawn are the encoder's maps on the best checkpoint.
  t = trainer.Trainer(config, workdir)
  try:
    _, meta = t.restore()
    state, _ = t.ckpts.restore_best(t.state, meta['best_step'])
  finally:
    t.ckpts.close()
  model, _ = nnx.merge(t.setup.graphdef, state)
  first = record['examples'][0]
  example = t.task.source('test')[0]
  tokens = example['inputs'][0] if t.task.head == 'match' else example['inputs']
  length = first['length']
  maps = model.encoder.attention_maps(jnp.asarray(tokens[None]),
                                      jnp.asarray([length]),
                                      attention_rng=t.eval_key)
  want = np.stack([np.asarray(m[0])[:, :length, :length] for m in maps])
  drawn = arrays[f'{first["name"]}_heads']
  np.testing.assert_allclose(visualize.pool(want, first['tile']), drawn,
                             atol=1e-6)
  assert first['tokens'] == [int(x) for x in tokens[:length]]
  layers, heads = config.model.num_layers, config.model.num_heads
  assert np.asarray(first['entropy']).shape == (layers, heads)
  with open(os.path.join(workdir, 'results.json')) as f:
    looks = json.load(f)['attention']['looks']
  assert looks['examples'] == [0, 2]
  assert np.asarray(looks['mean_distance']).shape == (layers, heads)
  # Kinds with components report the share of mass on each, per layer and
  # head: a distribution over the components.
  share = first.get('share', {})
  assert bool(share) == (config.attention.kind in STRUCTURED)
  if share:
    total = sum(np.asarray(v) for v in share.values())
    assert total.shape == (layers, heads)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    assert set(looks['share']) == set(share)
  return record, arrays


@pytest.fixture(scope='module')
def listops_run(data_dir, tmp_path_factory):
  """(config, workdir) of one trained listops smoke run for this module."""
  import tasks
  config = tasks.get_config('listops', 'smoke')
  config.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp('visualize') / 'run')
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


def test_visualize_a_listops_run(listops_run, tmp_path):
  config, workdir = listops_run
  record, arrays = _check_run(config, workdir)
  first = record['examples'][0]
  assert first['token_names'][0] == 'CLS' and first['tile'] == 1
  assert 'CLS row' in first['importance']
  assert arrays[f'{first["name"]}_importance'].shape == (first['length'],)
  # Long maps are pooled; a chosen layer and head only; log scale draws.
  record = _visualize(workdir, examples='1', pool_above=4, layers='0',
                      heads='1', log_scale=True, out_dir=str(tmp_path / 'p'))
  entry = record['examples'][0]
  assert entry['tile'] == -(-entry['length'] // 4)
  _, arrays = visualize.load(str(tmp_path / 'p'))
  m = -(-entry['length'] // entry['tile'])
  assert arrays['example1_heads'].shape == (1, 1, m, m)


def test_side_by_side_over_a_sweep_directory(listops_run, smoke_config,
                                             tmp_path):
  """A compare sweep's directory: one column per kind, the same example
  and layer, above the kind's visibility."""
  _, run_dir = listops_run
  sweep = tmp_path / 'sweep'
  full_dir = sweep / 'runs' / 'listops' / 'full' / 'seed0'
  shutil.copytree(run_dir, full_dir)
  longformer_dir = str(sweep / 'runs' / 'listops' / 'longformer' / 'seed0')
  config = smoke_config(attention__kind='longformer',
                        attention__longformer__window=2)
  trainer.train_and_evaluate(config, longformer_dir)
  record = _visualize(str(sweep), examples='1')
  out = str(sweep / 'maps')
  assert _png_shape(os.path.join(out, 'listops_example1.png'))[1] > 300
  saved, arrays = visualize.load(out)
  assert saved == json.loads(json.dumps(record))
  entry = record['tasks']['listops']
  assert list(entry) == ['full', 'longformer']
  assert entry['longformer']['layer'] == 0
  length = entry['longformer']['length']
  # Longformer's window of 2 and its one global token (the CLS).
  want = _local_pattern(length, 2, 2, 1)[0].copy()
  want[0, :] = want[:, 0] = True
  np.testing.assert_array_equal(arrays['listops_longformer_visible'],
                                want.astype(float))
  assert (arrays['listops_full_visible'] == 1).all()
  # Full attention has no components; longformer's shares are a
  # distribution over its two.
  assert 'share' not in entry['full']
  share = entry['longformer']['share']
  assert set(share) == {'window', 'global'}
  np.testing.assert_allclose(np.add(share['window'], share['global']), 1.0,
                             atol=1e-5)
  # The drawn map and the shares are the run's own for that example.
  _visualize(longformer_dir, examples='1', out_dir=str(tmp_path / 'one'))
  one, single = visualize.load(str(tmp_path / 'one'))
  np.testing.assert_allclose(arrays['listops_longformer_map'],
                             single['example1_layers'][0], atol=1e-6)
  assert one['examples'][0]['length'] == length
  np.testing.assert_allclose(one['examples'][0]['share']['global'][0],
                             share['global'][0], atol=1e-6)


def test_a_sweep_without_runs_is_one_line(tmp_path):
  os.makedirs(tmp_path / 'runs' / 'listops')
  with pytest.raises(ValueError, match='holds no finished run of seed 0'):
    _visualize(str(tmp_path))


@pytest.mark.parametrize('fields,message', [
    ({'examples': '0,99999'}, r"--config.examples='0,99999': 99999 is "
     r'outside \[0, '),
    ({'examples': 'first'}, 'give comma-separated integers'),
    ({'layers': '5'}, r"--config.layers='5': 5 is outside \[0, 1\)"),
    ({'max_length': 8}, 'dense attention maps are computed up to '
     '--config.max_length=8'),
])
def test_bad_requests_are_one_line(listops_run, fields, message):
  _, workdir = listops_run
  with pytest.raises(ValueError, match=message):
    _visualize(workdir, **fields)


def test_not_a_run_is_one_line(tmp_path):
  with pytest.raises(ValueError, match='has no config.json'):
    _visualize(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize('kind', av.KINDS)
@pytest.mark.parametrize('task', ['listops', 'retrieval', 'mqar'])
def test_every_kind_visualizes(smoke_config, tmp_path, kind, task):
  config = smoke_config(task, attention__kind=kind)
  if kind in ('nystromformer', 'linformer') and task == 'mqar':
    pytest.skip('bidirectional only')
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(config, workdir)
  record, _ = _check_run(config, workdir)
  if task == 'retrieval':
    assert [e['name'] for e in record['examples']] == [
        'example0_a', 'example0_b', 'example2_a', 'example2_b']


def test_cli_error_is_one_line(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, 'main.py', '--mode=visualize',
       f'--workdir={tmp_path}'], cwd=root, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last == (f'error: --workdir={tmp_path} has no config.json: give '
                  'the directory of a training run'), proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
