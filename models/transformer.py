"""Flax NNX Transformer encoder whose attention is any registered variant.

Pre-LayerNorm blocks; learned or sinusoidal positions; a final LayerNorm.
Attention is called only through `attention_variants.attend`, with padding
given as lengths, so a variant swap is one config field. `model.remat`
trades compute for activation memory (Encoder: `_scan_blocks`). The encoder knows
nothing of tasks: `Model` pairs it with a head (tasks/heads), which decides
how the encoder is used and what comes out.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention_variants as av
from attention_variants import sequence_parallel

POS_EMBS = ('learned', 'sinusoidal')
# Mesh axes the model knows by name (train/sharding.py builds the mesh): the
# batch is split over BATCH_AXES; under a mesh whose SEQUENCE_AXIS has more
# than one device, activations are split along the length and attention is
# sequence-parallel (attention_variants/sequence_parallel.py).
BATCH_AXES = ('data', 'fsdp')
SEQUENCE_AXIS = 'sequence'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.remat: what the backward pass recomputes instead of keeping.
REMATS = ('none', 'block', 'attention')
# Save nothing inside a rematerialised region (only its inputs, which the
# caller holds anyway): the least memory, for one more forward pass of the
# region. dots_with_no_batch_dims_saveable would keep every projection's
# and the MLP's outputs, most of what `block` is there to drop.
REMAT_POLICY = jax.checkpoint_policies.nothing_saveable


def dropout(x, rate: float, rng):
  """Inverted dropout; identity when rng is None (evaluation) or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def sequence_mesh():
  """The mesh the step is traced under (jax.set_mesh) when its
  SEQUENCE_AXIS splits the sequence; else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get(SEQUENCE_AXIS, 1) == 1:
    return None
  return mesh


def constrain_activations(x):
  """x [b, n, dim] with b split over BATCH_AXES and n over SEQUENCE_AXIS
  under a sequence-parallel mesh; unchanged otherwise."""
  mesh = sequence_mesh()
  if mesh is None:
    return x
  batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.PartitionSpec(batch, SEQUENCE_AXIS, None))


def _split(rng, n):
  return [None] * n if rng is None else list(jax.random.split(rng, n))


class Attention(nnx.Module):
  """Multi-head (grouped-query) self-attention through `av.attend`."""

  def __init__(self, dim, num_heads, num_kv_heads, spec, *, max_len, dtype,
               rngs, remat=False):
    if dim % num_heads:
      raise ValueError(f'model.dim={dim} must be divisible by '
                       f'model.num_heads={num_heads}')
    if num_heads % num_kv_heads:
      raise ValueError(f'model.num_heads={num_heads} must be a multiple of '
                       f'model.num_kv_heads={num_kv_heads}')
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim = dim // num_heads
    self.spec, self.dtype = spec, dtype
    self.remat = remat            # recompute av.attend in the backward pass
    lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, rngs=rngs)
    self.query = lin(dim, num_heads * self.head_dim)
    self.key = lin(dim, num_kv_heads * self.head_dim)
    self.value = lin(dim, num_kv_heads * self.head_dim)
    self.out = lin(num_heads * self.head_dim, dim)
    # The kind's own parameters (av.init_learned), trained with the rest;
    # None for a parameter-free kind, whose state is then unchanged.
    # Assigned once: an attribute first set to None is static in nnx and
    # cannot later hold the (data) dict.
    if av.owns_parameters(spec):
      learned = av.init_learned(
          spec, rngs.params(), num_heads=num_heads, num_kv_heads=num_kv_heads,
          head_dim=self.head_dim, max_len=max_len)
      self.learned = nnx.Dict({name: nnx.Param(jnp.asarray(value))
                               for name, value in learned.items()})
    else:
      self.learned = None

  def _qkv(self, x):
    b, n, _ = x.shape
    q = self.query(x).reshape(b, n, self.num_heads, self.head_dim)
    k = self.key(x).reshape(b, n, self.num_kv_heads, self.head_dim)
    v = self.value(x).reshape(b, n, self.num_kv_heads, self.head_dim)
    return q, k, v

  def _learned(self):
    return (None if self.learned is None else
            {name: p[...] for name, p in self.learned.items()})

  def __call__(self, x, lengths, *, causal, attention_rng):
    q, k, v = self._qkv(x)
    mesh = sequence_mesh()

    def attend(q, k, v, lengths, rng, learned):
      kw = dict(causal=causal, q_lengths=lengths, kv_lengths=lengths,
                rng=rng, learned=learned)
      if mesh is None:
        return av.attend(q, k, v, self.spec, **kw)
      return sequence_parallel.attend(
          q, k, v, self.spec, mesh=mesh, axis=SEQUENCE_AXIS,
          batch_axes=tuple(a for a in BATCH_AXES if a in mesh.shape), **kw)
    if self.remat:  # keep q, k, v; recompute the variant's internals
      attend = jax.checkpoint(attend, policy=REMAT_POLICY)
    y = attend(q, k, v, lengths, attention_rng, self._learned())
    return self.out(y.reshape(x.shape[0], x.shape[1], -1))

  def decode_init(self, batch, max_len, *, attention_rng):
    """The kind's causal decoding state (av.decode_init) for this layer."""
    return av.decode_init(self.spec, batch=batch, max_len=max_len,
                          num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads,
                          head_dim=self.head_dim, dtype=self.dtype,
                          rng=attention_rng,
                          learned=self._learned())

  def decode(self, x, pos, state):
    """(output [b, dim], state) of one token per row x [b, dim] at `pos`."""
    q, k, v = (t[:, 0] for t in self._qkv(x[:, None]))
    y, state = av.decode_step(q, k, v, state, pos, self.spec)
    return self.out(y.astype(x.dtype).reshape(x.shape[0], -1)), state

  def weights(self, x, lengths, *, causal, attention_rng, parts=False):
    """The dense float32 probabilities [b, heads, n, n] that __call__ on the
    same arguments uses (av.attention_weights of its q, k, v); with parts,
    also their split by component (av.attention_parts, {} for a kind
    without components): (weights, parts)."""
    q, k, v = self._qkv(x)
    kw = dict(causal=causal, q_lengths=lengths, kv_lengths=lengths,
              rng=attention_rng, learned=self._learned())
    w = av.attention_weights(q, k, v, self.spec, **kw)
    return (w, av.attention_parts(q, k, v, self.spec, **kw)) if parts else w


