"""Attention variants behind one contract (see docs/ARCHITECTURE.md).

    import attention_variants as av
    out = av.attend(q, k, v, spec, causal=False, q_lengths=None,
                    kv_lengths=None, rng=None)
    w = av.attention_weights(q, k, v, spec, ...)

`spec` is a mapping: spec['kind'] names the variant, spec[kind] holds its
hyperparameters (missing ones take the variant's DEFAULTS), and
spec['implementation'] says how to compute it. Each variant module exposes
`attend`, `weights`, `DEFAULTS` and `IMPLEMENTATIONS`.
"""
from __future__ import annotations

from collections.abc import Mapping

from attention_variants import blockwise
from attention_variants import full
from attention_variants import local
from attention_variants import lsh
from attention_variants import sparse

_VARIANTS = {
    'full': full,
    'blockwise': blockwise,
    'local': local,
    'lsh': lsh,
    'sparse': sparse,
    'bigbird': sparse.bigbird,
}
KINDS = tuple(_VARIANTS)


def defaults(kind: str) -> dict:
  """A copy of the registered variant's default hyperparameters."""
  if kind not in _VARIANTS:
    raise ValueError(f'unknown attention kind {kind!r}; valid kinds: '
                     f'{", ".join(KINDS)}')
  return dict(_VARIANTS[kind].DEFAULTS)


def _as_dict(x):
  if x is None:
    return {}
  if hasattr(x, 'to_dict'):
    return x.to_dict()
  return dict(x)


def resolve(spec: Mapping):
  """(module, params, implementation) for a spec; ValueError on bad input."""
  kind = spec['kind'] if 'kind' in spec else None
  if kind not in _VARIANTS:
    raise ValueError(f'unknown attention kind {kind!r}; valid kinds: '
                     f'{", ".join(KINDS)}')
  module = _VARIANTS[kind]
  given = _as_dict(spec[kind]) if kind in spec else {}
  unknown = sorted(set(given) - set(module.DEFAULTS))
  if unknown:
    raise ValueError(
        f'unknown attention.{kind} parameter(s) {", ".join(unknown)}; valid: '
        f'{", ".join(sorted(module.DEFAULTS)) or "(none)"}')
  params = {**module.DEFAULTS, **given}
  impl = spec['implementation'] if 'implementation' in spec else 'auto'
  if impl not in module.IMPLEMENTATIONS:
    raise ValueError(
        f'attention.implementation={impl!r} is not available for {kind}; '
        f'valid: {", ".join(module.IMPLEMENTATIONS)}')
  return module, params, impl


def attend(q, k, v, spec, *, causal=False, q_lengths=None, kv_lengths=None,
           rng=None):
  """Attention output [batch, q_len, heads, head_dim] in q's dtype."""
  module, params, impl = resolve(spec)
  return module.attend(q, k, v, params, implementation=impl, causal=causal,
                       q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng)


def attention_weights(q, k, v, spec, *, causal=False, q_lengths=None,
                      kv_lengths=None, rng=None):
  """Dense float32 probabilities [batch, heads, q_len, kv_len] the variant used.

  For tests and pictures on short sequences only.
  """
  module, params, impl = resolve(spec)
  return module.weights(q, k, v, params, implementation=impl, causal=causal,
                        q_lengths=q_lengths, kv_lengths=kv_lengths, rng=rng)


def validate(spec: Mapping):
  """Raises ValueError for an unknown kind, parameter or implementation."""
  module, params, _ = resolve(spec)
  check = getattr(module, 'check_params', None)
  if check is not None:
    check(params)
