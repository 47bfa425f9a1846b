"""`classify`: one label per document, from a pooled encoding.

Fields: inputs int32 [n] (0 is padding, right-padded), length int32 [],
label int32 [] in [0, num_classes).

Pooling (model.pooling): 'cls' reads position 0 (the task puts a CLS token
there), 'mean' averages the valid positions. Logits are a linear map of the
pooled vector, in float32. Loss: softmax cross-entropy, weight 1 per example.
Metrics: accuracy, macro and per-class precision/recall/F1, confusion matrix
(tasks/metrics.py).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from tasks import metrics as metrics_lib

POOLINGS = ('cls', 'mean')


def check_pooling(pooling: str, task) -> None:
  if pooling not in POOLINGS:
    raise ValueError(f'model.pooling={pooling!r}; valid: '
                     f'{", ".join(POOLINGS)}')
  if pooling == 'cls' and not task.cls_token:
    raise ValueError(f"model.pooling='cls' reads a CLS token, which task "
                     f"{task.name} does not put at position 0; use "
                     "--config.model.pooling=mean")


def pool(x, lengths, pooling: str):
  """[b, n, d] -> [b, d]: position 0 ('cls') or the mean of valid positions."""
  if pooling == 'cls':
    return x[:, 0]
  valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
  return (x * valid[..., None]).sum(1) / jnp.maximum(lengths, 1)[:, None]


def label_loss(logits, labels):
  """(cross-entropy [b], weight 1 [b]) of class logits against labels."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return ce, jnp.ones_like(ce)


class Head(nnx.Module):
  """Pooled encoding -> linear -> class logits [b, num_classes]."""

  FIELDS = ('inputs', 'length', 'label')

  def __init__(self, task, model_cfg, *, dtype, rngs):
    check_pooling(model_cfg.pooling, task)
    self.pooling = model_cfg.pooling
    self.num_classes = task.num_classes
    self.logits = nnx.Linear(model_cfg.dim, task.num_classes, dtype=dtype,
                             rngs=rngs)

  def __call__(self, encoder, batch, *, attention_rng, dropout_rng=None):
    x = encoder(batch['inputs'], batch['length'], attention_rng=attention_rng,
                dropout_rng=dropout_rng)
    x = pool(x, batch['length'], self.pooling)
    return self.logits(x).astype(jnp.float32)

  def loss(self, logits, batch):
    return label_loss(logits, batch['label'])

  def evaluation(self, logits, batch):
    return {'predictions': jnp.argmax(logits, -1), 'label': batch['label']}

  def metrics(self, arrays):
    return metrics_lib.classification_metrics(
        arrays['label'], arrays['predictions'], self.num_classes)
