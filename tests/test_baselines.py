"""--mode=baselines: majority class and logistic regressions, for single
documents and pairs."""
import json

import numpy as np
import pytest

import tasks
from evaluate import baselines


def test_bag_features_are_token_shares_of_the_valid_positions():
  inputs = np.array([[1, 1, 2, 0], [3, 0, 0, 0]])
  lengths = np.array([3, 1])
  np.testing.assert_allclose(
      baselines.bag_features(inputs, lengths, 4),
      [[0, 2 / 3, 1 / 3, 0], [0, 0, 0, 1]])
  np.testing.assert_allclose(
      baselines.raw_features(inputs, lengths, 4),
      [[1 / 3, 1 / 3, 2 / 3, 0], [1, 0, 0, 0]])


def test_pair_bag_features_are_the_difference_of_the_two_bags():
  inputs = np.array([[[1, 1, 2, 0], [2, 0, 0, 0]]])
  lengths = np.array([[3, 1]])
  np.testing.assert_allclose(
      baselines.pair_bag_features(inputs, lengths, 3),
      [[0, 2 / 3, 1 - 1 / 3]])


def test_trigram_features_count_the_trigrams_inside_the_valid_positions():
  inputs = np.array([[1, 2, 3, 1, 2, 3, 7], [1, 2, 3, 0, 0, 0, 0],
                     [3, 2, 1, 1, 0, 0, 0], [5, 5, 0, 0, 0, 0, 0]])
  lengths = np.array([6, 3, 4, 2])
  x = baselines.trigram_features(inputs, lengths, 8)
  np.testing.assert_allclose(x.sum(1), [1, 1, 1, 0])
  # Row 0: (1,2,3) twice, (2,3,1) and (3,1,2) once; the 7 is past length.
  assert sorted(x[0][x[0] > 0]) == [0.25, 0.25, 0.5]
  np.testing.assert_array_equal(x[1] > 0, x[0] == 0.5)   # one (1,2,3)
  # Order matters: (3,2,1) is not (1,2,3), though the bags are equal.
  assert not np.any((x[2] > 0) & (x[1] > 0))
  pair = baselines.pair_trigram_features(inputs[None, :2], lengths[None, :2],
                                         8)
  np.testing.assert_allclose(pair[0], np.abs(x[0] - x[1]))


def test_logistic_regression_learns_a_linear_rule():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(600, 5)).astype(np.float32)
  y = (x[:, 0] - x[:, 3] > 0).astype(np.int32)
  predict, val_acc = baselines.logistic_regression(
      (x[:400], y[:400]), (x[400:500], y[400:500]), 2, seed=0, epochs=100,
      learning_rate=0.05)
  assert val_acc > 0.9
  assert np.mean(predict(x[500:]) == y[500:]) > 0.9


def test_baselines_mode_writes_every_baseline(smoke_config, tmp_path):
  config = smoke_config('image')
  result = baselines.run(config, str(tmp_path / 'b'))
  on_disk = json.loads((tmp_path / 'b' / 'baselines.json').read_text())
  assert on_disk['baselines'].keys() == {'majority', 'linear', 'bag',
                                         'trigram'}
  task = tasks.get(config.task, config.data_dir)
  train = np.bincount([x['label'] for x in task.source('train')])
  test = np.bincount([x['label'] for x in task.source('test')], minlength=10)
  majority = on_disk['baselines']['majority']
  assert train[majority['class']] == train.max()
  assert majority['test']['accuracy'] == pytest.approx(
      test[majority['class']] / test.sum())
  assert result['examples']['test'] == test.sum() == 20
  assert 'linear' in baselines.table(result)


def test_baselines_of_a_pair_task_are_majority_and_bag(smoke_config,
                                                       tmp_path):
  result = baselines.run(smoke_config('retrieval'), str(tmp_path / 'b'))
  assert result['baselines'].keys() == {'majority', 'bag', 'trigram'}
  assert result['examples']['test'] == 64
  # Half the pairs share a file: majority is chance.
  assert result['baselines']['majority']['test']['accuracy'] == 0.5


def test_baselines_refuse_tasks_without_labels(smoke_config, tmp_path):
  with pytest.raises(ValueError, match="task mqar has the 'per_position' "
                     'head'):
    baselines.run(smoke_config('mqar'), str(tmp_path / 'b'))


class _Split(list):
  def __getitems__(self, indices):
    return [self[i] for i in indices]


class _Task:
  """A next-token task of three examples per split over tokens 1..3."""
  vocab_size = 4

  def __init__(self, splits):
    self.splits = splits

  def source(self, split):
    return self.splits[split]


def _example(tokens, scored):
  tokens = np.asarray(tokens)
  return {'inputs': tokens[:-1], 'targets': tokens[1:],
          'weights': np.asarray(scored, np.float32)}


def test_lm_ngram_baselines_by_hand():
  # Train: targets 2, 2, 3, 1, the last unscored: unigram counts 0, 2, 1
  # for tokens 1..3; bigrams (1->2), (2->2), (2->3).
  train = _Split([_example([1, 2, 2, 3, 1], [1, 1, 1, 0])])
  held = _Split([_example([1, 2, 3], [1, 1])])  # targets 2, 3
  task = _Task({'train': train, 'validation': held, 'test': held})
  out = baselines.lm_baselines(task)
  a = out['unigram']['smoothing']
  p = (np.array([0, 0, 2, 1]) + a) / (3 + 4 * a)
  want = -(np.log2(p[2]) + np.log2(p[3])) / 2
  assert out['unigram']['test']['bits_per_byte'] == pytest.approx(want)
  a = out['bigram']['smoothing']
  after1 = (np.array([0, 0, 1, 0]) + a) / (1 + 4 * a)
  after2 = (np.array([0, 0, 1, 1]) + a) / (2 + 4 * a)
  want = -(np.log2(after1[2]) + np.log2(after2[3])) / 2
  assert out['bigram']['test']['bits_per_byte'] == pytest.approx(want)
  # The smoothing is the one best on validation.
  assert a == min(baselines.LM_SMOOTHING)
