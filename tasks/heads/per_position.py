"""`per_position`: a class at every position, scored where weighted (MQAR's
queries, copy's second half).

Fields: inputs int32 [n], length int32 [], targets int32 [n] (the class of
each position; the task shifts next-token targets), weights float32 [n]
(1.0 where the position is scored, else 0.0).

Logits: a linear map of every position's encoding, in float32. Loss:
softmax cross-entropy summed over scored positions; an example's weight is
its number of scored positions. Metrics: accuracy over scored positions,
whole-sequence accuracy, number of positions (tasks/metrics.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from tasks import metrics as metrics_lib


class Head(nnx.Module):
  """Encoding -> linear -> logits [b, n, num_classes]."""

  FIELDS = ('inputs', 'length', 'targets', 'weights')

  def __init__(self, task, model_cfg, *, dtype, rngs):
    self.logits = nnx.Linear(model_cfg.dim, task.num_classes, dtype=dtype,
                             rngs=rngs)

  def __call__(self, encoder, batch, *, attention_rng, dropout_rng=None):
    x = encoder(batch['inputs'], batch['length'], attention_rng=attention_rng,
                dropout_rng=dropout_rng)
    return self.token_logits(x)

  def token_logits(self, x):
    """Logits [..., num_classes] float32 of encodings [..., dim] (what
    generation reads at each new position)."""
    return self.logits(x).astype(jnp.float32)

  def loss(self, logits, batch):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch['targets'])
    w = batch['weights']
    return (ce * w).sum(-1), w.sum(-1)

  def evaluation(self, logits, batch):
    return {'predictions': jnp.argmax(logits, -1),
            'targets': batch['targets'], 'weights': batch['weights']}

  def metrics(self, arrays):
    return metrics_lib.position_accuracy(
        arrays['targets'], arrays['predictions'], arrays['weights'])
