"""Linformer (Wang et al. 2020): full attention when k = N and E = F = I
(outputs and gradients, padding, GQA, every sharing mode); attend, weights
and the gradients with respect to q, k, v, E and F against the definition
in attention_variants/linformer.py's docstring written out here in numpy
(float64, gradients by hand); the parameter shapes of each sharing mode and
their initialisation; causal, bad parameters and mismatched learned arrays
rejected; linear memory; and the model holds E and F as trained
parameters."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_variants as av
import variant_kit as kit
from attention_variants import linformer

_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def _spec(implementation=None, **params):
  return kit.spec('linformer', implementation, **params)


def _identity(n, p=1, share_kv=False):
  eye = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (p, n, n))
  return {'E': eye} if share_kv else {'E': eye, 'F': eye}


@pytest.mark.parametrize('kv_heads,share_heads,share_kv,max_len', [
    (2, True, False, 21),    # GQA, one pair per layer
    (2, False, True, 21),    # GQA, one E = F per kv head
    (4, True, False, 27),    # max_len > N: the leading columns of I (27)
])
def test_identity_projections_are_full_attention(kv_heads, share_heads,
                                                 share_kv, max_len):
  """k = max_len >= N and E = F = I: K~, V~ are K, V with padded rows
  masked (and the rows past N empty), so the output is full attention
  exactly, with padding (a row without keys, short queries, short keys)."""
  q, k, v, ql, kl = kit.padded_inputs(kv_heads=kv_heads)
  spec = _spec(k=max_len, share_heads=share_heads, share_kv=share_kv)
  learned = _identity(max_len, 1 if share_heads else kv_heads, share_kv)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  got, want = kit.outputs_and_grads([
      lambda q, k, v: av.attend(q, k, v, spec, learned=learned, **kw),
      lambda q, k, v: kit.reference(q, k, v, **kw)], q, k, v, jit=_jit)
  kit.assert_close(got, want, atol=1e-5)
  out = np.asarray(got[0])
  assert not out[1].any() and not out[2, int(ql[2]):].any()


def _dense(q, k, v, e, f, ql, kl, ct):
  """The definition per batch row and query head, float64, with the
  gradients of <out, ct> by hand. Returns (weights P F' [b, h, n_q, n_k],
  out [b, n_q, h, d], (dq, dk, dv, dE, dF))."""
  q, k, v, e, f, ct = (np.asarray(x, np.float64) for x in (q, k, v, e, f, ct))
  b, n_q, h, d = q.shape
  n_k, groups = k.shape[1], h // k.shape[2]
  s = 1 / np.sqrt(d)
  w, out = np.zeros((b, h, n_q, n_k)), np.zeros(q.shape)
  dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
  de, df = np.zeros(e.shape), np.zeros(f.shape)
  for i in range(b):
    q_valid, k_valid = np.arange(n_q) < ql[i], np.arange(n_k) < kl[i]
    for head in range(h):
      kh = head // groups
      p_ = kh if e.shape[0] > 1 else 0
      em, fm = e[p_, :, :n_k] * k_valid, f[p_, :, :n_k] * k_valid
      live = (em != 0).any(1) | (fm != 0).any(1)
      qi, ki, vi = q[i, :, head], k[i, :, kh], v[i, :, kh]
      kp, vp = em @ ki, fm @ vi
      p = kit.softmax_masked(qi @ kp.T * s, q_valid, live)
      w[i, head], out[i, :, head] = p @ fm, p @ vp
      g = ct[i, :, head]
      dvp, dp = p.T @ g, g @ vp.T
      ds = p * (dp - (dp * p).sum(-1, keepdims=True))
      dkp = ds.T @ qi * s
      dq[i, :, head] = ds @ kp * s
      dk[i, :, kh] += em.T @ dkp
      dv[i, :, kh] += fm.T @ dvp
      de[p_, :, :n_k] += (dkp @ ki.T) * k_valid
      df[p_, :, :n_k] += (dvp @ vi.T) * k_valid
  return w, out, (dq, dk, dv, de, df)


@pytest.mark.parametrize(
    'n_q,n_k,kv_heads,rows,share_heads,share_kv,sparse,block', [
        (21, 21, 2, 5, True, False, False, 7),    # GQA, shared pair
        (13, 22, 2, 6, False, False, False, 5),   # per kv head; more keys
        (22, 13, 4, 4, True, True, True, 1024),   # E = F; dead rows
        (21, 21, 1, 8, False, False, True, 4),    # zeros in E, F; max_len 30
    ])
def test_matches_dense_definition(n_q, n_k, kv_heads, rows, share_heads,
                                  share_kv, sparse, block, monkeypatch):
  """Random learned E, F from init_learned (max_len > n_k in the last case:
  its leading columns); 'sparse' zeroes ~70% of their entries so that some
  projected rows have no weight on the valid keys of short rows and are
  masked. Query rows are answered `block` at a time (linformer.ROW_BLOCK:
  dividing n_q, padded, or one block)."""
  monkeypatch.setattr(linformer, 'ROW_BLOCK', block)
  q, k, v, ql, kl = kit.padded_inputs(n_q, n_k, kv_heads, scale=1.0)
  spec = _spec(k=rows, share_heads=share_heads, share_kv=share_kv)
  learned = kit.learned(spec, q, k, max_len=30 if kv_heads == 1 else None)
  if sparse:
    keep = np.random.default_rng(5).random(learned['E'].shape) < 0.3
    learned = {name: x * keep for name, x in learned.items()}
  ct = kit.cotangent(q.shape)
  kw = dict(q_lengths=ql, kv_lengths=kl)
  loss = lambda q, k, v, learned: jnp.sum(
      av.attend(q, k, v, spec, learned=learned, **kw) * ct)
  w, out, ref, grads = _jit(lambda q, k, v, learned: (
      av.attention_weights(q, k, v, spec, learned=learned, **kw),
      av.attend(q, k, v, spec, learned=learned, **kw),
      av.attend(q, k, v, _spec('reference', k=rows, share_heads=share_heads,
                               share_kv=share_kv), learned=learned, **kw),
      jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, learned)))(
          q, k, v, learned)
  f = learned['E'] if share_kv else learned['F']
  want_w, want, want_grads = _dense(q, k, v, learned['E'], f, np.asarray(ql),
                                    np.asarray(kl), ct)
  assert w.shape == (4, 4, n_q, n_k) and w.dtype == jnp.float32
  assert out.dtype == q.dtype
  np.testing.assert_allclose(w, want_w, atol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(ref, want, atol=1e-5)
  dq, dk, dv, de, df = want_grads
  if share_kv:
    de, df = de + df, None
  for name, g, wg in [('q', grads[0], dq), ('k', grads[1], dk),
                      ('v', grads[2], dv), ('E', grads[3]['E'], de)] + (
                          [] if share_kv else [('F', grads[3]['F'], df)]):
    np.testing.assert_allclose(g, wg, atol=2e-5, err_msg=f'd{name}')
  assert np.abs(np.asarray(grads[3]['E'])).max() > 0
  out = np.asarray(out)
  assert not out[1].any()                 # no valid key
  assert not out[2, int(ql[2]):].any()    # padded query rows
  if sparse:  # the premise: some row of a short batch row is dead
    e = np.asarray(learned['E'])[..., :n_k] != 0
    if not share_kv:
      e |= np.asarray(learned['F'])[..., :n_k] != 0
    assert not e[..., :int(kl[3])].any(-1).all()


@pytest.mark.parametrize('share_heads,share_kv', [
    (True, False), (False, False), (True, True), (False, True)])
def test_sharing_modes_give_the_documented_shapes(share_heads, share_kv):
  spec = _spec(k=16, share_heads=share_heads, share_kv=share_kv)
  got = av.init_learned(spec, jax.random.key(0), num_heads=6, num_kv_heads=3,
                        head_dim=8, max_len=40)
  p = 1 if share_heads else 3
  assert sorted(got) == (['E'] if share_kv else ['E', 'F'])
  for x in got.values():
    assert x.shape == (p, 16, 40) and x.dtype == jnp.float32


def test_init_is_xavier_uniform_and_k_is_clamped():
  """U(-a, a), a = sqrt(3 / (max_len + k)); E and F drawn independently;
  k > max_len is clamped to max_len."""
  got = linformer.init(jax.random.key(1), av.defaults('linformer'),
                       num_heads=2, num_kv_heads=2, head_dim=8, max_len=1000)
  bound = np.sqrt(3 / (1000 + 256))
  for x in map(np.asarray, got.values()):
    assert x.shape == (1, 256, 1000)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.99 * bound
    np.testing.assert_allclose(x.std(), bound / np.sqrt(3), rtol=0.01)
  assert not np.allclose(got['E'], got['F'])
  small = linformer.init(jax.random.key(1), av.defaults('linformer'),
                         num_heads=2, num_kv_heads=2, head_dim=8, max_len=24)
  assert small['E'].shape == (1, 24, 24)


def test_causal_is_rejected():
  q, k, v, _, _ = kit.padded_inputs(5, 5)
  learned = kit.learned(_spec(), q, k)
  for fn in (av.attend, av.attention_weights):
    with pytest.raises(ValueError, match='linformer is bidirectional only'):
      fn(q, k, v, _spec(), causal=True, learned=learned)


@pytest.mark.parametrize('name,value,match', [
    ('k', 0, '>= 1'), ('k', 2.5, '>= 1'), ('share_heads', 1, 'True or False'),
    ('share_kv', 'no', 'True or False')])
def test_bad_params_raise(name, value, match):
  kit.assert_bad_params_raise(
      _spec(**{name: value}), rf'attention.linformer.{name}={value!r}.*{match}')


def test_mismatched_learned_arrays_raise():
  q, k, v, _, _ = kit.padded_inputs(9, 9)
  spec = _spec(k=4)
  learned = kit.learned(spec, q, k)
  with pytest.raises(ValueError, match=r'needs learned=\{E, F\}'):
    av.attend(q, k, v, spec)          # omitted: {}, which lacks E and F
  with pytest.raises(ValueError, match=r'needs learned=\{E\}'):
    av.attend(q, k, v, _spec(k=4, share_kv=True), learned=learned)
  with pytest.raises(ValueError, match='do not fit'):
    av.attend(q, k, v, _spec(k=4, share_heads=False), learned=learned)
  with pytest.raises(ValueError, match='do not fit'):
    av.attend(q, k, v, _spec(k=5), learned=learned)
  short = kit.learned(spec, q, k, max_len=8)
  with pytest.raises(ValueError, match='max_len=8 keys; got 9'):
    av.attend(q, k, v, spec, learned=short)


@pytest.mark.slow  # compiles forward + backward at 2 lengths; opt-in
def test_backward_memory_is_linear_in_length():
  """Doubling N at most doubles forward + backward memory (N x N would 4x);
  kit passes init_learned's E and F for each length."""
  kit.assert_backward_memory_is_linear(_spec(k=64), causal=False, n=1024)


