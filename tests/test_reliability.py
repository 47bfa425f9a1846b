"""Failure paths of a run: relative paths, corrupt checkpoints, failed
starts, out of memory, truthful records across restarts, SIGTERM.

Subprocess tests run `main.py` from the repository root exactly as a user
would and check the one `error:` line (and that no traceback is printed);
the rest call the trainer in-process on the smoke preset.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import pytest

from train import checkpoint as ckpt_lib
import tasks
from tasks.heads import classify
from train import trainer
from train import writer as writer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('train/steps_per_sec', 'validation/examples_per_sec')


def main_py(*args, timeout=300):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def relative(path) -> str:
  """path relative to the repository root (where main.py runs)."""
  return os.path.relpath(str(path), ROOT)


def one_error_line(proc, expected: str):
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and expected in last, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  return last


def read(path):
  with open(path) as f:
    return json.load(f)


def records(workdir):
  """metrics.jsonl without the timing fields (which no two runs share)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in f]


def snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data_dir):
  """A finished smoke run (checkpoints at 3 and 6) to copy from."""
  config = tasks.get_config('listops', 'smoke')
  config.data_dir = data_dir
  workdir = str(tmp_path_factory.mktemp('finished') / 'run')
  results = trainer.train_and_evaluate(config, workdir)
  return workdir, results, config


def copy_run(finished, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished[0], workdir)
  return workdir


# -- relative paths ------------------------------------------------------------


