"""Attention variants behind one contract (see docs/ARCHITECTURE.md).

    import attention_variants as av
    out = av.attend(q, k, v, spec, causal=False, q_lengths=None,
                    kv_lengths=None, rng=None)
    w = av.attention_weights(q, k, v, spec, ...)

`spec` is a mapping: spec['kind'] names the variant, spec[kind] holds its
hyperparameters (missing ones take the registry's defaults below), and
spec['implementation'] says how to compute it. Each variant module exposes
`attend`, `weights`, `IMPLEMENTATIONS` and optionally `check_params`, and
documents its hyperparameters in its docstring.

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
                                        'pinv_iterations': 6}),
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


def attend(q, k, v, spec, *, causal=False, q_lengths=None, kv_lengths=None,
           rng=None):
  """Attention output [batch, q_len, heads, head_dim] in q's dtype."""
  variant, params, impl = resolve(spec)
  return variant.attend(q, k, v, params, implementation=impl, causal=causal,
                        q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng)


def attention_weights(q, k, v, spec, *, causal=False, q_lengths=None,
                      kv_lengths=None, rng=None):
  """Dense float32 probabilities [batch, heads, q_len, kv_len] the variant used.

  For tests and pictures on short sequences only.
  """
  variant, params, impl = resolve(spec)
  return variant.weights(q, k, v, params, implementation=impl, causal=causal,
                         q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng)


def validate(spec: Mapping):
  """Raises ValueError for an unknown kind, parameter or implementation."""
  variant, params, _ = resolve(spec)
  check = getattr(variant, 'check_params', None)
  if check is not None:
    check(params)
