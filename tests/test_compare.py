"""The comparison sweep (evaluate/compare.py), its tables and plots.

Tables are checked against hand-made results.json and efficiency files whose
means, sample standard deviations (ddof=1) and ratios are known; one tiny
real sweep runs end to end and is rerun to check that it resumes.
"""
import json
import logging
import os

import pytest

from configs import compare as compare_config
from evaluate import compare
from evaluate import plots
from evaluate import tables

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _write(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(content if isinstance(content, str) else json.dumps(content))


def _results(task, kind, seed, accuracy):
  return {'task': task, 'attention': {'kind': kind}, 'seed': seed,
          'metrics': {'test': {'accuracy': accuracy}}}


def _run_path(sweep, task, kind, seed):
  return os.path.join(sweep, 'runs', task, kind, f'seed{seed}',
                      'results.json')


# Test accuracies: full has 3 seeds on both tasks, local 2 seeds on listops
# and 3 on mqar, lsh only listops.
ACCURACIES = {
    ('listops', 'full'): [0.30, 0.40, 0.50],  # 40.00 ± 10.00 (ddof=1)
    ('mqar', 'full'): [0.90, 0.90, 0.90],     # 90.00 ± 0.00
    ('listops', 'local'): [0.20, 0.30],       # 25.00 ± 7.07
    ('mqar', 'local'): [0.50, 0.60, 0.70],    # 60.00 ± 10.00
    ('listops', 'lsh'): [0.10],               # 10.00, no std from one seed
}


@pytest.fixture
def sweep(tmp_path):
  """A sweep dir of hand-made results.json, one corrupt and one partial."""
  root = str(tmp_path / 'sweep')
  for (task, kind), accs in ACCURACIES.items():
    for seed, acc in enumerate(accs):
      _write(_run_path(root, task, kind, seed),
             _results(task, kind, seed, acc))
  _write(_run_path(root, 'listops', 'full', 7), '{"task": "listops", "met')
  partial = _results('listops', 'full', 8, 0.99)
  del partial['metrics']['test']['accuracy']
  _write(_run_path(root, 'listops', 'full', 8), partial)
  return root


def test_accuracy_table_means_stds_average_and_seed_counts(sweep):
  out = tables.write_all(sweep, kinds=['full', 'local', 'lsh'],
                         tasks=['listops', 'mqar'])['accuracy']
  cells = out['cells']
  assert cells['full']['listops']['mean'] == pytest.approx(40.0)
  assert cells['full']['listops']['std'] == pytest.approx(10.0)  # ddof=1
  assert cells['full']['listops']['n'] == 3
  assert cells['local']['listops']['std'] == pytest.approx(50 ** 0.5)
  assert cells['lsh']['listops']['std'] is None
  # Same seeds on every task: ± is over per-seed averages (60, 65, 70).
  assert out['average']['full'] == pytest.approx(
      {'mean': 65.0, 'std': 5.0, 'n': 3})
  # Different seeds per task: mean of task means, no std.
  assert out['average']['local'] == {'mean': 42.5, 'std': None, 'n': None}
  assert out['average']['lsh'] is None  # mqar missing: never averaged
  md = open(os.path.join(sweep, 'tables', 'accuracy.md')).read()
  assert '| Model | listops | mqar | Avg |' in md
  assert ('| full | 40.00 ± 10.00 (n=3) | 90.00 ± 0.00 (n=3) | '
          '65.00 ± 5.00 (n=3) |') in md
  assert '| local | 25.00 ± 7.07 (n=2) | 60.00 ± 10.00 (n=3) | 42.50 |' in md
  assert '| lsh | 10.00 (n=1) | – | – |' in md
  assert 'sample standard deviation (ddof=1)' in md
  tex = open(os.path.join(sweep, 'tables', 'accuracy.tex')).read()
  assert r'40.00 $\pm$ 10.00 (n=3)' in tex and r'(\%)' in tex
  csv_lines = open(os.path.join(sweep, 'tables', 'accuracy.csv')).read()
  assert csv_lines.splitlines()[0].startswith(
      'model,listops_mean,listops_std,listops_n,mqar_mean')
  assert csv_lines.splitlines()[3].startswith('lsh,10.0,,1,,,,')
  on_disk = json.load(open(os.path.join(sweep, 'tables', 'accuracy.json')))
  assert on_disk['table']['rows'][0][0] == 'full'
  assert on_disk['cells']['full']['listops']['seeds'] == [0, 1, 2]


def test_equal_seed_counts_are_stated_once(tmp_path):
  root = str(tmp_path)
  for seed, acc in enumerate([0.5, 0.7]):
    _write(_run_path(root, 'mqar', 'full', seed),
           _results('mqar', 'full', seed, acc))
  tables.write_all(root)
  md = open(os.path.join(root, 'tables', 'accuracy.md')).read()
  assert 'over n = 2 seeds' in md
  assert '| full | 60.00 ± 14.14 | 60.00 ± 14.14 |' in md  # no (n=...)


def test_corrupt_and_partial_results_are_reported_and_skipped(sweep, caplog):
  with caplog.at_level(logging.WARNING):
    out = tables.write_all(sweep)['accuracy']
  corrupt = _run_path(sweep, 'listops', 'full', 7)
  partial = _run_path(sweep, 'listops', 'full', 8)
  skipped = {s['path']: s['reason'] for s in out['skipped']}
  assert set(skipped) == {corrupt, partial}
  assert 'invalid JSON' in skipped[corrupt]
  assert 'metrics.test.accuracy' in skipped[partial]
  assert corrupt in caplog.text and partial in caplog.text
  # Not averaged: still the three good seeds.
  assert out['cells']['full']['listops']['n'] == 3
  assert out['cells']['full']['listops']['mean'] == pytest.approx(40.0)
  on_disk = json.load(open(os.path.join(sweep, 'tables', 'accuracy.json')))
  assert {s['path'] for s in on_disk['skipped']} == {corrupt, partial}


def _cell(kind, n, steps_per_sec=None, memory=None, error=None):
  cell = {'kind': kind, 'seq_len': n, 'batch_size': 32, 'device': 'cpu:cpu'}
  if error:
    return dict(cell, status='failed', error=error)
  return dict(cell, status='ok', steps_per_sec=steps_per_sec,
              memory_bytes=memory)


@pytest.fixture
def efficiency_sweep(tmp_path):
  root = str(tmp_path / 'sweep')
  oom = 'XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory'
  for cell in (_cell('full', 1024, 8.0, 1.0e9), _cell('full', 2048, 4.0, 3e9),
               _cell('full', 4096, error=oom),
               _cell('local', 1024, 9.6, 0.5e9), _cell('local', 2048, 8.0, 1e9),
               _cell('local', 4096, 7.0, 2e9)):
    _write(compare.efficiency_path(root, cell['kind'], cell['seq_len']), cell)
  _write(compare.efficiency_path(root, 'lsh', 1024), '[not json')
  return root


def test_efficiency_table_ratios_to_full(efficiency_sweep):
  out = tables.write_all(efficiency_sweep)['efficiency']
  local = out['cells']['local']
  assert local['1024']['speed_ratio'] == pytest.approx(1.2)
  assert local['2048']['speed_ratio'] == pytest.approx(2.0)
  assert local['2048']['memory_ratio'] == pytest.approx(1 / 3)
  assert local['4096']['speed_ratio'] is None  # full ran out of memory
  assert [s['path'] for s in out['skipped']] == [
      compare.efficiency_path(efficiency_sweep, 'lsh', 1024)]
  md = open(os.path.join(efficiency_sweep, 'tables', 'efficiency.md')).read()
  assert ('| Model | steps/s 1K | steps/s 2K | steps/s 4K | memory 1K (GB) | '
          'memory 2K (GB) | memory 4K (GB) |') in md
  assert ('| full | 8.00 (1.00x) | 4.00 (1.00x) | OOM | 1.00 (1.00x) | '
          '3.00 (1.00x) | OOM |') in md
  assert ('| local | 9.60 (1.20x) | 8.00 (2.00x) | 7.00 | 0.500 (0.50x) | '
          '1.00 (0.33x) | 2.00 |') in md
  csv_rows = open(os.path.join(efficiency_sweep, 'tables',
                               'efficiency.csv')).read().splitlines()
  header = csv_rows[0].split(',')
  local_row = dict(zip(header, csv_rows[2].split(',')))
  assert float(local_row['speed_ratio_2048']) == pytest.approx(2.0)
  tex = open(os.path.join(efficiency_sweep, 'tables', 'efficiency.tex')).read()
  assert r'\toprule' in tex and '9.60 (1.20x)' in tex


def test_plots_are_png_files(sweep, efficiency_sweep, tmp_path):
  acc = tables.write_all(sweep)['accuracy']
  eff = tables.write_all(efficiency_sweep)['efficiency']
  written = plots.write_all(acc, eff, str(tmp_path / 'plots'))
  assert [os.path.basename(p) for p in written] == [
      'accuracy_speed.png', 'scaling.png']
  for path in written:
    with open(path, 'rb') as f:
      assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 1000
  # Longest length that both variants with an average measured: 2K.
  assert plots.plot_length(acc, eff) == 2048


def _smoke(data_dir, **fields):
  config = compare_config.get_config('smoke')
  config.update({'tasks': 'listops:smoke', 'seeds': '0',
                 'data_dir': data_dir, **fields})
  config.efficiency.lengths = '32'
  return config


def test_smoke_sweep_end_to_end_then_resume_skips(data_dir, tmp_path,
                                                  monkeypatch):
  config = _smoke(data_dir)
  kinds = compare.kinds_of(config)
  assert len(kinds) == 2 and kinds[0] == 'full'
  monkeypatch.chdir(tmp_path)
  workdir = 'sweep'  # relative, as users give it
  first = compare.run(config, workdir)
  done = [_run_path(workdir, 'listops', k, 0) for k in kinds]
  cells = [compare.efficiency_path(workdir, k, 32) for k in kinds]
  for path in done + cells:
    assert os.path.exists(path), path
  for name in ('accuracy', 'efficiency'):
    for ext in ('md', 'csv', 'tex', 'json'):
      assert os.path.getsize(os.path.join(workdir, 'tables',
                                          f'{name}.{ext}')) > 0
  for name in ('accuracy_speed.png', 'scaling.png'):
    with open(os.path.join(workdir, 'plots', name), 'rb') as f:
      assert f.read(8) == PNG_MAGIC
  acc = first['accuracy']
  assert acc['kinds'] == kinds and acc['tasks'] == ['listops']
  assert all(acc['cells'][k]['listops']['n'] == 1 for k in kinds)
  assert acc['skipped'] == [] and acc['failed'] == {}
  assert first['efficiency']['cells']['full']['32']['speed_ratio'] == 1.0

  mtimes = {p: os.stat(p).st_mtime_ns for p in done + cells}
  calls = []
  monkeypatch.setattr(compare.trainer, 'train_and_evaluate',
                      lambda *a, **k: calls.append(a))
  monkeypatch.setattr(compare, 'measure', lambda *a, **k: calls.append(a))
  again = compare.run(config, workdir)
  assert calls == []
  assert {p: os.stat(p).st_mtime_ns for p in done + cells} == mtimes
  assert again['accuracy']['cells'] == acc['cells']


def _fake_training(fail=(), stop=()):
  """train_and_evaluate stand-in: results.json with accuracy 0.5, a
  RuntimeError for runs named in `fail`, Preempted (SIGTERM) for `stop`."""
  calls = []

  def train(config, workdir):
    name = f'{config.attention.kind}/seed{config.seed}'
    calls.append(name)
    if name in fail:
      raise RuntimeError('boom')
    if name in stop:
      raise compare.trainer.Preempted(workdir, 3)
    results = _results(config.task.name, config.attention.kind, config.seed,
                       0.5)
    _write(os.path.join(workdir, 'results.json'), results)
    return results
  return train, calls


def test_failed_run_is_recorded_and_the_sweep_goes_on(data_dir, tmp_path,
                                                      monkeypatch):
  config = _smoke(data_dir, seeds='0,1')
  config.efficiency.lengths = ''
  workdir = str(tmp_path / 'sweep')
  train, calls = _fake_training(fail={'local/seed0'})
  monkeypatch.setattr(compare.trainer, 'train_and_evaluate', train)
  out = compare.run(config, workdir)['accuracy']
  assert len(calls) == 4
  failures = json.load(open(os.path.join(workdir, compare.FAILURES)))
  assert list(failures) == ['runs/listops/local/seed0']
  assert failures['runs/listops/local/seed0']['error'] == 'RuntimeError: boom'
  assert list(out['failed']) == ['runs/listops/local/seed0']
  assert out['cells']['local']['listops']['n'] == 1
  # Rerun: only the failed run trains again; its success clears the record.
  train, calls = _fake_training()
  monkeypatch.setattr(compare.trainer, 'train_and_evaluate', train)
  out = compare.run(config, workdir)['accuracy']
  assert calls == ['local/seed0']
  assert json.load(open(os.path.join(workdir, compare.FAILURES))) == {}
  assert out['cells']['local']['listops']['n'] == 2


def test_sigterm_stops_the_sweep(data_dir, tmp_path, monkeypatch):
  config = _smoke(data_dir, seeds='0,1')
  train, calls = _fake_training(stop={'full/seed0'})
  monkeypatch.setattr(compare.trainer, 'train_and_evaluate', train)
  with pytest.raises(compare.trainer.Preempted):
    compare.run(config, str(tmp_path / 'sweep'))
  assert calls == ['full/seed0']
  assert not os.path.exists(os.path.join(tmp_path, 'sweep', compare.FAILURES))


def test_failed_efficiency_cell_is_recorded_and_retried(data_dir, tmp_path,
                                                        monkeypatch):
  config = _smoke(data_dir)
  config.efficiency.lengths = '32,64'
  workdir = str(tmp_path / 'sweep')
  monkeypatch.setattr(compare.trainer, 'train_and_evaluate',
                      _fake_training()[0])
  calls = []

  def measure(model_cfg, spec, seq_len, **kwargs):
    calls.append((spec['kind'], seq_len))
    if (spec['kind'], seq_len) == ('local', 64):
      raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory')
    return {'status': 'ok', 'steps_per_sec': 10.0, 'memory_bytes': 1e6}

  monkeypatch.setattr(compare, 'measure', measure)
  out = compare.run(config, workdir)
  assert len(calls) == 4
  assert out['efficiency']['cells']['local']['64']['status'] == 'failed'
  md = open(os.path.join(workdir, 'tables', 'efficiency.md')).read()
  assert '| local | 10.0 (1.00x) | OOM |' in md
  calls.clear()
  compare.run(config, workdir)
  assert calls == [('local', 64)]


@pytest.mark.parametrize('preset', ['smoke', 'cpu', 'lra', 'pathx'])
def test_presets_plan_valid_runs(preset, tmp_path):
  config = compare_config.get_config(preset)
  runs = compare.plan(config, str(tmp_path))  # checks every run's config
  kinds, seeds = compare.kinds_of(config), compare.seeds_of(config)
  assert len(runs) == len(kinds) * len(compare.tasks_of(config)) * len(seeds)
  assert len({r.workdir for r in runs}) == len(runs)
  assert compare.lengths_of(config)
  if preset != 'smoke':
    import attention_variants as av
    import tasks
    assert set(kinds) == set(av.KINDS)
    planned = {t for t, _ in compare.tasks_of(config)}
    lra = set(tasks.NAMES) - set(compare_config.NOT_LRA)
    assert planned == {'lra': lra, 'pathx': {'pathx'},
                       'cpu': {'listops', 'mqar', 'copy'}}[preset]


@pytest.mark.parametrize('field, value, expected', [
    ('kinds', 'full,nope', r'unknown attention kind\(s\) nope; valid kinds:'),
    ('kinds', ' , ', 'kinds is empty'),
    ('tasks', 'nope:cpu', "unknown task 'nope'; valid tasks:"),
    ('tasks', 'listops:nope', "listops:nope: unknown preset 'nope'"),
    ('seeds', '0,x', 'seeds='),
])
def test_bad_sweep_fields_are_one_clear_error(field, value, expected,
                                              tmp_path):
  config = compare_config.get_config('smoke')
  config[field] = value
  with pytest.raises(ValueError, match=expected):
    compare.run(config, str(tmp_path))


def test_overrides_apply_in_order_and_bad_paths_are_named(tmp_path):
  config = compare_config.get_config('smoke')
  config.overrides.train = {'num_steps': 9}
  config.task_overrides.listops = {'train': {'num_steps': 8}}
  config.kind_overrides.local = {'model': {'dim': 16}}
  runs = {r.name: r.config for r in compare.plan(config, str(tmp_path))}
  assert runs['listops/full/seed0'].train.num_steps == 8
  assert runs['mqar/full/seed0'].train.num_steps == 9
  assert runs['listops/local/seed0'].model.dim == 16
  assert runs['listops/full/seed0'].model.dim == 32
  assert runs['listops/local/seed0'].attention.local.window == 8
  config.overrides.model = {'widht': 3}
  with pytest.raises(ValueError, match=r"overrides: 'model.widht' is not"):
    compare.plan(config, str(tmp_path))


def test_a_cell_that_would_not_fit_is_reported_not_run(tmp_path,
                                                       monkeypatch):
  # The compiled step's own memory analysis against what the device has.
  monkeypatch.setattr(compare.profile, 'available_bytes', lambda: 1000)
  model = compare_config.get_config('smoke').efficiency.model
  cell = compare.measure(model, compare.attention_spec(
      compare_config.get_config('smoke'), 'full'), 32, batch_size=2,
      steps=1, warmup_steps=1, vocab_size=16, num_classes=2)
  assert cell['status'] == 'does not fit'
  assert cell['memory_bytes'] > 1000 and 'steps_per_sec' not in cell
  root = str(tmp_path / 'sweep')
  _write(compare.efficiency_path(root, 'full', 32),
         dict(cell, kind='full', seq_len=32, batch_size=2, device='cpu:cpu'))
  md = tables.write_all(root)['efficiency']
  text = open(os.path.join(root, 'tables', 'efficiency.md')).read()
  assert md['cells']['full']['32']['status'] == 'does not fit'
  assert '| full | does not fit (' in text
