"""Offline tasks: generators, TFDS round trip, preprocessing, registry.

Everything is generated from the smoke presets (shrunk further) into pytest's
tmp dirs; nothing is downloaded.
"""
import collections
import os

import numpy as np
import pytest

import tasks
from tasks import copy as copy_task
from tasks import listops
from tasks import mqar

SMALL = dict(num_train=96, num_validation=32, num_test=32)


def task_config(name, preset='smoke', **overrides):
  c = tasks.get_config(name, preset).task
  c.update(overrides)
  return c


def small_config(name, **overrides):
  return task_config(name, **(SMALL | overrides))


def examples(task, split):
  source = task.source(split)
  return source.__getitems__(range(len(source)))


def all_splits(task):
  return {split: examples(task, split) for split in tasks.SPLITS}


def assert_same_data(a, b):
  for split in tasks.SPLITS:
    assert len(a[split]) == len(b[split])
    for x, y in zip(a[split], b[split]):
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


def any_difference(a, b):
  return any(not np.array_equal(x['inputs'], y['inputs'])
             for split in tasks.SPLITS for x, y in zip(a[split], b[split]))


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  """name -> (small task config, task, all its splits), generated once."""
  cache = {}

  def get(name):
    if name not in cache:
      c = small_config(name)
      task = tasks.get(c, str(tmp_path_factory.mktemp(name)))
      cache[name] = c, task, all_splits(task)
    return cache[name]
  return get


@pytest.fixture(scope='module')
def listops_data(generated):
  return generated('listops')


@pytest.fixture(scope='module')
def mqar_data(generated):
  return generated('mqar')


@pytest.fixture(scope='module')
def copy_data(generated):
  return generated('copy')


@pytest.mark.parametrize('name', tasks.NAMES)
def test_task_data_is_deterministic_from_the_seed(tmp_path, generated, name):
  c, _, data = generated(name)
  assert_same_data(data, all_splits(tasks.get(c, str(tmp_path / 'a'))))
  other = all_splits(tasks.get(small_config(name, data_seed=1),
                               str(tmp_path / 'b')))
  assert any_difference(data, other)


# Registry and configs.

def test_registry_names_every_task():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in tasks.NAMES:
    module = tasks.config_module(name)
    assert os.path.isfile(os.path.join(root, *module.split('.')) + '.py')
    assert tasks.get_config(name).task.name == name


def test_unknown_task_lists_valid_ones(tmp_path):
  c = task_config('listops')
  c.name = 'nope'
  with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: "
                     + ', '.join(tasks.NAMES)):
    tasks.get(c, str(tmp_path))


# Every task's presets: smoke, cpu and its largest (LRA's, or lm's long).
@pytest.mark.parametrize('name,preset', [
    (name, preset) for name in tasks.NAMES
    for preset in ('smoke', 'cpu', 'long' if name == 'lm' else 'lra')])
def test_presets_make_tasks_without_generating(tmp_path, name, preset):
  # make() only checks parameters; data is written on the first source().
  task = tasks.get(task_config(name, preset), str(tmp_path))
  assert task.name == name
  assert not any(p.is_file() for p in tmp_path.rglob('*'))


def test_lra_shapes_match_the_papers(tmp_path):
  listops_task = tasks.get(task_config('listops', 'lra'), str(tmp_path))
  assert (listops_task.seq_len, listops_task.vocab_size) == (2000, 17)
  copy = tasks.get(task_config('copy', 'lra'), str(tmp_path))
  assert (copy.seq_len, copy.vocab_size) == (1024, 129)
  recall = tasks.get(task_config('mqar', 'lra'), str(tmp_path))
  assert (recall.seq_len, recall.num_classes) == (512, 8192)
  cifar = tasks.get(task_config('image', 'lra'), str(tmp_path))
  assert (cifar.seq_len, cifar.vocab_size, cifar.num_classes) == (1024, 256,
                                                                   10)
  path = tasks.get(task_config('pathfinder', 'lra'), str(tmp_path))
  assert (path.seq_len, path.vocab_size, path.num_classes) == (1024, 256, 2)
  assert tasks.get(task_config('pathx', 'lra'),
                   str(tmp_path)).seq_len == 16_384
  for name in ('text', 'retrieval'):  # 4,000 bytes after the CLS token
    task = tasks.get(task_config(name, 'lra'), str(tmp_path))
    assert (task.seq_len, task.vocab_size, task.num_classes) == (4001, 258, 2)


def test_unknown_split_is_rejected(listops_data):
  _, task, _ = listops_data
  with pytest.raises(ValueError, match='unknown split'):
    task.source('dev')


def test_data_is_reused_not_regenerated(tmp_path, monkeypatch):
  c = small_config('listops')
  first = examples(tasks.get(c, str(tmp_path)), 'test')

  def fail(*args, **kwargs):
    raise AssertionError('generated again')
  monkeypatch.setattr(listops, 'unique_trees', fail)
  again = examples(tasks.get(c, str(tmp_path)), 'test')
  np.testing.assert_array_equal(first[0]['inputs'], again[0]['inputs'])


