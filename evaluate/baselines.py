"""What a classification task scores without attention, to read a model's
accuracy against:

  python main.py --mode=baselines --config=configs/image.py:cpu \
      --workdir=runs/image-baselines

  majority  the most frequent training label, predicted for every example;
  linear    multinomial logistic regression on the raw tokens as numbers
            (token id / (vocab_size - 1): an image's grey levels), one weight
            per position and class;
  bag       the same on the bag of tokens: each token id's share of the
            example's valid positions (a byte histogram for byte-level text),
            which sees what occurs but not where;
  trigram   the same on the shares of token trigrams (three consecutive
            tokens, hashed into TRIGRAM_BUCKETS features): order within
            three tokens (for text, parts of words), nothing further. What
            it gains over `bag` is what short-range order is worth; what a
            model gains over it needs longer range.

For tasks with the `match` head (two documents, one label) the baselines
are majority, `bag` on |bag(a) - bag(b)|, the difference of the two
documents' token shares (how differently their bytes are distributed), and
`trigram` on the difference of their trigram shares.

The regressions train with Adam (optax; `LEARNING_RATE`, `BATCH_SIZE`,
`EPOCHS` below) on the task's train split, keep the epoch best on
validation, and are scored on test with the model's metrics (accuracy,
macro F1, confusion matrix, ...). Writes baselines.json to the workdir and
prints a table. For tasks with the `classify` or `match` head.

For the `lm` head the baselines are byte n-gram models, scored in bits per
byte on every scored target of validation and test (what a language model
must beat): `unigram`, the training targets' frequencies (the corpus's
byte entropy, measured on held-out text), and `bigram`, the frequencies of
each target after the token before it; both with additive smoothing, its
constant chosen on validation from LM_SMOOTHING.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import tasks
from tasks import metrics as metrics_lib
from train import trainer
from train import writer as writer_lib

LEARNING_RATE = 1e-3
BATCH_SIZE = 256
EPOCHS = 10
_READ_CHUNK = 1024          # examples fetched from a data source at a time
TRIGRAM_BUCKETS = 4096      # hashed trigram features
_HASH_MULTIPLIER = 2654435761   # Knuth's multiplicative hash


def load(source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [n, seq] int32, lengths [n], labels [n]) of a whole split
  (inputs [n, 2, seq] and lengths [n, 2] for pairs)."""
  inputs, lengths, labels = [], [], []
  for start in range(0, len(source), _READ_CHUNK):
    batch = source.__getitems__(range(start, min(start + _READ_CHUNK,
                                                 len(source))))
    inputs.append(np.stack([x['inputs'] for x in batch]))
    lengths.append(np.stack([x['length'] for x in batch]).astype(np.int32))
    labels.append(np.array([x['label'] for x in batch], np.int32))
  return (np.concatenate(inputs), np.concatenate(lengths),
          np.concatenate(labels))


def raw_features(inputs, lengths, vocab_size: int) -> np.ndarray:
  """Token ids scaled to [0, 1], zero past each example's length."""
  valid = np.arange(inputs.shape[1])[None, :] < lengths[:, None]
  return np.where(valid, inputs / max(vocab_size - 1, 1), 0).astype(
      np.float32)


def bag_features(inputs, lengths, vocab_size: int) -> np.ndarray:
  """Each token id's share of the valid positions [n, vocab_size]."""
  valid = np.arange(inputs.shape[1])[None, :] < lengths[:, None]
  rows = np.repeat(np.arange(len(inputs)), inputs.shape[1])
  counts = np.zeros((len(inputs), vocab_size), np.float32)
  np.add.at(counts, (rows[valid.ravel()], inputs.ravel()[valid.ravel()]), 1)
  return counts / np.maximum(lengths, 1)[:, None]