def test_the_model_trains_e_and_f():
  """step.build holds each layer's E and F as nnx.Param in the model state
  (counted in num_params) and the loss has non-zero gradients in them."""
  from configs import default
  from tasks.base import Task
  from train import step
  cfg = default.base()
  cfg.model.update(num_layers=1, dim=16, num_heads=2, num_kv_heads=1,
                   mlp_dim=16)
  task = Task('toy', vocab_size=12, seq_len=10, num_classes=2,
              head='classify', causal=False, sources=None, cls_token=True)
  spec = {'kind': 'linformer', 'linformer': {'k': 4, 'share_heads': False}}
  setup = step.build(cfg.model, spec, task, cfg.train, seed=0)
  model, _ = nnx.merge(setup.graphdef, setup.state)
  learned = model.encoder.blocks[0].attn.learned
  assert sorted(learned) == ['E', 'F']
  params = nnx.state(model, nnx.Param)
  found = [x for path, x in nnx.to_flat_state(params)
           if path[-1] in ('E', 'F')]
  assert len(found) == 2 and all(x.shape == (1, 4, 10) for x in found)
  batch = {'inputs': jnp.asarray(np.arange(16).reshape(2, 8) % 11 + 1),
           'length': jnp.asarray([8, 5]), 'label': jnp.asarray([0, 1])}

  def loss(model):
    logits = model(batch, attention_rng=jax.random.key(0))
    return model.head.loss(logits, batch)[0].sum()
  grads = _jit(nnx.grad(loss))(model)
  g = grads['encoder']['blocks'][0]['attn']['learned']
  for name in ('E', 'F'):
    x = np.asarray(g[name][...])
    assert np.abs(x[..., :8]).max() > 0       # the batch's 8 columns
    assert not x[..., 8:].any()               # columns past the batch
