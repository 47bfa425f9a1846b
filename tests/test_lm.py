"""The `lm` task and head: real Python sources split by document, windows
that predict every byte once, TFDS's lm1b (a tiny one prepared here with
TFDS's own builder class), and metrics in bits per byte."""
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tasks
from tasks import lm, text
from tasks.heads import lm as lm_head
from train import trainer


def _config(**overrides):
  c = tasks.get_config('lm', 'smoke').task
  c.update(overrides)
  return c


@pytest.fixture(scope='module')
def sources_dir(tmp_path_factory):
  """A few real standard-library files, and files the corpus must skip."""
  root = tmp_path_factory.mktemp('stdlib')
  for name in ('json', 'email', 'concurrent'):
    shutil.copytree(os.path.join(lm.stdlib_dir(), name), root / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  for skipped in ('test', 'site-packages', 'email/tests',
                  'config-3.11-x86_64-linux-gnu'):
    os.makedirs(root / skipped, exist_ok=True)
    (root / skipped / 'skipped.py').write_text('never read\n')
  (root / 'notes.txt').write_text('not a .py file\n')
  return str(root)


def test_documents_skip_tests_packages_and_builds(sources_dir):
  paths = lm.documents(sources_dir)
  assert paths == sorted(paths) and len(paths) > 30
  assert 'json/decoder.py' in paths and 'email/parser.py' in paths
  assert not [p for p in paths if 'skipped' in p or not p.endswith('.py')]


def test_windows_predict_every_token_once():
  stream = np.arange(1, 12)
  got = list(lm.windows(stream, 4))
  assert [w.tolist() for w in got] == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9],
                                       [9, 10, 11]]
  targets = np.concatenate([w[1:] for w in got])
  np.testing.assert_array_equal(targets, stream[1:])
  example = lm.lm_example(lm.lm_record(np.array([lm.DOC_ID, 5, 6])), 4)
  np.testing.assert_array_equal(example['inputs'], [lm.DOC_ID, 5, 0, 0])
  np.testing.assert_array_equal(example['targets'], [5, 6, 0, 0])
  np.testing.assert_array_equal(example['weights'], [1, 1, 0, 0])
  assert example['length'] == 2
  # A DOC target (the next document starts) is not a byte: not scored.
  example = lm.lm_example(lm.lm_record(np.array([5, lm.DOC_ID, 6])), 2)
  np.testing.assert_array_equal(example['weights'], [0, 1])


def test_splits_are_disjoint_files_and_the_windows_are_their_bytes(
    sources_dir, data_dir):
  config = _config(source_dir=sources_dir, max_length=32, num_validation=0,
                   num_test=0)
  task = tasks.get(config, data_dir)
  assert task.causal and task.head == 'lm' and task.vocab_size == 258
  by_split = {split: [p for p in lm.documents(sources_dir)
                      if lm.split_of(p, 0, 20, 20) == split]
              for split in tasks.SPLITS}
  assert all(by_split.values())
  for split, paths in by_split.items():
    source = task.source(split)
    # Inputs of consecutive windows, joined, are the split's stream.
    stream = np.concatenate([e['inputs'][:e['length']] for e in source])
    want = []
    for path in paths:
      with open(os.path.join(sources_dir, path), 'rb') as f:
        want += [lm.DOC_ID] + text.byte_tokens(f.read()).tolist()
    np.testing.assert_array_equal(stream, want[:-1])
    assert len(source) == math.ceil((len(want) - 1) / 32)
    last = source[len(source) - 1]
    assert last['targets'][last['length'] - 1] == want[-1]
  # The split follows the seed, by document.
  moved = [p for p in lm.documents(sources_dir)
           if lm.split_of(p, 0, 20, 20) != lm.split_of(p, 1, 20, 20)]
  assert moved


def test_decode_reads_the_bytes_back():
  tokens = [lm.DOC_ID] + text.byte_tokens('déjà vu\n').tolist() + [0, 0]
  assert lm.decode(tokens) == 'déjà vu\n'
  assert lm.token_name(lm.DOC_ID) == 'DOC' and lm.token_name(98) == 'a'