def trigram_features(inputs, lengths, vocab_size: int) -> np.ndarray:
  """Each hashed token trigram's share of the example's trigrams (those
  inside the valid positions) [n, TRIGRAM_BUCKETS]."""
  out = np.zeros((len(inputs), TRIGRAM_BUCKETS), np.float32)
  width = inputs.shape[1] - 2
  if width < 1:
    return out
  for start in range(0, len(inputs), _READ_CHUNK):
    x = inputs[start:start + _READ_CHUNK].astype(np.int64)
    code = (x[:, :-2] * vocab_size + x[:, 1:-1]) * vocab_size + x[:, 2:]
    bucket = (code * _HASH_MULTIPLIER) % TRIGRAM_BUCKETS
    valid = (np.arange(width)[None, :] + 3
             <= lengths[start:start + _READ_CHUNK, None])
    rows = np.broadcast_to(np.arange(len(x))[:, None], valid.shape)
    counts = np.bincount((rows * TRIGRAM_BUCKETS + bucket)[valid],
                         minlength=len(x) * TRIGRAM_BUCKETS)
    out[start:start + len(x)] = (counts.reshape(len(x), TRIGRAM_BUCKETS)
                                 / np.maximum(valid.sum(1), 1)[:, None])
  return out


def _pair(features):
  """|features(a) - features(b)| of pairs: inputs [n, 2, seq]."""
  def pair_features(inputs, lengths, vocab_size: int) -> np.ndarray:
    n, _, seq = inputs.shape
    x = features(inputs.reshape(2 * n, seq), lengths.reshape(2 * n),
                 vocab_size).reshape(n, 2, -1)
    return np.abs(x[:, 0] - x[:, 1])
  return pair_features


pair_bag_features = _pair(bag_features)
pair_trigram_features = _pair(trigram_features)

# Features of each regression baseline, by head.
FEATURES = {
    'classify': (('linear', raw_features), ('bag', bag_features),
                 ('trigram', trigram_features)),
    'match': (('bag', pair_bag_features), ('trigram', pair_trigram_features)),
}


def logistic_regression(train, validation, num_classes: int, seed: int,
                        epochs: int = EPOCHS,
                        learning_rate: float = LEARNING_RATE):
  """(predict fn, best validation accuracy) of a linear softmax classifier
  on (features, labels) pairs, the epoch best on validation."""
  x_train, y_train = train
  dim = x_train.shape[1]
  # Standardised features: one learning rate suits pixels and histograms.
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  params = {'w': jnp.zeros((dim, num_classes)), 'b': jnp.zeros(num_classes)}
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  def logits(p, x):
    return ((x - mean) / std) @ p['w'] + p['b']

  @jax.jit
  def step(p, s, x, y):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        logits(p, x), y).mean()
    updates, s = optimizer.update(jax.grad(loss)(p), s)
    return optax.apply_updates(p, updates), s

  predict_jit = jax.jit(lambda p, x: jnp.argmax(logits(p, x), -1))

  def predict(p, x):
    return np.concatenate([np.asarray(predict_jit(p, x[i:i + 4096]))
                           for i in range(0, len(x), 4096)])

  rng = np.random.default_rng(seed)
  best, best_acc = params, -1.0
  for _ in range(epochs):
    order = rng.permutation(len(x_train))
    for i in range(0, len(order), BATCH_SIZE):
      take = order[i:i + BATCH_SIZE]
      params, opt_state = step(params, opt_state, x_train[take],
                               y_train[take])
    acc = float(np.mean(predict(params, validation[0]) == validation[1]))
    if acc > best_acc:
      best, best_acc = params, acc
  return (lambda x: predict(best, x)), best_acc


LM_SMOOTHING = (1e-3, 1e-2, 0.1, 1.0)  # additive smoothing tried


def _lm_counts(source, vocab: int):
  """(targets' counts [vocab], (previous token, target) counts [vocab,
  vocab]) over the scored positions of a split."""
  uni = np.zeros(vocab, np.int64)
  bi = np.zeros((vocab, vocab), np.int64)
  for start in range(0, len(source), _READ_CHUNK):
    for e in source.__getitems__(range(start, min(start + _READ_CHUNK,
                                                  len(source)))):
      scored = np.asarray(e['weights']) > 0
      prev = np.asarray(e['inputs'])[scored]
      target = np.asarray(e['targets'])[scored]
      uni += np.bincount(target, minlength=vocab)
      np.add.at(bi, (prev, target), 1)
  return uni, bi


def _bits(probs, counts) -> float:
  """Bits per scored target of a model `probs` (same shape as counts)."""
  return float(-(counts * np.log2(probs)).sum() / max(counts.sum(), 1))