class Block(nnx.Module):
  """Pre-LN: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg, spec, *, max_len, dtype, rngs):
    kv_heads = cfg.num_kv_heads or cfg.num_heads
    self.ln1 = nnx.LayerNorm(cfg.dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(cfg.dim, cfg.num_heads, kv_heads, spec,
                          max_len=max_len, dtype=dtype, rngs=rngs,
                          remat=remat(cfg) == 'attention')
    self.ln2 = nnx.LayerNorm(cfg.dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(cfg.dim, cfg.mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(cfg.mlp_dim, cfg.dim, dtype=dtype, rngs=rngs)
    self.rate = cfg.dropout

  def __call__(self, x, lengths, *, causal, attention_rng, dropout_rng):
    r1, r2 = _split(dropout_rng, 2)
    h = self.attn(self.ln1(x), lengths, causal=causal,
                  attention_rng=attention_rng)
    x = x + dropout(h, self.rate, r1)
    return x + dropout(self._mlp(x), self.rate, r2)

  def _mlp(self, x):
    return self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln2(x))))

  def decode(self, x, pos, state):
    """__call__ for one token per row (x [b, dim]) at `pos`, evaluation
    mode: (output, the attention's new decoding state)."""
    h, state = self.attn.decode(self.ln1(x), pos, state)
    x = x + h
    return x + self._mlp(x), state


def layer_spec(spec: dict, layer: int) -> dict:
  """The attention spec of one layer: a variant's `seed` offset by the layer.

  Seeded patterns (BigBird's random blocks; LSH rotations when no rng is
  given) are thereby fixed per layer and differ between layers.
  """
  kind = spec['kind']
  params = spec.get(kind, {})
  if 'seed' not in params:
    return spec
  return {**spec, kind: {**params, 'seed': params['seed'] + layer}}


def sinusoidal(max_len: int, dim: int) -> np.ndarray:
  pos = np.arange(max_len)[:, None]
  freq = np.exp(-np.log(10_000.0) * np.arange(0, dim, 2) / dim)
  table = np.zeros((max_len, dim), np.float32)
  table[:, 0::2] = np.sin(pos * freq)
  table[:, 1::2] = np.cos(pos * freq)[:, : dim // 2]
  return table


def remat(model_cfg) -> str:
  """model.remat ('none' for a config written before the field existed, as
  an older run's config.json); ValueError naming the field otherwise."""
  value = model_cfg.get('remat', 'none')
  if value not in REMATS:
    raise ValueError(f'model.remat={value!r}; valid: {", ".join(REMATS)}')
  return value


def activation_dtype(model_cfg):
  """The jnp dtype of model.dtype; ValueError naming the field otherwise."""
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f'model.dtype={model_cfg.dtype!r}; valid: '
                     f'{", ".join(DTYPES)}')
  return DTYPES[model_cfg.dtype]


class Encoder(nnx.Module):
  """Embeddings -> pre-LN blocks -> final LN.

  __call__(inputs int [b, n], lengths int [b], *, attention_rng,
  dropout_rng=None) returns [b, n, dim] in the activation dtype.

  model.remat='block' runs the blocks as one rematerialised lax.scan over
  their parameters stacked on the fly (`_scan_blocks`); 'attention'
  rematerialises each av.attend call (Attention) in the usual loop. The
  parameters stay one Block per layer either way, so initialisation,
  checkpoints, decoding and attention maps are those of model.remat='none'.
  """

  def __init__(self, cfg, spec, *, vocab_size, max_len, causal, rngs):
    if cfg.pos_emb not in POS_EMBS:
      raise ValueError(f'model.pos_emb={cfg.pos_emb!r}; valid: '
                       f'{", ".join(POS_EMBS)}')
    dtype = activation_dtype(cfg)
    for name in ('num_layers', 'dim', 'num_heads', 'mlp_dim'):
      if cfg[name] < 1:
        raise ValueError(f'model.{name}={cfg[name]} must be >= 1')
    if not 0.0 <= cfg.dropout < 1.0:
      raise ValueError(f'model.dropout={cfg.dropout} must be in [0, 1)')
    if cfg.num_kv_heads < 0:
      raise ValueError(f'model.num_kv_heads={cfg.num_kv_heads} must be >= 0 '
                       '(0: as many as model.num_heads)')
    av.validate(spec)
    self.causal, self.rate = causal, cfg.dropout
    self.remat = remat(cfg)
    self.embed = nnx.Embed(vocab_size, cfg.dim, dtype=dtype, rngs=rngs)
    if cfg.pos_emb == 'learned':
      self.pos = nnx.Param(
          nnx.initializers.normal(0.02)(rngs.params(), (max_len, cfg.dim)))
    else:
      self.pos = nnx.Variable(jnp.asarray(sinusoidal(max_len, cfg.dim)))
    self.blocks = nnx.List([Block(cfg, layer_spec(spec, i), max_len=max_len,
                                  dtype=dtype, rngs=rngs)
                            for i in range(cfg.num_layers)])
    self.ln = nnx.LayerNorm(cfg.dim, dtype=dtype, rngs=rngs)

  def _embed(self, inputs):
    n = inputs.shape[1]
    return self.embed(inputs) + self.pos[...][:n].astype(self.embed.dtype)

  def __call__(self, inputs, lengths, *, attention_rng, dropout_rng=None):
    rngs = _split(dropout_rng, len(self.blocks) + 1)
    x = dropout(self._embed(inputs), self.rate, rngs[-1])
    if self.remat == 'block':
      return self.ln(self._scan_blocks(x, lengths, attention_rng, rngs[:-1]))
    for i, block in enumerate(self.blocks):
      x = constrain_activations(x)
      x = block(x, lengths, causal=self.causal,
                attention_rng=jax.random.fold_in(attention_rng, i),
                dropout_rng=rngs[i])
    return self.ln(x)

  def _scan_blocks(self, x, lengths, attention_rng, dropout_rngs):
    """The loop of __call__ as a lax.scan over the blocks' states stacked
    here (a copy of the parameters; gradients flow back to each block's
    own), the same keys per layer. With model.remat='block' the scan body
    is rematerialised (REMAT_POLICY): the backward pass keeps only each
    block's input and recomputes one block at a time. XLA:CPU's memory
    analysis ignores jax.checkpoint around the blocks of a Python loop (the
    lra ListOps step stayed at 27.06 GB, although jax saved only the block
    inputs); inside a scan the recomputation cannot move out of the loop's
    backward iteration. A scan whose body is not rematerialised holds more
    than the loop (its residuals are stacked, not fused away), so
    model.remat='attention' keeps the loop.

    Layers whose static attributes differ (a seeded kind's per-layer seed,
    layer_spec) have different graph defs: the body then picks its layer's
    with lax.switch."""
    graphdefs, states = zip(*(nnx.split(block) for block in self.blocks))
    distinct, branch = [], []
    for graphdef in graphdefs:
      if graphdef not in distinct:
        distinct.append(graphdef)
      branch.append(distinct.index(graphdef))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    drop = None if dropout_rngs[0] is None else jnp.stack(dropout_rngs)
    causal = self.causal

    def run(graphdef, state, x, i, dropout_rng):
      return nnx.merge(graphdef, state)(
          x, lengths, causal=causal,
          attention_rng=jax.random.fold_in(attention_rng, i),
          dropout_rng=dropout_rng)

    def body(x, xs):
      state, i, b, dropout_rng = xs
      x = constrain_activations(x)
      if len(distinct) == 1:
        return run(distinct[0], state, x, i, dropout_rng), None
      return jax.lax.switch(b, [functools.partial(run, g) for g in distinct],
                            state, x, i, dropout_rng), None

    if self.remat == 'block':
      body = jax.checkpoint(body, policy=REMAT_POLICY)
    x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(len(graphdefs)),
                                  jnp.asarray(branch, jnp.int32), drop))
    return x

  def decode_init(self, batch, max_len, *, attention_rng):
    """[layers] of causal decoding states (av.decode_init), each with the
    key its layer's forward pass uses, for rows of up to max_len tokens."""
    if not self.causal:
      raise ValueError('decoding needs a causal encoder; this task\'s '
                       'attention is bidirectional')
    return [block.attn.decode_init(batch, max_len, attention_rng=
                                   jax.random.fold_in(attention_rng, i))
            for i, block in enumerate(self.blocks)]

  def decode_step(self, tokens, pos, states):
    """(encodings [b, dim] of the tokens [b] at position `pos`, new
    states): the evaluation forward pass's row `pos`, computed from the
    earlier tokens' states (av.decode_step), one token at a time."""
    x = self.embed(tokens) + self.pos[...][pos].astype(self.embed.dtype)
    new = []
    for block, state in zip(self.blocks, states):
      x, state = block.decode(x, pos, state)
      new.append(state)
    return self.ln(x), new

  def attention_maps(self, inputs, lengths, *, attention_rng, parts=False):
    """[layers] of the dense float32 attention probabilities [b, heads, n,
    n] that the evaluation forward pass (no dropout_rng) uses: layer i's
    are av.attention_weights of the q, k, v its block computes, with the
    key it is given; with parts, [layers] of (weights, their components)
    (Attention.weights). O(N^2) per layer: for pictures of short
    sequences."""
    x = self._embed(inputs)
    maps = []
    for i, block in enumerate(self.blocks):
      key = jax.random.fold_in(attention_rng, i)
      maps.append(block.attn.weights(block.ln1(x), lengths,
                                     causal=self.causal, attention_rng=key,
                                     parts=parts))
      x = block(x, lengths, causal=self.causal, attention_rng=key,
                dropout_rng=None)
    return maps


class Model(nnx.Module):
  """An encoder and a head; the head runs the encoder on the batch.

  __call__(batch, *, attention_rng, dropout_rng=None) -> the head's outputs.
  """

  def __init__(self, encoder: Encoder, head: nnx.Module):
    self.encoder, self.head = encoder, head

  def __call__(self, batch, *, attention_rng, dropout_rng=None):
    return self.head(self.encoder, batch, attention_rng=attention_rng,
                     dropout_rng=dropout_rng)
