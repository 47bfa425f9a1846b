"""Attention variants behind one contract (see docs/ARCHITECTURE.md).

    import attention_variants as av
    out = av.attend(q, k, v, spec, causal=False, q_lengths=None,
                    kv_lengths=None, rng=None, learned=None)
    w = av.attention_weights(q, k, v, spec, ...)
    parts = av.attention_parts(q, k, v, spec, ...)  # {component: weights}
    learned = av.init_learned(spec, key, num_heads=..., num_kv_heads=...,
                              head_dim=..., max_len=...)

`spec` is a mapping: spec['kind'] names the variant, spec[kind] holds its
hyperparameters (missing ones take the registry's defaults below), and
spec['implementation'] says how to compute it. Each variant module exposes
`attend`, `weights`, `IMPLEMENTATIONS` and optionally `check_params`, and
documents its hyperparameters in its docstring. A kind whose pattern is made
of distinct components (a window and global keys, random blocks, hash
buckets, ...) also exposes `weight_parts`, with `weights`' arguments: a dict
{component name: dense probabilities}, disjoint and summing to `weights`,
from which pictures report the share of attention mass on each component.

Kinds that own learned parameters (Linformer's projections, Sinkhorn's
sorting network, ...) also expose

    init(key, params, *, num_heads, num_kv_heads, head_dim, max_len)
        -> dict[str, float32 array]

and their `attend` and `weights` take a keyword `learned` (that dict, or
one of the same structure being trained). The model creates the dict once
per layer through `init_learned`, holds each array as a trainable
parameter and passes it back through `attend(..., learned=...)`; it never
asks which kind it holds. `init_learned` of a parameter-free kind is {} and
its `attend` is called exactly as before (no `learned` keyword).

A kind that can decode causally one token at a time from a state (a
key/value cache, a ring buffer of its window, a recurrent state) exposes

    decode_init(params, *, batch, max_len, num_heads, num_kv_heads,
                head_dim, dtype, rng, learned) -> state (a pytree)
    decode_step(q, k, v, state, pos, params) -> (out [b, h, d], state)

(`can_decode`, `decode_init`, `decode_step` below); generation recomputes
the prefix for the others (evaluate/generate.py).

A kind whose random features are redrawn during training names the period
in a `redraw_every` hyperparameter; `redraw_every(spec)` reads it (1 for
every other kind) and the trainer then keeps the attention key fixed for
that many steps (train/step.py: train_keys).

The registry is plain data: importing this package imports neither jax nor
any variant (configs read the kinds and their defaults from it); a
variant's module is imported the first time it is used.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping

# kind -> (module in this package, default hyperparameters). The only place
# a default lives. Adding a variant: its module and one line here.
_REGISTRY = {
    'full': ('full', {}),
    'blockwise': ('blockwise', {'q_block': 512, 'kv_block': 512}),
    'local': ('local', {'window': 128, 'left': -1, 'right': -1,
                        'block': 128}),
    'lsh': ('lsh', {'n_hashes': 2, 'bucket_size': 64, 'n_buckets': 0,
                    'shared_qk': True, 'seed': 0}),
    'sparse': ('sparse', {'pattern': 'strided', 'block_size': 128,
                          'num_summary': 8}),
    'bigbird': ('bigbird', {'block_size': 64, 'num_global': 2,
                            'num_random': 3, 'seed': 0}),
    'linear': ('linear', {'chunk': 64}),
    'longformer': ('longformer', {'window': 128, 'num_global': 1,
                                  'block': 128}),
    'performer': ('performer', {'num_features': 256, 'redraw_every': 1,
                                'seed': 0, 'chunk': 64}),
    'nystromformer': ('nystromformer', {'num_landmarks': 64,
                                        'pinv_iterations': 6,
                                        'conv_kernel': 0}),
    'linformer': ('linformer', {'k': 256, 'share_heads': True,
                                'share_kv': False}),
    'synthesizer': ('synthesizer', {'mode': 'factorized_random', 'rank': 32,
                                    'dot_product': True, 'block': 512}),
    'sinkhorn': ('sinkhorn', {'block_size': 64, 'sinkhorn_iterations': 7,
                              'temperature': 0.75}),
}
KINDS = tuple(_REGISTRY)


def _check_kind(kind) -> None:
  if kind not in _REGISTRY:
    raise ValueError(f'unknown attention kind {kind!r}; valid kinds: '
                     f'{", ".join(KINDS)}')


def defaults(kind: str) -> dict:
  """A copy of the kind's default hyperparameters."""
  _check_kind(kind)
  return dict(_REGISTRY[kind][1])


def module(kind: str):
  """The variant's module (imported on first use)."""
  _check_kind(kind)
  return importlib.import_module(f'attention_variants.{_REGISTRY[kind][0]}')


def _as_dict(x):
  if x is None:
    return {}
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  return dict(x)


def resolve(spec: Mapping):
  """(module, params, implementation) for a spec; ValueError on bad input."""
  kind = spec['kind'] if 'kind' in spec else None
  _check_kind(kind)
  known = _REGISTRY[kind][1]
  given = _as_dict(spec[kind]) if kind in spec else {}
  unknown = sorted(set(given) - set(known))
  if unknown:
    raise ValueError(
        f'unknown attention.{kind} parameter(s) {", ".join(unknown)}; valid: '
        f'{", ".join(sorted(known)) or "(none)"}')
  params = {**known, **given}
  variant = module(kind)
  impl = spec['implementation'] if 'implementation' in spec else 'auto'
  if impl not in variant.IMPLEMENTATIONS:
    raise ValueError(
        f'attention.implementation={impl!r} is not available for {kind}; '
        f'valid: {", ".join(variant.IMPLEMENTATIONS)}')
  return variant, params, impl


