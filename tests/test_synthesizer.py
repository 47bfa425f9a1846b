"""Synthesizer (Tay et al. 2021) against a direct float64 numpy computation
written out here from attention_variants/synthesizer.py's docstring:
outputs and gradients (q, k, v and every learned array, the backward pass
by hand), each mode with and without the dot product, causal and
bidirectional, padding, GQA and a max_len longer than the batch; the full
attention limit (zero synthetic logits); no leak from the future; bad
parameters and learned arrays rejected; the model holds the arrays as
nnx.Params and trains them."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_variants as av
import variant_kit as kit
from configs import default
from tasks.base import Task
from train import step

_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _spec(implementation=None, **params):
  return kit.spec('synthesizer', implementation, **params)


def _random_learned(spec, q, k, *, max_len, seed=3):
  """The mode's learned arrays (shapes from init_learned), drawn at unit
  scale so the synthetic logits matter as much as the dot product."""
  rng = np.random.default_rng(seed)
  d = q.shape[-1]
  scale = {'w1': d ** -0.5, 'w2': d ** -0.5, 'b1': 0.5, 'b2': 0.5}
  return {name: jnp.asarray(rng.normal(size=x.shape) * scale.get(name, 1.0),
                            jnp.float32)
          for name, x in kit.learned(spec, q, k, max_len=max_len).items()}


def _numpy(q, k, v, learned, ql, kl, *, causal, dot_product, ct):
  """(out, {'q','k','v', learned names: gradient of <out, ct>}) in float64:
  logits = s q.k + S (module docstring), masked softmax, times V; the
  backward pass written out by hand."""
  q, k, v, ct = (np.asarray(x, np.float64) for x in (q, k, v, ct))
  p = {name: np.asarray(x, np.float64) for name, x in learned.items()}
  b, n, h, d = q.shape
  m, kvh = k.shape[1], k.shape[2]
  g = h // kvh
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = 1 / np.sqrt(d)
  logits = np.zeros((b, h, n, m))
  if dot_product:
    logits += np.einsum('bqhd,bshd->bhqs', q, kr) * s
  if 'r1' in p:
    logits += np.einsum('hqr,hsr->hqs', p['r1'][:, :n], p['r2'][:, :m])
  if 'r' in p:
    logits += p['r'][:, :n, :m]
  if 'w1' in p:
    pre = np.einsum('bqhd,hde->bhqe', q, p['w1']) + p['b1'][None, :, None]
    hidden = np.maximum(pre, 0)
    logits += (np.einsum('bhqe,hes->bhqs', hidden, p['w2'][:, :, :m])
               + p['b2'][None, :, None, :m])
  ok = kit.visible(n, m, ql, kl, causal)
  z = np.where(ok, logits, -np.inf)
  top = z.max(-1, keepdims=True)
  e = np.where(ok, np.exp(z - np.where(np.isfinite(top), top, 0.0)), 0.0)
  den = e.sum(-1, keepdims=True)
  probs = e / np.where(den > 0, den, 1.0)
  out = np.einsum('bhqs,bshd->bqhd', probs, vr)
  # Backward: dP = ct V^T, dlogits = P (dP - rowsum(dP P)).
  grads = {name: np.zeros_like(x) for name, x in p.items()}
  fold = lambda x: x.reshape(b, m, kvh, g, d).sum(3)
  grads['v'] = fold(np.einsum('bhqs,bqhd->bshd', probs, ct))
  dprobs = np.einsum('bqhd,bshd->bhqs', ct, vr)
  dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
  grads['q'] = np.zeros_like(q)
  grads['k'] = np.zeros_like(k)
  if dot_product:
    grads['q'] += np.einsum('bhqs,bshd->bqhd', dlogits, kr) * s
    grads['k'] += fold(np.einsum('bhqs,bqhd->bshd', dlogits, q) * s)
  dsyn = dlogits.sum(0)  # [h, n, m]: S is shared by the batch
  if 'r1' in p:
    grads['r1'][:, :n] = np.einsum('hqs,hsr->hqr', dsyn, p['r2'][:, :m])
    grads['r2'][:, :m] = np.einsum('hqs,hqr->hsr', dsyn, p['r1'][:, :n])
  if 'r' in p:
    grads['r'][:, :n, :m] = dsyn
  if 'w1' in p:
    grads['b2'][:, :m] = dlogits.sum((0, 2))
    grads['w2'][:, :, :m] = np.einsum('bhqe,bhqs->hes', hidden, dlogits)
    dpre = np.einsum('bhqs,hes->bhqe', dlogits, p['w2'][:, :, :m]) * (pre > 0)
    grads['b1'] = dpre.sum((0, 2))
    grads['w1'] = np.einsum('bqhd,bhqe->hde', q, dpre)
    grads['q'] += np.einsum('bhqe,hde->bqhd', dpre, p['w1'])
  return out, grads


def _outputs_and_grads(fns, q, k, v, learned, ct):
  """[(fn(q, k, v, learned), (dq, dk, dv, dlearned))], one program."""
  def run(q, k, v, learned):
    results = []
    for fn in fns:
      out, pullback = jax.vjp(fn, q, k, v, learned)
      results.append((out, pullback(ct)))
    return results
  return _jit(run)(q, k, v, learned)


def _assert_matches(got, want, *, atol):
  out, (dq, dk, dv, dlearned) = got
  want_out, want_grads = want
  np.testing.assert_allclose(out, want_out, atol=atol, err_msg='out')
  for name, x in [('q', dq), ('k', dk), ('v', dv), *dlearned.items()]:
    assert np.isfinite(np.asarray(x)).all(), f'non-finite d{name}'
    np.testing.assert_allclose(x, want_grads[name], atol=atol,
                               err_msg=f'd{name}')


CASES = [
    # mode, dot_product, n_q, n_k, kv_heads, block, causal
    ('factorized_random', True, 21, 21, 2, 8, False),   # 3 blocks, padded
    ('factorized_random', False, 13, 22, 1, 5, True),   # pure, more keys
    ('random', True, 21, 21, 4, 7, True),               # no GQA
    ('random', False, 22, 13, 2, 64, False),            # one clamped block
    ('dense', True, 21, 21, 2, 4, False),
    ('dense', False, 21, 21, 1, 8, True),
    ('dense+factorized_random', True, 13, 22, 2, 6, True),
]


@pytest.mark.parametrize(
    'mode,dot_product,n_q,n_k,kv_heads,block,causal', CASES,
    ids=['-'.join(map(str, c)) for c in CASES])
def test_matches_numpy_float64(mode, dot_product, n_q, n_k, kv_heads, block,
                               causal):
  """`xla` and `reference`: outputs and all gradients (each mode causal
  and bidirectional, with and without the dot product)."""
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads)
  params = dict(mode=mode, dot_product=dot_product, rank=3, block=block)
  # max_len past both lengths: the batch uses the leading rows.
  learned = _random_learned(_spec(**params), q, k,
                            max_len=max(n_q, n_k) + 3)
  ct = kit.cotangent(q.shape)
  kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
  fns = [lambda q, k, v, p, i=impl: av.attend(
      q, k, v, _spec(i, **params), learned=p, **kw)
         for impl in ('xla', 'reference')]
  got = _outputs_and_grads(fns, q, k, v, learned, ct)
  want = _numpy(q, k, v, learned, ql, kl, causal=causal,
                dot_product=dot_product, ct=ct)
  for result in got:
    _assert_matches(result, want, atol=2e-5)
  # Padded query rows and the batch row without keys are exact zeros.
  for out, _ in got:
    out = np.asarray(out)
    assert not out[1].any() and not out[2, int(ql[2]):].any()


def test_gradients_stay_finite_where_the_max_is_ambiguous():
  """Regression: at optimisation level 0 XLA:CPU computed q.k s + S in two
  ways (with and without a fused multiply-add), so the gradient of the
  softmax's row max (the entries equal to it) was 0 / 0 everywhere; these
  inputs gave NaN in dq, dk and the learned arrays before the max was put
  under stop_gradient."""
  q, k, v = kit.inputs(10, 10, batch=4, heads=2, kv_heads=2, head_dim=8)
  lengths = jnp.asarray([10, 7, 4, 10])
  spec = _spec(block=4)
  learned = kit.learned(spec, q, k)
  grads = _jit(jax.grad(lambda q, k, v, p: jnp.sum(av.attend(
      q, k, v, spec, q_lengths=lengths, kv_lengths=lengths,
      learned=p) ** 2), argnums=(0, 1, 2, 3)))(q, k, v, learned)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()


def test_weights_are_the_dense_probabilities():
  q, k, v, ql, kl = kit.padded_inputs(13, 22, kv_heads=2)
  spec = _spec(mode='dense+random', block=4)
  learned = _random_learned(spec, q, k, max_len=22)
  kw = dict(q_lengths=ql, kv_lengths=kl, learned=learned)
  run = _jit(lambda q, k, v: [
      (av.attention_weights(q, k, v, spec, causal=c, **kw),
       av.attend(q, k, v, spec, causal=c, **kw)) for c in (False, True)])
  vr = jnp.repeat(v, 2, axis=2)
  for causal, (w, out) in zip((False, True), run(q, k, v)):
    assert w.shape == (4, 4, 13, 22) and w.dtype == jnp.float32
    ok = np.broadcast_to(kit.visible(13, 22, ql, kl, causal), w.shape)
    np.testing.assert_allclose(w.sum(-1), ok.any(-1), atol=1e-6)
    assert not np.asarray(w)[~ok].any()
    np.testing.assert_allclose(out, jnp.einsum('bhqs,bshd->bqhd', w, vr),
                               atol=1e-5)


@pytest.mark.parametrize('mode', ['factorized_random', 'random', 'dense'])
def test_zero_synthetic_logits_are_full_attention(mode):
  """Zero learned arrays and the dot product on: exactly kit.reference
  (`reference`, bit for bit), and `xla` to rounding, causal and not."""
  q, k, v, ql, kl = kit.padded_inputs()
  zeros = {name: jnp.zeros_like(x) for name, x in kit.learned(
      _spec(mode=mode), q, k, max_len=30).items()}

  def run(q, k, v):
    results = []
    for causal in (False, True):
      kw = dict(causal=causal, q_lengths=ql, kv_lengths=kl)
      results.append([
          av.attend(q, k, v, _spec(impl, mode=mode, block=8), learned=zeros,
                    **kw) for impl in ('reference', 'xla')]
                     + [kit.reference(q, k, v, **kw)])
    return results
  for reference, xla, want in _jit(run)(q, k, v):
    np.testing.assert_array_equal(reference, want)
    np.testing.assert_allclose(xla, want, atol=1e-6)


def test_no_leak_from_the_future():
  """Causal: changing tokens after position t (q, k, v) changes no output
  at or before t (the synthetic logits, R and the dense MLP's, are masked
  too)."""
  n, t = 16, 9
  q, k, v, _, _ = kit.padded_inputs(n, n, kv_lengths=(16,) * 4)
  q2, k2, v2, _, _ = kit.padded_inputs(n, n, seed=5, kv_lengths=(16,) * 4)
  later = (jnp.arange(n) > t)[None, :, None, None]
  mix = lambda a, b: jnp.where(later, b, a)
  spec = _spec(mode='dense+random', block=4)
  learned = _random_learned(spec, q, k, max_len=n)
  f = lambda q, k, v: av.attend(q, k, v, spec, causal=True, learned=learned)
  a, b = _jit(lambda q, k, v, q2, k2, v2: (
      f(q, k, v), f(mix(q, q2), mix(k, k2), mix(v, v2))))(q, k, v, q2, k2, v2)
  np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_init_shapes_and_scales():
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 8, 2, 16))
  factorized = kit.learned(_spec(rank=5), q, k, max_len=40)
  both = kit.learned(_spec(mode='dense+random'), q, k, max_len=40)
  again = kit.learned(_spec(rank=5), q, k, max_len=40)
  assert {n: x.shape for n, x in factorized.items()} == {
      'r1': (4, 40, 5), 'r2': (4, 40, 5)}
  assert {n: x.shape for n, x in both.items()} == {
      'r': (4, 40, 40), 'w1': (4, 16, 16), 'b1': (4, 16), 'w2': (4, 16, 40),
      'b2': (4, 40)}
  # Glorot-uniform bounds: LRA's (fans include the head axis) for R1, R2,
  # R; per head for W1, W2; zero biases.
  bound = {'r1': (6 / (4 * 45)) ** 0.5, 'r2': (6 / (4 * 45)) ** 0.5,
           'r': (6 / (4 * 80)) ** 0.5, 'w1': (6 / 32) ** 0.5,
           'w2': (6 / 56) ** 0.5}
  for name, x in {**factorized, **both}.items():
    x = np.asarray(x)
    assert x.dtype == np.float32
    if name in bound:
      assert 0.8 * bound[name] < np.abs(x).max() <= bound[name], name
    else:
      assert not x.any(), name
  assert not np.array_equal(factorized['r1'], factorized['r2'])
  np.testing.assert_array_equal(again['r1'], factorized['r1'])


@pytest.mark.parametrize('name,value,match', [
    ('mode', 'nope', "mode='nope'.*factorized_random"),
    ('mode', 'random+factorized_random', 'mode='),
    ('mode', 3, 'mode=3'),
    ('rank', 0, r'rank=0.*>= 1'),
    ('rank', 2.5, r'rank=2.5.*>= 1'),
    ('dot_product', 1, r'dot_product=1.*true or false'),
    ('block', -2, r'block=-2.*>= 1'),
])
def test_bad_params_raise(name, value, match):
  kit.assert_bad_params_raise(_spec(**{name: value}),
                              rf'attention.synthesizer.{match}')


def test_learned_arrays_are_checked():
  q, k, v, _, _ = kit.padded_inputs(5, 5)
  with pytest.raises(ValueError, match='needs learned arrays'):
    av.attend(q, k, v, _spec())      # omitted: {}, which lacks r1, r2
  dense = kit.learned(_spec(mode='dense'), q, k, max_len=8)
  with pytest.raises(ValueError, match="mode='factorized_random'.*needs"):
    av.attend(q, k, v, _spec(), learned=dense)
  short = kit.learned(_spec(), q, k, max_len=4)
  with pytest.raises(ValueError, match='5 tokens is longer than the '
                                       'max_len=4'):
    av.attend(q, k, v, _spec(), learned=short)


def test_low_precision_in_and_out():
  q, k, v, ql, kl = kit.padded_inputs(19, 19, dtype=jnp.bfloat16)
  spec = _spec(mode='dense+factorized_random', block=8)
  learned = _random_learned(spec, q, k, max_len=19)
  kw = dict(causal=True, q_lengths=ql, kv_lengths=kl, learned=learned)
  out, want = _jit(lambda q, k, v: (
      av.attend(q, k, v, spec, **kw),
      av.attend(*(x.astype(jnp.float32) for x in (q, k, v)),
                _spec('reference', mode=spec['synthesizer']['mode']),
                **kw)))(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2)


def test_model_holds_and_trains_the_learned_arrays():
  """train.step.build: the layer's synthetic arrays are nnx.Params of the
  encoder and get non-zero gradients."""
  cfg = default.base()
  cfg.model.update(num_layers=1, dim=16, num_heads=2, mlp_dim=32)
  task = Task('toy', vocab_size=12, seq_len=10, num_classes=2,
              head='classify', causal=False, sources=None, cls_token=True)
  spec = _spec(mode='dense+factorized_random', rank=4)
  setup = step.build(cfg.model, spec, task, cfg.train, seed=0)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  learned = model.encoder.blocks[0].attn.learned
  names = {'r1', 'r2', 'w1', 'b1', 'w2', 'b2'}
  assert set(learned) == names
  for x in learned.values():
    assert isinstance(x, nnx.Param) and x[...].dtype == jnp.float32
  assert learned['r1'][...].shape == (2, 10, 4)   # max_len = task.seq_len
  assert learned['w2'][...].shape == (2, 8, 10)
  batch = {'inputs': jnp.asarray(np.random.default_rng(0).integers(
      1, 12, (4, 10)), jnp.int32), 'length': jnp.asarray([10, 7, 4, 10]),
           'label': jnp.asarray([0, 1, 1, 0])}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    out = m(batch, attention_rng=jax.random.key(0))
    return m.head.loss(out, batch)[0].mean()
  grads = _jit(jax.grad(loss))(params)
  found = {}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    keys = [str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path]
    if 'learned' in keys:
      found[keys[keys.index('learned') + 1]] = np.asarray(g)
  assert set(found) == names
  for name, g in found.items():
    # b1 starts at zero and W1 q has either sign: some ReLUs are on.
    assert np.abs(g).max() > 0, name
