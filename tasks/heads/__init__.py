"""Heads: how a task uses the shared encoder, and what it is scored on.

A head is an nnx.Module that owns everything task-specific about the model's
output, so the model, the trainer and the step builder never branch on a
head's name:

  Head(task, model_cfg, *, dtype, rngs)   its output layers (the task gives
      num_classes and seq_len; model_cfg the widths and `pooling`)
  head(encoder, batch, *, attention_rng, dropout_rng=None) -> outputs
      runs the encoder (encoder(inputs [b, n], lengths [b], ...) -> [b, n,
      dim]) on the batch's documents and maps the result to outputs
      (logits); a dropout_rng is given when training and None when
      evaluating (dropout, and the match head's batch statistics)
  head.loss(outputs, batch) -> (loss [b], weight [b])
      per-example summed loss and its weight; a step minimises
      sum(loss) / sum(weight)
  head.evaluation(outputs, batch) -> {name: [b, ...]}
      per-example arrays fetched to the host during evaluation
  head.metrics(arrays) -> {name: value}
      the split's metrics from the concatenated evaluation arrays (they
      include the per-example 'loss' and 'weight'); every head reports
      'accuracy'
  FIELDS      the example fields the head reads (each module documents them)
  BEST        (metric, 'max' or 'min'): the validation metric that selects
      the best checkpoint; ('accuracy', 'max') when a head does not say

Adding a head: one module here and one registry line.
"""
from __future__ import annotations

import importlib

# name -> module in this package
_REGISTRY = {
    'classify': 'classify',
    'per_position': 'per_position',
    'match': 'match',
    'lm': 'lm',
}
NAMES = tuple(_REGISTRY)


def get(name: str):
  """The head class registered as `name`."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown head {name!r}; valid heads: '
                     f'{", ".join(NAMES)}')
  return importlib.import_module(f'tasks.heads.{_REGISTRY[name]}').Head
