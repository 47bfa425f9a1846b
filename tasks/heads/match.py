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

`model.pair_norm` (not in LRA's head):
  'batch' (default)  one BatchNorm over the 2b pooled encodings (a and b
      share it) before the features: batch statistics when training (the
      head is given a dropout_rng), running statistics (momentum 0.9) when
      evaluating, so a prediction never depends on the rest of its batch.
  'none'  LRA's head as released.
Why: a pooled encoding of a 1K-token document is one vector shared by every
document plus a small part that tells documents apart (a mean over 1K
tokens). The linear layers absorb the shared part, but a * b and a - b carry
the part that says "same source" only at the size of the small part, and
the label depends on |a - b|, not on its sign, so the MLP starts at a saddle
(loss ln 2 for hundreds of steps). Centring and scaling each feature over
the batch makes that part unit-sized (docs/quality.md has the runs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tasks.heads import classify

PAIR_NORMS = ('batch', 'none')


class Head(classify.Head):
  """Two pooled encodings -> [a, b, a*b, a-b] -> MLP -> class logits."""

  FIELDS = ('inputs', 'length', 'label')

  def __init__(self, task, model_cfg, *, dtype, rngs):
    classify.check_pooling(model_cfg.pooling, task)
    if model_cfg.pair_norm not in PAIR_NORMS:
      raise ValueError(f'model.pair_norm={model_cfg.pair_norm!r}; valid: '
                       f'{", ".join(PAIR_NORMS)}')
    if model_cfg.mlp_dim < 2:
      raise ValueError(f'model.mlp_dim={model_cfg.mlp_dim} must be >= 2 for '
                       'the match head (its second layer is mlp_dim // 2)')
    self.pooling = model_cfg.pooling
    self.norm = (nnx.BatchNorm(model_cfg.dim, momentum=0.9, dtype=dtype,
                               rngs=rngs)
                 if model_cfg.pair_norm == 'batch' else None)
    self.num_classes = task.num_classes
    hidden = model_cfg.mlp_dim
    lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, rngs=rngs)
    self.hidden1 = lin(4 * model_cfg.dim, hidden)
    self.hidden2 = lin(hidden, hidden // 2)
    self.logits = lin(hidden // 2, task.num_classes)

  def encode_pair(self, encoder, batch, *, attention_rng, dropout_rng=None):
    """(a, b): the pooled (and pair_norm-ed) encodings [b, dim] of the two
    documents; dropout_rng given means training (batch statistics)."""
    inputs, lengths = batch['inputs'], batch['length']  # [b, 2, n], [b, 2]
    b, _, n = inputs.shape
    flat_lengths = lengths.reshape(2 * b)
    x = encoder(inputs.reshape(2 * b, n), flat_lengths,
                attention_rng=attention_rng, dropout_rng=dropout_rng)
    pooled = classify.pool(x, flat_lengths, self.pooling)
    if self.norm is not None:
      pooled = self.norm(pooled, use_running_average=dropout_rng is None)
    pooled = pooled.reshape(b, 2, -1)
    return pooled[:, 0], pooled[:, 1]

  def __call__(self, encoder, batch, *, attention_rng, dropout_rng=None):
    a, b = self.encode_pair(encoder, batch, attention_rng=attention_rng,
                            dropout_rng=dropout_rng)
    x = jnp.concatenate([a, b, a * b, a - b], axis=-1)
    x = jax.nn.relu(self.hidden1(x))
    x = jax.nn.relu(self.hidden2(x))
    return self.logits(x).astype(jnp.float32)
