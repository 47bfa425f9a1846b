"""Defaults shared by every task config, and the preset machinery.

Task configs (configs/<task>.py) start from `base()` and apply a preset:
  python main.py --config=configs/listops.py:cpu --workdir=/tmp/run
Every field can be overridden from the command line, e.g.
  --config.attention.kind=local --config.attention.local.window=64
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections

import attention_variants as av


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                    # model init, dropout, data order, attention rng
  c.data_dir = ''               # TFDS data dir; '' -> $TFDS_DATA_DIR or ./tfds_data
  c.task = ml_collections.ConfigDict()  # filled by the task config

  c.model = ml_collections.ConfigDict(dict(
      num_layers=2,             # transformer blocks
      dim=64,                   # residual width
      num_heads=4,              # query heads
      num_kv_heads=0,           # key/value heads (GQA); 0 -> num_heads
      mlp_dim=128,              # hidden width of each block's MLP
      dropout=0.0,              # dropout on residual branches and embeddings
      pos_emb='learned',        # 'learned' | 'sinusoidal'
      pooling='cls',            # classification pooling: 'cls' | 'mean'
      pair_norm='batch',        # match head: 'batch' (BatchNorm of the pooled
                                # encodings) | 'none' (LRA's head)
      dtype='float32',          # activation dtype: 'float32' | 'bfloat16'
      remat='none',             # recompute in the backward pass instead of
                                # keeping activations (same model and
                                # gradients, more compute): 'none' | 'block'
                                # (the blocks run as a lax.scan, each keeping
                                # only its input) | 'attention' (each
                                # attention call keeps only q, k, v); policy
                                # nothing_saveable (models/transformer.py)
  ))

  # What is computed (kind + that kind's block) and how (implementation).
  c.attention = ml_collections.ConfigDict(dict(
      kind='full',              # one of attention_variants.KINDS
      implementation='auto',    # 'auto' | 'xla' | 'cudnn' | 'pallas' | 'reference'
  ))
  # One block per registered variant with its hyperparameters; the defaults
  # live in the registry (attention_variants/__init__.py) and each variant's
  # module docstring documents them.
  for kind in av.KINDS:
    c.attention[kind] = av.defaults(kind)

  # The device mesh (train/sharding.py): axis sizes whose product is the
  # device count; -1 takes the devices left over. Run control: a run may
  # resume on another mesh.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,                  # data parallel: the batch split, rest copied
      fsdp=1,                   # batch split and parameters + optimizer
                                # state sharded (each array's largest
                                # dimension that this divides)
      sequence=1,               # activations split along the sequence;
                                # attention sequence-parallel
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=32,            # global batch; divisible by mesh data x fsdp
      num_steps=1000,           # optimizer steps
      learning_rate=1e-3,       # peak learning rate
      warmup_steps=100,         # linear warmup, then cosine decay to 0
      weight_decay=0.01,        # AdamW decoupled weight decay
      b1=0.9,                   # Adam beta1
      b2=0.98,                  # Adam beta2
      eps=1e-9,                 # Adam epsilon
      grad_clip=1.0,            # global-norm gradient clipping; 0 disables
      eval_every=200,           # validation every N steps (and at the end)
      log_every=50,             # progress line + metrics.jsonl every N steps
      checkpoint_every=200,     # latest checkpoint every N steps (and at the end)
      eval_batch_size=0,        # 0 -> batch_size
      grad_accum_steps=1,       # micro-batches per step (same mean gradient,
                                # 1/k of the activation memory)
  ))
  return c


def generation(**overrides) -> ml_collections.ConfigDict:
  """config.generation of the causal next-token tasks (lm, copy): what
  training's end and --mode=evaluate generate from the best checkpoint and
  score (evaluate/generate.py: score_run). Read only then, so changing it
  never makes a run another experiment."""
  return ml_collections.ConfigDict({**dict(
      num_prompts=64,           # test examples continued; 0 -> none
      prompt_tokens=256,        # prompt: the first N tokens of an example;
                                # 0 -> up to its first scored token
      new_tokens=64,            # tokens generated per prompt; 0 -> as many
                                # as the example scores after the prompt
      temperature=0.0,          # 0 -> greedy; else sampled at this
      top_k=0,                  # sample from the k likeliest; 0 -> all
      top_p=1.0,                # nucleus: the likeliest tokens up to this
                                # probability mass; 1.0 -> all
      exact_match_tokens=16,    # exact match of the first N tokens; 0 -> all
      batch_size=16,            # prompts generated at once
      seed=0,                   # sampling
  ), **overrides})


def with_preset(config: ml_collections.ConfigDict, arg: str | None,
                presets: Mapping[str, Callable[[ml_collections.ConfigDict], None]],
                default: str) -> ml_collections.ConfigDict:
  """Applies the named preset in place; unknown names list the valid ones."""
  name = arg or default
  if name not in presets:
    raise ValueError(f'unknown preset {name!r}; valid presets: '
                     f'{", ".join(presets)}')
  presets[name](config)
  config.preset = name          # recorded in config.json and results.json
  return config
