"""The device mesh (train/sharding.py): its validation, the parameter
layout, and the same training on every mesh.

The equivalence tests train the ListOps smoke run (global batch 16, 6
steps) on 8 forced CPU devices, in one subprocess, as the mesh data x fsdp
x sequence = (2,2,2) (default) and as (8,1,1), (2,4,1) and (2,1,4)
(`-m slow`), and on one device here; the losses
agree to 1e-5 (relative) and every array of the last checkpoint to 1e-5
(absolute + relative), float32: the meshes only change the order of
floating-point sums.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import tasks
from train import checkpoint as ckpt_lib
from train import sharding
from train import step as step_lib
from train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(8, 1, 1), (2, 4, 1), (2, 1, 4)]
TOL = 1e-5
TIMING = ('train/steps_per_sec', 'validation/examples_per_sec')


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize('mesh, devices, expected', [
    ({'data': -1, 'fsdp': 1, 'sequence': 1}, 8, (8, 1, 1)),
    ({'data': 2, 'fsdp': -1, 'sequence': 1}, 8, (2, 4, 1)),
    ({'data': 2, 'fsdp': 1, 'sequence': -1}, 8, (2, 1, 4)),
    ({'data': 1, 'fsdp': 2, 'sequence': 2}, 4, (1, 2, 2)),
    ({}, 3, (3, 1, 1)),
])
def test_mesh_shape_resolves_the_rest(mesh, devices, expected):
  shape = sharding.mesh_shape(mesh, devices)
  assert tuple(shape[a] for a in sharding.AXES) == expected


@pytest.mark.parametrize('mesh, devices, message', [
    ({'data': 3, 'fsdp': 1, 'sequence': 1}, 8,
     'has 3 devices but there are 8; change mesh.data'),
    ({'data': 2, 'fsdp': 2, 'sequence': 1}, 8, 'change mesh.data'),
    ({'data': -1, 'fsdp': 3, 'sequence': 1}, 8, 'mesh.data=-1 takes'),
    ({'data': -1, 'fsdp': -1, 'sequence': 1}, 8, 'are both -1'),
    ({'data': 0, 'fsdp': 1, 'sequence': 1}, 8, 'mesh.data=0 must be'),
    ({'data': -1, 'model': 2}, 8, 'mesh.model is not a mesh axis'),
])
def test_impossible_meshes_name_the_field(mesh, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh, devices)


@pytest.mark.parametrize('batch, eval_batch, seq_len, message', [
    (12, 16, 40, 'train.batch_size=12 is not divisible across the mesh'),
    (16, 20, 40, 'train.eval_batch_size=20 is not divisible'),
    (16, 16, 42, 'sequence length 42 is not divisible by mesh.sequence=4'),
])
def test_what_the_mesh_cannot_split_names_the_field(batch, eval_batch,
                                                     seq_len, message):
  mesh = AbstractMesh((2, 4, 4), sharding.AXES)
  sharding.check_divisible(mesh, batch_size=8, eval_batch_size=8, seq_len=8)
  with pytest.raises(ValueError, match=message):
    sharding.check_divisible(AbstractMesh((8, 1, 4), sharding.AXES),
                             batch_size=batch, eval_batch_size=eval_batch,
                             seq_len=seq_len)


def test_a_mesh_the_devices_cannot_make_is_one_error_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/listops.py:smoke',
       f'--workdir={tmp_path / "w"}', f'--config.data_dir={tmp_path / "d"}',
       '--config.mesh.data=2'], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last == ('error: mesh data=2, fsdp=1, sequence=1 has 2 devices but '
                  'there are 1; change mesh.data (or set one axis to -1)')
  assert 'Traceback' not in proc.stderr


def test_param_spec_shards_the_largest_divisible_dimension():
  assert sharding.param_spec((64, 128), 4) == P(None, 'fsdp')
  assert sharding.param_spec((128, 64), 4) == P('fsdp', None)
  assert sharding.param_spec((64, 64), 4) == P('fsdp', None)  # first of a tie
  assert sharding.param_spec((6, 64), 4) == P(None, 'fsdp')
  assert sharding.param_spec((6,), 4) == P()       # nothing divides: copied
  assert sharding.param_spec((), 4) == P()
  assert sharding.param_spec((64, 128), 1) == P()


# -- the same run on every mesh -----------------------------------------------

_RUN_MESHES = """
import json, sys
import jax
import tasks
from train import sharding, trainer
out = {}
for data, fsdp, seq in json.loads(sys.argv[1]):
  config = tasks.get_config('listops', 'smoke')
  config.data_dir = sys.argv[2]
  config.mesh.update(data=data, fsdp=fsdp, sequence=seq)
  workdir = f'{sys.argv[3]}/mesh_{data}_{fsdp}_{seq}'
  t = trainer.Trainer(config, workdir)
  specs = {str(p): str(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(
      t.state_sharding)}
  results = t.run(None)
  out[workdir] = {'mesh': results['compute']['mesh'], 'specs': specs}
print(json.dumps(out))
"""


def _records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f]


def _checkpoint(workdir, template):
  ckpts = ckpt_lib.Checkpoints(workdir)
  try:
    state, meta = ckpts.latest.restore(template, 6)
  finally:
    ckpts.close()
  return {str(p): np.asarray(x) for p, x in
          jax.tree_util.tree_leaves_with_path(state)}, meta


@pytest.fixture(scope='module')
def single_run(data_dir, tmp_path_factory):
  """(config, workdir) of the smoke run on this process's one device."""
  config = tasks.get_config('listops', 'smoke')
  config.data_dir = data_dir
  single = str(tmp_path_factory.mktemp('single') / 'run')
  trainer.train_and_evaluate(config, single)  # prepares the data too
  return config, single


def _mesh_runs(meshes, data_dir, root) -> dict:
  """{workdir: {'mesh', 'specs'}} of the smoke run on each mesh, trained
  in one subprocess on 8 forced devices."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-c', _RUN_MESHES, json.dumps(meshes), data_dir,
       str(root)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_mesh_of_every_axis_trains_the_same_model(single_run, tmp_path):
  """Default: data x fsdp x sequence = 2 x 2 x 2 at once (the parameters
  sharded, the batch split four ways, ring attention over 2 devices)."""
  config, single = single_run
  runs = _mesh_runs([(2, 2, 2)], config.data_dir, tmp_path)
  _check_same_model(config, single, runs, [(2, 2, 2)])


@pytest.mark.slow
def test_every_mesh_trains_the_same_model(single_run, tmp_path):
  config, single = single_run
  runs = _mesh_runs(MESHES, config.data_dir, tmp_path)
  _check_same_model(config, single, runs, MESHES)


def _check_same_model(config, single, runs, meshes):
  task = tasks.get(config.task, config.data_dir)
  template = step_lib.build(config.model, config.attention.to_dict(), task,
                            config.train, seed=config.seed).state
  want_records = _records(single)
  want_params, want_meta = _checkpoint(single, template)
  assert len(runs) == len(meshes)
  for workdir, info in runs.items():
    mesh = tuple(info['mesh'][a] for a in sharding.AXES)
    assert mesh in meshes and info['mesh']['devices'] == 8
    got = _records(workdir)
    assert [r.keys() for r in got] == [r.keys() for r in want_records]
    for g, w in zip(got, want_records):
      for name, value in w.items():
        assert g[name] == pytest.approx(value, rel=TOL, abs=TOL), (
            mesh, g['step'], name)
    params, meta = _checkpoint(workdir, template)
    assert params.keys() == want_params.keys()
    for name, value in want_params.items():
      # A key bias adds a per-query constant to the scores, which softmax
      # ignores: its true gradient is 0, so Adam turns rounding noise into
      # steps of up to the learning rate. Compared at that scale.
      noise = ("'key'" in name and "'bias'" in name
               and name.startswith("(DictKey(key=0)"))
      atol = config.train.learning_rate * 6 if noise else TOL
      np.testing.assert_allclose(params[name], value, rtol=TOL, atol=atol,
                                 err_msg=f'{mesh} {name}')
    assert meta['step'] == want_meta['step'] == 6
    # fsdp shards the parameters and optimizer state; the others copy them.
    sharded = [p for p, s in info['specs'].items() if 'fsdp' in s]
    if mesh[1] > 1:
      assert any('embed' in p for p in sharded), info['specs']
      assert any('opt_state' in p or 'mu' in p for p in sharded)
    else:
      assert not sharded
  with open(os.path.join(single, 'results.json')) as f:
    assert json.load(f)['compute']['mesh'] == {
        'data': 1, 'fsdp': 1, 'sequence': 1, 'devices': 1}