def test_different_parameters_get_their_own_directory(tmp_path):
  for max_length in (40, 48):
    examples(tasks.get(small_config('listops', max_length=max_length),
                       str(tmp_path)), 'test')
  assert len(os.listdir(tmp_path / 'listops')) == 2


# ListOps.

@pytest.mark.parametrize('text, expected', [
    ('7', 7),
    ('[MAX 2 9 [MIN 4 7 ] 0 ]', 9),
    ('[MIN 5 3 8 ]', 3),
    ('[MED 3 1 2 ]', 2),
    ('[MED 1 2 3 4 ]', 2),             # (2 + 3) / 2 = 2.5, truncated
    ('[MED 3 8 ]', 5),                 # 5.5 -> 5
    ('[MED 9 8 ]', 8),                 # 8.5 -> 8
    ('[SM 5 6 7 ]', 8),                # 18 mod 10
    ('[SM [MAX 9 1 ] [MED 2 9 ] ]', 4),  # 9 + 5 = 14 mod 10
    ('[MIN [SM 9 9 ] [MAX 1 [MED 6 7 8 ] ] 5 ]', 5),  # min(8, 7, 5)
])
def test_listops_value_of_hand_written_expressions(text, expected):
  assert listops.value(listops.encode(text)) == expected
  assert listops.decode(listops.encode(text)) == text


def test_listops_median_truncates_like_numpy():
  rng = np.random.default_rng(0)
  for _ in range(200):
    args = rng.integers(0, 10, rng.integers(2, 11)).tolist()
    assert listops.apply('[MED', args) == int(np.median(args))


@pytest.mark.parametrize('text', ['[MAX 1 2', '1 2', '[SM ]', '1 ]'])
def test_listops_value_rejects_malformed_expressions(text):
  with pytest.raises(ValueError):
    listops.value(listops.encode(text))


def test_listops_examples_have_the_documented_shapes(listops_data):
  c, task, data = listops_data
  assert (task.head, task.causal, task.num_classes) == ('classify', False, 10)
  assert task.seq_len == c.max_length
  for split in tasks.SPLITS:
    assert len(data[split]) == c[f'num_{split}']
  for ex in data['train']:
    assert ex['inputs'].shape == (task.seq_len,)
    assert ex['inputs'].dtype == np.int32
    assert ex['length'].dtype == np.int32 and ex['label'].dtype == np.int32
    assert ex['inputs'][0] == listops.CLS
    assert not ex['inputs'][ex['length']:].any()
    assert ex['inputs'][:ex['length']].all()


def test_listops_lengths_are_strictly_within_bounds(listops_data):
  c, _, data = listops_data
  for split in tasks.SPLITS:
    for ex in data[split]:
      tokens = ex['length'] - 1          # without CLS
      assert c.min_length < tokens < c.max_length


def test_listops_labels_are_values_and_brackets_are_tokens(listops_data):
  _, _, data = listops_data
  close, operators = listops.ID[']'], [listops.ID[o] for o in listops.OPERATORS]
  for ex in data['train'] + data['test']:
    ids = ex['inputs'][1:ex['length']]
    assert ex['label'] == listops.value(ids)
    assert (ids == close).sum() == np.isin(ids, operators).sum() > 0


def test_listops_has_no_duplicates_within_or_across_splits(listops_data):
  _, _, data = listops_data
  seen = [ex['inputs'].tobytes() for split in tasks.SPLITS
          for ex in data[split]]
  assert len(set(seen)) == len(seen)


@pytest.mark.parametrize('overrides, field', [
    (dict(min_length=39, max_length=40), 'max_length'),  # none between
    (dict(max_depth=0), 'max_depth'),
    (dict(max_depth=10_000), 'max_depth'),
    (dict(max_args=1), 'max_args'),
    (dict(min_length=-1), 'min_length'),
    (dict(max_depth=2, max_args=3, min_length=5), 'min_length'),  # longest 5
    (dict(num_train=-1), 'num_train'),
    (dict(num_test=0), 'num_test'),
])
def test_listops_rejects_impossible_parameters(tmp_path, overrides, field):
  with pytest.raises(ValueError, match=f'task.{field}='):
    tasks.get(small_config('listops', **overrides), str(tmp_path))


def test_listops_too_few_distinct_trees_is_an_error(tmp_path):
  # Depth 2, 2 arguments: only 4 * 10 * 10 trees of length 4.
  c = small_config('listops', min_length=3, max_length=5, max_depth=2,
                   max_args=2, num_train=500)
  task = tasks.get(c, str(tmp_path))
  with pytest.raises(ValueError, match='found only 400 of 564'):
    task.source('train')


# MQAR.

