"""Generation: continue a batch of prompts one token at a time.

    out = generate(model, prompts, lengths, max_new_tokens,
                   attention_rng=key, rng=key2, temperature=0.8, top_k=40)
    out['tokens']    [b, max_new_tokens], row i's continuation of its
                     lengths[i] prompt tokens
    out['logits']    [b, n - 1, vocab]: the logits read at every position
                     0 .. n - 2 of the buffer (n = prompt width +
                     max_new_tokens), prompt positions included

`model` is a transformer.Model whose encoder is causal and whose head maps
encodings to next-token logits (`token_logits`: the per_position and lm
heads). Rows are right-padded prompts of their own lengths; every row
reads position p at step p, and a position past a row's prompt takes the
token sampled from the previous position's logits, so rows of different
lengths share one loop and each continues its own prompt (a row's result
does not depend on the others, tested).

How each step is computed:
  decoded   kinds with a decoding state (av.can_decode: full and blockwise's
            key/value cache, local's and longformer's ring buffer of the
            window, linear's and performer's recurrent state, sparse's and
            bigbird's cache read only at the positions of their causal
            pattern): the token's row from the state, O(what the kind
            sees) per token; the state is built token by token over the
            prompt too.
  recompute every other kind (lsh, sinkhorn, synthesizer): the evaluation
            forward pass over the whole buffer with every row's length set
            to p + 1, read at p; O(forward) per token. This is the model applied to the prefix,
            never a different model; for lsh it differs from the forward
            over a longer sequence at the same position, because there
            later tokens take chunk slots that earlier queries see (its
            causal mask hides their values, not their places in the sort).
`decoding(spec)` says which applies.

Sampling (per row, from the float32 logits): temperature 0 is greedy
(argmax); otherwise the logits are divided by the temperature, cut to the
top_k largest (0: all) and to the smallest set whose probability reaches
top_p (nucleus sampling; 1.0: all; the most likely token always stays),
and one token is drawn with jax.random.categorical from `rng`.
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_variants as av


def decoding(spec) -> str:
  """'decoded' or 'recompute': how generate computes a step for a kind."""
  return 'decoded' if av.can_decode(spec) else 'recompute'


def filter_logits(logits, *, top_k: int = 0, top_p: float = 1.0):
  """logits [..., v] with the tokens outside the top_k largest and outside
  the nucleus of probability top_p set to -inf."""
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above a token
    keep_ranked = before < top_p                 # the first always stays
    keep = jnp.zeros_like(keep_ranked).at[
        tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_ranked)
    logits = jnp.where(keep, logits, neg)
  return logits


def sample(logits, rng, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0):
  """int32 [...]: the next token of every row of logits [..., v]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check(model, prompts, max_new_tokens: int, *, temperature: float,
          top_k: int, top_p: float) -> None:
  """ValueError naming what to change for a request generate cannot run."""
  if not model.encoder.causal:
    raise ValueError('generation needs a causal model: this task reads '
                     'its inputs bidirectionally')
  if not hasattr(model.head, 'token_logits'):
    raise ValueError('generation needs a head with next-token logits (the '
                     'lm and per_position heads)')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  n = prompts.shape[1] + max_new_tokens
  limit = model.encoder.pos.shape[0]
  if n > limit:
    raise ValueError(
        f'prompts of {prompts.shape[1]} tokens + max_new_tokens='
        f'{max_new_tokens} make {n} positions; the model has {limit}')
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f'temperature={temperature} must be >= 0, top_k='
                     f'{top_k} >= 0 and top_p={top_p} in (0, 1]')


def generate(model, prompts, lengths, max_new_tokens: int, *, attention_rng,
             rng=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, recompute: bool = False) -> dict:
  """{'tokens' [b, max_new_tokens], 'logits' [b, n - 1, vocab]} (module
  docstring). prompts int [b, width] right-padded, lengths int [b] >= 1.
  recompute=True recomputes the prefix even for a kind that decodes (a
  check of the decoding path; the decode benchmark times the same
  recomputation at the attention level)."""
  check(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(lengths, jnp.int32), attention_rng, rng,
                   max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, recompute=recompute)


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'temperature',
                                             'top_k', 'top_p', 'recompute'))
def _generate(model, prompts, lengths, attention_rng, rng, *,
              max_new_tokens, temperature, top_k, top_p, recompute):
  encoder = model.encoder
  b, width = prompts.shape
  n = width + max_new_tokens
  buffer = jnp.zeros((b, n), jnp.int32).at[:, :width].set(prompts)
  decoded = not recompute and all(decoding(block.attn.spec) == 'decoded'
                                  for block in encoder.blocks)
  states = (encoder.decode_init(b, n, attention_rng=attention_rng)
            if decoded else None)

  def step(carry, pos):
    states, buffer, key = carry
    if decoded:
      x, states = encoder.decode_step(buffer[:, pos], pos, states)
    else:
      prefix = jnp.full((b,), pos + 1, jnp.int32)
      x = encoder(buffer, prefix, attention_rng=attention_rng)[:, pos]
    logits = model.head.token_logits(x)
    key, draw = jax.random.split(key)
    token = sample(logits, draw, temperature=temperature, top_k=top_k,
                   top_p=top_p)
    keep = pos + 1 < lengths  # still inside the row's prompt
    buffer = buffer.at[:, pos + 1].set(
        jnp.where(keep, buffer[:, pos + 1], token))
    return (states, buffer, key), logits

  (_, buffer, _), logits = jax.lax.scan(step, (states, buffer, rng),
                                        jnp.arange(n - 1))
  starts = lengths[:, None] + jnp.arange(max_new_tokens)[None, :]
  return {'tokens': jnp.take_along_axis(buffer, starts, axis=1),
          'logits': jnp.moveaxis(logits, 0, 1)}


