"""`match`: one label for a pair of documents (LRA's two-document
retrieval): does document b match document a?

Fields: inputs int32 [2, n] (the two documents, each right-padded with 0),
length int32 [2], label int32 [] in [0, num_classes).

Both documents run through the one shared encoder (as one batch of 2b
sequences), are pooled as `classify` pools (model.pooling), and their
encodings a and b are combined as [a, b, a * b, a - b] (LRA's dual-encoder
head with its NLI interaction), then an MLP: Linear(4 dim, mlp_dim), ReLU,
Linear(mlp_dim, mlp_dim // 2), ReLU, Linear(mlp_dim // 2, num_classes).
Loss, evaluation arrays and metrics are those of `classify` (inherited).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tasks.heads import classify


class Head(classify.Head):
  """Two pooled encodings -> [a, b, a*b, a-b] -> MLP -> class logits."""

  FIELDS = ('inputs', 'length', 'label')

  def __init__(self, task, model_cfg, *, dtype, rngs):
    classify.check_pooling(model_cfg.pooling, task)
    if model_cfg.mlp_dim < 2:
      raise ValueError(f'model.mlp_dim={model_cfg.mlp_dim} must be >= 2 for '
                       'the match head (its second layer is mlp_dim // 2)')
    self.pooling = model_cfg.pooling
    self.num_classes = task.num_classes
    hidden = model_cfg.mlp_dim
    lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, rngs=rngs)
    self.hidden1 = lin(4 * model_cfg.dim, hidden)
    self.hidden2 = lin(hidden, hidden // 2)
    self.logits = lin(hidden // 2, task.num_classes)

  def encode_pair(self, encoder, batch, *, attention_rng, dropout_rng=None):
    """(a, b): the pooled encodings [b, dim] of the two documents."""
    inputs, lengths = batch['inputs'], batch['length']  # [b, 2, n], [b, 2]
    b, _, n = inputs.shape
    flat_lengths = lengths.reshape(2 * b)
    x = encoder(inputs.reshape(2 * b, n), flat_lengths,
                attention_rng=attention_rng, dropout_rng=dropout_rng)
    pooled = classify.pool(x, flat_lengths, self.pooling).reshape(b, 2, -1)
    return pooled[:, 0], pooled[:, 1]

  def __call__(self, encoder, batch, *, attention_rng, dropout_rng=None):
    a, b = self.encode_pair(encoder, batch, attention_rng=attention_rng,
                            dropout_rng=dropout_rng)
    x = jnp.concatenate([a, b, a * b, a - b], axis=-1)
    x = jax.nn.relu(self.hidden1(x))
    x = jax.nn.relu(self.hidden2(x))
    return self.logits(x).astype(jnp.float32)