def test_mqar_examples_have_the_documented_shapes(mqar_data):
  c, task, data = mqar_data
  assert (task.head, task.causal) == ('per_position', True)
  assert task.seq_len == c.seq_len
  assert task.vocab_size == task.num_classes == c.vocab_size
  for ex in data['train']:
    assert ex['inputs'].shape == ex['targets'].shape == (c.seq_len,)
    assert ex['weights'].shape == (c.seq_len,)
    assert ex['weights'].dtype == np.float32
    assert ex['length'] == c.seq_len
    # Next-token targets, except that each query's value is a target only:
    # its slot holds 0 in the inputs. The last position predicts nothing.
    scored = ex['weights'][:-1] == 1
    np.testing.assert_array_equal(ex['targets'][:-1][~scored],
                                  ex['inputs'][1:][~scored])
    assert (ex['inputs'][1:][scored] == 0).all()
    assert ex['targets'][-1] == 0 and ex['weights'][-1] == 0


def test_mqar_scores_each_query_with_its_value(mqar_data):
  c, _, data = mqar_data
  pairs = 2 * c.num_pairs
  for split in tasks.SPLITS:
    for ex in data[split]:
      keys, values = ex['inputs'][0:pairs:2], ex['inputs'][1:pairs:2]
      assert len(set(keys)) == c.num_pairs
      assert ((keys >= 1) & (keys < c.vocab_size // 2)).all()
      assert ((values >= c.vocab_size // 2) & (values < c.vocab_size)).all()
      scored = np.flatnonzero(ex['weights'])
      assert set(ex['weights']) <= {0.0, 1.0}
      assert len(scored) == c.num_pairs
      assert (scored >= pairs).all()
      value_of = dict(zip(keys, values))
      assert sorted(ex['inputs'][scored]) == sorted(keys)  # each asked once
      for t in scored:
        assert ex['targets'][t] == value_of[ex['inputs'][t]]
      # No value is an input after the context: an answered query cannot
      # rule its value out for the later ones.
      assert (ex['inputs'][pairs:] < c.vocab_size // 2).all()


def test_mqar_values_vary_so_recall_is_needed(mqar_data):
  c, _, data = mqar_data
  values_seen = collections.defaultdict(set)
  for ex in data['train']:
    pairs = ex['inputs'][:2 * c.num_pairs]
    for key, val in zip(pairs[0::2], pairs[1::2]):
      values_seen[key].add(val)
  assert max(len(v) for v in values_seen.values()) > 1


@pytest.mark.parametrize('overrides, field', [
    (dict(seq_len=15, num_pairs=4), 'seq_len'),      # needs 4 * 4 tokens
    (dict(vocab_size=16, num_pairs=8), 'num_pairs'),  # keys 1..7
    (dict(num_pairs=0), 'num_pairs'),
    (dict(vocab_size=3), 'vocab_size'),
    (dict(num_validation=-5), 'num_validation'),
])
def test_mqar_rejects_impossible_parameters(tmp_path, overrides, field):
  with pytest.raises(ValueError, match=f'task.{field}='):
    tasks.get(small_config('mqar', **overrides), str(tmp_path))


def test_mqar_tightest_parameters_work():
  rng = np.random.default_rng(0)
  tokens, scored, answers = mqar.sequences(rng, 5, seq_len=12, num_pairs=3,
                                           vocab_size=8)
  assert tokens.shape == scored.shape == answers.shape == (5, 12)
  assert (scored.sum(1) == 3).all()


# Copy.

def test_copy_examples_are_two_copies_of_a_word(copy_data):
  c, task, data = copy_data
  length = c.word_length
  assert task.seq_len == 2 * length + 2
  assert task.vocab_size == task.num_classes == c.num_symbols + 2
  assert (task.head, task.causal) == ('per_position', True)
  for ex in data['train']:
    x = ex['inputs']
    assert ex['length'] == task.seq_len
    assert x[0] == x[length + 1] == copy_task.SEPARATOR
    np.testing.assert_array_equal(x[1:length + 1], x[length + 2:])
    word = x[1:length + 1]
    assert ((word >= 2) & (word < 2 + c.num_symbols)).all()


def test_copy_weights_cover_exactly_the_second_copy(copy_data):
  c, _, data = copy_data
  length = c.word_length
  for ex in data['validation']:
    # Position t predicts token t + 1: the second copy is tokens L+2..2L+1.
    np.testing.assert_array_equal(np.flatnonzero(ex['weights']),
                                  np.arange(length + 1, 2 * length + 1))
    np.testing.assert_array_equal(ex['targets'][ex['weights'] > 0],
                                  ex['inputs'][length + 2:])


@pytest.mark.parametrize('overrides, field', [
    (dict(word_length=0), 'word_length'),
    (dict(num_symbols=0), 'num_symbols'),
    (dict(num_train=-1), 'num_train'),
    (dict(data_seed=-1), 'data_seed'),
])
def test_copy_rejects_impossible_parameters(tmp_path, overrides, field):
  with pytest.raises(ValueError, match=f'task.{field}='):
    tasks.get(small_config('copy', **overrides), str(tmp_path))
