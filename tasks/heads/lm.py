"""`lm`: next-token language modelling, scored in nats and bits per byte.

Fields: those of `per_position` (inputs, length, targets: the next token at
each position, weights: 1.0 where that target is scored, e.g. a byte).

Logits, loss and predictions are per_position's: a linear map of every
position's encoding, softmax cross-entropy summed over scored positions.
Metrics: loss (nats per scored token; with byte tokens, per byte),
perplexity exp(loss), bits_per_byte loss / ln 2, next-token accuracy and
the number of scored positions. The best checkpoint is the one with the
lowest validation bits per byte (`BEST`).
"""
from __future__ import annotations

import math

import numpy as np

from tasks import metrics as metrics_lib
from tasks.heads import per_position


class Head(per_position.Head):
  """per_position's output layer, with language-model metrics."""

  BEST = ('bits_per_byte', 'min')

  def metrics(self, arrays):
    out = metrics_lib.position_accuracy(
        arrays['targets'], arrays['predictions'], arrays['weights'])
    del out['sequence_accuracy']  # whole windows right: never, for text
    nats = float(np.sum(arrays['loss']) / max(np.sum(arrays['weight']), 1.0))
    out.update(perplexity=math.exp(min(nats, 700.0)),
               bits_per_byte=nats / math.log(2))
    return out
