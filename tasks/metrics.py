"""Task metrics computed on the host from predictions and labels.

Classification: accuracy, per-class and macro precision/recall/F1, confusion
matrix. Per-position tasks (MQAR, copy): accuracy over scored positions only.
Generation: BLEU and chrF (sacrebleu), ROUGE-1/2/L (rouge-score), exact
match, imported when used.
Conventions for degenerate classes: a class never predicted has precision 0;
a class absent from the labels has recall 0; F1 is 0 when precision + recall
is 0. Macro averages run over every class in [0, num_classes).
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """int64 [num_classes, num_classes]; rows are true labels, columns predictions."""
  labels = np.asarray(labels, np.int64).ravel()
  predictions = np.asarray(predictions, np.int64).ravel()
  if labels.shape != predictions.shape:
    raise ValueError(f'labels {labels.shape} and predictions '
                     f'{predictions.shape} differ in size')
  for name, x in (('labels', labels), ('predictions', predictions)):
    if x.size and (x.min() < 0 or x.max() >= num_classes):
      raise ValueError(f'{name} must lie in [0, {num_classes})')
  flat = labels * num_classes + predictions
  return np.bincount(flat, minlength=num_classes**2).reshape(
      num_classes, num_classes)


def _safe_divide(num, den):
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def classification_metrics(labels, predictions, num_classes: int) -> dict:
  """Accuracy, macro and per-class precision/recall/F1, confusion matrix."""
  cm = confusion_matrix(labels, predictions, num_classes)
  tp = np.diag(cm)
  precision = _safe_divide(tp, cm.sum(axis=0))
  recall = _safe_divide(tp, cm.sum(axis=1))
  f1 = _safe_divide(2 * precision * recall, precision + recall)
  return {
      'accuracy': float(_safe_divide(tp.sum(), cm.sum())),
      'precision_macro': float(precision.mean()),
      'recall_macro': float(recall.mean()),
      'f1_macro': float(f1.mean()),
      'precision_per_class': precision.tolist(),
      'recall_per_class': recall.tolist(),
      'f1_per_class': f1.tolist(),
      'confusion_matrix': cm.tolist(),
      'num_examples': int(cm.sum()),
  }


def position_accuracy(targets, predictions, weights) -> dict:
  """Accuracy over positions with weight > 0 (MQAR queries, copy's 2nd half)."""
  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  scored = np.asarray(weights) > 0
  n = int(scored.sum())
  correct = int(((targets == predictions) & scored).sum())
  # Whole-sequence accuracy: every scored position right.
  per_seq = ((targets == predictions) | ~scored).all(axis=-1)
  return {'accuracy': correct / n if n else 0.0,
          'sequence_accuracy': float(per_seq.mean()) if per_seq.size else 0.0,
          'num_positions': n}


def generation_scores(hypotheses, references, *, hypothesis_tokens=None,
                      reference_tokens=None, exact_tokens: int = 0) -> dict:
  """Scores of generated texts against references, in percent.

  hypotheses: [str]; references: [str] (one per hypothesis) or [[str]]
  (reference streams, each as long as hypotheses, as sacrebleu takes
  them). bleu and chrf: sacrebleu's corpus BLEU and chrF with its
  defaults (13a tokenisation, chrF2); rouge1, rouge2, rougeL: the mean
  F-measure of rouge-score's ROUGE-1/2/L against the first reference
  stream (its default tokeniser: lower-cased alphanumeric words, no
  stemming); exact_match, when token ids are given: the share of rows whose
  first `exact_tokens` generated tokens (0: all of the reference) equal the
  reference's.
  """
  import sacrebleu
  from rouge_score import rouge_scorer
  streams = ([list(references)] if references and isinstance(references[0],
                                                             str)
             else [list(r) for r in references])
  out = {'bleu': sacrebleu.corpus_bleu(list(hypotheses), streams).score,
         'chrf': sacrebleu.corpus_chrf(list(hypotheses), streams).score}
  scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'])
  rouge = [scorer.score(ref, hyp) for ref, hyp in zip(streams[0], hypotheses)]
  for name in ('rouge1', 'rouge2', 'rougeL'):
    out[name] = 100.0 * float(np.mean([r[name].fmeasure for r in rouge])
                              if rouge else 0.0)
  if hypothesis_tokens is not None:
    same = []
    for hyp, ref in zip(hypothesis_tokens, reference_tokens):
      k = exact_tokens or len(ref)
      same.append(list(hyp[:k]) == list(ref[:k]))
    out['exact_match'] = 100.0 * float(np.mean(same)) if same else 0.0
  return out
