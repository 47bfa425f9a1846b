"""Metrics against hand-computed values and degenerate cases."""
import numpy as np
import pytest

from tasks import metrics


def _binary(tp, fp, fn, tn):
  labels = [1] * tp + [0] * fp + [1] * fn + [0] * tn
  preds = [1] * tp + [1] * fp + [0] * fn + [0] * tn
  return labels, preds


def test_binary_hand_computed():
  labels, preds = _binary(85, 10, 15, 90)
  m = metrics.classification_metrics(labels, preds, 2)
  assert m['confusion_matrix'] == [[90, 10], [15, 85]]
  assert m['precision_per_class'][1] == pytest.approx(0.8947, abs=1e-4)
  assert m['recall_per_class'][1] == pytest.approx(0.85, abs=1e-4)
  assert m['f1_per_class'][1] == pytest.approx(0.8718, abs=1e-4)
  # Class 0: precision 90/105, recall 90/100.
  assert m['precision_per_class'][0] == pytest.approx(90 / 105)
  assert m['recall_per_class'][0] == pytest.approx(0.9)
  assert m['accuracy'] == pytest.approx(175 / 200)
  assert m['precision_macro'] == pytest.approx((90 / 105 + 85 / 95) / 2)


def test_class_never_predicted_has_zero_precision():
  m = metrics.classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], 3)
  assert m['precision_per_class'] == [1.0, 1 / 3, 0.0]
  assert m['recall_per_class'] == [1.0, 1.0, 0.0]
  assert m['f1_per_class'][2] == 0.0
  assert not np.isnan(m['f1_macro'])


def test_class_absent_from_labels():
  m = metrics.classification_metrics([0, 0, 1], [0, 2, 1], 3)
  assert m['recall_per_class'][2] == 0.0
  assert m['precision_per_class'][2] == 0.0
  assert m['confusion_matrix'][0] == [1, 0, 1]
  assert m['f1_macro'] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_out_of_range_labels_rejected():
  with pytest.raises(ValueError, match='labels'):
    metrics.classification_metrics([0, 3], [0, 1], 3)


def test_position_accuracy_counts_only_scored_positions():
  targets = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  preds = np.array([[1, 0, 3, 0], [5, 6, 0, 8]])
  weights = np.array([[1, 0, 1, 0], [0, 1, 1, 0]])
  m = metrics.position_accuracy(targets, preds, weights)
  assert m['num_positions'] == 4
  assert m['accuracy'] == pytest.approx(3 / 4)
  assert m['sequence_accuracy'] == pytest.approx(0.5)


def test_generation_scores_reproduce_the_libraries_documented_examples():
  # sacrebleu's README: this system and these two reference streams give
  # "BLEU = 48.53 ..." and "chrF2 = 59.73".
  refs = [['The dog bit the man.', 'It was not unexpected.',
           'The man bit him first.'],
          ['The dog had bit the man.', 'No one was surprised.',
           'The man had bitten the dog.']]
  hyps = ['The dog bit the man.', "It wasn't surprising.",
          'The man had just bitten him.']
  s = metrics.generation_scores(hyps, refs)
  assert s['bleu'] == pytest.approx(48.53, abs=0.005)
  assert s['chrf'] == pytest.approx(59.73, abs=0.005)
  assert 'exact_match' not in s
  # rouge-score's README pair, by hand: 'the quick brown dog jumps on the
  # log' (8 words) against 'the quick brown fox jumps over the lazy dog'
  # (9): 6 shared words, 2 shared bigrams of 7 and 8, an LCS of 5.
  s = metrics.generation_scores(
      ['The quick brown dog jumps on the log.'],
      ['The quick brown fox jumps over the lazy dog'])
  f = lambda p, r: 100 * 2 * p * r / (p + r)
  assert s['rouge1'] == pytest.approx(f(6 / 8, 6 / 9))
  assert s['rouge2'] == pytest.approx(f(2 / 7, 2 / 8))
  assert s['rougeL'] == pytest.approx(f(5 / 8, 5 / 9))


def test_exact_match_of_the_first_tokens():
  s = metrics.generation_scores(
      ['a b', 'a c', 'x y'], ['a b', 'a b', 'a b'],
      hypothesis_tokens=[[1, 2], [1, 3], [7, 8]],
      reference_tokens=[[1, 2], [1, 2], [1, 2]], exact_tokens=1)
  assert s['exact_match'] == pytest.approx(200 / 3)
  s = metrics.generation_scores(
      ['a b', 'a c'], ['a b', 'a b'], hypothesis_tokens=[[1, 2], [1, 3]],
      reference_tokens=[[1, 2], [1, 2]])  # 0: the whole reference
  assert s['exact_match'] == 50.0
  assert s['bleu'] == pytest.approx(
      metrics.generation_scores(['a b', 'a c'], ['a b', 'a b'])['bleu'])