def test_relative_workdir_and_data_dir_train_resume_and_evaluate(tmp_path):
  workdir = relative(tmp_path / 'run')
  data = relative(tmp_path / 'data')
  args = ['--config=configs/listops.py:smoke', f'--workdir={workdir}',
          f'--config.data_dir={data}']
  first = main_py(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'results in {workdir}/results.json' in first.stderr
  results_path = tmp_path / 'run' / 'results.json'
  results = read(results_path)
  before = snapshot(tmp_path / 'run')
  again = main_py(*args)  # a finished run: nothing trains, nothing changes
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'finished at step 6 already' in again.stderr
  assert snapshot(tmp_path / 'run') == before
  evaluated = main_py('--mode=evaluate', f'--workdir={workdir}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert read(results_path)['metrics'] == results['metrics']
  assert read(results_path)['wall_time_s'] >= results['compute'][
      'train_seconds']


# -- corrupt checkpoints -------------------------------------------------------


def _data_files(step_dir):
  return [p for p in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                               recursive=True) if os.path.isfile(p)]


def _truncate(step_dir):
  for p in _data_files(step_dir):
    with open(p, 'r+b') as f:
      f.truncate(os.path.getsize(p) // 2)


def _remove_process_dir(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'state', 'ocdbt.process_0'))


def _remove_manifests(step_dir):
  for p in glob.glob(os.path.join(step_dir, 'state', '**', 'manifest.ocdbt'),
                     recursive=True):
    os.remove(p)


def _garbage_metadata(step_dir):
  for name in ('_CHECKPOINT_METADATA', 'state/_METADATA', 'meta/metadata'):
    with open(os.path.join(step_dir, name), 'wb') as f:
      f.write(b'\x00garbage{')


def _flip_one_byte(step_dir):
  """Silent corruption: the file still decodes, one value changes."""
  path = max(_data_files(step_dir), key=os.path.getsize)
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  data[len(data) // 2] ^= 0x01
  with open(path, 'wb') as f:
    f.write(bytes(data))


CORRUPTIONS = {'truncated data': _truncate,
               'no ocdbt.process_0': _remove_process_dir,
               'no manifest.ocdbt': _remove_manifests,
               'garbage metadata': _garbage_metadata,
               'one flipped byte': _flip_one_byte}


@pytest.mark.parametrize('corrupt', CORRUPTIONS.values(), ids=CORRUPTIONS)
def test_corrupt_latest_falls_back_to_the_previous_one(finished, tmp_path,
                                                       corrupt, caplog):
  workdir = copy_run(finished, tmp_path)
  os.remove(os.path.join(workdir, 'results.json'))
  corrupt(os.path.join(workdir, 'checkpoints', '6'))
  with caplog.at_level('WARNING'):
    results = trainer.train_and_evaluate(finished[2], workdir)
  warnings = [r.getMessage() for r in caplog.records
              if 'is corrupt' in r.getMessage()]
  assert len(warnings) == 1 and 'checkpoints/6 is corrupt' in warnings[0]
  moved = os.path.join(workdir, 'corrupt', 'checkpoints.6')
  assert os.path.isdir(moved) and moved in warnings[0]
  # Retrained from step 3: the same results as the run that never broke.
  assert results['metrics'] == finished[1]['metrics']
  assert records(workdir) == records(finished[0])


def test_a_save_keeps_the_meta_as_it_was_when_saved(tmp_path):
  """Orbax writes a checkpoint's JSON in the background: the trainer goes on
  changing its own dicts (the loss window) meanwhile, and the checkpoint
  must hold them as they were at the save (the race that once made a
  resumed run log a different step-4 loss)."""
  from flax import nnx
  state = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  for trial in range(5):
    window = {'loss_sum': 1.5, 'steps': 1}
    ckpts.save_latest(trial, state, {'step': trial, 'log_window': window})
    window['loss_sum'] += 100.0
    window['steps'] += 1
    ckpts.wait()
    _, meta = ckpts.latest.restore(state, trial)
    assert meta['log_window'] == {'loss_sum': 1.5, 'steps': 1}, trial
  ckpts.close()


@pytest.mark.parametrize('at_6, at_3', [
    ('truncated data', 'no ocdbt.process_0'),
    ('no manifest.ocdbt', 'garbage metadata')])
def test_no_checkpoint_restores_is_one_error_then_a_fresh_start(
    finished, tmp_path, at_6, at_3):
  """Every kind of damage, in a real process: one warning per checkpoint,
  one error line, no traceback; the same command then starts afresh."""
  workdir = copy_run(finished, tmp_path)
  os.remove(os.path.join(workdir, 'results.json'))
  CORRUPTIONS[at_6](os.path.join(workdir, 'checkpoints', '6'))
  CORRUPTIONS[at_3](os.path.join(workdir, 'checkpoints', '3'))
  args = ['--config=configs/listops.py:smoke', f'--workdir={workdir}',
          f'--config.data_dir={finished[2].data_dir}']
  proc = main_py(*args)
  one_error_line(proc, 'no checkpoint in')
  assert proc.stderr.count('is corrupt') == 2
  assert sorted(os.listdir(os.path.join(workdir, 'corrupt'))) == [
      'checkpoints.3', 'checkpoints.6']
  if at_6 == 'truncated data':
    rerun = main_py(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 'Traceback' not in rerun.stderr
    assert read(os.path.join(workdir, 'results.json'))['metrics'] == (
        finished[1]['metrics'])


def test_corrupt_best_uses_the_latest_copy_of_the_same_step(finished,
                                                            tmp_path):
  workdir = copy_run(finished, tmp_path)
  os.remove(os.path.join(workdir, 'results.json'))
  best_step = finished[1]['best_step']
  _flip_one_byte(os.path.join(workdir, 'best', str(best_step)))
  results = trainer.train_and_evaluate(finished[2], workdir)
  assert results['metrics'] == finished[1]['metrics']
  assert os.path.isdir(os.path.join(workdir, 'corrupt', f'best.{best_step}'))


def test_digest_names_the_array_that_differs():
  tree = {'a': jax.numpy.zeros(3), 'b': {'c': jax.numpy.ones((2, 2))}}
  saved = ckpt_lib.digest(tree)
  assert ckpt_lib.digest_mismatch(tree, saved) is None
  changed = {'a': tree['a'], 'b': {'c': tree['b']['c'].at[0, 1].set(2.0)}}
  assert "['b']['c']" in ckpt_lib.digest_mismatch(changed, saved)


# -- failed starts pin nothing --------------------------------------------------


def test_failed_start_does_not_pin_the_workdir(smoke_config, tmp_path):
  workdir = str(tmp_path / 'run')
  bad = smoke_config(attention__implementation='cudnn')
  with pytest.raises(ValueError, match='cudnn'):
    trainer.train_and_evaluate(bad, workdir)
  assert trainer.train_and_evaluate(smoke_config(), workdir) is not None
  assert read(os.path.join(workdir, 'config.json'))['attention'][
      'implementation'] == 'auto'


def test_nan_before_the_first_checkpoint_pins_nothing(smoke_config, tmp_path,
                                                      monkeypatch):
  workdir = str(tmp_path / 'run')
  original = classify.Head.loss
  monkeypatch.setattr(classify.Head, 'loss', lambda self, logits, batch: tuple(
      x * jax.numpy.nan for x in original(self, logits, batch)))
  with pytest.raises(FloatingPointError, match='no checkpoint was written, '
                     'so this --workdir can be reused'):
    trainer.train_and_evaluate(smoke_config(train__learning_rate=1.0),
                               workdir)
  monkeypatch.setattr(classify.Head, 'loss', original)
  # The advised fix (a lower learning rate) is accepted in the same workdir,
  # and the records of the failed attempt are gone.
  trainer.train_and_evaluate(smoke_config(), workdir)
  assert records(workdir) == records(_fresh_run(smoke_config, tmp_path))


def _fresh_run(smoke_config, tmp_path, **overrides):
  workdir = str(tmp_path / 'fresh')
  trainer.train_and_evaluate(smoke_config(**overrides), workdir)
  return workdir


def test_a_checkpointed_run_still_refuses_another_config(smoke_config,
                                                         tmp_path):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(smoke_config(), workdir, max_steps_this_run=3)
  before = snapshot(workdir)
  for field, value, shown in (
      ('model__dim', 48, 'model.dim: 32 -> 48'),
      ('train__learning_rate', 0.5, 'train.learning_rate: 0.001 -> 0.5'),
      ('train__num_steps', 12, 'train.num_steps: 6 -> 12')):
    with pytest.raises(ValueError, match=rf'different config \({shown}'):
      trainer.train_and_evaluate(smoke_config(**{field: value}), workdir)
  assert snapshot(workdir) == before
  # Run-control fields may change (model.remat: the checkpoint of the
  # Python loop of blocks resumes in their scan).
  assert trainer.train_and_evaluate(
      smoke_config(train__log_every=3, train__eval_batch_size=8,
                   model__remat='block'),
      workdir) is not None


# -- one error line for each of these ------------------------------------------


def _cli(tmp_path, *extra, data=None):
  return main_py('--config=configs/listops.py:smoke',
                 f'--workdir={tmp_path / "w"}',
                 f'--config.data_dir={data or tmp_path / "data"}', *extra)


def test_data_dir_that_is_a_file(tmp_path):
  (tmp_path / 'data').write_text('keep me')
  one_error_line(_cli(tmp_path), 'data_dir=')
  assert (tmp_path / 'data').read_text() == 'keep me'


def test_data_dir_under_proc(tmp_path):
  one_error_line(_cli(tmp_path, data='/proc/nope/data'),
                 'data_dir=/proc/nope/data is not writable')


def test_config_file_with_a_syntax_error(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(arg=None):\n  return dict(\n')
  proc = main_py(f'--config={bad}', f'--workdir={tmp_path / "w"}')
  one_error_line(proc, f'{bad} line 2')


@pytest.mark.parametrize('content', [b'\x89\xff\x00binary', b'{"seed": 0, "ta',
                                     b'42', b'[]'],
                         ids=['binary', 'truncated', 'number', 'list'])
def test_bad_config_json(tmp_path, content):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  (workdir / 'config.json').write_bytes(content)
  one_error_line(main_py('--mode=evaluate', f'--workdir={workdir}'),
                 f'{workdir}/config.json is ')
  if content == b'[]':  # beside checkpoints it refuses a training run too
    (workdir / 'checkpoints' / '3').mkdir(parents=True)
    one_error_line(_cli(tmp_path), f'{workdir}/config.json is a JSON list')
  assert (workdir / 'config.json').read_bytes() == content


@pytest.mark.parametrize('content', [b'garbage', b'[1, 2]'],
                         ids=['garbage', 'list'])
def test_bad_results_json_in_evaluate_mode(smoke_config, tmp_path, content):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  writer_lib.write_json_atomic(str(workdir / 'config.json'),
                               smoke_config().to_dict())
  (workdir / 'results.json').write_bytes(content)
  one_error_line(main_py('--mode=evaluate', f'--workdir={workdir}'),
                 f'{workdir}/results.json is ')
  assert (workdir / 'results.json').read_bytes() == content


@pytest.mark.parametrize('args, expected', [
    (['--config.seed=-1'], 'seed=-1 must be >= 0'),
    (['stray'], "unexpected argument(s) 'stray'"),
    (['--max_steps_this_run=0'], '--max_steps_this_run=0 must be >= 1'),
])
def test_cli_one_line_errors(tmp_path, args, expected):
  proc = _cli(tmp_path, *args)
  one_error_line(proc, expected)
  assert 'USAGE' not in proc.stderr and 'flags:' not in proc.stderr


@pytest.mark.parametrize('field, value, expected', [
    ('train__grad_clip', -1.0, 'train.grad_clip=-1.0 must be >= 0'),
    ('train__b1', 1.0, 'train.b1=1.0 must be in [0, 1)'),
    ('train__b2', -0.1, 'train.b2=-0.1 must be in [0, 1)'),
    ('train__eps', -1e-8, 'train.eps=-1e-08 must be >= 0'),
    ('train__weight_decay', -0.1, 'train.weight_decay=-0.1 must be >= 0'),
    ('train__warmup_steps', -1, 'train.warmup_steps=-1 must be >= 0'),
    ('train__grad_accum_steps', 0, 'train.grad_accum_steps=0 must be >= 1'),
    ('train__grad_accum_steps', 3, 'not divisible into'),
    ('train__eval_batch_size', -2, 'train.eval_batch_size=-2 must be >= 0'),
    ('model__num_kv_heads', -2, 'model.num_kv_heads=-2 must be >= 0'),
])
def test_impossible_values_name_the_field(smoke_config, tmp_path, field,
                                          value, expected):
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(smoke_config(**{field: value}),
                               str(tmp_path / 'w'))
  assert expected in str(e.value)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_readme_command_with_fewer_steps_is_valid():
  """The .ci/run form of the README's command: only num_steps lowered, so
  warmup_steps (200) exceeds it; that is allowed (with a warning)."""
  config = tasks.get_config('listops', 'cpu')
  config.train.num_steps = 20
  trainer.check_config(config)


# -- out of memory ---------------------------------------------------------------


def test_step_that_cannot_fit_stops_before_training(finished, tmp_path,
                                                    monkeypatch):
  workdir = copy_run(finished, tmp_path)
  os.remove(os.path.join(workdir, 'results.json'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  before = snapshot(workdir)
  monkeypatch.setattr(trainer.profile, 'available_bytes', lambda: 1000)
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(finished[2], workdir)
  message = str(e.value)
  assert 'needs' in message and '0.00 GB is available' in message
  assert 'train.batch_size' in message
  assert 'train.grad_accum_steps' in message
  assert snapshot(workdir) == before


def test_out_of_memory_while_running_is_one_line(smoke_config, tmp_path,
                                                 monkeypatch):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(smoke_config(), workdir, max_steps_this_run=3)
  before = snapshot(workdir)
  compile_ = trainer.Trainer.compile

  def compile_then_fail(self):
    compile_(self)
    def oom(*args):
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory allocating 27056369576 bytes.')
    self.train_step = oom
  monkeypatch.setattr(trainer.Trainer, 'compile', compile_then_fail)
  with pytest.raises(ValueError, match=r'out of memory while running .*'
                     r'train.batch_size.*Checkpoints kept: 3'):
    trainer.train_and_evaluate(smoke_config(), workdir)
  after = snapshot(workdir)
  assert {k: after.get(k) for k in before} == before  # nothing lost


def test_accumulation_trains_the_same_model(smoke_config, tmp_path):
  plain = trainer.train_and_evaluate(smoke_config(), str(tmp_path / 'a'))
  other = trainer.train_and_evaluate(
      smoke_config(train__grad_accum_steps=4), str(tmp_path / 'b'))
  for split in ('validation', 'test'):
    assert other['metrics'][split]['loss'] == pytest.approx(
        plain['metrics'][split]['loss'], rel=1e-4)


# -- records across restarts ------------------------------------------------------


def test_records_cover_every_segment(smoke_config, tmp_path):
  config = smoke_config(train__num_steps=8, train__eval_every=2,
                        train__checkpoint_every=3, train__log_every=2)
  straight_dir = str(tmp_path / 'a')
  straight = trainer.train_and_evaluate(config, straight_dir)
  workdir = str(tmp_path / 'b')
  for _ in range(2):  # segments of 3 steps: checkpoints at 3 and 6
    assert trainer.train_and_evaluate(config, workdir,
                                      max_steps_this_run=3) is None
  # An attempt killed after step 8's records, before its checkpoint, the
  # last line torn: what it wrote past step 6 must go.
  with open(os.path.join(straight_dir, 'metrics.jsonl')) as f:
    later = [line for line in f if json.loads(line)['step'] > 6]
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.writelines(later)
    f.write('{"step": 8, "train/lo')
  resumed = trainer.train_and_evaluate(config, workdir)
  assert resumed['metrics'] == straight['metrics']
  assert records(workdir) == records(straight_dir)
  compute = resumed['compute']
  assert compute['train_seconds'] > 0
  assert compute['train_steps_per_sec'] == pytest.approx(
      8 / compute['train_seconds'])
  assert resumed['wall_time_s'] > compute['train_seconds']


def test_stale_incomplete_data_folders_are_removed(smoke_config, tmp_path):
  config = smoke_config()
  config.data_dir = str(tmp_path / 'data')
  task = tasks.get(config.task, config.data_dir)
  version_dir = task.sources.builder().data_dir
  parent, version = os.path.split(str(version_dir))
  stale = os.path.join(parent, f'incomplete.ABC123_{version}')
  os.makedirs(os.path.join(stale, 'shards'))
  task.source('train')
  assert not os.path.exists(stale)
  assert os.path.isdir(str(version_dir))


# -- SIGTERM ----------------------------------------------------------------------


def test_sigterm_saves_and_exits_143(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  args = [sys.executable, 'main.py', '--config=configs/listops.py:smoke',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          '--config.train.num_steps=100000', '--config.train.log_every=1',
          '--config.train.checkpoint_every=100000',
          '--config.train.eval_every=100000']
  proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    for line in proc.stderr:
      if '| loss ' in line:
        break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 143, err[-3000:]
  assert 'preempted' in err and 'rerun the same command' in err
  assert 'Traceback' not in err
  assert os.listdir(workdir / 'checkpoints')