def lm_baselines(task) -> dict:
  """{unigram, bigram: {smoothing, validation/test bits_per_byte}}."""
  counts = {split: _lm_counts(task.source(split), task.vocab_size)
            for split in tasks.SPLITS}
  out = {}
  for name, index in (('unigram', 0), ('bigram', 1)):
    train = counts['train'][index].astype(np.float64)

    def model(alpha, train=train):
      smoothed = train + alpha
      return smoothed / smoothed.sum(-1, keepdims=True)
    best = min(LM_SMOOTHING, key=lambda a: _bits(
        model(a), counts['validation'][index]))
    out[name] = {'smoothing': best, **{
        split: {'bits_per_byte': _bits(model(best), counts[split][index])}
        for split in ('validation', 'test')}}
  return out


def _scores(labels, predictions, num_classes):
  return metrics_lib.classification_metrics(labels, predictions, num_classes)


def run(config, workdir: str) -> dict:
  """Every baseline of config.task; writes workdir/baselines.json."""
  if not workdir:
    raise ValueError('--workdir is required for --mode=baselines')
  trainer.prepare_workdir(workdir)
  task = tasks.get(config.task, trainer.default_data_dir(config))
  if task.head == 'lm':
    result = {'task': task.name, 'preset': config.get('preset'),
              'baselines': lm_baselines(task)}
    writer_lib.write_json_atomic(os.path.join(workdir, 'baselines.json'),
                                 result)
    print(table(result))
    return result
  if task.head not in FEATURES:
    raise ValueError(f'baselines are for tasks with a '
                     f'{", ".join(FEATURES)} or lm head; task {task.name} '
                     f'has the {task.head!r} head')
  start = time.monotonic()
  data = {split: load(task.source(split)) for split in tasks.SPLITS}
  logging.info('baselines: loaded %s examples in %.0fs',
               ' / '.join(str(len(data[s][2])) for s in tasks.SPLITS),
               time.monotonic() - start)
  train_labels = data['train'][2]
  majority = int(np.bincount(train_labels, minlength=task.num_classes)
                 .argmax())
  out = {'majority': {
      'class': majority,
      **{split: _scores(data[split][2],
                        np.full_like(data[split][2], majority),
                        task.num_classes)
         for split in ('validation', 'test')}}}
  for name, features in FEATURES[task.head]:
    start = time.monotonic()
    x = {split: features(*data[split][:2], task.vocab_size)
         for split in tasks.SPLITS}
    predict, _ = logistic_regression(
        (x['train'], train_labels), (x['validation'], data['validation'][2]),
        task.num_classes, int(config.seed))
    out[name] = {split: _scores(data[split][2], predict(x[split]),
                                task.num_classes)
                 for split in ('validation', 'test')}
    out[name]['seconds'] = round(time.monotonic() - start, 1)
    logging.info('baselines: %s test accuracy %.4f (%.0fs)', name,
                 out[name]['test']['accuracy'], out[name]['seconds'])
  result = {'task': task.name, 'preset': config.get('preset'),
            'examples': {s: int(len(data[s][2])) for s in tasks.SPLITS},
            'settings': {'learning_rate': LEARNING_RATE,
                         'batch_size': BATCH_SIZE, 'epochs': EPOCHS},
            'baselines': out}
  writer_lib.write_json_atomic(os.path.join(workdir, 'baselines.json'),
                               result)
  print(table(result))
  return result


def table(result: dict) -> str:
  if 'bits_per_byte' in next(iter(result['baselines'].values()))['test']:
    lines = [f'Baselines on {result["task"]} (test; smoothing chosen on '
             'validation):', '| baseline | bits per byte |', '|---|---:|']
    for name, b in result['baselines'].items():
      lines.append(f'| {name} | {b["test"]["bits_per_byte"]:.3f} |')
    return '\n'.join(lines)
  lines = [f'Baselines on {result["task"]} (test; chosen on validation):',
           '| baseline | accuracy (%) | macro F1 |', '|---|---:|---:|']
  for name, b in result['baselines'].items():
    lines.append(f'| {name} | {100 * b["test"]["accuracy"]:.2f} | '
                 f'{b["test"]["f1_macro"]:.3f} |')
  return '\n'.join(lines)
