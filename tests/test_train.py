"""End-to-end training on the smoke presets: outputs, resume, NaN handling."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from tasks.heads import classify
from train import step as step_lib
from train import trainer
from utils import provenance


def _read(path):
  with open(path) as f:
    return json.load(f)


# The pixel tasks' smoke runs take 17-26 s each (their images are drawn or
# converted first); they train in the opt-in suite (-m slow) and their data
# is tested in test_image.py and test_pathfinder.py.
PIXEL_TASKS = ('image', 'pathfinder', 'pathx')


@pytest.mark.parametrize('task', [
    pytest.param(t, marks=pytest.mark.slow) if t in PIXEL_TASKS else t
    for t in tasks.NAMES])
def test_run_writes_everything(smoke_config, tmp_path, task):
  workdir = str(tmp_path / 'run')
  results = trainer.train_and_evaluate(smoke_config(task), workdir)
  on_disk = _read(os.path.join(workdir, 'results.json'))
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk['task'] == task and on_disk['steps'] == 6
  assert on_disk['attention']['kind'] == 'full'
  assert on_disk['best_step'] in (3, 6)
  test = on_disk['metrics']['test']
  assert 0.0 <= test['accuracy'] <= 1.0 and test['loss'] > 0
  config = smoke_config(task)
  if 'confusion_matrix' in test:  # classification metrics
    for key in ('precision_macro', 'recall_macro', 'f1_macro'):
      assert 0.0 <= test[key] <= 1.0
    cm = test['confusion_matrix']
    task_ = tasks.get(config.task, config.data_dir)
    assert len(cm) == task_.num_classes
    assert sum(map(sum, cm)) == len(task_.source('test'))
  else:                           # per-position metrics
    assert test['num_positions'] > 0
  compute = on_disk['compute']
  assert compute['params'] > 1000
  assert compute['train_step_flops'] > 0
  assert compute['train_step_peak_bytes'] > 0
  assert compute['train_steps_per_sec'] > 0
  assert compute['eval_examples_per_sec'] > 0
  assert _read(os.path.join(workdir, 'config.json'))['task']['name'] == task
  # The code that made it: this checkout's commit (None outside git).
  assert on_disk['code'] == provenance.code_version()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert any('train/loss' in r for r in records)
  assert any('validation/accuracy' in r for r in records)
  events = os.listdir(os.path.join(workdir, 'tensorboard'))
  assert any(name.startswith('events.out.tfevents') for name in events)


def test_interrupted_run_matches_uninterrupted(smoke_config, tmp_path):
  config = smoke_config(train__num_steps=8, train__eval_every=2,
                        model__dropout=0.1)
  straight = trainer.train_and_evaluate(config, str(tmp_path / 'a'))
  resumed_dir = str(tmp_path / 'b')
  assert trainer.train_and_evaluate(
      config, resumed_dir, max_steps_this_run=3) is None
  assert not os.path.exists(os.path.join(resumed_dir, 'results.json'))
  resumed = trainer.train_and_evaluate(config, resumed_dir)
  assert resumed['metrics'] == straight['metrics']
  assert resumed['best_step'] == straight['best_step']


def test_nan_stops_and_keeps_last_good_checkpoint(smoke_config, tmp_path,
                                                  monkeypatch):
  workdir = str(tmp_path / 'run')
  config = smoke_config()
  trainer.train_and_evaluate(config, workdir, max_steps_this_run=3)
  good = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  original = classify.Head.loss
  monkeypatch.setattr(classify.Head, 'loss', lambda self, logits, batch: tuple(
      x * jnp.nan for x in original(self, logits, batch)))
  with pytest.raises(FloatingPointError, match='at step 4'):
    trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == good


def test_evaluate_mode_rewrites_results(smoke_config, tmp_path):
  workdir = str(tmp_path / 'run')
  first = trainer.train_and_evaluate(smoke_config(), workdir)
  os.remove(os.path.join(workdir, 'results.json'))
  again = trainer.evaluate_run(workdir)
  assert again['metrics'] == first['metrics']
  assert _read(os.path.join(workdir, 'results.json'))['best_step'] == (
      first['best_step'])
  with pytest.raises(ValueError, match='has no config.json'):
    trainer.evaluate_run(str(tmp_path / 'nothing'))


def test_train_keys_redraw_the_attention_key_every_r_steps():
  """R = 1: both keys split from fold_in(base, step), new every step. R = 3:
  the attention key is that of steps 0, 3, 6, ...; dropout still changes
  every step."""
  base = jax.random.key(7)
  data = lambda k: np.asarray(jax.random.key_data(k))
  for s in range(4):
    want = jax.random.split(jax.random.fold_in(base, s))
    got = step_lib.train_keys(base, s)
    np.testing.assert_array_equal(data(got[0]), data(want[0]))
    np.testing.assert_array_equal(data(got[1]), data(want[1]))
  att = [data(step_lib.train_keys(base, s, 3)[0]) for s in range(7)]
  drop = [data(step_lib.train_keys(base, s, 3)[1]) for s in range(7)]
  for s in range(7):
    np.testing.assert_array_equal(att[s], att[s - s % 3])
    np.testing.assert_array_equal(drop[s], data(step_lib.train_keys(base, s)[1]))
  assert not np.array_equal(att[0], att[3]) and not np.array_equal(att[3], att[6])
  assert len({d.tobytes() for d in drop}) == 7