@pytest.mark.parametrize('overrides,message', [
    ({'dataset': 'enwik8'}, "task.dataset='enwik8'; valid: pystdlib, lm1b"),
    ({'max_length': 1}, 'task.max_length=1 is out of range'),
    ({'validation_percent': 50, 'test_percent': 50},
     'task.test_percent=50 is out of range; valid: 1 <= test_percent <= 49'),
    ({'num_test': -1}, 'task.num_test=-1 is out of range'),
])
def test_bad_settings_name_the_field(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    tasks.get(_config(**overrides), str(tmp_path))


def test_a_split_without_documents_says_what_to_change(tmp_path):
  folder = tmp_path / 'two'
  folder.mkdir()
  (folder / 'a.py').write_text('a = 1\n')
  (folder / 'b.py').write_text('b = 2\n')
  task = tasks.get(_config(source_dir=str(folder)), str(tmp_path / 'data'))
  with pytest.raises(ValueError, match='none of the 2 documents under .* '
                     'falls in (validation|test)'):
    task.source('train')
  task = tasks.get(_config(source_dir=str(tmp_path / 'empty')),
                   str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError, match='no .py files under'):
    task.source('train')


class _TinyLm1b(tfds.builder_cls('lm1b'), skip_registration=True):
  """lm1b's own features and version, with a few sentences made here."""
  name = 'lm1b'

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._sentences('train', 40),
            'test': self._sentences('test', 10)}

  def _sentences(self, split, n):
    for i in range(n):
      yield f'{split}{i}', {'text': f'{split} sentence {i} ' + 'y' * i}


def test_lm1b_reads_tfds_one_sentence_per_example(tmp_path):
  folder = str(tmp_path / 'tfds')
  _TinyLm1b(data_dir=folder).download_and_prepare(file_format='array_record')
  task = tasks.get(_config(dataset='lm1b', download=False, max_length=24,
                           validation_percent=25, num_validation=0,
                           num_test=0), folder)
  read = {split: [lm.decode(e['inputs'][:e['length']]) + lm.decode(
      e['targets'][e['length'] - 1:e['length']])
                  for e in task.source(split)] for split in tasks.SPLITS}
  assert len(read['train']) == 30 and len(read['validation']) == 10
  assert len(read['test']) == 10
  assert all(s.startswith('test sentence') for s in read['test'])
  assert not set(read['train']) & set(read['validation'])
  # DOC + 'test sentence 9 yyyyyyyyy' is 26 tokens: cut to 24 + 1, the
  # last y dropped.
  examples = list(task.source('test'))
  assert all(e['inputs'][0] == lm.DOC_ID for e in examples)
  assert max(e['length'] for e in examples) == 24
  assert 'test sentence 9 ' + 'y' * 8 in read['test']
  with pytest.raises(FileNotFoundError, match='lm1b is not prepared in'):
    tasks.get(_config(dataset='lm1b', download=False),
              str(tmp_path / 'none')).source('train')


def test_head_reports_bits_per_byte_and_selects_the_lowest():
  head = lm_head.Head.__new__(lm_head.Head)  # metrics need no parameters
  nats = 2.0
  arrays = {'targets': np.array([[1, 2, 3]]),
            'predictions': np.array([[1, 0, 3]]),
            'weights': np.array([[1.0, 1.0, 0.0]]),
            'loss': np.array([2 * nats]), 'weight': np.array([2.0])}
  m = head.metrics(arrays)
  assert m['accuracy'] == 0.5 and m['num_positions'] == 2
  np.testing.assert_allclose(m['bits_per_byte'], nats / math.log(2))
  np.testing.assert_allclose(m['perplexity'], math.exp(nats))
  assert trainer.best_metric(head) == ('bits_per_byte', 'min')
  assert trainer.best_metric(object()) == ('accuracy', 'max')


def test_smoke_run_keeps_the_checkpoint_with_the_lowest_bits_per_byte(
    smoke_config, tmp_path):
  config = smoke_config('lm')
  results = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    import json
    rows = [json.loads(line) for line in f]
  evaluated = {r['step']: r['validation/bits_per_byte'] for r in rows
               if 'validation/bits_per_byte' in r}
  assert len(evaluated) == 2
  assert results['best_step'] == min(evaluated, key=evaluated.get)
  test = results['metrics']['test']
  assert 0 < test['bits_per_byte'] < 9
  np.testing.assert_allclose(test['bits_per_byte'] * math.log(2),
                             test['loss'], rtol=1e-6)