# --- Scoring a run's continuations -------------------------------------------


def continuation(example, prompt_tokens: int, new_tokens: int):
  """(prompt, reference) token arrays of a per-position example, or None
  when it is too short. The prompt is inputs[:p], p = prompt_tokens, or
  (0) one past the first scored position (copy: up to its second
  separator); the reference is the next new_tokens targets from there (0:
  every scored target after the prompt)."""
  weights = np.asarray(example['weights'])
  scored = np.flatnonzero(weights > 0)
  if not scored.size:
    return None
  p = prompt_tokens or int(scored[0]) + 1
  g = new_tokens or int((weights[p - 1:] > 0).sum())
  if g < 1 or p - 1 + g > int(example['length']):
    return None
  return (np.asarray(example['inputs'][:p]),
          np.asarray(example['targets'][p - 1:p - 1 + g]))


def score_run(workdir: str) -> dict | None:
  """Generates continuations of the run's test prompts from its best
  checkpoint (config.generation says how many, how long and how sampled),
  scores them (tasks/metrics.py: BLEU, chrF, ROUGE-1/2/L, exact match),
  writes RUN/generations.jsonl and adds `generation` to the test metrics
  of results.json; None when the run's config has no generation block or
  asks for no prompts."""
  from tasks import builders
  from tasks import metrics as metrics_lib
  from train import trainer as trainer_lib
  from train import writer as writer_lib
  config = trainer_lib.run_config(workdir)
  g = config.get('generation')
  if g is None or g.num_prompts == 0:
    return None
  for name in ('num_prompts', 'prompt_tokens', 'new_tokens',
               'exact_match_tokens', 'seed'):
    trainer_lib.check_range(f'generation.{name}', g[name], 0)
  trainer_lib.check_range('generation.batch_size', g.batch_size, 1)
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    model, best_step = trainer.best_model()
  finally:
    trainer.ckpts.close()
  task = trainer.task
  pairs = []
  source = task.source('test')
  for i in range(len(source)):
    pair = continuation(source[i], g.prompt_tokens, g.new_tokens)
    if pair is not None:
      pairs.append((i, *pair))
    if len(pairs) == g.num_prompts:
      break
  if not pairs:
    raise ValueError(
        f'no test example holds generation.prompt_tokens={g.prompt_tokens} '
        f'+ generation.new_tokens={g.new_tokens} tokens: lower them')
  width = max(len(p) for _, p, _ in pairs)
  new = max(len(r) for _, _, r in pairs)
  hyps, timed = [], []  # timed: (seconds, tokens made) per batch
  key = jax.random.key(g.seed)
  for start in range(0, len(pairs), g.batch_size):
    chunk = pairs[start:start + g.batch_size]
    prompts = np.stack([builders.padded(p, width) for _, p, _ in chunk])
    lengths = np.asarray([len(p) for _, p, _ in chunk], np.int32)
    key, draw = jax.random.split(key)
    t0 = time.time()
    out = generate(model, prompts, lengths, new,
                   attention_rng=trainer.eval_key, rng=draw,
                   temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
    tokens = np.asarray(out['tokens'])
    timed.append((time.time() - t0, tokens.size))
    hyps += [row[:len(r)] for row, (_, _, r) in zip(tokens, chunk)]
  refs = [r for _, _, r in pairs]
  hyp_text = [task.as_text(h) for h in hyps]
  ref_text = [task.as_text(r) for r in refs]
  scores = metrics_lib.generation_scores(
      hyp_text, ref_text, hypothesis_tokens=hyps, reference_tokens=refs,
      exact_tokens=g.exact_match_tokens)
  # The first batch's time includes compiling: the rate is the others'.
  later = timed[1:]
  rate = (sum(n for _, n in later) / sum(s for s, _ in later) if later
          else None)
  spec = model.encoder.blocks[0].attn.spec
  block = {'num_prompts': len(pairs), 'prompt_tokens': width,
           'new_tokens': new, 'temperature': g.temperature,
           'top_k': g.top_k, 'top_p': g.top_p,
           'exact_match_tokens': g.exact_match_tokens or new,
           'decoding': decoding(spec), 'best_step': best_step,
           'tokens_per_sec': rate, **scores}
  lines = [{'index': i, 'prompt': task.as_text(p), 'reference': ref,
            'generated': hyp}
           for (i, p, _), ref, hyp in zip(pairs, ref_text, hyp_text)]
  path = os.path.join(workdir, 'generations.jsonl')
  writer_lib.write_text_atomic(
      path, ''.join(json.dumps(line) + '\n' for line in lines))
  results_path = os.path.join(workdir, 'results.json')
  results = writer_lib.read_json_object(results_path, "this run's results")
  results['metrics']['test']['generation'] = block
  writer_lib.write_json_atomic(results_path, results)
  print(f'generation: {len(pairs)} test prompts, BLEU {scores["bleu"]:.2f}, '
        f'chrF {scores["chrf"]:.2f}, ROUGE-L {scores["rougeL"]:.2f}, exact '
        f'match {scores["exact_match"]:.1f}%; samples in {path}')
  return block