def owns_parameters(spec: Mapping) -> bool:
  """Whether the spec's kind has learned parameters (its module has `init`)."""
  variant, _, _ = resolve(spec)
  return hasattr(variant, 'init')


def init_learned(spec: Mapping, key, *, num_heads: int, num_kv_heads: int,
                 head_dim: int, max_len: int) -> dict:
  """The kind's learned parameters for one layer: {name: float32 array}.

  {} for a parameter-free kind (`key` unused).
  """
  variant, params, _ = resolve(spec)
  if not hasattr(variant, 'init'):
    return {}
  return dict(variant.init(key, params, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, head_dim=head_dim,
                           max_len=max_len))


def _learned_kw(variant, kind, learned) -> dict:
  """The `learned` keyword for the variant's attend/weights. A kind that
  owns parameters always gets one (None read as {}: a configuration of it
  may have none, e.g. nystromformer without its convolution) and checks the
  dict itself; a parameter-free kind gets none and must not be given any."""
  if hasattr(variant, 'init'):
    return {'learned': {} if learned is None else learned}
  if learned:
    raise ValueError(f'attention kind {kind!r} has no learned parameters, '
                     f'got {", ".join(sorted(learned))}')
  return {}


def attend(q, k, v, spec, *, causal=False, q_lengths=None, kv_lengths=None,
           rng=None, learned=None):
  """Attention output [batch, q_len, heads, head_dim] in q's dtype."""
  variant, params, impl = resolve(spec)
  return variant.attend(q, k, v, params, implementation=impl, causal=causal,
                        q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng,
                        **_learned_kw(variant, spec['kind'], learned))


def attention_weights(q, k, v, spec, *, causal=False, q_lengths=None,
                      kv_lengths=None, rng=None, learned=None):
  """Dense float32 probabilities [batch, heads, q_len, kv_len] the variant used.

  For tests and pictures on short sequences only.
  """
  variant, params, impl = resolve(spec)
  return variant.weights(q, k, v, params, implementation=impl, causal=causal,
                         q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng,
                         **_learned_kw(variant, spec['kind'], learned))


def attention_parts(q, k, v, spec, *, causal=False, q_lengths=None,
                    kv_lengths=None, rng=None, learned=None) -> dict:
  """{component: dense float32 [batch, heads, q_len, kv_len]}: the weights
  of attention_weights split by the structural component that holds each
  key (its kind's docstring names them), summing to them; {} for a kind
  without such components (full, the kernel and low-rank kinds, local's
  single window). For tests and pictures on short sequences only."""
  variant, params, impl = resolve(spec)
  parts = getattr(variant, 'weight_parts', None)
  if parts is None:
    return {}
  return parts(q, k, v, params, implementation=impl, causal=causal,
               q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng,
               **_learned_kw(variant, spec['kind'], learned))


def supports_causal(spec: Mapping) -> bool:
  """Whether the kind has a causal form (linformer and nystromformer, whose
  modules set CAUSAL = False, mix future tokens into every row)."""
  variant, _, _ = resolve(spec)
  return getattr(variant, 'CAUSAL', True)


def can_decode(spec: Mapping) -> bool:
  """Whether the kind decodes one token at a time from a state
  (`decode_init`, `decode_step`); generation falls back to recomputing the
  prefix for a kind that does not (evaluate/generate.py)."""
  variant, _, _ = resolve(spec)
  return hasattr(variant, 'decode_step')


def decode_init(spec: Mapping, *, batch: int, max_len: int, num_heads: int,
                num_kv_heads: int, head_dim: int, dtype, rng=None,
                learned=None):
  """The causal decoding state of a kind before any token, for rows of up
  to max_len positions; `rng` and `learned` are those the forward pass
  would be given (a kind's random features are drawn here, once)."""
  variant, params, _ = resolve(spec)
  return variant.decode_init(params, batch=batch, max_len=max_len,
                             num_heads=num_heads, num_kv_heads=num_kv_heads,
                             head_dim=head_dim, dtype=dtype, rng=rng,
                             learned=learned)


def decode_step(q, k, v, state, pos, spec: Mapping):
  """(output [batch, heads, head_dim] float32, new state): causal attention
  of the token at position `pos` (a scalar, the same for every row), whose
  q [batch, heads, head_dim] and k, v [batch, kv_heads, head_dim] are
  given, over itself and the earlier tokens in `state`. Equal to row `pos`
  of attend(..., causal=True) on the whole sequence (tests/test_decode.py).
  """
  variant, params, _ = resolve(spec)
  return variant.decode_step(q, k, v, state, pos, params)


def redraw_every(spec: Mapping) -> int:
  """Steps between new attention keys in training: the kind's
  `redraw_every` hyperparameter, else 1 (a new key every step). 0 (never)
  counts as 1 here: such a kind ignores the key."""
  _, params, _ = resolve(spec)
  return max(int(params.get('redraw_every', 1)), 1)


def validate(spec: Mapping):
  """Raises ValueError for an unknown kind, parameter or implementation."""
  variant, params, _ = resolve(spec)
  check = getattr(variant, 'check_params', None)
  if check is not None:
    check(params)
