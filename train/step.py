"""The one way to build a model, its optimizer and compiled steps.

    setup = step.build(config.model, config.attention, task, config.train,
                       seed=config.seed)
    keys = step.train_keys(base_key, i, av.redraw_every(config.attention))
    train_step = step.compile_train(setup, batch, keys, accum_steps=1)
    eval_step = step.compile_eval(setup, batch, key)

The model is an encoder (models/transformer.py) under the task's head
(tasks/heads): built in that order from one nnx.Rngs, so the parameters of a
seed never depend on which head is used. State is nnx.split((model,
optimizer)); the steps merge, run and split again, and are compiled ahead of
time (jax.jit(...).lower(...).compile()) so that FLOPs and memory are read
off the executables that run (train/profile.py). The trainer and the
compare sweep's efficiency cells both build through here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import transformer
from tasks import heads


def build_model(model_cfg, attention_spec, task, *, seed: int):
  """Encoder + the task's head, initialised from `seed`."""
  rngs = nnx.Rngs(params=seed)
  spec = (attention_spec.to_dict() if hasattr(attention_spec, 'to_dict')
          else dict(attention_spec))
  encoder = transformer.Encoder(model_cfg, spec, vocab_size=task.vocab_size,
                                max_len=task.seq_len, causal=task.causal,
                                rngs=rngs)
  head = heads.get(task.head)(
      task, model_cfg, dtype=transformer.activation_dtype(model_cfg),
      rngs=rngs)
  return transformer.Model(encoder, head)


def make_optimizer(t):
  """(AdamW with warmup + cosine decay and optional clipping, schedule)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(t.num_steps, t.warmup_steps + 1))
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  chain.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay))
  return optax.chain(*chain), schedule


def count_params(model) -> int:
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@dataclasses.dataclass
class Setup:
  """A model and its optimizer, split for jitted steps."""
  graphdef: Any
  state: Any
  schedule: Callable[[int], Any]   # step -> learning rate
  num_params: int
  head: Any                        # the model's head, for host-side metrics


def build(model_cfg, attention_spec, task, train_cfg, *, seed: int) -> Setup:
  model = build_model(model_cfg, attention_spec, task, seed=seed)
  tx, schedule = make_optimizer(train_cfg)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  return Setup(graphdef, state, schedule, count_params(model), model.head)


def _mean_loss(model, batch, attention_rng, dropout_rng):
  outputs = model(batch, attention_rng=attention_rng, dropout_rng=dropout_rng)
  loss, weight = model.head.loss(outputs, batch)
  return loss.sum() / jnp.maximum(weight.sum(), 1.0)


def train_keys(base_key, step: int, redraw_every: int = 1):
  """(attention key, dropout key) of training step `step`.

  Both are split from fold_in(base_key, step). With redraw_every R > 1 the
  attention key is the one of step R * floor(step / R): random features
  (Performer's) are then redrawn every R steps; R = 1 is a new key every
  step. Dropout always changes every step.
  """
  attention, dropout = jax.random.split(jax.random.fold_in(base_key, step))
  if redraw_every > 1 and step % redraw_every:
    attention, _ = jax.random.split(
        jax.random.fold_in(base_key, step - step % redraw_every))
  return attention, dropout


def make_train_step(graphdef, accum_steps: int = 1):
  """step(state, batch, (attention key, dropout key)) -> (state, {'loss',
  'grad_norm'}); the keys come from `train_keys`.

  With accum_steps > 1 the batch is split into that many micro-batches run
  one after another (a scan): the gradient is the same weighted mean over
  the whole batch, the memory that of one micro-batch; micro-batch i draws
  dropout from fold_in(dropout key, i).
  """
  def step(state, batch, keys):
    model, opt = nnx.merge(graphdef, state)
    attention_key, dropout_key = keys
    if accum_steps == 1:
      loss, grads = nnx.value_and_grad(_mean_loss)(
          model, batch, attention_key, dropout_key)
    else:
      loss, grads = _accumulated_grads(model, batch, accum_steps,
                                       attention_key, dropout_key)
    grad_norm = optax.tree.norm(grads)
    opt.update(model, grads)
    return nnx.state((model, opt)), {'loss': loss, 'grad_norm': grad_norm}
  return step


def _accumulated_grads(model, batch, accum_steps, attention_key, dropout_key):
  """(mean loss, its gradient) over the batch, one micro-batch at a time.

  State that is not a parameter (the match head's batch statistics) is
  threaded through the micro-batches in order and written back to `model`.
  """
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  micro = jax.tree.map(
      lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps,
                          *x.shape[1:]), batch)

  def sums(params, rest, mb, key):
    m = nnx.merge(model_def, params, rest, copy=True)
    outputs = m(mb, attention_rng=attention_key, dropout_rng=key)
    loss, weight = m.head.loss(outputs, mb)
    return loss.sum(), (weight.sum(), nnx.split(m, nnx.Param, ...)[2])

  def body(carry, xs):
    grads, loss_sum, weight_sum, rest = carry
    mb, i = xs
    (l, (w, rest)), g = jax.value_and_grad(sums, has_aux=True)(
        params, rest, mb, jax.random.fold_in(dropout_key, i))
    return (jax.tree.map(jnp.add, grads, g), loss_sum + l,
            weight_sum + w, rest), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, loss_sum, weight_sum, rest), _ = jax.lax.scan(
      body, (zeros, jnp.float32(0), jnp.float32(0), rest),
      (micro, jnp.arange(accum_steps)))
  nnx.update(model, rest)
  norm = jnp.maximum(weight_sum, 1.0)
  return loss_sum / norm, jax.tree.map(lambda g: g / norm, grads)


def make_eval_step(graphdef):
  """step(state, batch, key) -> {'loss', 'weight', head's evaluation arrays}."""
  def step(state, batch, attention_key):
    model, _ = nnx.merge(graphdef, state)
    outputs = model(batch, attention_rng=attention_key)
    loss, weight = model.head.loss(outputs, batch)
    return {**model.head.evaluation(outputs, batch), 'loss': loss,
            'weight': weight}
  return step


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where a step's arguments live (train/sharding.py decides): the state
  pytree's shardings, the batch's (a prefix of the batch dict) and the
  replicated one (keys, scalar outputs)."""
  state: Any
  batch: Any
  replicated: Any


def compile_train(setup: Setup, batch, keys, *, accum_steps: int = 1,
                  shardings: Shardings | None = None):
  """The train step compiled for these arguments' shapes (`keys` as from
  train_keys), with the state donated. With `shardings`, jitted with them
  as explicit in/out shardings (the state keeps its layout, the metrics are
  replicated); else for the arguments' own shardings."""
  kw = {} if shardings is None else dict(
      in_shardings=(shardings.state, shardings.batch, shardings.replicated),
      out_shardings=(shardings.state, shardings.replicated))
  return jax.jit(make_train_step(setup.graphdef, accum_steps),
                 donate_argnums=0, **kw).lower(
                     setup.state, batch, keys).compile()


def compile_eval(setup: Setup, batch, key, *,
                 shardings: Shardings | None = None):
  """The eval step compiled for these arguments (with `shardings`: the
  state's and the batch's as its in shardings, the per-example outputs
  split like the batch)."""
  kw = {} if shardings is None else dict(
      in_shardings=(shardings.state, shardings.batch, shardings.replicated),
      out_shardings=shardings.batch)
  return jax.jit(make_eval_step(setup.graphdef), **kw).lower(
      setup.state, batch, key).compile()
